"""Byte-level BPE: the tokenizer that turns text into the integer ids a language model reads.

What BPE is. Byte-pair encoding (Gage 1994, as compression; Sennrich et al. 2016, for subword
vocabularies) learns a list of merges: find the most frequent pair of adjacent tokens in the
training text, make that pair a new token, replace every occurrence, repeat. After k merges the
vocabulary has 256 + k tokens; frequent words become one token, rare words are spelled from
pieces, and the model sees several times fewer positions than with raw bytes.

Why byte-level. GPT-2 (Radford et al. 2019) runs BPE over UTF-8 bytes, not characters: the 256
byte values are the base tokens, so every string (any script, emoji, stray control characters)
encodes, and no "unknown" token is needed. A Chinese character is three byte tokens until merges
glue them; a token may even hold part of a character, so decode() must accept a token sequence
whose bytes are not valid UTF-8 (a model can sample one) and uses errors="replace".

Why a pre-split regex. Before counting pairs, the text is cut into chunks: words with their
leading space, numbers, punctuation runs, whitespace runs. Merges are learned and applied only
inside a chunk, so no token crosses a word boundary: the vocabulary is spent on " the" and "ing",
not on "e t" or "dog." / "dog!" / "dog?" variants. Equal chunks encode equally, so encode() caches
per chunk, and training counts each distinct chunk once, weighted by how often it occurs.

Why the order of merges matters. Encoding must reproduce what training did, so it replays merges
in the order they were learned: inside a chunk, repeatedly merge the adjacent pair that was
learned earliest. Merges overlap: with merge 1 "a"+"b" and merge 2 "b"+"c", training turned "abc"
into ["ab", "c"]; applying merge 2 first would give ["a", "bc"], a valid encoding of the same text
that the model never saw.

Special tokens (e.g. "<|endoftext|>", a document separator) are strings that map to one reserved id
after the merges. They never take part in merges. encode() refuses (ValueError) text that contains
a special token's string unless that special is allowed, so that text typed by a user cannot
inject a control token by accident; encode_ordinary() encodes such text as plain bytes instead.

Usage:
    python bpe.py --data=data/stories.txt --vocab_size=1024
writes, next to the corpus, three files named after its full name: data/stories.txt.bpe1024.npy
(the whole file as token ids), data/stories.txt.bpe1024.json (the tokenizer; model scripts decode
with its "token_bytes" list alone) and data/stories.txt.bpe1024.vocab.txt (one line per token, to
read). It replaces existing ones only with --overwrite=true.
"""

import argparse
import heapq
import json
import os
import re
import signal
import sys
import time
from collections import Counter, defaultdict

if __name__ == "__main__":  # Ctrl-C while numpy loads or training runs: end at once, no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import numpy as np

# -----------------------------------------------------------------------------
# Pre-tokenization

# GPT-4's cl100k_base split pattern, rewritten for the standard library's `re`, which has no
# \p{L} (letter) or \p{N} (number) classes. The original is
#   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
#   \s*[\r\n]+|\s+(?!\S)|\s+
# Here a letter is [^\W\d_] (a word character that is neither a digit nor "_"), a number is \d,
# and "neither space, letter nor number" is [^\s\w] or "_". Differences from the original: \d is
# only decimal digits (Unicode Nd), so characters such as "²" or "½" (Unicode No) count as letters
# here, and Python's \s also matches the separators \x1c-\x1f. Every character falls in exactly
# one class (space, letter, digit, other), so the chunks always join back into the text.
SPLIT_PATTERN = "|".join([
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions: "don't" -> "don", "'t"
    r"(?:[^\r\n\w]|_)?[^\W\d_]+",     # a word, with one leading space or punctuation mark
    r"\d{1,3}",                       # numbers, in groups of at most three digits
    r" ?(?:[^\s\w]|_)+[\r\n]*",       # punctuation, with one leading space and trailing newlines
    r"\s*[\r\n]+",                    # line breaks, with the spaces before them
    r"\s+(?!\S)",                     # spaces, leaving the last one to start the next word
    r"\s+",                           # spaces at the very end of the text
])
SPLIT_RE = re.compile(SPLIT_PATTERN)


def split_special(text, special_tokens):
    """Cut text around special tokens' strings: even items are plain text, odd items are specials."""
    if not special_tokens:
        return [text]
    # Longest first, so that a special token that contains another one wins where both match.
    alternatives = sorted(special_tokens, key=len, reverse=True)
    return re.split("(" + "|".join(map(re.escape, alternatives)) + ")", text)


def training_chunks(text, special_tokens):
    """The chunks that training counts pairs in; special tokens' strings are left out."""
    return [chunk for part in split_special(text, special_tokens)[::2] for chunk in SPLIT_RE.findall(part)]


def merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids`, scanning left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out

# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A list of merges plus special tokens: everything needed to encode and decode.

    Token ids: 0..255 are the bytes, 256 + r is the token made by merge number r (its rank), and the
    special tokens come right after the merges, in the order given."""

    def __init__(self, merges, special_tokens=(), pattern=SPLIT_PATTERN):
        self.merges = [tuple(pair) for pair in merges]  # rank -> (left_id, right_id)
        # pair -> id of the merged token; ids grow with rank, so the smallest id is the earliest merge
        self.merged_id = {pair: 256 + rank for rank, pair in enumerate(self.merges)}
        self.token_bytes = [bytes([byte]) for byte in range(256)]  # id -> bytes of the token
        for left, right in self.merges:
            self.token_bytes.append(self.token_bytes[left] + self.token_bytes[right])
        self.special_tokens = {}  # string -> id
        for special in special_tokens:
            self.special_tokens[special] = len(self.token_bytes)
            self.token_bytes.append(special.encode("utf-8"))
        self.pattern = pattern
        self.split_re = re.compile(pattern)
        self.cache = {}  # chunk string -> its ids; real text repeats few distinct chunks

    @property
    def vocab_size(self):
        return len(self.token_bytes)

    def encode_chunk(self, chunk_bytes):
        """Apply the merges to one chunk, always merging the earliest-learned pair present."""
        ids = list(chunk_bytes)
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.merged_id.get(p, float("inf")))
            if pair not in self.merged_id:
                break  # no pair in this chunk was ever merged in training
            ids = merge(ids, pair, self.merged_id[pair])
        return ids

    def encode_ordinary(self, text):
        """Encode text as plain text: special tokens' strings get no special treatment."""
        ids, cache = [], self.cache
        for chunk in self.split_re.findall(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = cache[chunk] = self.encode_chunk(chunk.encode("utf-8"))
            ids.extend(chunk_ids)
        return ids

    def encode(self, text, allowed_special="none"):
        """Encode text; allowed_special is "all", "none" or a set of special tokens' strings.

        A special token's string in the text becomes its id if allowed; otherwise ValueError (as
        tiktoken does), because silently encoding it either way hides a decision from the caller.
        """
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        elif allowed_special == "none":
            allowed = set()
        else:
            allowed = set(allowed_special)
            if not allowed <= set(self.special_tokens):
                raise ValueError(f"not special tokens of this tokenizer: {sorted(allowed - set(self.special_tokens))}")
        ids = []
        for i, part in enumerate(split_special(text, self.special_tokens)):
            if i % 2 == 0:
                ids.extend(self.encode_ordinary(part))
            elif part in allowed:
                ids.append(self.special_tokens[part])
            else:
                raise ValueError(f"text contains the special token {part!r}: pass allowed_special to encode "
                                 f"it as a special token, or use encode_ordinary to encode it as plain text")
        return ids

    def decode(self, ids):
        """Token ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def save(self, path):
        """Write the tokenizer as JSON; "token_bytes" (hex, index = id) is all a decoder needs."""
        # Written by hand rather than json.dump(indent=...), to get one merge and one token per line.
        fields = [
            f'"pattern": {json.dumps(self.pattern)}',
            f'"special_tokens": {json.dumps(self.special_tokens, ensure_ascii=False)}',  # string -> id
            '"merges": [\n  ' + ",\n  ".join(f"[{left}, {right}]" for left, right in self.merges) + "\n ]",
            '"token_bytes": [\n  ' + ",\n  ".join(f'"{token.hex()}"' for token in self.token_bytes) + "\n ]",
        ]
        with open(path, "w", encoding="utf-8") as f:
            f.write("{\n " + ",\n ".join(fields) + "\n}\n")

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        specials = sorted(state["special_tokens"], key=state["special_tokens"].get)
        tokenizer = cls(state["merges"], specials, state["pattern"])
        # token_bytes is redundant with the merges; a mismatch means the file was edited by hand.
        if [token.hex() for token in tokenizer.token_bytes] != state["token_bytes"]:
            raise ValueError(f"{path}: token_bytes does not match the merges and special tokens")
        return tokenizer

    def save_vocab(self, path):
        """Write one line per token for reading: id, its bytes shown printable, and its two parents."""
        with open(path, "w", encoding="utf-8") as f:
            for token_id, token in enumerate(self.token_bytes):
                line = f"{token_id:6d}  '{show(token)}'"
                if 256 <= token_id < 256 + len(self.merges):
                    left, right = self.merges[token_id - 256]
                    line += f"  = {left} '{show(self.token_bytes[left])}' + {right} '{show(self.token_bytes[right])}'"
                elif token_id >= 256:
                    line += "  (special)"
                f.write(line + "\n")


def show(token):
    """Bytes as readable text: valid UTF-8 as characters, other bytes and control characters escaped."""
    out = []
    for char in token.decode("utf-8", errors="surrogateescape"):  # a bad byte b -> U+DC00 + b
        if "\udc80" <= char <= "\udcff":
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))  # "\n", "\t", "\u200d", ...
    return "".join(out)

# -----------------------------------------------------------------------------
# Training
#
# Both trainers learn vocab_size - 256 - len(special_tokens) merges (special tokens count in the
# vocabulary, so that vocab_size is the size of the model's embedding table). The pair to merge is
# the most frequent one; ties go to the smallest (left_id, right_id), so training is deterministic.
# Training stops early when the best pair occurs fewer than 2 times: a merge seen once only
# memorizes the training text, and the resulting vocabulary is then smaller than vocab_size.


def train_slow(text, vocab_size, special_tokens=()):
    """The obvious trainer, for reading: recount every pair in every chunk after every merge."""
    words = [list(chunk.encode("utf-8")) for chunk in training_chunks(text, special_tokens)]
    merges = []
    while len(merges) < vocab_size - 256 - len(special_tokens):
        counts = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, then smallest
        if counts[best] < 2:
            break
        words = [merge(word, best, 256 + len(merges)) for word in words]
        merges.append(best)
    return Tokenizer(merges, special_tokens)


def train(text, vocab_size, special_tokens=()):
    """The fast trainer: same merges as train_slow, but each merge only touches the chunks that hold it.

    Three structures make a merge cheap: each distinct chunk is stored once with its count; `where`
    maps a pair to the chunks that contain it (it may list chunks that no longer do: they are
    skipped); a heap holds (-count, pair) so the best pair pops first. When a count changes, a new
    heap entry is pushed and the old one stays behind: an entry whose count disagrees with
    `pair_counts` is stale and is skipped when it pops (lazy deletion)."""
    if vocab_size - 256 - len(special_tokens) < 0:
        raise ValueError(f"vocab_size must be at least 256 + {len(special_tokens)} special tokens")
    chunk_counts = Counter(training_chunks(text, special_tokens))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # distinct chunks, as ids
    freqs = list(chunk_counts.values())  # how often each distinct chunk occurs
    pair_counts, where = Counter(), defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < vocab_size - 256 - len(special_tokens) and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count:
            continue  # stale: this pair's count changed after the entry was pushed
        if -neg_count < 2:
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        delta = Counter()  # change of each pair's count caused by this merge
        for i in where.pop(pair):
            word = words[i]
            new_word = merge(word, pair, new_id)
            if len(new_word) == len(word):
                continue  # an earlier merge already removed the pair from this chunk
            for old in zip(word, word[1:]):
                delta[old] -= freqs[i]
            for new in zip(new_word, new_word[1:]):
                delta[new] += freqs[i]
                where[new].add(i)
            words[i] = new_word
        for changed, change in delta.items():
            if change == 0:
                continue
            pair_counts[changed] += change
            if pair_counts[changed] > 0:
                heapq.heappush(heap, (-pair_counts[changed], changed))
            else:
                del pair_counts[changed]  # the merged pair itself ends here, at zero
    return Tokenizer(merges, special_tokens)

# -----------------------------------------------------------------------------
# Command line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # The project's rule for a user's mistake: one line on stderr, exit status 2, no usage block.
        message = message.replace("\n", "\\n").replace("\r", "\\r")  # one line, even for a path with a line break
        self.exit(2, f"bpe.py: error: {message} (see --help)\n")


def parse_bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def check_outputs(paths, overwrite, error):
    """Before any work, refuse (error(message) exits) an output path that is a folder, that exists
    unless overwrite is true, or that cannot be written. Nothing is left changed."""
    for path in paths:
        if os.path.isdir(path):
            error(f"{path} is a folder: give a file name")
        exists = os.path.lexists(path)
        if exists and not overwrite:
            error(f"{path} already exists: pass --overwrite=true to replace it")
        try:  # really try (as root, os.access says yes to everything); "ab" leaves the bytes alone
            open(path, "ab" if exists else "xb").close()
            if not exists:
                os.remove(path)
        except OSError as e:
            error(f"cannot write {path}: {e.strerror}")


def main():
    parser = ArgumentParser(description="Train a byte-level BPE tokenizer on a UTF-8 text file and "
                            "write the tokenized file next to it.", allow_abbrev=False)
    parser.add_argument("--data", default="data/stories.txt", help="UTF-8 text corpus; the outputs are its "
                        "full name plus .bpe<vocab_size>.npy, .json and .vocab.txt (default: %(default)s)")
    parser.add_argument("--vocab_size", type=int, default=1024,
                        help="tokens in the vocabulary: 256 bytes + merges + 1 special token (default: %(default)s)")
    parser.add_argument("--overwrite", type=parse_bool, default=False,
                        help="replace the outputs if they exist (default: false)")
    args = parser.parse_args()
    # <|endoftext|> is registered so that a corpus which separates documents with it gets one id per
    # separator, never merged with its neighbours; a corpus without it (like data/stories.txt) just
    # leaves that id unused. Either way the .npy decodes back to the file's exact bytes.
    special_tokens = ["<|endoftext|>"]
    if not 256 + len(special_tokens) <= args.vocab_size <= 2**20:
        parser.error(f"--vocab_size must be between {256 + len(special_tokens)} and {2**20}, got {args.vocab_size}")
    if os.path.exists(args.data) and not os.path.isfile(args.data):
        parser.error(f"--data={args.data} is not a file: give a UTF-8 text file")
    try:
        with open(args.data, "rb") as f:
            raw = f.read()  # bytes, not text mode: text mode would turn "\r\n" into "\n"
        text = raw.decode("utf-8")
    except OSError as e:
        parser.error(f"cannot read --data={args.data}: {e.strerror}")
    except UnicodeDecodeError as e:
        parser.error(f"--data={args.data} is not UTF-8 text (byte {e.start}): give a UTF-8 file")
    prefix = f"{args.data}.bpe{args.vocab_size}"  # the full name, so no two inputs share outputs
    check_outputs([prefix + ".npy", prefix + ".json", prefix + ".vocab.txt"], args.overwrite, parser.error)

    start = time.perf_counter()
    tokenizer = train(text, args.vocab_size, special_tokens)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ids = tokenizer.encode(text, allowed_special="all")
    encode_seconds = time.perf_counter() - start
    assert b"".join(tokenizer.token_bytes[i] for i in ids) == raw  # what the model scripts rely on

    np.save(prefix + ".npy", np.array(ids, dtype=np.uint16 if args.vocab_size <= 2**16 else np.int32))
    tokenizer.save(prefix + ".json")
    tokenizer.save_vocab(prefix + ".vocab.txt")
    print(f"trained {len(tokenizer.merges)} merges (vocabulary of {tokenizer.vocab_size}) in {train_seconds:.2f} s")
    if tokenizer.vocab_size < args.vocab_size:
        print(f"stopped early: no pair occurs twice any more, so the vocabulary is smaller than {args.vocab_size}")
    print(f"encoded {len(raw):,} bytes into {len(ids):,} tokens in {encode_seconds:.2f} s: "
          f"{len(raw) / max(len(ids), 1):.2f} bytes per token")
    print(f"wrote {prefix}.npy, {prefix}.json, {prefix}.vocab.txt")


if __name__ == "__main__":
    main()
