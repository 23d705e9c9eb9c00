"""Benchmark (not a test) for a machine with a GPU: every model script trains at a GPU-sized config, torch and jax
side by side, and reports tokens/s and model FLOPs utilisation (MFU) against the GPU's bfloat16 peak; then the
twins' parity tests run on that machine with full-precision matmuls. A few minutes in all.

    python tools/gpu_bench.py --peak_tflops=989       # H100 / H200 SXM: 989 dense bfloat16 TFLOP/s
    python tools/gpu_bench.py --steps=10 --args="--device=cpu --dtype=float32 --model_dim=64 --batch_size=8"

Needs the CUDA builds of torch and jax (README: "Run on a GPU, a Mac or several devices"). Each script runs in its
own process, as a user runs it; its ms/step comes from its own log lines, the first one (compilation, warm-up) left
out. FLOPs per token, as in the PaLM paper's appendix B: 6 x the parameters a token meets (moe: the active ones)
plus, for attention, 12 x num_layers x model_dim x seq_len (the scores and their weighted sum, forward and
backward). The byte embedding counts as if multiplied: under 1% of the parameters at this size.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["gpt_torch.py", "gpt_jax.py", "llama_torch.py", "llama_jax.py", "moe_torch.py", "moe_jax.py",
           "mamba_torch.py", "mamba_jax.py"]
SIZE = "--num_layers=6 --model_dim=384 --num_heads=6 --seq_len=256 --batch_size=64"  # the example size


def option(args, name, default):
    found = re.findall(rf"--{name}=(\d+)", args)
    return int(found[-1]) if found else default


def run(script, args, steps, out_dir):
    """Train script for steps; returns (median ms/step after the first log line, params per token, devices line)."""
    log_every = max(1, steps // 10)
    if script.startswith("mamba"):  # no attention, no heads
        args = re.sub(r"--num_heads=\d+", "", args)
    command = [sys.executable, script, *args.split(), f"--steps={steps}", f"--warmup_steps={min(10, steps)}",
               f"--log_interval={log_every}", f"--eval_interval={steps}", "--eval_steps=1", "--sample_tokens=0",
               f"--out_dir={out_dir}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        return None, None, (result.stderr.strip().splitlines() or ["failed"])[-1]
    ms = sorted(float(v) for v in re.findall(r"\| ([0-9.]+) ms/step", result.stdout)[1:])
    counts = re.search(r"model: ([0-9,]+) parameters(?:, ([0-9,]+) active)?", result.stdout)
    params = int((counts.group(2) or counts.group(1)).replace(",", ""))
    devices = re.search(r"^devices: (.*)$", result.stdout, re.M).group(1).replace(" | ", ", ")
    return (ms[len(ms) // 2] if ms else None), params, devices


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="the device's dense bfloat16 peak")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--args", default=SIZE, help="the model and batch options given to every script")
    parser.add_argument("--only", default="", help="run only the scripts whose name contains this")
    parser.add_argument("--skip_tests", action="store_true")
    config = parser.parse_args()
    batch_size, seq_len = option(config.args, "batch_size", 8), option(config.args, "seq_len", 128)
    num_layers, model_dim = option(config.args, "num_layers", 4), option(config.args, "model_dim", 128)
    print(f"| script | devices | ms/step | tokens/s | MFU at {config.peak_tflops:g} TFLOP/s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for script in (s for s in SCRIPTS if config.only in s):
            ms, params, devices = run(script, config.args, config.steps, f"{tmp}/{script}")
            if ms is None:
                print(f"| {script} | {devices} | | | |", flush=True)
                continue
            attention = 0 if script.startswith("mamba") else 12 * num_layers * model_dim * seq_len
            tokens_per_s = batch_size * seq_len / (ms / 1000)
            mfu = (6 * params + attention) * tokens_per_s / (config.peak_tflops * 1e12)
            print(f"| {script} | {devices} | {ms:.1f} | {tokens_per_s:,.0f} | {100 * mfu:.1f}% |", flush=True)
    if not config.skip_tests:  # the jax model on the GPU against the torch model: float32 matmuls, no TF32
        env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", NVIDIA_TF32_OVERRIDE="0")
        result = subprocess.run([sys.executable, "test_all.py", "parity"], cwd=ROOT, env=env, capture_output=True,
                                text=True)
        print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:])


if __name__ == "__main__":
    main()
