"""CSV metrics: `training_metrics.csv` and `validation_metrics.csv`, one row per logged iteration.

Floats are written with `repr(float)`, the shortest string that parses back to the identical
double, so two runs can be compared to 1e-7 (or exactly) from their CSVs alone. Each row is
flushed as it is written: a run that crashes loses no logged row.

A resumed run continues the same files: the trainer opens them with `keep_through=N` (the
checkpoint's iteration), which drops rows after N, logged by an attempt that died before its next
checkpoint (the file is rewritten atomically), so every iteration has one row. Without
`keep_through` the file is appended to as it is; `read_metrics_csv(..., dedupe=True)` then keeps
the last row of each iteration.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO, Union

from megazero.errors import ConfigError
from megazero.fileio import atomic_open
from megazero.monitor.records import EvalRecord, TrainRecord

TRAIN_CSV_NAME = "training_metrics.csv"
VALIDATION_CSV_NAME = "validation_metrics.csv"
TRAIN_COLUMNS: tuple[str, ...] = (
    "iteration",
    "consumed_samples",
    "lm_loss",
    "grad_norm",
    "lr",
    "batch_size",
    "iteration_time_ms",
    "tokens_per_sec",
)
VALIDATION_COLUMNS: tuple[str, ...] = ("iteration", "lm_loss", "ppl")
# Columns holding counts; every other column is a float.
INT_COLUMNS: frozenset[str] = frozenset({"iteration", "consumed_samples", "batch_size"})

Record = Union[TrainRecord, EvalRecord]


def _format(column: str, value: float | int) -> str:
    return str(int(value)) if column in INT_COLUMNS else repr(float(value))


class MetricsCsv:
    """An append-only CSV file with a fixed header; one `write(record)` per row."""

    def __init__(self, path: Path, columns: Sequence[str], keep_through: int | None = None) -> None:
        """keep_through=N: keep only the existing rows of iterations <= N (a resume from iteration N);
        they are in `kept_rows` (parsed) for the caller's summary."""
        self.path = Path(path)
        self.columns = tuple(columns)
        header = ",".join(self.columns)
        exists = self.path.exists() and self.path.stat().st_size > 0
        self.kept_rows: list[dict[str, float | int]] = []
        if exists:
            with open(self.path, encoding="utf-8") as f:
                found = f.readline().rstrip("\r\n")
            if found != header:
                raise ConfigError(
                    f"{self.path} exists with header {found!r}, expected {header!r}; "
                    "move it away or use a different run dir"
                )
            if keep_through is not None:
                rows = read_metrics_csv(self.path)
                self.kept_rows = [r for r in rows if r["iteration"] <= keep_through]
                if len(self.kept_rows) != len(rows):
                    with atomic_open(self.path, "w") as f:
                        f.write(header + "\n")
                        for row in self.kept_rows:
                            f.write(",".join(_format(c, row[c]) for c in self.columns) + "\n")
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8", newline="")
        if not exists:
            self._file.write(header + "\n")
            self._file.flush()

    def write(self, record: Record) -> None:
        assert self._file is not None, f"{self.path} written after close()"
        self._file.write(",".join(_format(c, getattr(record, c)) for c in self.columns) + "\n")
        # Flush (to the OS) per row: a crashed process loses nothing. No fsync: rows come once per
        # log interval, but fsync on a network filesystem can stall a step for tens of ms.
        self._file.flush()

    def close(self) -> None:
        """Close the file; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics_csv(path: Path, *, dedupe: bool = False) -> list[dict[str, float | int]]:
    """Parse a metrics CSV back into dicts (count columns as int, the rest as the exact floats
    written). dedupe=True keeps only the last row of each iteration, sorted by iteration
    (what a resumed run's file means)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f if line.strip()]
    if not lines:
        return []
    columns = lines[0].split(",")
    rows: list[dict[str, float | int]] = []
    for line in lines[1:]:
        values = line.split(",")
        assert len(values) == len(columns), f"{path}: malformed row {line!r}"
        rows.append({c: int(v) if c in INT_COLUMNS else float(v) for c, v in zip(columns, values)})
    if dedupe and "iteration" in columns:
        by_iteration = {row["iteration"]: row for row in rows}
        rows = [by_iteration[it] for it in sorted(by_iteration)]
    return rows
