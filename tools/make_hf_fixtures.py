"""Write the tiny Hugging Face models under fixtures/ that the tests of --init_from load.

Each model script can start from a Hugging Face model folder (config.json plus model.safetensors,
or shards plus model.safetensors.index.json). The tests must not download anything, so this script
builds one tiny model per supported architecture with random weights, saves it the way the Hub
publishes models, and records the logits that transformers itself computes for a fixed batch.
A loader is right when it reproduces those logits.

For each fixture, fixtures/<name>/ holds:
    config.json, generation_config.json   as save_pretrained writes them (see below for llama)
    model.safetensors                     float32 weights; llama is sharded instead:
    model-0000k-of-0000n.safetensors      2-4 shards, plus model.safetensors.index.json
    reference.npz                         tokens (2, 24) int64, logits (2, 24, vocab_size) float32

Weights are redrawn after construction (normal, std 0.2; norms 1 + 0.1 * normal) so that logits
are far from uniform and a wrong eps, scale or missing norm shows up. Mamba keeps its own A_log, D
and dt_proj.bias: they encode decay rates and time steps, and random values would make it diverge.

Config styles. transformers v5 writes "rope_parameters" and "dtype"; published (v4) configs write
"rope_theta", "rope_scaling" and "torch_dtype". The llama fixture is rewritten in the v4 style, all
others keep v5's, so the loader is tested against both. Mixture-of-experts weights are saved with
save_original_format=True: one tensor per expert (block_sparse_moe.experts.N.w1 for Mixtral,
mlp.experts.N.gate_proj for Qwen2-MoE), as on the Hub, not v5's fused in-memory layout.

Usage (needs transformers, not a project requirement; tested with transformers 5.24.0, torch 2.13):
    pip install transformers safetensors        # into any virtual environment
    python tools/make_hf_fixtures.py
or, with transformers unpacked somewhere:
    PYTHONPATH=/path/to/transformers python tools/make_hf_fixtures.py
It replaces fixtures/<name>/ for every fixture; a rerun on the same machine writes the same bytes.
"""

import io
import json
import os
import shutil
import zipfile

import numpy as np
import torch
import transformers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
VOCAB_SIZE = 256
TOKENS_SHAPE = (2, 24)  # (batch_size, seq_len)

# Shared by the llama-like fixtures. Widths differ where they can (model_dim 32, ffn_dim 64, kv
# width 16), so most transposed or mis-split weights fail on shape; the square ones fail on logits.
LLAMA = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
             attn_implementation="eager")  # the plain math path, no fused SDPA kernel; not saved

# The stretched-RoPE fixtures: head_dim 16 (8 frequencies) and 64 original positions put frequencies in all three
# of llama3's bands (kept, ramped, divided by the factor) and give YaRN a ramp with fractional values whose ends
# floor and ceil move.
STRETCHED = {**LLAMA, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}

# name: (seed, model class, config). Configs pass RoPE as v5's rope_parameters. GPT-2's special
# token ids default to 50256, outside this vocabulary: there are none here.
FIXTURES = {
    "gpt2": (1, transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=None,
        eos_token_id=None, attn_implementation="eager")),
    "llama": (2, transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False)),
    "llama3_rope": (3, transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **STRETCHED, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64},
        tie_word_embeddings=True)),
    "llama_yarn": (4, transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **STRETCHED, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 64,
                                      "beta_fast": 32.0, "beta_slow": 1.0},
        tie_word_embeddings=False)),
    "qwen3": (5, transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
        **{**LLAMA, "rms_norm_eps": 1e-6}, head_dim=16,  # head_dim != model_dim / num_heads on purpose
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)),
    "mixtral": (6, transformers.MixtralForCausalLM, transformers.MixtralConfig(
        **{**LLAMA, "intermediate_size": 48}, num_local_experts=4, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False)),
    "qwen2_moe": (7, transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig(
        **{**LLAMA, "rms_norm_eps": 1e-6}, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=24, shared_expert_intermediate_size=48, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)),
    "mamba": (8, transformers.MambaForCausalLM, transformers.MambaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
        conv_kernel=4, time_step_rank="auto")),
}
SHARDED = {"llama": "50KB"}  # max_shard_size that gives 2-4 shards for these sizes
MAMBA_OWN_INIT = ("A_log", "D", "dt_proj.bias")


def randomize(model):
    """Redraw every parameter from the global torch RNG, so the seed fixes the weights."""
    norms = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight is listed once
            if name.endswith(MAMBA_OWN_INIT):
                continue
            if id(param) in norms:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * torch.randn(param.shape))
            else:
                param.copy_(0.2 * torch.randn(param.shape))  # matrices, embeddings and biases alike


def to_v4_config(folder):
    """Rewrite config.json with the keys published v4 checkpoints use (plain RoPE only)."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters")
    assert rope["rope_type"] == "default", rope
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = None
    config["torch_dtype"] = config.pop("dtype")
    with open(path, "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_npz(path, **arrays):
    """np.savez_compressed, but with a fixed timestamp in the zip, so a rerun writes the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def logits_of(model, tokens):
    """The reference: transformers' own forward in float32 on the CPU (Mamba: the torch scan path,
    since its optional kernels are CUDA-only)."""
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()  # (batch_size, seq_len, vocab_size)


def make(name, seed, model_class, config):
    """Build, randomize and save one fixture; return (largest logit change on reload, logit spread)."""
    folder = os.path.join(ROOT, name)
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    randomize(model)
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, size=TOKENS_SHAPE, dtype=np.int64)
    logits = logits_of(model, tokens)

    model.save_pretrained(folder, max_shard_size=SHARDED.get(name, "50GB"), save_original_format=True)
    if name == "llama":
        to_v4_config(folder)
    save_npz(os.path.join(folder, "reference.npz"), tokens=tokens, logits=logits)

    reloaded = model_class.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return float(np.abs(logits_of(reloaded, tokens) - logits).max()), float(logits.std(axis=-1).mean())


def main():
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for name, (seed, model_class, config) in FIXTURES.items():
        max_diff, logit_std = make(name, seed, model_class, config)
        folder = os.path.join(ROOT, name)
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        rope = {key: saved[key] for key in ("rope_parameters", "rope_theta", "rope_scaling") if key in saved}
        files = ", ".join(f"{file} {os.path.getsize(os.path.join(folder, file))}" for file in sorted(os.listdir(folder)))
        print(f"{name:12s} | reload max abs diff {max_diff:.2e} | logit std over vocab {logit_std:.2f} | rope {rope}")
        print(f"{'':12s} | {files}")
        assert max_diff < 1e-5, f"{name}: reloaded model disagrees with its reference logits"


if __name__ == "__main__":
    main()
