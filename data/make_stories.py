"""Generate the default corpus: short English stories with an exact entropy floor.

Every story comes from a small probabilistic grammar (a cast, places, objects, a little plot), so the
text has structure at several ranges that a language model must learn:

- short: spelling, punctuation, the fixed phrases of the grammar;
- medium: agreement ("a bear" / "an owl", "she was" / "they were", "one apple" / "three apples");
- long: what the first lines of a story introduce (the hero's name, the friend, the object, where it
  was found, the hero's home) is recalled at the end of that story, hundreds of bytes later, so
  only attention or a recurrent state that carries it can predict those bytes.

Why the entropy is exact: the generator makes every random choice through `Teller.pick`, which
knows the probability of the option it drew. The grammar is written so that the text determines
the choices uniquely (test_all.py parses a sample of stories back by exhaustive search and checks
that exactly one sequence of choices produces each). Then P(text) = product of the choice
probabilities, and -log2 P(text) / bytes is the exact number of bits per byte that the true
generating process assigns to this text: no model can do better except by luck on a finite sample,
and a model whose validation loss goes below it has a bug (typically a causal mask that lets the
future leak in).

The floor is written per split, as the model scripts split the data: the last 10% of bytes are
validation. Each choice's bits count in the split where the choice's text starts. It goes beside
the text, to the text file's full name plus ".floor.json" (data/stories.txt.floor.json).

Usage (from the repo root; the defaults reproduce the committed data/stories.txt and
data/stories.txt.floor.json byte for byte; existing files are replaced only with --overwrite=true):
    python data/make_stories.py --overwrite=true
    python data/make_stories.py --seed=1 --num_bytes=200000 --out=/tmp/more_stories.txt
"""

import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys

VAL_FRACTION = 0.1  # the model scripts validate on the last 10% of the corpus


# -----------------------------------------------------------------------------
# The teller: every random choice goes through pick(), which records its information


class Teller:
    """Writes one story and counts its information: -log2 p of every choice it makes."""

    def __init__(self, rng):
        self.rng = rng
        self.parts = []  # the story's text, piece by piece
        self.num_bytes = 0  # bytes written so far
        self.info = []  # (byte offset where the choice was made, bits)

    def say(self, *texts):
        for text in texts:
            self.parts.append(text)
            self.num_bytes += len(text.encode("utf-8"))

    def pick(self, options, weights=None):
        """Draw one option with probability weight / sum(weights) (uniform without weights)."""
        weights = weights or [1] * len(options)
        index = self.choose(weights)
        if len(options) > 1:
            self.info.append((self.num_bytes, -math.log2(weights[index] / sum(weights))))
        return options[index]

    def choose(self, weights):
        # Inverse-CDF sampling with random.Random.random(), whose stream is stable across Python
        # versions (random.choices' internals are not promised to be), so the corpus reproduces.
        u = self.rng.random() * sum(weights)
        for index, weight in enumerate(weights):
            u -= weight
            if u < 0:
                return index
        return len(weights) - 1

    def text(self):
        return "".join(self.parts)


def zipf(count):
    """Weights 1, 1/2, 1/3, ...: a few common words and a long tail, as in real text."""
    return [1 / (rank + 1) for rank in range(count)]


# -----------------------------------------------------------------------------
# The grammar's words

# name -> pronouns (subject, object, possessive) and whether verbs take the plural form
NAMES = {
    "Mia": "she", "Leo": "he", "Ava": "she", "Sam": "they", "Noah": "he", "Lily": "she",
    "Omar": "he", "Zoë": "she", "Ben": "he", "Ruby": "she", "Kai": "they", "Ivy": "she",
    "Theo": "he", "Nora": "she", "Max": "he", "Ella": "she", "Finn": "he", "Rosa": "she",
    "José": "he", "Luna": "she", "Eli": "he", "Maya": "she", "Jonah": "he", "Ada": "she",
    "Ravi": "he", "Hana": "she", "Oscar": "he", "Iris": "she", "Alex": "they", "Tom": "he",
    "Greta": "she", "Yusuf": "he", "Clara": "she", "Milo": "he", "Freya": "she", "River": "they",
}
NAME_WEIGHTS = dict(zip(NAMES, zipf(len(NAMES))))  # some names are much more common than others
PRONOUNS = {  # subject, object, possessive, "was" or "were"
    "she": ("she", "her", "her", "was"),
    "he": ("he", "him", "his", "was"),
    "they": ("they", "them", "their", "were"),
}
KINDS = ["girl", "boy", "child", "fox", "rabbit", "mouse", "owl", "robot", "otter", "bear", "cat"]
KINDS_OF = {pronoun: [kind for kind in KINDS if kind not in exclude] for pronoun, exclude in
            [("she", {"boy", "child"}), ("he", {"girl", "child"}), ("they", {"girl", "boy"})]}
TRAITS = ["little", "brave", "curious", "kind", "shy", "clever", "old", "happy", "quiet",
          "young", "funny", "gentle", "eager", "proud", "sleepy", "honest"]
HOMES = ["a small village", "a big forest", "an old castle", "a house by the sea", "a busy town",
         "a farm on a hill", "a quiet valley", "a cabin in the woods", "a tall tower",
         "an island far away", "a city of bridges", "a garden full of bees"]
PLACES = ["the park", "the river", "the market", "the library", "the beach", "the old mill",
          "the bakery", "the meadow", "the school", "the harbor", "the cave", "the lake"]
COLORS = ["red", "blue", "green", "yellow", "golden", "silver", "purple", "orange", "white",
          "black", "pink", "brown"]
OBJECTS = ["ball", "key", "box", "book", "kite", "stone", "shell", "hat", "map", "lamp", "cup",
           "bell", "ring", "feather", "clock", "umbrella", "egg", "whistle", "coin", "boat"]
FOUND_AT = ["under a tree", "near the river", "in the garden", "behind the door", "on the hill",
            "in an old chest", "under the bed", "at the bottom of a well", "in the tall grass",
            "on a rock by the lake"]
TIMES = ["morning", "afternoon", "evening", "night", "rainy day", "windy day", "summer day",
         "winter morning"]
FEELINGS = ["happy", "sad", "tired", "excited", "scared", "surprised", "calm", "hungry",
            "proud", "worried"]
REASONS = ["the sun came out", "it started to rain", "the road was long", "a bird sang a song",
           "the wind was cold", "the day was almost over", "a dog barked loudly",
           "the bridge was broken", "the stars were bright", "nobody was home"]
FRUITS = ["apple", "pear", "plum", "orange", "egg", "acorn", "onion", "cherry"]
PLURALS = {"cherry": "cherries"}  # the rest add an "s"
NUMBERS = ["one", "two", "three", "four", "five"]
SKIES = ["grey", "clear", "blue", "dark", "pink"]
WINDS = ["soft", "cold", "warm", "strong"]
ENDINGS = ["on the shelf", "in a box", "under the pillow", "by the window", "in a drawer"]


def article(word):
    """'a' or 'an', by the sound of the next word (medium-range agreement)."""
    return "an" if word[0] in "aeiou" else "a"


def capital(text):
    return text[0].upper() + text[1:]


# -----------------------------------------------------------------------------
# The story


def tell_story(teller):
    """One story. Pronouns always mean the hero (the friend is always named), so they are not
    ambiguous, and every choice shows in the text right after it is made, so the text determines
    the choices (and a parser can recover them one by one)."""
    say, pick = teller.say, teller.pick
    names = list(NAMES)
    say(pick(["Once upon a time", "Long ago", "Not so long ago"], [3, 1, 1]), ", there was ")
    trait = pick(TRAITS)
    say(article(trait), " ", trait, " ")
    hero_kind = pick(KINDS)
    heroes = [name for name in names if hero_kind in KINDS_OF[NAMES[name]]]
    hero = pick(heroes, [NAME_WEIGHTS[name] for name in heroes])
    subject, object_, possessive, was = PRONOUNS[NAMES[hero]]
    say(hero_kind, " named ", hero, ". ", capital(subject), " lived in ")
    home = pick(HOMES)
    say(home, ". ", capital(possessive), " best friend was ")
    friend = pick([name for name in names if name != hero])
    friend_kind = pick(KINDS_OF[NAMES[friend]])
    say(friend, ", ", article(friend_kind), " ", friend_kind, ". One ", pick(TIMES), ", ", hero, " found ")
    color = pick(COLORS)
    say(article(color), " ", color, " ")
    thing = pick(OBJECTS)
    say(thing, " ")
    found_at = pick(FOUND_AT)
    say(found_at, ". ", capital(subject), " ")
    say(pick(["picked it up", "looked at it for a long time", f"showed it to {friend}",
              "put it in a bag"]), ".")

    # The middle: events drawn until the story stops (a geometric number of them, at least one).
    while True:
        event = pick(["walk", "feel", "ask", "count", "weather", "say", "wave"], [3, 3, 2, 2, 1, 2, 1])
        if event == "walk":
            say(" ", pick([f"{hero} and {friend}", f"{friend} and {hero}"]), " walked to ")
            say(pick(PLACES), ".")
        elif event == "feel":  # "was" / "were" agrees with the subject
            say(" ", pick([f"{hero} was", f"{capital(subject)} {was}", f"{friend} was"]), " ")
            say(pick(FEELINGS), " because ", pick(REASONS), ".")
        elif event == "ask":  # recalls where the object was found, long after it was said
            say(f' {friend} asked, "Where did you find the {thing}?" {hero} said, "{capital(found_at)}."')
        elif event == "count":  # "one apple" / "two apples"
            say(" ", pick([hero, capital(subject)]), " found ")
            number = pick(NUMBERS)
            fruit = pick(FRUITS)
            say(number, " ", fruit if number == "one" else PLURALS.get(fruit, fruit + "s"), ".")
        elif event == "weather":
            say(" The sky was ", pick(SKIES), " and the wind was ", pick(WINDS), ".")
        elif event == "wave":  # the object pronoun: "waved at her / him / them"
            say(" ", friend, " waved at ", object_, ".")
        else:  # dialogue that recalls the object and its color
            say(' "', pick([f"I like the {color} {thing}", f"Let us keep the {thing} safe",
                            f"Maybe the {thing} is magic"]), '," said ', pick([hero, friend]), ".")
        if pick([False, True], [3, 1]):
            break

    # The end recalls the object, its color and the hero's home, hundreds of bytes after they came.
    say(f" At the end of the day, {hero} went home to {home} and put the {color} {thing} ")
    say(pick(ENDINGS), ". The end.\n\n")


# -----------------------------------------------------------------------------
# The corpus and its floor


def generate(seed, num_bytes):
    """Stories until the text reaches num_bytes. Returns the text and [(byte offset, bits)]."""
    rng = random.Random(seed)
    parts, info, size = [], [], 0
    while size < num_bytes:
        teller = Teller(rng)
        tell_story(teller)
        parts.append(teller.text())
        info.extend((size + offset, bits) for offset, bits in teller.info)
        size += teller.num_bytes
    return "".join(parts), info


def floor_report(text, info, seed):
    """The exact entropy of the text in bits per byte, overall and for each split."""
    num_bytes = len(text.encode("utf-8"))
    split = int((1 - VAL_FRACTION) * num_bytes)  # as the model scripts split the tokens
    train_bits = sum(bits for offset, bits in info if offset < split)
    val_bits = sum(bits for offset, bits in info if offset >= split)
    return {
        "about": "exact entropy of the text in bits per byte: -log2 P(text) / bytes under the "
                 "grammar that generated it (see data/make_stories.py)",
        "seed": seed,
        "num_bytes": num_bytes,
        "num_stories": text.count("The end.\n\n"),
        "val_fraction": VAL_FRACTION,
        "bpb": round((train_bits + val_bits) / num_bytes, 6),
        "train_bpb": round(train_bits / split, 6),
        "val_bpb": round(val_bits / (num_bytes - split), 6),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }


# -----------------------------------------------------------------------------
# Command line


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
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends the run at once, quietly

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line and exit status 2, no usage block
            message = message.replace("\n", "\\n").replace("\r", "\\r")  # one line, even for a path with a break
            print(f"make_stories.py: {message} (see --help)", file=sys.stderr)
            sys.exit(2)

    parser = Parser(description="Generate the story corpus and its entropy floor.", allow_abbrev=False)
    parser.add_argument("--seed", type=int, default=0, help="seed of the grammar's choices (default 0)")
    parser.add_argument("--num_bytes", type=int, default=1_000_000, help="corpus size in bytes (default 1000000)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "stories.txt"),
                        help="output text file (default data/stories.txt); the floor goes beside it, "
                             "to its full name plus .floor.json")
    parser.add_argument("--overwrite", type=parse_bool, default=False,
                        help="replace the text file and its floor if they exist (default false)")
    args = parser.parse_args()
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not 1000 <= args.num_bytes <= 1_000_000_000:
        parser.error(f"--num_bytes must be between 1000 and 1000000000, got {args.num_bytes}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        parser.error(f"--out: folder {out_dir} does not exist")
    floor_path = args.out + ".floor.json"
    check_outputs([args.out, floor_path], args.overwrite, parser.error)

    text, info = generate(args.seed, args.num_bytes)
    report = floor_report(text, info, args.seed)
    with open(args.out, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    with open(floor_path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out} ({report['num_bytes']:,} bytes, {report['num_stories']:,} stories) and {floor_path}")
    print(f"entropy floor: train {report['train_bpb']:.4f} bpb, val {report['val_bpb']:.4f} bpb")


if __name__ == "__main__":
    main()
