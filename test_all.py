"""The project's smoke and correctness tests.

    python test_all.py          # every test: one line each, then "N passed, N failed"
    python test_all.py llama    # only the tests whose name contains "llama"
    python -m pytest test_all.py

Plain functions named test_*, plain asserts, no framework needed. Every test compares against
something independent of the code under test: a formula, a hand-worked example, a slow reference
path, or the other framework. Everything is small: the whole suite runs in under two minutes on
two CPU cores.
"""

import atexit
import contextlib
import dataclasses
import hashlib
import io
import json
import lzma
import math
import os
import random
import re
import runpy
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

# jax's persistent compilation cache, shared by this process and the scripts it starts: a computation compiled once
# (the same tiny model recurs in many tests) is loaded, not compiled again. A fresh, empty one for every run.
# The runner's two workers (see main) use the runner's.
JAX_CACHE = os.environ.get("TEST_ALL_JAX_CACHE") or tempfile.mkdtemp(prefix="jax_cache_")
if "TEST_ALL_JAX_CACHE" not in os.environ:
    atexit.register(shutil.rmtree, JAX_CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=JAX_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
# The tests' models are tiny and run few steps: XLA's optimizing backend costs more than it saves (a tiny mamba_jax
# run: 16 s of CPU cold, 10 s without it; the same losses), and so do its MLIR fusion emitters, slower to compile
# than the older ones (the skeleton's tiny moe_jax run: 6.2 s cold, 3.6 s without them). Here and in the scripts the
# tests start. Added once: the runner's worker inherits them, and XLA_FLAGS is part of the compilation cache's key
# (the same flags twice would make another key, and the two workers would not share what they compile).
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                " --xla_cpu_use_fusion_emitters=false")
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))

import bpe  # noqa: E402
import gpt_jax  # noqa: E402
import gpt_torch  # noqa: E402
import llama_jax  # noqa: E402
import llama_torch  # noqa: E402
import make_stories  # noqa: E402  (data/make_stories.py)
import mamba_jax  # noqa: E402
import mamba_torch  # noqa: E402
import moe_jax  # noqa: E402
import moe_torch  # noqa: E402

STORIES = os.path.join(ROOT, "data", "stories.txt")
STORIES_HEAD = open(STORIES, "rb").read(20000)  # a little real text, for tests that train in this process
FLOOR = os.path.join(ROOT, "data", "stories.txt.floor.json")
ONE_DEVICE = jax.sharding.Mesh(jax.devices()[:1], ("data",))  # the jax scripts' mesh on one device


def on_mesh(*trees):
    """The arrays replicated on ONE_DEVICE's mesh, where the jax scripts' main puts the weights and optimizer state
    before training: the train step then compiles once (its outputs' type carries the mesh, and a first call with
    arrays of another type would compile it twice)."""
    return jax.device_put(trees, jax.sharding.NamedSharding(ONE_DEVICE, jax.sharding.PartitionSpec()))


def run_script(*args, timeout=120):
    """Run a project script as a user would (from the repo root); returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result, *words):
    """A user's mistake: exit status 2, exactly one line on stderr, naming the problem."""
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


# Folders in which nobody, not even root, can create a file: tests run as root, where a chmod does not stop writes.
UNWRITABLE = ["/proc", "/sys"] if sys.platform == "linux" else []


def run_in(folder, script, *args):
    """Run a project tool (bpe.py, data/make_stories.py) as a user would, from `folder`."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=folder, capture_output=True,
                          text=True, timeout=60)


def snapshot(folder):
    """Every entry under folder: a file's (bytes, mtime), None for a folder. Equal snapshots: nothing changed."""
    entries = {}
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(parent, name)
            entries[os.path.relpath(path, folder)] = (None if name in folders else
                                                      (open(path, "rb").read(), os.stat(path).st_mtime_ns))
    return entries


def write(folder, name, data):
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def write_tiny_corpus(directory, name="tiny.txt"):
    """A small, very repetitive English text: a model learns it within a few dozen steps."""
    lines = ["The cat sat on the mat and the dog ran in the park.", "A little bird sang a song in the tall tree.",
             "Tom and Lily played with a red ball all day."]
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("\n".join(lines[i % 3] for i in range(120)) + "\n")
    return path


def copy_torch_to_jax(torch_model, jax_model):
    """Copy every torch parameter into the jax attribute with the same dotted name (list entries by index):
    Linear weight -> kernel (transposed: torch is (out, in), flax (in, out)), Embedding weight -> embedding,
    LayerNorm weight -> scale, bias -> bias."""
    copied = 0
    for name, tensor in torch_model.named_parameters():  # the tied head is token_embedding, listed once
        *path, leaf = name.split(".")
        torch_module, jax_module = torch_model.get_submodule(".".join(path)), jax_model
        for part in path:
            jax_module = jax_module[int(part)] if part.isdigit() else getattr(jax_module, part)
        value = tensor.detach().numpy()
        if isinstance(torch_module, torch.nn.Linear) and leaf == "weight":
            leaf, value = "kernel", value.T
        elif isinstance(torch_module, torch.nn.Embedding):
            leaf = "embedding"
        elif isinstance(torch_module, torch.nn.LayerNorm) and leaf == "weight":
            leaf = "scale"
        variable = getattr(jax_module, leaf)
        assert variable[...].shape == value.shape, name
        variable[...] = jnp.asarray(value)
        copied += 1
    assert copied == len(jax.tree.leaves(nnx.state(jax_model, nnx.Param))), "a jax parameter has no torch twin"


def run_scripts(*commands, envs=None):
    """Run the given [script, args...] commands as a user would, side by side (they mostly wait on imports);
    returns their CompletedProcess results. One torch thread each: two processes share the two cores. envs: more
    environment variables for each."""
    processes = [subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=dict(os.environ, OMP_NUM_THREADS="1", **(envs[i] if envs else {})))
                 for i, command in enumerate(commands)]
    results = []
    for command, process in zip(commands, processes):
        stdout, stderr = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


@nnx.jit
def jax_forward(model, tokens, targets):
    """The jax model's logits and loss, compiled: one compile per shape instead of one per operation."""
    return model(tokens, targets)


def run_main(module, args):
    """Run a script's main() in this process; returns its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main(args)
    return out.getvalue()


def exit_of(module, args):
    """Run module.main(args) in this process, expecting it to exit; returns the exit status and the stderr lines.
    A traceback fails the test that called it."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            module.main(args)
        except SystemExit as exit:
            return exit.code, err.getvalue().splitlines()
    raise AssertionError(f"{module.__name__} {args} did not exit")


def mistakes_every_script_refuses(tmp):
    """(arguments, a word the one-line message must contain) that every model script refuses the same way.
    tmp/taken holds (empty) checkpoints of both frameworks: a fresh run must not overwrite them."""
    os.makedirs(f"{tmp}/taken")
    for name in ("ckpt.pt", "ckpt.npz"):
        open(f"{tmp}/taken/{name}", "wb").close()
    np.save(f"{tmp}/prompt.x.npy", np.array([1, 2, 3]))  # a prompt tokenized with a 300-token vocabulary
    with open(f"{tmp}/prompt.x.json", "w") as f:
        json.dump({"token_bytes": [bytes([i % 256, i // 256]).hex() for i in range(300)]}, f)
    return [
        (["--bogus=1"], "--bogus"),
        (["--warmup_steps=50", "--steps=10"], "warmup_steps"),
        (["--data=/no/such/file.txt"], "/no/such/file.txt"),
        (["--seq_len=1000"], "seq_len"),  # the corpus is too short for this context
        (["--resume=true", f"--out_dir={tmp}/empty"], "resume"),
        ([f"--out_dir={tmp}/taken"], "--resume=true"),  # never overwrite a checkpoint
        (["--learning_rate=nan"], "finite"),
        (["--temperature=inf"], "finite"),
        (["--temperature=1e-9"], "temperature"),  # logits / temperature would overflow
        (["--seed=-1"], "seed"),
        (["--num_heads=0"], "num_heads"),
        (["--batch_size=1000000000"], "memory"),
        ([f"--out_dir={tmp}/taken/ckpt.pt/sub"], "cannot write"),  # a file in the way
        (["--out_dir=/proc/no_such_dir"], "cannot write"),
        (["--learning_rate=1e308"], "float32"),  # finite, but not in float32
        (["--batch_size=1" + "0" * 400], "too large"),
        (["--data=/no/such\nfile.txt"], "such\\nfile"),  # a line break in a path: still one line
        (["--steps=0"], "--init_from"),  # only sampling needs a model to sample from
        (["--prompt=/no/such/prompt.txt"], "/no/such/prompt.txt"),
        ([f"--prompt={tmp}/prompt.x.npy"], "not in the vocabulary"),  # the data are bytes
        (["--device=tpu"], "--device=tpu is unknown"),
        (["--dtype=float16"], "--dtype=float16 is unknown"),
    ] + ([(["--device=cuda"], "--device=cuda")] if not torch.cuda.is_available() else [])  # a device not here


def assert_cli_refuses(modules, family_cases, user_runs):
    """The mistakes every script refuses plus family_cases, (arguments, word): each stops main() before any work,
    with exit status 2 and one line on stderr that contains the word. In-process, so it is cheap, and a traceback
    fails the test; nothing is written. user_runs, (script, arguments): a few of them as a user runs them, in a
    subprocess: exit status 2, one line, no traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        data, out_dir = write_tiny_corpus(tmp), f"{tmp}/out"
        cases = mistakes_every_script_refuses(tmp) + family_cases
        for module in modules:
            for args, word in cases:  # a short run first: should a refusal be missing, the test fails in seconds
                short = ["--steps=1", "--warmup_steps=0", "--eval_steps=1", "--sample_tokens=0"]
                status, lines = exit_of(module, [f"--data={data}", f"--out_dir={out_dir}", *short, *args])
                assert status == 2 and len(lines) == 1 and word in lines[0], (module.__name__, args, status, lines)
        assert not os.path.exists(out_dir)
        commands = [[script, f"--data={data}", f"--out_dir={out_dir}", *args] for script, args in user_runs]
        for (script, args), result in zip(user_runs, run_scripts(*commands)):
            assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, (script, args, result.stderr)
            assert result.stdout == "" and "Traceback" not in result.stderr


def assert_smoke_runs(scripts, *args, eval_suffix="", sample_line="sample:"):
    """The twins as a user runs them, side by side (tiny model, 40 steps): the logged loss falls from about ln 256 =
    5.5 to below 3.5, an eval line (ending with eval_suffix, a regex, after the bits per byte), a checkpoint, then
    sampling starts (the line sample_line, a regex). While it samples, out_dir is locked against a second run; then
    Ctrl-C ends the script at once: exit status 130, one line on stderr, no traceback, the checkpoint as it was.
    Returns the runs' CompletedProcess results, their stdout up to the sampling line."""
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"--data={write_tiny_corpus(tmp)}", "--seq_len=32", "--model_dim=64", "--batch_size=8", "--steps=40",
                  "--warmup_steps=5", "--learning_rate=3e-3", "--log_interval=5", "--eval_interval=40",
                  "--eval_steps=2", *args, "--sample_tokens=1000000"]  # sampling lasts until Ctrl-C
        processes = [subprocess.Popen([sys.executable, script, *common, f"--out_dir={tmp}/{script}"], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")) for script in scripts]
        watchdog = threading.Timer(120, lambda: [process.kill() for process in processes])  # a hung run fails
        watchdog.start()
        results = []
        try:
            for script, process in zip(scripts, processes):
                lines = []
                for line in process.stdout:  # up to the line that says sampling starts
                    lines.append(line)
                    if line.startswith("sample"):
                        break
                else:
                    raise AssertionError((script, "".join(lines)[-500:], process.stderr.read()[-1000:]))
                assert re.match(f"{sample_line}$", lines[-1]), (script, lines[-1])
                folder = f"{tmp}/{script}"
                module = sys.modules[script[: -len(".py")]]
                assert_refused(module, [*common[:-1], f"--out_dir={folder}", "--steps=80", "--resume=true"],
                               "in use by another run", folder)
                before = snapshot(folder)
                process.send_signal(signal.SIGINT)
                _, stderr = process.communicate(timeout=60)
                assert process.returncode == 130 and len(stderr.splitlines()) == 1, (script, process.returncode, stderr)
                assert "stopped by SIGINT while sampling" in stderr, stderr
                assert snapshot(folder) == before and os.path.exists(f"{folder}/{module.CHECKPOINT}")
                stdout = "".join(lines)
                losses = parse_losses(stdout)
                assert len(losses) == 8 and losses[-1] < losses[0] - 2.0, (script, losses)
                evals = r"^eval step +40 \| train [0-9.]+ \| val [0-9.]+ \| val bpb [0-9.]+" + eval_suffix + "$"
                assert re.search(evals, stdout, re.M), stdout[-500:]
                results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
        finally:  # a failed check leaves no script sampling on
            watchdog.cancel()
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
        return results


def parse_losses(stdout):
    return [float(v) for v in re.findall(r"^step +\d+/\d+ \| loss ([0-9.]+)", stdout, re.M)]


def assert_same_checkpoints(first, second):
    """Two checkpoint files (either framework's) hold the same arrays, bit for bit; returns the first's arrays."""
    if first.endswith(".pt"):
        a, b = (torch.load(path, weights_only=True) for path in (first, second))
        assert all(torch.equal(a[name], b[name]) for name in a if name != "meta")
        return {name: value.numpy() for name, value in a.items() if isinstance(value, torch.Tensor)}
    a, b = (np.load(path) for path in (first, second))
    assert all(np.array_equal(a[name], b[name]) for name in a.files if name != "meta")
    return {name: a[name] for name in a.files}


def assert_resume_equals_uninterrupted(module, args, folder):
    """Train 12 steps into folder/whole; 6 into folder/part, then resume those to 12: the log lines' losses of steps
    7..12 and every saved array equal the uninterrupted run's (args keep the learning rate constant, so the schedule
    does not depend on --steps). Returns the arguments that resume folder/part."""
    whole = run_main(module, args + [f"--out_dir={folder}/whole", "--steps=12"])
    run_main(module, args + [f"--out_dir={folder}/part", "--steps=6"])
    resumed = run_main(module, args + [f"--out_dir={folder}/part", "--steps=12", "--resume=true"])
    assert "resuming from step 6" in resumed
    tail = lambda out: [line.split(" | ")[:2] for line in out.splitlines() if re.match(r"step +([7-9]|1\d)/", line)]
    assert len(tail(whole)) == 6 and tail(whole) == tail(resumed), module.__name__
    assert_same_checkpoints(*(f"{folder}/{run}/{module.CHECKPOINT}" for run in ("whole", "part")))
    return args + [f"--out_dir={folder}/part", "--resume=true"]


# -----------------------------------------------------------------------------
# The corpus: data/make_stories.py, data/stories.txt, data/stories.txt.floor.json


class _NeedChoice(Exception):
    def __init__(self, num_options):
        self.num_options = num_options


class _Replay(make_stories.Teller):
    """A teller that makes the given choices, then stops at the first choice it was not given."""

    def __init__(self, choices):
        super().__init__(rng=None)
        self.choices, self.made = choices, 0

    def choose(self, weights):
        if self.made == len(self.choices):
            raise _NeedChoice(len(weights))
        self.made += 1
        return self.choices[self.made - 1]


def _parse_story(target):
    """Every sequence of choices with which tell_story writes exactly `target` (exhaustive search,
    pruned as soon as the text written so far stops being a prefix of the target)."""
    found, stack = [], [[]]
    while stack:
        choices = stack.pop()
        teller = _Replay(choices)
        try:
            make_stories.tell_story(teller)
            num_options = 0
        except _NeedChoice as need:
            num_options = need.num_options
        text = teller.text()
        if not target.startswith(text):
            continue
        if num_options == 0:
            if text == target:
                found.append(choices)
            continue
        stack.extend(choices + [index] for index in range(num_options))
    return found


def test_corpus_text_determines_the_choices():
    # The floor is exact only if no two choice sequences write the same story: parse a sample
    # back by exhaustive search and check that exactly one sequence writes each story.
    text = open(STORIES, encoding="utf-8").read()
    stories = [story + "The end.\n\n" for story in text.split("The end.\n\n")[:-1]]
    for story in stories[:30] + stories[-10:]:
        parses = _parse_story(story)
        assert len(parses) == 1, (len(parses), story[:200])


def test_corpus_regenerates_byte_for_byte():
    floor = json.load(open(FLOOR))
    text, info = make_stories.generate(floor["seed"], 1_000_000)
    data = open(STORIES, "rb").read()
    assert text.encode("utf-8") == data
    assert hashlib.sha256(data).hexdigest() == floor["sha256"]
    assert make_stories.floor_report(text, info, floor["seed"]) == floor


def test_corpus_bits_of_a_hand_worked_story():
    # A teller's bits: a uniform pick among 4 is 2 bits; weights [3, 1] give -log2(3/4) or 2 bits.
    teller = make_stories.Teller(__import__("random").Random(0))
    teller.pick(["a", "b", "c", "d"])
    second = teller.pick(["x", "y"], [3, 1])
    teller.pick(["only"])  # a pick with one option carries no information
    expected = [2.0, -math.log2(3 / 4) if second == "x" else 2.0]
    assert [bits for _, bits in teller.info] == expected


def test_corpus_floor_is_sane():
    # The floor is a lower bound on what any compressor achieves: xz at its best must stay above
    # it, and it must be positive; the two splits cover the file as the model scripts split it.
    data = open(STORIES, "rb").read()
    floor = json.load(open(FLOOR))
    xz_bpb = 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)
    assert 0.05 < floor["train_bpb"] < xz_bpb and 0.05 < floor["val_bpb"] < xz_bpb
    split = int(0.9 * len(data))
    mixed = (floor["train_bpb"] * split + floor["val_bpb"] * (len(data) - split)) / len(data)
    assert abs(mixed - floor["bpb"]) < 1e-5
    assert floor["num_bytes"] == len(data) and 900_000 <= len(data) <= 1_100_000


def test_corpus_long_range_recall():
    # The object found near the start of each story comes back at its end, 100+ bytes later.
    text = open(STORIES, encoding="utf-8").read()
    distances = []
    for story in text.split("\n\n")[:200]:
        found = story.index(" found ") + len(" found ")
        color_thing = " ".join(story[found:].split()[1:3])  # after "a" / "an"
        recalled = story.rindex("put the " + color_thing)
        distances.append(recalled - found)
    assert min(distances) >= 100, min(distances)


def test_corpus_generator_refuses_bad_input():
    assert_one_line_error(run_script("data/make_stories.py", "--num_bytes=-5"), "--num_bytes")
    assert_one_line_error(run_script("data/make_stories.py", "--seed=abc"), "--seed")
    assert_one_line_error(run_script("data/make_stories.py", "--out=/no/such/folder/x.txt"), "--out")
    assert_one_line_error(run_script("data/make_stories.py", "--colour=red"), "--colour")


def test_corpus_generator_writes_only_what_it_is_asked():
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp, "story.txt", b"old text")
        write(tmp, "story.txt.floor.json", b"old floor")
        write(tmp, "lone.txt.floor.json", b"a floor without its text")
        write(tmp, "file", b"a file where a folder should be")
        os.mkdir(os.path.join(tmp, "folder.txt"))
        write(tmp, "folder_floor.txt", b"a text whose floor is a folder")  # must survive a refused --overwrite
        os.mkdir(os.path.join(tmp, "folder_floor.txt.floor.json"))
        refusals = [  # (--out and options, words the one line must hold)
            (["--out=story.txt"], ["story.txt", "already exists", "--overwrite"]),
            (["--out=lone.txt"], ["lone.txt.floor.json", "already exists"]),  # only the floor exists
            (["--out=new.txt", "--overwrite=maybe"], ["--overwrite", "true/false"]),
            (["--out=folder.txt", "--overwrite=true"], ["folder.txt", "is a folder"]),  # even with --overwrite
            (["--out=folder_floor.txt", "--overwrite=true"], ["folder_floor.txt.floor.json", "is a folder"]),
            (["--out=gone/x.txt"], ["--out", "does not exist"]),
            (["--out=file/x.txt"], ["--out", "does not exist"]),
        ] + [([f"--out={folder}/x.txt"], ["cannot write", f"{folder}/x.txt"]) for folder in UNWRITABLE]
        before = snapshot(tmp)
        for args, words in refusals:
            result = run_in(tmp, "data/make_stories.py", *args, "--num_bytes=2000")
            assert_one_line_error(result, *words)
            assert result.stdout == "" and snapshot(tmp) == before, args
        assert not any(os.path.lexists(f"{folder}/x.txt{end}") for folder in UNWRITABLE for end in ["", ".floor.json"])

        # Asked to: the text and its floor (<out>.floor.json) are replaced, and nothing else changes.
        result = run_in(tmp, "data/make_stories.py", "--out=story.txt", "--overwrite=true", "--num_bytes=2000")
        assert result.returncode == 0, result.stderr
        after = snapshot(tmp)
        assert set(after) == set(before)
        assert {name for name in before if after[name] != before[name]} == {"story.txt", "story.txt.floor.json"}
        text, floor = after["story.txt"][0], json.loads(after["story.txt.floor.json"][0])
        assert floor["num_bytes"] == len(text) >= 2000 and floor["sha256"] == hashlib.sha256(text).hexdigest()


def test_readme_commands_are_the_ones_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"))
          if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert ci == ["pip install -r requirements.txt", "python test_all.py"], ci
    for command in ci:
        assert f"\n{command}\n" in readme, command


# -----------------------------------------------------------------------------
# GPT: gpt_torch.py and gpt_jax.py


POSITIONS = ("learned", "sinusoidal", "alibi")


def tiny_config(module, **overrides):
    fields = dict(vocab_size=256, seq_len=16, num_layers=2, num_heads=4, model_dim=32, position_embedding="learned")
    fields.update(overrides)
    return module.Config(**fields)


def build_pair(config_overrides, seed=0):
    """The same GPT in both frameworks: torch initializes, the weights are copied into jax."""
    torch.manual_seed(seed)
    torch_model = gpt_torch.GPT(tiny_config(gpt_torch, **config_overrides)).eval()
    jax_model = gpt_jax.GPT(tiny_config(gpt_jax, **config_overrides), nnx.Rngs(seed))
    copy_torch_to_jax(torch_model, jax_model)
    return torch_model, jax_model


# ---- model ------------------------------------------------------------------------------------------------------

def test_gpt_shapes_and_initial_loss():
    tokens, targets = np.random.default_rng(0).integers(0, 256, size=(2, 3, 16))
    torch.manual_seed(0)
    logits, loss = gpt_torch.GPT(tiny_config(gpt_torch))(torch.from_numpy(tokens), torch.from_numpy(targets))
    assert tuple(logits.shape) == (3, 16, 256)
    assert abs(loss.item() - math.log(256)) < 0.2  # N(0, 0.02) init: near-uniform predictions
    logits, loss = jax_forward(gpt_jax.GPT(tiny_config(gpt_jax), nnx.Rngs(0)), tokens, targets)
    assert logits.shape == (3, 16, 256)
    assert abs(float(loss) - math.log(256)) < 0.2


def test_gpt_causality():
    """Changing the tokens after position t leaves the logits at positions <= t unchanged."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, size=(2, 16))
    changed = tokens.copy()
    changed[:, 9:] = rng.integers(0, 256, size=(2, 7))
    for position in POSITIONS:
        torch_model, jax_model = build_pair(dict(position_embedding=position))
        with torch.no_grad():
            a, b = (torch_model(torch.from_numpy(t))[0].numpy() for t in (tokens, changed))
        c, d = (np.asarray(jax_forward(jax_model, t, t)[0]) for t in (tokens, changed))
        for before, after in ((a, b), (c, d)):
            assert np.allclose(before[:, :9], after[:, :9], atol=1e-5), position
            assert not np.allclose(before[:, 9:], after[:, 9:], atol=1e-3), position  # the change is seen


def test_gpt_torch_jax_parity():
    """The same weights give the same logits and loss in both frameworks, for every position scheme
    (alibi with 6 heads, a count that is not a power of two)."""
    tokens = np.random.default_rng(2).integers(0, 256, size=(2, 16))
    for overrides in (dict(position_embedding="learned"), dict(position_embedding="sinusoidal"),
                      dict(position_embedding="alibi", num_heads=6, model_dim=48)):
        torch_model, jax_model = build_pair(overrides)
        with torch.no_grad():
            torch_logits, torch_loss = torch_model(torch.from_numpy(tokens), torch.from_numpy(tokens))
        jax_logits, jax_loss = jax_forward(jax_model, tokens, tokens)
        assert np.abs(torch_logits.numpy() - np.asarray(jax_logits)).max() < 1e-4, overrides
        assert abs(torch_loss.item() - float(jax_loss)) < 1e-4, overrides


def test_gpt_greedy_sampling_matches_across_frameworks():
    """Greedy sampling (top_k=1) from the same weights picks the same tokens in both frameworks, and the tokens a
    reference picks from full forward passes over the last seq_len tokens: jax's windows grow by powers of two (4,
    8, 16 here) and then slide, torch takes the context as it is."""
    torch_model, jax_model = build_pair(dict(position_embedding="learned"))
    prompt, tokens = [5, 17, 101], [5, 17, 101]
    with torch.no_grad():
        for _ in range(24):  # past seq_len 16: the context is cropped
            logits, _ = torch_model(torch.tensor([tokens[-16:]]))
            tokens.append(int(logits[0, -1].argmax()))
    assert gpt_torch.generate(torch_model, prompt, 24, 1.0, 1) == tokens
    assert gpt_jax.generate(jax_model, prompt, 24, 1.0, 1, jax.random.key(0)) == tokens


def test_gpt_training_steps_match_across_frameworks():
    """Three AdamW steps from the same weights on the same batches agree: same schedule and step counting, same
    weight-decay mask, same clipping (grad_clip small enough to be active)."""
    overrides = dict(steps=3, warmup_steps=2, learning_rate=1e-2, min_learning_rate=1e-3, grad_clip=0.5)
    torch_model, jax_model = build_pair(overrides)
    torch_model.train()
    config = tiny_config(gpt_torch, **overrides)
    torch_step, _ = gpt_torch.make_steps(torch_model, gpt_torch.make_optimizer(torch_model, config), config)
    jax_optimizer = gpt_jax.make_optimizer(tiny_config(gpt_jax, **overrides))
    graphdef, state = nnx.split(jax_model)
    params, opt_state = on_mesh(nnx.to_pure_dict(state), jax_optimizer.init(nnx.to_pure_dict(state)))
    jax_step, _ = gpt_jax.make_steps(graphdef, jax_optimizer, jax.random.key(0), ONE_DEVICE)
    rng = np.random.default_rng(3)
    for step in range(3):
        x, y = rng.integers(0, 256, size=(2, 2, 16))
        learning_rate = gpt_torch.learning_rate_at(step, config)
        torch_loss = torch_step(x, y, learning_rate).item()
        params, opt_state, jax_loss = jax_step(params, opt_state, x.astype(np.int32), y.astype(np.int32), learning_rate,
                                               step)
        assert abs(torch_loss - float(jax_loss)) < 1e-4, step
    nnx.update(jax_model, params)
    reference = gpt_jax.GPT(tiny_config(gpt_jax, **overrides), nnx.Rngs(1))
    copy_torch_to_jax(torch_model, reference)  # the weights torch trained, in jax's layout
    for a, b in zip(jax.tree.leaves(nnx.state(jax_model)), jax.tree.leaves(nnx.state(reference))):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-5


def test_gpt_learning_rate_schedule():
    config = gpt_torch.Config(steps=110, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-4)
    lr = [gpt_torch.learning_rate_at(step, config) for step in range(110)]
    assert math.isclose(lr[0], 1e-4) and math.isclose(lr[9], 1e-3)  # linear warmup: (step + 1) / 10 of the peak
    assert math.isclose(lr[60], 1e-4 + 0.5 * 9e-4)  # halfway through the cosine: cos(pi / 2) = 0
    assert all(a >= b for a, b in zip(lr[9:], lr[10:])) and lr[-1] > 1e-4
    assert lr == [gpt_jax.learning_rate_at(step, gpt_jax.Config(**vars(config))) for step in range(110)]


def test_gpt_sinusoidal_table():
    for module in (gpt_torch, gpt_jax):
        for model_dim in (8, 7):
            table = module.sinusoidal_table(12, model_dim)
            for pos in range(12):
                for i in range(model_dim):
                    angle = pos / 10000 ** ((i - i % 2) / model_dim)
                    expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
                    assert abs(table[pos, i] - expected) < 1e-6, (pos, i)
    torch.manual_seed(0)
    model = gpt_torch.GPT(tiny_config(gpt_torch, position_embedding="sinusoidal"))
    assert model.position_embedding is None
    assert not any("sinusoidal" in name for name, _ in model.named_parameters())  # a fixed table, not learned


def test_gpt_alibi_slopes_and_bias():
    expected = {
        8: [2.0**-k for k in range(1, 9)],
        4: [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8],
        6: [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3],  # 4-head slopes, then 8-head slopes [0::2]
        1: [2.0**-8],
    }
    for module in (gpt_torch, gpt_jax):
        for num_heads, slopes in expected.items():
            assert np.allclose(module.alibi_slopes(num_heads), slopes, rtol=1e-6, atol=0), num_heads
        bias = module.alibi_bias(4, 5)
        assert bias.shape == (4, 5, 5)
        assert bias[0, 4, 1] == -0.25 * 3 and bias[3, 2, 0] == -(2.0**-8) * 2 and bias[1, 3, 3] == 0
        assert np.isneginf(bias[2, 1, 3])  # a future key is masked


# ---- the scripts as a user runs them ----------------------------------------------------------------------------

def test_gpt_smoke_runs():
    assert_smoke_runs(("gpt_torch.py", "gpt_jax.py"), "--num_layers=1")


def test_gpt_cli_errors():
    """A user's mistake: exit status 2 and exactly one line on stderr that names it; nothing is trained."""
    cases = [  # (arguments, a word the message must contain)
        (["--steps=abc"], "--steps"),
        (["--resume=maybe"], "--resume"),
        (["--model_dim=30", "--num_heads=4"], "num_heads"),
        (["--position_embedding=rotary"], "rotary"),
        (["--seq_len=0"], "seq_len"),
        (["--dropout=1"], "dropout"),
    ]
    assert_cli_refuses((gpt_torch, gpt_jax), cases,
                       [("gpt_torch.py", ["--steps=abc"]), ("gpt_jax.py", ["--model_dim=30"])])


def interrupt_at_step(module, step, signum=signal.SIGINT):
    """Make module.get_batch raise a signal (SIGINT is what Ctrl-C sends) while drawing the batch of the given step
    (counted from 1); returns a function that undoes it."""
    original, calls = module.get_batch, []
    def get_batch(*args):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signum)
        return original(*args)
    module.get_batch = get_batch
    return lambda: setattr(module, "get_batch", original)


def test_gpt_torch_ctrl_c_and_resume_equal_uninterrupted():
    """Ctrl-C at step 5 saves a checkpoint and exits 130 with one line; --resume=true then continues so that steps
    6..10 and the final weights equal an uninterrupted 10-step run (dropout on: the RNG state continues too)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_corpus(tmp)
        common = [f"--data={data}", "--seq_len=16", "--num_layers=1", "--model_dim=32", "--batch_size=4",
                  "--steps=10", "--warmup_steps=2", "--dropout=0.1", "--log_interval=1", "--eval_interval=100",
                  "--eval_steps=1", "--sample_tokens=0"]
        whole = run_main(gpt_torch, common + [f"--out_dir={tmp}/whole"])
        undo = interrupt_at_step(gpt_torch, 5)
        try:
            status, lines = exit_of(gpt_torch, common + [f"--out_dir={tmp}/part"])
        finally:
            undo()
        assert status == 130 and lines == [f"gpt_torch.py: stopped by SIGINT: saved step 5 to {tmp}/part/ckpt.pt; "
                                           f"continue with --resume=true"], (status, lines)
        resumed = run_main(gpt_torch, common + [f"--out_dir={tmp}/part", "--resume=true"])
        assert "resuming from step 5" in resumed
        tail = lambda text: [line.split(" | ")[:2] for line in text.splitlines() if re.match(r"step +([6-9]|10)/", line)]
        assert len(tail(whole)) == 5 and tail(whole) == tail(resumed)
        a, b = (torch.load(f"{tmp}/{run}/ckpt.pt", weights_only=True) for run in ("whole", "part"))
        assert all(torch.equal(a[name], b[name]) for name in a if name != "meta")


def test_gpt_jax_checkpoint_resume_equals_uninterrupted():
    """Save after 5 steps, restore into fresh arrays, continue: losses and weights equal 10 uninterrupted steps,
    bit for bit (dropout on: its keys derive from the step; the optimizer's count drives the schedule)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(gpt_jax, num_layers=1, batch_size=4, steps=10, warmup_steps=2, dropout=0.1,
                             out_dir=f"{tmp}/out")
        tokens = np.frombuffer(open(write_tiny_corpus(tmp), "rb").read(), dtype=np.uint8)
        optimizer = gpt_jax.make_optimizer(config)

        def fresh():
            graphdef, state = nnx.split(gpt_jax.GPT(config, nnx.Rngs(0)))
            params = nnx.to_pure_dict(state)
            return graphdef, *on_mesh(params, optimizer.init(params))

        def train(params, opt_state, rng, steps):
            losses = []
            for step in steps:
                params, opt_state, loss = train_step(params, opt_state, *gpt_jax.get_batch(tokens, rng, config),
                                                     gpt_jax.learning_rate_at(step, config), step)
                losses.append(float(loss))
            return params, opt_state, losses

        graphdef, params, opt_state = fresh()
        train_step, _ = gpt_jax.make_steps(graphdef, optimizer, jax.random.key(1), ONE_DEVICE)
        whole_params, _, whole = train(params, opt_state, np.random.default_rng(config.seed), range(10))
        _, params, opt_state = fresh()
        rng = np.random.default_rng(config.seed)
        params, opt_state, first = train(params, opt_state, rng, range(5))
        os.makedirs(config.out_dir)
        gpt_jax.save_checkpoint({"params": params, "opt_state": opt_state}, 5, rng, config)
        checkpoint = gpt_jax.open_checkpoint(dataclasses.replace(config, resume=True))
        _, params, opt_state = fresh()
        rng = np.random.default_rng(12345)  # the checkpoint puts the data stream back
        saved, step = gpt_jax.restore_checkpoint(checkpoint, {"params": params, "opt_state": opt_state}, rng, config)
        params, opt_state = on_mesh(saved["params"], saved["opt_state"])
        params, _, second = train(params, opt_state, rng, range(step, 10))
        assert step == 5 and first + second == whole
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(whole_params), jax.tree.leaves(params)))


# -----------------------------------------------------------------------------
# BPE: bpe.py


BPE_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe.py")


def _random_words_text(seed, num_words):
    """Text from a small seeded vocabulary of made-up words: many pairs tie on count."""
    rng = random.Random(seed)
    letters = "abcdeist"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 6))) for _ in range(40)]
    vocab += ["été", "дом", "кот", "日本", "中文", "😀", "x1", "42", "1999", "don't", "WE'LL"]
    separators = [" ", " ", " ", ", ", ". ", "\n", "\n\n", "  ", "\t", "!? "]
    return "".join(rng.choice(vocab) + rng.choice(separators) for _ in range(num_words))


def _random_unicode(rng, length):
    """Random text mixing scripts, emoji (ZWJ sequences, flags, skin tones), combining marks, whitespace runs."""
    pieces = ["👨\u200d👩\u200d👧\u200d👦", "🏳\ufe0f\u200d🌈", "🇯🇵", "👍🏽", "e\u0301", "a\u0308\u0323", "\u200d",
              " ", "  ", "\t", "\n", "\r\n", "\n\n\n", " \t \n", "\u00a0", "\u3000", "'s", "'LL", "1234567", "_",
              "<|", "|>", "\ufeff", "\x00"]
    ranges = [(0x20, 0x7E), (0x400, 0x4FF), (0x600, 0x6FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
              (0x300, 0x36F), (0xAC00, 0xD7A3), (0x0, 0x10FFFF)]
    out = []
    for _ in range(length):
        if rng.random() < 0.3:
            out.append(rng.choice(pieces))
        else:
            low, high = rng.choice(ranges)
            code = rng.randint(low, high)
            out.append(chr(code) if not 0xD800 <= code <= 0xDFFF else "?")  # surrogates are not text
    return "".join(out)


def _replay_encode(merges, text):
    """Reference encoder, independent of Tokenizer.encode: apply every merge, in training order, to each chunk."""
    ids = []
    for chunk in bpe.SPLIT_RE.findall(text):
        tokens = list(chunk.encode("utf-8"))
        for rank, (left, right) in enumerate(merges):
            out = []
            for token in tokens:
                if out and out[-1] == left and token == right:  # 256 + rank never equals left, so "aaa" -> [aa, a]
                    out[-1] = 256 + rank
                else:
                    out.append(token)
            tokens = out
        ids.extend(tokens)
    return ids


def test_bpe_split_pattern_by_hand():
    # Worked through GPT-4's cl100k pattern by hand: a space before a digit or before another space
    # stays alone, digits go in threes, punctuation keeps its trailing newlines.
    text = "Hello world's 12345 ok!!\n\n  x"
    assert bpe.SPLIT_RE.findall(text) == ["Hello", " world", "'s", " ", "123", "45", " ok", "!!\n\n", " ", " x"]
    assert bpe.SPLIT_RE.findall("I'M here_now\tdon't") == ["I", "'M", " here", "_now", "\tdon", "'t"]
    rng = random.Random(1)
    for _ in range(200):  # no character is ever dropped by the split
        text = _random_unicode(rng, 40)
        assert "".join(bpe.SPLIT_RE.findall(text)) == text


def test_bpe_worked_example():
    # "aaabdaaabac" is one chunk. By hand (a=97, b=98, c=99, d=100):
    #   pairs aa:4 ab:2 bd:1 da:1 ba:1 ac:1           -> merge (97, 97) = 256 "aa"
    #   text  [256 a b d 256 a b a c]; pairs (256,a):2 (a,b):2, others 1
    #         tie at 2: the smaller pair (97, 98) wins -> merge (97, 98) = 257 "ab"
    #   text  [256 257 d 256 257 a c]; (256,257):2     -> merge (256, 257) = 258 "aaab"
    #   text  [258 d 258 a c]; every pair occurs once  -> stop early, although 300 allows 44 merges
    for trainer in (bpe.train, bpe.train_slow):
        tokenizer = trainer("aaabdaaabac", 300)
        assert tokenizer.merges == [(97, 97), (97, 98), (256, 257)]
        assert tokenizer.token_bytes[258] == b"aaab"
        assert tokenizer.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
        assert tokenizer.vocab_size == 259


def test_bpe_merge_order_matters():
    # Merges overlap on "b": whichever was learned first wins, as in training.
    assert bpe.Tokenizer([(97, 98), (98, 99)]).encode("abc") == [256, 99]
    assert bpe.Tokenizer([(98, 99), (97, 98)]).encode("abc") == [97, 256]
    # Ranks, not position: the later pair (256, 256) "abab" is only formed after both "ab"s are.
    assert bpe.Tokenizer([(97, 98), (256, 256)]).encode("ababab") == [257, 256]


def test_bpe_roundtrip_random_unicode():
    train_text = _random_words_text(0, 400) + _random_unicode(random.Random(2), 300)
    tokenizer = bpe.train(train_text, 400)
    assert len(tokenizer.merges) > 50
    assert any(len(t) > 1 and t[0] >= 0x80 for t in tokenizer.token_bytes)  # some multi-byte merges exist
    rng = random.Random(3)
    for _ in range(100):
        text = _random_unicode(rng, rng.randint(0, 60))
        ids = tokenizer.encode_ordinary(text)
        assert tokenizer.decode(ids) == text
        assert b"".join(tokenizer.token_bytes[i] for i in ids) == text.encode("utf-8")
        assert ids == _replay_encode(tokenizer.merges, text)
    assert tokenizer.encode(train_text) == _replay_encode(tokenizer.merges, train_text)
    assert tokenizer.decode([0xE4, 0xB8]) == "\ufffd"  # two bytes of a three-byte character: one U+FFFD


def test_bpe_fast_trainer_equals_slow():
    text = _random_words_text(4, 800)  # about 4 KB
    assert 3000 < len(text.encode("utf-8")) < 8000
    for vocab_size in (300, 400, 5000):  # 5000 runs until no pair occurs twice
        fast, slow = bpe.train(text, vocab_size), bpe.train_slow(text, vocab_size)
        assert fast.merges == slow.merges
        assert len(fast.merges) == min(vocab_size - 256, len(slow.merges))
    assert len(fast.merges) < 5000 - 256  # the early stop was reached
    specials = ["<|endoftext|>"]
    text = "<|endoftext|>".join(_random_words_text(seed, 60) for seed in range(5))
    assert bpe.train(text, 330, specials).merges == bpe.train_slow(text, 330, specials).merges


def test_bpe_special_tokens():
    # Special tokens take no part in training: with them cut out, only the chunk "ab" remains.
    tokenizer = bpe.train("<|endoftext|>".join(["ab"] * 50), 300, ["<|endoftext|>", "<|pad|>"])
    assert tokenizer.merges == [(97, 98)]
    assert tokenizer.special_tokens == {"<|endoftext|>": 257, "<|pad|>": 258}
    assert tokenizer.token_bytes[257] == b"<|endoftext|>"
    text = "ab<|endoftext|> ab<|pad|>"
    assert tokenizer.encode(text, allowed_special="all") == [256, 257, 32, 256, 258]
    assert tokenizer.encode(text, allowed_special={"<|endoftext|>", "<|pad|>"}) == [256, 257, 32, 256, 258]
    for refused in ("none", {"<|pad|>"}, set()):
        try:
            tokenizer.encode(text, allowed_special=refused)
            assert False, f"allowed_special={refused!r} should refuse <|endoftext|>"
        except ValueError:
            pass
    try:
        tokenizer.encode(text)  # the default refuses
        assert False
    except ValueError:
        pass
    ids = tokenizer.encode_ordinary(text)  # as plain text: many byte tokens, no special id
    assert 257 not in ids and 258 not in ids and tokenizer.decode(ids) == text
    assert tokenizer.encode("ab ab") == [256, 32, 256]  # no special string: the default is fine
    # With a vocabulary of 257 and one special, there is no room for merges.
    assert bpe.train("aaaa", 257, ["<|endoftext|>"]).merges == []


def test_bpe_save_load():
    tokenizer = bpe.train(_random_words_text(5, 500), 350, ["<|endoftext|>"])
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "tok.json")
        tokenizer.save(path)
        loaded = bpe.Tokenizer.load(path)
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        state["token_bytes"][300] = "41"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(state, f)
        try:
            bpe.Tokenizer.load(path)
            assert False, "an edited token_bytes must be caught"
        except ValueError:
            pass
        tokenizer.save_vocab(os.path.join(folder, "tok.vocab.txt"))
        with open(os.path.join(folder, "tok.vocab.txt"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    assert loaded.merges == tokenizer.merges
    assert loaded.special_tokens == tokenizer.special_tokens
    assert loaded.token_bytes == tokenizer.token_bytes
    assert [bytes.fromhex(h) for h in state["token_bytes"][:300]] == tokenizer.token_bytes[:300]
    rng = random.Random(6)
    for _ in range(30):
        text = _random_unicode(rng, 40) + "<|endoftext|>" + _random_words_text(rng.randint(0, 99), 10)
        assert loaded.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")
    assert len(lines) == tokenizer.vocab_size
    assert lines[10] == "    10  '\\n'" and lines[-1].endswith("'<|endoftext|>'  (special)")


def _run_cli(folder, *args):
    return subprocess.run([sys.executable, BPE_PY, *args], cwd=folder, capture_output=True, text=True, timeout=60)


def test_bpe_cli_roundtrip():
    with tempfile.TemporaryDirectory() as folder:
        # BOM, CRLF, no final newline, a special token's string: all must come back byte for byte.
        raw = ("\ufeff" + _random_words_text(7, 600) + "<|endoftext|>\r\n" + _random_unicode(random.Random(8), 200)
               + "\r\nend").encode("utf-8")
        with open(os.path.join(folder, "corpus.v2.txt"), "wb") as f:
            f.write(raw)
        result = _run_cli(folder, "--data=corpus.v2.txt", "--vocab_size=300")
        assert result.returncode == 0, result.stderr
        assert "bytes per token" in result.stdout
        ids = np.load(os.path.join(folder, "corpus.v2.txt.bpe300.npy"))
        with open(os.path.join(folder, "corpus.v2.txt.bpe300.json"), encoding="utf-8") as f:
            token_bytes = [bytes.fromhex(h) for h in json.load(f)["token_bytes"]]  # all a model script reads
        assert os.path.exists(os.path.join(folder, "corpus.v2.txt.bpe300.vocab.txt"))
    assert ids.dtype == np.uint16 and len(token_bytes) == 300
    assert b"".join(token_bytes[i] for i in ids.tolist()) == raw
    assert len(ids) < len(raw) * 0.8  # the merges do compress
    assert ids.tolist().count(token_bytes.index(b"<|endoftext|>")) == 1


def test_bpe_cli_bad_input():
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "latin1.txt"), "wb") as f:
            f.write("caf\u00e9 ol\u00e9".encode("latin-1"))
        with open(os.path.join(folder, "ok.txt"), "w", encoding="utf-8") as f:
            f.write("hello hello")
        bad_calls = [["--data=missing.txt"], ["--data=latin1.txt"], ["--data=ok.txt", "--vocab_size=100"],
                     ["--data=ok.txt", "--vocab_size=10000000000"], ["--data=ok.txt", "--vocab_size=abc"],
                     ["--data=ok.txt", "--bogus=1"], ["--data=ok.txt", "--vocab"]]
        processes = [subprocess.Popen([sys.executable, BPE_PY, *args], cwd=folder, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for args in bad_calls]
        for args, process in zip(bad_calls, processes):
            stdout, stderr = process.communicate(timeout=60)
            assert process.returncode == 2, (args, process.returncode, stderr)
            assert stdout == "" and stderr.endswith("\n") and stderr.count("\n") == 1, (args, stderr)
            assert "Traceback" not in stderr
        assert sorted(os.listdir(folder)) == ["latin1.txt", "ok.txt"]  # nothing written


def decodes_to(folder, prefix):
    """The bytes that prefix.npy decodes to with the token bytes in prefix.json, as a model script reads them."""
    with open(os.path.join(folder, prefix + ".json"), encoding="utf-8") as f:
        token_bytes = [bytes.fromhex(h) for h in json.load(f)["token_bytes"]]
    return b"".join(token_bytes[i] for i in np.load(os.path.join(folder, prefix + ".npy")).tolist())


def test_bpe_cli_writes_only_what_it_is_asked():
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp, "c.txt", b"the cat sat on the mat, the cat sat on the hat. " * 20)
        write(tmp, "c.v2.txt", b"a dog ran in the park, a dog ran in the dark. " * 20)
        write(tmp, "taken.txt", b"hello hello")
        write(tmp, "taken.txt.bpe300.vocab.txt", b"an output of an earlier run")  # one of the three is enough
        write(tmp, "blocked.txt", b"hello hello")
        write(tmp, "blocked.txt.bpe300.npy", b"must survive a refused --overwrite")
        os.mkdir(os.path.join(tmp, "blocked.txt.bpe300.json"))
        write(tmp, "latin1.txt", "caf\u00e9 ol\u00e9".encode("latin-1"))
        refusals = [  # (options, words the one line must hold)
            (["--data=taken.txt"], ["taken.txt.bpe300.vocab.txt", "already exists", "--overwrite"]),
            (["--data=c.txt", "--overwrite=maybe"], ["--overwrite", "true/false"]),
            (["--data=blocked.txt", "--overwrite=true"], ["blocked.txt.bpe300.json", "is a folder"]),  # even so
            (["--data=latin1.txt"], ["latin1.txt", "UTF-8"]),
            (["--data=missing.txt"], ["missing.txt", "cannot read"]),
            (["--data=."], ["--data=.", "not a file"]),
        ] + ([(["--data=/proc/version"], ["cannot write", "/proc/version.bpe300.npy"])] if UNWRITABLE else [])
        before = snapshot(tmp)
        for args, words in refusals:
            result = run_in(tmp, "bpe.py", *args, "--vocab_size=300")
            assert_one_line_error(result, *words)
            assert result.stdout == "" and snapshot(tmp) == before, args
        assert not os.path.lexists("/proc/version.bpe300.npy")

        # The outputs are the input's full name plus .bpe300.*: distinct inputs get distinct outputs, and an
        # output of an earlier run given as input (c.txt.bpe300.json) is read, never overwritten.
        inputs = ["c.txt", "c.v2.txt", "c.txt.bpe300.json"]
        for data in inputs:
            assert run_in(tmp, "bpe.py", f"--data={data}", "--vocab_size=300").returncode == 0, data
        after = snapshot(tmp)
        assert set(after) - set(before) == {f"{data}.bpe300{end}" for data in inputs
                                            for end in [".npy", ".json", ".vocab.txt"]}
        assert all(after[name] == before[name] for name in before)
        for data in inputs:
            assert decodes_to(tmp, data + ".bpe300") == after[data][0], data

        # Asked to, it replaces the earlier outputs.
        assert run_in(tmp, "bpe.py", "--data=taken.txt", "--vocab_size=300", "--overwrite=true").returncode == 0
        assert decodes_to(tmp, "taken.txt.bpe300") == b"hello hello"
        with open(os.path.join(tmp, "taken.txt.bpe300.vocab.txt"), encoding="utf-8") as f:
            assert f.readline() == "     0  '\\x00'\n"


def test_tools_end_quietly_on_ctrl_c():
    # Each tool, run as a script, gives SIGINT its default action before any work (bpe.py even before numpy loads),
    # so Ctrl-C ends the process at once, with no traceback. Checked in-process: run the script on an option it
    # refuses, then look at the SIGINT action it left behind.
    previous, argv = signal.getsignal(signal.SIGINT), sys.argv
    seen = []
    for script, bad_option in [("bpe.py", "--vocab_size=1"), ("data/make_stories.py", "--seed=-1")]:
        sys.argv = [script, bad_option]
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            seen.append(signal.getsignal(signal.SIGINT))
        finally:
            signal.signal(signal.SIGINT, previous)
            sys.argv = argv
    assert seen == [signal.SIG_DFL, signal.SIG_DFL]


def test_bpe_corpus_trains_gpt_and_reports_bits_per_byte():
    # bpe.py tokenizes a corpus; gpt_torch.py trains on the .npy, its loss falls, and its val bits per
    # byte equals val loss / ln 2 * (val tokens / val bytes), counted here from the files alone; the
    # floor file of the text (<text file>.floor.json, e.g. tiny.txt.floor.json) is found from the tokenized corpus's name.
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_corpus(tmp)
        with open(os.path.join(tmp, "tiny.txt.floor.json"), "w") as f:
            json.dump({"train_bpb": 0.25, "val_bpb": 0.125}, f)
        assert _run_cli(tmp, "--data=tiny.txt", "--vocab_size=300").returncode == 0
        npy = os.path.join(tmp, "tiny.txt.bpe300.npy")
        result = run_script("gpt_torch.py", f"--data={npy}", "--seq_len=16", "--num_layers=1", "--model_dim=32",
                            "--batch_size=8", "--steps=30", "--warmup_steps=3", "--learning_rate=3e-3",
                            "--log_interval=5", "--eval_interval=30", "--eval_steps=2", "--sample_tokens=10",
                            f"--out_dir={tmp}/out")
        assert result.returncode == 0, result.stderr
        losses = parse_losses(result.stdout)
        assert losses[-1] < losses[0] - 1.0, losses
        val_loss, bpb, floor = map(float, re.search(
            r"\| val ([0-9.]+) \| val bpb ([0-9.]+) \| floor ([0-9.]+)", result.stdout).groups())
        ids = np.load(npy)
        token_bytes = json.load(open(os.path.join(tmp, "tiny.txt.bpe300.json")))["token_bytes"]
        val = ids[int(0.9 * len(ids)):]
        val_bytes = sum(len(token_bytes[i]) // 2 for i in val.tolist())  # two hex digits a byte
        assert abs(bpb - val_loss / math.log(2) * len(val) / val_bytes) < 2e-3
        assert floor == 0.125 and "sample:" in result.stdout


# ---- importing a published tokenizer (fixtures made by tools/make_tokenizer_fixtures.py) ---------------------

TOKENIZER_FIXTURES = os.path.join(ROOT, "fixtures", "tokenizer")


def _reference(name):
    """The Hugging Face tokenizers library's own ids for the fixture's texts."""
    with open(os.path.join(TOKENIZER_FIXTURES, name, "reference.json"), encoding="utf-8") as f:
        reference = json.load(f)
    return list(zip(reference["texts"] + [reference["file_text"]], reference["ids"] + [reference["file_ids"]]))


def _edited_fixture(folder, edit, name="modern"):
    """A copy of a fixture in folder/<name>, its tokenizer.json changed by edit(state); returns the copy's path."""
    copy = shutil.copytree(os.path.join(TOKENIZER_FIXTURES, name), os.path.join(folder, name))
    if edit is not None:
        with open(os.path.join(copy, "tokenizer.json"), encoding="utf-8") as f:
            state = json.load(f)
        edit(state)
        with open(os.path.join(copy, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(state, f)
    return copy


def test_bpe_import_equals_the_published_ids():
    # Both layouts: tokenizer.json (Llama 3's split pattern, ignore_merges, config.json's 5 unused rows) and GPT-2's
    # vocab.json + merges.txt. Contractions, numbers, Unicode, whitespace and punctuation runs, <|endoftext|>.
    for name, special_id, rows in [("modern", 0, 406), ("gpt2_style", 400, 401)]:
        tokenizer = bpe.import_tokenizer(os.path.join(TOKENIZER_FIXTURES, name))
        for text, ids in _reference(name):
            assert tokenizer.encode(text, allowed_special="all") == ids, (name, text)
            assert b"".join(tokenizer.token_bytes[i] for i in ids) == text.encode("utf-8")
        assert tokenizer.special_tokens == {"<|endoftext|>": special_id} and tokenizer.vocab_size == rows
    assert tokenizer.pattern == bpe.translate_pattern(bpe.GPT2_PATTERN)
    modern = bpe.import_tokenizer(os.path.join(TOKENIZER_FIXTURES, "modern"))
    assert modern.token_bytes[400] == "café".encode("utf-8") and modern.encode("café") == [400]  # ignore_merges
    assert modern.token_bytes[401:] == [b""] * 5 and all(modern.token_bytes[:401])  # padded to config.json's rows
    with tempfile.TemporaryDirectory() as folder:  # bpe.py's JSON keeps all of it
        modern.save(os.path.join(folder, "modern.json"))
        loaded = bpe.Tokenizer.load(os.path.join(folder, "modern.json"))
    assert loaded.token_bytes == modern.token_bytes and loaded.imported_from == "modern"
    assert [loaded.encode(text, allowed_special="all") for text, _ in _reference("modern")] == [
        ids for _, ids in _reference("modern")]


def test_bpe_import_keeps_the_published_ids():
    # Renumber the published ids (every id times 7, plus 3: holes everywhere, the special token moved too): the
    # encoding must be the reference's ids renumbered alike, and each hole an empty (unused) entry.
    def renumber(state):
        state["model"]["vocab"] = {token: 7 * i + 3 for token, i in state["model"]["vocab"].items()}
        for token in state["added_tokens"]:
            token["id"] = 7 * token["id"] + 3
    with tempfile.TemporaryDirectory() as folder:
        copy = _edited_fixture(folder, renumber)
        os.remove(os.path.join(copy, "config.json"))  # its vocab_size is below the new ids
        tokenizer = bpe.import_tokenizer(copy)
    for text, ids in _reference("modern"):
        assert tokenizer.encode(text, allowed_special="all") == [7 * i + 3 for i in ids], text
    assert tokenizer.vocab_size == 7 * 400 + 3 + 1 and tokenizer.token_bytes.count(b"") == tokenizer.vocab_size - 401


def test_bpe_import_merges_one_pair_at_a_time():
    # Published merge lists may use a token before the merge that makes it (those converted from tiktoken do). Here
    # merge 0 is "ab"+"a" and merge 1 makes "ab". On "abab" Hugging Face (tokenizers 0.23.3) merges the leftmost
    # "ab", then at once the now-possible "ab"+"a" of rank 0: [aba, b] = [257, 98]. Merging every "ab" first would
    # give [ab, ab] = [256, 256].
    characters = bpe.byte_characters()
    vocab = {characters[byte]: byte for byte in range(256)} | {"ab": 256, "aba": 257}
    state = {"model": {"type": "BPE", "vocab": vocab, "merges": ["ab a", "a b"]}, "added_tokens": [],
             "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            json.dump(state, f)
        tokenizer = bpe.import_tokenizer(folder)
    assert tokenizer.encode("abab") == [257, 98] and tokenizer.encode("ababab") == [257, 98, 256]
    assert tokenizer.encode("aab") == [97, 256]


def test_bpe_import_translates_split_patterns():
    # Worked by hand from the rules in translate_pattern's docstring.
    assert bpe.translate_pattern(bpe.GPT2_PATTERN) == (
        r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:(?![\s])[\W_])+|\s+(?!\S)|\s+")
    qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+")
    assert bpe.translate_pattern(qwen2) == (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:(?![\r\n])[\W_])?[^\W\d_]+|\d| ?"
                                           r"(?:(?![\s])[\W_])+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    # The Llama 3 pattern, translated, splits exactly as bpe.py's own hand translation of the same pattern.
    llama3 = re.compile(bpe.translate_pattern(qwen2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")))
    rng = random.Random(9)
    for _ in range(200):
        text = _random_unicode(rng, 40)
        assert llama3.findall(text) == bpe.SPLIT_RE.findall(text)
    assert bpe.translate_pattern(r"[\p{L}_]+|(\pN)") == r"(?:[_]|[^\W\d_])+|(?:\d)"
    for refused in [r"\p{Lu}+", r"\w+", r"^\s+", r"[[:alpha:]]", r"\p{L}*", r"[\P{L}]", "(?i)ab|c"]:
        try:
            bpe.translate_pattern(refused)
            assert False, f"{refused!r} should be refused"
        except bpe.ImportRefused as e:
            assert repr(refused) in str(e) and "\n" not in str(e)
    # NFC, as Qwen2 sets it: a decomposed "é" encodes as the composed one.
    with tempfile.TemporaryDirectory() as folder:
        copy = _edited_fixture(folder, lambda state: state.update(normalizer={"type": "NFC"}))
        tokenizer = bpe.import_tokenizer(copy)
    assert tokenizer.encode("cafe\u0301") == tokenizer.encode("café") == [400]
    # SmolLM's Sequence: Digits (each digit alone), then ByteLevel with GPT-2's regex. "a 2024 b" splits into
    # "a ", "2", "0", "2", "4", " b" (the text between digits is kept), then "a " into "a", " ".
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "add_prefix_space": False}]}
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = bpe.import_tokenizer(_edited_fixture(folder, lambda state: state.update(pre_tokenizer=smollm)))
    pieces = ["a", " ", "2", "0", "2", "4", " b"]
    assert tokenizer.encode("a 2024 b") == [i for piece in pieces for i in tokenizer.encode(piece)]
    assert tokenizer.decode(tokenizer.encode("a 2024 b")) == "a 2024 b"
    assert re.findall(bpe.with_gaps(r"\d"), "a 2024 b") == ["a ", "2", "0", "2", "4", " b"]


def test_bpe_import_cli_writes_the_published_ids():
    with tempfile.TemporaryDirectory() as folder:
        text, ids = _reference("modern")[-1]
        write(folder, "story.txt", text.encode("utf-8"))
        modern = os.path.join(TOKENIZER_FIXTURES, "modern")
        result = run_in(folder, "bpe.py", f"--tokenizer={modern}", "--data=story.txt")
        assert result.returncode == 0, result.stderr
        assert np.load(os.path.join(folder, "story.txt.modern.npy")).tolist() == ids
        with open(os.path.join(folder, "story.txt.modern.json"), encoding="utf-8") as f:
            token_bytes = json.load(f)["token_bytes"]  # all a model script reads
        assert len(token_bytes) == 406 and token_bytes[401:] == [""] * 5  # config.json's vocab_size, unused rows ""
        assert decodes_to(folder, "story.txt.modern") == text.encode("utf-8")
        with open(os.path.join(folder, "story.txt.modern.vocab.txt"), encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert lines[0] == "     0  '<|endoftext|>'  (special)" and lines[-1] == "   405  ''  (unused)"


def test_bpe_import_refuses_what_it_cannot_reproduce():
    # Each with one line on stderr, exit status 2, nothing written.
    with tempfile.TemporaryDirectory() as folder:
        write(folder, "story.txt", b"Once upon a time.")

        def fixture(name, edit):
            copy = _edited_fixture(folder, edit)
            os.rename(copy, os.path.join(folder, name))
            return os.path.join(folder, name) if edit is None else name
        def model(**fields):
            return lambda state: state["model"].update(fields)
        def pre_tokenizer(step):
            return lambda state: state.update(pre_tokenizer=step)
        os.mkdir(os.path.join(folder, "empty"))
        refusals = [  # (the tokenizer folder, options, words the one line must hold)
            (fixture("unigram", model(type="Unigram")), [], ["unigram/tokenizer.json", "Unigram", "not byte-level"]),
            (fixture("fallback", model(byte_fallback=True)), [], ["SentencePiece", "byte_fallback"]),
            (fixture("whitespace", pre_tokenizer({"type": "Whitespace"})), [], ["Whitespace", "ByteLevel"]),
            ("empty", [], ["empty has neither tokenizer.json nor vocab.json + merges.txt"]),
            ("missing", [], ["missing is not a folder"]),
            ("unigram", ["--vocab_size=300"], ["--vocab_size", "--tokenizer"]),
        ]
        before = snapshot(folder)
        for name, options, words in refusals:  # main() in this process: a subprocess would add 0.3 s each
            status, lines = exit_of(bpe, [f"--tokenizer={os.path.join(folder, name)}",
                                          f"--data={os.path.join(folder, 'story.txt')}", *options])
            assert status == 2 and len(lines) == 1 and all(word in lines[0] for word in words), (name, lines)
        assert snapshot(folder) == before

        # More refusals, by the import function itself: each is one line naming what to fix.
        in_process = [  # (edit of the modern fixture's tokenizer.json, words of the reason)
            (model(type="WordPiece"), ["WordPiece"]),
            (pre_tokenizer({"type": "Metaspace", "replacement": "\u2581"}), ["SentencePiece", "Metaspace"]),
            (pre_tokenizer({"type": "ByteLevel", "add_prefix_space": True}), ["add_prefix_space"]),
            (lambda state: state.update(normalizer={"type": "NFKC"}), ["normalizer", "NFKC"]),
            (lambda state: state["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\p{Lu}+"), [r"\p{Lu}"]),
            (lambda state: state["model"]["merges"].append(["h", "zzz"]), ["merge 143", "'zzz'", "not in the vocab"]),
            (lambda state: state["model"]["vocab"].pop("Ā"), ["no token for 1 of the 256 bytes", "0x00"]),
            (lambda state: state["added_tokens"][0].update(lstrip=True), ["<|endoftext|>", "lstrip"]),
            (model(continuing_subword_prefix="##"), ["continuing_subword_prefix"]),
            (lambda state: state.update(model=[]), ["no tokenizer model"]),
        ]
        for i, (edit, words) in enumerate(in_process):
            copy = fixture(f"edit{i}", edit)
            try:
                bpe.import_tokenizer(os.path.join(folder, copy))
                assert False, f"edit {i} should be refused"
            except bpe.ImportRefused as e:
                assert "\n" not in str(e) and all(word in str(e) for word in words), (i, str(e))
        write(fixture("badjson", None), "tokenizer.json", b"{not json")
        write(fixture("fewrows", None), "config.json", b'{"vocab_size": 300}')
        for name, words in [("badjson", ["badjson/tokenizer.json is not valid JSON"]),
                            ("fewrows", ["fewrows/config.json: vocab_size 300", "tokenizer's 401 ids"])]:
            try:
                bpe.import_tokenizer(os.path.join(folder, name))
                assert False, name
            except bpe.ImportRefused as e:
                assert all(word in str(e) for word in words), (name, str(e))


# -----------------------------------------------------------------------------
# Llama: llama_torch.py and llama_jax.py


# ---- Llama helpers ----------------------------------------------------------------------------------------------

def llama_config(module, **overrides):
    fields = dict(vocab_size=61, seq_len=16, num_layers=2, num_heads=4, num_kv_heads=2, model_dim=32)
    fields.update(overrides)
    return module.Config(**fields)


def build_twins(torch_class, jax_class, torch_config, jax_config, seed=0):
    """The same model in both frameworks: torch initializes, the weights are copied into jax. The RMSNorm weights
    are moved off 1 so that a norm weight applied in the wrong place would show."""
    torch.set_num_threads(1)  # tiny models: a second thread only waits, and stalls on a busy 2-core machine
    torch.manual_seed(seed)
    torch_model = torch_class(torch_config).eval()
    with torch.no_grad():
        for name, parameter in torch_model.named_parameters():
            if parameter.ndim == 1:
                parameter.uniform_(0.5, 1.5)
    jax_model = jax_class(jax_config, nnx.Rngs(seed))
    copy_torch_to_jax(torch_model, jax_model)
    return torch_model, jax_model


def build_llama_pair(config_overrides, seed=0):
    return build_twins(llama_torch.Llama, llama_jax.Llama, llama_config(llama_torch, **config_overrides),
                       llama_config(llama_jax, **config_overrides), seed)


def torch_logits(model, tokens, **kwargs):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64)), **kwargs)[0].numpy()


# ---- model ------------------------------------------------------------------------------------------------------

def test_llama_shapes_and_initial_loss():
    tokens, targets = np.random.default_rng(0).integers(0, 61, size=(2, 3, 16))
    torch.manual_seed(0)
    logits, loss = llama_torch.Llama(llama_config(llama_torch))(torch.from_numpy(tokens), torch.from_numpy(targets))
    assert tuple(logits.shape) == (3, 16, 61)
    assert abs(loss.item() - math.log(61)) < 0.2  # N(0, 0.02) init: near-uniform predictions
    logits, loss = jax_forward(llama_jax.Llama(llama_config(llama_jax), nnx.Rngs(0)), tokens, targets)
    assert logits.shape == (3, 16, 61)
    assert abs(float(loss) - math.log(61)) < 0.2


def test_llama_parameter_count_and_init():
    # By hand: head_dim 8, 2 kv heads of 8; ffn_dim = 8 * 32 // 3 = 85, rounded up to 96; no biases anywhere.
    model_dim, kv_dim, ffn_dim, vocab_size = 32, 16, 96, 61
    per_block = 2 * model_dim * model_dim + 2 * model_dim * kv_dim + 3 * model_dim * ffn_dim + 2 * model_dim
    untied = 2 * vocab_size * model_dim + 2 * per_block + model_dim
    torch_model, jax_model = build_llama_pair({})
    assert sum(p.numel() for p in torch_model.parameters()) == untied
    assert sum(p.size for p in jax.tree.leaves(nnx.state(jax_model, nnx.Param))) == untied
    # tied: the head is the token embedding; qk_norm: two RMSNorms of head_dim (8) per block
    tied = dict(tie_embeddings=True, qk_norm=True)
    torch.manual_seed(0)
    assert sum(p.numel() for p in llama_torch.Llama(llama_config(llama_torch, **tied)).parameters()) \
        == untied - vocab_size * model_dim + 2 * 2 * 8
    jax_tied = llama_jax.Llama(llama_config(llama_jax, **tied), nnx.Rngs(0))
    assert sum(p.size for p in jax.tree.leaves(nnx.state(jax_tied, nnx.Param))) == untied - vocab_size * model_dim + 2 * 2 * 8
    # Llama's width rule: int(8/3 * model_dim) rounded up to a multiple of 32; a positive ffn_dim overrides it
    for module in (llama_torch, llama_jax):
        assert [module.llama_ffn_dim(d) for d in (32, 64, 96, 128, 4096)] == [96, 192, 256, 352, 10944]
    assert llama_torch.Llama(llama_config(llama_torch, ffn_dim=40)).blocks[0].ffn.up.weight.shape == (40, 32)
    # init: N(0, 0.02); out_proj and down N(0, 0.02 / sqrt(2 * num_layers)); RMSNorm weights 1
    torch.manual_seed(0)
    big = dict(model_dim=256, num_heads=8, num_layers=8)
    jax_big = llama_jax.Llama(llama_config(llama_jax, **big), nnx.Rngs(0))
    for weights in (llama_torch.Llama(llama_config(llama_torch, **big)).blocks[3], jax_big.blocks[3]):
        std = lambda module: float(np.asarray(module.weight.detach() if hasattr(module, "weight")
                                              else module.kernel[...]).std())
        assert abs(std(weights.ffn.up) - 0.02) < 0.001 and abs(std(weights.attn.query) - 0.02) < 0.001
        assert abs(std(weights.ffn.down) - 0.02 / 4) < 0.0003 and abs(std(weights.attn.out_proj) - 0.02 / 4) < 0.0003
        assert np.all(np.asarray(weights.attn_norm.weight.detach() if hasattr(weights.attn_norm.weight, "detach")
                                 else weights.attn_norm.weight[...]) == 1)


def test_llama_causality():
    """Changing the tokens after position t leaves the logits at positions <= t unchanged."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 61, size=(2, 16))
    changed = tokens.copy()
    changed[:, 9:] = rng.integers(0, 61, size=(2, 7))
    torch_model, jax_model = build_llama_pair(dict(qk_norm=True))
    a, b = (torch_logits(torch_model, t) for t in (tokens, changed))
    c, d = (np.asarray(jax_forward(jax_model, t, t)[0]) for t in (tokens, changed))
    for before, after in ((a, b), (c, d)):
        assert np.allclose(before[:, :9], after[:, :9], atol=1e-5)
        assert not np.allclose(before[:, 9:], after[:, 9:], atol=1e-3)  # the change is seen


def test_llama_torch_jax_parity():
    """The same weights give the same logits and loss in both frameworks: query/kv head ratios 1, 2 and 4, each
    with QK-norm off and on; YaRN with factor 2 over 2 * seq_len tokens; tied embeddings."""
    cases = [dict(num_kv_heads=kv, qk_norm=qk) for kv in (4, 2, 1) for qk in (False, True)]
    cases += [dict(rope_scaling=2.0, qk_norm=True), dict(tie_embeddings=True, num_kv_heads=1)]
    for overrides in cases:
        torch_model, jax_model = build_llama_pair(overrides)
        tokens = np.random.default_rng(2).integers(0, 61, size=(2, torch_model.max_len + 1))
        x, y = tokens[:, :-1], tokens[:, 1:]
        with torch.no_grad():
            logits, loss = torch_model(torch.from_numpy(x), torch.from_numpy(y))
        jax_logits, jax_loss = jax_forward(jax_model, x, y)
        assert np.abs(logits.numpy() - np.asarray(jax_logits)).max() < 1e-4, overrides
        assert abs(loss.item() - float(jax_loss)) < 1e-4, overrides
        assert np.abs(logits.numpy()).max() > 0.1  # the comparison is not between two near-zero outputs


def test_llama_training_steps_match_across_frameworks():
    """Three AdamW steps from the same weights on the same batches agree: same schedule step counting, same
    weight-decay mask (RMSNorm weights not decayed), same clipping, RoPE tables not trained."""
    overrides = dict(steps=3, warmup_steps=2, learning_rate=1e-2, min_learning_rate=1e-3, grad_clip=0.5, qk_norm=True)
    torch_model, jax_model = build_llama_pair(overrides)
    torch_model.train()
    config = llama_config(llama_torch, **overrides)
    torch_optimizer = llama_torch.make_optimizer(torch_model, config)
    jax_optimizer = llama_jax.make_optimizer(llama_config(llama_jax, **overrides))
    graphdef, params, buffers = nnx.split(jax_model, nnx.Param, ...)
    params, opt_state = on_mesh(params, jax_optimizer.init(params))
    train_step, _ = llama_jax.make_steps(graphdef, buffers, jax_optimizer, ONE_DEVICE)
    rng = np.random.default_rng(3)
    for step in range(3):
        x = rng.integers(0, 61, size=(2, 16))
        y = np.roll(x, -1, axis=1)
        for group in torch_optimizer.param_groups:
            group["lr"] = llama_torch.learning_rate_at(step, config)
        _, loss = torch_model(torch.from_numpy(x), torch.from_numpy(y))
        torch_optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), config.grad_clip)
        torch_optimizer.step()
        params, opt_state, jax_loss = train_step(params, opt_state, x.astype(np.int32), y.astype(np.int32),
                                                 llama_jax.learning_rate_at(step, config))
        assert abs(loss.item() - float(jax_loss)) < 1e-4
    nnx.update(jax_model, params)
    kernel = np.asarray(jax_model.blocks[1].ffn.down.kernel[...])
    assert np.abs(torch_model.blocks[1].ffn.down.weight.detach().numpy().T - kernel).max() < 1e-5
    norm = np.asarray(jax_model.blocks[0].attn.key_norm.weight[...])
    assert np.abs(torch_model.blocks[0].attn.key_norm.weight.detach().numpy() - norm).max() < 1e-5
    assert np.array_equal(np.asarray(jax_model.cos[...]), torch_model.cos.numpy())  # untouched by the optimizer


def decode_in_chunks(torch_model, jax_model, tokens, prompt, jax_chunk=True):
    """Both models' logits for tokens, (batch, max_len), decoded with their caches: the first `prompt` tokens
    (prefill), a chunk of 4 (the masked case; with jax_chunk=False jax prefills them with the prompt, as its generate
    would), then one token at a time. Returns (torch logits, jax logits, torch cache, jax cache)."""
    graphdef, state = nnx.split(jax_model)

    @jax.jit  # as generation runs it: compiled once per chunk length
    def jax_step(state, tokens, cache, position):
        return nnx.merge(graphdef, state)(tokens, cache=cache, position=position)[0], cache

    torch_cache = torch_model.new_cache(len(tokens), torch_model.max_len)
    jax_cache = jax_model.new_cache(len(tokens), jax_model.max_len)
    torch_steps, jax_steps = [], []
    chunks = [(0, prompt), (prompt, prompt + 4)] + [(start, start + 1) for start in range(prompt + 4, len(tokens[0]))]
    for start, end in chunks:
        torch_steps.append(torch_logits(torch_model, tokens[:, start:end], cache=torch_cache, position=start))
    for start, end in chunks if jax_chunk else [(0, prompt + 4)] + chunks[2:]:
        logits, jax_cache = jax_step(state, tokens[:, start:end], jax_cache, start)
        jax_steps.append(np.asarray(logits))
    return np.concatenate(torch_steps, axis=1), np.concatenate(jax_steps, axis=1), torch_cache, jax_cache


def test_llama_kv_cache_matches_full_forward():
    """Prefill a prompt into the cache, then a chunk of 4 tokens (the masked case), then one token at a time: each
    step's logits equal those of one full forward pass over the same tokens. YaRN factor 2 lets the sequence run
    past seq_len into max_len."""
    for overrides in (dict(), dict(rope_scaling=2.0, num_kv_heads=1, qk_norm=True)):
        torch_model, jax_model = build_llama_pair(overrides)
        length, prompt = torch_model.max_len, 5
        tokens = np.random.default_rng(3).integers(0, 61, size=(2, length))
        torch_steps, jax_steps, torch_cache, jax_cache = decode_in_chunks(torch_model, jax_model, tokens, prompt)
        full = torch_logits(torch_model, tokens)  # (2, length, vocab_size)
        assert np.abs(torch_steps - full).max() < 1e-5, overrides
        assert np.abs(jax_steps - np.asarray(jax_forward(jax_model, tokens, tokens)[0])).max() < 1e-5
        assert jax_cache[0][0].shape == torch_cache[0][0].shape == (2, jax_model.num_kv_heads, length, 8)


def test_llama_generate_with_and_without_cache():
    """Greedy sampling (top_k=1) picks the same tokens with the cache as by rerunning the whole context; past
    max_len, the cached path keeps the last half of the context (at least one token: seq_len 1 works too) and
    goes on, as a slow reference built from full forward passes does."""
    for seq_len in (1, 16):
        torch_model, jax_model = build_llama_pair({"seq_len": seq_len})
        prompt, max_len = [1, 2, 3, 4], torch_model.max_len
        reference, start = list(prompt), 0  # start: where the cached context begins
        for _ in range(3 * max_len):
            if len(reference) - start > max_len:  # the cache is full: keep the last half
                start = len(reference) - max(1, max_len // 2)
            reference.append(int(torch_logits(torch_model, [reference[start:]])[0, -1].argmax()))
        for generate in (lambda *args, **kw: llama_torch.generate(torch_model, prompt, *args, 1.0, 1, **kw),
                         lambda *args, **kw: llama_jax.generate(jax_model, prompt, *args, 1.0, 1, jax.random.key(0),
                                                                **kw)):
            if max_len > len(prompt):
                assert generate(max_len - len(prompt), use_cache=False) == reference[:max_len]
            assert generate(3 * max_len, use_cache=True) == reference, seq_len
    torch.manual_seed(0)
    sampled = llama_torch.generate(torch_model, prompt, 20, 1.0, 0)
    assert len(set(sampled[len(prompt):])) > 5  # temperature 1 over all tokens: random weights, varied draws


def test_llama_rope_depends_only_on_distance():
    """RoPE's defining property (Su et al. 2021, eq. 16): rotate(q, m) . rotate(k, n) depends on m - n only."""
    cos, sin = llama_torch.rope_tables(llama_config(llama_torch, seq_len=64), 64)  # (64, head_dim)
    rng = np.random.default_rng(4)
    query, key = rng.standard_normal((2, 8)).astype(np.float32)
    for apply in (lambda x, p: llama_torch.apply_rope(torch.from_numpy(x), torch.from_numpy(cos[p]),
                                                      torch.from_numpy(sin[p])).numpy(),
                  lambda x, p: np.asarray(llama_jax.apply_rope(jnp.asarray(x), cos[p], sin[p]))):
        scores = [apply(query, m) @ apply(key, n) for m, n in ((7, 3), (30, 26), (63, 59))]
        assert max(scores) - min(scores) < 1e-5, scores
        assert abs(apply(query, 7) @ apply(key, 3) - apply(query, 7) @ apply(key, 4)) > 1e-3  # it sees distance
        assert np.isclose(np.linalg.norm(apply(query, 40)), np.linalg.norm(query))  # a rotation keeps the norm
        assert np.allclose(apply(query, 0), query)  # position 0: no rotation


def test_llama_rope_scaling_frequencies():
    """Factor 1 is plain RoPE bit for bit. For s > 1, rope_type=llama3 follows YaRN's equations 17-20 (Peng et al.
    2023) as Llama 3.1 uses them: kept where r = original_len / wavelength > beta, divided by s where r < alpha,
    blended linearly in r in between, no attention factor. rope_type=yarn follows the authors' released code: the
    ends where r = beta and r = alpha, as fractional dimension indices, floored and ceiled, a ramp linear in the
    index between them, and cos and sin times 0.1 ln s + 1 (section 3.4). Expected values computed here with math,
    the YaRN indices also worked by hand for one case."""
    head_dim, base, original_len = 32, 10000.0, 1024
    positions = np.arange(300, dtype=np.float64)[:, None]
    plain = base ** (-np.arange(0, head_dim, 2) / head_dim)
    for module in (llama_torch, llama_jax):
        cos, sin = module.rope_tables(llama_config(module, model_dim=4 * head_dim, seq_len=original_len), 300)
        assert np.array_equal(cos, np.cos(np.concatenate([positions * plain] * 2, axis=1)).astype(np.float32))
        assert np.array_equal(sin, np.sin(np.concatenate([positions * plain] * 2, axis=1)).astype(np.float32))
    for scale, alpha, beta in ((4.0, 1.0, 32.0), (2.5, 2.0, 8.0)):
        config = llama_config(llama_torch, model_dim=4 * head_dim, seq_len=16, original_len=original_len,
                              rope_scaling=scale, rope_type="llama3", yarn_alpha=alpha, yarn_beta=beta)
        theta, factor = llama_torch.rope_frequencies(config)
        assert factor == 1.0
        regimes = set()
        for i in range(head_dim // 2):
            original = base ** (-2 * i / head_dim)
            r = original_len / (2 * math.pi / original)
            if r > beta:
                expected = original
            elif r < alpha:
                expected = original / scale
            else:
                ramp = (r - alpha) / (beta - alpha)
                expected = (1 - ramp) * original / scale + ramp * original
            regimes.add("kept" if r > beta else "interpolated" if r < alpha else "ramp")
            assert abs(theta[i] - expected) <= 1e-12 * original, (i, theta[i], expected)
        assert regimes == {"kept", "interpolated", "ramp"}  # the cases cover all three
    # YaRN, head_dim 32, rope_theta 10000, original_len 1024, s = 4, alpha 1, beta 32: the pair turning r times sits at
    # index 32 ln(1024 / (2 pi r)) / (2 ln 10000), 2.83 for r = 32 and 8.85 for r = 1: floor 2 and ceil 9
    config = llama_config(llama_torch, model_dim=4 * head_dim, seq_len=16, original_len=original_len, rope_scaling=4.0)
    theta, factor = llama_torch.rope_frequencies(config)
    assert abs(factor - (0.1 * math.log(4) + 1)) < 1e-12
    kept = np.clip((np.arange(head_dim // 2) - 2) / (9 - 2), 0, 1)  # 0 where kept, 1 where divided by s
    assert np.allclose(theta, (1 - kept) * plain + kept * plain / 4, rtol=1e-12, atol=0)
    assert 0 < kept[3] < 1 and kept[1] == 0 and kept[12] == 1
    for module in (llama_torch, llama_jax):
        cos, sin = module.rope_tables(config, 300)
        assert np.allclose(cos[0], factor) and np.allclose(sin[0], 0)  # position 0: cos 1, times the factor
        angle = 250 * theta[5]
        assert np.allclose([cos[250, 5], sin[250, 5 + head_dim // 2]],
                           [factor * math.cos(angle), factor * math.sin(angle)])


# ---- the scripts as a user runs them ----------------------------------------------------------------------------

def test_llama_smoke_runs():
    assert_smoke_runs(("llama_torch.py", "llama_jax.py"), "--num_layers=2")


def test_llama_cli_errors():
    """A user's mistake: exit status 2 and exactly one line on stderr that names it; nothing is trained."""
    cases = [  # (arguments, a word the message must contain)
        (["--num_kv_heads=3"], "num_kv_heads"),  # 4 query heads cannot share 3 kv heads
        (["--num_kv_heads=0"], "num_kv_heads"),
        (["--model_dim=30", "--num_heads=4"], "num_heads"),
        (["--model_dim=12", "--num_heads=4", "--num_kv_heads=4"], "even"),  # head_dim 3: RoPE needs pairs
        (["--rope_scaling=0.5"], "rope_scaling"),
        (["--yarn_alpha=40"], "yarn_beta"),
        (["--ffn_dim=-1"], "ffn_dim"),
        (["--qk_norm=maybe"], "--qk_norm"),
        (["--dropout=0.1"], "--dropout"),  # Llama has no dropout
        (["--rope_scaling=1e30"], "rope_scaling"),  # RoPE tables for 1e30 * seq_len positions
        (["--yarn_beta=inf"], "finite"),
    ]
    assert_cli_refuses((llama_torch, llama_jax), cases,
                       [("llama_torch.py", ["--num_kv_heads=3"]), ("llama_jax.py", ["--rope_scaling=0.5"])])


def test_llama_resume_equals_uninterrupted():
    """Train 6 steps, save, resume to 12: the losses of steps 7..12 and the final weights equal an uninterrupted
    12-step run. learning_rate == min_learning_rate keeps the schedule independent of --steps."""
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_corpus(tmp)
        common = [f"--data={data}", "--seq_len=16", "--num_layers=1", "--model_dim=32", "--batch_size=4",
                  "--warmup_steps=2", "--learning_rate=1e-3", "--min_learning_rate=1e-3", "--qk_norm=true",
                  "--log_interval=1", "--eval_interval=100", "--eval_steps=1", "--sample_tokens=0"]
        for module in (llama_torch, llama_jax):
            assert_resume_equals_uninterrupted(module, common, f"{tmp}/{module.__name__}")


# -----------------------------------------------------------------------------
# Mixture of experts: moe_torch.py and moe_jax.py


# ---- MoE helpers ------------------------------------------------------------------------------------------------

def moe_config(module, **overrides):
    fields = dict(vocab_size=61, seq_len=16, num_layers=2, num_heads=4, num_kv_heads=2, model_dim=32, num_experts=4,
                  experts_per_token=2, expert_ffn_dim=16)
    fields.update(overrides)
    return module.Config(**fields)


def build_moe_pair(config_overrides, seed=0, expert_bias=None):
    """The same MoE in both frameworks, as build_llama_pair. expert_bias, (num_layers, num_experts), is not a
    parameter: set in both here."""
    torch_model, jax_model = build_twins(moe_torch.MoE, moe_jax.MoE, moe_config(moe_torch, **config_overrides),
                                         moe_config(moe_jax, **config_overrides), seed)
    if expert_bias is not None:
        torch_model.expert_bias.copy_(torch.from_numpy(np.float32(expert_bias)))
        jax_model.expert_bias[...] = jnp.asarray(np.float32(expert_bias))
    return torch_model, jax_model


def build_moe_layer_pair(seed=0, **config_overrides):
    """One SparseMoE layer in both frameworks with the same N(0, 0.3) weights: large enough that its output is of
    order 1, so that an absolute tolerance means something."""
    torch.set_num_threads(1)
    torch_layer = moe_torch.SparseMoE(moe_config(moe_torch, **config_overrides))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for parameter in torch_layer.parameters():
            parameter.copy_(torch.from_numpy(rng.normal(0, 0.3, parameter.shape).astype(np.float32)))
    jax_layer = moe_jax.SparseMoE(moe_config(moe_jax, **config_overrides), nnx.Rngs(seed))
    copy_torch_to_jax(torch_layer, jax_layer)
    return torch_layer, jax_layer


def route_both(torch_layer, jax_layer, x, expert_bias):
    """route(x, expert_bias) of both frameworks' layers, as two tuples of numpy arrays (logits, probs, chosen,
    weights)."""
    with torch.no_grad():
        torch_route = torch_layer.route(torch.from_numpy(np.float32(x)), torch.from_numpy(np.float32(expert_bias)))
    jax_route = jax_layer.route(jnp.asarray(np.float32(x)), jnp.asarray(np.float32(expert_bias)))
    return [t.numpy() for t in torch_route], [np.asarray(a) for a in jax_route]


@nnx.jit  # compiled: one compile instead of one per operation
def jax_dispatch(layer, x, expert_bias):
    """A jax SparseMoE's routing of x, (tokens, model_dim), and the sparse and dense dispatch of that routing."""
    logits, probs, chosen, weights = layer.route(x, expert_bias)
    return chosen, layer.sparse_experts(x, chosen, weights), layer.dense_experts(x, chosen, weights)


def moe_layer_outputs(torch_layer, jax_layer, x, expert_bias):
    """The module call of both frameworks' layers on x, (tokens, model_dim) numpy: (torch's, jax's) outputs."""
    x, expert_bias = np.float32(x[None]), np.float32(expert_bias)
    with torch.no_grad():
        torch_out, _ = torch_layer(torch.from_numpy(x), torch.from_numpy(expert_bias))
    jax_out = nnx.jit(lambda layer, x, expert_bias: layer(x, expert_bias)[0])(jax_layer, x, expert_bias)
    return torch_out[0].numpy(), np.asarray(jax_out[0])


def numpy_softmax(logits):
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def numpy_swiglu(x, gate, up, down):
    """down(silu(x @ gate) * (x @ up)), weights as (in, out) matrices."""
    hidden = x @ gate
    return (hidden / (1 + np.exp(-hidden)) * (x @ up)) @ down


def numpy_moe_layer(layer, x, expert_bias):
    """A torch SparseMoE's output written out again in float64 numpy, token by token, from its weights: softmax
    router, top experts_per_token of probs + bias, weights the chosen probabilities (renormalised with
    normalize_top_k), plus sigmoid(x @ shared_gate) * the shared SwiGLU."""
    weight = lambda linear: linear.weight.detach().double().numpy().T  # (in, out)
    gate, up, down = (p.detach().double().numpy() for p in (layer.experts.gate, layer.experts.up, layer.experts.down))
    probs = numpy_softmax(x @ weight(layer.router))
    out = np.zeros_like(x)
    for token in range(len(x)):
        chosen = np.argsort(-(probs[token] + expert_bias))[: layer.experts_per_token]
        weights = probs[token, chosen] / (probs[token, chosen].sum() if layer.normalize_top_k else 1)
        for expert, w in zip(chosen, weights):
            out[token] += w * numpy_swiglu(x[token], gate[expert], up[expert], down[expert])
    if layer.shared is not None:
        shared = numpy_swiglu(x, weight(layer.shared.gate), weight(layer.shared.up), weight(layer.shared.down))
        out += shared / (1 + np.exp(-(x @ weight(layer.shared_gate))))
    return out


def moe_parameters(vocab_size, model_dim, kv_dim, num_layers, num_experts, experts_per_token, expert_ffn_dim,
                   num_shared_experts=0, tied=False):
    """(total, active per token) by hand: attention's query and out (model_dim^2 each), key and value (model_dim x
    kv_dim each), two RMSNorms and the router (model_dim x num_experts) per block; 3 matrices per expert and, with
    shared experts, one SwiGLU of num_shared_experts * expert_ffn_dim and its gate (model_dim); embedding, final
    norm, head. A token skips num_experts - experts_per_token experts per block."""
    expert = 3 * model_dim * expert_ffn_dim
    shared = 3 * model_dim * num_shared_experts * expert_ffn_dim + model_dim if num_shared_experts else 0
    block = 2 * model_dim**2 + 2 * model_dim * kv_dim + 2 * model_dim + model_dim * num_experts + \
        num_experts * expert + shared
    total = (1 if tied else 2) * vocab_size * model_dim + num_layers * block + model_dim
    return total, total - num_layers * (num_experts - experts_per_token) * expert


# The sizes of the skeleton's TINY runs (vocab_size 256: a text corpus; the default 8 experts of width 176), used by
# the training test, the smoke run and the resume test too: what jax compiles for one of them (the train and eval
# steps), the others load from the compilation cache (the same shapes and balancing options make the same program).
MOE_RUN = dict(vocab_size=256, seq_len=16, model_dim=32, num_layers=1, batch_size=4, num_experts=8, expert_ffn_dim=176)
MOE_RUN_ARGS = [f"--{name}={value}" for name, value in MOE_RUN.items() if name != "vocab_size"]
# Qwen2-MoE's layer (a shared expert, the chosen experts' weights not renormalised) and tied embeddings: the model of
# the first tests, whose compiled forward pass test_moe_torch_jax_parity reuses
MOE_SHARED = dict(num_shared_experts=1, normalize_top_k=False, tie_embeddings=True)


# ---- model ------------------------------------------------------------------------------------------------------

def test_moe_shapes_initial_loss_and_causality():
    """Shapes of the logits and the router statistics; loss near ln 61 at init; changing the tokens after position
    t leaves the logits at positions <= t unchanged (routing is per token: no token's expert choice leaks)."""
    torch_model, jax_model = build_moe_pair(MOE_SHARED)
    rng = np.random.default_rng(1)
    tokens, targets = rng.integers(0, 61, size=(2, 2, 16))
    changed = tokens.copy()
    changed[:, 9:] = rng.integers(0, 61, size=(2, 7))
    with torch.no_grad():
        outputs = [torch_model(torch.from_numpy(t), torch.from_numpy(targets)) for t in (tokens, changed)]
    outputs = [[logits.numpy(), loss.item(), [s.numpy() for s in stats]] for logits, loss, stats in outputs]
    jax_outputs = [jax_forward(jax_model, jnp.asarray(t), jnp.asarray(targets)) for t in (tokens, changed)]
    outputs += [[np.asarray(logits), float(loss), [np.asarray(s) for s in stats]]
                for logits, loss, stats in jax_outputs]
    for logits, loss, (load, aux_loss, z_loss) in outputs:
        assert logits.shape == (2, 16, 61) and load.shape == (2, 4) and aux_loss.shape == z_loss.shape == ()
        assert abs(loss - math.log(61)) < 0.2  # N(0, 0.02) init: near-uniform predictions
        assert np.issubdtype(load.dtype, np.integer) and np.all(load.sum(1) == 2 * 16 * 2)  # tokens * experts_per_token
        assert 0.95 < aux_loss < 1.1 and abs(z_loss - math.log(4) ** 2) < 0.1  # near-uniform router at init
    for (before, *_), (after, *_) in (outputs[:2], outputs[2:]):
        assert np.allclose(before[:, :9], after[:, :9], atol=1e-5)
        assert not np.allclose(before[:, 9:], after[:, 9:], atol=1e-3)  # the change is seen


def test_moe_torch_jax_parity():
    """The same weights (and expert biases) give the same logits, loss, expert load, aux loss and z-loss in both
    frameworks: 1 shared expert, top-2 weights not renormalised, tied embeddings; 2 shared experts, the top 1
    (renormalised: weight 1), multi-query attention, QK-norm, a nonzero expert bias, which changes the choice of
    experts. (No shared expert, top-2 renormalised: test_moe_training_steps_match_across_frameworks.)"""
    bias = np.random.default_rng(5).normal(0, 0.05, (2, 4))
    cases = [(MOE_SHARED, None), (dict(num_shared_experts=2, num_kv_heads=1, qk_norm=True, experts_per_token=1), bias)]
    for overrides, expert_bias in cases:
        torch_model, jax_model = build_moe_pair(overrides, expert_bias=expert_bias)
        tokens = np.random.default_rng(2).integers(0, 61, size=(2, 17))
        x, y = tokens[:, :-1], tokens[:, 1:]
        with torch.no_grad():
            logits, loss, (load, aux_loss, z_loss) = torch_model(torch.from_numpy(x), torch.from_numpy(y))
        jax_logits, jax_loss, (jax_load, jax_aux_loss, jax_z_loss) = jax_forward(jax_model, jnp.asarray(x),
                                                                                  jnp.asarray(y))
        assert np.abs(logits.numpy() - np.asarray(jax_logits)).max() < 1e-4, overrides
        assert abs(loss.item() - float(jax_loss)) < 1e-4, overrides
        assert np.array_equal(load.numpy(), np.asarray(jax_load)), overrides
        assert abs(aux_loss.item() - float(jax_aux_loss)) < 1e-5 and abs(z_loss.item() - float(jax_z_loss)) < 1e-5
        assert np.abs(logits.numpy()).max() > 0.1  # the comparison is not between two near-zero outputs
        if expert_bias is not None:  # the bias changed which experts run
            with torch.no_grad():
                torch_model.expert_bias.zero_()
                assert not torch.equal(torch_model(torch.from_numpy(x))[2][0], load), overrides


def max_weight_difference(torch_model, jax_model):
    """The largest difference between a torch model's weights and a jax model's, matched by name as
    copy_torch_to_jax matches them."""
    twin = nnx.clone(jax_model)
    copy_torch_to_jax(torch_model, twin)
    return max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
        jax.tree.leaves(nnx.state(twin, nnx.Param)), jax.tree.leaves(nnx.state(jax_model, nnx.Param))))


def test_moe_training_steps_match_across_frameworks():
    """Three AdamW steps from the same weights on the same batches agree three ways: the torch step written out
    here (objective loss + z_loss_weight * z_loss, + aux_loss_weight * aux_loss with balance=aux_loss; with
    balance=bias, then bias += bias_update_rate * sign(mean load - load)), moe_torch.make_steps and
    moe_jax.make_steps; so do the evaluation losses and loads after them. Both balance modes: the losses,
    (aux_loss, z_loss), every weight and the expert biases (nonzero after the steps with balance=bias, still zero
    with aux_loss) agree. MOE_RUN's sizes: the runs of main() in later tests load these compiled steps."""
    for balance in ("aux_loss", "bias"):
        overrides = dict(MOE_RUN, steps=3, warmup_steps=2, learning_rate=1e-2, min_learning_rate=1e-3,
                         num_shared_experts=0, balance=balance)
        by_hand, jax_model = build_moe_pair(overrides)
        config = moe_config(moe_torch, **overrides)
        stepped = moe_torch.MoE(config)
        stepped.load_state_dict(by_hand.state_dict())
        by_hand.train(), stepped.train()
        optimizer = moe_torch.make_optimizer(by_hand, config)
        torch_step, torch_eval = moe_torch.make_steps(stepped, moe_torch.make_optimizer(stepped, config), config)
        jax_optimizer = moe_jax.make_optimizer(moe_config(moe_jax, **overrides))
        graphdef, params, expert_bias, buffers = nnx.split(jax_model, nnx.Param, moe_jax.ExpertBias, ...)
        params, expert_bias, buffers = (nnx.to_pure_dict(s) for s in (params, expert_bias, buffers))
        params, opt_state, expert_bias = on_mesh(params, jax_optimizer.init(params), expert_bias)
        jax_step, jax_eval = moe_jax.make_steps(graphdef, buffers, jax_optimizer, moe_config(moe_jax, **overrides),
                                                ONE_DEVICE)
        batches = np.random.default_rng(3).integers(0, 256, size=(4, MOE_RUN["batch_size"], MOE_RUN["seq_len"]))
        for step, x in enumerate(batches[:3]):
            y = np.roll(x, -1, axis=1)
            learning_rate = moe_torch.learning_rate_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            _, loss, (load, aux_loss, z_loss) = by_hand(torch.from_numpy(x), torch.from_numpy(y))
            objective = loss + 1e-3 * z_loss + (0.01 * aux_loss if balance == "aux_loss" else 0)  # Config's weights
            optimizer.zero_grad()
            objective.backward()
            torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 1.0)
            optimizer.step()
            if balance == "bias":
                load = load.numpy()
                by_hand.expert_bias += torch.from_numpy(np.float32(1e-3 * np.sign(load.mean(1, keepdims=True) - load)))
            stepped_loss, stepped_balance = torch_step(x, y, learning_rate)
            params, opt_state, expert_bias, jax_loss, jax_balance = jax_step(
                params, opt_state, expert_bias, x.astype(np.int32), y.astype(np.int32), learning_rate)
            assert abs(loss.item() - stepped_loss.item()) < 1e-6 and abs(loss.item() - float(jax_loss)) < 1e-4
            assert np.allclose(stepped_balance.numpy(), [aux_loss.item(), z_loss.item()], atol=1e-6)
            assert np.allclose(np.asarray(jax_balance), [aux_loss.item(), z_loss.item()], atol=1e-5)
        x, y = batches[3], np.roll(batches[3], -1, axis=1)  # then an evaluation
        (loss, load), (jax_loss, jax_load) = torch_eval(x, y), jax_eval(params, expert_bias, x, y)
        assert abs(loss.item() - float(jax_loss)) < 1e-4 and np.array_equal(load.numpy(), np.asarray(jax_load))
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(by_hand.parameters(), stepped.parameters()))
        nnx.update(jax_model, params, expert_bias)
        assert max_weight_difference(by_hand, jax_model) < 2e-4, balance  # Adam scales a gradient near 0 up to lr
        bias = by_hand.expert_bias.numpy()
        assert np.array_equal(stepped.expert_bias.numpy(), bias)
        assert np.allclose(np.asarray(jax_model.expert_bias[...]), bias, atol=1e-7)
        assert np.any(bias != 0) if balance == "bias" else np.all(bias == 0)


def test_moe_sparse_dispatch_equals_dense_reference():
    """The dropless dispatch (sort the assignments by expert, run each expert once on its slice; jax: padded to
    blocks of static shape, under jit) gives the dense reference path's output (every expert on every token,
    masked): 32 tokens; an expert that receives no token; every token on one expert; a single token."""
    torch_layer, jax_layer = build_moe_layer_pair(normalize_top_k=False)
    x = np.random.default_rng(6).standard_normal((32, 32)).astype(np.float32)
    idle, busy = np.zeros(4, np.float32), np.zeros(4, np.float32)
    idle[2], busy[1] = -10, 10  # expert 2 never chosen; expert 1 always
    for tokens, expert_bias in ((x, np.zeros(4, np.float32)), (x, idle), (x, busy), (x[:1], np.zeros(4, np.float32))):
        with torch.no_grad():
            _, _, chosen, weights = torch_layer.route(torch.from_numpy(tokens), torch.from_numpy(expert_bias))
            sparse = torch_layer.sparse_experts(torch.from_numpy(tokens), chosen, weights).numpy()
            dense = torch_layer.dense_experts(torch.from_numpy(tokens), chosen, weights).numpy()
        jax_chosen, jax_sparse, jax_dense = jax_dispatch(jax_layer, tokens, expert_bias)
        assert np.array_equal(chosen.numpy(), np.asarray(jax_chosen))
        counts = np.bincount(chosen.reshape(-1), minlength=4)
        assert counts[2] == 0 if expert_bias[2] < 0 else counts[1] == len(tokens) if expert_bias[1] > 0 else True
        assert np.abs(dense).max() > 0.5  # outputs of order 1: the tolerance is relative enough
        for out in (sparse, np.asarray(jax_sparse), np.asarray(jax_dense)):
            assert np.abs(out - dense).max() < 1e-5, (len(tokens), expert_bias)


def test_moe_routing_chooses_top_k_with_softmax_weights():
    """Every token gets experts_per_token distinct experts, the largest probabilities plus bias (numpy argsort);
    with normalize_top_k the weights sum to 1 and equal a softmax over the chosen logits alone; without, they are
    the softmax probabilities of the chosen experts; the bias shifts the choice, never the weights. Both
    frameworks, against numpy."""
    x = np.random.default_rng(7).standard_normal((32, 32)).astype(np.float32)
    for normalize_top_k, experts_per_token in ((True, 2), (False, 2), (True, 3), (False, 1)):
        torch_layer, jax_layer = build_moe_layer_pair(normalize_top_k=normalize_top_k,
                                                      experts_per_token=experts_per_token)
        logits_by_hand = x.astype(np.float64) @ torch_layer.router.weight.detach().double().numpy().T
        probs_by_hand = numpy_softmax(logits_by_hand)
        expert_bias = np.array([0.0, 0.2, 0.0, -0.1])  # changes the choice of some tokens
        for logits, probs, chosen, weights in route_both(torch_layer, jax_layer, x, expert_bias):
            assert chosen.shape == weights.shape == (32, experts_per_token)
            assert all(len(set(row)) == experts_per_token for row in chosen)
            assert np.allclose(logits, logits_by_hand, atol=1e-5) and np.allclose(probs, probs_by_hand, atol=1e-6)
            expected = np.argsort(-(probs_by_hand + expert_bias), axis=1)[:, :experts_per_token]
            assert np.array_equal(np.sort(chosen, 1), np.sort(expected, 1))
            unbiased = np.argsort(-probs_by_hand, axis=1)[:, :experts_per_token]
            assert not np.array_equal(np.sort(chosen, 1), np.sort(unbiased, 1))  # the bias changed some choices
            chosen_probs = np.take_along_axis(probs_by_hand, chosen, 1)
            if normalize_top_k:
                assert np.allclose(weights.sum(1), 1, atol=1e-6)
                assert np.allclose(weights, numpy_softmax(np.take_along_axis(logits_by_hand, chosen, 1)), atol=1e-6)
            else:
                assert np.allclose(weights, chosen_probs, atol=1e-6)


def test_moe_balance_stats():
    """balance_stats against numpy on random logits: load = assignments per expert, aux = num_experts * sum_i f_i
    P_i, z = mean logsumexp(logits)^2. Routing by a zero router (uniform probabilities) gives aux exactly 1; a
    router that sends every token to expert 0 with probability near 1 (experts_per_token 1) gives aux near
    num_experts = 4."""
    rng = np.random.default_rng(8)
    logits = (rng.normal(0, 2, (32, 4)) + [1, 0, 0, -1]).astype(np.float32)
    probs = numpy_softmax(logits.astype(np.float64))
    chosen = np.argsort(-probs, axis=1)[:, :2]
    load = np.bincount(chosen.reshape(-1), minlength=4)
    aux_loss = 4 * np.sum(load / 64 * probs.mean(0))
    z_loss = np.mean(np.log(np.exp(logits.astype(np.float64)).sum(1)) ** 2)
    arrays = logits, np.float32(probs), chosen
    torch_stats = moe_torch.balance_stats(*(torch.from_numpy(a) for a in arrays), 4)
    jax_stats = moe_jax.balance_stats(*(jnp.asarray(a) for a in arrays), 4)
    for stats in (torch_stats, jax_stats):
        assert np.array_equal(np.asarray(stats[0]), load)
        assert abs(float(stats[1]) - aux_loss) < 1e-5 and abs(float(stats[2]) - z_loss) < 1e-4, (stats, aux_loss)
    assert aux_loss > 1.05  # random logits: not the uniform value
    x = rng.standard_normal((32, 32)).astype(np.float32)
    x[:, 0] = 1
    for experts_per_token, router, expected in ((2, 0, 1.0), (1, 30, 4.0)):
        torch_layer, jax_layer = build_moe_layer_pair(experts_per_token=experts_per_token)
        weight = np.zeros((4, 32), np.float32)
        weight[0, 0] = router  # expert 0's logit 30 for every token, the others 0: p_0 = 1 - 3e-13
        with torch.no_grad():
            torch_layer.router.weight.copy_(torch.from_numpy(weight))
        jax_layer.router.kernel[...] = jnp.asarray(weight.T)
        for module, route in zip((moe_torch, moe_jax), route_both(torch_layer, jax_layer, x, np.zeros(4))):
            as_array = torch.from_numpy if module is moe_torch else jnp.asarray
            load, aux_loss, _ = module.balance_stats(*(as_array(a) for a in route[:3]), 4)
            assert abs(float(aux_loss) - expected) < 1e-5, (module.__name__, float(aux_loss), expected)
            assert experts_per_token == 2 or np.array_equal(np.asarray(load), [32, 0, 0, 0])


def test_moe_layer_equals_a_formula_by_hand():
    """The SparseMoE layer's output, in both frameworks, equals: with one expert chosen out of one and no shared
    expert, a plain SwiGLU of its weights; with shared experts, the routed experts' weighted sum plus
    sigmoid(x @ shared_gate) * SwiGLU_shared(x); every case against numpy_moe_layer, written token by token."""
    x = np.random.default_rng(9).standard_normal((32, 32))
    for overrides in (dict(num_experts=1, experts_per_token=1), dict(num_shared_experts=1, experts_per_token=3),
                      dict(num_shared_experts=2, normalize_top_k=False)):
        torch_layer, jax_layer = build_moe_layer_pair(**overrides)
        expected = numpy_moe_layer(torch_layer, x, np.zeros(overrides.get("num_experts", 4)))
        if overrides.get("num_experts") == 1:  # the plain feed-forward network, no routing at all
            experts = torch_layer.experts
            gate, up, down = (p.detach().double().numpy()[0] for p in (experts.gate, experts.up, experts.down))
            assert np.allclose(expected, numpy_swiglu(x, gate, up, down), atol=1e-9)
        assert np.abs(expected).max() > 0.5
        for out in moe_layer_outputs(torch_layer, jax_layer, x, np.zeros(overrides.get("num_experts", 4))):
            assert np.abs(out - expected).max() < 1e-4, overrides


def test_moe_bias_balancing_evens_the_load():
    """DeepSeek-V3's balancing: a router made to prefer expert 0 (4 experts, 1 per token: over 2x its uniform share
    at first, another expert under 0.5x); 300 bias updates on a fixed batch of tokens (route, balance_stats,
    bias_update) bring every expert's load between 0.5x and 2x of uniform, the same in both frameworks. The
    weights of the chosen experts (normalize_top_k=false) stay the router's probabilities, with no bias in them."""
    overrides = dict(experts_per_token=1, normalize_top_k=False)
    torch_layer, jax_layer = build_moe_layer_pair(**overrides)
    rng = np.random.default_rng(10)
    weight = rng.normal(0, 0.1, (4, 32)).astype(np.float32)
    weight[0] += 0.1  # x has a positive mean, so expert 0's logit is larger for most tokens
    with torch.no_grad():
        torch_layer.router.weight.copy_(torch.from_numpy(weight))
    jax_layer.router.kernel[...] = jnp.asarray(weight.T)
    x = (rng.standard_normal((256, 32)) + 0.3).astype(np.float32)  # uniform load: 256 / 4 = 64 per expert
    torch_config, jax_config = moe_config(moe_torch, **overrides), moe_config(moe_jax, **overrides)

    @jax.jit
    def jax_update(bias):  # the routing with this bias, and the bias after one update
        logits, probs, chosen, weights = jax_layer.route(jnp.asarray(x), bias)
        return bias + moe_jax.bias_update(moe_jax.balance_stats(logits, probs, chosen, 4)[0], jax_config), \
            (probs, chosen, weights)

    bias, jax_bias = torch.zeros(4), jnp.zeros(4)
    with torch.no_grad():
        for i in range(300):
            logits, probs, chosen, _ = torch_layer.route(torch.from_numpy(x), bias)
            load = moe_torch.balance_stats(logits, probs, chosen, 4)[0]
            if i == 0:
                assert load.max() > 2 * 64 and load.min() < 0.5 * 64, load
            bias = bias + moe_torch.bias_update(load, torch_config)
            jax_bias, _ = jax_update(jax_bias)
        _, probs, chosen, weights = torch_layer.route(torch.from_numpy(x), bias)
    assert np.allclose(bias.numpy(), np.asarray(jax_bias), atol=1e-5)
    _, jax_route = jax_update(jax_bias)
    for probs, chosen, weights in ((probs.numpy(), chosen.numpy(), weights.numpy()), map(np.asarray, jax_route)):
        load = np.bincount(chosen.reshape(-1), minlength=4)
        assert 0.5 * 64 <= load.min() and load.max() <= 2 * 64, load
        assert np.allclose(weights, np.take_along_axis(probs, chosen, 1), atol=1e-7)
    assert bias[0] < -0.05  # the busy expert's bias went down


def test_moe_kv_cache_and_generate_match_full_forward():
    """Prefill a prompt into the cache, then (torch) a chunk of 4 tokens, then one token at a time: each step's
    logits equal those of one full forward pass over the same tokens (routing, per token, is the same either way),
    past seq_len into max_len with YaRN factor 2. Greedy sampling (top_k=1) picks the same tokens with the cache as by
    rerunning the whole context, as a slow reference built from full forward passes does, past max_len (where the
    cached path keeps the last half of the context)."""
    bias = np.random.default_rng(11).normal(0, 0.05, (1, 4))
    torch_model, jax_model = build_moe_pair(dict(rope_scaling=2.0, num_kv_heads=1, qk_norm=True, num_layers=1,
                                                 num_shared_experts=1), expert_bias=bias)
    length, prompt = torch_model.max_len, 5
    tokens = np.random.default_rng(3).integers(0, 61, size=(2, length))
    # jax: the prompt with the chunk, then one token at a time (as its generate does)
    torch_steps, jax_steps, _, _ = decode_in_chunks(torch_model, jax_model, tokens, prompt, jax_chunk=False)
    full = torch_logits(torch_model, tokens)  # (2, length, vocab_size)
    assert np.abs(torch_steps - full).max() < 1e-5
    assert np.abs(jax_steps - full).max() < 1e-5  # the same weights in both frameworks
    # a prompt of max_len / 2 tokens: the prefill has the shape of the later ones, and jax compiles it once
    reference, start = list(tokens[0, : length // 2]), 0  # start: where the cached context begins
    for _ in range(2 * length):
        if len(reference) - start > length:  # the cache is full: keep the last half
            start = len(reference) - length // 2
        reference.append(int(torch_logits(torch_model, [reference[start:]])[0, -1].argmax()))
    for generate in (lambda *args, **kw: moe_torch.generate(torch_model, reference[: length // 2], *args, 1.0, 1, **kw),
                     lambda *args, **kw: moe_jax.generate(jax_model, reference[: length // 2], *args, 1.0, 1,
                                                          jax.random.key(0), **kw)):
        assert generate(length // 2, use_cache=False) == reference[:length]
        assert generate(2 * length, use_cache=True) == reference
    assert len(set(reference[length // 2 :])) > 3  # not one token over and over


def test_moe_parameter_count_and_init():
    """Total and active-per-token parameters by hand (moe_parameters) against both frameworks' models; the
    experts' init: gate and up N(0, 0.02), down N(0, 0.02 / sqrt(2 * num_layers)), as Llama's SwiGLU."""
    # by hand, the tiny default: attention 2*32*32 + 2*32*16 = 3072, norms 64, router 128, experts 4*3*32*16 = 6144;
    # 2 blocks of 9408, embedding and head 2*61*32 = 3904, final norm 32: 22752; a token skips 2 experts per block
    assert moe_parameters(61, 32, 16, 2, 4, 2, 16) == (22752, 22752 - 2 * 2 * 3 * 32 * 16)
    for overrides, kv_dim in ((dict(), 16), (dict(num_shared_experts=2, tie_embeddings=True, experts_per_token=1,
                                                  num_kv_heads=1), 8)):
        torch_model, jax_model = build_moe_pair(overrides)
        config = moe_config(moe_torch, **overrides)
        total, active = moe_parameters(61, 32, kv_dim, 2, 4, config.experts_per_token, 16, config.num_shared_experts,
                                       config.tie_embeddings)
        assert sum(p.numel() for p in torch_model.parameters()) == total, overrides
        assert sum(p.size for p in jax.tree.leaves(nnx.state(jax_model, nnx.Param))) == total, overrides
        experts = sum(p.numel() for block in torch_model.blocks for p in block.moe.experts.parameters())
        assert total - experts * (4 - config.experts_per_token) // 4 == active
    torch.manual_seed(0)  # 8 layers: down's std is 0.02 / 4; 2048 weights a tensor: the std within 1.6% (1 sigma)
    jax_deep = moe_jax.MoE(moe_config(moe_jax, num_layers=8), nnx.Rngs(0))
    for experts in (moe_torch.MoE(moe_config(moe_torch, num_layers=8)).blocks[3].moe.experts,
                    jax_deep.blocks[3].moe.experts):
        std = lambda weight: float(np.asarray(weight.detach() if isinstance(weight, torch.Tensor)
                                              else weight[...]).std())
        assert abs(std(experts.gate) - 0.02) < 0.001 and abs(std(experts.up) - 0.02) < 0.001
        assert abs(std(experts.down) - 0.02 / 4) < 0.0003


# ---- the scripts as a user runs them ----------------------------------------------------------------------------

def test_moe_smoke_runs():
    """As assert_smoke_runs, at MOE_RUN's sizes (compiled already) with a higher learning rate (the loss still falls
    by 2.6 in 40 steps), and: the parameter line (by hand), aux and z in every log line, the eval line's load with
    one min-max pair per layer (min <= 1 <= max: multiples of the uniform share); so also with 2 layers (torch, in
    this process)."""
    results = assert_smoke_runs(("moe_torch.py", "moe_jax.py"), *MOE_RUN_ARGS, "--learning_rate=6e-3",
                                eval_suffix=r" \| load [0-9.]+x-[0-9.]+x")
    total, active = moe_parameters(256, 32, 16, 1, 8, 2, 176)  # model_dim 32: 4 heads of 8, 2 kv heads
    for result in results:
        assert f"\nmodel: {total:,} parameters, {active:,} active per token\n" in result.stdout
        balance = re.findall(r"^step +\d+/40 \| loss [0-9.]+ \| aux ([0-9.]+) \| z ([0-9.]+) \| lr ", result.stdout,
                             re.M)
        assert len(balance) == 8 and all(0.9 < float(aux) < 8 and float(z) > 0 for aux, z in balance), balance
        low, high = re.search(r"\| load ([0-9.]+)x-([0-9.]+)x$", result.stdout, re.M).groups()
        assert float(low) <= 1 <= float(high), (low, high)
    with tempfile.TemporaryDirectory() as tmp:
        out = run_main(moe_torch, [f"--data={write_tiny_corpus(tmp)}", f"--out_dir={tmp}/out", *MOE_RUN_ARGS,
                                   "--num_layers=2", "--steps=1", "--warmup_steps=0", "--sample_tokens=0"])
    total, active = moe_parameters(256, 32, 16, 2, 8, 2, 176)
    assert f"\nmodel: {total:,} parameters, {active:,} active per token\n" in out
    assert re.search(r"^eval step +1 \| .* \| load [0-9.]+x-[0-9.]+x [0-9.]+x-[0-9.]+x$", out, re.M), out


def test_moe_cli_errors():
    """A user's mistake: exit status 2 and exactly one line on stderr that names it; nothing is trained."""
    cases = [  # (arguments, a word the message must contain)
        (["--experts_per_token=0"], "experts_per_token"),
        (["--experts_per_token=9"], "num_experts=8"),  # more than there are
        (["--num_experts=0"], "num_experts"),
        (["--num_shared_experts=-1"], "num_shared_experts"),
        (["--expert_ffn_dim=0"], "expert_ffn_dim"),
        (["--balance=bogus"], "--balance=bogus"),
        (["--aux_loss_weight=-1"], "aux_loss_weight"),
        (["--z_loss_weight=-0.1"], "z_loss_weight"),
        (["--bias_update_rate=-1e-3"], "bias_update_rate"),
        (["--normalize_top_k=maybe"], "--normalize_top_k"),
        (["--num_experts=60", "--expert_ffn_dim=100000000"], "memory"),
        (["--num_experts=65"], "more than 64"),  # jax would unroll a loop over ~190 blocks per layer
        (["--ffn_dim=96"], "--ffn_dim"),  # the experts have expert_ffn_dim
        (["--num_kv_heads=3"], "num_kv_heads"),  # the llama family's mistakes
        (["--model_dim=30", "--num_heads=4"], "num_heads"),
        (["--model_dim=12", "--num_heads=4", "--num_kv_heads=4"], "even"),
        (["--rope_scaling=0.5"], "rope_scaling"),
        (["--yarn_alpha=40"], "yarn_beta"),
        (["--qk_norm=maybe"], "--qk_norm"),
        (["--dropout=0.1"], "--dropout"),
    ]
    assert_cli_refuses((moe_torch, moe_jax), cases,
                       [("moe_torch.py", ["--experts_per_token=0"]), ("moe_jax.py", ["--balance=bogus"])])


def keep_checkpoint_at(module, step, path):
    """Make module.save_checkpoint also copy the checkpoint it saves at the given step to path; returns a function
    that undoes it."""
    original = module.save_checkpoint
    def save_checkpoint(*args):  # (..., step, data_rng, config) in both frameworks
        saved = original(*args)
        if args[-3] == step:
            os.makedirs(os.path.dirname(path))
            shutil.copy(saved, path)
        return saved
    module.save_checkpoint = save_checkpoint
    return lambda: setattr(module, "save_checkpoint", original)


def test_moe_resume_equals_uninterrupted():
    """A 5-step run that evaluates and saves at step 3 and at the end; a run resumed from its step-3 checkpoint:
    the log lines (loss, aux, z) of steps 4 and 5, the eval line (with the load) and every saved array, the expert
    biases included, equal the uninterrupted run's; both balance modes (with bias the saved biases moved, with
    aux_loss they are still 0). Resuming with other MoE options is refused; with another --balance it is not
    (the biases are saved either way)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_corpus(tmp)
        common = [f"--data={data}", *MOE_RUN_ARGS, "--warmup_steps=2", "--learning_rate=1e-3",
                  "--min_learning_rate=1e-3", "--log_interval=1", "--eval_interval=3", "--eval_steps=1",
                  "--sample_tokens=0"]
        for module in (moe_torch, moe_jax):
            for balance in ("aux_loss", "bias"):
                args, run = common + [f"--balance={balance}"], f"{tmp}/{module.__name__}_{balance}"
                undo = keep_checkpoint_at(module, 3, f"{run}/part/{module.CHECKPOINT}")
                try:
                    whole = run_main(module, args + [f"--out_dir={run}/whole", "--steps=5"])
                finally:
                    undo()
                resumed = run_main(module, args + [f"--out_dir={run}/part", "--steps=5", "--resume=true"])
                assert "resuming from step 3" in resumed
                tail = lambda out: [line.split(" | ")[:4] for line in out.splitlines()
                                    if re.match(r"step +[45]/", line)]
                assert len(tail(whole)) == 2 and tail(whole) == tail(resumed), (module.__name__, balance)
                evals = [re.findall("^eval step +5 .*", out, re.M) for out in (whole, resumed)]
                assert len(evals[0]) == 1 and evals[0] == evals[1]
                arrays = assert_same_checkpoints(*(f"{run}/{name}/{module.CHECKPOINT}" for name in ("whole", "part")))
                bias = arrays["model.expert_bias" if module is moe_torch else "expert_bias/expert_bias"]
                assert bias.shape == (1, 8), bias.shape
                assert np.any(bias != 0) if balance == "bias" else np.all(bias == 0), (module.__name__, balance, bias)
            part = [f"--out_dir={run}/part", "--steps=9", "--resume=true"]
            for option, word in (("--num_experts=4", "num_experts=8, not 4"),
                                 ("--experts_per_token=1", "experts_per_token=2, not 1"),
                                 ("--num_shared_experts=1", "num_shared_experts=0, not 1"),
                                 ("--expert_ffn_dim=8", "expert_ffn_dim=176, not 8"),
                                 ("--normalize_top_k=false", "normalize_top_k=True, not False")):
                assert_refused(module, args + part + [option], word, run)
        part = [f"--out_dir={tmp}/moe_torch_bias/part", "--steps=9", "--resume=true"]
        assert "resuming from step 5" in run_main(moe_torch, common + part + ["--balance=aux_loss"])


# -----------------------------------------------------------------------------
# Mamba: mamba_torch.py and mamba_jax.py


# ---- Mamba helpers ----------------------------------------------------------------------------------------------

def mamba_config(module, **overrides):
    fields = dict(vocab_size=61, seq_len=16, num_layers=2, model_dim=32, state_dim=8)  # inner_dim 64, dt_rank 2
    fields.update(overrides)
    return module.Config(**fields)


def build_mamba_pair(config_overrides, seed=0):
    return build_twins(mamba_torch.Mamba, mamba_jax.Mamba, mamba_config(mamba_torch, **config_overrides),
                       mamba_config(mamba_jax, **config_overrides), seed)


def scan_inputs(rng, batch_size, seq_len, inner_dim, state_dim, dt_range):
    """decay = exp(dt * A) and inputs = dt * x * B as the model forms them, with A = -(1 .. state_dim) (the init),
    dt log-uniform in dt_range, x and B standard normal: (batch_size, seq_len, inner_dim, state_dim) each."""
    dt = np.exp(rng.uniform(*np.log(dt_range), size=(batch_size, seq_len, inner_dim, 1)))
    A = -np.arange(1, state_dim + 1)
    x = rng.standard_normal((batch_size, seq_len, inner_dim, 1))
    B = rng.standard_normal((batch_size, seq_len, 1, state_dim))
    return np.exp(dt * A).astype(np.float32), (dt * x * B).astype(np.float32)


_MAMBA_PAIR = {}  # the default pair, built once: several tests read it and none changes it


def mamba_pair():
    if "pair" not in _MAMBA_PAIR:
        _MAMBA_PAIR["pair"] = build_mamba_pair({})
    return _MAMBA_PAIR["pair"]


# The sizes of the skeleton's TINY runs (vocab_size 256: a text corpus), used by the training test, the smoke run and
# the resume test too: what jax compiles for one of them (the train and eval steps), the others load from the
# compilation cache. TOKENS: the shape every in-process forward pass of mamba_pair uses (jax compiles per shape).
MAMBA_RUN = dict(vocab_size=256, seq_len=16, model_dim=32, num_layers=1, batch_size=4, state_dim=16)
MAMBA_RUN_ARGS = [f"--{name}={value}" for name, value in MAMBA_RUN.items() if name != "vocab_size"]
MAMBA_TOKENS = (2, 40)


# ---- model ------------------------------------------------------------------------------------------------------

def test_mamba_shapes_initial_loss_and_causality():
    """Fresh models give (batch, length, vocab) logits and a loss near ln 61 (N(0, 0.02) tied embedding: near-uniform
    predictions); changing the tokens after position 9 leaves the logits at positions <= 9 unchanged and changes
    every later one, in both frameworks (the recurrence and the conv only look back)."""
    torch_model, jax_model = mamba_pair()  # first: its jax operations, compiled, serve the fresh model too
    tokens, targets, changed = np.random.default_rng(0).integers(0, 61, size=(3, *MAMBA_TOKENS))
    torch.manual_seed(0)
    with torch.no_grad():
        fresh = mamba_torch.Mamba(mamba_config(mamba_torch))
        logits, loss, _ = fresh(torch.from_numpy(tokens), torch.from_numpy(targets))
    assert tuple(logits.shape) == (*MAMBA_TOKENS, 61) and abs(loss.item() - math.log(61)) < 0.1
    logits, loss, _ = jax_forward(mamba_jax.Mamba(mamba_config(mamba_jax), nnx.Rngs(1)), tokens, targets)
    assert logits.shape == (*MAMBA_TOKENS, 61) and abs(float(loss) - math.log(61)) < 0.1
    changed[:, :10] = tokens[:, :10]
    a, b = (torch_logits(torch_model, t) for t in (tokens, changed))
    c, d = (np.asarray(jax_forward(jax_model, t, t)[0]) for t in (tokens, changed))
    for before, after in ((a, b), (c, d)):
        assert np.abs(before[:, :10] - after[:, :10]).max() < 1e-5
        assert np.abs(before[:, 10:] - after[:, 10:]).max(axis=-1).min() > 1e-3  # every later position sees it


def set_scan(model, scan):
    for block in model.blocks:
        block.mixer.scan = scan


def test_mamba_torch_jax_parity():
    """The same weights give the same logits and loss in both frameworks (1e-4), over 40 tokens (past seq_len 16):
    the default model with each scan, and other shapes (dt_rank 5, conv_width 1, expand 1, state_dim 1)."""
    tokens = np.random.default_rng(2).integers(0, 61, size=MAMBA_TOKENS)
    x, y = tokens, np.roll(tokens, -1, axis=1)
    for overrides in ({}, {"scan": "sequential"}, dict(dt_rank=5, conv_width=1, expand=1, state_dim=1, num_layers=1)):
        torch_model, jax_model = build_mamba_pair(overrides) if "dt_rank" in overrides else mamba_pair()
        for model in (torch_model, jax_model):
            set_scan(model, overrides.get("scan", "parallel"))
        try:
            with torch.no_grad():
                logits, loss, _ = torch_model(torch.from_numpy(x), torch.from_numpy(y))
            jax_logits, jax_loss, _ = jax_forward(jax_model, x, y)
        finally:
            for model in (torch_model, jax_model):
                set_scan(model, "parallel")
        assert np.abs(logits.numpy() - np.asarray(jax_logits)).max() < 1e-4, overrides
        assert abs(loss.item() - float(jax_loss)) < 1e-4, overrides
        assert np.abs(logits.numpy()).max() > 0.1  # the comparison is not between two near-zero outputs


def numpy_mamba_logits(torch_model, tokens):
    """The reference's forward pass (state-spaces/mamba's Mamba module and selective_scan_ref; Hugging Face's
    MambaMixer.slow_forward), written again here in float64 numpy with loops over time, from the torch model's
    weights: the conv as a sum over the last conv_width inputs, the SSM as the plain recurrence."""
    weights = {name: p.detach().double().numpy() for name, p in torch_model.named_parameters()}
    rms_norm = lambda x, weight: x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * weight
    silu = lambda x: x / (1 + np.exp(-x))
    x = weights["token_embedding.weight"][tokens]  # (batch, length, model_dim)
    batch, length = tokens.shape
    for layer in range(len(torch_model.blocks)):
        w = lambda name: weights[f"blocks.{layer}.{name}"]
        signal_and_gate = rms_norm(x, w("norm.weight")) @ w("mixer.in_proj.weight").T
        inner = signal_and_gate.shape[-1] // 2
        u, z = signal_and_gate[..., :inner], signal_and_gate[..., inner:]
        kernel = w("mixer.conv1d.weight")[:, 0]  # (inner, conv_width)
        width = kernel.shape[1]
        padded = np.concatenate([np.zeros((batch, width - 1, inner)), u], axis=1)
        u = silu(np.stack([(padded[:, t : t + width] * kernel.T).sum(1) for t in range(length)], 1)
                 + w("mixer.conv1d.bias"))
        rank, state = w("mixer.dt_proj.weight").shape[1], w("mixer.A_log").shape[1]
        projected = u @ w("mixer.x_proj.weight").T  # [dt, B, C]
        delta = np.log1p(np.exp(projected[..., :rank] @ w("mixer.dt_proj.weight").T + w("mixer.dt_proj.bias")))
        B, C = projected[..., rank : rank + state], projected[..., rank + state :]
        A = -np.exp(w("mixer.A_log"))
        h, y = np.zeros((batch, inner, state)), np.zeros((batch, length, inner))
        for t in range(length):
            h = np.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
            y[:, t] = (h * C[:, t, None, :]).sum(-1) + w("mixer.D") * u[:, t]
        x = x + (y * silu(z)) @ w("mixer.out_proj.weight").T
    return rms_norm(x, weights["final_norm.weight"]) @ weights["token_embedding.weight"].T


def test_mamba_equals_a_numpy_reference():
    """The torch model's logits equal numpy_mamba_logits, the reference's computation written again (1e-5); the jax
    twin equals torch (test_mamba_torch_jax_parity). The norm weights, D and the biases are off their init values
    (build_twins), so each one is seen."""
    torch_model, _ = mamba_pair()
    tokens = np.random.default_rng(6).integers(0, 61, size=MAMBA_TOKENS)
    reference = numpy_mamba_logits(torch_model, tokens)
    assert np.abs(torch_logits(torch_model, tokens) - reference).max() < 1e-5
    assert np.abs(reference).max() > 0.1


def test_mamba_parallel_scan_equals_sequential_scan():
    """parallel_scan equals the plain loop (1e-5 of the largest state) in both frameworks: dt over the init range
    [1e-3, 0.1] (decays near 1: long memory) at odd and even lengths; and 1000 positions with larger dt, where the
    products of decays underflow to 0 in float32. torch's hand-written gradient (ParallelScan) equals autograd's
    through the loop; jax's gradients of the two scans agree too."""
    rng = np.random.default_rng(5)
    cases = [scan_inputs(rng, 2, length, 3, 4, (1e-3, 0.1)) for length in (1, 7, 64)]
    long_decay, long_inputs = scan_inputs(rng, 1, 1000, 2, 4, (0.01, 1.0))
    assert np.prod(long_decay[0, :, 0, 0]) == 0 and np.all(long_decay > 0)  # the product underflows, no factor is 0
    cases.append((long_decay, long_inputs))
    scans = (mamba_jax.parallel_scan, mamba_jax.sequential_scan)
    gradients = lambda d, i, w: [jax.grad(lambda d, i: (scan(d, i) * w).sum(), (0, 1))(d, i) for scan in scans]
    jax_scans = jax.jit(lambda d, i, w: ([scan(d, i) for scan in scans], gradients(d, i, w)))  # one compile a shape
    for decay, inputs in cases:
        torch_decay, torch_inputs = (torch.tensor(a, requires_grad=True) for a in (decay, inputs))
        sequential = mamba_torch.sequential_scan(torch_decay, torch_inputs)
        scale = float(sequential.detach().abs().max())
        parallel = mamba_torch.ParallelScan.apply(torch_decay, torch_inputs)
        assert (parallel - sequential).abs().max() <= 1e-5 * scale, decay.shape
        weights = rng.standard_normal(decay.shape).astype(np.float32)  # a loss that weighs every state
        (jax_parallel, jax_sequential), jax_grads = jax_scans(decay, inputs, weights)
        assert np.abs(jax_parallel - sequential.detach().numpy()).max() <= 1e-5 * scale, decay.shape
        assert np.abs(jax_sequential - sequential.detach().numpy()).max() <= 1e-5 * scale, decay.shape
        grads = [torch.autograd.grad((scan * torch.from_numpy(weights)).sum(), (torch_decay, torch_inputs),
                                     retain_graph=True) for scan in (parallel, sequential)]
        for ours, reference in zip(*grads):
            assert (ours - reference).abs().max() <= 1e-5 * float(reference.abs().max()), decay.shape
        for ours, reference in zip(*jax_grads):
            assert np.abs(ours - reference).max() <= 1e-5 * float(np.abs(reference).max()), decay.shape


def test_mamba_causal_conv():
    """CausalConv equals the reference's form, nn.Conv1d(groups=inner_dim, padding=conv_width - 1) cropped to the
    sequence (torch's own convolution), in both frameworks; an output never changes with a later input; and fed in
    pieces with the carried inputs it gives the same outputs as over the whole sequence."""
    torch.manual_seed(0)
    conv = mamba_torch.CausalConv(6, 4)
    x = torch.randn(2, 12, 6)
    zeros = torch.zeros(2, 3, 6)
    with torch.no_grad():
        out, carried = conv(x, zeros)
        reference = torch.nn.functional.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=3, groups=6)
        reference = reference[..., :12].transpose(1, 2)  # (2, 12, 6): the first 12 of 15 outputs, as the reference
        assert (out - reference).abs().max() < 1e-6 and torch.equal(carried, x[:, -3:])
        later = x.clone()
        later[:, 7:] += 1.0
        changed, _ = conv(later, zeros)
        assert torch.equal(changed[:, :7], out[:, :7]) and (changed[:, 7:] - out[:, 7:]).abs().min() > 0
        first, inputs_before = conv(x[:, :5], zeros)  # in pieces: 5 positions, then 1, then 6
        second, inputs_before = conv(x[:, 5:6], inputs_before)
        third, _ = conv(x[:, 6:], inputs_before)
        assert (torch.cat([first, second, third], dim=1) - out).abs().max() < 1e-6
    jax_conv = mamba_jax.CausalConv(6, 4, nnx.Rngs(0))
    jax_conv.weight[...], jax_conv.bias[...] = jnp.asarray(conv.weight.detach()), jnp.asarray(conv.bias.detach())
    jax_out, jax_carried = jax_conv(jnp.asarray(x), jnp.zeros((2, 3, 6)))
    assert np.abs(np.asarray(jax_out) - out.numpy()).max() < 1e-6 and np.array_equal(jax_carried, x[:, -3:].numpy())


def test_mamba_recurrent_step_matches_forward():
    """Prefill 5 tokens with the parallel forward pass, then step one token at a time to 40 (past seq_len 16): each
    step's logits equal one forward pass over the whole sequence (1e-5), in both frameworks, and the states keep
    their size (state_bytes per sequence) however many tokens went in. Greedy sampling (top_k=1) picks the same
    tokens recurrently as by rerunning the whole text, and as a reference built from full forward passes."""
    torch_model, jax_model = mamba_pair()
    tokens = np.random.default_rng(3).integers(0, 61, size=MAMBA_TOKENS)
    full = torch_logits(torch_model, tokens)
    assert np.abs(np.asarray(jax_forward(jax_model, tokens, tokens)[0]) - full).max() < 1e-4
    graphdef, state = nnx.split(jax_model)
    jax_step = jax.jit(lambda state, token, states: nnx.merge(graphdef, state).step(token, states))
    size = lambda states: sum(int(np.prod(a.shape)) * 4 for layer in states for a in layer)
    expected = 2 * mamba_torch.state_bytes(mamba_config(mamba_torch))  # 2 sequences
    assert expected == 2 * 4 * 2 * 64 * (3 + 8)  # by hand: 2 layers, 64 channels of 3 conv inputs and 8 states
    with torch.no_grad():
        for model, step in ((torch_model, lambda t, s: torch_model.step(torch.from_numpy(t), s)),
                            (jax_model, lambda t, s: jax_step(state, jnp.asarray(t), s))):
            prompt = tokens[:, :5]
            logits, _, states = (model(torch.from_numpy(prompt)) if model is torch_model else
                                 jax_forward(jax_model, prompt, prompt))
            steps = [np.asarray(logits)]
            assert size(states) == expected
            for position in range(5, 40):
                logits, states = step(tokens[:, position], states)
                steps.append(np.asarray(logits)[:, None])
            assert size(states) == expected
            assert np.abs(np.concatenate(steps, axis=1) - full).max() < 1e-5, model
    prompt, reference = [1, 2, 3, 4], [1, 2, 3, 4]
    for _ in range(14):
        reference.append(int(torch_logits(torch_model, [reference])[0, -1].argmax()))
    torch_generate = lambda n, **kw: mamba_torch.generate(torch_model, prompt, n, 1.0, 1, **kw)
    jax_generate = lambda n, **kw: mamba_jax.generate(jax_model, prompt, n, 1.0, 1, jax.random.key(0), **kw)
    assert torch_generate(14) == jax_generate(14) == torch_generate(14, recurrent=False) == reference
    assert jax_generate(4, recurrent=False) == reference[:8]  # padded windows of 4 and 8 tokens: two compilations
    torch.manual_seed(0)
    assert len(set(mamba_torch.generate(torch_model, prompt, 20, 1.0, 0)[4:])) > 5  # temperature 1: varied draws


def test_mamba_parameter_count_and_init():
    """The parameter count by hand; the reference's init in both frameworks: A_log = log(1 .. state_dim) in every
    channel, D = 1, dt_proj's bias the inverse softplus of a dt log-uniform in [dt_min, dt_max] (softplus of the
    bias lands in the range and spreads over it), dt_proj's weight U(+-dt_rank**-0.5), in_proj U(+-model_dim**-0.5),
    out_proj U(+-inner_dim**-0.5) / sqrt(num_layers), the conv U(+-conv_width**-0.5), the embedding N(0, 0.02)."""
    vocab_size, model_dim, inner_dim, state_dim, dt_rank, conv_width = 61, 32, 64, 8, 2, 4
    per_layer = (2 * model_dim * inner_dim  # in_proj
                 + inner_dim * conv_width + inner_dim  # conv1d
                 + inner_dim * (dt_rank + 2 * state_dim)  # x_proj
                 + dt_rank * inner_dim + inner_dim  # dt_proj
                 + inner_dim * state_dim + inner_dim  # A_log, D
                 + inner_dim * model_dim + model_dim)  # out_proj, the block's RMSNorm
    expected = vocab_size * model_dim + 2 * per_layer + model_dim
    torch_model, jax_model = mamba_pair()
    assert sum(p.numel() for p in torch_model.parameters()) == expected
    assert sum(p.size for p in jax.tree.leaves(nnx.state(jax_model, nnx.Param))) == expected
    # inner_dim 528; dt_rank ceil(264 / 16) = 17; a dt range where softplus is far from the identity
    big = dict(model_dim=264, num_layers=4, dt_min=0.2, dt_max=2.0)
    torch.manual_seed(0)
    for model in (mamba_torch.Mamba(mamba_config(mamba_torch, **big)),
                  mamba_jax.Mamba(mamba_config(mamba_jax, **big), nnx.Rngs(0))):
        array = lambda p: np.asarray(p.detach() if isinstance(p, torch.Tensor) else p[...])
        weight = lambda linear: array(linear.weight) if hasattr(linear, "weight") else array(linear.kernel)
        mixer = model.blocks[2].mixer
        assert mixer.dt_rank == 17 and {block.norm.eps for block in model.blocks} | {model.final_norm.eps} == {1e-5}
        assert np.allclose(array(mixer.A_log), np.log(np.arange(1, 9))[None].repeat(528, 0), atol=1e-6)
        assert np.all(array(mixer.D) == 1)
        dt = np.log1p(np.exp(array(mixer.dt_proj.bias).astype(np.float64)))  # softplus
        assert 0.2 * (1 - 1e-5) <= dt.min() < 0.25 and 1.6 < dt.max() <= 2.0 * (1 + 1e-5), (dt.min(), dt.max())
        assert 0.4 < np.mean(np.log(dt / 0.2) / np.log(2.0 / 0.2)) < 0.6  # log-uniform: centred in log space
        for values, bound in ((weight(mixer.dt_proj), 17**-0.5), (weight(mixer.in_proj), 264**-0.5),
                              (weight(mixer.out_proj), 528**-0.5 / 2), (array(mixer.conv1d.weight), 0.5),
                              (array(mixer.conv1d.bias), 0.5)):
            assert np.abs(values).max() <= bound * (1 + 1e-6), bound  # uniform in +-bound: std bound / sqrt(3)
            assert abs(values.std() - bound / math.sqrt(3)) < 0.1 * bound, bound
        embedding = array(model.token_embedding.weight if hasattr(model.token_embedding, "weight")
                          else model.token_embedding.embedding)
        assert abs(embedding.std() - 0.02) < 0.002


def test_mamba_training_steps_match_across_frameworks():
    """Three AdamW steps from the same weights on the same batches agree (torch's gradient through ParallelScan,
    jax's through associative_scan): losses 1e-4, weights 1e-5; at MAMBA_RUN's sizes and the default optimizer (the
    train step the runs compile). A_log is a matrix but not decayed: from a fresh optimizer and a zero gradient,
    weight decay alone moves in_proj and leaves A_log where it was, in both frameworks."""
    overrides = dict(MAMBA_RUN, steps=3, warmup_steps=2, learning_rate=1e-2, min_learning_rate=1e-3)
    torch_model, jax_model = build_mamba_pair(overrides)
    torch_model.train()
    config = mamba_config(mamba_torch, **overrides)
    torch_optimizer = mamba_torch.make_optimizer(torch_model, config)
    jax_optimizer = mamba_jax.make_optimizer(mamba_config(mamba_jax, **overrides))
    graphdef, state = nnx.split(jax_model)
    params = nnx.to_pure_dict(state)
    params, opt_state = on_mesh(params, jax_optimizer.init(params))
    train_step, _ = mamba_jax.make_steps(graphdef, jax_optimizer, ONE_DEVICE)
    torch_train_step, _ = mamba_torch.make_steps(torch_model, torch_optimizer, config)  # the scripts' own steps
    tokens = np.frombuffer(STORIES_HEAD, np.uint8)
    rng = np.random.default_rng(3)
    for step in range(3):
        x, y = mamba_torch.get_batch(tokens, rng, config)
        loss = torch_train_step(x, y, mamba_torch.learning_rate_at(step, config))
        params, opt_state, jax_loss = train_step(params, opt_state, x.astype(np.int32), y.astype(np.int32),
                                                 mamba_jax.learning_rate_at(step, config))
        assert abs(loss.item() - float(jax_loss)) < 1e-4
    mixer, torch_mixer = params["blocks"][0]["mixer"], torch_model.blocks[0].mixer
    for name in ("A_log", "D"):
        assert np.abs(getattr(torch_mixer, name).detach().numpy() - np.asarray(mixer[name])).max() < 1e-5
    assert np.abs(torch_mixer.x_proj.weight.detach().numpy().T - np.asarray(mixer["x_proj"]["kernel"])).max() < 1e-5
    assert np.abs(torch_mixer.A_log.detach().numpy() - np.log(np.arange(1, 17))).max() > 1e-3  # it did train
    # weight decay alone: a fresh optimizer (no moments yet) and a zero gradient
    torch_optimizer = mamba_torch.make_optimizer(torch_model, config)
    for p in torch_model.parameters():
        p.grad = torch.zeros_like(p)
    before = {name: p.detach().clone() for name, p in torch_model.named_parameters()}
    torch_optimizer.step()
    updates, _ = jax.jit(lambda params: jax_optimizer.update(jax.tree.map(jnp.zeros_like, params),  # one compile
                                                            jax_optimizer.init(params), params))(params)
    after = dict(torch_model.named_parameters())
    for name, jax_update in (("A_log", updates["blocks"][0]["mixer"]["A_log"]),
                             ("in_proj.weight", updates["blocks"][0]["mixer"]["in_proj"]["kernel"])):
        moved = not torch.equal(before[f"blocks.0.mixer.{name}"], after[f"blocks.0.mixer.{name}"])
        assert moved == (name == "in_proj.weight") == bool(np.any(np.asarray(jax_update) != 0)), name


# ---- the scripts as a user runs them ----------------------------------------------------------------------------

def test_mamba_smoke_runs():
    """As assert_smoke_runs at MAMBA_RUN's sizes (compiled already), with a higher learning rate; the line before
    the sample gives the recurrent state's size, by hand."""
    assert_smoke_runs(("mamba_torch.py", "mamba_jax.py"), *MAMBA_RUN_ARGS, "--learning_rate=1e-2",
                      sample_line=r"sample \(recurrent state: 4,864 bytes, the same at any length\):")
    assert 4 * 1 * 64 * (3 + 16) == 4864  # 1 layer of inner_dim 64: conv_width - 1 + state_dim numbers a channel


def test_mamba_cli_errors():
    """A user's mistake: exit status 2 and exactly one line on stderr that names it; nothing is trained."""
    cases = [  # (arguments, a word the message must contain)
        (["--state_dim=0"], "state_dim"),
        (["--conv_width=0"], "conv_width"),
        (["--expand=0"], "expand"),
        (["--dt_rank=-1"], "dt_rank"),
        (["--scan=bogus"], "--scan=bogus"),
        (["--dt_min=0.2"], "dt_min"),  # above dt_max 0.1
        (["--dt_min=0.1"], "dt_min"),  # equal
        (["--dt_min=0"], "dt_min"),
        (["--dt_max=-1"], "dt_max"),
        (["--dt_max=nan"], "finite"),
        (["--dt_max=1e38"], "dt_max"),  # finite, but the weights' norm would overflow
        (["--expand=100000", "--model_dim=100000"], "memory"),
        (["--conv_width=1000000000000"], "conv_width"),
        (["--dt_rank=1000000000000"], "memory"),  # x_proj and dt_proj would not fit
        (["--conv_width=2000000"], "training this model needs"),  # its window of inputs, every sequence and layer
        (["--num_heads=4"], "--num_heads"),  # no attention, no heads
        (["--rope_scaling=2"], "--rope_scaling"),  # no positions
    ]
    assert_cli_refuses((mamba_torch, mamba_jax), cases,
                       [("mamba_torch.py", ["--scan=bogus"]), ("mamba_jax.py", ["--state_dim=0"])])


def test_mamba_resume_equals_uninterrupted():
    """Train 6 steps, save, resume to 12: the losses of steps 7..12 and every saved array equal an uninterrupted
    12-step run; resuming with another state_dim, conv_width, expand or dt_rank is refused, with another scan or
    seq_len it is not (they do not change the weights' meaning) and continues."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_corpus(tmp)
        common = [f"--data={data}", "--seq_len=16", "--num_layers=1", "--model_dim=32", "--batch_size=4",
                  "--warmup_steps=2", "--learning_rate=1e-3", "--min_learning_rate=1e-3", "--log_interval=1",
                  "--eval_interval=100", "--eval_steps=1", "--sample_tokens=0"]
        for module in (mamba_torch, mamba_jax):
            run = f"{tmp}/{module.__name__}"
            part = assert_resume_equals_uninterrupted(module, common, run) + ["--steps=13"]
            for option, word in (("--state_dim=8", "state_dim=16, not 8"), ("--conv_width=2", "conv_width=4, not 2"),
                                 ("--expand=1", "expand=2, not 1"), ("--dt_rank=3", "dt_rank=0, not 3")):
                assert_refused(module, part + [option], word, run)
            assert "resuming from step 12" in run_main(module, part + ["--scan=sequential", "--seq_len=8"])


# -----------------------------------------------------------------------------
# Devices: torchrun's processes, a jax mesh of devices, bfloat16


SPY = """import sys
sys.path.insert(0, {root!r})
import {name} as script
read = script.read_losses
def read_losses(unchecked, config):  # every step's loss at full precision, before the script reads it
    for step, loss in unchecked:
        print("exact loss", step, repr(float(loss)), flush=True)
    return read(unchecked, config)
script.read_losses = read_losses
"""


@contextlib.contextmanager
def spying_on_losses(module):
    """In this process, as SPY does in another: module's main prints each step's loss at full precision."""
    namespace = {}
    exec(SPY.format(root=ROOT, name=module.__name__), namespace)
    try:
        yield
    finally:
        module.read_losses = namespace["read"]


def exact_losses(stdout):
    return {int(step): float(loss) for step, loss in re.findall(r"^exact loss (\d+) (\S+)$", stdout, re.M)}


def assert_close_losses(first, second, rtol=1e-5):
    assert first.keys() == second.keys() and first, (first, second)
    assert all(abs(first[step] - second[step]) <= rtol * abs(first[step]) for step in first), (first, second)


def assert_close_checkpoints(first, second, rtol=1e-4, atol=1e-4):
    """Two torch checkpoints hold the same arrays up to float32 rounding noise (Adam's update divides by the root of
    its second moment, which magnifies the noise of near-zero gradients, such as the key bias's, to ~lr / 10)."""
    a, b = (torch.load(path, weights_only=True) for path in (first, second))
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor) and name != "torch_rng":
            assert torch.allclose(a[name], b[name], rtol=rtol, atol=atol), (name, (a[name] - b[name]).abs().max())


def assert_torchrun_equals_one_process(module, resume_under_torchrun, torchrun=True):
    """torchrun with 2 processes (gloo on the CPU), each training on half of the global batch of 4, computes the
    per-step losses of one process on the whole batch (1e-5 relative); only rank 0 prints. A checkpoint crosses over:
    one process's run of 2 steps resumed under torchrun, or the other way round, ends at step 4 with the losses and
    arrays of one uninterrupted process. torchrun=False starts the 2 processes itself, with the environment torchrun
    gives them (a second faster: torchrun's own start is that of a torch program)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"--data={write_tiny_corpus(tmp)}", *TINY, "--learning_rate=3e-3", "--min_learning_rate=3e-3"]
        with open(f"{tmp}/spy.py", "w") as f:
            f.write(SPY.format(root=ROOT, name=module.__name__) + "script.main(sys.argv[1:])\n")

        def run_two(*more):
            command = [f"{tmp}/spy.py", *args, *more]
            if torchrun:
                result = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", *command], cwd=ROOT,
                                        capture_output=True, text=True, timeout=120,
                                        env=dict(os.environ, OMP_NUM_THREADS="1"))
            else:
                port = str(random.randrange(20000, 60000))
                result, other = run_scripts(*([*command] for _ in range(2)), envs=[
                    dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port) for rank in range(2)])
                assert other.returncode == 0 and other.stdout == "", (other.stdout, other.stderr[-3000:])
            assert result.returncode == 0, result.stderr[-3000:]
            assert result.stdout.count("devices: 2 x cpu (torchrun processes) | float32\n") == 1, result.stdout
            assert len(re.findall(r"^step +\d+/", result.stdout, re.M)) == 2, result.stdout  # rank 0's lines only
            return result.stdout

        with spying_on_losses(module):
            whole = exact_losses(run_main(module, args + [f"--out_dir={tmp}/one", "--steps=4"]))
            if resume_under_torchrun:
                first = run_main(module, args + [f"--out_dir={tmp}/two", "--steps=2"])
                second = run_two(f"--out_dir={tmp}/two", "--steps=4", "--resume=true")
            else:
                first = run_two(f"--out_dir={tmp}/two", "--steps=2")
                second = run_main(module, args + [f"--out_dir={tmp}/two", "--steps=4", "--resume=true"])
        assert "resuming from step 2" in second
        assert_close_losses(whole, exact_losses(first) | exact_losses(second))
        assert_close_checkpoints(f"{tmp}/one/{module.CHECKPOINT}", f"{tmp}/two/{module.CHECKPOINT}")


def test_gpt_torchrun_equals_one_process():
    assert_torchrun_equals_one_process(gpt_torch, resume_under_torchrun=False)
    with tempfile.TemporaryDirectory() as tmp:  # a launch environment that cannot work: refused before any work
        args = [f"--data={write_tiny_corpus(tmp)}", f"--out_dir={tmp}/out", *TINY, "--steps=1"]
        for module, environment, word in [
                (gpt_torch, dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"), "not divisible by the 2 processes"),
                (gpt_torch, dict(WORLD_SIZE="two"), "WORLD_SIZE"), (gpt_torch, dict(WORLD_SIZE="0"), "WORLD_SIZE"),
                (gpt_jax, dict(JAX_COORDINATOR_ADDRESS="nonsense", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0"),
                 "host:port"),
                (gpt_jax, dict(JAX_COORDINATOR_ADDRESS="localhost:1", JAX_NUM_PROCESSES="2"), "JAX_PROCESS_ID")]:
            os.environ.update(environment)
            try:
                assert_refused(module, args + ["--batch_size=3"], word, tmp)
            finally:
                for name in environment:
                    del os.environ[name]


def test_llama_torchrun_equals_one_process():
    assert_torchrun_equals_one_process(llama_torch, resume_under_torchrun=True, torchrun=False)



def assert_bfloat16_close_to_float32(build_pair, **overrides):
    """One forward pass of a tiny model (build_pair's, with overrides) in --dtype=bfloat16's arithmetic: torch under
    autocast, jax with its layers' bfloat16 computation dtype. The logits of both stay within 5% of the float32
    logits' scale, but differ from them (bfloat16 really ran), and the losses come out in float32."""
    torch_model, jax_model = build_pair(dict(overrides, dtype="bfloat16"))  # torch's model ignores dtype: autocast
    tokens = np.random.default_rng(0).integers(0, 61, size=(2, 16))
    x, y = tokens, np.roll(tokens, -1, axis=1)
    with torch.no_grad():
        float32_logits = torch_model(torch.from_numpy(x))[0].numpy()
        with torch.autocast("cpu", torch.bfloat16):
            torch_out = torch_model(torch.from_numpy(x), torch.from_numpy(y))
    jax_out = jax_forward(jax_model, jnp.asarray(x), jnp.asarray(y))
    assert torch_out[1].dtype == torch.float32 and jax_out[1].dtype == jnp.float32
    scale = np.abs(float32_logits).max()
    for logits in (torch_out[0].float().numpy(), np.asarray(jax_out[0], np.float32)):
        difference = np.abs(logits - float32_logits).max()
        assert 1e-4 * scale < difference < 0.05 * scale, (difference, scale)


def test_gpt_bfloat16_forward_close_to_float32():
    assert_bfloat16_close_to_float32(build_pair, position_embedding="alibi")  # ALiBi's bias: a float mask in attention


def test_llama_bfloat16_forward_close_to_float32():
    assert_bfloat16_close_to_float32(build_llama_pair)


def test_moe_bfloat16_forward_close_to_float32():
    """As the other families, and the router stays float32 in bfloat16: its logits equal numpy's float32 product
    (bfloat16 would be off by ~1e-2), in both frameworks."""
    assert_bfloat16_close_to_float32(build_moe_pair, num_shared_experts=1)
    torch_layer, jax_layer = build_moe_layer_pair(dtype="bfloat16")
    x = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)
    expected = x @ torch_layer.router.weight.detach().numpy().T  # (tokens, num_experts)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        torch_logits = torch_layer.route(torch.from_numpy(x), torch.zeros(4))[0]
    jax_logits = jax_layer.route(jnp.asarray(x), jnp.zeros(4))[0]
    assert torch_logits.dtype == torch.float32 and jax_logits.dtype == jnp.float32
    for logits in (torch_logits.numpy(), np.asarray(jax_logits)):
        assert np.abs(logits - expected).max() < 1e-5, np.abs(logits - expected).max()


def test_mamba_bfloat16_forward_close_to_float32():
    assert_bfloat16_close_to_float32(build_mamba_pair)

MESH_RUN = SPY + """import json
import jax
shards = []
shard_batch = script.shard_batch
def spy_on_shards(batch, mesh):  # which rows of the batch each device holds
    array = shard_batch(batch, mesh)
    shards.append(sorted((shard.index[0].start, shard.index[0].stop, shard.device.id)
                         for shard in array.addressable_shards))
    return array
script.shard_batch = spy_on_shards
script.main(sys.argv[1:])
try:
    script.main(sys.argv[1:-1] + ["--batch_size=3", "--out_dir=" + sys.argv[-1][len("--out_dir="):] + "3"])
except SystemExit as exit:
    print(json.dumps({{"devices": jax.device_count(), "shards": shards, "exit": exit.code}}))
"""


def test_gpt_jax_mesh_equals_one_device():
    """Data parallel, jax: with 2 (simulated) CPU devices, every batch the train step and the evaluation get is split
    by rows, half on each device, and the losses equal one device's (1e-5 relative); a batch of 3 is refused."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"--data={write_tiny_corpus(tmp)}", *TINY, "--steps=2", "--eval_steps=2"]
        with open(f"{tmp}/mesh.py", "w") as f:
            f.write(MESH_RUN.format(root=ROOT, name="gpt_jax"))
        flags = os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"
        result = subprocess.run([sys.executable, f"{tmp}/mesh.py", *args, f"--out_dir={tmp}/two"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120, env=dict(os.environ, XLA_FLAGS=flags))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "devices: 2 x cpu (mesh axis data) | float32" in result.stdout, result.stdout
        report = json.loads(result.stdout.splitlines()[-1])
        assert report["devices"] == 2 and report["exit"] == 2 and "not divisible by the 2 devices" in result.stderr
        assert len(report["shards"]) == 2 * (2 + 2 * 2), report  # x and y of 2 steps and of 2 batches per split
        assert all(shards == [[0, 2, 0], [2, 4, 1]] for shards in report["shards"]), report["shards"]
        with spying_on_losses(gpt_jax):
            one = exact_losses(run_main(gpt_jax, args + [f"--out_dir={tmp}/one"]))
        assert_close_losses(one, exact_losses(result.stdout))


def test_gpt_bfloat16_trains_close_to_float32():
    """--dtype=bfloat16 on the CPU, both frameworks: the loss falls as in float32 and ends within 3% of it, but not
    equal to it (the matmuls really ran in bfloat16)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"--data={write_tiny_corpus(tmp)}", *TINY, "--steps=20", "--log_interval=5", "--learning_rate=1e-2"]
        runs = {(module, dtype): run_main(module, args + [f"--out_dir={tmp}/{module}{dtype}", f"--dtype={dtype}"])
                for module, dtype in ((gpt_torch, "float32"), (gpt_torch, "bfloat16"), (gpt_jax, "bfloat16"))}
        float32 = parse_losses(runs[gpt_torch, "float32"])  # jax's float32 losses are torch's: see the tests above
        for module in (gpt_torch, gpt_jax):
            assert "| bfloat16\n" in runs[module, "bfloat16"]
            bfloat16 = parse_losses(runs[module, "bfloat16"])
            assert bfloat16[-1] < bfloat16[0] - 1.0 and bfloat16 != float32, (module.__name__, bfloat16, float32)
            assert abs(bfloat16[-1] - float32[-1]) < 0.03 * float32[-1], (module.__name__, bfloat16, float32)


# -----------------------------------------------------------------------------
# The skeleton: what every model script does with bad files, a diverged run, a busy out_dir and signals


SKELETON = (gpt_torch, gpt_jax, llama_torch, llama_jax, moe_torch, moe_jax, mamba_torch, mamba_jax)
TINY = ["--seq_len=16", "--num_layers=1", "--model_dim=32", "--batch_size=4", "--warmup_steps=0",
        "--min_learning_rate=0", "--eval_steps=1", "--log_interval=1", "--sample_tokens=0"]
_RUNS = {}  # module -> a folder holding data.txt and out/, a checkpoint after 2 steps: made once, copied by tests


def assert_refused(module, args, word, folder, status=2):
    """module.main(args) exits with status and one line on stderr that contains word; no file under folder changed."""
    before = snapshot(folder)
    code, lines = exit_of(module, args)
    assert code == status and len(lines) == 1 and word in lines[0], (module.__name__, args, code, lines)
    assert snapshot(folder) == before, (module.__name__, args, "changed a file")


def tiny_run(module):
    """A copy of a folder with data.txt and out/, where module's run of 2 steps was stopped by SIGTERM during its
    last step: the checkpoint is at step 2, and the message says that training is complete (not "continue")."""
    if module not in _RUNS:
        folder = tempfile.mkdtemp()
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        write_tiny_corpus(folder, "data.txt")
        undo = interrupt_at_step(module, 2, signal.SIGTERM)
        try:
            status, lines = exit_of(module, [f"--data={folder}/data.txt", f"--out_dir={folder}/out", *TINY,
                                             "--steps=2"])
        finally:
            undo()
        checkpoint = f"{folder}/out/{module.CHECKPOINT}"
        assert status == 143 and lines == [f"{module.SCRIPT}: stopped by SIGTERM: saved step 2 to {checkpoint}; "
                                           f"training is complete"], (module.__name__, status, lines)
        _RUNS[module] = folder
    copy = tempfile.mkdtemp()
    shutil.copytree(_RUNS[module], copy, dirs_exist_ok=True)
    return copy


def rewrite_checkpoint(path, edit):
    """Load a checkpoint of either framework as {name: array or meta}, apply edit to it, save it back."""
    if path.endswith(".pt"):
        checkpoint = torch.load(path, weights_only=True)
        edit(checkpoint)
        torch.save(checkpoint, path)
    else:
        checkpoint = dict(np.load(path))
        edit(checkpoint)
        with open(path, "wb") as f:
            np.savez(f, **checkpoint)


def test_skeleton_sigterm_in_the_last_step_leaves_a_finished_run():
    """SIGTERM (as Ctrl-C) during the last step or its evaluation: the step finishes, the checkpoint holds the
    finished run, exit status 143, and the message says so instead of suggesting --resume=true (refused here)."""
    for module in SKELETON:
        folder = tiny_run(module)  # asserts the exit status and the message
        args = [f"--data={folder}/data.txt", f"--out_dir={folder}/out", *TINY, "--steps=2", "--resume=true"]
        assert_refused(module, args, "already at step 2", folder)  # as the message said: nothing left to do
        shutil.rmtree(folder)


def test_skeleton_refuses_malformed_data_files():
    """Token files, their vocabulary and floor files are checked before any work: exit 2, one line naming the
    problem, nothing written."""
    with tempfile.TemporaryDirectory() as tmp:
        ids = np.frombuffer(open(write_tiny_corpus(tmp, "c.txt"), "rb").read(), np.uint8).astype(np.uint16)
        vocab = json.dumps({"token_bytes": [bytes([i]).hex() for i in range(256)]})

        def token_file(name, array=ids, vocab=vocab, floor=None):
            """tmp/name.bpe9.npy (array, or raw bytes), its vocabulary .json (None: absent) and floor (if given)."""
            path = f"{tmp}/{name}.bpe9.npy"
            with open(path, "wb") as f:
                f.write(array) if isinstance(array, bytes) else np.save(f, array)
            for suffix, text in ((".bpe9.json", vocab), (".floor.json", floor)):
                if text is not None:
                    open(f"{tmp}/{name}{suffix}", "w").write(text)
            return path

        cases = [  # (the --data file, a word the message must contain)
            (token_file("pickled", np.array([{"id": 1}], dtype=object)), "not a .npy array"),
            (token_file("garbage", b"\x93NUMPY garbage"), "not a .npy array"),
            (token_file("matrix", ids[:1000].reshape(10, 100)), "1-D integer"),
            (token_file("floats", ids.astype(np.float32)), "1-D integer"),
            (token_file("novocab", vocab=None), "novocab.bpe9.json is not the vocabulary"),
            (token_file("badjson", vocab="{"), "badjson.bpe9.json is not the vocabulary"),
            (token_file("nolist", vocab="{}"), "nolist.bpe9.json is not the vocabulary"),
            (token_file("badhex", vocab='{"token_bytes": ["zz"]}'), "badhex.bpe9.json is not the vocabulary"),
            (token_file("empty", vocab=json.dumps({"token_bytes": ["" if i == ids[0] else bytes([i]).hex()
                                                                  for i in range(256)]})), "no bytes"),
            (token_file("high", np.append(ids, 256)), "outside its vocabulary of 256"),
            (token_file("negative", np.append(ids.astype(np.int32), -1)), "outside its vocabulary"),
            (token_file("floor", floor="{"), "floor.floor.json is not a floor file"),
            (token_file("floorvalue", floor='{"val_bpb": "low"}'), "val_bpb"),
            (token_file("floorbool", floor='{"val_bpb": true}'), "val_bpb"),
            (token_file("floorhuge", floor='{"val_bpb": 1%s}' % ("0" * 400)), "val_bpb"),
        ]
        shutil.copy(f"{tmp}/floor.floor.json", f"{tmp}/c.txt.floor.json")  # a text corpus's floor: malformed too
        cases.append((f"{tmp}/c.txt", "c.txt.floor.json is not a floor file"))
        for module in SKELETON:
            for data, word in cases:
                assert_refused(module, [f"--data={data}", f"--out_dir={tmp}/out", *TINY], word, tmp)
        assert not os.path.exists(f"{tmp}/out")


def edit_meta(change):
    """An edit of a checkpoint file: change(meta) alters its meta, a dict, in place."""
    def edit(checkpoint):
        meta = json.loads(str(checkpoint["meta"]))
        change(meta)
        checkpoint["meta"] = json.dumps(meta)
    return lambda path: rewrite_checkpoint(path, edit)


def test_skeleton_refuses_bad_checkpoints():
    """A checkpoint is checked before it is used: damaged, another family's, another model's, a missing,
    unexpected or reshaped array: exit 2, one line, the checkpoint untouched."""
    first = lambda c: next(name for name in c if name not in ("meta", "torch_rng"))  # a weight
    widen = lambda a: a.double() if isinstance(a, torch.Tensor) else a.astype(np.float64)
    edits = [  # (how the checkpoint file changes, a word the message must contain)
        (lambda path: open(path, "wb").write(b"not a checkpoint"), "is not a checkpoint"),
        (lambda path: open(path, "wb").close(), "is not a checkpoint"),
        (lambda path: open(path, "r+b").truncate(os.path.getsize(path) // 2), "is not a checkpoint"),
        (lambda path: rewrite_checkpoint(path, lambda c: c.update(meta="{")), "damaged"),
        (lambda path: rewrite_checkpoint(path, lambda c: c.pop("meta")), "damaged"),
        (lambda path: rewrite_checkpoint(path, lambda c: c.pop(first(c))), "lacks"),
        (lambda path: rewrite_checkpoint(path, lambda c: c.update(extra=c[first(c)])), "unexpected array extra"),
        (lambda path: rewrite_checkpoint(path, lambda c: c.update({first(c): c[first(c)].reshape(-1)[:1]})),
         "this model's is"),
        (lambda path: rewrite_checkpoint(path, lambda c: c.update({first(c): widen(c[first(c)])})), "this model's is"),
        (lambda path: torch.save(torch.zeros(3), path) if path.endswith(".pt") else np.save(open(path, "wb"), [0]),
         "checkpoint"),
        (edit_meta(lambda meta: meta.update(config=list(meta["config"]))), "damaged"),
        (edit_meta(lambda meta: meta.update(step=-2)), "damaged"),
        (edit_meta(lambda meta: meta["data_rng"]["state"].update(state=-1)), "damaged"),
        (edit_meta(lambda meta: meta["config"].update(num_layers=1.0)), "num_layers=1.0, not 1"),
    ]
    twins = {gpt_torch: [llama_torch], llama_torch: [gpt_torch, moe_torch, mamba_torch], moe_torch: [llama_torch],
             mamba_torch: [llama_torch], gpt_jax: [llama_jax], llama_jax: [gpt_jax, moe_jax, mamba_jax],
             moe_jax: [llama_jax], mamba_jax: [llama_jax]}  # another family's checkpoint
    for module in SKELETON:
        folder = tiny_run(module)
        path = f"{folder}/out/{module.CHECKPOINT}"
        args = [f"--data={folder}/data.txt", f"--out_dir={folder}/out", *TINY]
        good = open(path, "rb").read()
        assert_refused(module, args + ["--steps=9", "--resume=true", "--model_dim=64"], "model_dim=32, not 64", folder)
        assert_refused(module, args + ["--steps=9"], "--resume=true", folder)  # a fresh run never overwrites it
        for twin in twins[module]:
            shutil.copy(f"{tiny_run(twin)}/out/{module.CHECKPOINT}", path)
            assert_refused(module, args + ["--steps=9", "--resume=true"], f"not a {module.SCRIPT} checkpoint", folder)
        for edit, word in edits:
            open(path, "wb").write(good)
            edit(path)
            assert_refused(module, args + ["--steps=9", "--resume=true"], word, folder)
        if path.endswith(".pt"):  # torch's random state: the right shape, a content the generator rejects
            open(path, "wb").write(good)
            rewrite_checkpoint(path, lambda c: c.update(torch_rng=torch.full_like(c["torch_rng"], 255)))
            assert_refused(module, args + ["--steps=9", "--resume=true"], "torch_rng", folder)
        shutil.rmtree(folder)


def test_skeleton_diverged_run_keeps_the_last_good_checkpoint():
    """A learning rate of 1e30 from the checkpoint at step 2: step 3's loss is finite, its update is not. The run
    stops with exit status 1 and one line at whichever check meets the damage first: the next training loss, the
    final evaluation, or the weight norm before a Ctrl-C save. The checkpoint it resumed from is left as it was."""
    for module in SKELETON:
        folder = tiny_run(module)
        args = [f"--data={folder}/data.txt", f"--out_dir={folder}/out", *TINY, "--resume=true", "--learning_rate=1e30"]
        assert_refused(module, args + ["--steps=50"], ": error: loss at step", folder, status=1)  # 4 or 5: nan
        assert_refused(module, args + ["--steps=3"], "at step 3 is", folder, status=1)  # the loss or the weights
        undo = interrupt_at_step(module, 1)
        try:
            assert_refused(module, args + ["--steps=50"], ": error: weight_norm at step 3 is", folder, status=1)
        finally:
            undo()
        shutil.rmtree(folder)


def test_skeleton_out_dir_is_locked_while_a_run_holds_it():
    """A second run on an out_dir in use is refused with one line; once the first run ends, it is free again."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"--data={write_tiny_corpus(tmp)}", f"--out_dir={tmp}/out", *TINY]
        for module in SKELETON:
            with module.locked_out_dir(module.parse_config(args)):  # the first run
                assert_refused(module, args, "in use by another run", tmp)
            with module.locked_out_dir(module.parse_config(args)):
                pass


def test_skeleton_ctrl_c_while_the_libraries_load():
    """The scripts as a user runs them, side by side: Ctrl-C while the libraries load ends quietly, killed by the
    signal (or, if main had begun, with main's one line), and writes nothing. No traceback. (SIGTERM and Ctrl-C
    during training: tests above; Ctrl-C while sampling: each family's smoke test.)"""
    with tempfile.TemporaryDirectory() as tmp:
        data, scripts = write_tiny_corpus(tmp), [f"{module.__name__}.py" for module in SKELETON]
        loading = [subprocess.Popen([sys.executable, script, f"--data={data}", *TINY, f"--out_dir={tmp}/loading"],
                                    cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=dict(os.environ, OMP_NUM_THREADS="1")) for script in scripts]
        time.sleep(1.0)  # past the interpreter's start-up, still importing torch or jax (8 processes share 2 cores)
        for process in loading:
            process.send_signal(signal.SIGINT)
        for process in loading:  # the default action (the shell reports 130), or main's own line if it had begun
            _, stderr = process.communicate(timeout=60)
            assert "Traceback" not in stderr, stderr
            status, lines = process.returncode, stderr.splitlines()
            assert status == -signal.SIGINT or (status == 130 and len(lines) == 1), (status, lines)
        assert not os.path.exists(f"{tmp}/loading")


# -----------------------------------------------------------------------------
# Published weights: each script loads Hugging Face folders (--init_from), checked against fixtures/, tiny random
# models saved by transformers with their logits (tools/make_hf_fixtures.py)


FIXTURES = os.path.join(ROOT, "fixtures")
MODEL_CLASSES = {gpt_torch: gpt_torch.GPT, gpt_jax: gpt_jax.GPT, llama_torch: llama_torch.Llama,
                 llama_jax: llama_jax.Llama, moe_torch: moe_torch.MoE, moe_jax: moe_jax.MoE,
                 mamba_torch: mamba_torch.Mamba, mamba_jax: mamba_jax.Mamba}
FAMILY_FIXTURES = {"gpt": ["gpt2"], "llama": ["llama", "llama3_rope", "llama_yarn", "qwen3"],
                   "moe": ["mixtral", "qwen2_moe"], "mamba": ["mamba"]}


def write_safetensors(path, tensors):
    """A .safetensors file written here from the format's definition, not by the reader under test: the JSON header's
    length (8 bytes, little-endian), the header, then the data. tensors: {name: array}; float32 -> F32, float16 ->
    F16, uint16 -> BF16 (raw bits)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        kind = {"float32": "F32", "float16": "F16", "uint16": "BF16"}[array.dtype.name]
        blob = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": kind, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def fixture_tensors(name):
    """{name: float32 array} of a fixture, read here with json and numpy (shards included)."""
    tensors = {}
    for file in sorted(f for f in os.listdir(os.path.join(FIXTURES, name)) if f.endswith(".safetensors")):
        data = open(os.path.join(FIXTURES, name, file), "rb").read()
        size = int.from_bytes(data[:8], "little")
        for key, entry in json.loads(data[8 : 8 + size]).items():
            if key != "__metadata__":
                begin, end = entry["data_offsets"]
                tensors[key] = np.frombuffer(data[8 + size + begin : 8 + size + end], "<f4").reshape(entry["shape"])
    return tensors


def copy_fixture(name, folder, tensors=None, **config_changes):
    """The fixture's config.json (with config_changes) and its tensors (or the given ones) in one file, in folder."""
    os.makedirs(folder)
    config = json.load(open(os.path.join(FIXTURES, name, "config.json"))) | config_changes
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    write_safetensors(os.path.join(folder, "model.safetensors"), fixture_tensors(name) if tensors is None else tensors)
    return folder


def load_published(module, folder, *args):
    """module's model with folder's weights, as main() builds it; returns (model, config)."""
    seq_len = [] if module.__name__.startswith("gpt") else ["--seq_len=16"]  # gpt's is the checkpoint's position table
    config = module.parse_config([f"--init_from={folder}", f"--data={STORIES}", *seq_len, *args])
    model = MODEL_CLASSES[module](config) if module.__name__.endswith("torch") else MODEL_CLASSES[module](
        config, nnx.Rngs(0))
    module.load_pretrained(model, module.read_pretrained(folder), config)
    return model, config


def published_logits(module, model, tokens):
    if module.__name__.endswith("torch"):
        with torch.no_grad():
            return model(torch.from_numpy(tokens))[0].numpy()
    return np.asarray(jax_forward(model, jnp.asarray(tokens), jnp.asarray(tokens))[0])


def assert_loads_published(family):
    """Every fixture of the family, loaded through --init_from in both frameworks, gives the logits transformers
    computed for it (5e-5 torch, 1e-4 jax). The models are initialised with other weights first: a tensor not
    copied shows."""
    torch_module, jax_module = globals()[f"{family}_torch"], globals()[f"{family}_jax"]
    for name in FAMILY_FIXTURES[family]:
        reference = np.load(os.path.join(FIXTURES, name, "reference.npz"))
        for module, tolerance in ((torch_module, 5e-5), (jax_module, 1e-4)):
            model, _ = load_published(module, os.path.join(FIXTURES, name))
            error = np.abs(published_logits(module, model, reference["tokens"]) - reference["logits"]).max()
            assert error < tolerance, (module.__name__, name, error)


def test_gpt_loads_published_checkpoints():
    assert_loads_published("gpt")


def test_llama_loads_published_checkpoints():
    assert_loads_published("llama")


def test_moe_loads_published_checkpoints():
    assert_loads_published("moe")


def test_mamba_loads_published_checkpoints():
    assert_loads_published("mamba")


def test_llama_reads_bf16_and_f16_checkpoints():
    # The same fixture saved in BF16 and F16 (converted here by torch and numpy, round to nearest): every loaded
    # weight equals the rounded value exactly, in both frameworks, and the logits stay near float32's.
    tensors = fixture_tensors("llama3_rope")
    bf16 = {k: torch.from_numpy(v.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            for k, v in tensors.items()}
    expected = {k: torch.from_numpy(v.copy()).to(torch.bfloat16).float().numpy() for k, v in tensors.items()}
    assert any(not np.array_equal(expected[k], tensors[k]) for k in tensors)  # the rounding shows
    reference = np.load(os.path.join(FIXTURES, "llama3_rope", "reference.npz"))
    with tempfile.TemporaryDirectory() as tmp:
        for kind, saved, rounded in (("bf16", bf16, expected),
                                     ("f16", {k: v.astype(np.float16) for k, v in tensors.items()},
                                      {k: v.astype(np.float16).astype(np.float32) for k, v in tensors.items()})):
            folder = copy_fixture("llama3_rope", f"{tmp}/{kind}", saved)
            for module in (llama_torch, llama_jax):
                model, _ = load_published(module, folder)
                torch_model = model if module is llama_torch else None
                if torch_model is not None:
                    assert np.array_equal(torch_model.blocks[1].ffn.down.weight.detach().numpy(),
                                          rounded["model.layers.1.mlp.down_proj.weight"])
                    assert np.array_equal(torch_model.token_embedding.weight.detach().numpy(),
                                          rounded["model.embed_tokens.weight"])
                else:
                    assert np.array_equal(np.asarray(model.blocks[1].ffn.down.kernel[...]),
                                          rounded["model.layers.1.mlp.down_proj.weight"].T)
                error = np.abs(published_logits(module, model, reference["tokens"]) - reference["logits"]).max()
                assert error < (0.2 if kind == "bf16" else 0.02), (kind, module.__name__, error)


# a key whose value each family does not implement: refused, naming it
UNSUPPORTED_KEYS = {"gpt": [("activation_function", "relu")],
                    "llama": [("hidden_act", "gelu"), ("rope_parameters", "yarn"), ("layer_types", 5)],
                    "moe": [("hidden_act", "gelu"), ("rope_parameters", [1, 2]), ("layer_types", ["sliding_attention"])],
                    "mamba": [("use_bias", True)]}


def assert_init_from_refuses_bad_folders(family):
    """Both scripts of the family refuse, with one line and exit status 2, writing nothing: a folder without
    config.json or without weights, a damaged safetensors file (header length past the end, offsets outside the data,
    overlapping tensors, an unknown dtype, a truncated file), a missing, unexpected or wrongly shaped tensor, a config
    key the script does not implement, another family's model, data of another vocabulary, an option that
    contradicts config.json, and --init_from with --resume. Run in the family's process, which builds the fixtures'
    models for the other tests too."""
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_corpus(tmp)
        for module in (globals()[f"{family}_torch"], globals()[f"{family}_jax"]):
            name = FAMILY_FIXTURES[family][0]
            tensors = fixture_tensors(name)
            first, last = sorted(tensors)[0], sorted(tensors)[-1]
            base = f"{tmp}/{module.__name__}"
            os.makedirs(f"{base}/empty")
            folder = lambda label, **changes: copy_fixture(name, f"{base}/{label}", **changes)

            def damaged(label, content):
                path = folder(label)
                with open(f"{path}/model.safetensors", "wb") as f:
                    f.write(content)
                return path
            header = lambda entries: (lambda text: len(text).to_bytes(8, "little") + text)(json.dumps(entries).encode())
            entry = lambda kind, begin, end: {"dtype": kind, "shape": [(end - begin) // 4], "data_offsets": [begin, end]}
            whole = open(f"{folder('whole')}/model.safetensors", "rb").read()  # the fixture in one file
            other = "mamba" if family != "mamba" else "gpt2"
            width = "n_embd" if family == "gpt" else "hidden_size"
            cases = [
                (f"{tmp}/no_such_folder", [], "config.json"),
                (f"{base}/empty", [], "config.json"),
                (damaged("long_header", (10**6).to_bytes(8, "little") + b"{}"), [], "header length"),
                (damaged("outside", header({"x": entry("F32", 0, 64)}) + bytes(16)), [], "past the end"),
                (damaged("overlap", header({"x": entry("F32", 0, 16), "y": entry("F32", 8, 24)}) + bytes(24)), [],
                 "overlap"),
                (damaged("dtype", header({"x": entry("F64", 0, 16)}) + bytes(16)), [], "F64"),
                (damaged("truncated", whole[: len(whole) // 2]), [], "safetensors"),
                (damaged("not_json", (4).to_bytes(8, "little") + b"{{{{"), [], "safetensors"),
                (folder("missing", tensors={k: v for k, v in tensors.items() if k != last}), [], last),
                (folder("unexpected", tensors=tensors | {"extra.weight": np.zeros(3, np.float32)}), [], "extra.weight"),
                (folder("shape", tensors=tensors | {first: tensors[first][..., :-1].copy()}), [], first),
                *[(folder(f"key_{key}", **{key: value}), [], key) for key, value in UNSUPPORTED_KEYS[family]],
                (folder("huge", **{width: 2**17, **({"intermediate_size": 2**18} if family == "mamba" else {})}), [],
                 "memory"),  # also when only sampling
                (folder("nan", tensors=tensors | {last: np.full_like(tensors[last], np.nan)}), [], last),
                (folder("vocab", vocab_size=300), [], "vocabulary"),
                (f"{FIXTURES}/{other}", [], other),
                (f"{FIXTURES}/{name}", ["--num_layers=5"], "--num_layers"),
                (f"{FIXTURES}/{name}", ["--resume=true"], "--resume"),
            ]
            os.remove(f"{folder('no_weights')}/model.safetensors")
            shards = folder("shards")  # the first tensor in both shards
            write_safetensors(f"{shards}/b.safetensors", {first: tensors[first]})
            os.rename(f"{shards}/model.safetensors", f"{shards}/a.safetensors")
            with open(f"{shards}/model.safetensors.index.json", "w") as f:
                json.dump({"weight_map": {name: "a.safetensors" for name in tensors} | {first: "b.safetensors"}}, f)
            cases.append((shards, [], f"holds tensor {first} again"))
            cases.append((f"{base}/no_weights", [], "model.safetensors"))
            for init_from, args, word in cases:
                seq_len = [] if family == "gpt" else ["--seq_len=16"]  # within the fixtures' RoPE (gpt: its table)
                assert_refused(module, [f"--init_from={init_from}", f"--data={data}", f"--out_dir={tmp}/out",
                                        "--steps=0", *seq_len, *args], word, base)
            assert not os.path.exists(f"{tmp}/out")


def test_gpt_init_from_refuses_bad_folders():
    assert_init_from_refuses_bad_folders("gpt")


def test_llama_init_from_refuses_bad_folders():
    assert_init_from_refuses_bad_folders("llama")


def test_moe_init_from_refuses_bad_folders():
    assert_init_from_refuses_bad_folders("moe")


def test_mamba_init_from_refuses_bad_folders():
    assert_init_from_refuses_bad_folders("mamba")


def test_llama_init_from_samples_and_fine_tunes():
    # As a user runs it: --steps=0 only samples, from --prompt's text, and writes nothing (both frameworks); a few
    # fine-tuning steps lower the loss of the loaded model and save a checkpoint that --resume=true continues, given
    # the options the run printed (torch: the jax twin's training steps equal torch's, tested above).
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/prompt.txt", "w") as f:
            f.write("Once upon a time")
        folder = os.path.join(FIXTURES, "llama3_rope")
        for module in (llama_torch, llama_jax):
            out = run_main(module, [f"--init_from={folder}", f"--data={STORIES}", f"--prompt={tmp}/prompt.txt",
                                    "--steps=0", "--sample_tokens=20", f"--out_dir={tmp}/none"])
            assert "loaded" in out and "--rope_type=llama3" in out
            assert out.split("sample:\n")[1].startswith("Once upon a time"), out
            assert not os.path.exists(f"{tmp}/none")
        args = [f"--data={STORIES}", "--warmup_steps=0", "--log_interval=1", "--eval_interval=12", "--eval_steps=1",
                "--sample_tokens=0", "--batch_size=4", "--seq_len=32", f"--out_dir={tmp}/out"]
        out = run_main(llama_torch, [f"--init_from={folder}", "--steps=12", *args])
        losses = parse_losses(out)
        assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
        options = re.search(r"^loaded \S+: (.*)$", out, re.M)[1].split()
        assert len(parse_losses(run_main(llama_torch, ["--resume=true", "--steps=14", *options, *args]))) == 2


# -----------------------------------------------------------------------------
# bench.py: a benchmark, never timed here; only that its quick mode runs and writes a table and a picture


def markdown_rows(text):
    """Every row of every Markdown table in text, as a list of its stripped cells."""
    return [[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_bench_quick_writes_a_table_and_a_picture():
    """bench.py --quick on a tiny budget, the GPT twins only: bench.md has a row per script whose numbers agree with
    the model's size and with each other, the jax/torch ratio is the two rows' tokens/s, and bench.png is an 800 x 500
    PNG; a bad option is one line, exit 2."""
    for args, word in ((["--only=nothing"], "--only=nothing"), (["--seconds=0"], "--seconds"),
                       (["--seconds=nan"], "--seconds"), (["--nanogpt=/nonexistent"], "nanoGPT")):
        assert_one_line_error(run_script("bench.py", *args), word)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_script("bench.py", "--quick", "--only=gpt", "--seconds=1", f"--out_dir={tmp}", timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        text = open(os.path.join(tmp, "bench.md")).read()
        assert f"{os.cpu_count()} cores" in text and f"torch {torch.__version__}" in text, text[:300]
        rows = markdown_rows(text)
        at = next(i for i, row in enumerate(rows) if row[:3] == ["script", "parameters", "tokens/s"])
        table = {row[0]: dict(zip(rows[at], row)) for row in rows[at + 1 : at + 3]}  # the training table's rows
        assert set(table) == {"gpt_torch", "gpt_jax"}, rows
        config = gpt_torch.parse_config([f"--data={STORIES}", "--num_layers=2", "--model_dim=32", "--seq_len=32"])
        config.vocab_size = 256
        size = sum(p.numel() for p in gpt_torch.GPT(config).parameters())
        speeds = {}
        for script, row in table.items():
            number = lambda cell: float(re.match(r"[0-9,.]+|", cell)[0].replace(",", "") or "nan")
            assert number(row["parameters"]) == size, (script, row["parameters"], size)
            speeds[script] = number(row["tokens/s"])
            tokens_per_step = speeds[script] * number(row["ms/step"]) / 1000
            assert abs(tokens_per_step / (config.batch_size * config.seq_len) - 1) < 0.05, (script, row)
            floor = json.load(open(FLOOR))["val_bpb"]
            assert floor < number(row["val bpb"]) < 8.5, (script, row["val bpb"])  # 8: uniform over bytes
            assert 0 < number(row["MFU"]) <= 100 and number(row["peak RSS"]) > 100, (script, row)
        ratio = re.search(r"jax / torch, same family \| \| gpt ([0-9.]+)x", text)[1]
        assert abs(float(ratio) - speeds["gpt_jax"] / speeds["gpt_torch"]) < 0.02, (ratio, speeds)
        with open(os.path.join(tmp, "bench.png"), "rb") as f:
            head = f.read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (800, 500), head


# -----------------------------------------------------------------------------
# Runner


def run_tests(tests):
    """Run the (name, function) tests one after the other, printing one line each; returns (passed, failed)."""
    passed = failed = 0
    for name, fn in tests:
        start = time.perf_counter()
        try:
            fn()
            status = "ok"
            passed += 1
        except Exception as error:  # noqa: BLE001  (report every failure, keep going)
            where = traceback.extract_tb(error.__traceback__)[-1]
            status = f"FAIL {type(error).__name__}: {str(error)[:300]} (line {where.lineno})"
            failed += 1
        print(f"{name:<60} {status} ({time.perf_counter() - start:.1f} s)", flush=True)
    return passed, failed


# The longest families first, so that both halves end together; the skeleton first of all (in this process): its
# tiny runs compile the train and eval steps that the moe and mamba tests and runs then load from the compilation
# cache, while the worker begins with the llama tests, which need none of them.
FIRST = ("skeleton", "llama", "moe", "mamba", "gpt", "bench")


def run_with_a_worker(tests):
    """This process and a worker process (this file with --worker) share the tests, a family at a time: a family's
    tests share models, runs and compiled functions, so each family stays in one process. Each takes the next
    family, the longest first, when it finishes one. Returns (passed, failed)."""
    families = {}
    for name, fn in tests:
        families.setdefault(name.split("_")[1], []).append((name, fn))  # test_<family>_...
    todo = sorted(families, key=lambda family: FIRST.index(family) if family in FIRST else len(FIRST))
    lock, counts = threading.Lock(), [0, 0]  # todo is shared: pop under the lock; counts: passed, failed

    def next_family():
        with lock:
            return todo.pop(0) if todo else None

    def feed_worker():  # a thread: hands the worker one family's test names at a time, prints what it prints to the
        # real stdout (sys.__stdout__): a test in the main thread may have redirected sys.stdout to capture a script's
        # output (run_main), which would swallow the worker's lines
        env = dict(os.environ, TEST_ALL_JAX_CACHE=JAX_CACHE, OMP_NUM_THREADS="1")  # one cache; see below
        worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        while (family := next_family()) is not None:
            worker.stdin.write(" ".join(name for name, _ in families[family]) + "\n")
            worker.stdin.flush()
            while not (line := worker.stdout.readline()).startswith("--done "):  # its counts end the family
                if not line:  # the worker crashed: its family failed
                    print(f"the test worker ended with status {worker.wait()} during the {family} tests",
                          file=sys.__stdout__, flush=True)
                    counts[1] += 1
                    return
                print(line, end="", file=sys.__stdout__, flush=True)
            with lock:
                counts[0], counts[1] = counts[0] + int(line.split()[1]), counts[1] + int(line.split()[2])
        worker.stdin.close()
        worker.wait()

    # one torch thread in each process (and in the scripts they start): two processes share two cores, and torch's
    # threads spin-wait, many times slower, when another process holds the core they wait for
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    thread = threading.Thread(target=feed_worker)
    thread.start()
    while (family := next_family()) is not None:  # this process: the main thread, where signal handlers work
        passed, failed = run_tests(families[family])
        with lock:
            counts[0], counts[1] = counts[0] + passed, counts[1] + failed
    thread.join()
    return tuple(counts)


def main():
    args = sys.argv[1:]
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)]
    if args == ["--worker"]:  # the test names of one family per line on stdin; "--done passed failed" after each
        torch.set_num_threads(1)  # as in run_with_a_worker
        for line in sys.stdin:
            print("--done %d %d" % run_tests([(name, globals()[name]) for name in line.split()]), flush=True)
        return
    pattern = args[0] if args else ""
    tests = [(name, fn) for name, fn in tests if pattern in name]
    parallel = not pattern and (os.cpu_count() or 1) >= 2  # a filtered run stays in this process
    passed, failed = run_with_a_worker(tests) if parallel else run_tests(tests)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
