"""Shared pytest fixtures: the tests' generated text corpus and a small preprocessed dataset.

The tests need no data from outside the checkout: `corpus_dir` holds two text files that this module
generates (pseudo-English words from a fixed syllable inventory, chained by a seeded Markov model so a
model has something to learn; prose paragraphs in one file, verse-like stanzas in the other). The text
depends only on the seeds below (it uses nothing but `random.Random.random()`, whose sequence Python
guarantees for a given seed), so it is byte-identical on every machine and Python version.
"""

import bisect
import os
import random
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Many gloo processes share 2 cores: one intra-op thread each keeps them from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CORPUS_FILES = ("prose.txt", "verse.txt")  # what `corpus_dir` holds, in this order
CORPUS_CHARS = 520_000  # per file: test_data.py takes ~500 KB of each, tiny_dataset 300 KB

_ONSETS = ("", "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y",
           "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr", "wh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ee", "oo", "ou", "ie", "y", "é")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "d", "m", "ng", "st", "nd", "rk", "th", "ll")
_ENDINGS = (".",) * 12 + ("!", "?", ";", ":")


class _Draw:
    """Seeded draws built only on random.Random.random() (its sequence is stable across Pythons)."""

    def __init__(self, seed: int):
        self._random = random.Random(seed).random

    def below(self, n: int) -> int:
        return min(int(self._random() * n), n - 1)

    def chance(self, p: float) -> bool:
        return self._random() < p

    def pick(self, items):
        return items[self.below(len(items))]

    def weighted(self, cumulative: list[float]) -> int:
        return min(bisect.bisect_right(cumulative, self._random() * cumulative[-1]), len(cumulative) - 1)


class _Language:
    """A lexicon with Zipf frequencies (short words common) and a few likely successors per word."""

    def __init__(self, draw: _Draw, num_words: int = 2400, successors: int = 6):
        words: set[str] = set()
        while len(words) < num_words:
            syllables = 1 + draw.below(2) + (draw.below(3) == 0)
            words.add("".join(draw.pick(_ONSETS) + draw.pick(_VOWELS) + draw.pick(_CODAS)
                              for _ in range(syllables)))
        self.words = sorted(words, key=lambda w: (len(w), w))  # the short words get the high ranks
        self.cumulative, total = [], 0.0
        for rank in range(num_words):
            total += 1.0 / (rank + 2.7)
            self.cumulative.append(total)
        self.next = [[draw.weighted(self.cumulative) for _ in range(successors)] for _ in range(num_words)]
        self.names = [w.capitalize() for w in self.words[300:2400:35]]

    def sentence(self, draw: _Draw, length: int) -> str:
        out, word = [], draw.weighted(self.cumulative)
        for i in range(length):
            word = draw.pick(self.next[word]) if draw.chance(0.65) else draw.weighted(self.cumulative)
            if draw.chance(0.02):
                token = str(1 + draw.below(1900))
            elif draw.chance(0.04):
                token = draw.pick(self.names)
            else:
                token = self.words[word]
            if i and i < length - 1 and draw.chance(0.08):
                token += ","
            out.append(token)
        out[0] = out[0][:1].upper() + out[0][1:]
        if draw.chance(0.1):
            return "\u201c" + " ".join(out) + "?\u201d"  # a quoted question
        return " ".join(out) + draw.pick(_ENDINGS)


def generated_text(style: str, num_chars: int, seed: int) -> str:
    """About `num_chars` characters of blank-line separated documents ("prose" or "verse"), ending
    with a newline; the same arguments give the same text everywhere."""
    draw = _Draw(seed)
    lang = _Language(draw)
    blocks, size = [], 0
    while size < num_chars:
        if style == "prose":
            paragraph = " ".join(lang.sentence(draw, 4 + draw.below(16)) for _ in range(1 + draw.below(7)))
            block = textwrap.fill(paragraph, width=72, break_on_hyphens=False)
        else:
            lines = [f"  {draw.pick(lang.names).upper()}."]
            for _ in range(2 + draw.below(9)):
                indent = "    " if draw.chance(0.2) else ""
                lines.append(indent + lang.sentence(draw, 4 + draw.below(6)))
            block = "\n".join(lines)
        blocks.append(block)
        size += len(block) + 2
    return "\n\n".join(blocks) + "\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder with the generated CORPUS_FILES (prose.txt, verse.txt), ~520 KB each."""
    root = tmp_path_factory.mktemp("corpus")
    for seed, name in enumerate(CORPUS_FILES, start=1):
        (root / name).write_text(generated_text(name.removesuffix(".txt"), CORPUS_CHARS, seed), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tp_group():
    """A size-1 process group in this process, for single-process models (no subprocesses needed)."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    group = dist.new_group([0])
    yield group
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_dataset(corpus_dir, tmp_path_factory):
    """(prefix, tokenizer_model) of a small dataset: the first 300 KB of each corpus file, vocab 512."""
    from megazero.data import Tokenizer, iter_documents, train_tokenizer, write_dataset

    root = tmp_path_factory.mktemp("tiny_dataset")
    sources = []
    for name in CORPUS_FILES:
        text = (corpus_dir / name).read_text(encoding="utf-8")[:300_000]
        path = root / name
        path.write_text(text, encoding="utf-8")
        sources.append(path)
    model = train_tokenizer(sources, root / "tok.model", vocab_size=512)
    tokenizer = Tokenizer(model)
    docs = (doc for src in sources for doc in iter_documents(src))
    write_dataset(docs, tokenizer, root / "tiny")
    return root / "tiny", model
