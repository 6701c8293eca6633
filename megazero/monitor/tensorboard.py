"""TensorBoard: a thin wrapper around `torch.utils.tensorboard.SummaryWriter` with Megatron's tag names.

Every scalar uses the iteration as its step, except the `... vs samples` variant, whose step is
the number of consumed samples (it lines up runs with different global batch sizes). Tag names are
Megatron-LM's so that dashboards and comparison scripts work on both. `iteration-time` is in
seconds, as in Megatron (the console line prints milliseconds and says so); `tokens-per-sec` is
megazero's addition.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from megazero.errors import ConfigError
from megazero.monitor.records import EvalRecord, TrainRecord

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TAG_LM_LOSS = "lm loss"
TAG_LM_LOSS_VS_SAMPLES = "lm loss vs samples"
TAG_LEARNING_RATE = "learning-rate"
TAG_GRAD_NORM = "grad-norm"
TAG_BATCH_SIZE = "batch-size"
TAG_ITERATION_TIME = "iteration-time"
TAG_TOKENS_PER_SEC = "tokens-per-sec"
TAG_VALIDATION_LOSS = "lm loss validation"
TAG_VALIDATION_PPL = "lm loss validation ppl"


class TensorBoardWriter:
    """Writes training and validation scalars under `log_dir`; flushes after each call so a
    crashed run's dashboard is complete up to its last logged iteration."""

    def __init__(self, log_dir: Path, *, max_queue: int = 1000, purge_step: int | None = None) -> None:
        """purge_step: a resumed run's first new step; TensorBoard hides this folder's older events at
        or after it (an attempt that died after its last checkpoint), so one run shows one curve."""
        # Imported here, not at module level: `torch.utils.tensorboard` pulls in the tensorboard
        # package (about a second), which ranks that do not write should never pay for.
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an install requirement, but may be missing
            raise ConfigError(
                f"TensorBoard logging needs the `tensorboard` package ({e}); "
                "`pip install tensorboard`, or run without a tensorboard dir"
            ) from e
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self._writer: SummaryWriter | None = SummaryWriter(log_dir=str(log_dir), max_queue=max_queue,
                                                                  purge_step=purge_step)

    def add_train(self, r: TrainRecord) -> None:
        w = self._live()
        step = r.iteration
        w.add_scalar(TAG_LM_LOSS, r.lm_loss, step)
        w.add_scalar(TAG_LM_LOSS_VS_SAMPLES, r.lm_loss, r.consumed_samples)
        w.add_scalar(TAG_LEARNING_RATE, r.lr, step)
        w.add_scalar(TAG_GRAD_NORM, r.grad_norm, step)
        w.add_scalar(TAG_BATCH_SIZE, r.batch_size, step)
        w.add_scalar(TAG_ITERATION_TIME, r.iteration_time_ms / 1000.0, step)
        w.add_scalar(TAG_TOKENS_PER_SEC, r.tokens_per_sec, step)
        w.flush()

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Free-form scalars (memory / communication accounting, timers) under their own tags."""
        w = self._live()
        for tag, value in scalars.items():
            w.add_scalar(tag, value, step)
        w.flush()

    def add_eval(self, r: EvalRecord) -> None:
        w = self._live()
        w.add_scalar(TAG_VALIDATION_LOSS, r.lm_loss, r.iteration)
        w.add_scalar(TAG_VALIDATION_PPL, r.ppl, r.iteration)
        w.flush()

    def close(self) -> None:
        """Flush and close the event file; safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _live(self) -> SummaryWriter:
        assert self._writer is not None, "TensorBoardWriter used after close()"
        return self._writer
