"""Tokenizing a stream of documents into an indexed dataset (the library half of preprocess_data.py).

Documents are encoded in batches with the tokenizer's multi-threaded batch encoder (sentencepiece's or
the Rust `tokenizers` library's: native threads, no GIL, no process pool to pickle through), each
followed by the eod token when `append_eod` (unless the tokenizer's own post-processor already ended it
with that token), and streamed into an `IndexedDatasetBuilder`, so memory stays at one batch of text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megazero.data.indexed_dataset import IndexedDatasetBuilder
from megazero.data.tokenizer_types import TokenizerLike
from megazero.errors import DataError

# Encode this much text per batch: large enough to keep the threads busy, small enough for memory.
_BATCH_CHARS = 4_000_000
_BATCH_DOCS = 4096


@dataclass(frozen=True)
class DatasetStats:
    num_documents: int
    num_tokens: int


def write_dataset(documents: Iterable[str], tokenizer: TokenizerLike, prefix: str | Path, *,
                  append_eod: bool = True, num_threads: int = 1) -> DatasetStats:
    """Tokenize `documents` into ``prefix.bin`` / ``prefix.idx`` (atomically; nothing on error)."""
    eod = tokenizer.eod_id
    if append_eod and eod is None:
        raise DataError(f"{tokenizer.model_path}: the tokenizer has no eos token to end documents with; name one "
                        f"(eos_token in tokenizer_config.json beside it) or pass --no-append-eod")
    num_docs = num_tokens = 0
    with IndexedDatasetBuilder(prefix, tokenizer.vocab_size) as builder:
        batch: list[str] = []
        batch_chars = 0

        def flush() -> None:
            nonlocal num_docs, num_tokens, batch, batch_chars
            for ids in tokenizer.encode_batch(batch, num_threads=num_threads):
                if append_eod and (not ids or ids[-1] != eod):
                    ids.append(eod)
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
