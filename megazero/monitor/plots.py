"""Training curves: renders `training_curves.png` (loss, learning rate, grad norm vs iteration).

Three panels sharing the iteration axis: train loss with the validation losses as points on it
(tall), learning rate (small), grad norm (small). Rendered with matplotlib's object API on an Agg
canvas: no display is needed, and no process-global state (`pyplot`, `matplotlib.use`) is touched,
so the trainer's own matplotlib use, if any, is unaffected. Written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from megazero.fileio import atomic_open
from megazero.monitor.records import EvalRecord, TrainRecord

CURVES_NAME = "training_curves.png"


def _finite(values: Sequence[float]) -> list[float]:
    # inf would break autoscaling; NaN leaves a gap in the line, which is what a bad step should show.
    return [v if math.isfinite(v) else math.nan for v in values]


def write_training_curves(
    path: Path, train: Sequence[TrainRecord], evals: Sequence[EvalRecord], *, title: str = ""
) -> None:
    """Render the curves of `train` / `evals` to a PNG at `path`. Needs at least one train record."""
    assert train, "no training records to plot"
    # Imported here: matplotlib costs about half a second, paid only by the rank that writes, once.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_gn = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1, 1]})

    iters = [r.iteration for r in train]
    ax_loss.plot(iters, _finite([r.lm_loss for r in train]), label="train lm loss", linewidth=1.2)
    if evals:
        ax_loss.plot(
            [r.iteration for r in evals],
            _finite([r.lm_loss for r in evals]),
            "o",
            label="validation lm loss",
            markersize=5,
        )
    ax_loss.set_ylabel("lm loss")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)
    if title:
        ax_loss.set_title(title)

    ax_lr.plot(iters, _finite([r.lr for r in train]), color="tab:green", linewidth=1.0)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.grid(alpha=0.3)

    ax_gn.plot(iters, _finite([r.grad_norm for r in train]), color="tab:red", linewidth=1.0)
    ax_gn.set_ylabel("grad norm")
    ax_gn.set_xlabel("iteration")
    ax_gn.grid(alpha=0.3)

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
