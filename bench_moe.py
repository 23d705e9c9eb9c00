"""Benchmark (not a test): the cost of a mixture-of-experts training step against the dense Llama with the same
active parameters per token, in each framework. At the default configs (8 experts, 2 per token, expert_ffn_dim
176: two experts of 176 are the dense Llama's SwiGLU of 352) a token meets the same matmul work in both models;
what the mixture adds is the router, the dispatch and many small matmuls.

    python bench_moe.py              # 20 alternating blocks of 10 steps per script, default configs
    python bench_moe.py --blocks=40

Prints, for each framework, the median ms/step of llama and moe, their ratio (target: at most 1.5x), and moe
jax against moe torch in tokens/s (target: at least 0.9x). Every model trains in this one process, on the same
batches, its blocks of steps alternating with the others' so that a machine's drift affects all alike.
"""

import sys
import time

import jax
import numpy as np
import torch
from flax import nnx

import llama_jax
import llama_torch
import moe_jax
import moe_torch


ONE_DEVICE = jax.sharding.Mesh(jax.devices()[:1], ("data",))  # the jax steps' mesh: one device

def torch_step(module, model_class):
    """A function running one training step of the default model on a batch, in place."""
    config = module.Config()
    torch.manual_seed(0)
    model = model_class(config)
    train_step, _ = module.make_steps(model, module.make_optimizer(model, config), config)
    return lambda x, y: train_step(x, y, 1e-3)  # llama's loss, or moe's (loss, balancing losses)


def jax_step(module, model_class, extra_state):
    """As torch_step, for a jax twin: its train step threads the parameters and optimizer state (and, for moe, the
    expert biases) through."""
    config = module.Config()
    model, optimizer = model_class(config, nnx.Rngs(0)), module.make_optimizer(config)
    if extra_state:
        graphdef, params, bias, buffers = nnx.split(model, nnx.Param, module.ExpertBias, ...)
        state = [nnx.to_pure_dict(params), None, nnx.to_pure_dict(bias)]
        train_step, _ = module.make_steps(graphdef, nnx.to_pure_dict(buffers), optimizer, config, ONE_DEVICE)
    else:
        graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
        state = [nnx.to_pure_dict(params), None]
        train_step, _ = module.make_steps(graphdef, nnx.to_pure_dict(buffers), optimizer, ONE_DEVICE)
    state[1] = optimizer.init(state[0])

    def step(x, y):
        outputs = train_step(*state, x, y, 1e-3)  # the new state, the loss (and moe's balancing losses)
        state[:] = outputs[: len(state)]
        return outputs[len(state)]
    return step


def main(argv):
    blocks = int(argv[0].split("=")[1]) if argv else 20
    tokens = np.frombuffer(open("data/stories.txt", "rb").read(), dtype=np.uint8)
    config = llama_torch.Config()  # the same batch shape in every default config
    steps = {("torch", "llama"): torch_step(llama_torch, llama_torch.Llama),
             ("torch", "moe"): torch_step(moe_torch, moe_torch.MoE),
             ("jax", "llama"): jax_step(llama_jax, llama_jax.Llama, False),
             ("jax", "moe"): jax_step(moe_jax, moe_jax.MoE, True)}
    rng = np.random.default_rng(0)
    times = {name: [] for name in steps}
    for block in range(blocks + 1):  # block 0: warm-up and compilation, not counted
        batches = [llama_torch.get_batch(tokens, rng, config) for _ in range(10)]
        for name, step in steps.items():
            start = time.perf_counter()
            for x, y in batches:
                loss = step(x, y)
            jax.block_until_ready(loss)  # waits for jax's asynchronous steps
            if block:
                times[name].append((time.perf_counter() - start) * 100)  # ms per step
    ms = {name: float(np.median(t)) for name, t in times.items()}
    print(f"median ms/step over {blocks} blocks of 10 steps (batch {config.batch_size} x seq_len {config.seq_len}):")
    for framework in ("torch", "jax"):
        print(f"{framework:5s}: llama {ms[framework, 'llama']:.1f}, moe {ms[framework, 'moe']:.1f}: moe/llama "
              f"{ms[framework, 'moe'] / ms[framework, 'llama']:.2f}x")
    print(f"moe jax/torch tokens/s: {ms['torch', 'moe'] / ms['jax', 'moe']:.2f}x; llama jax/torch: "
          f"{ms['torch', 'llama'] / ms['jax', 'llama']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
