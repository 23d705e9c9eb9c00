"""The project's smoke and correctness tests.

    python test_all.py          # every test: one line each, then "N passed, N failed"
    python test_all.py llama    # only the tests whose name contains "llama"
    python -m pytest test_all.py

Plain functions named test_*, plain asserts, no framework needed. Every test compares against
something independent of the code under test: a formula, a hand-worked example, a slow reference
path, or the other framework. Everything is small: the whole suite runs in under two minutes on
two CPU cores.
"""

import hashlib
import json
import lzma
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))

import make_stories  # noqa: E402  (data/make_stories.py)

STORIES = os.path.join(ROOT, "data", "stories.txt")
FLOOR = os.path.join(ROOT, "data", "stories.floor.json")


def run_script(*args, timeout=120):
    """Run a project script as a user would (from the repo root); returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result, *words):
    """A user's mistake: exit status 2, exactly one line on stderr, naming the problem."""
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


# -----------------------------------------------------------------------------
# The corpus: data/make_stories.py, data/stories.txt, data/stories.floor.json


class _NeedChoice(Exception):
    def __init__(self, num_options):
        self.num_options = num_options


class _Replay(make_stories.Teller):
    """A teller that makes the given choices, then stops at the first choice it was not given."""

    def __init__(self, choices):
        super().__init__(rng=None)
        self.choices, self.made = choices, 0

    def choose(self, weights):
        if self.made == len(self.choices):
            raise _NeedChoice(len(weights))
        self.made += 1
        return self.choices[self.made - 1]


def _parse_story(target):
    """Every sequence of choices with which tell_story writes exactly `target` (exhaustive search,
    pruned as soon as the text written so far stops being a prefix of the target)."""
    found, stack = [], [[]]
    while stack:
        choices = stack.pop()
        teller = _Replay(choices)
        try:
            make_stories.tell_story(teller)
            num_options = 0
        except _NeedChoice as need:
            num_options = need.num_options
        text = teller.text()
        if not target.startswith(text):
            continue
        if num_options == 0:
            if text == target:
                found.append(choices)
            continue
        stack.extend(choices + [index] for index in range(num_options))
    return found


def test_corpus_text_determines_the_choices():
    # The floor is exact only if no two choice sequences write the same story: parse a sample
    # back by exhaustive search and check that exactly one sequence writes each story.
    text = open(STORIES, encoding="utf-8").read()
    stories = [story + "The end.\n\n" for story in text.split("The end.\n\n")[:-1]]
    for story in stories[:30] + stories[-10:]:
        parses = _parse_story(story)
        assert len(parses) == 1, (len(parses), story[:200])


def test_corpus_regenerates_byte_for_byte():
    floor = json.load(open(FLOOR))
    text, info = make_stories.generate(floor["seed"], 1_000_000)
    data = open(STORIES, "rb").read()
    assert text.encode("utf-8") == data
    assert hashlib.sha256(data).hexdigest() == floor["sha256"]
    assert make_stories.floor_report(text, info, floor["seed"]) == floor


def test_corpus_bits_of_a_hand_worked_story():
    # A teller's bits: a uniform pick among 4 is 2 bits; weights [3, 1] give -log2(3/4) or 2 bits.
    teller = make_stories.Teller(__import__("random").Random(0))
    teller.pick(["a", "b", "c", "d"])
    second = teller.pick(["x", "y"], [3, 1])
    teller.pick(["only"])  # a pick with one option carries no information
    expected = [2.0, -math.log2(3 / 4) if second == "x" else 2.0]
    assert [bits for _, bits in teller.info] == expected


def test_corpus_floor_is_sane():
    # The floor is a lower bound on what any compressor achieves: xz at its best must stay above
    # it, and it must be positive; the two splits cover the file as the model scripts split it.
    data = open(STORIES, "rb").read()
    floor = json.load(open(FLOOR))
    xz_bpb = 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)
    assert 0.05 < floor["train_bpb"] < xz_bpb and 0.05 < floor["val_bpb"] < xz_bpb
    split = int(0.9 * len(data))
    mixed = (floor["train_bpb"] * split + floor["val_bpb"] * (len(data) - split)) / len(data)
    assert abs(mixed - floor["bpb"]) < 1e-5
    assert floor["num_bytes"] == len(data) and 900_000 <= len(data) <= 1_100_000


def test_corpus_long_range_recall():
    # The object found near the start of each story comes back at its end, 100+ bytes later.
    text = open(STORIES, encoding="utf-8").read()
    distances = []
    for story in text.split("\n\n")[:200]:
        found = story.index(" found ") + len(" found ")
        color_thing = " ".join(story[found:].split()[1:3])  # after "a" / "an"
        recalled = story.rindex("put the " + color_thing)
        distances.append(recalled - found)
    assert min(distances) >= 100, min(distances)


def test_corpus_generator_refuses_bad_input():
    assert_one_line_error(run_script("data/make_stories.py", "--num_bytes=-5"), "--num_bytes")
    assert_one_line_error(run_script("data/make_stories.py", "--seed=abc"), "--seed")
    assert_one_line_error(run_script("data/make_stories.py", "--out=/no/such/folder/x.txt"), "--out")
    assert_one_line_error(run_script("data/make_stories.py", "--colour=red"), "--colour")


def test_readme_commands_are_the_ones_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"))
          if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert ci == ["pip install -r requirements.txt", "python test_all.py"], ci
    for command in ci:
        assert f"\n{command}\n" in readme, command


# -----------------------------------------------------------------------------
# Runner


def main():
    pattern = sys.argv[1] if len(sys.argv) > 1 else ""
    tests = [(name, fn) for name, fn in globals().items()
             if name.startswith("test_") and callable(fn) and pattern in name]
    passed = failed = 0
    for name, fn in tests:
        start = time.perf_counter()
        try:
            fn()
            status = "ok"
            passed += 1
        except Exception as error:  # noqa: BLE001  (report every failure, keep going)
            where = traceback.extract_tb(error.__traceback__)[-1]
            status = f"FAIL {type(error).__name__}: {str(error)[:300]} (line {where.lineno})"
            failed += 1
        print(f"{name:<60} {status} ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
