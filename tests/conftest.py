"""Shared pytest fixtures: the shared corpus location and a small preprocessed dataset."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = REPO_ROOT.parent / "shared" / "data" / "corpus"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Many gloo processes share 2 cores: one intra-op thread each keeps them from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    if not CORPUS_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared corpus not found at {CORPUS_DIR}; CI must run with shared/ beside the checkout")
        pytest.skip(f"shared corpus not found at {CORPUS_DIR}")
    return CORPUS_DIR


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
    """(prefix, tokenizer_model) of a small dataset: ~300 KB of each corpus file, vocab 512."""
    from megazero.data import Tokenizer, iter_documents, train_tokenizer, write_dataset

    root = tmp_path_factory.mktemp("tiny_dataset")
    sources = []
    for name in ("austen.txt", "shakespeare.txt"):
        text = (corpus_dir / name).read_text(encoding="utf-8")[:300_000]
        path = root / name
        path.write_text(text, encoding="utf-8")
        sources.append(path)
    model = train_tokenizer(sources, root / "tok.model", vocab_size=512)
    tokenizer = Tokenizer(model)
    docs = (doc for src in sources for doc in iter_documents(src))
    write_dataset(docs, tokenizer, root / "tiny")
    return root / "tiny", model
