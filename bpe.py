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

    python bpe.py --tokenizer=path/to/SmolLM2-135M --data=data/stories.txt
imports a published byte-level BPE tokenizer from a Hugging Face folder instead of training one: its
tokenizer.json, or GPT-2's vocab.json + merges.txt (see "Importing a published tokenizer" below).
The ids stay the published ones, so data/stories.txt.SmolLM2-135M.npy feeds a model loaded from that
folder. The outputs are named after the folder: its base name, with any character other than a
letter, a digit, "_" or "-" made "_" (.../gpt2 -> data/stories.txt.gpt2.npy, .json, .vocab.txt;
.../Qwen3-0.6B -> data/stories.txt.Qwen3-0_6B.npy). If the folder's config.json gives a larger vocab_size (a model with unused embedding
rows), the JSON's token_bytes is padded to it with "" for the unused ids. Tokenizers that are not
byte-level BPE (SentencePiece-style BPE with byte fallback, as in Llama 2, TinyLlama and Mixtral;
Unigram; WordPiece) are refused with one line.
"""

import argparse
import heapq
import json
import os
import re
import signal
import sys
import time
import unicodedata
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


def with_gaps(pattern):
    """A regex whose findall returns the pattern's matches and, as chunks of their own, the runs of text that no
    match starts in, as Hugging Face's Split does ("Isolated"). bpe.py's own pattern leaves no gaps."""
    return rf"(?:{pattern})|(?:(?!(?:{pattern}))[\s\S])+"


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

    Token ids of a trained tokenizer: 0..255 are the bytes, 256 + r is the token made by merge number r (its
    rank), and the special tokens come right after the merges, in the order given. An imported tokenizer
    (import_tokenizer) keeps its publisher's ids instead, because a model's embedding rows are indexed by them:
    token_bytes is then the publisher's table (id -> bytes; b"" for an id no token uses), special_tokens a dict
    string -> id, and a merge makes the token whose bytes are its two parts' bytes. The options that only an
    import sets: several patterns (each splits the chunks of the one before), a Unicode normalizer applied to the
    text first, and ignore_merges (a chunk that is itself a token is taken whole, as Llama 3 does)."""

    def __init__(self, merges, special_tokens=(), pattern=SPLIT_PATTERN, token_bytes=None, ignore_merges=False,
                 normalizer=None, imported_from=None):
        self.merges = [tuple(pair) for pair in merges]  # rank -> (left_id, right_id)
        self.rank = {pair: rank for rank, pair in enumerate(self.merges)}  # a pair listed twice keeps its last rank
        if token_bytes is None:  # trained: the ids follow from the merges
            self.token_bytes = [bytes([byte]) for byte in range(256)]  # id -> bytes of the token
            for left, right in self.merges:
                self.token_bytes.append(self.token_bytes[left] + self.token_bytes[right])
            self.merged_id = {pair: 256 + rank for pair, rank in self.rank.items()}  # pair -> id of the merged token
            self.special_tokens = {}  # string -> id
            for special in special_tokens:
                self.special_tokens[special] = len(self.token_bytes)
                self.token_bytes.append(special.encode("utf-8"))
            self.byte_ids = list(range(256))  # byte -> id of its token
            token_ids = None
        else:  # imported: the publisher's table
            self.token_bytes, self.special_tokens = list(token_bytes), dict(special_tokens)
            specials = set(self.special_tokens.values())
            token_ids = {}  # bytes -> id of every token that merges can make (neither special nor unused)
            for token_id, token in enumerate(self.token_bytes):
                if token and token_id not in specials:
                    token_ids.setdefault(token, token_id)
            if not all(bytes([byte]) in token_ids for byte in range(256)):
                raise ValueError("token_bytes lacks a token for some byte: every byte needs one")
            self.byte_ids = [token_ids[bytes([byte])] for byte in range(256)]
            self.merged_id = {}
            for (left, right), rank in self.rank.items():
                merged = (self.token_bytes[left] + self.token_bytes[right]
                          if 0 <= left < len(self.token_bytes) and 0 <= right < len(self.token_bytes) else None)
                if merged not in token_ids:
                    raise ValueError(f"merge {rank} ({left}, {right}) does not make a token of token_bytes")
                self.merged_id[left, right] = token_ids[merged]
        self.ignore_merges, self.whole_ids = ignore_merges, token_ids if ignore_merges else None  # bytes -> id
        self.normalizer, self.imported_from = normalizer, imported_from
        self.pattern = pattern  # one pattern, or a list of them applied one after the other
        self.split_res = [re.compile(with_gaps(p)) for p in ([pattern] if isinstance(pattern, str) else pattern)]
        self.cache = {}  # chunk string -> its ids; real text repeats few distinct chunks

    @property
    def vocab_size(self):
        return len(self.token_bytes)

    def encode_chunk(self, chunk_bytes):
        """Apply the merges to one chunk: merge the adjacent pair of lowest rank (the leftmost of equals), again
        and again, until no adjacent pair has a merge.

        A heap holds (rank, position) for every adjacent pair that has a merge, and a linked list the tokens
        still standing, so each merge costs O(log n), not a rescan of the chunk (a chunk can be a 100 KB run
        of letters). A merge leaves behind heap entries for pairs that no longer exist: they are skipped when
        they pop. One pair at a time is the order Hugging Face's tokenizers follow. It gives what merging every
        occurrence of the best pair at once (as training does) gives, except when a merge list uses a token
        before the merge that makes it, as the lists Hugging Face converts from tiktoken (Llama 3's) can."""
        if self.whole_ids is not None and chunk_bytes in self.whole_ids:
            return [self.whole_ids[chunk_bytes]]  # ignore_merges: a chunk that is a token is taken whole
        ids = [self.byte_ids[byte] for byte in chunk_bytes]  # position -> token id, None once merged into its left
        following = list(range(1, len(ids) + 1))  # position -> position of the next standing token
        preceding = list(range(-1, len(ids) - 1))
        heap = [(self.rank[pair], i) for i, pair in enumerate(zip(ids, ids[1:])) if pair in self.rank]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = following[i]
            if ids[i] is None or j == len(ids) or self.rank.get((ids[i], ids[j])) != rank:
                continue  # stale: one of the two tokens was merged away since this entry was pushed
            ids[i], ids[j] = self.merged_id[ids[i], ids[j]], None
            following[i] = following[j]
            if following[i] < len(ids):
                preceding[following[i]] = i
            for left in (preceding[i], i):  # the two pairs the new token starts or ends
                if left >= 0 and following[left] < len(ids) and (ids[left], ids[following[left]]) in self.rank:
                    heapq.heappush(heap, (self.rank[ids[left], ids[following[left]]], left))
        return [token_id for token_id in ids if token_id is not None]

    def encode_ordinary(self, text):
        """Encode text as plain text: special tokens' strings get no special treatment."""
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        ids, cache = [], self.cache
        for chunk in self.split_res[0].findall(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                pieces = [chunk]
                for split_re in self.split_res[1:]:  # an imported tokenizer may split each chunk further
                    pieces = [piece for part in pieces for piece in split_re.findall(part)]
                chunk_ids = cache[chunk] = [i for piece in pieces for i in self.encode_chunk(piece.encode("utf-8"))]
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
        # Written by hand rather than json.dump(indent=...), to get one merge and one token per line. The fields
        # that only an import sets are written only then, so a trained tokenizer's file stays as it was.
        fields = [f'"imported_from": {json.dumps(self.imported_from)}'] if self.imported_from is not None else []
        fields.append(f'"pattern": {json.dumps(self.pattern)}')
        fields += [f'"normalizer": {json.dumps(self.normalizer)}'] if self.normalizer else []
        fields += ['"ignore_merges": true'] if self.ignore_merges else []
        fields += [
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
        if "imported_from" in state:  # the publisher's ids: token_bytes is the table itself ("" = an unused id)
            return cls(state["merges"], state["special_tokens"], state["pattern"],
                       token_bytes=[bytes.fromhex(token) for token in state["token_bytes"]],
                       ignore_merges=state.get("ignore_merges", False), normalizer=state.get("normalizer"),
                       imported_from=state["imported_from"])
        specials = sorted(state["special_tokens"], key=state["special_tokens"].get)
        tokenizer = cls(state["merges"], specials, state["pattern"])
        # token_bytes is redundant with the merges; a mismatch means the file was edited by hand.
        if [token.hex() for token in tokenizer.token_bytes] != state["token_bytes"]:
            raise ValueError(f"{path}: token_bytes does not match the merges and special tokens")
        return tokenizer

    def save_vocab(self, path):
        """Write one line per token for reading: id, its bytes shown printable, and its two parents."""
        made_by = {}  # token id -> the pair of the first merge that makes it
        for pair in self.merges:
            made_by.setdefault(self.merged_id[pair], pair)
        specials = set(self.special_tokens.values())
        with open(path, "w", encoding="utf-8") as f:
            for token_id, token in enumerate(self.token_bytes):
                line = f"{token_id:6d}  '{show(token)}'"
                if token_id in specials:
                    line += "  (special)"
                elif not token:
                    line += "  (unused)"
                elif token_id in made_by:
                    left, right = made_by[token_id]
                    line += f"  = {left} '{show(self.token_bytes[left])}' + {right} '{show(self.token_bytes[right])}'"
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
# Importing a published tokenizer
#
# A Hugging Face tokenizer folder describes the same algorithm in other words. tokenizer.json holds the
# model ("type": "BPE": "vocab" maps each token's string to its id, "merges" lists the pairs in rank order),
# "added_tokens" (special tokens and others that are cut out of the text before anything else), a
# "normalizer" (Unicode normalization applied to the text) and a "pre_tokenizer" (the split into chunks).
# Older folders hold only GPT-2's two files: vocab.json (the vocab) and merges.txt (one pair a line).
#
# Byte-level BPE writes each byte as one printable character, so that tokens can be stored as JSON strings
# and merges.txt can separate the two parts of a pair with a space: the bytes that are printable in Latin-1
# stand for themselves, and the 68 others (controls, space, 0x7f-0xa0, 0xad) take the characters from U+0100
# on, in order. So " the" is stored as "Ġthe" ("Ġ" = U+0120 = 256 + 32, the 33rd byte without a character).
#
# The published split patterns are written for Rust's regex / Oniguruma, which know \p{L} (a letter) and
# \p{N} (a number); translate_pattern rewrites them for re as SPLIT_PATTERN does (letter = [^\W\d_],
# number = \d). What remains different: \d is only decimal digits, so "²", "½", "Ⅻ" or "①" (\p{N} but not
# decimal) count as letters here, re's \s also holds the separators \x1c-\x1f, which Oniguruma's does not, and
# characters newer than Python's Unicode tables (Unicode 14 in Python 3.11) have no category here. Text with
# those characters may split, and so encode, differently from the published tokenizer. Everything else was
# checked against the `tokenizers` library: GPT-2's own tokenizer.json on Tiny Shakespeare, and tokenizers
# trained with the Llama 3, Qwen2 (with NFC) and SmolLM pre-tokenizers, on thousands of random texts.

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # ByteLevel's own

# A property's class in re's terms: (any character that has it, any character that has not). Only \p{L},
# \p{N} and both together occur in the patterns of GPT-2, GPT-4 (cl100k), Llama 3 and Qwen2.
PROPERTY_CLASSES = {"L": (r"[^\W\d_]", r"[\W\d_]"), "N": (r"\d", r"\D"), "LN": (r"[^\W_]", r"[\W_]")}
PLAIN_ESCAPES = set("sSdDrntfvx")  # escapes that mean the same in re; \x takes two hex digits in both


class ImportRefused(Exception):
    """A tokenizer folder that import_tokenizer cannot convert exactly; the message says why, in one line."""


def byte_characters():
    """GPT-2's table byte -> character (see above): printable Latin-1 bytes stand for themselves, the others
    take U+0100, U+0101, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, unprintable = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + unprintable)
            unprintable += 1
    return table


def translate_pattern(pattern):
    """A published split pattern (Rust regex / Oniguruma syntax, with \\p{L} and \\p{N}) rewritten for re.

    Outside brackets \\p{L} becomes [^\\W\\d_] and \\p{N} \\d (\\P{..}: the opposite). A bracket [...] holding a
    property becomes "the plain part, or the property" and [^...] "not the plain part, and not the property":
    [^\\s\\p{L}\\p{N}] becomes (?:(?![\\s])[\\W_]). Capturing groups become non-capturing (they do not change
    the split). Anything else with a meaning re does not share (anchors, \\w, \\b, set operations, other
    properties) raises ImportRefused."""
    out, i = [], 0

    def refuse(what):
        raise ImportRefused(f"the split pattern {pattern!r} uses {what}, which bpe.py cannot translate to Python's re")

    def escape_at(i):  # the escape at pattern[i] == "\\" -> (property letter and negated, or None; its text; next i)
        if i + 1 >= len(pattern):
            refuse("a trailing backslash")
        char = pattern[i + 1]
        if char in "pP":
            match = re.match(r"\{(\w+)\}|(\w)", pattern[i + 2:])
            name = match and (match.group(1) or match.group(2))
            if name not in ("L", "N"):
                refuse(f"\\{char}{match.group(0) if match else ''}")
            return (name, char == "P"), None, i + 2 + len(match.group(0))
        if char.isalnum() and char not in PLAIN_ESCAPES:
            refuse(f"\\{char}")
        return None, pattern[i:i + 2], i + 2

    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            prop, text, i = escape_at(i)
            if prop:
                name, negated = prop
                out.append(PROPERTY_CLASSES[name][1 if negated else 0])
            else:
                out.append(text)
        elif char == "[":
            negated = pattern[i + 1:i + 2] == "^"
            i += 2 if negated else 1
            plain, props = [], set()
            while i < len(pattern) and pattern[i] != "]":
                if pattern[i] == "\\":
                    prop, text, i = escape_at(i)
                    if prop and prop[1]:
                        refuse("\\P{..} inside brackets")
                    if prop:
                        props.add(prop[0])
                    else:
                        plain.append(text)
                elif pattern[i] == "[" or pattern[i:i + 2] in ("&&", "--", "~~"):
                    refuse("nested brackets or set operations")
                else:
                    plain.append(pattern[i])
                    i += 1
            if i == len(pattern):
                refuse("an unclosed [")
            i += 1
            plain = "".join(plain)
            if plain.startswith("^"):  # a literal "^" that followed a property: keep it literal
                plain = "\\" + plain
            if not props:
                out.append(f"[{'^' if negated else ''}{plain}]")
                continue
            has, lacks = PROPERTY_CLASSES["".join(sorted(props))]
            if not plain:
                out.append(lacks if negated else has)
            else:
                out.append(f"(?:(?![{plain}]){lacks})" if negated else f"(?:[{plain}]|{has})")
        elif char == "(" and not pattern.startswith("(?", i):
            out.append("(?:")
            i += 1
        elif char == "(" and re.match(r"\(\?P?<\w", pattern[i:]):  # a named group: (?P<name> or (?<name>
            out.append("(?:")
            i = pattern.index(">", i) + 1
        elif char in "^$":
            refuse(f"the anchor {char!r}")
        else:
            out.append(char)
            i += 1
    translated = "".join(out)
    try:
        re.compile(with_gaps(translated))
    except re.error as e:
        refuse(f"syntax that re rejects ({e})")
    probe = "".join(map(chr, range(128))) + "'S 12  3.4\n\n\t é²日🙂\u3000 "
    if any(not match.group() for match in re.finditer(translated, probe)):
        refuse("matches of the empty string")  # findall would skip the character after one
    return translated


def read_json(path):
    """A JSON file's contents; ImportRefused if it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ImportRefused(f"cannot read {path}: {e.strerror}")
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ImportRefused(f"{path} is not valid JSON ({str(e)[:80]})")


def split_patterns(pre_tokenizer, where):
    """The published pre-tokenizer as re patterns, each applied to the chunks of the one before."""
    if not isinstance(pre_tokenizer, dict):
        raise ImportRefused(f"{where} has no pre_tokenizer: it is not byte-level BPE (bpe.py imports GPT-2, Llama 3, "
                            f"Qwen2 or SmolLM-style tokenizers)")
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    if not isinstance(steps, list) or not all(isinstance(step, dict) for step in steps):
        raise ImportRefused(f"{where}: the pre_tokenizer is malformed")
    if not steps or steps[-1].get("type") != "ByteLevel":
        kinds = [step.get("type") for step in steps]
        if "Metaspace" in kinds:
            raise ImportRefused(f"{where} is a SentencePiece-style tokenizer (Metaspace), not byte-level BPE")
        raise ImportRefused(f"{where}: the pre_tokenizer {kinds} does not end with ByteLevel, so this is not "
                            f"byte-level BPE as bpe.py reads it")
    def translated(pattern):
        try:
            return translate_pattern(pattern)
        except ImportRefused as e:
            raise ImportRefused(f"{where}: {e}")

    patterns = []
    for step in steps[:-1]:
        kind = step.get("type")
        if kind == "Split":
            pattern = step["pattern"] if isinstance(step.get("pattern"), dict) else {}
            if step.get("behavior") != "Isolated" or step.get("invert") not in (False, None):
                raise ImportRefused(f"{where}: a Split pre-tokenizer with behavior {step.get('behavior')!r} and invert "
                                    f"{step.get('invert')!r}; bpe.py reproduces only behavior Isolated, invert false")
            if isinstance(pattern.get("Regex"), str):
                patterns.append(translated(pattern["Regex"]))
            elif isinstance(pattern.get("String"), str) and pattern["String"]:
                patterns.append(re.escape(pattern["String"]))
            else:
                raise ImportRefused(f"{where}: a Split pre-tokenizer without a Regex or String pattern")
        elif kind == "Digits":
            patterns.append(translated(r"\p{N}" if step.get("individual_digits") else r"\p{N}+"))
        else:
            raise ImportRefused(f"{where}: the pre-tokenizer {kind!r} is not one bpe.py reproduces "
                                f"(it reads ByteLevel, Split with a regex, Digits and a Sequence of them)")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        raise ImportRefused(f"{where}: ByteLevel's add_prefix_space is true, which adds a space that is not in "
                            f"the text; bpe.py imports only add_prefix_space false")
    if byte_level.get("use_regex", True):
        patterns.append(translated(GPT2_PATTERN))
    return patterns or [r"[\s\S]+"]  # no split at all: the whole text is one chunk


def import_tokenizer(folder):
    """Convert the byte-level BPE tokenizer in a Hugging Face folder into a Tokenizer with the published ids.

    Reads folder/tokenizer.json, or else GPT-2's folder/vocab.json + merges.txt (then "<|endoftext|>", if in the
    vocabulary, is the one special token, as in GPT-2). Every added token (special or not) becomes one of
    bpe.py's special tokens: Hugging Face cuts them all out of the text before splitting it, and so does
    encode(text, allowed_special="all"). If folder/config.json gives a vocab_size larger than the tokenizer's,
    token_bytes is padded with b"" (an unused id) up to it, so that its length is the model's embedding rows.
    Raises ImportRefused, with a one-line reason, for anything it cannot reproduce exactly."""
    json_path, vocab_path, merges_path = (os.path.join(folder, name) for name in
                                          ("tokenizer.json", "vocab.json", "merges.txt"))
    if os.path.isfile(json_path):
        where = merges_where = json_path  # the file to name in a refusal
        state = read_json(json_path)
        model = state.get("model") if isinstance(state, dict) else None
        if not isinstance(model, dict):
            raise ImportRefused(f"{where} has no tokenizer model: is it a Hugging Face tokenizer.json?")
        if model.get("type", "BPE") != "BPE":
            raise ImportRefused(f"{where} is a {model.get('type')} tokenizer, not byte-level BPE: bpe.py imports "
                                f"only byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM)")
        if model.get("byte_fallback"):
            raise ImportRefused(f"{where} is a SentencePiece-style BPE (byte_fallback), not byte-level BPE: bpe.py "
                                f"imports only byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM)")
        for option in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(option):
                raise ImportRefused(f"{where}: the model's {option} is {model[option]!r}; byte-level BPE has none")
        if model.get("dropout"):
            raise ImportRefused(f"{where}: the model's dropout is {model['dropout']}, which makes the ids random; "
                                f"set it to null")
        normalizer = state.get("normalizer")  # None, one normalizer, or a Sequence of them
        if isinstance(normalizer, dict) and normalizer.get("type") == "Sequence":
            steps = normalizer.get("normalizers")
        else:
            steps = [] if normalizer is None else [normalizer]
        if not isinstance(steps, list):
            steps = [steps]
        kinds = [step.get("type") if isinstance(step, dict) else step for step in steps]
        if any(kind != "NFC" for kind in kinds):
            raise ImportRefused(f"{where}: the normalizer {kinds} is not one bpe.py reproduces (it reads none, or NFC)")
        normalizer = "NFC" if kinds else None
        patterns = split_patterns(state.get("pre_tokenizer"), where)
        vocab, merges, ignore_merges = model.get("vocab"), model.get("merges"), bool(model.get("ignore_merges"))
        added = state.get("added_tokens") or []
    elif os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        where, merges_where = vocab_path, merges_path
        vocab = read_json(vocab_path)
        try:
            with open(merges_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise ImportRefused(f"cannot read {merges_path}: {e.strerror}")
        except UnicodeDecodeError:
            raise ImportRefused(f"{merges_path} is not UTF-8 text")
        merges = [line for line in lines if line and not line.startswith("#version")]
        normalizer, patterns, ignore_merges = None, [translate_pattern(GPT2_PATTERN)], False
        added = ([{"id": vocab["<|endoftext|>"], "content": "<|endoftext|>"}]
                 if isinstance(vocab, dict) and "<|endoftext|>" in vocab else [])
    else:
        raise ImportRefused(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt: give a Hugging Face "
                            f"tokenizer folder")
    if not (isinstance(vocab, dict) and all(type(i) is int and 0 <= i < 2**20 for i in vocab.values())):
        raise ImportRefused(f"{where}: the vocabulary is not a map from token strings to ids below 2**20")
    if not (isinstance(merges, list) and isinstance(added, list) and all(isinstance(a, dict) for a in added)):
        raise ImportRefused(f"{merges_where}: the merges or added_tokens are not lists")

    # Added tokens: their text, as it appears in the text they are cut out of.
    special_tokens = {}  # string -> id
    for token in added:
        content, token_id = token.get("content"), token.get("id")
        if not (isinstance(content, str) and content and type(token_id) is int and 0 <= token_id < 2**20):
            raise ImportRefused(f"{where}: the added token {token!r} has no text or no id below 2**20")
        if content in special_tokens or token_id in special_tokens.values():
            raise ImportRefused(f"{where}: the added token {content!r} (id {token_id}) is listed twice")
        for option in ("lstrip", "rstrip", "single_word"):
            if token.get(option):
                raise ImportRefused(f"{where}: the added token {content!r} sets {option}, which bpe.py does not "
                                    f"reproduce")
        special_tokens[content] = token_id
    added_ids = set(special_tokens.values())

    # The vocabulary: each token's string, in GPT-2's byte alphabet, back to its bytes.
    characters = byte_characters()
    byte_of = {char: byte for byte, char in characters.items()}
    size = max([*vocab.values(), *special_tokens.values(), -1]) + 1
    token_bytes = [b""] * size  # id -> bytes; b"" for an id that nothing uses
    for content, token_id in special_tokens.items():
        token_bytes[token_id] = content.encode("utf-8")
    for string, token_id in vocab.items():
        if token_id in added_ids:
            continue  # an added token that is also in the vocabulary (GPT-2's <|endoftext|>): its text is its bytes
        if token_bytes[token_id]:
            raise ImportRefused(f"{where}: id {token_id} belongs to two tokens")
        if not string or any(char not in byte_of for char in string):
            raise ImportRefused(f"{where}: the token {string!r} (id {token_id}) is not written in GPT-2's byte "
                                f"alphabet, so this is not a byte-level vocabulary")
        token_bytes[token_id] = bytes(byte_of[char] for char in string)
    missing = [byte for byte in range(256) if characters[byte] not in vocab]
    if missing:
        raise ImportRefused(f"{where}: the vocabulary has no token for {len(missing)} of the 256 bytes (e.g. "
                            f"0x{missing[0]:02x}), so some text cannot be encoded")

    # Merges: "left right" strings (merges.txt, older tokenizer.json) or [left, right] pairs; the order is the rank.
    pairs = []
    for rank, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(part, str) for part in parts)):
            raise ImportRefused(f"{merges_where}: merge {rank} {merge!r} is not two tokens")
        for token in (*parts, parts[0] + parts[1]):
            if token not in vocab:
                raise ImportRefused(f"{merges_where}: merge {rank} {merge!r} needs {token!r}, which is not in the "
                                    f"vocabulary")
        if vocab[parts[0] + parts[1]] in added_ids:
            raise ImportRefused(f"{merges_where}: merge {rank} {merge!r} makes an added token")
        pairs.append((vocab[parts[0]], vocab[parts[1]]))

    # The model's embedding may have more rows than the tokenizer has ids (Qwen3: 151936 against 151669).
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        config = read_json(config_path)
        rows = config.get("vocab_size") if isinstance(config, dict) else None
        if rows is not None:
            if type(rows) is not int or not size <= rows <= 2**20:
                raise ImportRefused(f"{config_path}: vocab_size {rows!r} is not a whole number between the "
                                    f"tokenizer's {size} ids and 2**20")
            token_bytes += [b""] * (rows - size)

    try:  # Tokenizer checks the table once more: every byte has a token, every merge makes one
        return Tokenizer(pairs, special_tokens, patterns if len(patterns) > 1 else patterns[0], token_bytes=token_bytes,
                         ignore_merges=ignore_merges, normalizer=normalizer, imported_from=tokenizer_name(folder))
    except ValueError as e:
        raise ImportRefused(f"{where}: {e}")


def tokenizer_name(folder):
    """The name of an imported tokenizer, used in its outputs' names: the folder's own name, with any character
    other than letters, digits, "_" and "-" replaced by "_" (".../gpt2/" -> "gpt2", "Qwen3-0.6B" -> "Qwen3-0_6B"):
    no dot, so that a model script finds the corpus, and its floor file, by cutting ".<name>.npy" off."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(os.path.abspath(folder)))


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


def main(argv=None):
    parser = ArgumentParser(description="Train a byte-level BPE tokenizer on a UTF-8 text file, or import a published "
                            "one, and write the tokenized file next to it.", allow_abbrev=False)
    parser.add_argument("--data", default="data/stories.txt", help="UTF-8 text corpus; the outputs are its "
                        "full name plus .bpe<vocab_size>.npy, .json and .vocab.txt (default: %(default)s)")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="tokens in the vocabulary: 256 bytes + merges + 1 special token (default: 1024)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="instead of training, import the byte-level BPE tokenizer of this Hugging Face folder "
                        "(its tokenizer.json, or GPT-2's vocab.json + merges.txt; the ids stay the published ones); "
                        "the outputs are then named --data plus .<the folder's name>.npy, .json and .vocab.txt")
    parser.add_argument("--overwrite", type=parse_bool, default=False,
                        help="replace the outputs if they exist (default: false)")
    args = parser.parse_args(argv)
    # <|endoftext|> is registered so that a corpus which separates documents with it gets one id per
    # separator, never merged with its neighbours; a corpus without it (like data/stories.txt) just
    # leaves that id unused. Either way the .npy decodes back to the file's exact bytes.
    special_tokens = ["<|endoftext|>"]
    if args.tokenizer is None:
        args.vocab_size = 1024 if args.vocab_size is None else args.vocab_size
        if not 256 + len(special_tokens) <= args.vocab_size <= 2**20:
            parser.error(f"--vocab_size must be between {256 + len(special_tokens)} and {2**20}, got {args.vocab_size}")
        prefix = f"{args.data}.bpe{args.vocab_size}"  # the full name, so no two inputs share outputs
    else:
        if args.vocab_size is not None:
            parser.error("--vocab_size sets the size of a tokenizer to train, and --tokenizer imports one: give one "
                         "of the two")
        if not os.path.isdir(args.tokenizer):
            parser.error(f"--tokenizer={args.tokenizer} is not a folder: give a Hugging Face tokenizer folder (with "
                         f"tokenizer.json, or vocab.json and merges.txt)")
        if not tokenizer_name(args.tokenizer).strip("."):
            parser.error(f"--tokenizer={args.tokenizer} has no name to give the outputs: copy it to a named folder")
        prefix = f"{args.data}.{tokenizer_name(args.tokenizer)}"
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
    check_outputs([prefix + ".npy", prefix + ".json", prefix + ".vocab.txt"], args.overwrite, parser.error)

    start = time.perf_counter()
    if args.tokenizer is None:
        tokenizer = train(text, args.vocab_size, special_tokens)
    else:
        try:
            tokenizer = import_tokenizer(args.tokenizer)
        except ImportRefused as e:
            parser.error(str(e))
    prepare_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ids = tokenizer.encode(text, allowed_special="all")
    encode_seconds = time.perf_counter() - start
    decoded = b"".join(tokenizer.token_bytes[i] for i in ids)
    assert decoded == raw or tokenizer.normalizer  # what the model scripts rely on; see the note below

    np.save(prefix + ".npy", np.array(ids, dtype=np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32))
    tokenizer.save(prefix + ".json")
    tokenizer.save_vocab(prefix + ".vocab.txt")
    if args.tokenizer is None:
        print(f"trained {len(tokenizer.merges)} merges (vocabulary of {tokenizer.vocab_size}) in "
              f"{prepare_seconds:.2f} s")
        if tokenizer.vocab_size < args.vocab_size:
            print(f"stopped early: no pair occurs twice any more, so the vocabulary is smaller than {args.vocab_size}")
    else:
        print(f"imported {args.tokenizer} in {prepare_seconds:.2f} s: {len(tokenizer.merges)} merges, "
              f"{len(tokenizer.special_tokens)} added tokens, {tokenizer.vocab_size} ids "
              f"({tokenizer.token_bytes.count(b'')} of them unused)")
    if decoded != raw:
        print(f"note: {tokenizer.normalizer} normalization changed the text, so the token file decodes to "
              f"{len(decoded):,} bytes, not the file's {len(raw):,}")
    print(f"encoded {len(raw):,} bytes into {len(ids):,} tokens in {encode_seconds:.2f} s: "
          f"{len(raw) / max(len(ids), 1):.2f} bytes per token")
    print(f"wrote {prefix}.npy, {prefix}.json, {prefix}.vocab.txt")


if __name__ == "__main__":
    main()
