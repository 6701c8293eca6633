"""TrainingMonitor: the one object the trainer logs through.

It fans each logged iteration out to the console line, TensorBoard, the CSV files, and keeps the
records from which `close()` writes `summary.json` and `training_curves.png`. Exactly one rank
writes (the trainer decides which and passes `enabled`); on every other rank the monitor is a
no-op that creates no files and imports nothing heavy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from megazero.monitor.console import format_closing_summary, format_eval_block, format_train_line
from megazero.monitor.csv_log import (
    TRAIN_COLUMNS,
    TRAIN_CSV_NAME,
    VALIDATION_COLUMNS,
    VALIDATION_CSV_NAME,
    MetricsCsv,
)
from megazero.monitor.plots import CURVES_NAME, write_training_curves
from megazero.monitor.records import EvalRecord, TrainRecord
from megazero.monitor.summary import SUMMARY_NAME, build_summary, write_summary
from megazero.monitor.tensorboard import TensorBoardWriter

# exp(20) ~ 4.9e8 is already meaningless as a perplexity; the cap keeps an early or diverged
# loss from overflowing to inf (Megatron caps the same way).
PPL_LOSS_CAP = 20.0


def perplexity(lm_loss: float) -> float:
    """exp(min(lm_loss, 20)); NaN stays NaN."""
    return math.exp(min(lm_loss, PPL_LOSS_CAP)) if not math.isnan(lm_loss) else math.nan


class TrainingMonitor:
    """Console + TensorBoard + CSV + summary.json + PNG for one training run.

    Files written in `run_dir` (created if missing): training_metrics.csv, validation_metrics.csv
    (both at construction, rows appended as logged), summary.json and training_curves.png (at
    close). TensorBoard event files go to `tensorboard_dir` when it is not None.

    `enabled=False` (every rank but the writing one): every method is a no-op, no file or
    directory is created, `close()` returns {}.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard_dir: Path | None,
        config: dict[str, Any],
        enabled: bool,
        total_iters: int,
        log: Callable[[str], None] = print,
        csv: bool = True,
        resume_iteration: int | None = None,
    ) -> None:
        """csv=False (DeepSpeed's csv_monitor disabled) skips training_metrics.csv / validation_metrics.csv.

        resume_iteration (the iteration training starts from: 0 fresh, N after loading a checkpoint
        of iteration N) makes the run folder continue one run across restarts: CSV rows and
        TensorBoard events after N (logged by an attempt that died before its next checkpoint) are
        dropped, rows up to N are kept and count in summary.json and the PNG. None (default): append
        to whatever the files hold."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.total_iters = int(total_iters)
        self._config = dict(config)
        self._log = log
        self._train: list[TrainRecord] = []
        self._evals: list[EvalRecord] = []
        self._summary: dict[str, Any] | None = None
        self._start = time.perf_counter()
        self._train_csv: MetricsCsv | None = None
        self._eval_csv: MetricsCsv | None = None
        self._tb: TensorBoardWriter | None = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if csv:
            self._train_csv = MetricsCsv(self.run_dir / TRAIN_CSV_NAME, TRAIN_COLUMNS, keep_through=resume_iteration)
            self._eval_csv = MetricsCsv(self.run_dir / VALIDATION_CSV_NAME, VALIDATION_COLUMNS,
                                        keep_through=resume_iteration)
            self._train = [TrainRecord(**row) for row in self._train_csv.kept_rows]
            self._evals = [EvalRecord(**row) for row in self._eval_csv.kept_rows]
        if tensorboard_dir is not None:
            self._tb = TensorBoardWriter(Path(tensorboard_dir),
                                         purge_step=None if resume_iteration is None else resume_iteration + 1)

    def log_train(
        self,
        iteration: int,
        *,
        consumed_samples: int,
        lm_loss: float,
        lr: float,
        grad_norm: float,
        batch_size: int,
        iteration_time_ms: float,
        tokens_per_sec: float,
    ) -> None:
        """Log one training iteration (the trainer calls this once per log interval)."""
        if not self.enabled:
            return
        self._check_open()
        # Coerce once here (0-d tensors, numpy scalars) so every sink sees plain Python numbers.
        r = TrainRecord(
            iteration=int(iteration),
            consumed_samples=int(consumed_samples),
            lm_loss=float(lm_loss),
            grad_norm=float(grad_norm),
            lr=float(lr),
            batch_size=int(batch_size),
            iteration_time_ms=float(iteration_time_ms),
            tokens_per_sec=float(tokens_per_sec),
        )
        self._train.append(r)
        if self._train_csv is not None:
            self._train_csv.write(r)
        if self._tb is not None:
            self._tb.add_train(r)
        self._log(
            format_train_line(
                r.iteration,
                self.total_iters,
                consumed_samples=r.consumed_samples,
                iteration_time_ms=r.iteration_time_ms,
                tokens_per_sec=r.tokens_per_sec,
                lr=r.lr,
                batch_size=r.batch_size,
                lm_loss=r.lm_loss,
                grad_norm=r.grad_norm,
            )
        )

    def log_scalars(self, iteration: int, scalars: dict[str, float], lines: list[str] = ()) -> None:
        """Extra scalars (accounting, timers) to TensorBoard and `lines` to the console."""
        if not self.enabled:
            return
        for line in lines:
            self._log(line)
        if self._tb is not None and scalars:
            self._tb.add_scalars(scalars, iteration)

    def log_eval(self, iteration: int, *, lm_loss: float) -> None:
        """Log one evaluation; ppl = exp(min(lm_loss, 20))."""
        if not self.enabled:
            return
        self._check_open()
        loss = float(lm_loss)
        r = EvalRecord(iteration=int(iteration), lm_loss=loss, ppl=perplexity(loss))
        self._evals.append(r)
        if self._eval_csv is not None:
            self._eval_csv.write(r)
        if self._tb is not None:
            self._tb.add_eval(r)
        for line in format_eval_block(r.iteration, lm_loss=r.lm_loss, ppl=r.ppl):
            self._log(line)

    def close(self, extra_summary: dict[str, Any] | None = None,
              memory: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write summary.json and training_curves.png, close all files; return the summary.
        `memory`: summary.json's top-level `memory` section (summary.py), when given.

        Safe to call twice: later calls write nothing and return the first summary.
        """
        if not self.enabled:
            return {}
        if self._summary is not None:
            return self._summary
        summary = build_summary(
            self._train,
            self._evals,
            total_iters=self.total_iters,
            wall_time_s=time.perf_counter() - self._start,
            config=self._config,
            extra=extra_summary,
        )
        if memory is not None:
            summary["memory"] = memory
        self._summary = summary
        try:
            write_summary(self.run_dir / SUMMARY_NAME, summary)
            if self._train:
                try:
                    write_training_curves(
                        self.run_dir / CURVES_NAME, self._train, self._evals, title=self.run_dir.name
                    )
                except Exception as e:  # noqa: BLE001
                    # The PNG is a convenience: failing to draw it must not fail a finished run
                    # whose checkpoint, CSVs and summary are already on disk.
                    self._log(f"monitor: could not write {CURVES_NAME}: {type(e).__name__}: {e}")
        finally:
            for sink in (self._train_csv, self._eval_csv, self._tb):
                if sink is not None:
                    sink.close()
        test = summary["extra"].get("test_lm_loss")
        for line in format_closing_summary(summary, run_dir=str(self.run_dir.resolve()), test_loss=test,
                                           test_ppl=None if test is None else perplexity(test)):
            self._log(line)
        return summary

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._summary is not None:
            raise RuntimeError("TrainingMonitor used after close()")
