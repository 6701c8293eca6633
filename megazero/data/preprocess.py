"""Tokenizing a stream of documents into an indexed dataset (the library half of preprocess_data.py).

Documents are encoded in batches with sentencepiece's multi-threaded batch encoder (C++ threads,
no GIL, no process pool to pickle through), each followed by the eod token when `append_eod`, and
streamed into an `IndexedDatasetBuilder`, so memory stays at one batch of text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megazero.data.indexed_dataset import IndexedDatasetBuilder
from megazero.data.tokenizer import Tokenizer

# Encode this much text per batch: large enough to keep the threads busy, small enough for memory.
_BATCH_CHARS = 4_000_000
_BATCH_DOCS = 4096


@dataclass(frozen=True)
class DatasetStats:
    num_documents: int
    num_tokens: int


def write_dataset(documents: Iterable[str], tokenizer: Tokenizer, prefix: str | Path, *,
                  append_eod: bool = True, num_threads: int = 1) -> DatasetStats:
    """Tokenize `documents` into ``prefix.bin`` / ``prefix.idx`` (atomically; nothing on error)."""
    num_docs = num_tokens = 0
    with IndexedDatasetBuilder(prefix, tokenizer.vocab_size) as builder:
        batch: list[str] = []
        batch_chars = 0

        def flush() -> None:
            nonlocal num_docs, num_tokens, batch, batch_chars
            for ids in tokenizer.encode_batch(batch, num_threads=num_threads):
                if append_eod:
                    ids.append(tokenizer.eod_id)
                builder.add_document(np.asarray(ids, dtype=np.int64))
                num_docs += 1
                num_tokens += len(ids)
            batch, batch_chars = [], 0

        for doc in documents:
            batch.append(doc)
            batch_chars += len(doc)
            if batch_chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
                flush()
        if batch:
            flush()
    return DatasetStats(num_docs, num_tokens)
