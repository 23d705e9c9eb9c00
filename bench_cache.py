"""Benchmark (not a test): how much faster the Llama twins sample with their KV cache than by rerunning the model
over the whole context at every step. Untrained weights: the cost of a step does not depend on their values.

    python bench_cache.py                       # default config: the context is cropped to seq_len = 128
    python bench_cache.py --rope_scaling=4      # YaRN: max_len 512, so the whole 288-token prefix is recomputed

Prints, for each framework, the median time of generating 256 tokens from a 32-token prompt with and without the
cache (after one untimed call that compiles), and their ratio. Runs alternate between the two paths.
"""

import sys
import time

import jax
import numpy as np
import torch
from flax import nnx

import llama_jax
import llama_torch


def median_seconds(runs, repeats):
    """runs: {name: function}; each is called once untimed, then repeats times, alternating with the others."""
    times = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv):
    config = llama_torch.parse_config(argv + ["--data=" + __file__])  # any existing file: no data is read
    prompt, new_tokens, repeats = list(np.random.default_rng(0).integers(0, 256, 32)), 256, 5
    torch.manual_seed(0)
    torch_model = llama_torch.Llama(config)
    jax_model = llama_jax.Llama(llama_jax.Config(**vars(config)), nnx.Rngs(0))
    runs = {}
    for cache in (True, False):
        runs["torch", cache] = lambda cache=cache: llama_torch.generate(torch_model, prompt, new_tokens, 0.8, 40,
                                                                        use_cache=cache)
        runs["jax", cache] = lambda cache=cache: llama_jax.generate(jax_model, prompt, new_tokens, 0.8, 40,
                                                                    jax.random.key(0), use_cache=cache)
    seconds = median_seconds(runs, repeats)
    print(f"max_len {torch_model.max_len}, prompt {len(prompt)} tokens, {new_tokens} new, median of {repeats}")
    for framework in ("torch", "jax"):
        cached, recomputed = seconds[framework, True], seconds[framework, False]
        print(f"{framework:5s}: cache {cached * 1000 / new_tokens:.2f} ms/token, recompute "
              f"{recomputed * 1000 / new_tokens:.2f} ms/token: {recomputed / cached:.1f}x faster with the cache")


if __name__ == "__main__":
    main(sys.argv[1:])
