"""Data pipeline: tokenizer, mmap token store, GPT sample index, dp sampler, default corpus.

    text --(tokenizer.py | hf_tokenizer.py)--> ids --(preprocess.py, indexed_dataset.py)--> P.bin/P.idx
         --(gpt_dataset.py)--> shuffled seq_length+1 windows --(sampler.py)--> dp-rank batches

tokenizer_types.py builds either tokenizer (sentencepiece or a Hugging Face tokenizer.json) from
--tokenizer-type; hf_export.py writes one for transformers.AutoTokenizer. The format and index
construction are documented in docs/data.md.

The names below are imported on first use (PEP 562), so tools that only tokenize
(tools/preprocess_data.py) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "DataParallelSampler": "sampler",
    "GPTDataset": "gpt_dataset",
    "HuggingFaceTokenizer": "hf_tokenizer",
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetBuilder": "indexed_dataset",
    "Tokenizer": "tokenizer",
    "build_data_iterator": "sampler",
    "build_tokenizer": "tokenizer_types",
    "build_train_valid_test_datasets": "gpt_dataset",
    "dataset_exists": "indexed_dataset",
    "iter_documents": "text_input",
    "prepare_default_data": "default_corpus",
    "split_documents": "gpt_dataset",
    "train_tokenizer": "tokenizer",
    "write_dataset": "preprocess",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from megazero.data.default_corpus import prepare_default_data
    from megazero.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets, split_documents
    from megazero.data.hf_tokenizer import HuggingFaceTokenizer
    from megazero.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, dataset_exists
    from megazero.data.preprocess import write_dataset
    from megazero.data.sampler import DataParallelSampler, build_data_iterator
    from megazero.data.text_input import iter_documents
    from megazero.data.tokenizer import Tokenizer, train_tokenizer
    from megazero.data.tokenizer_types import build_tokenizer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
