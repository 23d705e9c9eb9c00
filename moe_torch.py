"""A mixture of experts in PyTorch, in one file: Mixtral's sparse transformer, trained to predict the next byte/token.

A Llama (RMSNorm, RoPE, grouped-query attention, KV cache: llama_torch.py's, written out again here) whose
feed-forward network is a sparse mixture of experts:
  - a router scores every expert for each token, the top experts_per_token of them run on it, and the layer's
    output is their sum weighted by the router's probabilities (Shazeer et al. 2017, "Outrageously Large Neural
    Networks"; Mixtral: Jiang et al. 2024, "Mixtral of Experts")
  - every expert is a SwiGLU network; optionally shared experts run on every token (DeepSeekMoE: Dai et al. 2024),
    in Qwen2-MoE's form: one wider SwiGLU whose output a learned sigmoid gate scales
  - dropless dispatch: the (token, expert) assignments are sorted by expert and each expert runs once on its
    contiguous slice, so no token is dropped and only the routed work is computed (MegaBlocks: Gale et al. 2023)
  - load balancing, so that the router does not send every token to the same few experts: the Switch
    Transformer's auxiliary loss (Fedus et al. 2022) with the router z-loss (ST-MoE: Zoph et al. 2022), or
    DeepSeek-V3's auxiliary-loss-free per-expert bias (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing")
With the same weights it computes the same logits as Hugging Face's Mixtral (router softmax in float32, then the
top-k renormalised) and, with shared experts, attention biases and normalize_top_k=false, Qwen2-MoE's; --init_from
loads either's published weights.

    python moe_torch.py                                                  # 8 experts, 2 per token: train, sample
    python moe_torch.py --num_shared_experts=1 --normalize_top_k=false   # Qwen2-MoE's layer
    python moe_torch.py --balance=bias                                   # DeepSeek-V3's balancing, no extra loss
    python bpe.py --tokenizer=Qwen1.5-MoE-A2.7B --data=data/stories.txt   # a downloaded Hugging Face folder: README
    python moe_torch.py --init_from=Qwen1.5-MoE-A2.7B --data=data/stories.txt.Qwen1_5-MoE-A2_7B.npy  # fine-tune it
    torchrun --standalone --nproc_per_node=4 moe_torch.py --batch_size=64  # 4 GPUs, 16 sequences each (README)

diff me against moe_jax.py: the same program in JAX, line by line; against llama_torch.py, to see the experts.
"""

import signal

if __name__ == "__main__":  # Ctrl-C while the libraries below load (seconds): end at once, no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import contextlib
import fcntl
import inspect
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    data: str = "data/stories.txt"  # a UTF-8 text file (bytes are tokens) or a bpe.py .npy token file
    seed: int = 1337  # seeds the weights, the batches and sampling
    device: str = "auto"  # cpu, cuda or mps; auto: cuda, then mps, then cpu. torchrun: one process per device
    dtype: str = "auto"  # float32 or bfloat16 (matmuls; weights stay float32); auto: bfloat16 on CUDA from Ampere on
    vocab_size: int = 256  # set from the data at start (256 for bytes); not a command-line option
    seq_len: int = 128  # tokens per training sequence; also RoPE's original context, unless original_len is set
    num_layers: int = 4  # number of transformer blocks
    num_heads: int = 4  # query heads per block; head_dim = model_dim // num_heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention): 1 = multi-query, num_heads = multi-head
    model_dim: int = 128  # width of the residual stream
    head_dim: int = 0  # width of each attention head; 0 = model_dim // num_heads (Qwen3 sets it apart)
    num_experts: int = 8  # routed experts per block
    experts_per_token: int = 2  # experts the router picks for each token (its top k)
    num_shared_experts: int = 0  # experts every token passes (DeepSeekMoE, Qwen2-MoE); 0 = Mixtral
    expert_ffn_dim: int = 176  # each expert's SwiGLU hidden width; 2 per token x 176 = the dense llama's 352
    normalize_top_k: bool = True  # rescale the chosen experts' weights to sum to 1 (Mixtral); false: Qwen2-MoE
    balance: str = "aux_loss"  # load balancing: aux_loss (Switch Transformer) or bias (DeepSeek-V3, no loss)
    aux_loss_weight: float = 0.01  # weight of the load-balancing loss in the objective (only with balance=aux_loss)
    z_loss_weight: float = 1e-3  # weight of the router z-loss (ST-MoE), which keeps the router's logits small
    bias_update_rate: float = 1e-3  # balance=bias: each step moves every expert's bias this much toward even load
    norm_eps: float = 1e-5  # RMSNorm's epsilon (Mixtral 1e-5, Qwen2-MoE 1e-6)
    rope_theta: float = 10000.0  # RoPE base: dimension pair i turns by rope_theta**(-2i/head_dim) radians per position
    rope_scaling: float = 1.0  # factor s: the context may grow to s * original_len tokens (1 = plain RoPE)
    rope_type: str = "yarn"  # how rope_scaling stretches RoPE: yarn (YaRN) or llama3 (Llama 3.1's ramp)
    original_len: int = 0  # the context RoPE was trained at, which rope_scaling stretches; 0 = seq_len
    yarn_alpha: float = 1.0  # ramp: pairs turning fewer than alpha times in original_len are divided by s
    yarn_beta: float = 32.0  # ramp: pairs turning more than beta times in original_len are left unchanged
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (Qwen3, OLMo 2)
    attention_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    tie_embeddings: bool = False  # read logits through the token embedding (GPT-2) instead of a separate lm_head
    batch_size: int = 8  # sequences per training step
    steps: int = 1500  # optimizer steps in total
    learning_rate: float = 2e-3  # peak learning rate, reached after warmup
    min_learning_rate: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # steps of linear warmup from 0 to learning_rate
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on weight matrices and embeddings only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this
    eval_interval: int = 500  # evaluate and save a checkpoint every this many steps (and at the end)
    eval_steps: int = 20  # batches per evaluation of each split
    log_interval: int = 100  # print the training loss every this many steps
    out_dir: str = "out/moe_torch"  # where the checkpoint lives
    resume: bool = False  # continue from the checkpoint in out_dir
    init_from: str = ""  # a Hugging Face model folder (config.json, *.safetensors) to start from; sets model options
    sample_tokens: int = 300  # tokens to generate; past rope_scaling * seq_len of context, the oldest half is cropped
    temperature: float = 0.8  # sampling temperature (lower = more conservative)
    top_k: int = 40  # sample only among the top_k most likely tokens (0 = all)
    prompt: str = ""  # a file to sample from: a .npy of the data's tokens (bpe.py), or text with byte data; "" = val


# the options that fix the weights' meaning; rope_scaling and the YaRN ramp may change on --resume, which is
# YaRN's use, and so may the balancing options (the expert biases are saved either way)
MODEL_FIELDS = ("vocab_size", "seq_len", "num_layers", "num_heads", "num_kv_heads", "model_dim", "head_dim",
                "num_experts", "experts_per_token", "num_shared_experts", "expert_ffn_dim", "normalize_top_k",
                "norm_eps", "rope_theta", "qk_norm", "attention_bias", "tie_embeddings")
ROPE_TYPES = ("yarn", "llama3")
CHECKPOINT = "ckpt.pt"  # the file in out_dir


# -----------------------------------------------------------------------------
# Model


def residual_std(config):
    """GPT-2 init, kept by Llama: the two projections that write into the residual stream get 0.02 / sqrt(2 *
    num_layers), so the stream's variance does not grow with depth."""
    return 0.02 / math.sqrt(2 * config.num_layers)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without the mean subtraction and the bias, cheaper and
    as good. Computed in float32 whatever the input dtype, as Meta's reference does, because the mean of squares
    is where low precision hurts."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., dim), rms 1 per vector
        return x32.type_as(x) * self.weight


def rope_frequencies(config):
    """RoPE's angular frequencies, one per dimension pair: theta_i = rope_theta**(-2i/head_dim) radians per position,
    and the attention factor. With rope_scaling s > 1 the context stretches from original_len L to s * L positions.
    Pair i turns r_i = L / wavelength_i times over the trained context: pairs that turned many times (r > beta) saw
    every angle and stay; pairs that never completed a turn (r < alpha) are interpolated (theta / s keeps every angle
    inside the trained range); a ramp gamma blends in between (YaRN: Peng et al. 2023, section 3.2, "NTK-by-parts").
    rope_type picks the ramp:
      - llama3 (Llama 3.1): gamma linear in r, (r - alpha) / (beta - alpha) clipped to [0, 1], as YaRN's eq. 18
        writes it; Meta calls alpha and beta low_freq_factor and high_freq_factor. No attention factor.
      - yarn: as the YaRN authors' released code, which Hugging Face follows and published YaRN checkpoints were
        trained with: the fractional indices where r = beta and r = alpha are rounded outward (floor, ceil) and
        gamma is linear in the index i between them, not in r (r falls geometrically with i). Softmax temperature
        sqrt(1/t) = 0.1 ln(s) + 1 on queries and keys (section 3.4)."""
    head_dim = config.head_dim or config.model_dim // config.num_heads
    theta = config.rope_theta ** (-np.arange(0, head_dim, 2) / head_dim)  # (head_dim // 2,) radians per position
    if config.rope_scaling == 1:
        return theta, 1.0  # plain RoPE, bit for bit: the ramp below would round
    original_len = config.original_len or config.seq_len
    if config.rope_type == "llama3":
        turns = original_len / (2 * math.pi / theta)  # (head_dim // 2,) r_i = L / wavelength_i
        gamma = np.clip((turns - config.yarn_alpha) / (config.yarn_beta - config.yarn_alpha), 0, 1)
        attention_factor = 1.0
    else:  # solve r_i = L theta_i / (2 pi) for i
        index = lambda r: head_dim * math.log(original_len / (2 * math.pi * r)) / (2 * math.log(config.rope_theta))
        low, high = max(math.floor(index(config.yarn_beta)), 0), min(math.ceil(index(config.yarn_alpha)), head_dim - 1)
        ramp = (np.arange(head_dim // 2) - low) / (high - low if high != low else 1e-3)  # (head_dim // 2,) 0 at low
        gamma = 1 - np.clip(ramp, 0, 1)
        attention_factor = 0.1 * math.log(config.rope_scaling) + 1
    theta = (1 - gamma) * theta / config.rope_scaling + gamma * theta  # (head_dim // 2,) h(theta_i), eq. 20
    return theta, attention_factor


def rope_tables(config, max_len):
    """cos and sin of position * theta_i for positions 0 .. max_len - 1, each pair's angle written at i and at
    i + head_dim/2 (the split-halves pairing of apply_rope), times YaRN's attention factor (1 for plain RoPE).
    Computed once in float64 with numpy, stored in float32: both twins get the very same tables."""
    theta, attention_factor = rope_frequencies(config)
    angle = np.arange(max_len)[:, None] * theta[None, :]  # (max_len, head_dim // 2)
    angle = np.concatenate([angle, angle], axis=-1)  # (max_len, head_dim)
    return ((np.cos(angle) * attention_factor).astype(np.float32),
            (np.sin(angle) * attention_factor).astype(np.float32))


def apply_rope(x, cos, sin):
    """Rotary position embedding (Su et al. 2021, eq. 34): rotate each dimension pair by position * theta_i, so that
    query . key depends on the positions only through their difference. Pairs are split halves, (x_i, x_{i+head_dim/2}),
    as in Hugging Face's "rotate_half". Meta's reference pairs neighbours (x_2i, x_2i+1): the same model with the
    rows of the query and key projections permuted (Hugging Face permutes them when it converts Meta's weights)."""
    first, second = x.chunk(2, dim=-1)  # 2 x (batch_size, heads, seq_len, head_dim // 2)
    rotated = torch.cat([-second, first], dim=-1)  # (batch_size, heads, seq_len, head_dim)
    return x * cos + rotated * sin  # (x_i, x_j) -> (x_i cos - x_j sin, x_j cos + x_i sin)


class Attention(nn.Module):
    """Causal grouped-query self-attention (Ainslie et al. 2023): num_heads query heads share num_kv_heads key/value
    heads, query head h reading kv head h // (num_heads // num_kv_heads). The cache, which sampling keeps, shrinks by
    that ratio. out = softmax(query @ key^T * head_dim**-0.5 + mask) @ value, mask = 0 where key j <= query i, else
    -inf; F.scaled_dot_product_attention computes exactly this in one fused kernel."""

    def __init__(self, config):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim or config.model_dim // config.num_heads
        self.query = nn.Linear(config.model_dim, config.num_heads * self.head_dim, bias=config.attention_bias)
        self.key = nn.Linear(config.model_dim, config.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.value = nn.Linear(config.model_dim, config.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.out_proj = nn.Linear(config.num_heads * self.head_dim, config.model_dim, bias=False)
        # QK-norm: bounds the attention logits, which otherwise can grow until training diverges
        self.query_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.key_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x, cos, sin, mask, cache, position):
        batch_size, seq_len, _ = x.shape
        query = self.query(x).view(batch_size, seq_len, self.num_heads, self.head_dim)
        key = self.key(x).view(batch_size, seq_len, self.num_kv_heads, self.head_dim)
        value = self.value(x).view(batch_size, seq_len, self.num_kv_heads, self.head_dim)
        if self.query_norm is not None:  # over head_dim, for each head: before RoPE, which keeps the norm
            query, key = self.query_norm(query), self.key_norm(key)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (batch_size, heads, seq_len, head_dim)
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        # RoPE ran in float32 (the tables' dtype, as in Meta's code); the attention's matmuls run in value's dtype
        query, key = query.type_as(value), key.type_as(value)
        if cache is not None:  # write these positions' keys and values, then attend over all slots written so far
            cache[0][:, :, position : position + seq_len] = key  # (batch_size, num_kv_heads, max_len, head_dim)
            cache[1][:, :, position : position + seq_len] = value
            key, value = cache[0][:, :, : position + seq_len], cache[1][:, :, : position + seq_len]
        # query head h reads kv head h // (num_heads // num_kv_heads), as if each kv head were repeated
        # (repeat_interleave) that many times; enable_gqa does it without the copy. No mask: causal if there are
        # several queries, none for a single new query, which sees every key
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None and seq_len > 1,
                                             enable_gqa=True)  # (batch_size, num_heads, seq_len, head_dim)
        out = out.transpose(1, 2).flatten(2)  # (batch_size, seq_len, num_heads * head_dim)
        return self.out_proj(out)


class SwiGLU(nn.Module):
    """Gated feed-forward network (Shazeer 2020): down(silu(gate(x)) * up(x)). The gate decides, per hidden unit
    and token, how much of up(x) passes. Here it is the shared experts; Experts below holds num_experts of them."""

    def __init__(self, model_dim, ffn_dim):
        super().__init__()
        self.gate = nn.Linear(model_dim, ffn_dim, bias=False)
        self.up = nn.Linear(model_dim, ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, model_dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))  # (tokens, model_dim)


class Experts(nn.Module):
    """num_experts SwiGLU networks, their weights stacked along a first axis as (in, out) matrices: expert e is
    down[e](silu(gate[e](x)) * up[e](x)). Stacked, so that jax's dispatch can pick an expert by a computed index."""

    def __init__(self, config):
        super().__init__()
        shape = (config.num_experts, config.model_dim, config.expert_ffn_dim)
        self.gate = nn.Parameter(torch.randn(shape) * 0.02)
        self.up = nn.Parameter(torch.randn(shape) * 0.02)
        self.down = nn.Parameter(torch.randn(config.num_experts, config.expert_ffn_dim, config.model_dim)
                                 * residual_std(config))  # into the residual stream

    def forward(self, rows, experts):
        """Expert experts[i] on the rows rows[i] (count_i, model_dim), for every i: the list of their outputs."""
        # views of each expert's matrices, gate[e] and so on: backward stacks their gradients once (indexing
        # self.gate[e] would add a zero-filled gradient of every expert per expert)
        gate, up, down = self.gate.unbind(0), self.up.unbind(0), self.down.unbind(0)
        return [(F.silu(x @ gate[e]) * (x @ up[e])) @ down[e] for x, e in zip(rows, experts)]  # (count_i, ..)


def balance_stats(logits, probs, chosen, num_experts):
    """One layer's expert load (how many assignments each expert received) and its two balancing losses:
      - the Switch Transformer's auxiliary loss (Fedus et al. 2022, eq. 4): num_experts * sum_i f_i * P_i, with f_i
        the fraction of the (token, slot) assignments routed to expert i and P_i expert i's mean router probability.
        f_i is counted, so the gradient flows through P_i: it lowers the probability of the busiest experts. Under
        perfectly uniform routing (f_i = P_i = 1 / num_experts) its value is 1, and whenever P is uniform; it grows
        toward num_experts as routing collapses onto one expert.
      - the router z-loss (Zoph et al. 2022, ST-MoE, eq. 5): the mean over tokens of logsumexp(logits)^2. It keeps
        the router's logits small, where the softmax is stable and stays sensitive to them."""
    load = torch.bincount(chosen.flatten(), minlength=num_experts)  # (num_experts,) assignments per expert
    fraction = load / chosen.numel()  # f_i, sums to 1
    aux_loss = num_experts * (fraction * probs.mean(0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    return load, aux_loss, z_loss


class SparseMoE(nn.Module):
    """The mixture of experts that replaces Llama's SwiGLU (Mixtral's sparse MoE block): a router picks
    experts_per_token of the num_experts experts for each token, and the layer's output is their routing-weighted
    sum (plus the shared experts'). A token costs experts_per_token experts; the layer holds num_experts of them."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.experts_per_token = config.num_experts, config.experts_per_token
        self.normalize_top_k = config.normalize_top_k
        self.router = nn.Linear(config.model_dim, config.num_experts, bias=False)  # float32 also in bfloat16: see route
        self.experts = Experts(config)
        shared_dim = config.num_shared_experts * config.expert_ffn_dim  # Qwen2-MoE: the shared experts as one SwiGLU
        self.shared = SwiGLU(config.model_dim, shared_dim) if shared_dim else None
        self.shared_gate = nn.Linear(config.model_dim, 1, bias=False) if shared_dim else None

    def route(self, x, expert_bias):
        """The router's logits and probabilities (softmax over all experts, in float32 as Mixtral's reference does:
        small differences in the logits decide which experts run), each token's chosen experts (top
        experts_per_token) and their weights. expert_bias (balance=bias) shifts the choice only, never the weights."""
        with torch.autocast(x.device.type, enabled=False):  # float32 also under bfloat16 autocast, as all below
            logits = self.router(x.float())  # (tokens, num_experts)
        probs = F.softmax(logits, dim=-1)
        chosen = torch.topk(probs + expert_bias, self.experts_per_token, dim=-1).indices  # (tokens, experts_per_token)
        weights = probs.gather(-1, chosen)  # (tokens, experts_per_token) the chosen experts' probabilities
        if self.normalize_top_k:  # p_i / sum_chosen p_j = e^l_i / sum_chosen e^l_j: a softmax over the chosen logits
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, probs, chosen, weights

    def sparse_experts(self, x, chosen, weights):
        """Dropless dispatch that computes only the routed work: sort the tokens * experts_per_token (token, expert)
        assignments by expert, so that each expert's rows form one contiguous slice; run each expert once on its
        slice (possibly empty); scale every row by its weight and add it to its token's output (index_add). A
        loop over the experts, never over tokens; eager torch takes slices of any length."""
        expert = chosen.flatten()  # (assignments,) assignment i: token i // experts_per_token, expert expert[i]
        order = torch.argsort(expert, stable=True)  # the assignments grouped by expert
        token = order // self.experts_per_token  # (assignments,) the token of each sorted assignment
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()  # rows per expert
        rows = x.index_select(0, token).split(counts)  # num_experts slices, (count, model_dim) each
        out = torch.cat(self.experts(rows, range(self.num_experts)))  # (assignments, model_dim)
        out = out * weights.flatten().index_select(0, order)[:, None].to(x.dtype)  # x's dtype, as index_add needs
        return torch.zeros_like(x).index_add(0, token, out)  # (tokens, model_dim): each token's weighted sum

    def dense_experts(self, x, chosen, weights):
        """The reference path, for the tests and for reading: every expert on every token, weighted by a mask that
        holds the chosen experts' weights and 0 elsewhere. num_experts / experts_per_token times the work."""
        mask = torch.zeros(x.shape[0], self.num_experts, device=x.device).scatter(1, chosen, weights)  # (tokens, ..)
        out = torch.stack(self.experts([x] * self.num_experts, range(self.num_experts)), dim=1)  # (tokens, experts, ..)
        return (mask[..., None].to(x.dtype) * out).sum(1)  # (tokens, model_dim)

    def forward(self, x, expert_bias):
        batch_size, seq_len, model_dim = x.shape
        x = x.reshape(batch_size * seq_len, model_dim)  # routing is per token
        logits, probs, chosen, weights = self.route(x, expert_bias)
        out = self.sparse_experts(x, chosen, weights)  # (tokens, model_dim)
        if self.shared is not None:  # every token, scaled by sigmoid(shared_gate(x)) (Qwen2-MoE)
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out.view(batch_size, seq_len, model_dim), balance_stats(logits, probs, chosen, self.num_experts)


class Block(nn.Module):
    """Pre-norm residual block, as Llama's with the mixture of experts for the SwiGLU: x + attn(norm(x)), then
    x + moe(norm(x)). Also returns the layer's expert load and balancing losses."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.model_dim, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.model_dim, config.norm_eps)
        self.moe = SparseMoE(config)

    def forward(self, x, cos, sin, mask, cache, position, expert_bias):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, position)  # (batch_size, seq_len, model_dim)
        out, stats = self.moe(self.ffn_norm(x), expert_bias)
        return x + out, stats


class MoE(nn.Module):
    """Token embedding -> num_layers blocks -> final RMSNorm -> lm_head, as Llama. Also holds expert_bias, one bias
    per layer and expert for balance=bias: not a parameter (no gradient moves it, see bias_update), but saved."""

    def __init__(self, config):
        super().__init__()
        self.num_kv_heads, self.head_dim = config.num_kv_heads, config.head_dim or config.model_dim // config.num_heads
        self.max_len = int(config.rope_scaling * (config.original_len or config.seq_len))  # positions RoPE serves
        self.token_embedding = nn.Embedding(config.vocab_size, config.model_dim)
        cos, sin = rope_tables(config, self.max_len)  # 2 x (max_len, head_dim)
        self.register_buffer("cos", torch.from_numpy(cos), persistent=False)  # fixed: no gradient, not saved
        self.register_buffer("sin", torch.from_numpy(sin), persistent=False)
        self.register_buffer("expert_bias", torch.zeros(config.num_layers, config.num_experts))  # saved
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.model_dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.model_dim, config.vocab_size, bias=False)
        # N(0, 0.02) weights; the projections that write into the residual stream get std / sqrt(2 * num_layers),
        # so the stream's variance does not grow with depth (GPT-2); RMSNorm weights start at 1; Experts: the same
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std(config) if name.endswith(("out_proj", "down")) else 0.02
                nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:  # attention_bias: 0, as flax's default
                nn.init.zeros_(module.bias)

    def forward(self, tokens, targets=None, cache=None, position=0):
        """Logits for tokens at positions position, position + 1, ...; the loss if targets are given; and the
        router's statistics, (load (num_layers, num_experts), aux_loss, z_loss), the losses averaged over layers.
        With a cache (sampling), earlier positions' keys and values come from it and these tokens' go into it."""
        batch_size, seq_len = tokens.shape
        cos = self.cos[position : position + seq_len]  # (seq_len, head_dim)
        sin = self.sin[position : position + seq_len]
        # query i sits at position + i and sees key j if j <= position + i. Starting at position 0 that is the plain
        # causal mask, which F.scaled_dot_product_attention applies itself; one token sees all keys: no mask either
        mask = None
        if position > 0 and seq_len > 1:  # a chunk after cached tokens
            mask = (torch.arange(position + seq_len, device=tokens.device)
                    <= position + torch.arange(seq_len, device=tokens.device)[:, None])  # (seq_len, num_keys)
        x = self.token_embedding(tokens)  # (batch_size, seq_len, model_dim)
        stats = []
        for layer, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[layer]
            x, layer_stats = block(x, cos, sin, mask, layer_cache, position, self.expert_bias[layer])
            stats.append(layer_stats)
        load, aux_loss, z_loss = (torch.stack(values) for values in zip(*stats))  # one row per layer
        router_stats = (load, aux_loss.mean(), z_loss.mean())
        x = self.final_norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.token_embedding.weight)
        if targets is None:
            return logits, None, router_stats  # (batch_size, seq_len, vocab_size)
        # in float32 also with --dtype=bfloat16: the log-softmax of many logits needs the precision
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # mean over batch_size * seq_len tokens
        return logits, loss, router_stats

    def new_cache(self, batch_size, length):
        """One [key, value] pair per layer, preallocated for length (at most max_len) positions: appending never
        reallocates."""
        shape = (batch_size, self.num_kv_heads, length, self.head_dim)
        zeros = lambda: torch.zeros(shape, device=self.cos.device)  # the model's device; float32, as sampling runs
        return [[zeros(), zeros()] for _ in self.blocks]


# -----------------------------------------------------------------------------
# Data


def load_data(config):
    """The corpus as token ids split 90/10, each token's bytes (to decode samples and count bytes for bits per
    byte), and the corpus's entropy floor in val bits per byte if a <corpus>.floor.json sits beside it. Every
    file is checked before any work: a malformed one stops the script with one line naming it."""
    tokens, token_bytes = read_tokens(config.data)
    split = int(0.9 * len(tokens))
    train_tokens, val_tokens = tokens[:split], tokens[split:]  # the last 10% is validation
    if min(len(train_tokens), len(val_tokens)) < config.seq_len + 1:
        fail(f"{config.data} has {len(tokens)} tokens, too few for {config.seq_len + 1} in each of the train and "
             f"val splits; use a longer corpus or a smaller --seq_len")
    corpus = re.sub(r"\.[^./]+\.npy$", "", config.data)  # data/stories.txt.gpt2.npy was made from data/stories.txt
    floor = None
    if os.path.isfile(corpus + ".floor.json"):
        floor = read_file(corpus + ".floor.json", lambda f: json.load(f)["val_bpb"], "a floor file")
        if type(floor) not in (int, float) or not 0 <= floor <= 8:  # a byte holds at most 8 bits
            fail(f"{corpus}.floor.json: val_bpb is {floor!r}, not a number of bits per byte; remove or regenerate it")
    return train_tokens, val_tokens, token_bytes, floor


def read_tokens(path):
    """A file's token ids and each token's bytes: a .npy written by bpe.py, whose vocabulary is in the .json of the
    same name (an id no token file uses may have no bytes: padding up to a published model's vocab_size), or any
    other file as UTF-8 bytes (vocabulary: the 256 byte values)."""
    if path.endswith(".npy"):
        vocab_path = path[: -len(".npy")] + ".json"
        tokens = read_file(path, lambda f: np.load(f, allow_pickle=False), "a .npy array")  # no pickles
        token_bytes = read_file(vocab_path, lambda f: [bytes.fromhex(t) for t in json.load(f)["token_bytes"]],
                                f"the vocabulary of {path} (bpe.py's JSON with a token_bytes list)")
        if not (tokens.ndim == 1 and tokens.dtype.kind in "iu" and len(tokens) and 0 < len(token_bytes) <= 2**20):
            fail(f"{path} and {vocab_path} are not a token file and its vocabulary (a 1-D integer array, up to 2**20 "
                 f"tokens); tokenize again with bpe.py")
    else:
        tokens = read_file(path, lambda f: np.frombuffer(f.read(), dtype=np.uint8), "a readable file")
        token_bytes = [bytes([i]) for i in range(256)]
    if not (len(tokens) and 0 <= tokens.min() <= tokens.max() < len(token_bytes)):  # embedding lookups would fail
        fail(f"{path} is empty or holds token ids outside its vocabulary of {len(token_bytes)}; tokenize again with "
             f"bpe.py")
    if not all(token_bytes[t] for t in np.unique(tokens)):  # it would decode to nothing and count no bytes
        fail(f"{path} holds a token that has no bytes in its vocabulary; tokenize again with bpe.py")
    return tokens, token_bytes


def get_batch(tokens, rng, config):
    """batch_size random windows: inputs and their next-token targets. A numpy generator picks the offsets, so
    the torch and jax twins draw identical batches."""
    offsets = rng.integers(0, len(tokens) - config.seq_len, size=config.batch_size)  # (batch_size,)
    index = offsets[:, None] + np.arange(config.seq_len)  # (batch_size, seq_len)
    return tokens[index].astype(np.int64), tokens[index + 1].astype(np.int64)  # torch embeds int64 ids


# -----------------------------------------------------------------------------
# Training


def make_optimizer(model, config):
    """AdamW; weight decay only on tensors of two or more dims (matrices, embeddings), not biases or norm gains."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel updates every tensor, instead of about ten small operations per tensor
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=True)


def learning_rate_at(step, config):
    """Linear warmup from 0 over warmup_steps, then cosine decay from learning_rate to min_learning_rate at the
    last step. step counts the updates done before this one (0 for the first)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)  # 0 -> 1
    cosine = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
    return config.min_learning_rate + cosine * (config.learning_rate - config.min_learning_rate)


def bias_update(load, config):
    """DeepSeek-V3's auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 report, section 2.1.2): after
    each step, every expert that received fewer assignments than the mean gets its bias raised by
    bias_update_rate, every busier one lowered. The bias only enters the choice of experts (SparseMoE.route), so
    it steers tokens toward idle experts without changing how outputs are weighted, and no loss pulls against the
    language model's."""
    return config.bias_update_rate * torch.sign(load.float().mean(-1, keepdim=True) - load)  # (num_layers, ..)


def make_steps(model, optimizer, config):
    """The train step (one AdamW update at the given learning rate; with balance=bias, then one update of the
    expert biases) and the evaluation loss, as functions of numpy batches of batch_size sequences. The objective is
    the language model's loss plus the weighted z-loss, plus the weighted auxiliary loss with balance=aux_loss; the
    step returns the language model's loss and (aux_loss, z_loss), the auxiliary loss measured in either mode. The
    jax twin compiles both functions; torch runs them eagerly. Data parallel (torchrun): each process trains on its
    slice of the batch, and DistributedDataParallel averages the gradients over the processes during backward, so
    every process makes the update one process makes on the whole batch (with balance=aux_loss, nearly: see below)."""
    device = next(model.parameters()).device
    rank, processes = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = slice(rank * config.batch_size // processes, (rank + 1) * config.batch_size // processes)  # this process's
    # forward_sync_buffers=False: the RoPE tables are constants, and every process moves its expert biases by the
    # same update (the loads summed over the processes, below). Every expert's weights get a gradient at every step
    # (Experts runs each one, on no rows if no token chose it: a zero gradient), so no find_unused_parameters
    trained = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False) if processes > 1 else model
    # bfloat16: autocast runs matmuls (and what follows them) in bfloat16; weights, gradients and AdamW stay float32
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=config.dtype == "bfloat16")
    to_device = lambda array: torch.from_numpy(array).to(device)

    def train_step(x, y, learning_rate):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        with autocast():
            _, loss, (load, aux_loss, z_loss) = trained(to_device(x[rows]), to_device(y[rows]))
        objective = loss + config.z_loss_weight * z_loss
        # with several processes, each one's aux_loss is its slice's (as Megatron-LM and DeepSpeed): a product of
        # the slice's statistics, so their mean is near the whole batch's, not equal to it
        if config.balance == "aux_loss":
            objective = objective + config.aux_loss_weight * aux_loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if config.balance == "bias":
            if processes > 1:  # the whole batch's loads: every process moves its biases as one process would
                dist.all_reduce(load)
            model.expert_bias += bias_update(load, config)  # a buffer, outside autograd
        values = torch.stack([loss, aux_loss, z_loss]).detach()  # the values: the graph is freed
        if processes > 1:  # the mean of the slices' values: the whole batch's loss, as one process computes it
            dist.all_reduce(values)
            values = values / processes
        return values[0], values[1:]

    @torch.no_grad()
    def eval_loss(x, y):
        with autocast():
            _, loss, (load, _, _) = model(to_device(x), to_device(y))
        return loss, load

    return train_step, eval_loss


def evaluate(eval_loss, tokens, config):
    """Mean loss over eval_steps batches from a generator re-seeded at every evaluation (evaluations compare with
    each other, and the training batches do not depend on when we evaluate), and the expert load summed over
    them, (num_layers, num_experts)."""
    rng = np.random.default_rng(config.seed + 1)
    losses, loads = zip(*(eval_loss(*get_batch(tokens, rng, config)) for _ in range(config.eval_steps)))
    return float(np.mean([float(loss) for loss in losses])), np.sum([np.asarray(load.cpu()) for load in loads], axis=0)


def checkpoint_arrays(model, optimizer):
    """Every array of a checkpoint by name, as live tensors: the weights, and AdamW's step count and two moments per
    parameter. AdamW creates those at its first step; creating the same zeros now lets a resumed run fill them in."""
    arrays = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}  # views of the weights
    for i, param in enumerate(model.parameters()):
        if not optimizer.state[param]:
            optimizer.state[param] = {"step": torch.zeros((), device=param.device), "exp_avg": torch.zeros_like(param),
                                      "exp_avg_sq": torch.zeros_like(param)}
        arrays |= {f"optimizer.{i}.{key}": value for key, value in optimizer.state[param].items()}
    return arrays


def open_checkpoint(config):
    """The checkpoint to resume ({name: array}, with its meta parsed), or None for a fresh run. Refuses (exit 2) to
    overwrite a checkpoint, and a checkpoint that is unreadable, another script's or another model's."""
    path = os.path.join(config.out_dir, CHECKPOINT)
    if not config.resume:
        if os.path.exists(path):
            fail(f"{path} already holds a checkpoint; pass --resume=true to continue it or choose another --out_dir")
        return None
    # tensors and plain types only: loading runs no code
    checkpoint = read_file(path, lambda f: torch.load(f, map_location="cpu", weights_only=True), "a checkpoint")
    check_meta(path, checkpoint, config)
    return checkpoint


def save_checkpoint(model, optimizer, step, data_rng, config):
    """Weights, optimizer state, step, data RNG state and config. Written to a temporary file and renamed over the
    old one, so an interruption never leaves a broken checkpoint."""
    path = os.path.join(config.out_dir, CHECKPOINT)
    meta = json.dumps({"step": step, "data_rng": data_rng.bit_generator.state, "config": asdict(config)})
    torch_rng = torch.get_rng_state()  # torch's global random state (dropout, sampling): resuming continues it
    torch.save({"meta": meta, "torch_rng": torch_rng, **checkpoint_arrays(model, optimizer)}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


@torch.no_grad()
def restore_checkpoint(checkpoint, model, optimizer, data_rng, config):
    """Put the saved weights, optimizer state and random states back, once every array's name, shape and dtype
    match this model's; returns the step to continue from."""
    arrays = checkpoint_arrays(model, optimizer)
    check_arrays(os.path.join(config.out_dir, CHECKPOINT), checkpoint, arrays | {"torch_rng": torch.get_rng_state()})
    try:  # the generator checks the state's content, which a damaged file gets wrong
        torch.set_rng_state(checkpoint["torch_rng"])
    except RuntimeError:
        fail(f"{os.path.join(config.out_dir, CHECKPOINT)}: torch_rng is not a random state; choose another --out_dir")
    for name, tensor in arrays.items():
        tensor.copy_(checkpoint[name])
    data_rng.bit_generator.state = checkpoint["meta"]["data_rng"]
    return checkpoint["meta"]["step"]


# Published weights: a Hugging Face model folder, read with numpy alone. config.json sets the options above and
# each tensor of the checkpoint has one parameter here (each expert's matrices have one slice of Experts' stacked
# ones): getting a published model's logits proves that the model above is the real thing, and training on from
# there is fine-tuning.

HF_MODEL_TYPES = ("mixtral", "qwen2_moe")  # Mixtral 8x7B and 8x22B; Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B
HF_OPTIONS = {"vocab_size": "vocab_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
              "num_key_value_heads": "num_kv_heads", "hidden_size": "model_dim", "head_dim": "head_dim",
              "num_experts_per_tok": "experts_per_token", "rms_norm_eps": "norm_eps",
              "tie_word_embeddings": "tie_embeddings"}
# the keys that differ: the number and width of the routed experts; Qwen2-MoE's scaling of the chosen experts'
# weights and its biases on q, k, v (qkv_bias in transformers 5; always there before)
HF_EXPERT_OPTIONS = {"mixtral": {"num_local_experts": "num_experts", "intermediate_size": "expert_ffn_dim"},
                     "qwen2_moe": {"num_experts": "num_experts", "moe_intermediate_size": "expert_ffn_dim",
                                   "norm_topk_prob": "normalize_top_k", "qkv_bias": "attention_bias"}}
# keys whose other values would change the function computed above (Qwen2-MoE's: every layer sparse, no sliding
# window); the rest of config.json (token ids, dtype, versions, init ranges, router_aux_loss_coef: a training
# option, see --aux_loss_weight) does not, and is not read
HF_FIXED = {"hidden_act": "silu", "router_jitter_noise": 0.0, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "use_sliding_window": False}
# the checkpoint's name of each module: blocks.3.attn.query.weight <-> model.layers.3.self_attn.q_proj.weight
HF_NAMES = {"token_embedding": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}
HF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj",
                  "attn.value": "self_attn.v_proj", "attn.out_proj": "self_attn.o_proj",
                  "ffn_norm": "post_attention_layernorm"}
# and of the mixture of experts, Mixtral's and Qwen2-MoE's: a row per kind of expert matrix stands for every
# expert's, stacked by stack_experts; Qwen2-MoE's shared expert is one SwiGLU, as SparseMoE's shared experts
HF_MOE_NAMES = {
    "mixtral": {"moe.router": "block_sparse_moe.gate", "moe.experts.gate": "block_sparse_moe.experts.w1",
                "moe.experts.up": "block_sparse_moe.experts.w3", "moe.experts.down": "block_sparse_moe.experts.w2"},
    "qwen2_moe": {"moe.router": "mlp.gate", "moe.experts.gate": "mlp.experts.gate_proj",
                  "moe.experts.up": "mlp.experts.up_proj", "moe.experts.down": "mlp.experts.down_proj",
                  "moe.shared.gate": "mlp.shared_expert.gate_proj", "moe.shared.up": "mlp.shared_expert.up_proj",
                  "moe.shared.down": "mlp.shared_expert.down_proj", "moe.shared_gate": "mlp.shared_expert_gate"}}
HF_DERIVED = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"  # RoPE's frequencies, saved by older exports
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # BF16 as raw 16-bit words: see to_float32


def rope_options(hf, path):
    """The RoPE options from config.json: rope_theta and rope_scaling (transformers 4), or rope_parameters (5)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        fail(f"{path}: rope_parameters (or rope_scaling) {rope!r} is not a JSON object; check the file")
    rope = dict(rope)  # popped below: what is left over is refused
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    original_len = rope.pop("original_max_position_embeddings", hf.get("max_position_embeddings", 0))
    ramp = {"yarn": ("beta_slow", "beta_fast", 1.0, 32.0), "llama3": ("low_freq_factor", "high_freq_factor", 1.0, 4.0)}
    if rope_type not in ("default", *ramp):
        fail(f"{path}: rope type {rope_type!r} is not implemented here (default, yarn, llama3 are)")
    options = {"rope_theta": theta, "original_len": original_len, "rope_type": "yarn", "rope_scaling": 1.0}
    if rope_type != "default":
        alpha, beta, alpha_default, beta_default = ramp[rope_type]
        options |= {"rope_type": rope_type, "rope_scaling": rope.pop("factor", None),
                    "yarn_alpha": rope.pop(alpha, None) or alpha_default,
                    "yarn_beta": rope.pop(beta, None) or beta_default}
        for key, value in (("truncate", True), ("attention_factor", None)):  # the defaults: rope_frequencies
            if key in rope and rope[key] is value:
                del rope[key]
    if rope:  # mscale, attention_factor, truncate=false, ...: another stretch than the one written above
        fail(f"{path}: rope option {next(iter(rope))}={rope[next(iter(rope))]!r} is not implemented here")
    return options


def pretrained_options(folder):
    """This script's model options from a Hugging Face config.json. Refuses (exit 2) another kind of model, and any
    key whose value this file does not implement: nothing is silently ignored."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        fail(f"--init_from={folder} has no config.json; pass a Hugging Face model folder (config.json, *.safetensors)")
    hf = read_file(path, json.load, "a JSON model config")
    if not isinstance(hf, dict) or hf.get("model_type") not in HF_MODEL_TYPES:
        kind = hf.get("model_type") if isinstance(hf, dict) else None
        fail(f"{path} describes a {kind!r} model; {SCRIPT} loads {', '.join(HF_MODEL_TYPES)}; use another script")
    for key, value in HF_FIXED.items():
        if hf.get(key) not in (None, value):  # None: absent, Hugging Face's default
            fail(f"{path}: {key}={hf[key]!r} is not implemented here (only {value!r})")
    layer_types = hf.get("layer_types") or []
    if not isinstance(layer_types, list) or any(kind != "full_attention" for kind in layer_types):  # sliding windows
        fail(f"{path}: layer_types {hf['layer_types']} is not implemented here (only full_attention)")
    qwen = hf["model_type"] == "qwen2_moe"
    if not qwen and hf.get("sliding_window") is not None:  # Mixtral's; Qwen2-MoE's needs use_sliding_window
        fail(f"{path}: sliding_window={hf['sliding_window']!r} is not implemented here (only null)")
    names = HF_OPTIONS | HF_EXPERT_OPTIONS[hf["model_type"]]
    options = {field: hf[key] for key, field in names.items() if hf.get(key) is not None}
    options |= {"qk_norm": False, "num_shared_experts": 0, **rope_options(hf, path)}
    options.setdefault("num_kv_heads", options.get("num_heads"))  # absent before grouped-query attention
    options.setdefault("normalize_top_k", not qwen)  # Hugging Face's defaults: Mixtral renormalises, Qwen2-MoE not
    options.setdefault("attention_bias", qwen)
    options.setdefault("norm_eps", 1e-6 if qwen else 1e-5)
    if qwen:  # its shared expert, a SwiGLU of shared_expert_intermediate_size: so many experts' widths side by side
        width, shared = hf.get("moe_intermediate_size"), hf.get("shared_expert_intermediate_size")
        if not (type(width) is int and type(shared) is int and width > 0 and shared % width == 0):
            fail(f"{path}: shared_expert_intermediate_size={shared!r} is not a multiple of moe_intermediate_size="
                 f"{width!r}; this script's shared experts are expert_ffn_dim wide each")
        options["num_shared_experts"] = shared // width
    kinds = {field.name: field.type for field in fields(Config)}
    for name, value in options.items():  # JSON has one kind of number: 1e-06 is a float, 16 must be an int
        if kinds[name] is float and type(value) is int:
            options[name] = value = float(value)
        if type(value) is not kinds[name]:
            fail(f"{path}: the value {value!r} for this script's {name} is not a {kinds[name].__name__}")
    return options


def read_safetensors(file):
    """{name: array} of a .safetensors file: 8 bytes of little-endian header length, a JSON header {name: {"dtype",
    "shape", "data_offsets": [begin, end]}} counted from the end of the header, then the raw little-endian data.
    Each array is its own memory map of the file: nothing is read until the tensor is copied, and its pages leave
    memory with the array. Raises ValueError for a file that breaks the format (read_file makes it one line)."""
    size = os.fstat(file.fileno()).st_size
    header_len = int.from_bytes(file.read(8), "little") if size >= 8 else -1
    if not 2 <= header_len <= size - 8:
        raise ValueError(f"the header length {header_len} runs past the end of the file ({size} bytes)")
    header = json.loads(file.read(header_len))
    header.pop("__metadata__", None)
    arrays, end_of_last = {}, 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):  # in file order
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name} has dtype {entry['dtype']}, not one of {', '.join(SAFETENSORS_DTYPES)}")
        dtype, (begin, end), shape = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]), entry["data_offsets"], entry["shape"]
        if not end_of_last <= begin <= end <= size - 8 - header_len or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{name}'s bytes [{begin}, {end}) overlap another tensor, run past the end of the file "
                             f"or do not hold its shape {shape}")
        # copy-on-write ("c"): writable, as torch.from_numpy wants, and never written back; mmap cannot map 0 bytes
        arrays[name] = (np.memmap(file, dtype, "c", 8 + header_len + begin, tuple(shape)) if end > begin
                        else np.zeros(shape, dtype))
        end_of_last = end
    return arrays


def read_pretrained(folder):
    """{name: array} of every tensor in a Hugging Face model folder: model.safetensors, or the shards that
    model.safetensors.index.json lists."""
    index = os.path.join(folder, "model.safetensors.index.json")
    shards = ["model.safetensors"]
    if os.path.isfile(index):
        shards = read_file(index, lambda f: sorted(set(json.load(f)["weight_map"].values())), "a safetensors index")
    tensors = {}
    for shard in shards:
        path = os.path.join(folder, str(shard))
        if not os.path.isfile(path):
            fail(f"--init_from={folder} has no {shard}; download the model's safetensors files into it")
        shard_tensors = read_file(path, read_safetensors, "a safetensors file")
        for name in sorted(tensors.keys() & shard_tensors.keys()):
            fail(f"{path} holds tensor {name} again, which an earlier shard holds; the checkpoint is damaged")
        tensors |= shard_tensors
    return tensors


def to_float32(array, name, folder):
    """The tensor in float32 (F32: the mapped array itself, no copy). BF16 is the upper half of a float32's bits:
    shifting them back up widens it exactly. Refuses (exit 2) a tensor holding nan or inf."""
    values = (array.astype(np.uint32) << 16).view(np.float32) if array.dtype == np.uint16 else array.astype(
        np.float32, copy=False)
    if not np.isfinite(values).all():
        fail(f"{folder}: tensor {name} holds values that are not finite (nan or inf); the checkpoint is damaged")
    return values


def stack_experts(tensors, folder):
    """tensors with each layer's experts stacked as Experts holds them. Hugging Face saves every expert's matrices
    apart, (out, in) as its Linear layers hold them: mlp.experts.0.up_proj.weight, mlp.experts.1.up_proj.weight, ...;
    Experts holds each kind as one (num_experts, in, out) array, named here without the expert's number:
    mlp.experts.up_proj.weight."""
    experts = {}  # {name without the expert's number: {expert: (out, in) array}}
    for name in list(tensors):
        if match := re.fullmatch(r"(.+\.experts)\.(\d+)\.(.+)", name):  # before, expert, after
            experts.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = tensors.pop(name)
    for name, arrays in experts.items():
        for expert in range(len(arrays)):  # experts 0, 1, ..., all of one shape
            if expert not in arrays or arrays[expert].shape != arrays[0].shape:
                fail(f"{folder} lacks tensor {name.replace('.experts.', f'.experts.{expert}.')}, or it differs in "
                     f"shape from expert 0's; it is not a checkpoint of the model its config.json describes")
        tensors[name] = np.stack([arrays[expert].T for expert in range(len(arrays))])  # (num_experts, in, out)
    return tensors


def hf_name(name, model_type):
    """A parameter's name in model_type's Hugging Face checkpoint: blocks.3.attn.query.weight ->
    model.layers.3.self_attn.q_proj.weight; an Experts matrix, blocks.3.moe.experts.up ->
    model.layers.3.mlp.experts.up_proj.weight, as stack_experts names every expert's stacked."""
    module, leaf = (name, "weight") if ".experts." in name else name.rsplit(".", 1)  # Experts: no Linear layers
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    names = HF_BLOCK_NAMES | HF_MOE_NAMES[model_type]
    return f"model.layers.{block[1]}.{names[block[2]]}.{leaf}" if block else f"{HF_NAMES[module]}.{leaf}"


@torch.no_grad()
def load_pretrained(model, tensors, config):
    """Copy --init_from's tensors into the model, once every parameter has its tensor with the right shape
    and the checkpoint has no tensor left over (each refusal names the tensor). The layouts are the same: torch's and
    Hugging Face's Linear are both (out, in); Experts' (in, out) matrices get each expert's, stacked and transposed."""
    tensors = stack_experts(tensors, config.init_from)
    model_type = read_file(os.path.join(config.init_from, "config.json"), json.load, "a JSON config")["model_type"]
    params = {hf_name(name, model_type): param for name, param in model.named_parameters()}
    if config.tie_embeddings and "lm_head.weight" in tensors:  # a tied head saved anyway: the embedding, again
        if np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
            del tensors["lm_head.weight"]
    for name in sorted(params.keys() ^ {name for name in tensors if not re.fullmatch(HF_DERIVED, name)}):
        fail(f"{config.init_from} {'lacks' if name in params else 'has an unexpected'} tensor {name}; it is not a "
             f"checkpoint of the model its config.json describes")
    for name, param in params.items():
        if tensors[name].shape != param.shape:
            fail(f"{config.init_from}: {name} has shape {tensors[name].shape}, its config.json makes it "
                 f"{tuple(param.shape)}; the checkpoint and its config do not match")
    for name, param in params.items():
        param.copy_(torch.from_numpy(to_float32(tensors.pop(name), name, config.init_from)))  # its memory map closes once copied


# -----------------------------------------------------------------------------
# Sampling


def read_prompt(config, val_tokens, token_bytes):
    """The tokens sampling starts from: --prompt's file, which must use the data's vocabulary (bpe.py tokenizes a
    text file with the same tokenizer), or else seq_len / 4 tokens of the val split from its first non-blank line
    start: a prompt with no encoder needed."""
    if config.prompt:
        prompt, prompt_bytes = read_tokens(config.prompt)
        if prompt_bytes != token_bytes:
            fail(f"--prompt={config.prompt} is not in the vocabulary of {config.data}; tokenize it with the same "
                 f"tokenizer (python bpe.py ... --data={config.prompt})")
        return prompt.tolist()
    length = max(1, config.seq_len // 4)
    ends_line = np.array([b.endswith(b"\n") for b in token_bytes])[val_tokens[: len(val_tokens) - length]]
    line_starts = np.flatnonzero(ends_line[:-1] & ~ends_line[1:]) + 1  # after a line break, not on a blank line
    start = line_starts[0] if len(line_starts) else 0
    return val_tokens[start : start + length].tolist()


def sample(model, prompt, token_bytes, config):
    """Print the prompt and sample_tokens more, decoded."""
    print("sample:", flush=True)
    tokens = generate(model, prompt, config.sample_tokens, config.temperature, config.top_k)
    print(b"".join(token_bytes[t] for t in tokens).decode("utf-8", errors="replace"))


@torch.inference_mode()  # no autograd bookkeeping at all: a token costs ~200 small ops, each gets cheaper
def next_token(model, tokens, cache, position, last, temperature, top_k):
    """One sampling step: run tokens (at positions position, ...) through the model, then draw the next token from
    softmax(logits / temperature) at index last, optionally among the top_k most likely only."""
    tokens = torch.from_numpy(tokens).to(model.cos.device)  # (1, len(tokens)), where the model is
    logits, _, _ = model(tokens, cache=cache, position=position)  # (1, len(tokens), vocab_size)
    logits = logits[0, last] / temperature  # (vocab_size,)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = torch.where(logits < kth, -math.inf, logits)
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1)), cache


def generate(model, prompt, max_new_tokens, temperature, top_k, use_cache=True):
    """Sample max_new_tokens tokens one at a time. With the key/value cache the prompt runs through the model once
    (prefill) and each new token costs one position; the cache holds the positions this call needs, at most the
    model's max_len, and when the context fills it, its last half is kept and prefilled again. use_cache=False
    reruns the model over the last max_len tokens at every step: the slow path, kept for the tests and the
    benchmark."""
    model.eval()
    max_len = min(model.max_len, len(prompt) + max_new_tokens)  # the cache holds no more positions
    tokens = list(prompt)
    cache, position = None, 0  # position: how many tokens the cache holds
    for _ in range(max_new_tokens):
        if not use_cache:  # eager torch takes any length: no padding needed
            context = tokens[-max_len :]
            token, _ = next_token(model, np.array([context]), None, 0, -1, temperature, top_k)
        elif cache is None or position == max_len:  # first step, or the cache is full: prefill
            context = tokens[-max_len :] if cache is None else tokens[-max(1, max_len // 2) :]
            cache = model.new_cache(1, max_len)
            token, cache = next_token(model, np.array([context]), cache, 0, -1, temperature, top_k)
            position = len(context)
        else:  # one new position: the last token sampled
            token, cache = next_token(model, np.array([tokens[-1:]]), cache, position, 0, temperature, top_k)
            position += 1
        tokens.append(token)
    return tokens


# -----------------------------------------------------------------------------
# Command line
# The options, and the rules that keep a user's work safe: these helpers are the same in every model script.

SCRIPT = os.path.basename(__file__)
MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # this machine's, in bytes
# each Config field's comment, for --help (read once: inspect parses the whole file)
COMMENTS = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(Config), re.M))


DEVICES, DTYPES = ("auto", "cpu", "cuda", "mps"), ("auto", "float32", "bfloat16")
# the options that must be at least 1 (checked first, so model_checks divides by none of them)
POSITIVE = ("seq_len", "num_layers", "num_heads", "num_kv_heads", "model_dim", "num_experts", "experts_per_token",
            "expert_ffn_dim", "batch_size", "eval_interval", "eval_steps", "log_interval")


def model_checks(config):
    """(ok, message) for each rule on this model's own options. The rest of this section is the same in every
    model script."""
    head_dim = config.head_dim or config.model_dim // config.num_heads
    max_len = config.rope_scaling * (config.original_len or config.seq_len)  # positions RoPE serves
    cache_len = min(max_len, config.seq_len + config.sample_tokens)  # positions sampling caches (the prompt is short)
    return [
        (config.model_dim % config.num_heads == 0 or config.head_dim,
         f"--model_dim={config.model_dim} is not divisible by --num_heads={config.num_heads}; pick a multiple"),
        (config.num_heads % config.num_kv_heads == 0,
         f"--num_heads={config.num_heads} is not divisible by --num_kv_heads={config.num_kv_heads}; pick a divisor"),
        (head_dim % 2 == 0 and config.head_dim >= 0, f"head_dim {head_dim} must be even for RoPE's pairs"),
        (config.experts_per_token <= config.num_experts,
         f"--experts_per_token={config.experts_per_token} must be at most --num_experts={config.num_experts}"),
        (config.num_shared_experts >= 0, f"--num_shared_experts={config.num_shared_experts} must be >= 0"),
        (config.num_experts <= 64,  # moe_jax.py unrolls a loop over about 3 * num_experts blocks: a minute at 64
         f"--num_experts={config.num_experts} is more than 64, which moe_jax.py would take too long to compile"),
        (48 * config.num_layers * (config.num_experts + config.num_shared_experts) * config.model_dim
         * config.expert_ffn_dim < MEMORY,  # 3 matrices per expert, 16 bytes a weight
         f"--num_experts, --num_shared_experts and --expert_ffn_dim need more than this machine's memory; use fewer"),
        (config.balance in ("aux_loss", "bias"), f"--balance={config.balance} is not one of aux_loss, bias"),
        (min(config.aux_loss_weight, config.z_loss_weight, config.bias_update_rate) >= 0,
         "--aux_loss_weight, --z_loss_weight and --bias_update_rate must be >= 0"),
        (0 < config.norm_eps < 1, f"--norm_eps={config.norm_eps} must be in (0, 1)"),
        (config.rope_theta > 1, f"--rope_theta={config.rope_theta} must be > 1"),
        (config.rope_scaling >= 1, f"--rope_scaling={config.rope_scaling} must be >= 1 (1 = plain RoPE)"),
        (config.rope_type in ROPE_TYPES and config.original_len >= 0,
         f"--rope_type must be one of {', '.join(ROPE_TYPES)} and --original_len >= 0 (0 = seq_len)"),
        (config.seq_len <= max_len, f"--seq_len={config.seq_len} is longer than the {int(max_len)} positions RoPE "
         f"serves (rope_scaling * original_len); pass a smaller --seq_len"),
        (0 <= config.yarn_alpha < config.yarn_beta,
         f"--yarn_alpha={config.yarn_alpha} and --yarn_beta={config.yarn_beta} need 0 <= alpha < beta"),
        (8 * head_dim * (max_len + cache_len * config.num_layers * config.num_kv_heads) < MEMORY,
         f"the RoPE tables for rope_scaling * original_len positions and the KV cache need more than this machine's "
         f"memory; use a smaller --rope_scaling, --original_len, --seq_len or --sample_tokens"),
    ]


def tell(message):
    """One line on stderr, after the script's name (a line break in a path is shown as \\n)."""
    print(f"{SCRIPT}: {message}".replace("\n", "\\n").replace("\r", "\\r"), file=sys.stderr, flush=True)


def fail(message, status=2):
    """One line on stderr that names the problem and what to do, then exit: status 2 for a user's mistake (an
    option, a file), 1 for a run that diverged. No traceback."""
    tell(f"error: {message}")
    sys.exit(status)


def parse_bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_config(argv=None):
    """Every Config field but vocab_size is a --name=value option; --help shows the field comments. Every value is
    checked here, before any work: what could only fail later (a size too big for memory) fails now."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.error = fail  # argparse would print the usage too; one line is enough
    for field in fields(Config):
        if field.name != "vocab_size":
            parser.add_argument(f"--{field.name}", type=parse_bool if field.type is bool else field.type,
                                default=field.default, metavar=field.type.__name__, help=COMMENTS[field.name])
    config = Config(**vars(parser.parse_args(argv)))
    given = {arg[2:].split("=")[0] for arg in (sys.argv[1:] if argv is None else argv) if arg.startswith("--")}
    if config.init_from and not config.resume:  # the published model's options, which the command line may not change
        for name, value in pretrained_options(config.init_from).items():
            if name in given and getattr(config, name) != value:
                fail(f"--{name}={getattr(config, name)} contradicts {config.init_from}'s config.json ({name} "
                     f"{value}); drop --{name}")
            setattr(config, name, value)
    for name, value in asdict(config).items():  # first: the checks below then divide by no zero, compare no nan
        if name in POSITIVE and value < 1:
            fail(f"--{name}={value} must be at least 1")
        if type(value) is int and not -2**63 <= value < 2**63:
            fail(f"--{name}={value} is too large")
        if type(value) is float and not abs(value) <= 3.4e38:  # also false for nan
            fail(f"--{name}={value} must be a finite number within float32's range (3.4e38)")
    checks = model_checks(config) + [  # the same in every script
        (config.steps >= 1 or (config.steps == 0 and config.init_from),
         f"--steps={config.steps} must be at least 1, or 0 with --init_from=DIR (only sample from that model)"),
        (0 <= config.warmup_steps <= config.steps or config.steps == 0,
         f"--warmup_steps={config.warmup_steps} must be between 0 and --steps={config.steps}"),
        (0 <= config.min_learning_rate <= config.learning_rate,
         f"--min_learning_rate={config.min_learning_rate} must be in [0, --learning_rate={config.learning_rate}]"),
        (0 <= config.beta1 < 1 and 0 <= config.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)"),
        (config.weight_decay >= 0 and config.grad_clip > 0, "--weight_decay must be >= 0 and --grad_clip > 0"),
        (1e-6 <= config.temperature <= 1e6 and config.top_k >= 0 and config.sample_tokens >= 0,
         "--temperature must be in [1e-6, 1e6], --top_k and --sample_tokens >= 0"),
        (0 <= config.seed < 2**32, f"--seed={config.seed} must be in [0, 2**32)"),
        (config.device in DEVICES, f"--device={config.device} is unknown; choose one of {', '.join(DEVICES)}"),
        (config.dtype in DTYPES, f"--dtype={config.dtype} is unknown; choose one of {', '.join(DTYPES)}"),
        (os.path.isfile(config.data), f"data file {config.data} not found; pass --data=PATH (a text file or a .npy)"),
        (not config.prompt or os.path.isfile(config.prompt), f"prompt file {config.prompt} not found; pass an existing "
         f"file (a .npy made by bpe.py, or text with byte data)"),
        (not (config.init_from and config.resume), "--init_from starts a new run from published weights, --resume "
         "continues a checkpoint: pass one of them"),
        (os.path.isfile(os.path.join(config.out_dir, CHECKPOINT)) or not config.resume,
         f"--resume=true but there is no checkpoint {os.path.join(config.out_dir, CHECKPOINT)}; drop --resume or "
         f"pass the right --out_dir"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
    return config


def start_devices(config):
    """This process's device and, under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE for each of its
    processes), its rank, once it has joined the others: nccl between GPUs, gloo between CPUs. Settles --device=auto
    and --dtype=auto, and refuses (exit 2) a device that is not here, bfloat16 where it cannot run, and a batch the
    processes cannot share evenly. Only the first process (rank 0) prints."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    kind = next(name for name, ok in available.items() if ok) if config.device == "auto" else config.device
    try:
        rank, local_rank, processes = (int(os.environ.get(name, default)) for name, default in
                                       (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    except ValueError:
        rank = processes = -1
    if not 0 <= rank < processes:
        fail("RANK, LOCAL_RANK and WORLD_SIZE (torchrun sets them) must be whole numbers, 0 <= RANK < WORLD_SIZE; "
             "launch with torchrun or unset them")
    if not available[kind] or (kind == "cuda" and local_rank >= torch.cuda.device_count()):
        fail(f"--device={kind}: this machine has {'no' if not available[kind] else 'too few'} {kind} devices for "
             f"this process; pass --device=cpu, or --device=auto to take the best there is")
    device = torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind)
    if config.dtype == "auto":
        config.dtype = "bfloat16" if kind == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else "float32"
    ones = lambda: torch.ones(2, 2, device=device, dtype=getattr(torch, config.dtype))
    try:  # bfloat16 needs hardware or kernels the device may lack: try a matmul
        ones() @ ones()
    except (RuntimeError, TypeError) as error:
        fail(f"--dtype={config.dtype} does not run on {kind} here ({str(error)[:100]}); pass --dtype=float32")
    if config.batch_size % processes:
        fail(f"--batch_size={config.batch_size} is not divisible by the {processes} processes; pass a multiple")
    if processes > 1 and kind == "mps":
        fail("torchrun cannot join mps devices into a process group; run one process, or pass --device=cpu")
    if processes > 1:
        if kind == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        except (ValueError, RuntimeError) as error:  # no MASTER_ADDR, a port in use, a peer that never came
            fail(f"cannot join the other processes ({str(error).splitlines()[0][:150]}); launch with torchrun")
    if rank:
        sys.stdout = open(os.devnull, "w")  # the other processes compute, the first one reports
    print(f"devices: {processes} x {kind}{' (torchrun processes)' if processes > 1 else ''} | {config.dtype}")
    return device, rank


def check_memory(config):
    """Refuse (exit 2) sizes whose training cannot fit in this machine's memory, before any work. A lower bound:
    every block holds at least two model_dim x model_dim matrices, a weight costs 16 bytes with its gradient and
    AdamW's two moments, and backward keeps at least the logits, their gradient, 4 vectors per token and block, and
    one block's attention scores (jax materialises them; torch's fused kernel may not, but the twins refuse alike)."""
    weights = config.vocab_size * config.model_dim + 2 * config.num_layers * config.model_dim**2
    tokens = config.batch_size * config.seq_len
    scores = tokens * config.num_heads * config.seq_len
    needed = 16 * weights + 4 * (tokens * (2 * config.vocab_size + 4 * config.num_layers * config.model_dim) + scores)
    needed = needed if config.steps else 4 * weights  # --steps=0 only samples: the float32 weights
    if needed >= MEMORY:
        fail(f"{'training' if config.steps else 'sampling'} this model needs at least {needed / 2**30:.1f} GiB of "
             f"memory, this machine has "
             f"{MEMORY / 2**30:.1f}; use a smaller --batch_size, --seq_len, --model_dim or --num_layers")


def read_file(path, read, what):
    """read(the open file), or one line and exit 2 if the file cannot be read or is not what it should be."""
    try:
        with open(path, "rb") as f:
            return read(f)
    except Exception as error:  # whatever a damaged or foreign file makes the reader raise (loading runs no code)
        reason = (str(error).splitlines() or [""])[0][:200]
        fail(f"{path} is not {what} ({type(error).__name__}: {reason}); check the file or pass another one")


def check_meta(path, checkpoint, config):
    """Parse a checkpoint's meta (step, data RNG state, config) in place. Refuses (exit 2) a damaged checkpoint or
    another script's, one of a different model, and one already at --steps."""
    try:
        meta = json.loads(str(checkpoint["meta"])) if isinstance(checkpoint, dict) else None  # npz: a 0-d array
        np.random.default_rng().bit_generator.state = meta["data_rng"]  # raises for anything but a generator's state
        ours = (isinstance(meta["config"], dict) and set(meta["config"]) == {field.name for field in fields(Config)}
                and type(meta["step"]) is int and meta["step"] >= 0)
    except (TypeError, KeyError, IndexError, ValueError, OverflowError):  # no dict, no key, not JSON, no state
        ours = False
    if not ours:
        fail(f"{path} is damaged or not a {SCRIPT} checkpoint; choose another --out_dir")
    checkpoint["meta"] = meta
    for name in MODEL_FIELDS:  # the same type too: 16.0 or true is not the 16 or 1 of an option
        if (type(meta["config"][name]), meta["config"][name]) != (type(getattr(config, name)), getattr(config, name)):
            fail(f"{path} holds a model with {name}={meta['config'][name]}, not {getattr(config, name)}; "
                 f"pass the same model options or choose another --out_dir")
    if meta["step"] >= config.steps:
        fail(f"{path} is already at step {meta['step']}; pass a larger --steps to train further")


def check_arrays(path, saved, expected):
    """Refuse (exit 2) a checkpoint whose arrays are not exactly this model's: a name missing or unexpected, or a
    different shape or dtype."""
    describe = lambda array: f"{getattr(array, 'dtype', type(array).__name__)} {tuple(getattr(array, 'shape', ()))}"
    for name in sorted((saved.keys() - {"meta"}) ^ expected.keys()):
        fail(f"{path} {'lacks' if name in expected else 'has an unexpected'} array {name}, so it is not a checkpoint "
             f"of this model; choose another --out_dir")
    for name, array in expected.items():
        if describe(saved[name]) != describe(array):
            fail(f"{path}: {name} is {describe(saved[name])}, this model's is {describe(array)}; choose another "
                 f"--out_dir")


@contextlib.contextmanager
def locked_out_dir(config):
    """Create out_dir, check that files can be written in it, and hold an advisory lock on it until the run ends: a
    second run on the same out_dir is refused (exit 2) instead of replacing this one's checkpoints."""
    try:
        os.makedirs(config.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=config.out_dir).close()  # really write: permissions can mislead (root, mounts)
        lock = os.open(config.out_dir, os.O_RDONLY)
    except OSError as error:
        fail(f"cannot write in --out_dir={config.out_dir}: {error.strerror}; choose another --out_dir")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the lock closes, or the process ends
    except BlockingIOError:
        os.close(lock)
        fail(f"--out_dir={config.out_dir} is in use by another run; wait for it to end or choose another --out_dir")
    try:
        yield
    finally:
        os.close(lock)


def stop_if_diverged(step, config, **values):
    """A non-finite loss or weight norm means training diverged: stop before anything non-finite is saved, exit
    status 1 (not a usage mistake); out_dir keeps the last good checkpoint, if one was saved."""
    for name, value in values.items():
        if not math.isfinite(value):
            fail(f"{name} at step {step} is {value}: training diverged and stopped; {config.out_dir} keeps the last "
                 f"good checkpoint, if any; try a lower --learning_rate", status=1)


def read_losses(unchecked, config):
    """The training losses not read yet, [(step, loss)], as floats: the first that is not finite stops the run
    (stop_if_diverged). Empties the list and returns the last loss. Reading a jax loss waits for its step, so the
    loop reads them only at log lines and before saving, and jax runs ahead in between."""
    losses = [(step, float(loss)) for step, loss in unchecked]
    unchecked.clear()
    for step, loss in losses:
        stop_if_diverged(step, config, loss=loss)
    return losses[-1][1]


def stop_together(received):
    """torchrun: every process receives Ctrl-C, not necessarily during the same step. After each step they share what
    they received (the largest signal number), so that all of them stop after the same step."""
    if dist.is_initialized():
        signum = torch.tensor(received[:1] or [0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        received[:] = [int(signum)] if int(signum) else []


def leave_processes(status):
    """torchrun's processes end together: each waits here until all are here (so none ends before the first one has
    saved and sampled), leaves the process group, and exits at once with status, skipping the interpreter's shutdown,
    where gloo's threads can abort a finished run ("terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(status)


def quit_on_signal(when):
    """Outside the training loop there is nothing to save: Ctrl-C (SIGINT) or SIGTERM ends the script at once with
    one line and exit status 128 + the signal's number (130, 143). os._exit: no exception unwinds through the
    framework's internals, and no shutdown waits on its threads."""
    def handler(signum, frame):
        tell(f"stopped by {signal.Signals(signum).name} {when}")
        sys.stdout.flush()
        os._exit(128 + signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def stop_on_signal():
    """In the training loop Ctrl-C (SIGINT) or SIGTERM only raises a flag: the current step finishes, then the loop
    saves a checkpoint and exits. Returns the flag: the list of signals received."""
    received = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: received.append(signum))
    return received


def main(argv=None):
    quit_on_signal("before training; nothing was written")
    config = parse_config(argv)
    device, rank = start_devices(config)
    train_tokens, val_tokens, token_bytes, floor = load_data(config)
    if config.init_from and len(token_bytes) != config.vocab_size:
        fail(f"{config.data} has a vocabulary of {len(token_bytes)} tokens, {config.init_from} one of "
             f"{config.vocab_size}; tokenize it with the model's: python bpe.py --tokenizer={config.init_from} "
             f"--data=FILE")
    config.vocab_size = len(token_bytes)
    check_memory(config)  # now that vocab_size is known
    prompt = read_prompt(config, val_tokens, token_bytes)
    tensors = read_pretrained(config.init_from) if config.init_from else None  # memory-mapped: read when copied
    # --steps=0 writes nothing; with several processes, only the first one writes
    with locked_out_dir(config) if config.steps and rank == 0 else contextlib.nullcontext():
        checkpoint = open_checkpoint(config) if config.steps else None
        torch.manual_seed(config.seed)
        model = MoE(config)
        if config.init_from:  # every tensor is checked before any is copied
            load_pretrained(model, tensors, config)
            options = pretrained_options(config.init_from).items()  # what --resume=true will need to be told again
            print(f"loaded {config.init_from}: " + " ".join(f"--{k}={v}" for k, v in options if k != "vocab_size"))
        model.to(device)  # made on the CPU: the same initial weights on every device
        if config.steps == 0:  # only sample from the published model
            quit_on_signal("while sampling")
            if rank == 0:
                sample(model, prompt, token_bytes, config)
            return leave_processes(0) if dist.is_initialized() else None
        optimizer = make_optimizer(model, config)
        data_rng = np.random.default_rng(config.seed)
        start_step = 0
        if checkpoint is not None:
            start_step = restore_checkpoint(checkpoint, model, optimizer, data_rng, config)
            print(f"resuming from step {start_step}")
        byte_lengths = np.array([len(b) for b in token_bytes])
        tokens_per_byte = len(val_tokens) / byte_lengths[val_tokens].sum()  # 1 for a byte corpus
        print(f"data {config.data}: {len(train_tokens):,} train / {len(val_tokens):,} val tokens, "
              f"vocab_size {config.vocab_size}")
        total = sum(p.numel() for p in model.parameters())
        idle = config.num_layers * (config.num_experts - config.experts_per_token) * 3 * config.model_dim * \
            config.expert_ffn_dim  # the experts a token does not visit
        print(f"model: {total:,} parameters, {total - idle:,} active per token")
        train_step, eval_loss = make_steps(model, optimizer, config)

        stop_requested = stop_on_signal()  # the current step finishes, then we save and exit
        unchecked_losses = []  # (step, loss) not read yet: see read_losses
        tokens_per_step = config.batch_size * config.seq_len
        timer, timed_from = time.perf_counter(), start_step
        for step in range(start_step, config.steps):
            learning_rate = learning_rate_at(step, config)
            x, y = get_batch(train_tokens, data_rng, config)
            loss, balance = train_step(x, y, learning_rate)  # each process trains on its slice of the batch
            done = step + 1  # steps completed
            unchecked_losses.append((done, loss))
            stop_together(stop_requested)
            evaluating = done % config.eval_interval == 0 or done == config.steps
            if done % config.log_interval == 0 or evaluating or stop_requested:
                loss = read_losses(unchecked_losses, config)
            if done % config.log_interval == 0:
                ms = (time.perf_counter() - timer) * 1000 / (done - timed_from)
                aux_loss, z_loss = (float(value) for value in balance)
                print(f"step {done:5d}/{config.steps} | loss {loss:.4f} | aux {aux_loss:.3f} | z {z_loss:.3f} | "
                      f"lr {learning_rate:.1e} | {ms:.1f} ms/step | {tokens_per_step / ms:.1f}k tok/s", flush=True)
                timer, timed_from = time.perf_counter(), done
            if evaluating and rank == 0:  # the other processes wait for it in the next step's gradient average
                (train_loss, _), (val_loss, load) = (evaluate(eval_loss, split, config)
                                                     for split in (train_tokens, val_tokens))
                stop_if_diverged(done, config, train_loss=train_loss, val_loss=val_loss)
                bpb = val_loss / math.log(2) * tokens_per_byte
                share = load / load.mean(-1, keepdims=True)  # per layer and expert, 1 = the uniform share
                print(f"eval step {done:5d} | train {train_loss:.4f} | val {val_loss:.4f} | val bpb {bpb:.3f}"
                      + (f" | floor {floor:.3f}" if floor is not None else "") + " | load "
                      + " ".join(f"{row.min():.2f}x-{row.max():.2f}x" for row in share), flush=True)
            if (evaluating or stop_requested) and rank == 0:
                weight_norm = float(torch.nn.utils.get_total_norm(model.parameters()))
                stop_if_diverged(done, config, weight_norm=weight_norm)
                path = save_checkpoint(model, optimizer, done, data_rng, config)
                timer, timed_from = time.perf_counter(), done  # keep evaluation and saving out of ms/step
            if stop_requested:
                if rank == 0:
                    then = "continue with --resume=true" if done < config.steps else "training is complete"
                    tell(f"stopped by {signal.Signals(stop_requested[0]).name}: saved step {done} to {path}; {then}")
                if dist.is_initialized():
                    leave_processes(128 + stop_requested[0])
                sys.exit(128 + stop_requested[0])

        if rank == 0:
            quit_on_signal(f"while sampling; {path} holds the trained model")
            sample(model, prompt, token_bytes, config)
        if dist.is_initialized():
            leave_processes(0)


if __name__ == "__main__":
    main()
