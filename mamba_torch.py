"""Mamba in PyTorch, in one file: a selective state-space model, trained to predict the next byte/token.

No attention, no positions, no KV cache: each block mixes the sequence with a linear recurrence whose parameters
depend on the input (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"). Training
runs the recurrence for all positions at once with a parallel scan; sampling carries a fixed-size state from one
token to the next, so a token costs the same at position 10 or 10,000.
With the same weights it computes the same logits as state-spaces/mamba's reference (selective_scan_ref) and
Hugging Face's MambaForCausalLM: the same names (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), the same
float32 RMSNorm (eps 1e-5), an output head tied to the embedding.

Glossary: the paper's symbols (section 3, Algorithm 2) and their names and shapes here
    L        seq_len                 sequence length
    D        model_dim               width of the residual stream (section 3.4; Algorithm 2's D, the SSM's channels,
                                     is inner_dim here; and not the skip weight D below)
    E        expand                  inner_dim = E * D channels: the mixer works in a wider space, each channel
                                     with its own hidden state of N numbers
    N        state_dim               the size of each channel's hidden state
    x        x                       the SSM's input: in_proj's first half after the causal conv and SiLU,
                                     (batch_size, L, inner_dim)
    z        z                       the gate, in_proj's second half: out_proj(y * silu(z)), (batch_size, L, inner_dim)
    y        y                       the SSM's output, (batch_size, L, inner_dim)
    h        h                       the hidden state, (batch_size, inner_dim, N) per position
    Delta    dt                      step size per token and channel, softplus(dt_proj(..)), (batch_size, L, inner_dim)
    A        A = -exp(A_log)         negative: -A are the decay rates, per channel and state, input-independent,
                                     (inner_dim, N)
    B, C     B, C                    per-token input and output maps, from x_proj, (batch_size, L, N)
    D        D                       skip weight, y += D * x, (inner_dim,)
    A_bar    decay = exp(dt * A)     discretised A, (batch_size, L, inner_dim, N)
    B_bar x  inputs = dt * B * x     discretised input, (batch_size, L, inner_dim, N)
    the recurrence: h_t = A_bar_t * h_(t-1) + B_bar_t x_t,  y_t = C_t . h_t + D * x_t   (see sequential_scan and
    selective_scan)

    python mamba_torch.py                        # train on data/stories.txt, then sample
    python mamba_torch.py --scan=sequential      # the plain loop over time: the same numbers, slower
    python mamba_torch.py --sample_tokens=5000   # sampling is not limited to seq_len: the state does not grow
    python bpe.py --tokenizer=mamba-130m-hf --data=data/stories.txt   # a downloaded Hugging Face folder: README
    python mamba_torch.py --init_from=mamba-130m-hf --data=data/stories.txt.mamba-130m-hf.npy  # fine-tune it
    torchrun --standalone --nproc_per_node=4 mamba_torch.py --batch_size=64  # 4 GPUs, 16 sequences each (README)

diff me against mamba_jax.py: the same program in JAX, line by line.
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
    seq_len: int = 128  # tokens per training sequence (no positions: sampling may run past it)
    num_layers: int = 4  # number of Mamba blocks
    model_dim: int = 128  # width of the residual stream
    state_dim: int = 16  # N: the hidden state's size per channel
    conv_width: int = 4  # kernel width of the causal depthwise convolution before the scan
    expand: int = 2  # E: inner_dim = expand * model_dim, the width the mixer works in
    dt_rank: int = 0  # rank of the projection that makes dt; 0 = the reference's rule, ceil(model_dim / 16)
    dt_min: float = 0.001  # at init, dt is drawn log-uniformly in [dt_min, dt_max] for each channel
    dt_max: float = 0.1  # (a channel with small dt remembers long, one with large dt follows its input)
    scan: str = "parallel"  # how the forward pass runs the recurrence: parallel (log-depth) or sequential (a loop)
    batch_size: int = 8  # sequences per training step
    steps: int = 1500  # optimizer steps in total
    learning_rate: float = 2e-3  # peak learning rate, reached after warmup
    min_learning_rate: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # steps of linear warmup from 0 to learning_rate
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on weight matrices and embeddings only (not A_log)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this
    eval_interval: int = 500  # evaluate and save a checkpoint every this many steps (and at the end)
    eval_steps: int = 20  # batches per evaluation of each split
    log_interval: int = 100  # print the training loss every this many steps
    out_dir: str = "out/mamba_torch"  # where the checkpoint lives
    resume: bool = False  # continue from the checkpoint in out_dir
    init_from: str = ""  # a Hugging Face model folder (config.json, *.safetensors) to start from; sets model options
    sample_tokens: int = 300  # tokens to generate, any number: the recurrent state does not grow
    temperature: float = 0.8  # sampling temperature (lower = more conservative)
    top_k: int = 40  # sample only among the top_k most likely tokens (0 = all)
    prompt: str = ""  # a file to sample from: a .npy of the data's tokens (bpe.py), or text with byte data; "" = val


# the options that fix the weights' meaning; seq_len, scan and the dt init range may change on --resume
MODEL_FIELDS = ("vocab_size", "num_layers", "model_dim", "state_dim", "conv_width", "expand", "dt_rank")
CHECKPOINT = "ckpt.pt"  # the file in out_dir
SCANS = ("parallel", "sequential")
DT_FLOOR = 1e-4  # the reference clamps the initial dt to at least this (its dt_init_floor)


# -----------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without the mean subtraction and the bias, cheaper and
    as good. Computed in float32 whatever the input dtype, as the reference does, because the mean of squares is
    where low precision hurts."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., dim), rms 1 per vector
        return x32.type_as(x) * self.weight


def sequential_scan(decay, inputs):
    """The recurrence as written, one position at a time from h = 0: h_t = decay_t * h_(t-1) + inputs_t. decay and
    inputs: (batch_size, seq_len, inner_dim, state_dim); returns every h_t, the same shape. seq_len dependent steps of
    tiny operations: slow to train, kept for reading and for the tests (--scan=sequential)."""
    h = torch.zeros_like(inputs[:, 0])  # (batch_size, inner_dim, state_dim)
    states = []
    for t in range(inputs.shape[1]):
        h = decay[:, t] * h + inputs[:, t]  # (batch_size, inner_dim, state_dim)
        states.append(h)
    return torch.stack(states, dim=1)  # (batch_size, seq_len, inner_dim, state_dim)


def parallel_scan(decay, inputs):
    """The same h_t in about 2 log2(seq_len) rounds of whole-tensor operations. One position's update is the affine map
    h -> a * h + b, (a, b) = (decay_t, inputs_t); two in a row compose into one, (a1, b1) then (a2, b2) gives (a1 * a2,
    a2 * b1 + b2), and composition is associative, so the positions can be grouped in any order (Blelloch 1990, "Prefix
    sums and their applications"). Here: compose neighbours (0, 1), (2, 3), ... into a sequence half as long and scan it
    recursively, which gives h at every odd position; each even position is then one update from the odd one before it.
    jax.lax.associative_scan runs this recursion. It is exact: the loop's products and sums, only associated differently
    (float32 rounding, ~1e-7 of the states' size); a product of many decays underflows to 0 where the loop's
    contribution does too. Memory: each level keeps tensors half the size of the level above, about 2x the inputs in
    all, and O(seq_len) work. selective_scan calls it through ParallelScan, which adds the gradient."""
    seq_len = inputs.shape[1]
    if seq_len == 1:
        return inputs  # h_0 = b_0 (from h = 0)
    pairs = seq_len // 2
    a_even, a_odd = decay[:, 0::2], decay[:, 1::2]  # positions 0, 2, 4, ... and 1, 3, 5, ...
    b_even, b_odd = inputs[:, 0::2], inputs[:, 1::2]
    # (0, 1), (2, 3), ... composed, then scanned: h at positions 1, 3, 5, ... (batch_size, pairs, inner_dim, state_dim)
    h_odd = parallel_scan(a_even[:, :pairs] * a_odd, torch.addcmul(b_odd, a_odd, b_even[:, :pairs]))
    states = torch.empty_like(inputs)  # (batch_size, seq_len, inner_dim, state_dim)
    states[:, 1::2] = h_odd
    states[:, 0] = inputs[:, 0]  # position 0 starts from h = 0; position 2k (k >= 1) is one update from 2k - 1
    torch.addcmul(b_even[:, 1:], a_even[:, 1:], h_odd[:, : seq_len - pairs - 1], out=states[:, 2::2])
    return states


class ParallelScan(torch.autograd.Function):
    """parallel_scan with its gradient written out. With G_t the loss's whole gradient with respect to h_t (directly,
    and through every later position), G_t = dloss/dh_t + decay_(t+1) * G_(t+1): the same recurrence run backward in
    time, so it is one more parallel_scan, over the reversed sequence. Then dloss/dinputs_t = G_t and
    dloss/ddecay_t = G_t * h_(t-1). Autograd
    through the recursion instead keeps every level and copies every slice's gradient: 2.5x slower here."""

    @staticmethod
    def forward(ctx, decay, inputs):
        states = parallel_scan(decay, inputs)  # (batch_size, seq_len, inner_dim, state_dim)
        ctx.save_for_backward(decay, states)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        decay, states = ctx.saved_tensors
        decay_next = torch.cat([decay[:, 1:], torch.ones_like(decay[:, :1])], dim=1)  # decay_(t+1); none after the end
        grad_inputs = parallel_scan(decay_next.flip(1), grad_states.flip(1)).flip(1)  # G_t, from the end backward
        states_before = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)  # h_(t-1), h_(-1) = 0
        return grad_inputs * states_before, grad_inputs


def selective_scan(x, dt, A, B, C, D, h, scan):
    """The selective state-space model (the paper's Algorithm 2; the reference's selective_scan_ref) over a sequence,
    from the state h before it (None at the start of a text): y and the state after the last position. Selective:
    dt, B and C are computed from the input, so each token decides how much of the state to keep and what to write.
    Discretisation: A_bar = exp(dt * A) exactly (zero-order hold), but B_bar = dt * B, the first-order form of
    zero-order hold's (dt A)^-1 (exp(dt A) - 1) dt B, which the reference uses: the two agree as dt * A -> 0, and the
    simpler one costs no division. x, dt: (batch_size, seq_len, inner_dim); A: (inner_dim, state_dim); B, C:
    (batch_size, seq_len, state_dim); D: (inner_dim,); h: (batch_size, inner_dim, state_dim). Every h_t is held in
    memory, (batch_size, seq_len, inner_dim, state_dim), which the reference's fused CUDA kernel avoids. In float32
    also with --dtype=bfloat16, as that kernel: bfloat16's 8-bit mantissa would lose the products of many decays and
    the long sums of the recurrence."""
    x, B, C = x.float(), B.float(), C.float()  # bfloat16 under autocast (dt, A, D and h are float32 already)
    decay = torch.exp(dt[..., None] * A)  # (batch_size, seq_len, inner_dim, state_dim) A_bar, in (0, 1)
    inputs = (dt * x)[..., None] * B[:, :, None, :]  # (batch_size, seq_len, inner_dim, state_dim) B_bar x
    if h is not None:  # a carried state enters as part of the first input: a_0 h + b_0
        inputs = torch.cat([inputs[:, :1] + decay[:, :1] * h[:, None], inputs[:, 1:]], dim=1)
    states = ParallelScan.apply(decay, inputs) if scan == "parallel" else sequential_scan(decay, inputs)
    with torch.autocast(x.device.type, enabled=False):  # autocast would run this product in bfloat16
        y = (states @ C[..., None]).squeeze(-1)  # (batch_size, seq_len, inner_dim) y_t = C_t . h_t, for each channel
    return y + D * x, states[:, -1]  # the skip D * x, and h after the last position


class CausalConv(nn.Module):
    """A depthwise causal convolution over time (the reference's conv1d: an nn.Conv1d with groups=inner_dim, padding
    conv_width - 1 and the first seq_len outputs kept, the same as conv_width - 1 zeros on the left): each channel mixes
    its own last conv_width inputs and never a later one. Written as conv_width shifted multiply-adds, so the same code
    serves a whole sequence (training) and one new input after the conv_width - 1 carried ones (sampling)."""

    def __init__(self, inner_dim, conv_width):
        super().__init__()
        bound = conv_width**-0.5  # nn.Conv1d's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = conv_width
        self.weight = nn.Parameter(torch.empty(inner_dim, 1, conv_width).uniform_(-bound, bound))  # nn.Conv1d's layout
        self.bias = nn.Parameter(torch.empty(inner_dim).uniform_(-bound, bound))

    def forward(self, x, inputs_before):
        """x: (batch_size, seq_len, inner_dim); inputs_before: the conv_width - 1 inputs before x (zeros at the start
        of a text). Returns the output, the same shape as x, and the last conv_width - 1 inputs, for the next call."""
        seq_len, conv_width = x.shape[1], self.weight.shape[-1]
        # in x's dtype (in_proj's): bfloat16 with --dtype=bfloat16, as the reference's nn.Conv1d under autocast
        weight, bias, inputs_before = (v.type_as(x) for v in (self.weight, self.bias, inputs_before))
        window = torch.cat([inputs_before, x], dim=1)  # (batch_size, conv_width - 1 + seq_len, inner_dim)
        out = bias + sum(window[:, k : k + seq_len] * weight[:, 0, k] for k in range(conv_width))
        return out, window[:, seq_len:]  # (batch_size, seq_len, inner_dim), (batch_size, conv_width - 1, inner_dim)


class Mixer(nn.Module):
    """Mamba's sequence mixer (the paper's Figure 3; the reference's Mamba module), in place of attention: project up
    to inner_dim twice, a signal x and a gate z; run x through the causal conv and the selective SSM; gate the result
    with silu(z) and project back down. The attribute names are the reference's, so its weights map one to one."""

    def __init__(self, config):
        super().__init__()
        self.inner_dim = inner_dim = config.expand * config.model_dim
        self.dt_rank = config.dt_rank or math.ceil(config.model_dim / 16)
        self.state_dim, self.conv_width, self.scan = config.state_dim, config.conv_width, config.scan
        self.in_proj = nn.Linear(config.model_dim, 2 * inner_dim, bias=False)  # in_proj: x and the gate z
        self.conv1d = CausalConv(inner_dim, config.conv_width)  # conv1d: local context before the scan
        self.x_proj = nn.Linear(inner_dim, self.dt_rank + 2 * config.state_dim, bias=False)  # x_proj: dt, B, C from x
        self.dt_proj = nn.Linear(self.dt_rank, inner_dim)  # dt_proj: low rank up to one dt a channel
        self.A_log = nn.Parameter(torch.empty(inner_dim, config.state_dim))  # A_log: A = -exp(A_log) < 0
        self.D = nn.Parameter(torch.ones(inner_dim))  # D: the skip, y += D * x; starts at 1
        self.out_proj = nn.Linear(inner_dim, config.model_dim, bias=False)  # out_proj: back to the residual stream
        # init as the reference (Mamba.__init__ and _init_weights in state-spaces/mamba). S4D-real: A_n = -(n + 1),
        # the same for every channel, decay rates spread over 1 .. state_dim
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.arange(1, config.state_dim + 1, dtype=torch.float32)).repeat(inner_dim, 1))
            # dt log-uniform in [dt_min, dt_max] for each channel; the bias is softplus's inverse of it,
            # log(exp(dt) - 1) = dt + log(1 - exp(-dt)), so that at init softplus(dt_proj(...)) starts near dt
            dt = torch.exp(torch.empty(inner_dim).uniform_(math.log(config.dt_min), math.log(config.dt_max)))
            dt = dt.clamp(min=DT_FLOOR)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            # the reference's dt_init_std, a bound despite its name: nn.Linear's default too, as fan_in = dt_rank
            self.dt_proj.weight.uniform_(-self.dt_rank**-0.5, self.dt_rank**-0.5)
            # the other linear maps keep nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)); out_proj, which writes into
            # the residual stream, is divided by sqrt(num_layers) so the stream's variance does not grow with depth
            self.out_proj.weight /= math.sqrt(config.num_layers)

    def forward(self, x, state):
        """x: (batch_size, seq_len, model_dim) -> the same shape, and the state after the last position (conv inputs,
        h), which sampling carries to the next token. state: the one before the first position (None: zeros)."""
        if state is None:  # the start of a text: zeros before it, for the conv; h = 0, which the scans start from
            state = (x.new_zeros(x.shape[0], self.conv_width - 1, self.inner_dim), None)
        inputs_before, h = state
        x, z = self.in_proj(x).chunk(2, dim=-1)  # 2 x (batch_size, seq_len, inner_dim): the signal and the gate
        x, inputs_before = self.conv1d(x, inputs_before)
        x = F.silu(x)
        # the selection: the step size dt and the maps B, C are functions of each token
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.state_dim, self.state_dim], dim=-1)  # dt: dt_rank wide
        # Delta > 0: how far this token moves h; in float32 as the scan (the reference's kernel applies the softplus)
        dt = F.softplus(self.dt_proj(dt).float())  # (batch_size, seq_len, inner_dim)
        A = -torch.exp(self.A_log)  # (inner_dim, state_dim)
        y, h = selective_scan(x, dt, A, B, C, self.D, h, self.scan)  # y: (batch_size, seq_len, inner_dim)
        return self.out_proj(y * F.silu(z)), (inputs_before, h)  # (batch_size, seq_len, model_dim), the new state


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)). No feed-forward network: the mixer's expand-wide projections
    take its place, so a Mamba block has about the parameters of half a transformer block."""

    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.model_dim)
        self.mixer = Mixer(config)

    def forward(self, x, state):
        out, state = self.mixer(self.norm(x), state)
        return x + out, state  # (batch_size, seq_len, model_dim)


class Mamba(nn.Module):
    """Token embedding -> num_layers blocks -> final RMSNorm -> logits through the embedding matrix (tied, as the
    reference). No position embedding and no attention mask: order enters through the recurrence itself, which only
    runs forward, so the model is causal and can run past seq_len."""

    def __init__(self, config):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.model_dim)
        nn.init.normal_(self.token_embedding.weight, 0.0, 0.02)  # the reference's initializer_range
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.model_dim)

    def forward(self, tokens, targets=None, states=None):
        """Logits for tokens, the loss if targets are given, and each layer's state after the last token. states:
        each layer's state before the first token (sampling's; None at the start of a text)."""
        x = self.token_embedding(tokens)  # (batch_size, seq_len, model_dim)
        new_states = []
        for layer, block in enumerate(self.blocks):
            x, state = block(x, None if states is None else states[layer])  # (batch_size, seq_len, model_dim)
            new_states.append(state)
        x = self.final_norm(x)
        logits = F.linear(x, self.token_embedding.weight)  # (batch_size, seq_len, vocab_size)
        if targets is None:
            return logits, None, new_states
        # in float32 also with bfloat16: the log-softmax of many logits needs the precision
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # mean over batch_size * seq_len tokens
        return logits, loss, new_states

    def step(self, tokens, states):
        """The recurrent step: one token per sequence, (batch_size,), and each layer's state before it -> the next
        token's logits (batch_size, vocab_size) and the states after it. The forward pass over a single position: the
        conv reads the carried inputs, the scan is one update of h. Time and memory are the same at every position."""
        logits, _, states = self(tokens[:, None], states=states)
        return logits[:, 0], states


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
    """AdamW; weight decay only on tensors of two or more dims (matrices, embeddings), not biases or norm gains, nor
    A_log: a matrix of decay rates, not weights (the reference exempts it, and D)."""
    decayed = lambda name, p: p.ndim >= 2 and not name.endswith("A_log")
    decay = [p for name, p in model.named_parameters() if decayed(name, p)]
    no_decay = [p for name, p in model.named_parameters() if not decayed(name, p)]
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


def make_steps(model, optimizer, config):
    """The train step (one AdamW update at the given learning rate) and the evaluation loss, as functions of
    numpy batches of batch_size sequences. The jax twin compiles both; torch runs them eagerly. Data parallel
    (torchrun): each process trains on its slice of the batch, and DistributedDataParallel averages the gradients
    over the processes during backward, so every process makes the update one process makes on the whole batch."""
    device = next(model.parameters()).device
    rank, processes = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = slice(rank * config.batch_size // processes, (rank + 1) * config.batch_size // processes)  # this process's
    # forward_sync_buffers=False: the buffers are constants that every process already holds
    trained = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False) if processes > 1 else model
    # bfloat16: autocast runs matmuls (and what follows them) in bfloat16; weights, gradients and AdamW stay float32
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=config.dtype == "bfloat16")
    to_device = lambda array: torch.from_numpy(array).to(device)

    def train_step(x, y, learning_rate):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        with autocast():
            _, loss, _ = trained(to_device(x[rows]), to_device(y[rows]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        loss = loss.detach()  # the value: its graph is freed
        if processes > 1:  # the mean of the slices' losses: the whole batch's loss, as one process computes it
            dist.all_reduce(loss)
            loss = loss / processes
        return loss

    @torch.no_grad()
    def eval_loss(x, y):
        with autocast():
            return model(to_device(x), to_device(y))[1]

    return train_step, eval_loss


def evaluate(eval_loss, tokens, config):
    """Mean loss over eval_steps batches from a generator re-seeded at every evaluation: evaluations compare with
    each other, and the training batches do not depend on when we evaluate."""
    rng = np.random.default_rng(config.seed + 1)
    losses = [float(eval_loss(*get_batch(tokens, rng, config))) for _ in range(config.eval_steps)]
    return float(np.mean(losses))


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
# each tensor of the checkpoint has one parameter here: getting a published model's logits proves that the model
# above is the real thing, and training on from there is fine-tuning.

HF_MODEL_TYPES = ("mamba",)  # Mamba 1 as MambaForCausalLM: state-spaces/mamba-130m-hf ... mamba-2.8b-hf
HF_OPTIONS = {"vocab_size": "vocab_size", "num_hidden_layers": "num_layers", "hidden_size": "model_dim",
              "state_size": "state_dim", "conv_kernel": "conv_width", "expand": "expand", "time_step_rank": "dt_rank"}
# keys whose other values would change the function computed above (rms_norm: the reference's switch, false is
# LayerNorm); the rest of config.json does not, and is not read: token ids, dtype, versions, the init's time_step_*
# (dt_min and dt_max keep their values: the weights are loaded), initializer_range, rescale_prenorm_residual, the
# kernel's use_mambapy, use_associative_scan, fused_add_norm, and residual_in_fp32 (here every residual is float32)
HF_FIXED = {"hidden_act": "silu", "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True, "rms_norm": True}
# the checkpoint's name of each module: blocks.3.mixer.in_proj.weight <-> backbone.layers.3.mixer.in_proj.weight;
# inside a block the names are the reference's already
HF_NAMES = {"token_embedding": "backbone.embeddings", "final_norm": "backbone.norm_f"}
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # BF16 as raw 16-bit words: see to_float32


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
    options = {field: hf[key] for key, field in HF_OPTIONS.items() if hf.get(key) is not None}
    if options.get("dt_rank") == "auto":  # Hugging Face's word for the reference's rule, ceil(model_dim / 16)
        options["dt_rank"] = 0
    kinds = {field.name: field.type for field in fields(Config)}
    for name, value in options.items():  # JSON has one kind of number: 1e-06 is a float, 16 must be an int
        if kinds[name] is float and type(value) is int:
            options[name] = value = float(value)
        if type(value) is not kinds[name]:
            fail(f"{path}: the value {value!r} for this script's {name} is not a {kinds[name].__name__}")
    inner_dim = options.get("expand", Config.expand) * options.get("model_dim", Config.model_dim)
    if hf.get("intermediate_size", inner_dim) != inner_dim:  # Hugging Face recomputes it; a mismatch is an error
        fail(f"{path}: intermediate_size={hf['intermediate_size']!r} is not expand * hidden_size = {inner_dim}; the "
             f"config contradicts itself")
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


def hf_name(name):
    """A parameter's name in the Hugging Face checkpoint: blocks.3.norm.weight -> backbone.layers.3.norm.weight."""
    module, leaf = name.rsplit(".", 1)
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    return f"backbone.layers.{block[1]}.{block[2]}.{leaf}" if block else f"{HF_NAMES[module]}.{leaf}"


@torch.no_grad()
def load_pretrained(model, tensors, config):
    """Copy --init_from's tensors into the model, once every parameter has its tensor with the right shape
    and the checkpoint has no tensor left over (each refusal names the tensor). The layouts are the same: torch's and
    Hugging Face's Linear are both (out, in)."""
    params = {hf_name(name): param for name, param in model.named_parameters()}
    if "lm_head.weight" in tensors:  # a tied head saved anyway: the embedding, again
        if np.array_equal(tensors["lm_head.weight"], tensors.get("backbone.embeddings.weight")):
            del tensors["lm_head.weight"]
    for name in sorted(params.keys() ^ tensors.keys()):
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
    """Print the recurrent state's size, then the prompt and sample_tokens more, decoded."""
    print(f"sample (recurrent state: {state_bytes(config):,} bytes, the same at any length):", flush=True)
    tokens = generate(model, prompt, config.sample_tokens, config.temperature, config.top_k)
    print(b"".join(token_bytes[t] for t in tokens).decode("utf-8", errors="replace"))


@torch.inference_mode()  # no autograd bookkeeping at all: a token costs ~100 small ops, each gets cheaper
def next_token(model, tokens, states, last, temperature, top_k):
    """One sampling step: the next token's logits, from a whole text (1, length) through the parallel forward pass,
    read at index last, or, given the states before it, from one token (1, 1) through the recurrent step; then draw
    it from softmax(logits / temperature), optionally among the top_k most likely only."""
    tokens = torch.from_numpy(tokens).to(model.token_embedding.weight.device)  # onto the model's device
    if states is None:
        logits, _, states = model(tokens)  # (1, length, vocab_size)
        logits = logits[0, last]  # (vocab_size,)
    else:
        logits, states = model.step(tokens[:, 0], states)  # (1, vocab_size)
        logits = logits[0]
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = torch.where(logits < kth, -math.inf, logits)
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1)), states


def generate(model, prompt, max_new_tokens, temperature, top_k, recurrent=True):
    """Sample max_new_tokens tokens one at a time. The prompt runs through the parallel forward pass once (prefill);
    its final states go to the recurrent step, which takes each new token in the same time and memory: nothing grows
    with the text (no KV cache: the states are all the model keeps of the past), so sampling runs past seq_len.
    recurrent=False reruns the forward pass over the whole text at every step: the slow path, kept for the tests and
    the benchmark."""
    model.eval()
    tokens, states = list(prompt), None
    for _ in range(max_new_tokens):
        if not recurrent:  # eager torch takes any length: no padding needed
            token, _ = next_token(model, np.array([tokens]), None, -1, temperature, top_k)
        elif states is None:  # first step: prefill the prompt
            token, states = next_token(model, np.array([tokens]), None, -1, temperature, top_k)
        else:  # one new position: the last token sampled
            token, states = next_token(model, np.array([tokens[-1:]]), states, 0, temperature, top_k)
        tokens.append(token)
    return tokens


def state_bytes(config):
    """The recurrent state's size per sequence: per layer, the conv's last conv_width - 1 inputs and h, in float32."""
    return 4 * config.num_layers * config.expand * config.model_dim * (config.conv_width - 1 + config.state_dim)


# -----------------------------------------------------------------------------
# Command line
# The options, and the rules that keep a user's work safe: these helpers are the same in every model script.

SCRIPT = os.path.basename(__file__)
MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # this machine's, in bytes
# each Config field's comment, for --help (read once: inspect parses the whole file)
COMMENTS = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(Config), re.M))


DEVICES, DTYPES = ("auto", "cpu", "cuda", "mps"), ("auto", "float32", "bfloat16")
# the options that must be at least 1 (checked first, so model_checks divides by none of them)
POSITIVE = ("seq_len", "num_layers", "model_dim", "state_dim", "conv_width", "expand", "batch_size", "eval_interval",
            "eval_steps", "log_interval")


def model_checks(config):
    """(ok, message) for each rule on this model's own options. The rest of this section is the same in every
    model script."""
    return [
        (config.dt_rank >= 0, f"--dt_rank={config.dt_rank} must be >= 0 (0: the reference's ceil(model_dim / 16))"),
        (0 < config.dt_min < config.dt_max <= 100,  # dt = 100 already forgets everything: exp(-100 * n) = 0
         f"--dt_min={config.dt_min} and --dt_max={config.dt_max} need 0 < dt_min < dt_max <= 100"),
        (config.scan in SCANS, f"--scan={config.scan} is not one of {', '.join(SCANS)}"),
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
    every block holds in_proj, out_proj, the conv, x_proj, dt_proj and A_log, inner_dim * (3 * model_dim +
    conv_width + 2 * dt_rank + 3 * state_dim) weights; a weight costs 16 bytes with its gradient and AdamW's two
    moments; and backward keeps at least the logits, their gradient, per block and token the scan's decays, inputs
    and states, 3 * inner_dim * state_dim numbers, and per block the conv's window over conv_width - 1 + seq_len
    positions (the twins refuse alike)."""
    inner_dim = config.expand * config.model_dim
    dt_rank = config.dt_rank or math.ceil(config.model_dim / 16)
    per_block = inner_dim * (3 * config.model_dim + config.conv_width + 2 * dt_rank + 3 * config.state_dim)
    weights = config.vocab_size * config.model_dim + config.num_layers * per_block
    tokens = config.batch_size * config.seq_len
    window = config.batch_size * (config.conv_width - 1 + config.seq_len) * inner_dim
    needed = (16 * weights + 4 * tokens * (2 * config.vocab_size + 3 * config.num_layers * inner_dim * config.state_dim)
              + 4 * config.num_layers * window)
    needed = needed if config.steps else 4 * weights  # --steps=0 only samples: the float32 weights
    if needed >= MEMORY:
        fail(f"{'training' if config.steps else 'sampling'} this model needs at least {needed / 2**30:.1f} GiB of "
             f"memory, this machine has "
             f"{MEMORY / 2**30:.1f}; use a smaller --batch_size, --seq_len, --model_dim, --expand, --state_dim, "
             f"--dt_rank, --conv_width or --num_layers")


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
        model = Mamba(config)
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
        print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
        train_step, eval_loss = make_steps(model, optimizer, config)

        stop_requested = stop_on_signal()  # the current step finishes, then we save and exit
        unchecked_losses = []  # (step, loss) not read yet: see read_losses
        tokens_per_step = config.batch_size * config.seq_len
        timer, timed_from = time.perf_counter(), start_step
        for step in range(start_step, config.steps):
            learning_rate = learning_rate_at(step, config)
            x, y = get_batch(train_tokens, data_rng, config)
            loss = train_step(x, y, learning_rate)  # each process trains on its slice of the batch
            done = step + 1  # steps completed
            unchecked_losses.append((done, loss))
            stop_together(stop_requested)
            evaluating = done % config.eval_interval == 0 or done == config.steps
            if done % config.log_interval == 0 or evaluating or stop_requested:
                loss = read_losses(unchecked_losses, config)
            if done % config.log_interval == 0:
                ms = (time.perf_counter() - timer) * 1000 / (done - timed_from)
                print(f"step {done:5d}/{config.steps} | loss {loss:.4f} | lr {learning_rate:.1e} | "
                      f"{ms:.1f} ms/step | {tokens_per_step / ms:.1f}k tok/s", flush=True)
                timer, timed_from = time.perf_counter(), done
            if evaluating and rank == 0:  # the other processes wait for it in the next step's gradient average
                train_loss, val_loss = (evaluate(eval_loss, split, config)
                                        for split in (train_tokens, val_tokens))
                stop_if_diverged(done, config, train_loss=train_loss, val_loss=val_loss)
                bpb = val_loss / math.log(2) * tokens_per_byte
                print(f"eval step {done:5d} | train {train_loss:.4f} | val {val_loss:.4f} | val bpb {bpb:.3f}"
                      + (f" | floor {floor:.3f}" if floor is not None else ""), flush=True)
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
