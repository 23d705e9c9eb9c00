"""GPT-2 in JAX (flax.nnx + optax), in one file: a decoder-only transformer trained to predict the next byte/token.

Follows GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"): pre-LayerNorm
blocks, causal multi-head self-attention, a GELU MLP of width 4 * model_dim, learned position embeddings
and an output head tied to the token embedding. Two other position schemes can replace the learned one:
the fixed sin/cos table of "Attention Is All You Need" (Vaswani et al. 2017) and ALiBi's linear distance
penalty on the attention scores ("Train Short, Test Long", Press et al. 2021).

    python gpt_jax.py                                    # train on data/stories.txt, then sample
    python gpt_jax.py --position_embedding=alibi --steps=500
    python gpt_jax.py --resume=true --steps=4000         # continue the checkpoint in out/gpt_jax
    python bpe.py --tokenizer=gpt2 --data=data/stories.txt   # a downloaded Hugging Face folder: README
    python gpt_jax.py --init_from=gpt2 --data=data/stories.txt.gpt2.npy  # fine-tune it
    python gpt_jax.py --batch_size=64      # every GPU jax sees joins one mesh (README: several devices)

diff me against gpt_torch.py: the same program in PyTorch, line by line.
"""

import signal

if __name__ == "__main__":  # Ctrl-C while the libraries below load (seconds): end at once, no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import contextlib
import fcntl
import functools
import inspect
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from jax.tree_util import keystr

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    data: str = "data/stories.txt"  # a UTF-8 text file (bytes are tokens) or a bpe.py .npy token file
    seed: int = 1337  # seeds the weights, the batches, dropout and sampling
    device: str = "auto"  # cpu, cuda or mps (jax-metal); auto: jax's default. Every such device joins the mesh
    dtype: str = "auto"  # float32 or bfloat16 (matmuls; weights stay float32); auto: bfloat16 on CUDA from Ampere on
    vocab_size: int = 256  # set from the data at start (256 for bytes); not a command-line option
    seq_len: int = 128  # tokens per training sequence, the longest context the model sees
    num_layers: int = 4  # number of transformer blocks
    num_heads: int = 4  # attention heads per block; head_dim = model_dim // num_heads
    model_dim: int = 128  # width of the residual stream; the MLP is 4 * model_dim wide
    position_embedding: str = "learned"  # learned (GPT-2), sinusoidal (Vaswani et al.) or alibi (Press et al.)
    dropout: float = 0.0  # dropout probability during training (0 = off, fine for small data)
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
    out_dir: str = "out/gpt_jax"  # where the checkpoint lives
    resume: bool = False  # continue from the checkpoint in out_dir
    init_from: str = ""  # a Hugging Face model folder (config.json, *.safetensors) to start from; sets model options
    sample_tokens: int = 300  # tokens to generate at the end
    temperature: float = 0.8  # sampling temperature (lower = more conservative)
    top_k: int = 40  # sample only among the top_k most likely tokens (0 = all)
    prompt: str = ""  # a file to sample from: a .npy of the data's tokens (bpe.py), or text with byte data; "" = val


POSITION_EMBEDDINGS = ("learned", "sinusoidal", "alibi")
MODEL_FIELDS = ("vocab_size", "seq_len", "num_layers", "num_heads", "model_dim", "position_embedding")
CHECKPOINT = "ckpt.npz"  # the file in out_dir


# -----------------------------------------------------------------------------
# Model


def residual_std(config):
    """GPT-2 init: the two projections that write into the residual stream get 0.02 / sqrt(2 * num_layers), so
    the stream's variance does not grow with depth."""
    return 0.02 / math.sqrt(2 * config.num_layers)


normal = nnx.initializers.normal  # GPT-2 init: N(0, 0.02) weights; flax starts biases at 0 and LayerNorm at 1


def compute_dtype(config):
    """The dtype of the matmuls and the activations after them: bfloat16 with --dtype=bfloat16, where the parameters
    stay float32 (nnx.Linear's dtype casts them for the product), as torch's autocast does."""
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def sinusoidal_table(seq_len, model_dim):
    """Vaswani et al. 2017, section 3.5: PE[pos, 2i] = sin(pos / 10000^(2i/model_dim)), PE[pos, 2i+1] = cos(same).
    Fixed rather than learned: wavelengths in a geometric progression give each position a distinct code."""
    angle = np.arange(seq_len)[:, None] / 10000 ** (np.arange(0, model_dim, 2) / model_dim)  # (seq_len, model_dim/2)
    table = np.zeros((seq_len, model_dim), np.float32)  # (seq_len, model_dim)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : model_dim // 2])  # an odd model_dim has one more sine than cosine column
    return table


def alibi_slopes(num_heads):
    """Press et al. 2021, section 3: head h penalizes distance with slope 2^(-8(h+1)/n), a geometric sequence. For
    n not a power of two: the slopes for the power of two p below n, then every other slope for 2p."""
    def power_of_two_slopes(n):
        return [2 ** (-8 * (h + 1) / n) for h in range(n)]
    p = 2 ** int(math.log2(num_heads))
    return np.array(power_of_two_slopes(p) + power_of_two_slopes(2 * p)[0::2][: num_heads - p], np.float32)


def alibi_bias(num_heads, seq_len):
    """Additive attention bias: -slope_h * (i - j) for key j <= query i, and -inf for j > i (the causal mask).
    ALiBi adds no position embedding at all: recency is the only position signal."""
    position = np.arange(seq_len)
    distance = position[None, :] - position[:, None]  # (seq_len, seq_len): j - i, <= 0 for visible keys
    bias = alibi_slopes(num_heads)[:, None, None] * distance  # (num_heads, seq_len, seq_len)
    return np.where(distance <= 0, bias, -np.inf).astype(np.float32)


class Attention(nnx.Module):
    """Causal multi-head self-attention: every position mixes the values of itself and earlier positions,
    out = softmax(query @ key^T * head_dim**-0.5 + mask) @ value, mask = 0 where key j <= query i, else -inf
    (plus ALiBi's bias). Written out here; XLA fuses the pieces."""

    def __init__(self, config, rngs):
        self.num_heads = config.num_heads
        self.qkv = nnx.Linear(config.model_dim, 3 * config.model_dim, kernel_init=normal(0.02),
                              dtype=compute_dtype(config), rngs=rngs)
        self.out_proj = nnx.Linear(config.model_dim, config.model_dim, kernel_init=normal(residual_std(config)),
                                   dtype=compute_dtype(config), rngs=rngs)
        self.attn_dropout = nnx.Dropout(config.dropout)  # on the attention probabilities
        self.resid_dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, alibi, rngs):
        batch_size, seq_len, model_dim = x.shape
        head_dim = model_dim // self.num_heads
        # XLA on CPU turns the weight gradient of a matmul over (batch_size, seq_len, ...) into a transposed copy
        # plus a matmul; over (batch_size * seq_len, ...) it is one matmul (~15% faster training here and in MLP)
        x = x.reshape(batch_size * seq_len, model_dim)
        query, key, value = jnp.split(self.qkv(x), 3, axis=-1)  # 3 x (batch_size * seq_len, model_dim)
        query, key, value = (t.reshape(batch_size, seq_len, self.num_heads, head_dim).transpose(0, 2, 1, 3)
                             for t in (query, key, value))  # 3 x (batch_size, num_heads, seq_len, head_dim)
        scores = query @ key.swapaxes(-2, -1) * head_dim**-0.5  # (batch_size, num_heads, seq_len, seq_len)
        causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))  # (seq_len, seq_len): key j <= query i
        scores = jnp.where(causal, scores, -jnp.inf)
        if alibi is not None:
            scores = scores + alibi  # (num_heads, seq_len, seq_len) broadcasts over batch
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(value.dtype)  # float32 also in bfloat16
        probs = self.attn_dropout(probs, deterministic=rngs is None, rngs=rngs)
        out = probs @ value  # (batch_size, num_heads, seq_len, head_dim)
        out = out.transpose(0, 2, 1, 3).reshape(batch_size * seq_len, model_dim)  # (batch_size * seq_len, model_dim)
        out = self.resid_dropout(self.out_proj(out), deterministic=rngs is None, rngs=rngs)
        return out.reshape(batch_size, seq_len, model_dim)


class MLP(nnx.Module):
    """Position-wise feed-forward network: widen to ffn_dim = 4 * model_dim, GELU (GPT-2's tanh approximation),
    project back. This is where most of the parameters, and most of the per-token computation, live."""

    def __init__(self, config, rngs):
        ffn_dim = 4 * config.model_dim
        self.up = nnx.Linear(config.model_dim, ffn_dim, kernel_init=normal(0.02), dtype=compute_dtype(config),
                             rngs=rngs)
        self.down = nnx.Linear(ffn_dim, config.model_dim, kernel_init=normal(residual_std(config)),
                               dtype=compute_dtype(config), rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, rngs):
        batch_size, seq_len, model_dim = x.shape
        x = x.reshape(batch_size * seq_len, model_dim)  # 2D matmuls: see Attention
        x = jax.nn.gelu(self.up(x), approximate=True)  # (batch_size * seq_len, ffn_dim)
        x = self.dropout(self.down(x), deterministic=rngs is None, rngs=rngs)  # (batch_size * seq_len, model_dim)
        return x.reshape(batch_size, seq_len, model_dim)


class Block(nnx.Module):
    """Pre-LayerNorm residual block (GPT-2): x + attn(norm(x)), then x + ffn(norm(x)). Normalizing inside the
    branches leaves the residual stream an identity path, which keeps deep stacks trainable."""

    def __init__(self, config, rngs):
        self.attn_norm = nnx.LayerNorm(config.model_dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.attn = Attention(config, rngs)
        self.ffn_norm = nnx.LayerNorm(config.model_dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.ffn = MLP(config, rngs)

    def __call__(self, x, alibi, rngs):
        x = x + self.attn(self.attn_norm(x), alibi, rngs)  # (batch_size, seq_len, model_dim)
        return x + self.ffn(self.ffn_norm(x), rngs)


class GPT(nnx.Module):
    """Token embedding (+ positions) -> num_layers blocks -> final LayerNorm -> logits through the transposed
    token embedding (weight tying: one matrix both reads and writes tokens, as in GPT-2).
    rngs: an nnx.Rngs with a dropout stream while training; None evaluates without dropout."""

    def __init__(self, config, rngs):
        self.seq_len = config.seq_len
        self.token_embedding = nnx.Embed(config.vocab_size, config.model_dim, embedding_init=normal(0.02), rngs=rngs)
        learned = config.position_embedding == "learned"
        self.position_embedding = nnx.Embed(config.seq_len, config.model_dim, embedding_init=normal(0.02),
                                            rngs=rngs) if learned else None
        # the fixed tables are numpy constants, made in __call__: jit folds them into the compiled program
        self.positions = config.position_embedding
        self.num_heads = config.num_heads
        self.embedding_dropout = nnx.Dropout(config.dropout)
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
        self.final_norm = nnx.LayerNorm(config.model_dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.dtype = compute_dtype(config)

    def __call__(self, tokens, targets=None, rngs=None):
        batch_size, seq_len = tokens.shape
        x = self.token_embedding(tokens)  # (batch_size, seq_len, model_dim)
        if self.position_embedding is not None:
            x = x + self.position_embedding(jnp.arange(seq_len))  # (seq_len, model_dim) broadcasts over batch
        if self.positions == "sinusoidal":
            x = x + sinusoidal_table(seq_len, x.shape[-1])
        x = self.embedding_dropout(x, deterministic=rngs is None, rngs=rngs)
        alibi = alibi_bias(self.num_heads, seq_len) if self.positions == "alibi" else None
        for block in self.blocks:
            x = block(x, alibi, rngs)  # (batch_size, seq_len, model_dim)
        embedding = self.token_embedding.embedding[...].astype(self.dtype)  # (vocab_size, model_dim), the tied head
        logits = self.final_norm(x).astype(self.dtype) @ embedding.T  # (batch_size, seq_len, vocab_size)
        if targets is None:
            return logits, None
        # in float32 also with bfloat16: the log-softmax of many logits needs the precision
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()
        return logits, loss


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
    return tokens[index].astype(np.int32), tokens[index + 1].astype(np.int32)  # jax's default int


# -----------------------------------------------------------------------------
# Training


def make_optimizer(config):
    """AdamW but its learning rate, which the train step applies as torch's loop does (a number per step, so the
    compiled step serves any schedule): clip the global gradient norm, Adam's update, then decoupled weight decay,
    only on tensors of two or more dims (matrices, embeddings), not biases or norm gains."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.scale_by_adam(config.beta1, config.beta2),
                       optax.add_decayed_weights(config.weight_decay, mask=decay_mask))


def learning_rate_at(step, config):
    """Linear warmup from 0 over warmup_steps, then cosine decay from learning_rate to min_learning_rate at the
    last step. step counts the updates done before this one (0 for the first)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)  # 0 -> 1
    cosine = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
    return config.min_learning_rate + cosine * (config.learning_rate - config.min_learning_rate)


def make_steps(graphdef, optimizer, dropout_key, mesh):
    """The train step (one AdamW update) and the evaluation loss, as functions of numpy batches of batch_size
    sequences, each compiled once by jax.jit as a pure function of the parameters (nnx.merge inside): cheaper per call
    than nnx.jit, which walks the module graph each time. Data parallel: the batch is split by rows over the mesh's
    devices, the parameters are replicated on each, and jit compiles one program for them all, in which XLA adds the
    gradients' sum over the devices; so every device makes the update one device makes on the whole batch."""
    def loss_fn(params, x, y, key):
        rngs = None if key is None else nnx.Rngs(dropout=key)  # None: dropout off
        return nnx.merge(graphdef, params)(x, y, rngs)[1]

    @partial(jax.jit, donate_argnums=(0, 1))  # params and optimizer state are updated in place
    def train_step(params, opt_state, x, y, learning_rate, step):
        key = jax.random.fold_in(dropout_key, step)  # a function of the step: resuming needs no key state
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - learning_rate * u, params, updates)  # AdamW's step: -lr * update
        return params, opt_state, loss

    eval_loss = jax.jit(partial(loss_fn, key=None))
    shard = lambda batch: shard_batch(batch, mesh)
    return (lambda params, opt_state, x, y, *rest: train_step(params, opt_state, shard(x), shard(y), *rest),
            lambda params, x, y: eval_loss(params, shard(x), shard(y)))


def shard_batch(batch, mesh):
    """numpy (batch_size, seq_len) -> one array split by rows over the mesh axis "data": each device holds
    batch_size / devices rows. With several processes, each supplies only its own rows."""
    part = len(batch) // jax.process_count()
    mine = batch[jax.process_index() * part : (jax.process_index() + 1) * part]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), mine, batch.shape)


def evaluate(eval_loss, params, tokens, config):
    """Mean loss over eval_steps batches from a generator re-seeded at every evaluation: evaluations compare with
    each other, and the training batches do not depend on when we evaluate."""
    rng = np.random.default_rng(config.seed + 1)
    losses = [float(eval_loss(params, *get_batch(tokens, rng, config))) for _ in range(config.eval_steps)]
    return float(np.mean(losses))


def checkpoint_arrays(state):
    """Every array of a checkpoint by name: its path in state, the dict of trees the run keeps (parameters, optimizer
    state, ...): params/blocks/0/attn/query/kernel, opt_state/1/0/mu/..., ..."""
    return {keystr(path, simple=True, separator="/"): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def open_checkpoint(config):
    """The checkpoint to resume ({name: array}, with its meta parsed), or None for a fresh run. Refuses (exit 2) to
    overwrite a checkpoint, and a checkpoint that is unreadable, another script's or another model's."""
    path = os.path.join(config.out_dir, CHECKPOINT)
    if not config.resume:
        if os.path.exists(path):
            fail(f"{path} already holds a checkpoint; pass --resume=true to continue it or choose another --out_dir")
        return None
    # arrays and a JSON string: loading runs no code
    checkpoint = read_file(path, lambda f: dict(np.load(f, allow_pickle=False)), "a checkpoint")
    check_meta(path, checkpoint, config)
    return checkpoint


def save_checkpoint(state, step, data_rng, config):
    """Weights, optimizer state (state: a dict of trees), step, data RNG state and config. Written to a temporary
    file and renamed over the old one, so an interruption never leaves a broken checkpoint."""
    path = os.path.join(config.out_dir, CHECKPOINT)
    meta = json.dumps({"step": step, "data_rng": data_rng.bit_generator.state, "config": asdict(config)})
    # replicated: each device holds the whole array; this process's first copy is the one to save
    arrays = {name: np.asarray(leaf.addressable_data(0)) for name, leaf in checkpoint_arrays(state).items()}
    with open(path + ".tmp", "wb") as f:  # a file object: given a name, np.savez would append ".npz"
        np.savez(f, meta=np.array(meta), **arrays)
    os.replace(path + ".tmp", path)
    return path


def restore_checkpoint(checkpoint, state, data_rng, config):
    """The saved state (a dict of trees: parameters, optimizer state, ...), once every array's name, shape and dtype
    match those of the fresh state given; puts the data RNG state back. Returns it with the step to continue from."""
    check_arrays(os.path.join(config.out_dir, CHECKPOINT), checkpoint, checkpoint_arrays(state))
    state = jax.tree_util.tree_map_with_path(
        lambda path, _: jnp.asarray(checkpoint[keystr(path, simple=True, separator="/")]), state)
    data_rng.bit_generator.state = checkpoint["meta"]["data_rng"]
    return state, checkpoint["meta"]["step"]


# Published weights: a Hugging Face model folder, read with numpy alone. config.json sets the options above and
# each tensor of the checkpoint has one parameter here: getting a published model's logits proves that the model
# above is the real thing, and training on from there is fine-tuning.

HF_MODEL_TYPES = ("gpt2",)  # GPT-2 (openai-community/gpt2, -medium, -large, -xl), DistilGPT2
HF_OPTIONS = {"vocab_size": "vocab_size", "n_positions": "seq_len", "n_layer": "num_layers", "n_head": "num_heads",
              "n_embd": "model_dim"}
# keys whose other values would change the function computed above; the rest of config.json (token ids, dtype,
# versions, init ranges, dropout rates: --dropout stays the user's choice) does not, and is not read
HF_FIXED = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
            "tie_word_embeddings": True}
# the checkpoint's name of each module: blocks.3.attn.qkv.weight <-> h.3.attn.c_attn.weight, or transformer.h.3...
HF_NAMES = {"token_embedding": "wte", "position_embedding": "wpe", "final_norm": "ln_f"}
HF_BLOCK_NAMES = {"attn_norm": "ln_1", "attn.qkv": "attn.c_attn", "attn.out_proj": "attn.c_proj", "ffn_norm": "ln_2",
                  "ffn.up": "mlp.c_fc", "ffn.down": "mlp.c_proj"}
HF_DERIVED = r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias"  # the causal mask, saved by older exports
# BF16 as raw 16-bit words: see to_float32; BOOL and U8: the causal masks of transformers 4.x's saves, skipped
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "BOOL": "|b1", "U8": "|u1"}


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
    options |= {"position_embedding": "learned"}  # a table of n_positions rows, which sets seq_len
    kinds = {field.name: field.type for field in fields(Config)}
    for name, value in options.items():  # JSON has one kind of number: 1e-06 is a float, 16 must be an int
        if kinds[name] is float and type(value) is int:
            options[name] = value = float(value)
        if type(value) is not kinds[name]:
            fail(f"{path}: the value {value!r} for this script's {name} is not a {kinds[name].__name__}")
    if hf.get("n_inner") not in (None, 4 * options.get("model_dim", 0)):  # the MLP's width: null is 4 * n_embd
        fail(f"{path}: n_inner={hf['n_inner']!r} is not implemented here (only null or 4 * n_embd)")
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
    """A parameter's name in the Hugging Face checkpoint, without transformer.: blocks.3.attn.qkv.weight ->
    h.3.attn.c_attn.weight."""
    module, leaf = name.rsplit(".", 1)
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    return f"h.{block[1]}.{HF_BLOCK_NAMES[block[2]]}.{leaf}" if block else f"{HF_NAMES[module]}.{leaf}"


def load_pretrained(model, tensors, config):
    """Copy --init_from's tensors into the model, once every parameter has its tensor with the right shape and the
    checkpoint has no tensor left over (each refusal names the tensor). GPT-2 keeps its projections as Conv1D, whose
    weight is (in, out), as flax keeps a Linear's kernel: nothing transposes (torch's twin does). c_attn holds query,
    key and value side by side, as qkv does."""
    # GPT2LMHeadModel saves its tensors under transformer., GPT2Model (the Hub's gpt2, gpt2-medium) without
    prefix = "transformer." if any(name.startswith("transformer.") for name in tensors) else ""
    params = {}  # {Hugging Face name: the parameter}
    for path, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param))):
        *names, leaf = (str(key.key) for key in path)  # blocks, 3, attn, qkv, kernel
        module = functools.reduce(lambda parent, name: parent[int(name)] if name.isdigit() else getattr(parent, name),
                                  names, model)
        name = hf_name(".".join(names) + "." + ("weight" if leaf in ("kernel", "embedding", "scale") else leaf))
        params[prefix + name] = getattr(module, leaf)
    if "lm_head.weight" in tensors:  # the tied head saved anyway: the embedding, again
        if np.array_equal(tensors["lm_head.weight"], tensors.get(prefix + "wte.weight")):
            del tensors["lm_head.weight"]
    for name in sorted(params.keys() ^ {name for name in tensors if not re.fullmatch(HF_DERIVED, name)}):
        fail(f"{config.init_from} {'lacks' if name in params else 'has an unexpected'} tensor {name}; it is not a "
             f"checkpoint of the model its config.json describes")
    for name, param in params.items():
        if tensors[name].dtype.itemsize == 1:  # BOOL, U8: a mask's types, never a weight's
            fail(f"{config.init_from}: {name} has dtype {tensors[name].dtype}, not a float; the checkpoint is damaged")
        if tensors[name].shape != param.shape:
            fail(f"{config.init_from}: {name} has shape {tensors[name].shape}, its config.json makes it "
                 f"{param.shape}; the checkpoint and its config do not match")
    for name, param in params.items():
        param[...] = jnp.asarray(to_float32(tensors.pop(name), name, config.init_from))  # its memory map closes once copied


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


def sample(model, prompt, token_bytes, config, key):
    """Print the prompt and sample_tokens more, decoded."""
    print("sample:", flush=True)
    tokens = generate(model, prompt, config.sample_tokens, config.temperature, config.top_k, key)
    print(b"".join(token_bytes[t] for t in tokens).decode("utf-8", errors="replace"))


@functools.cache  # one compiled sampler per model structure and setting: repeated generate calls reuse it
def make_next_token(graphdef, temperature, top_k):
    @jax.jit  # compiled once per window length: the context sits in a window, padded after its end
    def next_token(params, window, length, key):
        logits, _ = nnx.merge(graphdef, params)(window[None])  # (1, window, vocab_size)
        logits = logits[0, length - 1] / temperature  # (vocab_size,): causal, so the padding does not matter
        if top_k > 0:
            kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits)
    return next_token


def generate(model, prompt, max_new_tokens, temperature, top_k, key):
    """Sample one token at a time from softmax(logits / temperature), optionally among the top_k only. GPT has
    no key/value cache here: each step reruns the model on the last seq_len tokens."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    next_token = make_next_token(graphdef, temperature, top_k)
    tokens = list(prompt)
    for i in range(max_new_tokens):
        context = tokens[-model.seq_len :]  # learned positions only go up to seq_len
        # a power of two, at most seq_len: log2(seq_len) compilations, and a short context costs a short window
        window = np.zeros(min(model.seq_len, 1 << (len(context) - 1).bit_length()), np.int32)  # (window,)
        window[: len(context)] = context
        tokens.append(int(next_token(params, window, len(context), jax.random.fold_in(key, i))))
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
POSITIVE = ("seq_len", "num_layers", "num_heads", "model_dim", "batch_size", "eval_interval", "eval_steps",
            "log_interval")


def model_checks(config):
    """(ok, message) for each rule on this model's own options. The rest of this section is the same in every
    model script."""
    return [
        (config.position_embedding in POSITION_EMBEDDINGS, f"--position_embedding={config.position_embedding} is "
         f"unknown; choose one of {', '.join(POSITION_EMBEDDINGS)}"),
        (config.model_dim % config.num_heads == 0,
         f"--model_dim={config.model_dim} is not divisible by --num_heads={config.num_heads}; pick a multiple"),
        (0 <= config.dropout < 1, f"--dropout={config.dropout} must be in [0, 1)"),
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
    """The mesh this process trains on: every device of the chosen kind, in a row along one axis named "data". With
    JAX_COORDINATOR_ADDRESS (process 0's host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID set, this process first
    joins the others (multi-host) and the mesh spans all their devices. Settles --device=auto and --dtype=auto, and
    refuses (exit 2) a device that is not here, bfloat16 where it cannot run, and a batch the devices cannot share
    evenly. Returns the mesh and this process's index; only the first process (index 0) prints."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        try:
            processes, process_id = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            processes = process_id = -1
        if not (0 <= process_id < processes and re.fullmatch(r"[^:\s]+:\d+", os.environ["JAX_COORDINATOR_ADDRESS"])):
            fail("JAX_COORDINATOR_ADDRESS must be host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID whole numbers with "
                 "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES; set them so, or unset JAX_COORDINATOR_ADDRESS")
        try:
            jax.distributed.initialize(num_processes=processes, process_id=process_id)  # it reads the address itself
        except (ValueError, RuntimeError) as error:  # a malformed address, a coordinator that never answered
            fail(f"cannot join the other processes ({str(error).splitlines()[0][:150]}); check the JAX_* variables")
    platform = {"auto": None, "cpu": "cpu", "cuda": "cuda", "mps": "METAL"}[config.device]  # METAL: jax-metal's
    try:
        devices, local = jax.devices(platform), jax.local_devices(backend=platform)[0]
    except RuntimeError:
        fail(f"--device={config.device}: jax has no such devices here; pass --device=cpu, or --device=auto to take "
             f"the best there is")
    kind = devices[0].platform
    if config.dtype == "auto":
        capability = float(getattr(devices[0], "compute_capability", 0))  # a CUDA GPU's, e.g. 8.0 (Ampere)
        config.dtype = "bfloat16" if kind == "gpu" and capability >= 8 else "float32"
    if kind != "cpu":  # float32 is float32, as in torch (GPUs would use tf32); set only if needed: it is global state
        jax.config.update("jax_default_matmul_precision", "highest")
    try:  # bfloat16 needs hardware or kernels the device may lack: try a matmul
        ones = jax.device_put(np.ones((2, 2), jnp.dtype(config.dtype)), local)
        (ones @ ones).block_until_ready()
    except (RuntimeError, TypeError) as error:
        fail(f"--dtype={config.dtype} does not run on {kind} here ({str(error)[:100]}); pass --dtype=float32")
    if config.batch_size % len(devices):
        fail(f"--batch_size={config.batch_size} is not divisible by the {len(devices)} devices; pass a multiple")
    if local != jax.devices()[0]:  # where the model is made and sampled, if not jax's default
        jax.config.update("jax_default_device", local)
    if jax.process_index():
        sys.stdout = open(os.devnull, "w")  # the other processes compute, the first one reports
    print(f"devices: {len(devices)} x {kind}{' (mesh axis data)' if len(devices) > 1 else ''} | {config.dtype}")
    return jax.sharding.Mesh(np.array(devices), ("data",)), jax.process_index()


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
    """Several processes (multi-host): every process receives Ctrl-C, not necessarily during the same step. After each
    step they share what they received (the largest signal number), so that all of them stop after the same step."""
    if jax.process_count() > 1:
        signum = int(multihost_utils.process_allgather(np.array(received[:1] or [0])).max())
        received[:] = [signum] if signum else []


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
    mesh, rank = start_devices(config)
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
        init_key, dropout_key, sample_key = jax.random.split(jax.random.key(config.seed), 3)
        model = GPT(config, nnx.Rngs(init_key))
        if config.init_from:  # every tensor is checked before any is copied
            load_pretrained(model, tensors, config)
            options = pretrained_options(config.init_from).items()  # what --resume=true will need to be told again
            print(f"loaded {config.init_from}: " + " ".join(f"--{k}={v}" for k, v in options if k != "vocab_size"))
        if config.steps == 0:  # only sample from the published model
            quit_on_signal("while sampling")
            return sample(model, prompt, token_bytes, config, sample_key) if rank == 0 else None
        optimizer = make_optimizer(config)
        data_rng = np.random.default_rng(config.seed)
        # jax transforms pure functions: split the model into its structure and a plain nested dict of arrays
        # (a dict of Variables would cost a Python unflatten per parameter at every call)
        graphdef, state = nnx.split(model)
        params = nnx.to_pure_dict(state)
        opt_state = optimizer.init(params)
        start_step = 0
        if checkpoint is not None:
            saved, start_step = restore_checkpoint(checkpoint, {"params": params, "opt_state": opt_state}, data_rng,
                                                   config)
            params, opt_state = saved["params"], saved["opt_state"]
            print(f"resuming from step {start_step}")
        # a whole copy of the weights and optimizer state on every device of the mesh (PartitionSpec(): no axis split)
        params, opt_state = jax.device_put((params, opt_state), NamedSharding(mesh, PartitionSpec()))
        byte_lengths = np.array([len(b) for b in token_bytes])
        tokens_per_byte = len(val_tokens) / byte_lengths[val_tokens].sum()  # 1 for a byte corpus
        print(f"data {config.data}: {len(train_tokens):,} train / {len(val_tokens):,} val tokens, "
              f"vocab_size {config.vocab_size}")
        print(f"model: {sum(p.size for p in jax.tree.leaves(params)):,} parameters")
        train_step, eval_loss = make_steps(graphdef, optimizer, dropout_key, mesh)

        stop_requested = stop_on_signal()  # the current step finishes, then we save and exit
        unchecked_losses = []  # (step, loss) not read yet: see read_losses
        tokens_per_step = config.batch_size * config.seq_len
        timer, timed_from = time.perf_counter(), start_step
        for step in range(start_step, config.steps):
            learning_rate = learning_rate_at(step, config)
            x, y = get_batch(train_tokens, data_rng, config)
            params, opt_state, loss = train_step(params, opt_state, x, y, learning_rate, step)  # split over the mesh
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
            if evaluating:  # by every process: one computation over the whole mesh
                train_loss, val_loss = (evaluate(eval_loss, params, split, config)
                                        for split in (train_tokens, val_tokens))
                stop_if_diverged(done, config, train_loss=train_loss, val_loss=val_loss)
                bpb = val_loss / math.log(2) * tokens_per_byte
                print(f"eval step {done:5d} | train {train_loss:.4f} | val {val_loss:.4f} | val bpb {bpb:.3f}"
                      + (f" | floor {floor:.3f}" if floor is not None else ""), flush=True)
            if (evaluating or stop_requested) and rank == 0:
                weight_norm = float(jax.jit(optax.global_norm)(params))  # compiled: one call, not one per array
                stop_if_diverged(done, config, weight_norm=weight_norm)
                path = save_checkpoint({"params": params, "opt_state": opt_state}, done, data_rng, config)
                timer, timed_from = time.perf_counter(), done  # keep evaluation and saving out of ms/step
            if stop_requested:
                if rank == 0:
                    then = "continue with --resume=true" if done < config.steps else "training is complete"
                    tell(f"stopped by {signal.Signals(stop_requested[0]).name}: saved step {done} to {path}; {then}")
                if jax.process_count() > 1:
                    multihost_utils.sync_global_devices("saved")  # no process ends before the first one has saved
                sys.exit(128 + stop_requested[0])

        if rank == 0:
            quit_on_signal(f"while sampling; {path} holds the trained model")
            # the trained arrays back into the model object: this process's first copy, so it samples on one device
            nnx.update(model, jax.tree.map(lambda array: array.addressable_data(0), params))
            sample(model, prompt, token_bytes, config, sample_key)


if __name__ == "__main__":
    main()
