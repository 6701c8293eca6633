"""GPT pretraining samples: fixed-length windows over a shuffled stream of documents.

Given the documents `document_ids` of one split (every document already ends with the eod token,
see tools/preprocess_data.py --append-eod), a `GPTDataset` of `num_samples` samples of
`seq_length` is three index arrays, all built in memory with numpy from one seed:

* ``doc_idx`` int64[E * D]: the split's D documents, repeated for the E epochs needed to hold
  num_samples windows, each epoch in its own random order. Concatenating ``doc_idx``'s documents
  gives the token *stream* of this dataset (only this split's documents, so splits never mix).
* ``sample_idx`` int64[S + 1, 2]: row i = (position in doc_idx, token offset in that document) of
  stream position ``i * seq_length``. Sample i is stream tokens ``[i*seq, (i+1)*seq]`` inclusive,
  i.e. seq_length + 1 tokens, so consecutive samples share one token (as in Megatron-LM);
  S = (E * tokens_per_epoch - 1) // seq_length windows fit.
* ``shuffle_idx`` int64[num_samples]: which window each dataset index returns. Windows that start
  in the first E-1 epochs are permuted among themselves and all come first (every full epoch is
  seen exactly once); windows starting in the last, partial epoch are permuted separately and
  only as many as needed are used.

``dataset[i] = {"tokens": stream window [:-1], "labels": window [1:]}``, both int64[seq_length].
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from megazero.data.indexed_dataset import IndexedDataset
from megazero.errors import DataError

SPLIT_NAMES = ("train", "valid", "test")


class GPTDataset(torch.utils.data.Dataset):
    """`num_samples` windows of seq_length + 1 tokens over `document_ids` of `indexed`."""

    def __init__(self, indexed: IndexedDataset, document_ids: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, name: str):
        if seq_length <= 0:
            raise DataError(f"seq_length must be positive, got {seq_length}")
        if num_samples <= 0:
            raise DataError(f"{name}: num_samples must be positive, got {num_samples}")
        document_ids = np.asarray(document_ids, dtype=np.int64)
        assert document_ids.ndim == 1
        assert document_ids.size == 0 or (document_ids.min() >= 0 and document_ids.max() < len(indexed))
        self.indexed = indexed
        self.document_ids = document_ids
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.name = name

        tokens_per_epoch = int(indexed.sizes[document_ids].sum())
        if tokens_per_epoch < seq_length + 1:
            raise DataError(
                f"{indexed.prefix}: the {name} split has {document_ids.size} documents with "
                f"{tokens_per_epoch} tokens, fewer than one sample of seq_length + 1 = "
                f"{seq_length + 1} tokens; use more data, give {name} a larger weight in --split, "
                f"or a shorter --seq-length")
        self.tokens_per_epoch = tokens_per_epoch
        # Fewest epochs E with (E * T - 1) // seq >= num_samples.
        self.num_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)

        rng = np.random.RandomState(seed)
        self.doc_idx = _build_doc_idx(document_ids, self.num_epochs, rng)
        self.sample_idx = _build_sample_idx(indexed.sizes, self.doc_idx, seq_length)
        self.shuffle_idx = _build_shuffle_idx(
            num_samples, num_windows=self.sample_idx.shape[0] - 1,
            num_early=-(-((self.num_epochs - 1) * tokens_per_epoch) // seq_length), rng=rng)

    def __len__(self) -> int:
        return self.num_samples

    def window(self, i: int) -> np.ndarray:
        """Sample i's seq_length + 1 tokens as int64 (after shuffling)."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.name} dataset of {self.num_samples}")
        w = int(self.shuffle_idx[i])
        (d0, o0), (d1, o1) = self.sample_idx[w], self.sample_idx[w + 1]
        get = self.indexed.get
        if d0 == d1:
            parts = [get(self.doc_idx[d0], o0, o1 - o0 + 1)]
        else:
            parts = ([get(self.doc_idx[d0], o0)]
                     + [get(self.doc_idx[d]) for d in range(d0 + 1, d1)]
                     + [get(self.doc_idx[d1], 0, o1 + 1)])
        out = np.concatenate(parts).astype(np.int64)
        assert out.size == self.seq_length + 1, (out.size, self.seq_length)
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = torch.from_numpy(self.window(int(i)))
        return {"tokens": window[:-1].clone(), "labels": window[1:].clone()}

    def __repr__(self) -> str:
        return (f"GPTDataset({self.name!r}, docs={self.document_ids.size}, samples={self.num_samples}, "
                f"seq_length={self.seq_length}, epochs={self.num_epochs}, seed={self.seed})")


def _build_doc_idx(document_ids: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """int64[E * D]: one independent permutation of the documents per epoch."""
    return np.concatenate([rng.permutation(document_ids) for _ in range(num_epochs)]).astype(np.int64)


def _build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int) -> np.ndarray:
    """int64[S + 1, 2] (doc_idx position, offset) of stream positions 0, seq, 2*seq, ..."""
    # starts[j] = stream position of the first token of doc_idx[j]; starts[-1] = stream length.
    starts = np.zeros(doc_idx.size + 1, dtype=np.int64)
    np.cumsum(sizes[doc_idx], out=starts[1:])
    num_windows = (int(starts[-1]) - 1) // seq_length
    positions = np.arange(num_windows + 1, dtype=np.int64) * seq_length
    # side="right" - 1 picks the last document starting at or before the position, which skips
    # empty documents (they share their start with the next one).
    doc_pos = np.searchsorted(starts, positions, side="right") - 1
    return np.stack([doc_pos, positions - starts[doc_pos]], axis=1)


def _build_shuffle_idx(num_samples: int, num_windows: int, num_early: int,
                       rng: np.random.RandomState) -> np.ndarray:
    """int64[num_samples]: early windows (first E-1 epochs) permuted, then last-epoch windows."""
    assert num_early <= num_samples <= num_windows, (num_early, num_samples, num_windows)
    early = rng.permutation(num_early).astype(np.int64)
    late = num_early + rng.permutation(num_windows - num_early).astype(np.int64)
    return np.concatenate([early, late[:num_samples - num_early]])


def parse_split(split: str) -> list[float]:
    """'969,30,1' (or '969/30/1', or fewer numbers, padded with 0) -> 3 weights summing to 1."""
    parts = re.split(r"[,/]", split.strip()) if split.strip() else []
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not np.isfinite(w) or w < 0 for w in weights) \
            or sum(weights) <= 0:
        raise DataError(f"bad --split {split!r}; give up to three non-negative train,valid,test "
                        f"weights with a positive sum, e.g. --split 969,30,1")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_documents(num_docs: int, split: str) -> list[np.ndarray]:
    """Contiguous document ranges [train, valid, test] in proportion to the `split` weights.

    Boundaries are the rounded cumulative fractions of num_docs, so the three ranges cover
    0..num_docs-1 exactly once.
    """
    assert num_docs >= 0
    fractions = np.cumsum(parse_split(split))
    bounds = [0] + [int(round(f * num_docs)) for f in fractions[:-1]] + [num_docs]
    return [np.arange(bounds[k], bounds[k + 1], dtype=np.int64) for k in range(3)]


def build_train_valid_test_datasets(
        prefix: str | Path, split: str, seq_length: int, seed: int,
        num_samples: tuple[int, int, int],
) -> tuple[GPTDataset | None, GPTDataset | None, GPTDataset | None]:
    """Open the dataset at `prefix` and build the three splits; None where weight or samples is 0."""
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise DataError(f"num_samples must be three non-negative counts (train, valid, test), "
                        f"got {num_samples}")
    weights = parse_split(split)
    indexed = IndexedDataset(prefix)
    ranges = split_documents(len(indexed), split)
    out: list[GPTDataset | None] = []
    for name, weight, docs, n in zip(SPLIT_NAMES, weights, ranges, num_samples):
        if weight == 0 or n == 0:
            out.append(None)
            continue
        if docs.size == 0:
            raise DataError(
                f"{prefix}: the {name} split of --split {split!r} gets 0 of the {len(indexed)} "
                f"documents; use a corpus with more documents (tools/preprocess_data.py "
                f"--split-documents blank-lines) or a larger {name} weight in --split")
        out.append(GPTDataset(indexed, docs, n, seq_length, seed, name))
    return out[0], out[1], out[2]
