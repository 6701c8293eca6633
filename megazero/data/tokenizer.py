"""The sentencepiece tokenizer: loading one (`Tokenizer`) and training one (`train_tokenizer`).

Trained models are byte-level BPE with lossless normalisation, so ``decode(encode(text)) == text``
for any string (unknown characters fall back to their UTF-8 bytes):

* ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``,
  ``add_dummy_prefix=False``: the text is not rewritten before tokenisation.
* ``user_defined_symbols=["\\n"]``: a newline is one token (it matters for verse and code); runs of
  spaces (code indentation) become whitespace-only pieces (``allow_whitespace_only_pieces``).
* ``byte_fallback=True``: any character outside the vocabulary is encoded as its bytes.
* ``split_digits=True``: numbers are spelled digit by digit.
* ids: ``<unk>`` = 0, ``</s>`` = 1 (the end-of-document token `Tokenizer.eod_id`), no bos or pad.

Training is deterministic: the training lines are a seeded, spread-out sample of the input (at
most `max_chars` characters), fed in file order, with a fixed thread count recorded in the model.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megazero.data.text_input import check_input_file, iter_documents
from megazero.errors import DataError
from megazero.fileio import atomic_write_bytes

# 256 byte pieces + <unk> + </s> + "\n" are always in the vocabulary; leave room for real merges.
MIN_VOCAB_SIZE = 320
# sentencepiece skips training "sentences" longer than max_sentence_length bytes; cut long lines
# into pieces of at most this many characters (x4 bytes per character fits the limit below).
_MAX_LINE_CHARS = 8192
_MAX_SENTENCE_BYTES = 4 * _MAX_LINE_CHARS
# Pinned so the serialised model (which records it) does not depend on the machine's core count;
# the learned pieces do not depend on it either.
_TRAIN_THREADS = 4


class Tokenizer:
    """A loaded sentencepiece model (`--tokenizer-type SentencePieceTokenizer`, the default). It implements
    the interface of megazero/data/tokenizer_types.py; `eod_id` is appended after every document in a
    dataset. Text is encoded exactly as sentencepiece does: no bos, no special-token matching."""

    type = "SentencePieceTokenizer"
    CHECKPOINT_FILE = "tokenizer.model"  # the name of its copy in checkpoints and Hugging Face exports

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if self.model_path.is_dir() or self.model_path.suffix == ".json":
            raise DataError(f"{self.model_path}: a SentencePieceTokenizer is a sentencepiece .model file; for a "
                            f"Hugging Face tokenizer.json (or a folder holding one) pass --tokenizer-type "
                            f"HuggingFaceTokenizer")
        if not self.model_path.is_file():
            raise DataError(f"{self.model_path}: tokenizer model not found; pass a .model file "
                            f"written by tools/preprocess_data.py (or train one with --vocab-size)")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (OSError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{self.model_path}: not a readable sentencepiece model ({first}); "
                            f"rebuild it with tools/preprocess_data.py --vocab-size N (or, for a Hugging Face "
                            f"tokenizer.json, pass --tokenizer-type HuggingFaceTokenizer)") from None
        self.vocab_size: int = int(self._sp.get_piece_size())
        self.eod_id: int = int(self._sp.eos_id())
        if self.eod_id < 0:
            raise DataError(f"{self.model_path}: sentencepiece model defines no eos token, which "
                            f"megazero uses as end-of-document; retrain it with eos_id set "
                            f"(tools/preprocess_data.py --vocab-size N does)")
        # sentencepiece answers -1 for an id the model does not define
        self.eos_id: int = self.eod_id
        self.bos_id: int | None = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        self.pad_id: int | None = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else None
        self.unk_id: int | None = int(self._sp.unk_id()) if self._sp.unk_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts at once; sentencepiece runs `num_threads` C++ threads (no GIL)."""
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        if hasattr(ids, "tolist"):  # numpy array or torch tensor
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def token_string(self, i: int | None) -> str | None:
        return None if i is None else self.id_to_piece(i)

    def checkpoint_files(self) -> dict[str, Path | bytes]:
        """What a checkpoint keeps of this tokenizer: {file name: source path or content}."""
        return {self.CHECKPOINT_FILE: self.model_path}

    def __reduce__(self):
        # Processes (DataLoader workers, pools) reload from the file instead of pickling the C++ object.
        return (Tokenizer, (self.model_path,))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


def train_tokenizer(input_files: Sequence[Path | str], model_path: Path | str, vocab_size: int, *,
                    json_key: str | None = None, max_chars: int = 20_000_000,
                    seed: int = 1234) -> Path:
    """Train a byte-fallback BPE sentencepiece model on `input_files` and write it to `model_path`.

    Input files are read as documents by `megazero.data.text_input.iter_documents` (JSON Lines for
    .jsonl/.json suffixes, using `json_key`, default "text"; plain text otherwise). The model file
    appears atomically: it is written to a temporary name in the same folder and renamed.
    """
    model_path = Path(model_path)
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"tokenizer vocab size {vocab_size} is too small; use at least "
                        f"{MIN_VOCAB_SIZE} (256 byte pieces are always reserved)")
    if max_chars <= 0:
        raise DataError(f"max_chars must be positive, got {max_chars}")
    paths = [check_input_file(p) for p in input_files]
    if not paths:
        raise DataError("no input files given to train the tokenizer; pass at least one --input")
    lines = list(_training_lines(paths, json_key=json_key, max_chars=max_chars, seed=seed))
    if not lines:
        raise DataError(f"{paths[0]}: no non-blank text to train a tokenizer on; check the --input files")

    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=proto,
            model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
            unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
            input_sentence_size=0, shuffle_input_sentence=False,  # we sampled deterministically above
            max_sentence_length=_MAX_SENTENCE_BYTES, num_threads=_TRAIN_THREADS, minloglevel=2,
        )
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        hint = ("use a smaller --vocab-size or more text" if "ocab" in msg
                else "check the input text")
        raise DataError(f"{paths[0]}: tokenizer training failed ({msg}); {hint}") from None
    atomic_write_bytes(model_path, proto.getvalue())
    return model_path


def _training_lines(paths: Sequence[Path], *, json_key: str | None, max_chars: int,
                    seed: int) -> Iterator[str]:
    """Non-blank lines of the inputs, at most ~max_chars characters, spread over all files.

    The character budget is shared out over the files still to read; a file larger than its share
    keeps each line with probability share/size (seeded), so the sample covers the whole file
    instead of only its beginning.
    """
    rng = np.random.RandomState(seed)
    remaining = max_chars
    for i, path in enumerate(paths):
        if remaining <= 0:
            return
        share = remaining // (len(paths) - i)
        keep_prob = min(1.0, share / max(1, path.stat().st_size))
        taken = 0
        for doc in iter_documents(path, json_key=json_key):
            for line in doc.split("\n"):
                if not line.strip() or (keep_prob < 1.0 and rng.random_sample() >= keep_prob):
                    continue
                for start in range(0, len(line), _MAX_LINE_CHARS):
                    yield line[start:start + _MAX_LINE_CHARS]
                taken += len(line)
                if taken >= share:
                    break
            if taken >= share:
                break
        remaining -= taken
