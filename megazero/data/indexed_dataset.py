"""The memory-mapped token store: a `.bin` of concatenated token ids and an `.idx` describing it.

A dataset is named by a prefix ``P``; it lives in ``P.bin`` and ``P.idx``. All integers are
little-endian.

``P.idx`` (48-byte header, then two arrays)::

    offset  size   type      field
    0       8      bytes     magic  b"MZIDX\\x00\\x00\\x00"
    8       8      uint64    format version (= 1)
    16      1      uint8     dtype code of the tokens in .bin: 1 = uint16, 2 = int32
    17      7      -         zero padding (keeps the fields below 8-byte aligned)
    24      8      uint64    vocab_size of the tokenizer the ids come from
    32      8      uint64    N = number of documents
    40      8      uint64    T = total number of tokens (sum of the document lengths)
    48      8*N    int64[N]  document lengths in tokens
    48+8N   8*N    int64[N]  document start offsets in tokens (0, then the running sum of lengths)

``P.bin``: the T tokens, document after document, in the header's dtype (so its size is exactly
``T * itemsize`` bytes). The dtype is uint16 when ``vocab_size < 65536`` and int32 otherwise.

`IndexedDataset` checks all of this on open and raises a one-line `DataError` naming the file,
including that every token id in ``P.bin`` is below the header's vocab_size (ids from another
tokenizer would index past the embedding table). That needs one pass over the tokens, done the
first time and cached beside the dataset in ``P.ids.json`` (the min and max id, keyed by the
``.bin``'s size, mtime and inode; not written if the folder is read-only), so later opens are cheap.
`IndexedDatasetBuilder` streams tokens to a temporary ``.bin`` and renames ``.bin`` then ``.idx``
into place at `finalize`, so a crash never leaves a half-written dataset under the real names
(a dataset is complete when both files exist and agree; see `dataset_exists`).
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megazero.errors import DataError

MAGIC = b"MZIDX\x00\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<8sQB7xQQQ")  # magic, version, dtype code, pad, vocab, docs, tokens
HEADER_SIZE = _HEADER.size  # 48
DTYPES: dict[int, np.dtype] = {1: np.dtype("<u2"), 2: np.dtype("<i4")}
_CODES = {dt: code for code, dt in DTYPES.items()}
_FIX = "rebuild it with tools/preprocess_data.py"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 halves the file size whenever every id fits in it."""
    return DTYPES[1] if vocab_size < 2**16 else DTYPES[2]


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def dataset_exists(prefix: str | Path) -> bool:
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


def ids_cache_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.ids.json")


def _scan_ids(tokens: np.ndarray, chunk: int = 1 << 26) -> tuple[int, int]:
    """(min, max) token id, one chunked pass over the memory map."""
    lo, hi = None, None
    for start in range(0, tokens.size, chunk):
        part = tokens[start:start + chunk]
        lo = int(part.min()) if lo is None else min(lo, int(part.min()))
        hi = int(part.max()) if hi is None else max(hi, int(part.max()))
    return lo, hi


def token_id_range(prefix: str | Path, tokens: np.ndarray, vocab_size: int) -> tuple[int, int]:
    """(min, max) id of a non-empty dataset's tokens: from P.ids.json if it matches the .bin, else
    scanned and, when within [0, vocab_size), cached there (best effort: a read-only folder just means
    scanning again next time; a bad dataset gets no cache file, nothing is written beside it)."""
    from megazero.fileio import atomic_open

    st = bin_path(prefix).stat()
    key = {"bin_bytes": st.st_size, "bin_mtime_ns": st.st_mtime_ns, "bin_inode": st.st_ino}
    cache = ids_cache_path(prefix)
    try:
        cached = json.loads(cache.read_text())
        if isinstance(cached, dict) and {k: cached.get(k) for k in key} == key:
            return int(cached["min_id"]), int(cached["max_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    lo, hi = _scan_ids(tokens)
    if lo < 0 or hi >= vocab_size:
        return lo, hi
    try:
        with atomic_open(cache, "w") as f:
            json.dump({**key, "min_id": lo, "max_id": hi}, f)
    except OSError:
        pass
    return lo, hi


class IndexedDatasetBuilder:
    """Writes a dataset document by document; only the document lengths are kept in memory.

    Use as a context manager (an exception aborts and removes the temporaries) or call
    `finalize()` / `abort()` yourself.
    """

    def __init__(self, prefix: str | Path, vocab_size: int):
        if vocab_size <= 0 or vocab_size > 2**31:
            raise DataError(f"{prefix}: vocab_size {vocab_size} out of range (1..2**31)")
        self.prefix = Path(prefix)
        self.vocab_size = int(vocab_size)
        self.dtype = dtype_for_vocab(vocab_size)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        self._tmp_bin = Path(f"{bin_path(prefix)}{tag}")
        self._tmp_idx = Path(f"{idx_path(prefix)}{tag}")
        self._bin = open(self._tmp_bin, "xb")
        self._sizes: list[int] = []
        self._done = False

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        assert not self._done, "add_document after finalize/abort"
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise DataError(f"{self.prefix}: a document must be a 1-D sequence of token ids, "
                            f"got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"{self.prefix}: token id out of range [0, {self.vocab_size}) "
                            f"(min {arr.min()}, max {arr.max()}); pass the tokenizer's vocab size")
        try:
            self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        except OSError as err:
            raise self._write_error(err) from None
        self._sizes.append(int(arr.size))

    def _write_error(self, err: OSError) -> DataError:
        return DataError(f"{bin_path(self.prefix)}: cannot write the dataset ({err.strerror or err}); free space "
                         f"there or write the dataset elsewhere (nothing was left behind)")

    def finalize(self) -> None:
        """Write the index and move both files into place (.bin first, then .idx)."""
        assert not self._done, "finalize called twice"
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            sizes = np.asarray(self._sizes, dtype=np.int64)
            offsets = np.zeros_like(sizes)
            np.cumsum(sizes[:-1], out=offsets[1:])
            num_tokens = int(sizes.sum())
            with open(self._tmp_idx, "xb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], self.vocab_size,
                                     sizes.size, num_tokens))
                f.write(sizes.astype("<i8").tobytes())
                f.write(offsets.astype("<i8").tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._tmp_bin, bin_path(self.prefix))
            os.replace(self._tmp_idx, idx_path(self.prefix))
            self._done = True
        except OSError as err:
            self.abort()
            raise self._write_error(err) from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove the temporaries; the real output names are untouched. Never fails half-way: on a full
        disk close() cannot flush the buffer and raises, and the temporaries must still go."""
        self._done = True
        try:
            self._bin.close()
        except OSError:
            pass  # the file is closed anyway (the raw file closes even when the flush fails)
        finally:
            self._tmp_bin.unlink(missing_ok=True)
            self._tmp_idx.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


class IndexedDataset:
    """Read-only view of a dataset: documents are slices of one np.memmap over ``P.bin``.

    sizes: int64[N] document lengths; doc_offsets: int64[N] start of each document in tokens.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx, bin_ = idx_path(prefix), bin_path(prefix)
        for p in (idx, bin_):
            if not p.is_file():
                raise DataError(f"{p}: dataset file not found; check the data prefix or build it "
                                f"with tools/preprocess_data.py --output-prefix {prefix}")
        idx_size = idx.stat().st_size
        with open(idx, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) >= len(MAGIC) and head[:len(MAGIC)] != MAGIC:
            raise DataError(f"{idx}: bad magic {head[:len(MAGIC)]!r} (expected {MAGIC!r}); this is "
                            f"not a megazero index file: {_FIX}")
        if len(head) < HEADER_SIZE:
            raise DataError(f"{idx}: truncated index ({idx_size} bytes, header needs {HEADER_SIZE}); {_FIX}")
        _, version, code, vocab, num_docs, num_tokens = _HEADER.unpack(head)
        if version != VERSION:
            raise DataError(f"{idx}: index format version {version}, this megazero reads version "
                            f"{VERSION}; {_FIX}")
        if code not in DTYPES:
            raise DataError(f"{idx}: unknown dtype code {code} (known: {sorted(DTYPES)}); {_FIX}")
        expect_idx = HEADER_SIZE + 16 * num_docs
        if idx_size != expect_idx:
            what = "truncated" if idx_size < expect_idx else "corrupt"
            raise DataError(f"{idx}: {what} index: {idx_size} bytes, but the header's {num_docs} "
                            f"documents need {expect_idx}; {_FIX}")
        self.dtype: np.dtype = DTYPES[code]
        self.vocab_size: int = int(vocab)
        self.num_tokens: int = int(num_tokens)
        bin_size = bin_.stat().st_size
        if bin_size != num_tokens * self.dtype.itemsize:
            raise DataError(f"{bin_}: {bin_size} bytes, but {idx.name} says {num_tokens} tokens x "
                            f"{self.dtype.itemsize} bytes = {num_tokens * self.dtype.itemsize}; the "
                            f".bin and .idx do not belong together: {_FIX}")
        # int64 arrays of length N; read into memory (16 bytes per document).
        arrays = np.fromfile(idx, dtype="<i8", offset=HEADER_SIZE, count=2 * num_docs)
        self.sizes: np.ndarray = arrays[:num_docs].astype(np.int64, copy=False)
        self.doc_offsets: np.ndarray = arrays[num_docs:].astype(np.int64, copy=False)
        if num_docs and (self.sizes.min() < 0 or self.doc_offsets[0] != 0
                         or not np.array_equal(self.doc_offsets[1:], np.cumsum(self.sizes)[:-1])
                         or int(self.sizes.sum()) != num_tokens):
            raise DataError(f"{idx}: document lengths/offsets are inconsistent with each other or "
                            f"with the token count; {_FIX}")
        # np.memmap cannot map an empty file.
        self._tokens = (np.memmap(bin_, dtype=self.dtype, mode="r") if num_tokens
                        else np.empty(0, dtype=self.dtype))
        if num_tokens:
            lo, hi = token_id_range(prefix, self._tokens, self.vocab_size)
            if lo < 0 or hi >= self.vocab_size:
                bad = f"max id {hi}" if hi >= self.vocab_size else f"min id {lo}"
                raise DataError(f"{bin_}: token ids out of range: {bad}, but the vocabulary has {self.vocab_size} "
                                f"ids [0, {self.vocab_size}) ({idx.name}); the tokens were not made with this "
                                f"tokenizer: {_FIX} and the tokenizer the run uses")

    def __len__(self) -> int:
        return int(self.sizes.size)

    def __getitem__(self, doc: int) -> np.ndarray:
        """One whole document as a read-only array view (dtype `self.dtype`)."""
        return self.get(doc)

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document `doc` (to its end when length is None)."""
        n = len(self)
        if not -n <= doc < n:
            raise IndexError(f"document {doc} out of range for {n} documents in {self.prefix}")
        doc %= n
        size = int(self.sizes[doc])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for document "
                             f"{doc} of length {size}")
        start = int(self.doc_offsets[doc]) + offset
        return self._tokens[start:start + length]

    def __getstate__(self) -> dict:
        # Pickling (DataLoader workers) reopens the files instead of copying the memmap's data.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return (f"IndexedDataset({str(self.prefix)!r}, docs={len(self)}, tokens={self.num_tokens}, "
                f"dtype={self.dtype.name}, vocab_size={self.vocab_size})")
