"""One benchmark for every script: speed, FLOPs utilisation, memory, and how close each model gets to the corpus's
entropy floor in a fixed time, side by side, on this machine. A benchmark, not a test: it asserts nothing.

    python bench.py                     # every script, 120 s of training each: about 20 minutes on 2 cores
    python bench.py --quick             # tiny models and budgets: under 2 minutes, to see that it all runs
    python bench.py --only=llama,bpe    # only the scripts (and bpe) whose name contains one of these
    python bench.py --nanogpt=~/nanoGPT # also nanoGPT's train.py beside gpt_torch.py and gpt_jax.py, at its CPU setting

What it measures, each in a process of its own (one framework's threads and memory never disturb another's):
  - this machine's float32 matmul throughput, with one large matmul in each framework: the yardstick of the model
    FLOPs utilisation (MFU) below, which takes the faster framework's as the machine's;
  - every model script trained from its own functions (model, optimizer, train step, evaluation) for --seconds of
    wall-clock time, counted from the process's start (imports, building, compiling included; evaluations not),
    with the learning-rate schedule fitted to the budget: the steps that fit are estimated after 21 steps and again
    after every block of the warmup, whose learning rates do not depend on the number of steps. It reports tokens/s
    (median over blocks of 10 steps, the first step and the first block apart),
    MFU (the matmul FLOPs of a training step, counted by torch.utils.flop_counter on the torch twin), peak resident
    memory, the val bits per byte reached beside the corpus's floor, and sampling tokens/s;
  - sampling at contexts of 128, 512 and 1024 tokens: one step with the KV cache (Llama, MoE) or the recurrent
    state (Mamba) against recomputing the whole context (GPT has no cache: recomputation only);
  - Mamba's parallel scan against its sequential scan (a training step at seq_len 256); bpe.py's training and
    encoding speed, and its fast trainer against the slow one.
Every ratio is taken within one run of this script. Writes bench.md (the tables, with the date, CPU and library
versions: README's results section is this file) and bench.png (val bpb against seconds, the floor as a line),
replacing the last run's; --out_dir puts them elsewhere.
"""

import argparse
import datetime
import functools
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

STARTED = time.perf_counter()  # a worker's budget counts from here: its imports are part of what a user waits for
ROOT = os.path.dirname(os.path.abspath(__file__))
STORIES = os.path.join(ROOT, "data", "stories.txt")  # the default corpus, which every script trains on here
FAMILIES = ("gpt", "llama", "moe", "mamba")
FRAMEWORKS = ("torch", "jax")
MODEL_CLASSES = {"gpt": "GPT", "llama": "Llama", "moe": "MoE", "mamba": "Mamba"}
# each script's defaults, except Mamba at 6 layers: 732,544 parameters against the dense Llama's 803,968 (and the
# mixture's 808,064 active), so that the families compare at one size
OPTIONS = {"mamba": ["--num_layers=6"]}
QUICK = ["--num_layers=2", "--model_dim=32", "--seq_len=32", "--warmup_steps=5", "--eval_steps=2"]
CONTEXTS, QUICK_CONTEXTS = (128, 512, 1024), (32, 64)
PACKAGES = ("torch", "jax", "flax", "optax", "numpy", "matplotlib")


# -----------------------------------------------------------------------------
# Measurements: each function runs in a worker process (python bench.py --worker=...) and returns a dict

def peak_memory_mib():
    """This process's largest resident memory so far: kilobytes on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def matmul_throughput(framework, size):
    """float32 FLOP/s of a (size, size) @ (size, size) matmul: median of 10, after 2 untimed."""
    if framework == "torch":
        import torch
        a, b = torch.randn(size, size), torch.randn(size, size)
        run = lambda: a @ b
    else:
        import jax
        a = jax.random.normal(jax.random.key(0), (size, size))
        b = jax.random.normal(jax.random.key(1), (size, size))
        matmul = jax.jit(lambda a, b: a @ b)
        run = lambda: matmul(a, b).block_until_ready()
    times = []
    for i in range(12):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"flops": 2 * size**3 / statistics.median(times[2:])}


def attention_flops(query_shape, key_shape, *args, **kwargs):
    """FLOPs of attention's two matmuls (scores, weighted sum) on the CPU: torch's counter has no formula for the CPU
    kernel of scaled_dot_product_attention. The whole score matrix counts, as in PaLM's convention."""
    batch_size, num_heads, length, head_dim = query_shape
    return 2 * 2 * batch_size * num_heads * length * key_shape[-2] * head_dim


def attention_backward_flops(grad_shape, query_shape, key_shape, *args, **kwargs):
    return 2 * attention_flops(query_shape, key_shape)  # four matmuls: the gradients of the scores and of the weights


def torch_training(module, config):
    """The torch script's own model, optimizer and steps: (step(x, y, lr) -> loss, val_loss(tokens), model, a
    function counting the matmul FLOPs of one training step)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    ATTENTION_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
                       aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops}
    device, _ = module.start_devices(config)
    torch.manual_seed(config.seed)
    model = getattr(module, MODEL_CLASSES[config.family])(config).to(device)
    train_step, eval_loss = module.make_steps(model, module.make_optimizer(model, config), config)
    first = lambda output: output[0] if isinstance(output, tuple) else output  # moe adds its balancing statistics

    def count_flops(x, y):
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            train_step(x, y, 0.0)
        return counter.get_total_flops()
    return (lambda x, y, lr: first(train_step(x, y, lr)),
            lambda tokens: first(module.evaluate(eval_loss, tokens, config)), model, count_flops)


def jax_training(module, config):
    """As torch_training, for the jax twin: its train step threads the parameters and optimizer state (and the
    mixture's expert biases) through, so the returned step keeps them; the model gets the trained arrays back
    through update_model before sampling."""
    import jax
    from flax import nnx
    mesh, _ = module.start_devices(config)
    init_key, dropout_key, _ = jax.random.split(jax.random.key(config.seed), 3)
    model = getattr(module, MODEL_CLASSES[config.family])(config, nnx.Rngs(init_key))
    optimizer = module.make_optimizer(config)
    if config.family == "llama":  # the RoPE tables are buffers, not trained
        graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
        states, extra = [params], (nnx.to_pure_dict(buffers),)
    elif config.family == "moe":  # and the expert biases move outside the optimizer
        graphdef, params, bias, buffers = nnx.split(model, nnx.Param, module.ExpertBias, ...)
        states, extra = [params, bias], (nnx.to_pure_dict(buffers),)
    else:
        graphdef, params = nnx.split(model)
        states, extra = [params], ()
    states = [nnx.to_pure_dict(state) for state in states]
    state = [states[0], optimizer.init(states[0]), *states[1:]]
    state = list(jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
    if config.family == "gpt":
        train_step, eval_loss = module.make_steps(graphdef, optimizer, dropout_key, mesh)
    elif config.family == "moe":
        train_step, eval_loss = module.make_steps(graphdef, *extra, optimizer, config, mesh)
    else:
        train_step, eval_loss = module.make_steps(graphdef, *extra, optimizer, mesh)
    steps_done = [0]

    def step(x, y, lr):
        extra = (steps_done[0],) if config.family == "gpt" else ()  # GPT's dropout key is a function of the step
        outputs = train_step(*state, x, y, lr, *extra)
        steps_done[0] += 1
        state[:] = outputs[: len(state)]
        return outputs[len(state)]

    def val_loss(tokens):
        arrays = [state[0]] + state[2:]  # the parameters (and the expert biases): not the optimizer state
        result = module.evaluate(eval_loss, *arrays, tokens, config)
        return result[0] if isinstance(result, tuple) else result

    def update_model():
        nnx.update(model, *[jax.tree.map(lambda array: array.addressable_data(0), s) for s in [state[0]] + state[2:]])
    model.update_from_training = update_model
    return step, val_loss, model, None


def train_for(script, options, seconds):
    """Train script's model for seconds of wall-clock time (from this process's start, evaluations excluded), with the
    cosine schedule fitted to the steps that fit; return its speed, memory and val bpb curve."""
    import numpy as np
    family, framework = script.split("_")
    module = importlib.import_module(script)
    config = module.parse_config(["--data=" + STORIES, *options])
    config.family = family
    train_tokens, val_tokens, token_bytes, floor = module.load_data(config)
    config.vocab_size = len(token_bytes)
    byte_lengths = np.array([len(b) for b in token_bytes])
    tokens_per_byte = len(val_tokens) / byte_lengths[val_tokens].sum()
    step, val_loss, model, count_flops = (torch_training if framework == "torch" else jax_training)(module, config)
    parameters, active = count_parameters(model, config)
    data_rng = np.random.default_rng(config.seed)
    evaluating = [0.0]  # seconds spent evaluating: not counted in the budget

    def clock():
        return time.perf_counter() - STARTED - evaluating[0]

    def bpb():
        start = time.perf_counter()
        value = val_loss(val_tokens) / math.log(2) * tokens_per_byte
        evaluating[0] += time.perf_counter() - start
        return value

    def run(steps_from, count):
        """count steps from step steps_from; returns the last loss as a float (which waits for the steps)."""
        for number in range(steps_from, steps_from + count):
            x, y = module.get_batch(train_tokens, data_rng, config)
            loss = step(x, y, module.learning_rate_at(number, config))
        return float(loss)

    startup = clock()
    start = time.perf_counter()
    loss = run(0, 1)  # the first step: jax compiles here
    first_step = time.perf_counter() - start
    done, block_ms, curve, planned, eval_every = 1, [], [], None, None
    # two blocks always (they measure the speed), then until the planned steps are done or the time is up
    while math.isfinite(loss) and (planned is None or (done < planned and clock() < seconds)):
        count = 10 if planned is None else min(10, planned - done, eval_every - done % eval_every)
        start = time.perf_counter()
        loss = run(done, count)
        block_ms.append((time.perf_counter() - start) * 1000 / count)
        done += count
        # fit the schedule to the steps the rest of the budget holds, at the speed measured so far; again after every
        # block of the warmup, whose learning rates do not depend on the number of steps
        if len(block_ms) >= 2 and (planned is None or done < config.warmup_steps):
            planned = done + max(0, int((seconds - clock()) * 1000 / statistics.median(block_ms[1:])))
            config.steps, eval_every = planned, max(10, planned // 10)
        if planned is not None and (done % eval_every == 0 or done == planned):
            curve.append((clock(), done, bpb()))
    if not curve or curve[-1][1] != done:
        curve.append((clock(), done, bpb()))
    result = dict(script=script, family=family, framework=framework, parameters=parameters, active=active,
                  startup_s=startup, first_step_s=first_step, steps=done, train_seconds=clock(),
                  ms_per_step=statistics.median(block_ms[1:] or block_ms),
                  tokens_per_step=config.batch_size * config.seq_len, peak_mib=peak_memory_mib(), val_bpb=curve[-1][2],
                  floor=floor, curve=curve, diverged=not math.isfinite(loss))
    x, y = module.get_batch(train_tokens, data_rng, config)
    result["sampling_tokens_per_s"] = sampling_speed(module, model, [int(t) for t in val_tokens[:16]], config)
    result["flops_per_step"] = count_flops(x, y) if count_flops else None
    return result


def measure(script, options, seconds, contexts, scan_repeats):
    """Everything bench measures of one script, in this one process: training first (its peak memory is read
    before anything else runs), then sampling at long contexts, then, for Mamba, the two scans."""
    result = train_for(script, options, seconds)
    result["sampling"] = sampling_costs(script, options, contexts)
    if script.startswith("mamba"):
        result["scans"] = scan_speed(script, options, scan_repeats)
    return result


def count_parameters(model, config):
    """Total parameters and those a token meets: the mixture's experts that a token does not visit left out."""
    if hasattr(model, "parameters"):
        total = sum(p.numel() for p in model.parameters())
    else:
        import jax
        from flax import nnx
        total = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    idle = 0
    if config.family == "moe":
        idle = config.num_layers * (config.num_experts - config.experts_per_token) * 3 * config.model_dim * \
            config.expert_ffn_dim
    return total, total - idle


def sampling_speed(module, model, prompt, config, new_tokens=200):
    """Tokens/s of the script's generate() from the trained model: the second of two identical calls (the first
    compiles)."""
    if hasattr(model, "update_from_training"):  # jax: the trained arrays into the model
        import jax
        model.update_from_training()
        run = lambda: module.generate(model, prompt, new_tokens, config.temperature, config.top_k, jax.random.key(0))
    else:
        run = lambda: module.generate(model, prompt, new_tokens, config.temperature, config.top_k)
    run()
    start = time.perf_counter()
    run()
    return new_tokens / (time.perf_counter() - start)


def sampling_costs(script, options, contexts, repeats=8):
    """Milliseconds per sampled token at each context length: one step with the KV cache or the recurrent state
    (median of repeats, after a prefill of the context), and one recomputation over the whole context (median of
    repeats, after one untimed). A fresh model, long enough for the longest context: a step's cost does not depend
    on the weights' values."""
    import numpy as np
    family, framework = script.split("_")
    module = importlib.import_module(script)
    longest = max(contexts) + repeats + 1
    config = module.parse_config(["--data=" + STORIES, *options,
                                  f"--seq_len={longest}"])
    config.vocab_size = 256
    rng = np.random.default_rng(0)
    if framework == "torch":
        import torch
        torch.manual_seed(0)
        model = getattr(module, MODEL_CLASSES[family])(config).eval()
        ready = lambda value: value
    else:
        import jax
        from flax import nnx
        model = getattr(module, MODEL_CLASSES[family])(config, nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        state = nnx.to_pure_dict(state)
        ready = jax.block_until_ready
        key = jax.random.key(0)
        if family != "gpt":
            jitted = module.make_next_token(graphdef, 1.0, 0)

    def timed(call, times):
        results = []
        for _ in range(times):
            start = time.perf_counter()
            ready(call())
            results.append((time.perf_counter() - start) * 1000)
        return statistics.median(results)

    costs = {}
    for context in contexts:
        prompt = rng.integers(0, 256, context)
        tokens = prompt[None].astype(np.int32 if framework == "jax" else np.int64)  # (1, context)
        cached = None
        if family == "gpt":  # no cache: generate() reruns the model over the context for every new token
            if framework == "torch":
                forward = torch.inference_mode()(lambda: model(torch.from_numpy(tokens))[0][0, -1])
            else:
                forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0][0, -1])
                forward = functools.partial(forward, state, tokens)
            forward()  # untimed: compiles (jax), warms up (torch)
            recomputed = timed(forward, repeats)
        elif framework == "torch" and family == "mamba":
            _, states = module.next_token(model, tokens, None, -1, 1.0, 0)  # the prefill
            cached = timed(lambda: module.next_token(model, tokens[:, -1:], states, 0, 1.0, 0), repeats)
            module.next_token(model, tokens, None, -1, 1.0, 0)  # untimed, as in jax
            recomputed = timed(lambda: module.next_token(model, tokens, None, -1, 1.0, 0), repeats)
        elif framework == "torch":
            cache = model.new_cache(1, context + repeats + 1)
            module.next_token(model, tokens, cache, 0, -1, 1.0, 0)  # the prefill
            position = [context]

            def one_step():
                module.next_token(model, tokens[:, -1:], cache, position[0], 0, 1.0, 0)
                position[0] += 1
            cached = timed(one_step, repeats)
            module.next_token(model, tokens, None, 0, -1, 1.0, 0)  # untimed, as in jax
            recomputed = timed(lambda: module.next_token(model, tokens, None, 0, -1, 1.0, 0), repeats)
        elif family == "mamba":
            _, states = jitted(state, tokens, None, -1, key, 0)
            jitted(state, tokens[:, -1:], states, 0, key, 0)  # compiles the step
            cached = timed(lambda: jitted(state, tokens[:, -1:], states, 0, key, 0), repeats)
            jitted(state, tokens, None, -1, key, 0)
            recomputed = timed(lambda: jitted(state, tokens, None, -1, key, 0), repeats)
        else:
            cache = model.new_cache(1, context + repeats + 1)
            _, cache = jitted(state, tokens, cache, 0, context - 1, key, 0)  # the prefill
            position = [context]

            def one_step():
                _, cache_now = jitted(state, tokens[:, -1:], cache, position[0], 0, key, 0)
                position[0] += 1
                return cache_now
            one_step()  # compiles the step
            cached = timed(one_step, repeats)
            jitted(state, tokens, None, 0, context - 1, key, 0)
            recomputed = timed(lambda: jitted(state, tokens, None, 0, context - 1, key, 0), repeats)
        costs[context] = (cached, recomputed)
    return {str(context): value for context, value in costs.items()}


def scan_speed(script, options, repeats):
    """ms per training step of Mamba at seq_len 256 with the parallel and the sequential scan, one layer (the scan's
    share of a step; more layers multiply both): the median of repeats steps after one untimed."""
    import numpy as np
    module = importlib.import_module(script)
    framework = script.split("_")[1]
    result = {}
    for scan in ("parallel", "sequential"):
        config = module.parse_config(["--data=" + STORIES, *options,
                                      "--num_layers=1", "--seq_len=256", f"--scan={scan}"])
        config.family, config.vocab_size = "mamba", 256
        step = (torch_training if framework == "torch" else jax_training)(module, config)[0]
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (config.batch_size, 256))
        times = []
        for i in range(1 + repeats):
            start = time.perf_counter()
            float(step(x, x, 1e-3))
            times.append((time.perf_counter() - start) * 1000)
        result[scan] = statistics.median(times[1:])
    return result


def bpe_speed(path, quick):
    """bpe.py on a text: training to vocab 1024 and encoding it all, then the fast trainer against the slow one on
    its first characters."""
    import bpe
    text = open(path, encoding="utf-8").read()
    start = time.perf_counter()
    tokenizer = bpe.train(text, 1024)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    ids = tokenizer.encode_ordinary(text)
    encode_s = time.perf_counter() - start
    head = text[: 5000 if quick else 30000]
    start = time.perf_counter()
    fast = bpe.train(head, 512)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    slow = bpe.train_slow(head, 512)
    slow_s = time.perf_counter() - start
    return dict(bytes=len(text.encode("utf-8")), merges=len(tokenizer.merges), train_s=train_s, encode_s=encode_s,
                bytes_per_token=len(text.encode("utf-8")) / len(ids), head_chars=len(head), fast_s=fast_s,
                slow_s=slow_s, same_merges=fast.merges == slow.merges)


def worker(kind, spec):
    """One measurement, in this process (started by run_worker): its result, a dict that json can write."""
    sys.path.insert(0, ROOT)  # the model scripts import from here, whatever the working folder
    if kind == "matmul":
        return matmul_throughput(spec["framework"], spec["size"])
    if kind == "script":
        return measure(spec["script"], spec["options"], spec["seconds"], spec["contexts"], spec["scan_repeats"])
    return bpe_speed(spec["path"], spec["quick"])


# -----------------------------------------------------------------------------
# Running the workers, and nanoGPT

def run_worker(kind, spec, label):
    """Run one measurement in a fresh process; its result, or None (and a line saying why) if it failed."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        command = [sys.executable, os.path.abspath(__file__), f"--worker={kind}", "--spec", json.dumps(spec),
                   f"--result={path}"]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode or not os.path.exists(path):
            why = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
            print(f"  {label}: failed ({why[:200]})", flush=True)
            return None
        with open(path) as f:
            return json.load(f)


def median_log_ms(text, pattern):
    """The median of the per-step milliseconds a training log prints, its first line (compilation, warm-up) left out."""
    values = [float(v) for v in re.findall(pattern, text)[1:]]
    return statistics.median(values) if values else None


NANOGPT = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=12", "--max_iters=2000",
           "--lr_decay_iters=2000", "--dropout=0.0", "--eval_iters=20", "--log_interval=10", "--compile=False",
           "--device=cpu"]  # nanoGPT's README, "I only have a macbook"; eval and log intervals aside
OURS = ["--num_layers=4", "--num_heads=4", "--model_dim=128", "--seq_len=64", "--batch_size=12", "--steps=2000",
        "--learning_rate=1e-3", "--min_learning_rate=1e-4", "--warmup_steps=100", "--dropout=0", "--weight_decay=0.1",
        "--beta2=0.99", "--eval_interval=250", "--eval_steps=20", "--log_interval=10", "--sample_tokens=0"]


def nanogpt_side_by_side(folder, steps):
    """nanoGPT's train.py on Tiny Shakespeare characters at its CPU setting, then gpt_torch.py and gpt_jax.py at the
    same setting on the same text, each as its user runs it: (name, ms/step, tokens/s, final val loss) rows."""
    rows = []
    text = os.path.join(folder, "data", "shakespeare_char", "input.txt")
    with tempfile.TemporaryDirectory() as out:
        options = [o.replace("2000", str(steps)) for o in NANOGPT]
        command = [sys.executable, "train.py", "config/train_shakespeare_char.py", *options, f"--out_dir={out}/nanogpt"]
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        losses = re.findall(r"val loss ([0-9.]+)", result.stdout)
        rows.append(("nanoGPT train.py", median_log_ms(result.stdout, r"time ([0-9.]+)ms"),
                     float(losses[-1]) if losses else None))
        if result.returncode:
            print(f"  nanoGPT failed: {(result.stderr.strip().splitlines() or ['no output'])[-1][:200]}")
        for script in ("gpt_torch.py", "gpt_jax.py"):
            options = [o.replace("2000", str(steps)) for o in OURS]
            command = [sys.executable, script, f"--data={text}", *options, f"--out_dir={out}/{script}"]
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            losses = re.findall(r"\| val ([0-9.]+)", result.stdout)
            rows.append((script, median_log_ms(result.stdout, r"\| ([0-9.]+) ms/step"),
                         float(losses[-1]) if losses else None))
    return [(name, ms, 12 * 64 / ms * 1000 if ms else None, loss) for name, ms, loss in rows]


# -----------------------------------------------------------------------------
# Report: Markdown tables, the targets, the picture

def cpu_name():
    """The CPU's model name and, on Linux, its widest vector instructions (they set matmul speed)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        name = re.search(r"^model name\s*:\s*(.*)$", text, re.M).group(1).strip()
        flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split())
        extras = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))
                  if flag in flags] or (["AVX2"] if "avx2" in flags else [])
        return name + (f" ({', '.join(extras)})" if extras else "")
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def versions():
    found = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join([f"Python {platform.python_version()}"] + found)


def number(value, digits=1, suffix=""):
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def verdict(ok, measured, target):
    if ok is None:
        return f"| {target} | {measured} | not measured |"
    return f"| {target} | {measured} | {'met' if ok else 'missed'} |"


def report(args, peak, matmul, runs, sampling, scans, bpe_results, nanogpt):
    """The Markdown text of bench.md."""
    lines = (["**--quick: tiny models and budgets, to see that everything runs; these are not measurements.**", ""]
             if args.quick else [])
    lines += [f"Measured by `python bench.py{' ' + ' '.join(args.argv) if args.argv else ''}` on "
             f"{datetime.date.today().isoformat()}: {cpu_name()}, {os.cpu_count()} cores; {versions()}.", ""]
    if matmul:
        lines += [f"Matmul throughput, float32, {args.matmul_size} x {args.matmul_size} (median of 10): "
                  + ", ".join(f"{fw} {number(flops / 1e9)} GFLOP/s" for fw, flops in matmul.items())
                  + f". Model FLOPs utilisation (MFU) below is against the faster, {number(peak / 1e9)} GFLOP/s.", ""]

    def speed(script):
        run = runs.get(script)
        return run["tokens_per_step"] / run["ms_per_step"] * 1000 if run else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    if runs:  # the training table, the chart, and the ratios between its rows
        # training
        lines += [f"**Training for {args.seconds:g} s** on the story corpus, each script in its own process from "
                  "its `python` start (imports, building and compiling count; evaluations do not), the learning-rate "
                  "schedule fitted to the steps that fit. Tokens/s and ms/step: medians over blocks of 10 steps after "
                  "the first block; start-up is imports, data and model, first step is mostly jax's compilation. MFU: "
                  "the matmul FLOPs of a training step (forward and backward, counted on the torch twin by "
                  "`torch.utils.flop_counter`) per second. Sampling: `generate()` from the trained model, 200 "
                  "tokens.", ""]
        lines += ["| script | parameters | tokens/s | ms/step | start-up + first step | MFU | peak RSS | steps | "
                  "val bpb | above the floor | sampling tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for script, run in runs.items():
            if run is None:
                lines.append(f"| {script} | failed | | | | | | | | | |")
                continue
            flops = run["flops_per_step"] or (runs.get(script.replace("_jax", "_torch")) or {}).get("flops_per_step")
            mfu = flops / (run["ms_per_step"] / 1000) / peak if flops and peak else None
            parameters = f"{run['parameters']:,}"
            if run["active"] != run["parameters"]:
                parameters += f" ({run['active']:,} active)"
            floor, tokens_per_s = run["floor"], run["tokens_per_step"] / run["ms_per_step"] * 1000
            lines.append(f"| {script} | {parameters} | {number(tokens_per_s, 0)} | {number(run['ms_per_step'])} | "
                         f"{number(run['startup_s'])} + {number(run['first_step_s'])} s | "
                         f"{number(100 * mfu if mfu else None, 1, '%')} | {number(run['peak_mib'], 0)} MiB | "
                         f"{run['steps']:,} in {run['train_seconds']:.0f} s | "
                         f"{'diverged' if run['diverged'] else number(run['val_bpb'], 3)} | "
                         f"{number(run['val_bpb'] - floor if floor else None, 3)} (floor {number(floor, 3)}) | "
                         f"{number(run['sampling_tokens_per_s'], 0)} |")
            run["mfu"] = mfu
        lines += ["", "![val bits per byte against seconds, one curve per script, the floor as a line](bench.png)", ""]
        # ratios
        lines += ["**Ratios** (tokens/s, from the table above):", "", "| comparison | torch | jax |", "|---|---|---|"]
        lines.append("| jax / torch, same family | | " + ", ".join(
            f"{family} {number(ratio(speed(family + '_jax'), speed(family + '_torch')), 2, 'x')}" for family in FAMILIES
            if family + "_jax" in runs) + " |")
        for name, a, b in (("moe step time / dense llama step time (equal active parameters)", "moe", "llama"),
                           ("mamba tokens/s / llama tokens/s (matched parameters)", "mamba", "llama")):
            values = []
            for framework in FRAMEWORKS:
                if a == "moe":
                    values.append(ratio(speed(f"llama_{framework}"), speed(f"moe_{framework}")))
                else:
                    values.append(ratio(speed(f"mamba_{framework}"), speed(f"llama_{framework}")))
            lines.append(f"| {name} | " + " | ".join(number(v, 2, "x") for v in values) + " |")
        if scans:
            cells = [f"{number(ratio(s['sequential'], s['parallel']), 1, 'x')} ({number(s['parallel'], 0)} against "
                     f"{number(s['sequential'], 0)} ms)" if s else "n/a" for s in (scans.get(fw) for fw in FRAMEWORKS)]
            lines.append("| mamba parallel scan speed-up over the sequential scan (training step, seq_len 256, one "
                         "layer) | " + " | ".join(cells) + " |")
        lines.append("")
    # sampling at long contexts
    if sampling:
        contexts = args.contexts
        lines += ["**Sampling at long contexts**, ms per token: one step with the KV cache (llama, moe) or the "
                  "recurrent state (mamba), against recomputing the whole context (median of 8; untrained models "
                  "long enough for the longest context).", "",
                  "| script | " + " | ".join(f"{c}: cache / recompute" for c in contexts) +
                  f" | speed-up at {contexts[-1]} | cache cost {contexts[-1]} / {contexts[0]} |",
                  "|---|" + "---|" * (len(contexts) + 2)]
        for script, result in sampling.items():
            if result is None:
                continue
            costs = {int(c): v for c, v in result.items()}
            cells = [f"{number(costs[c][0], 2) if costs[c][0] is not None else '-'} / {number(costs[c][1], 2)}"
                     for c in contexts]
            cached_last, recompute_last = costs[contexts[-1]]
            lines.append(f"| {script} | " + " | ".join(cells) +
                         f" | {number(ratio(recompute_last, cached_last), 1, 'x')} | "
                         f"{number(ratio(cached_last, costs[contexts[0]][0]), 2, 'x')} |")
        lines.append("")
    if bpe_results:
        lines += ["**bpe.py**, training to vocab 1024 (or until no pair of tokens occurs twice) and encoding the whole "
                  "text; the fast trainer against the slow one on its first characters, to vocab 512:", "",
                  "| text | merges | training | encoding | bytes/token | fast / slow trainer |",
                  "|---|---|---|---|---|---|"]
        for name, b in bpe_results.items():
            lines.append(f"| {name} ({b['bytes'] / 1e6:.2f} MB) | {b['merges']} | {b['train_s']:.2f} s | "
                         f"{b['bytes'] / 1e6 / b['encode_s']:.1f} MB/s | {b['bytes_per_token']:.2f} | "
                         f"{b['fast_s']:.2f} s / {b['slow_s']:.1f} s on {b['head_chars']:,} characters: "
                         f"{b['slow_s'] / b['fast_s']:.0f}x{'' if b['same_merges'] else ' (merges differ!)'} |")
        lines.append("")
    if nanogpt:
        lines += ["**nanoGPT's CPU setting** (4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 steps, Tiny "
                  "Shakespeare characters; its README's command), each as its user runs it, one after the other:", "",
                  "| run | ms/step | tokens/s | val loss |", "|---|---|---|---|"]
        for name, ms, tokens, loss in nanogpt:
            lines.append(f"| {name} | {number(ms)} | {number(tokens, 0)} | {number(loss, 3)} |")
        lines.append("")
    lines += ["**Targets:**", "", "| target | measured | |", "|---|---|---|"]
    lines += targets(args, runs, sampling, scans, bpe_results, nanogpt, speed, ratio)
    return "\n".join(lines) + "\n"


def targets(args, runs, sampling, scans, bpe_results, nanogpt, speed, ratio):
    rows = []
    if nanogpt is not None and not (nanogpt[0][1] and nanogpt[1][1]):
        rows.append(verdict(None, "nanoGPT or gpt_torch.py failed (see the output)",
                            "gpt_torch.py at least nanoGPT's tokens/s, val loss at most 1.90"))
    elif nanogpt:
        ours, theirs = nanogpt[1], nanogpt[0]
        rows.append(verdict(ours[2] >= theirs[2] and (ours[3] or 9) <= 1.90,
                            f"{number(ours[2] / theirs[2], 2, 'x')} nanoGPT's tokens/s, val loss {number(ours[3], 3)}",
                            "gpt_torch.py at least nanoGPT's tokens/s at its setting, val loss at most 1.90"))
    elif "gpt_torch" in runs:
        rows.append(verdict(None, "pass --nanogpt=DIR",
                            "gpt_torch.py at least nanoGPT's tokens/s, val loss at most 1.90"))
    for script, run in runs.items():
        if script.endswith("_torch") and run and run.get("mfu"):
            rows.append(verdict(run["mfu"] >= 0.4, f"{100 * run['mfu']:.0f}%", f"{script} MFU at least 40%"))
    for family in FAMILIES:
        value = ratio(speed(family + "_jax"), speed(family + "_torch"))
        if value is not None:
            rows.append(verdict(value >= 0.9, f"{value:.2f}x", f"{family}_jax at least 0.9x {family}_torch's tokens/s"))
    for script, result in (sampling or {}).items():
        costs = result and {int(c): v for c, v in result.items()}
        if costs and costs[args.contexts[-1]][0] is not None:
            first, last = costs[args.contexts[0]], costs[args.contexts[-1]]
            rows.append(verdict(last[1] / last[0] >= 5 and last[0] / first[0] <= 1.5,
                                f"{last[1] / last[0]:.1f}x; {last[0] / first[0]:.2f}x",
                                f"{script}: cache at least 5x faster than recomputation at {args.contexts[-1]} tokens; "
                                f"its cost flat within 1.5x from {args.contexts[0]}"))
    for framework in FRAMEWORKS:
        value = ratio(speed(f"llama_{framework}"), speed(f"moe_{framework}"))
        if value is not None:
            rows.append(verdict(value <= 1.5, f"{value:.2f}x", f"moe_{framework} step at most 1.5x the dense llama's"))
        value = ratio(speed(f"mamba_{framework}"), speed(f"llama_{framework}"))
        if value is not None:
            rows.append(verdict(value >= 0.5, f"{value:.2f}x", f"mamba_{framework} at least 0.5x llama's tokens/s"))
        scan = (scans or {}).get(framework)
        if scan:
            value = scan["sequential"] / scan["parallel"]
            rows.append(verdict(value >= 3, f"{value:.1f}x", f"mamba_{framework} parallel scan at least 3x faster"))
    for name, b in (bpe_results or {}).items():
        rows.append(verdict(b["train_s"] <= 5 and b["bytes"] / b["encode_s"] >= 2e6,
                            f"{b['train_s']:.2f} s, {b['bytes'] / 1e6 / b['encode_s']:.1f} MB/s",
                            f"bpe.py on {name}: vocab 1024 in at most 5 s, encoding at least 2 MB/s"))
    trained = [run for run in runs.values() if run and not run["diverged"] and run["floor"]]
    if trained:
        best = min(trained, key=lambda run: run["val_bpb"])
        gap = best["val_bpb"] - best["floor"]
        rows.append(verdict(gap <= 0.15, f"{best['script']}: {best['val_bpb']:.3f} against {best['floor']:.3f} "
                            f"(+{gap:.3f})", f"in {args.seconds:g} s, the best script within 0.15 bpb of the floor"))
    return rows


def plot(runs, path, seconds):
    """val bpb against seconds, one curve per script, the corpus's floor as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    colors = {"gpt": "tab:blue", "llama": "tab:orange", "moe": "tab:green", "mamba": "tab:red"}
    floor = None
    for script, run in runs.items():
        if run["curve"]:
            times, _, bpbs = zip(*run["curve"])
            axes.plot(times, bpbs, marker=".", color=colors[run["family"]],
                      linestyle="-" if run["framework"] == "torch" else "--", label=script)
            floor = run["floor"] or floor
    if floor:
        axes.axhline(floor, color="black", linestyle=":", label=f"entropy floor {floor:.3f}")
    axes.set(xlabel="seconds since the script started (evaluations not counted)", ylabel="val bits per byte",
             title=f"How close each script gets to the floor in {seconds:g} s", yscale="log", xlim=(0, seconds * 1.05))
    ticks = [tick for tick in (0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1, 2, 4, 8) if floor is None or tick >= floor * 0.9]
    axes.set_yticks(ticks, [f"{tick:g}" for tick in ticks])  # plain numbers on the log scale
    axes.minorticks_off()
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# -----------------------------------------------------------------------------
# Command line

def fail(message):
    print(f"bench.py: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="training budget per script (default 120; "
                        "--quick: 5)")
    parser.add_argument("--quick", action="store_true", help="tiny models and budgets, short contexts: a check that "
                        "everything runs, not a measurement")
    parser.add_argument("--only", default="", help="comma-separated names: only the scripts (gpt, llama_jax, ...) and "
                        "bpe whose name contains one")
    parser.add_argument("--nanogpt", default="", help="a nanoGPT checkout whose data/shakespeare_char is prepared: "
                        "run its train.py beside gpt_torch.py and gpt_jax.py")
    parser.add_argument("--out_dir", default=ROOT, help="where bench.md and bench.png go (default: beside bench.py)")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.worker:
        return args
    args.seconds = args.seconds if args.seconds is not None else (5 if args.quick else 120)
    if not (math.isfinite(args.seconds) and 0 < args.seconds <= 86400):
        fail(f"--seconds={args.seconds:g}: give a number of seconds above 0 (at most a day)")
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    known = [f"{family}_{framework}" for family in FAMILIES for framework in FRAMEWORKS] + ["bpe"]
    for name in args.only:
        if not any(name in script for script in known):
            fail(f"--only={name}: matches none of {', '.join(known)}")
    if args.nanogpt:
        args.nanogpt = os.path.abspath(os.path.expanduser(args.nanogpt))
        needed = [os.path.join(args.nanogpt, *parts) for parts in
                  (("train.py",), ("config", "train_shakespeare_char.py"),
                   ("data", "shakespeare_char", "input.txt"), ("data", "shakespeare_char", "train.bin"))]
        missing = [path for path in needed if not os.path.isfile(path)]
        if missing:
            fail(f"--nanogpt={args.nanogpt}: no {missing[0]}; clone karpathy/nanoGPT there and run "
                 "python data/shakespeare_char/prepare.py in it")
    args.out_dir = os.path.abspath(os.path.expanduser(args.out_dir))
    for name in ("bench.md", "bench.png"):
        if os.path.isdir(os.path.join(args.out_dir, name)):
            fail(f"--out_dir={args.out_dir}: {name} there is a folder; pass another --out_dir")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as error:
        fail(f"--out_dir={args.out_dir}: cannot create it ({error.strerror}); pass a writable folder")
    if not os.access(args.out_dir, os.W_OK):
        fail(f"--out_dir={args.out_dir}: not writable; pass a writable folder")
    args.contexts = QUICK_CONTEXTS if args.quick else CONTEXTS
    args.matmul_size = 512 if args.quick else 2048
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:  # one measurement, in this process
        result = worker(args.worker, json.loads(args.spec))
        with open(args.result, "w") as f:
            json.dump(result, f)
        return
    def stop(signum, frame):  # Ctrl-C or SIGTERM: the running worker is killed (subprocess.run does it), then exit
        print(f"bench.py: stopped by {signal.Signals(signum).name}; bench.md and bench.png are written only at the "
              "end, so nothing was written", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    selected = lambda name: not args.only or any(part in name for part in args.only)
    scripts = [f"{family}_{framework}" for family in FAMILIES for framework in FRAMEWORKS
               if selected(f"{family}_{framework}") and os.path.exists(os.path.join(ROOT, f"{family}_{framework}.py"))]
    options = lambda family: (OPTIONS.get(family, []) + (QUICK if args.quick else []))
    print(f"bench: {', '.join(scripts + (['bpe'] if selected('bpe') else []))}; {args.seconds:g} s of training each",
          flush=True)
    matmul = {}
    for framework in (framework for framework in FRAMEWORKS if any(s.endswith(framework) for s in scripts)):
        result = run_worker("matmul", {"framework": framework, "size": args.matmul_size}, f"{framework} matmul")
        if result:
            matmul[framework] = result["flops"]
            print(f"  {framework} matmul: {result['flops'] / 1e9:.1f} GFLOP/s", flush=True)
    peak = max(matmul.values()) if matmul else None  # no yardstick: no MFU
    runs, sampling, scans = {}, {}, {}
    for script in scripts:
        family = script.split("_")[0]
        spec = {"script": script, "options": options(family), "seconds": args.seconds,
                "contexts": list(args.contexts), "scan_repeats": 1 if args.quick else 2}
        started = time.perf_counter()
        runs[script] = run = run_worker("script", spec, script)
        if run:
            sampling[script] = run["sampling"]
            if "scans" in run:
                scans[run["framework"]] = run["scans"]
            print(f"  {script}: {run['steps']} steps in {run['train_seconds']:.0f} s, {run['ms_per_step']:.1f} "
                  f"ms/step, val bpb {run['val_bpb']:.3f} ({time.perf_counter() - started:.0f} s in all)", flush=True)
    bpe_results = {}
    if selected("bpe"):
        texts = {"the story corpus": STORIES}
        if args.nanogpt:
            texts["Tiny Shakespeare"] = os.path.join(args.nanogpt, "data", "shakespeare_char", "input.txt")
        for name, path in texts.items():
            bpe_results[name] = run_worker("bpe", {"path": path, "quick": args.quick}, f"bpe on {name}")
        bpe_results = {name: b for name, b in bpe_results.items() if b}
    measured = time.perf_counter() - STARTED
    nanogpt = nanogpt_side_by_side(args.nanogpt, 100 if args.quick else 2000) if args.nanogpt else None
    text = report(args, peak, matmul, runs, sampling, scans, bpe_results, nanogpt)
    text += (f"\nThis run took {measured / 60:.1f} minutes"
             + (f", and nanoGPT's comparison {(time.perf_counter() - STARTED - measured) / 60:.1f} more.\n"
                if nanogpt else ".\n"))
    with open(os.path.join(args.out_dir, "bench.md"), "w") as f:
        f.write(text)
    trained = {script: run for script, run in runs.items() if run and run["curve"]}
    if trained:
        plot(trained, os.path.join(args.out_dir, "bench.png"), args.seconds)
    print(text)
    print(f"wrote {os.path.join(args.out_dir, 'bench.md')}" + (" and bench.png" if trained else ""))


if __name__ == "__main__":
    main()
