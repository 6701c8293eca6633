"""The data a run trains on when no data flags are given: the Python standard library's source.

megazero ships no third-party text and cannot download any, but every machine that runs it has
the stdlib's ``*.py`` files (about 10 MB of real, varied, permissively licensed code). The
default corpus is:

* every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, except files in ``site-packages``,
  ``dist-packages``, ``test``, ``tests``, ``idlelib``, ``lib2to3`` and ``__pycache__`` folders and
  files over 200 KB, sorted by relative path;
* if they add up to more than `max_bytes`, a deterministic subset spread evenly over that sorted
  list (error diffusion on file sizes), not just its alphabetical beginning;
* one document per file (files that are not UTF-8 are skipped), stored in a seeded random
  order, files under 16,000 characters first, so that the contiguous train/valid/test document
  ranges of ``--split`` each sample the whole library and the small valid/test ranges at the end
  hold files large enough for a sample.

A tokenizer with `vocab_size` pieces is trained on it and the files are tokenized into an indexed
dataset, cached under ``<cache_dir>/stdlib-py<X.Y>-v<vocab>-<digest of the file list>/`` so it
is built once per Python version, vocabulary and file list. torchrun ranks all call
`prepare_default_data` before any process group exists; an exclusive ``fcntl.flock`` on
``<key>.lock`` lets one build while the others wait and then reuse its result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megazero.data.indexed_dataset import IndexedDataset, dataset_exists
from megazero.data.preprocess import write_dataset
from megazero.data.tokenizer import Tokenizer, train_tokenizer
from megazero.errors import DataError
from megazero.fileio import atomic_write_bytes

DEFAULT_MAX_BYTES = 12_000_000
_MAX_FILE_BYTES = 200_000
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                            "lib2to3", "__pycache__"})
# Part of the cache key: bump it when the way the corpus or tokenizer is built changes.
_RECIPE_VERSION = 2
_DOC_ORDER_SEED = 1234
_TAIL_MIN_CHARS = 16_000


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGAZERO_CACHE") or Path.home() / ".cache" / "megazero")


def stdlib_source_files(max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Path, list[Path]]:
    """(stdlib root, the selected source files in sorted order); see the module docstring."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[tuple[str, Path, int]] = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]  # prune: never walk site-packages
        for name in names:
            path = Path(folder, name)
            if not name.endswith(".py") or not path.is_file():
                continue
            size = path.stat().st_size
            if 0 < size <= _MAX_FILE_BYTES:
                candidates.append((path.relative_to(root).as_posix(), path, size))
    candidates.sort()
    total = sum(size for _, _, size in candidates)
    keep = min(1.0, max_bytes / total) if total else 1.0
    selected, credit, taken = [], 0.0, 0
    for _, path, size in candidates:
        # Error diffusion: each file earns keep * size credit; take it when the credit covers it.
        credit += keep * size
        if credit >= size and taken + size <= max_bytes:
            selected.append(path)
            credit -= size
            taken += size
    return root, selected


def cache_key(root: Path, files: list[Path], vocab_size: int) -> str:
    """Folder name of a build: python version, vocab size, digest of recipe + file list + sizes."""
    digest = hashlib.sha256()
    digest.update(f"recipe={_RECIPE_VERSION}\nroot={root}\n".encode())
    for path in files:
        digest.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"stdlib-py{py}-v{vocab_size}-{digest.hexdigest()[:12]}"


def prepare_default_data(cache_dir: Path | str | None = None, vocab_size: int = 4096,
                         log: Callable[[str], object] = print, *,
                         max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Path, Path]:
    """Build (or reuse) the default corpus; returns (data_prefix, tokenizer_model)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root, files = stdlib_source_files(max_bytes)
    if not files:
        raise DataError(f"{root}: no Python source files found for the default corpus; "
                        f"train on your own data instead (see docs/data.md)")
    key = cache_key(root, files, vocab_size)
    folder = cache_dir / key
    prefix, model, meta_path = folder / "data", folder / "tokenizer.model", folder / "meta.json"
    nbytes = sum(p.stat().st_size for p in files)
    what = (f"{len(files):,} Python standard-library source files from {root} "
            f"({nbytes / 1e6:.1f} MB), tokenizer vocab {vocab_size}")

    folder.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{key}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"default data: waiting for another process to build {folder}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if meta_path.is_file() and model.is_file() and dataset_exists(prefix):
                meta = json.loads(meta_path.read_text())
                log(f"default data: {what}, {meta['num_tokens']:,} tokens, cached in {folder}")
                return prefix, model
            start = time.time()
            try:
                stats = _build(files, prefix, model, vocab_size)
            except OSError as err:  # a full disk, no permission: one line, not a traceback
                raise DataError(f"{folder}: cannot build the default corpus there ({err.strerror or err}); free "
                                f"space or pass --data-cache-dir DIR elsewhere") from None
            meta = {"recipe": _RECIPE_VERSION, "python": sys.version, "stdlib": str(root),
                    "num_files": len(files), "num_documents": stats[0], "num_tokens": stats[1],
                    "vocab_size": vocab_size, "bytes": nbytes}
            # written last, atomically: its presence marks a complete build
            atomic_write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
            log(f"default data: {what}, {stats[1]:,} tokens, built in {time.time() - start:.1f} s, "
                f"cached in {folder}")
            return prefix, model
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(files: list[Path], prefix: Path, model: Path, vocab_size: int) -> tuple[int, int]:
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue  # deterministic for a given file list; such files are rare in a stdlib
    # train_tokenizer reads files: hand it the selection as one temporary JSON Lines file.
    corpus = prefix.with_name(f".corpus.{os.getpid()}.jsonl")
    try:
        with open(corpus, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
        train_tokenizer([corpus], model, vocab_size, json_key="text")
    finally:
        corpus.unlink(missing_ok=True)
    # Document order: --split takes contiguous document ranges, and in path order valid/test would
    # be only the alphabetically last packages (xml*, zoneinfo). So: a seeded random order, with
    # the small files moved to the front (stable), so that the short trailing valid/test ranges
    # (969,30,1 gives test a single file) hold files of >= _TAIL_MIN_CHARS (~5k tokens), enough
    # for a sample at any usual --seq-length.
    order = np.random.RandomState(_DOC_ORDER_SEED).permutation(len(texts))
    order = sorted(order, key=lambda i: len(texts[i]) >= _TAIL_MIN_CHARS)
    stats = write_dataset((texts[i] for i in order), Tokenizer(model), prefix,
                          num_threads=os.cpu_count() or 1)
    assert len(IndexedDataset(prefix)) == stats.num_documents
    return stats.num_documents, stats.num_tokens
