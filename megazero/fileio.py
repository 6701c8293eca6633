"""Atomic file replacement: write to a temp file beside the target, fsync, then `os.replace`.

Every file megazero writes for users goes through here (summary.json, PNGs, tokenizer models,
timelines, ...): a reader (or a crash) sees either the old complete file or the new complete one,
never a torn file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file for writing that replaces `path` when the block exits without error.

    mode is "w" (text, utf-8) or "wb". The temp file lives in the same directory so that
    `os.replace` is a same-filesystem rename (atomic on POSIX). It is created with `open(..., "x")`
    rather than `tempfile.mkstemp`, whose 0600 permissions would otherwise leak onto the result.
    """
    assert mode in ("w", "wb"), mode
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (creating its folder if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(data)
