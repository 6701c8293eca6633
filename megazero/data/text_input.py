"""Reading raw input files into documents: plain text and JSON Lines.

This module owns the one definition of "a document" that both tokenizer training and
`tools/preprocess_data.py` use, so the text a tokenizer was trained on and the text that gets
tokenized are cut the same way.

* JSON Lines (`.jsonl` / `.json` suffix): one JSON object per non-empty line; the document is the
  string under `json_key` (default ``"text"``), kept verbatim.
* Plain text (any other suffix), read as UTF-8 with universal newlines (``\\r\\n`` -> ``\\n``):
  - ``split="blank-lines"`` (the default): documents are separated by one or more blank lines
    (lines holding only whitespace). A document is its lines joined by ``\\n``, without the
    separator lines and without a trailing newline. Novels become paragraph-sized documents, code
    becomes function/class-sized ones; either way a corpus has many documents, so a
    train/valid/test split by document works.
  - ``split="file"``: the whole file is one document, verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from megazero.errors import DataError

SPLIT_MODES = ("blank-lines", "file")
JSON_SUFFIXES = (".jsonl", ".json")
DEFAULT_JSON_KEY = "text"


def is_json_lines(path: Path | str) -> bool:
    return Path(path).suffix.lower() in JSON_SUFFIXES


def check_input_file(path: Path | str) -> Path:
    """Raise a DataError unless `path` is a readable regular file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: input file not found; check the --input path")
    if not path.is_file():
        raise DataError(f"{path}: input is not a regular file; pass text or .jsonl files to --input")
    return path


def iter_documents(path: Path | str, *, json_key: str | None = None,
                   split: str = "blank-lines") -> Iterator[str]:
    """Yield the documents of one input file, in file order (see the module docstring)."""
    path = check_input_file(path)
    if split not in SPLIT_MODES:
        raise DataError(f"unknown document split mode {split!r}; use one of {', '.join(SPLIT_MODES)}")
    try:
        if is_json_lines(path):
            yield from _iter_json_lines(path, json_key or DEFAULT_JSON_KEY)
        elif split == "file":
            with open(path, encoding="utf-8") as f:
                yield f.read()
        else:
            yield from _iter_paragraphs(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                        f"convert the file to UTF-8 first") from None


def _iter_paragraphs(path: Path) -> Iterator[str]:
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).removesuffix("\n")
                lines = []
    if lines:
        yield "".join(lines).removesuffix("\n")


def _iter_json_lines(path: Path, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); "
                                f"each line of a .jsonl file must be one JSON object") from None
            if not isinstance(record, dict) or key not in record:
                found = sorted(record)[:5] if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{lineno}: no key {key!r} in the JSON record (found {found}); "
                                f"pass the right --json-key")
            text = record[key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: value of {key!r} is {type(text).__name__}, "
                                f"not a string; pass the --json-key of the text field")
            yield text
