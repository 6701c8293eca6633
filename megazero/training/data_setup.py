"""Resolve the training data before any process group exists: default corpus or user data, the
tokenizer, and the checks that user files are what they claim to be (one-line DataErrors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megazero.config import RunConfig
from megazero.data import IndexedDataset, Tokenizer, prepare_default_data
from megazero.errors import DataError


@dataclass(frozen=True)
class ResolvedData:
    prefix: Path
    tokenizer_model: Path
    vocab_size: int
    description: str


def resolve_data(cfg: RunConfig, log: Callable[[str], None]) -> ResolvedData:
    if cfg.data.data_path is None:
        prefix, model = prepare_default_data(cfg.data.cache_dir, vocab_size=cfg.data.default_vocab_size, log=log)
        description = "default corpus (Python standard-library sources on this machine)"
    else:
        prefix, model = Path(cfg.data.data_path), Path(cfg.data.tokenizer_model)
        description = f"{prefix}"
    dataset = IndexedDataset(prefix)  # validates header, version, .bin size
    tokenizer = Tokenizer(model)
    if tokenizer.vocab_size != dataset.vocab_size:
        raise DataError(
            f"tokenizer {model} has vocab size {tokenizer.vocab_size} but dataset {prefix}.idx was built with "
            f"vocab size {dataset.vocab_size}; pass the --tokenizer-model the data was preprocessed with"
        )
    return ResolvedData(prefix=Path(prefix), tokenizer_model=Path(model), vocab_size=tokenizer.vocab_size,
                        description=f"{description}: {len(dataset):,} documents, {dataset.num_tokens:,} tokens")
