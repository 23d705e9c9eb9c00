"""Make the small published-format tokenizers that test_all.py checks bpe.py's import against.

bpe.py --tokenizer=DIR must give the same ids as Hugging Face's own tokenizer. So this script trains two
tiny byte-level BPE tokenizers on data/stories.txt with Hugging Face's `tokenizers` library, saves them as
a published model's folder would hold them, and saves beside each the ids that the library itself gives
for a few fixed texts. The tests then need neither the library nor a download.

    fixtures/tokenizer/modern/      tokenizer.json as Llama 3 writes it: a Split pre-tokenizer with the
                                    Llama 3 / GPT-4 (cl100k) pattern, then ByteLevel without its own regex,
                                    ignore_merges, and the special token <|endoftext|>. One extra vocabulary
                                    token that no merge makes ("café"), so that ignore_merges shows. A
                                    config.json with a vocab_size 5 above the tokenizer's, as a model whose
                                    embedding has unused rows (Qwen3's has).
    fixtures/tokenizer/gpt2_style/  GPT-2's vocab.json + merges.txt: the ByteLevel pre-tokenizer with
                                    GPT-2's own regex, and <|endoftext|> as the last vocabulary entry.

Each folder's reference.json holds {"texts": [...], "ids": [[...], ...]} (the library's ids for each text,
added tokens split out as Hugging Face does by default, no BOS/EOS added) and "file_text" / "file_ids": a
short multi-line text that the tests write to a file and tokenize with bpe.py's command line.

Usage (from the repo root; needs `pip install tokenizers`, tested with tokenizers 0.23.3; the outputs are
replaced only with --overwrite=true):
    python tools/make_tokenizer_fixtures.py --overwrite=true
"""

import argparse
import json
import os
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fixtures", "tokenizer")
STORIES = os.path.join(ROOT, "data", "stories.txt")
VOCAB_SIZE = 400  # 256 bytes, about 140 merges, the special token: small files, real merges

# The Llama 3 / GPT-4 (cl100k) split pattern, as Llama 3's tokenizer.json writes it.
MODERN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")

TEXTS = [
    "Not so long ago, there was an eager rabbit named Leo. He lived in a quiet valley.",  # an ordinary story line
    "I don't know. You'RE sure it's fine? We'll see, they'd said; I'M here.",  # contractions, either case
    "12345 3.14 2024",  # numbers: in threes (Llama 3) or whole (GPT-2)
    "café naïve 日本語 🙂 Ünïcödé",  # multi-byte characters, an emoji
    "  a  \n\n  b\t\tc \n",  # whitespace runs
    "hello!!! ...what?!",  # punctuation runs
    "The end.<|endoftext|>Once upon a time",  # the special token
]
FILE_TEXT = ("Once upon a time, a fox named Ivy lived in a city.\n"
             "She said, \"Where's the 3rd bell? It's 1,250 steps away!\"\ncafé, naïve.\n\n"
             "  The end.<|endoftext|>A new story.\n")


def byte_characters():
    """GPT-2's byte -> character table, written out here so that the fixtures do not depend on bpe.py."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = [byte for byte in range(256) if byte not in printable]
    return {byte: chr(byte) if byte in printable else chr(256 + unprintable.index(byte)) for byte in range(256)}


BYTE_CHARACTERS = byte_characters()


def train(pre_tokenizer, ignore_merges, special_tokens):
    """A byte-level BPE with VOCAB_SIZE tokens trained on data/stories.txt (every byte is in its alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([STORIES], trainer)
    return tokenizer


def write_reference(folder, tokenizer):
    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False).ids
    reference = {"texts": TEXTS, "ids": [ids(text) for text in TEXTS], "file_text": FILE_TEXT,
                 "file_ids": ids(FILE_TEXT)}
    with open(os.path.join(folder, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False)
        f.write("\n")


def make_modern(folder):
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    split = pre_tokenizers.Split(Regex(MODERN_PATTERN), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer = train(pre_tokenizers.Sequence([split, byte_level]), True, ["<|endoftext|>"])
    # One token that no merge makes: with ignore_merges, the chunk "café" is taken whole; without, it is not.
    state = json.loads(tokenizer.to_str())
    extra = "".join(BYTE_CHARACTERS[byte] for byte in "café".encode("utf-8"))
    assert extra not in state["model"]["vocab"]
    state["model"]["vocab"][extra] = max(state["model"]["vocab"].values()) + 1
    tokenizer = Tokenizer.from_str(json.dumps(state))
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"vocab_size": tokenizer.get_vocab_size(with_added_tokens=True) + 5}, f)
        f.write("\n")
    write_reference(folder, tokenizer)


def make_gpt2_style(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trained = train(byte_level, False, [])
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = trained.model.save(tmp)
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            merges = f.read()
    vocab["<|endoftext|>"] = len(vocab)  # GPT-2's document separator is its last token
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write(merges)
    # Load the two files back as transformers' GPT2TokenizerFast does: BPE, ByteLevel, <|endoftext|> special.
    tokenizer = Tokenizer(models.BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.add_special_tokens(["<|endoftext|>"])
    write_reference(folder, tokenizer)



def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--overwrite", choices=["true", "false"], default="false",
                        help="replace the fixtures if they exist (default: false)")
    args = parser.parse_args()
    try:
        import tokenizers
    except ImportError:
        parser.exit(2, "make_tokenizer_fixtures.py: error: needs Hugging Face's tokenizers library: "
                       "pip install tokenizers\n")
    folders = {"modern": make_modern, "gpt2_style": make_gpt2_style}
    for name in folders:
        if os.path.exists(os.path.join(OUT, name)) and args.overwrite != "true":
            parser.exit(2, f"make_tokenizer_fixtures.py: error: {os.path.join(OUT, name)} already exists: pass "
                           f"--overwrite=true to replace it\n")
    for name, make in folders.items():
        folder = os.path.join(OUT, name)
        os.makedirs(folder, exist_ok=True)
        for old in os.listdir(folder):
            os.remove(os.path.join(folder, old))
        make(folder)
        print(f"wrote {folder} (tokenizers {tokenizers.__version__}): {', '.join(sorted(os.listdir(folder)))}")


if __name__ == "__main__":
    main()
