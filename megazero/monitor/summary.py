"""Run summary: computes and writes `summary.json` at the end of a run.

Keys (null where there is no data, e.g. no evaluation ran, or every loss was NaN):
  iterations, total_iters, consumed_samples, logged_intervals,
  first_train_loss, final_train_loss, best_train_loss, best_train_loss_iteration,
  final_validation_loss, final_validation_ppl, final_validation_iteration,
  best_validation_loss, best_validation_ppl, best_validation_iteration,
  mean_tokens_per_sec, total_wall_time_s, config_digest, extra.

`mean_tokens_per_sec` is the plain mean of the per-interval tokens/s, excluding the first logged
interval (it includes warm-up: allocator growth, first kernel launches, data loader start); null
when only one interval was logged. `config_digest` is the sha256 of the config's canonical JSON
(see `config_digest`), so two summaries with the same digest came from the same config.
Non-finite floats (a diverged loss) are written as null: strict JSON has no NaN.

`memory` (the trainer passes it to TrainingMonitor.close; megazero/training/memory_report.py):
activation_bytes (peak bytes saved for backward over a training step, pipeline in-flight microbatches
included), activation_host_bytes (the same for activations offloaded to host memory), model_state_bytes
(params + grads + optimizer state on the device), peak_bytes (CUDA max allocated, or peak RSS on CPU):
each the max over ranks, and `per_rank`, a list of {rank, pp, dp, tp, and those four} per rank.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megazero.fileio import atomic_open
from megazero.monitor.records import EvalRecord, TrainRecord

SUMMARY_NAME = "summary.json"


def canonical_json(config: Mapping[str, Any]) -> str:
    """Keys sorted, no whitespace, ASCII only; values JSON cannot hold (e.g. Path) as `str(value)`."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 hex digest of `canonical_json(config)` (utf-8)."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def build_summary(
    train: Sequence[TrainRecord],
    evals: Sequence[EvalRecord],
    *,
    total_iters: int,
    wall_time_s: float,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary dict of a run from its logged records (in logging order)."""
    finite_train = [r for r in train if math.isfinite(r.lm_loss)]
    # min() keeps the first of equal values: the earliest iteration reaching the best loss.
    best_train = min(finite_train, key=lambda r: r.lm_loss, default=None)
    finite_evals = [r for r in evals if math.isfinite(r.lm_loss)]
    best_eval = min(finite_evals, key=lambda r: r.lm_loss, default=None)
    last_train = train[-1] if train else None
    last_eval = evals[-1] if evals else None
    steady = [r.tokens_per_sec for r in train[1:]]
    return {
        "iterations": last_train.iteration if last_train else None,
        "total_iters": total_iters,
        "consumed_samples": last_train.consumed_samples if last_train else None,
        "logged_intervals": len(train),
        "first_train_loss": train[0].lm_loss if train else None,
        "final_train_loss": last_train.lm_loss if last_train else None,
        "best_train_loss": best_train.lm_loss if best_train else None,
        "best_train_loss_iteration": best_train.iteration if best_train else None,
        "final_validation_loss": last_eval.lm_loss if last_eval else None,
        "final_validation_ppl": last_eval.ppl if last_eval else None,
        "final_validation_iteration": last_eval.iteration if last_eval else None,
        "best_validation_loss": best_eval.lm_loss if best_eval else None,
        "best_validation_ppl": best_eval.ppl if best_eval else None,
        "best_validation_iteration": best_eval.iteration if best_eval else None,
        "mean_tokens_per_sec": sum(steady) / len(steady) if steady else None,
        "total_wall_time_s": wall_time_s,
        "config_digest": config_digest(config),
        # Caller's extras are nested, not merged, so they can never shadow a key above.
        "extra": dict(extra) if extra else {},
    }


def _strict_json_value(value: Any) -> Any:
    """NaN/inf -> None, recursively; tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json_value(v) for v in value]
    return value


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    """Write `summary` as indented strict JSON, atomically."""
    text = json.dumps(_strict_json_value(summary), indent=2, allow_nan=False, default=str)
    with atomic_open(path, "w") as f:
        f.write(text + "\n")
