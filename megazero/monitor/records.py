"""Records: the immutable per-interval values the monitor keeps in memory.

One `TrainRecord` per logged training iteration and one `EvalRecord` per evaluation. The field
names and their order are exactly the CSV column names (see `csv_log.py`), so a record is a CSV row.
The summary and the PNG are computed from these lists at close; a run logs once per log interval,
so keeping them all costs a few KB.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainRecord:
    """Metrics of one logged training iteration (averages over its log interval, as the trainer gives them)."""

    iteration: int
    consumed_samples: int
    lm_loss: float
    grad_norm: float
    lr: float
    batch_size: int
    iteration_time_ms: float
    tokens_per_sec: float


@dataclass(frozen=True)
class EvalRecord:
    """Validation metrics at one iteration; `ppl` is exp(min(lm_loss, 20))."""

    iteration: int
    lm_loss: float
    ppl: float
