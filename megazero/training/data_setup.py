"""Resolve the training data before any process group exists: default corpus or user data, the
tokenizer, and the checks that user files are what they claim to be (one-line DataErrors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megazero.config import RunConfig
from megazero.data import IndexedDataset, build_tokenizer, build_train_valid_test_datasets, prepare_default_data
from megazero.errors import DataError


@dataclass(frozen=True)
class ResolvedData:
    prefix: Path
    tokenizer_model: Path
    vocab_size: int
    description: str


def resolve_data(cfg: RunConfig, log: Callable[[str], None]) -> ResolvedData:
    if cfg.data.data_path is None:
        prefix, model = prepare_default_data(cfg.data.cache_dir, vocab_size=cfg.data.default_vocab_size or 4096, log=log)
        description = "default corpus (Python standard-library sources on this machine)"
    else:
        prefix, model = Path(cfg.data.data_path), Path(cfg.data.tokenizer_model)
        description = f"{prefix}"
    dataset = IndexedDataset(prefix)  # validates header, version, .bin size
    # the default corpus trains a sentencepiece model (DataConfig.check_tokenizer refuses another type there)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, model)
    if tokenizer.vocab_size != dataset.vocab_size:
        raise DataError(
            f"tokenizer {model} has vocab size {tokenizer.vocab_size} but dataset {prefix}.idx was built with "
            f"vocab size {dataset.vocab_size}; pass the --tokenizer-model (and --tokenizer-type) the data was "
            f"preprocessed with"
        )
    return ResolvedData(prefix=Path(prefix), tokenizer_model=Path(model), vocab_size=tokenizer.vocab_size,
                        description=f"{description}: {len(dataset):,} documents, {dataset.num_tokens:,} tokens")


def build_datasets(cfg: RunConfig, data: ResolvedData, world_size: int) -> dict:
    """Train / valid / test GPT datasets sized for the run (valid and test: eval_iters global batches).
    Called before any process group exists, so a split too small for one sample is a one-line error
    and not a crash after start-up."""
    t, gbs = cfg.training, cfg.global_batch_size(world_size)
    train, valid, test = build_train_valid_test_datasets(
        data.prefix, cfg.data.split, cfg.model.seq_length, t.seed,
        (t.train_iters * gbs, t.eval_iters * gbs, t.eval_iters * gbs))
    return {"train": train, "valid": valid, "test": test}
