"""The tokenizer interface and `build_tokenizer(kind, path)`: one place that turns `--tokenizer-type` and
`--tokenizer-model` into a tokenizer, for preprocessing, training, checkpoints and exports.

Both kinds (megazero.config.TOKENIZER_TYPES) implement `TokenizerLike`:

    kind                     class                                  --tokenizer-model names
    SentencePieceTokenizer   data.tokenizer.Tokenizer               a sentencepiece .model file
    HuggingFaceTokenizer     data.hf_tokenizer.HuggingFaceTokenizer a tokenizer.json, or a folder holding one

Checkpoints keep a copy of the run's tokenizer (`tok.checkpoint_files()`, written by
`write_tokenizer_files`) and record it in the index (`tokenizer_record`: {"type", "files", "bos_id",
"eos_id", "pad_id"}); `tokenizer_in_folder` finds the tokenizer of a Hugging Face model folder (imports).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from megazero.config import TOKENIZER_TYPES
from megazero.errors import DataError


class TokenizerLike(Protocol):
    """What preprocessing (write_dataset), training (resolve_data), checkpoints and exports use."""

    type: str  # one of TOKENIZER_TYPES
    model_path: Path  # what --tokenizer-model named
    vocab_size: int  # ids are in [0, vocab_size): the dataset header and the model's vocabulary
    eod_id: int | None  # appended after every document by preprocessing (the eos token); None: none
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_string(self, i: int | None) -> str | None: ...

    def checkpoint_files(self) -> dict[str, Path | bytes]: ...


def build_tokenizer(kind: str, path: str | Path) -> TokenizerLike:
    """The tokenizer of `kind` (--tokenizer-type) at `path` (--tokenizer-model); DataError (one line, with
    the fix) for a missing file or one of the other kind."""
    if kind == "SentencePieceTokenizer":
        from megazero.data.tokenizer import Tokenizer

        return Tokenizer(path)
    if kind == "HuggingFaceTokenizer":
        from megazero.data.hf_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer(path)
    raise DataError(f"--tokenizer-type must be one of {', '.join(TOKENIZER_TYPES)}, got {kind!r}")


def guess_tokenizer_type(path: str | Path) -> str:
    """The kind a path most likely holds, for tools given a --tokenizer-model without a type: a folder or a
    .json file is a Hugging Face tokenizer, anything else a sentencepiece model."""
    path = Path(path)
    return "HuggingFaceTokenizer" if path.is_dir() or path.suffix == ".json" else "SentencePieceTokenizer"


def tokenizer_record(tok: TokenizerLike, files: Iterable[str]) -> dict:
    """The checkpoint index's "tokenizer" entry: its kind, the file names copied beside the index, and the
    special-token ids (None when the tokenizer has none)."""
    return {"type": tok.type, "files": sorted(files), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id}


def write_tokenizer_files(files: dict[str, Path | bytes], folder: str | Path) -> list[str]:
    """Write a tokenizer's `checkpoint_files()` ({name: source path or content}) into `folder`; their names."""
    import shutil

    folder = Path(folder)
    for name, src in files.items():
        if isinstance(src, bytes):
            (folder / name).write_bytes(src)
        else:
            shutil.copyfile(src, folder / name)
    return sorted(files)


def tokenizer_in_folder(folder: str | Path) -> TokenizerLike | None:
    """The tokenizer a Hugging Face model folder holds: its tokenizer.json (HuggingFaceTokenizer, special
    ids from its tokenizer_config.json or config.json), else a tokenizer.model (SentencePieceTokenizer);
    None when it has neither. A file that is there but unreadable is a DataError."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return build_tokenizer("HuggingFaceTokenizer", folder)
    if (folder / "tokenizer.model").is_file():
        return build_tokenizer("SentencePieceTokenizer", folder / "tokenizer.model")
    return None
