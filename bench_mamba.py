"""Benchmark (not a test): Mamba's costs against its own sequential scan and against the dense Llama, in each framework.

    python bench_mamba.py              # 10 alternating blocks of 5 steps per model
    python bench_mamba.py --blocks=20

Prints, for each framework, the median ms/step of
  - the parallel and the sequential scan at seq_len 256 (target: parallel at least 3x faster),
  - mamba at 6 layers (732,544 parameters) against the default Llama (803,968), seq_len 128, in tokens/s
    (target: mamba at least 0.5x Llama; and mamba jax at least 0.9x mamba torch),
and the recurrent sampling step's median time around the 100th and the 2000th generated token, with the process's
resident memory at both (target: flat within 1.5x, memory constant). Every model trains in this one process, on the
same batches, its blocks of steps alternating with the others' so that a machine's drift affects all alike.
"""

import os
import sys
import time

import jax
import numpy as np
import torch
from flax import nnx

import llama_jax
import llama_torch
import mamba_jax
import mamba_torch


ONE_DEVICE = jax.sharding.Mesh(jax.devices()[:1], ("data",))  # the jax steps' mesh: one device

def torch_step(module, model_class, **overrides):
    """A function running one training step of the model on a batch, in place."""
    config = module.Config(**overrides)
    torch.manual_seed(0)
    model = model_class(config)
    train_step, _ = module.make_steps(model, module.make_optimizer(model, config), config)
    return lambda x, y: train_step(x, y, 1e-3)


def jax_step(module, model_class, **overrides):
    """As torch_step, for a jax twin: its train step threads the parameters and optimizer state through."""
    config = module.Config(**overrides)
    model = model_class(config, nnx.Rngs(0))
    optimizer = module.make_optimizer(config)
    if module is llama_jax:  # Llama keeps its RoPE tables apart from the parameters
        graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
        params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
        train_step, _ = module.make_steps(graphdef, buffers, optimizer, ONE_DEVICE)
    else:
        graphdef, params = nnx.split(model)
        params = nnx.to_pure_dict(params)
        train_step, _ = module.make_steps(graphdef, optimizer, ONE_DEVICE)
    state = [params, optimizer.init(params)]

    def step(x, y):
        state[0], state[1], loss = train_step(state[0], state[1], x.astype(np.int32), y.astype(np.int32), 1e-3)
        return loss
    return step


def race(steps, seq_len, blocks, block_steps=5):
    """Median ms/step of each named step function: blocks of block_steps steps, the functions taking turns, on the
    same batches; the first block of each (compilation, warm-up) is left out."""
    tokens = np.fromfile("data/stories.txt", dtype=np.uint8)
    rng = np.random.default_rng(0)
    batches = [tokens[o[:, None] + np.arange(seq_len + 1)].astype(np.int64)
               for o in (rng.integers(0, len(tokens) - seq_len - 1, size=(block_steps, 8)))]
    times = {name: [] for name in steps}
    for block in range(blocks + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            for batch in batches:
                loss = step(batch[:, :-1], batch[:, 1:])
            float(loss)  # waits for jax's asynchronous steps
            if block > 0:
                times[name].append((time.perf_counter() - start) * 1000 / block_steps)
    return {name: float(np.median(values)) for name, values in times.items()}


def rss_mib():
    """This process's resident memory now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sampling(framework, model, tokens=2000):
    """Median time of a recurrent step around generated token 100 (90-110) and 2000 (1980-2000), in ms."""
    if framework == "torch":
        states = model(torch.tensor([[1, 2, 3, 4]]))[2]
        step = torch.inference_mode()(lambda token, states: model.step(token, states))
        token = torch.tensor([5])
    else:
        graphdef, state = nnx.split(model)
        jitted = jax.jit(lambda state, token, states: nnx.merge(graphdef, state).step(token, states))
        step = lambda token, states: jitted(state, token, states)
        states = model(np.array([[1, 2, 3, 4]], np.int32))[2]
        token = np.array([5], np.int32)
    times, memory = [], {}
    for i in range(tokens):
        start = time.perf_counter()
        logits, states = step(token, states)
        jax.block_until_ready(logits) if framework == "jax" else None
        times.append(time.perf_counter() - start)
        if i + 1 in (100, tokens):
            memory[i + 1] = rss_mib()
    return float(np.median(times[90:110])) * 1000, float(np.median(times[-20:])) * 1000, memory


def main():
    blocks = int(sys.argv[1].split("=")[1]) if len(sys.argv) > 1 else 10
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, jax {jax.__version__}, {blocks} blocks of 5 steps, medians")
    scans = race({"torch parallel": torch_step(mamba_torch, mamba_torch.Mamba, seq_len=256),
                  "torch sequential": torch_step(mamba_torch, mamba_torch.Mamba, seq_len=256, scan="sequential"),
                  "jax parallel": jax_step(mamba_jax, mamba_jax.Mamba, seq_len=256),
                  "jax sequential": jax_step(mamba_jax, mamba_jax.Mamba, seq_len=256, scan="sequential")},
                 256, max(2, blocks // 3))
    for framework in ("torch", "jax"):
        parallel, sequential = scans[f"{framework} parallel"], scans[f"{framework} sequential"]
        print(f"seq_len 256, {framework}: parallel {parallel:.1f} ms/step, sequential {sequential:.1f}: "
              f"parallel {sequential / parallel:.2f}x faster (target 3x)")
    steps = race({"torch llama": torch_step(llama_torch, llama_torch.Llama),
                  "torch mamba": torch_step(mamba_torch, mamba_torch.Mamba, num_layers=6),
                  "jax llama": jax_step(llama_jax, llama_jax.Llama),
                  "jax mamba": jax_step(mamba_jax, mamba_jax.Mamba, num_layers=6)}, 128, blocks)
    for framework in ("torch", "jax"):
        llama, mamba = steps[f"{framework} llama"], steps[f"{framework} mamba"]
        print(f"seq_len 128, {framework}: llama {llama:.1f} ms/step, mamba (6 layers) {mamba:.1f}: mamba at "
              f"{llama / mamba:.2f}x llama's tokens/s (target 0.5x)")
    print(f"mamba jax at {steps['torch mamba'] / steps['jax mamba']:.2f}x mamba torch's tokens/s (target 0.9x); "
          f"llama jax at {steps['torch llama'] / steps['jax llama']:.2f}x llama torch's")
    torch.manual_seed(0)
    for framework, model in (("torch", mamba_torch.Mamba(mamba_torch.Config()).eval()),
                             ("jax", mamba_jax.Mamba(mamba_jax.Config(), nnx.Rngs(0)))):
        early, late, memory = sampling(framework, model)
        print(f"recurrent sampling, {framework}: {early:.2f} ms per token near token 100, {late:.2f} near token "
              f"2000 ({late / early:.2f}x); resident memory {memory[100]:.1f} MiB at token 100, "
              f"{memory[2000]:.1f} at 2000")


if __name__ == "__main__":
    main()
