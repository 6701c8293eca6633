"""Tests for megazero.monitor: every file a TrainingMonitor writes, read back and checked."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest

from megazero.errors import ConfigError
from megazero.monitor import TrainingMonitor
from megazero.monitor.console import format_eval_line, format_train_line
from megazero.monitor.csv_log import TRAIN_COLUMNS, VALIDATION_COLUMNS, read_metrics_csv
from megazero.monitor.records import EvalRecord, TrainRecord
from megazero.monitor.summary import config_digest

CONFIG = {"model": {"hidden": 64, "layers": 2}, "parallel": {"tp": 1, "pp": 1}, "lr": 3e-4, "out": Path("o")}
N_ITERS = 20
GLOBAL_BATCH = 32
SEQ = 128


def _loss(i: int) -> float:
    # Awkward floats on purpose (1/3, 1/7...): they survive the CSV only if written at full precision.
    # The minimum (1/3 at iteration 12) is not the last value, so best != final.
    return 1.0 / 3.0 if i == 12 else 2.0 + 1.0 / (i + 6)


def _train_kwargs(i: int) -> dict:
    return dict(
        consumed_samples=i * GLOBAL_BATCH,
        lm_loss=_loss(i),
        lr=3e-4 * i / N_ITERS,
        grad_norm=1.0 + i / 7.0,
        batch_size=GLOBAL_BATCH,
        iteration_time_ms=100.0 + i / 3.0,
        tokens_per_sec=GLOBAL_BATCH * SEQ / ((100.0 + i / 3.0) / 1000.0),
    )


EVALS = {10: 5.0 + 1.0 / 3.0, 20: 4.25}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One monitor fed N_ITERS iterations and 2 evals, closed twice."""
    root = tmp_path_factory.mktemp("run")
    run_dir, tb_dir = root / "output" / "run1", root / "output" / "run1" / "tensorboard"
    lines: list[str] = []
    mon = TrainingMonitor(
        run_dir, tensorboard_dir=tb_dir, config=CONFIG, enabled=True, total_iters=200, log=lines.append
    )
    for i in range(1, N_ITERS + 1):
        mon.log_train(i, **_train_kwargs(i))
        if i in EVALS:
            mon.log_eval(i, lm_loss=EVALS[i])
    summary = mon.close(extra_summary={"mfu": 0.25})
    summary_again = mon.close()
    return dict(run_dir=run_dir, tb_dir=tb_dir, lines=lines, summary=summary, summary_again=summary_again)


def test_files_written(finished_run: dict) -> None:
    names = {p.name for p in finished_run["run_dir"].iterdir()}
    assert names == {"training_metrics.csv", "validation_metrics.csv", "summary.json", "training_curves.png",
                     "tensorboard"}
    assert list(finished_run["tb_dir"].glob("events.out.tfevents.*"))


def test_tensorboard_scalars(finished_run: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(finished_run["tb_dir"]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"lm loss", "lm loss vs samples", "learning-rate", "grad-norm", "batch-size",
                    "iteration-time", "tokens-per-sec", "lm loss validation", "lm loss validation ppl"}

    def check(tag: str, expected: list[tuple[int, float]]) -> None:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [step for step, _ in expected], tag
        # TensorBoard stores float32: compare values at float32 precision.
        assert [e.value for e in events] == pytest.approx([v for _, v in expected], rel=1e-6), tag

    its = range(1, N_ITERS + 1)
    check("lm loss", [(i, _loss(i)) for i in its])
    check("lm loss vs samples", [(i * GLOBAL_BATCH, _loss(i)) for i in its])
    check("learning-rate", [(i, _train_kwargs(i)["lr"]) for i in its])
    check("grad-norm", [(i, _train_kwargs(i)["grad_norm"]) for i in its])
    check("batch-size", [(i, GLOBAL_BATCH) for i in its])
    # Megatron logs iteration-time in seconds.
    check("iteration-time", [(i, _train_kwargs(i)["iteration_time_ms"] / 1000) for i in its])
    check("tokens-per-sec", [(i, _train_kwargs(i)["tokens_per_sec"]) for i in its])
    check("lm loss validation", list(EVALS.items()))
    check("lm loss validation ppl", [(i, math.exp(v)) for i, v in EVALS.items()])


def test_csv_exact_floats(finished_run: dict) -> None:
    path = finished_run["run_dir"] / "training_metrics.csv"
    assert path.read_text().splitlines()[0] == (
        "iteration,consumed_samples,lm_loss,grad_norm,lr,batch_size,iteration_time_ms,tokens_per_sec"
    )
    rows = read_metrics_csv(path)
    assert [r["iteration"] for r in rows] == list(range(1, N_ITERS + 1))
    for row in rows:
        i = row["iteration"]
        expected = {"iteration": i, **_train_kwargs(i)}
        assert row == expected  # exact equality, float for float
        assert isinstance(row["consumed_samples"], int) and isinstance(row["lm_loss"], float)
    assert rows[11]["lm_loss"] == 1.0 / 3.0

    vpath = finished_run["run_dir"] / "validation_metrics.csv"
    assert vpath.read_text().splitlines()[0] == "iteration,lm_loss,ppl"
    assert read_metrics_csv(vpath) == [{"iteration": i, "lm_loss": v, "ppl": math.exp(v)} for i, v in EVALS.items()]


def test_csv_columns_match_records() -> None:
    # The record field order is the CSV column order; a rename in one must be made in the other.
    assert TRAIN_COLUMNS == tuple(f.name for f in dataclasses.fields(TrainRecord))
    assert VALIDATION_COLUMNS == tuple(f.name for f in dataclasses.fields(EvalRecord))


def test_summary(finished_run: dict) -> None:
    on_disk = json.loads((finished_run["run_dir"] / "summary.json").read_text())
    s = finished_run["summary"]
    assert on_disk == json.loads(json.dumps(s))
    assert finished_run["summary_again"] is s
    assert s["iterations"] == N_ITERS and s["total_iters"] == 200 and s["logged_intervals"] == N_ITERS
    assert s["consumed_samples"] == N_ITERS * GLOBAL_BATCH
    assert s["first_train_loss"] == _loss(1)
    assert s["final_train_loss"] == _loss(N_ITERS)
    assert s["best_train_loss"] == 1.0 / 3.0 and s["best_train_loss_iteration"] == 12
    assert s["final_validation_loss"] == 4.25 and s["final_validation_iteration"] == 20
    assert s["final_validation_ppl"] == math.exp(4.25)
    assert s["best_validation_loss"] == 4.25 and s["best_validation_iteration"] == 20
    assert s["best_validation_ppl"] == math.exp(4.25)
    steady = [_train_kwargs(i)["tokens_per_sec"] for i in range(2, N_ITERS + 1)]  # first interval excluded
    assert s["mean_tokens_per_sec"] == pytest.approx(sum(steady) / len(steady), rel=1e-12)
    assert s["total_wall_time_s"] > 0
    canonical = json.dumps(CONFIG, sort_keys=True, separators=(",", ":"), default=str)
    assert s["config_digest"] == hashlib.sha256(canonical.encode()).hexdigest() == config_digest(CONFIG)
    assert s["extra"] == {"mfu": 0.25}


def test_config_digest_is_canonical() -> None:
    a = {"b": 1, "a": {"y": 2.5, "x": [1, 2]}}
    b = {"a": {"x": [1, 2], "y": 2.5}, "b": 1}
    assert config_digest(a) == config_digest(b)
    assert config_digest(a) != config_digest({**a, "b": 2})


def test_png(finished_run: dict) -> None:
    data = (finished_run["run_dir"] / "training_curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # three panels with curves, not an empty canvas
    # Atomic write leaves no temp files behind.
    assert not list(finished_run["run_dir"].glob(".*.tmp"))


def test_console_lines(finished_run: dict) -> None:
    lines = finished_run["lines"]
    train_lines = [ln for ln in lines if ln.startswith(" iteration")]
    assert len(train_lines) == N_ITERS
    line = train_lines[-1]
    for field in ("iteration       20/     200 |", "consumed samples:          640 |",
                  "elapsed time per iteration (ms): 106.7 |", "tokens/s: 38,400 |",
                  "learning rate: 3.000000E-04 |", "global batch size:    32 |",
                  f"lm loss: {_loss(20):.6E} |", "grad norm: 3.857 |"):
        assert field in line, (field, line)
    assert " validation loss at iteration 20 | lm loss value: 4.250000E+00 | lm loss PPL: 7.010541E+01 |" in lines


def test_console_format_example() -> None:
    line = format_train_line(20, 200, consumed_samples=640, iteration_time_ms=123.4, tokens_per_sec=41234.0,
                             lr=3e-4, batch_size=32, lm_loss=6.123456, grad_norm=1.234)
    assert line == (" iteration       20/     200 | consumed samples:          640 | elapsed time per iteration (ms):"
                    " 123.4 | tokens/s: 41,234 | learning rate: 3.000000E-04 | global batch size:    32 |"
                    " lm loss: 6.123456E+00 | grad norm: 1.234 |")
    assert format_eval_line(20, lm_loss=5.43, ppl=228.0) == (
        " validation loss at iteration 20 | lm loss value: 5.430000E+00 | lm loss PPL: 2.280000E+02 |"
    )


def test_disabled_monitor_creates_nothing(tmp_path: Path) -> None:
    lines: list[str] = []
    mon = TrainingMonitor(tmp_path / "run", tensorboard_dir=tmp_path / "tb", config=CONFIG, enabled=False,
                          total_iters=10, log=lines.append)
    for i in range(1, 4):
        mon.log_train(i, **_train_kwargs(i))
    mon.log_eval(3, lm_loss=2.0)
    assert mon.close() == {} and mon.close() == {}
    assert list(tmp_path.iterdir()) == []
    assert lines == []


def test_close_twice_and_use_after_close(tmp_path: Path) -> None:
    mon = TrainingMonitor(tmp_path, tensorboard_dir=None, config={}, enabled=True, total_iters=5, log=lambda s: None)
    mon.log_train(1, **_train_kwargs(1))
    first = mon.close({"a": 1})
    assert mon.close({"b": 2}) is first
    with pytest.raises(RuntimeError):
        mon.log_train(2, **_train_kwargs(2))
    assert {p.name for p in tmp_path.iterdir()} == {"training_metrics.csv", "validation_metrics.csv",
                                                    "summary.json", "training_curves.png"}
    s = json.loads((tmp_path / "summary.json").read_text())
    # One interval: nothing left after excluding warm-up; no evaluation ran.
    assert s["mean_tokens_per_sec"] is None and s["final_validation_loss"] is None


def test_nothing_logged_and_nan_loss(tmp_path: Path) -> None:
    with TrainingMonitor(tmp_path / "a", tensorboard_dir=None, config={}, enabled=True, total_iters=5,
                         log=lambda s: None):
        pass
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["final_train_loss"] is None
    assert not (tmp_path / "a" / "training_curves.png").exists()

    mon = TrainingMonitor(tmp_path / "b", tensorboard_dir=None, config={}, enabled=True, total_iters=5,
                          log=lambda s: None)
    mon.log_train(1, **{**_train_kwargs(1), "lm_loss": 3.0})
    mon.log_train(2, **{**_train_kwargs(2), "lm_loss": math.nan})
    mon.log_eval(2, lm_loss=100.0)
    s = mon.close()
    assert s["best_train_loss"] == 3.0 and math.isnan(s["final_train_loss"])
    assert s["final_validation_ppl"] == math.exp(20)  # capped
    on_disk = json.loads((tmp_path / "b" / "summary.json").read_text())  # strict JSON: NaN -> null
    assert on_disk["final_train_loss"] is None
    assert math.isnan(read_metrics_csv(tmp_path / "b" / "training_metrics.csv")[1]["lm_loss"])


def test_resume_appends(tmp_path: Path) -> None:
    for start in (1, 3):  # second "process" resumes from iteration 3, re-logging iteration 3
        mon = TrainingMonitor(tmp_path, tensorboard_dir=None, config={}, enabled=True, total_iters=5,
                              log=lambda s: None)
        for i in range(start, start + 2):
            mon.log_train(i, **_train_kwargs(i))
        mon.close()
    rows = read_metrics_csv(tmp_path / "training_metrics.csv")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    (tmp_path / "validation_metrics.csv").write_text("iteration,loss\n")
    with pytest.raises(ConfigError, match="validation_metrics.csv"):
        TrainingMonitor(tmp_path, tensorboard_dir=None, config={}, enabled=True, total_iters=5)


def test_resume_continues_the_run_folder(tmp_path: Path) -> None:
    """A run that logged 1..6, died, and resumed from its checkpoint at 4: rows 5-6 are replaced, not
    duplicated, in the CSVs and in TensorBoard; summary.json and the PNG cover 1..8."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def attempt(start: int, stop: int, resume: int | None, lines: list[str]) -> dict:
        mon = TrainingMonitor(tmp_path, tensorboard_dir=tmp_path / "tb", config={}, enabled=True, total_iters=8,
                              log=lines.append, resume_iteration=resume)
        for i in range(start, stop + 1):
            mon.log_train(i, **{**_train_kwargs(i), "lm_loss": 10.0 * (resume or 0) + i})
            if i % 2 == 0:
                mon.log_eval(i, lm_loss=100.0 + 10.0 * (resume or 0) + i)
        return mon.close()

    attempt(1, 6, 0, [])
    lines: list[str] = []
    summary = attempt(5, 8, 4, lines)  # attempt 2 logs different losses for 5..8
    rows = read_metrics_csv(tmp_path / "training_metrics.csv")
    assert [(r["iteration"], r["lm_loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                             (5, 45.0), (6, 46.0), (7, 47.0), (8, 48.0)]
    evals = read_metrics_csv(tmp_path / "validation_metrics.csv")
    assert [(r["iteration"], r["lm_loss"]) for r in evals] == [(2, 102.0), (4, 104.0), (6, 146.0), (8, 148.0)]
    assert summary["first_train_loss"] == 1.0 and summary["best_train_loss"] == 1.0
    assert summary["final_train_loss"] == 48.0 and summary["logged_intervals"] == 8
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("lm loss")] == [(r["iteration"], r["lm_loss"]) for r in rows]
    assert any(line.startswith(" train lm loss: final 48.0000") for line in lines), lines
    assert any(line.startswith(" results: " + str(tmp_path.resolve())) for line in lines), lines
    # A fresh start (resume at 0) of a restarted job replaces everything the dead attempt logged.
    attempt(1, 2, 0, [])
    assert [r["iteration"] for r in read_metrics_csv(tmp_path / "training_metrics.csv")] == [1, 2]


def test_closing_summary_lines(finished_run: dict) -> None:
    lines = finished_run["lines"]
    start = next(i for i, line in enumerate(lines) if line.startswith(" run finished at iteration 20/200"))
    text = "\n".join(lines[start:])
    assert f"train lm loss: final {_loss(20):.4f} (mean of the last log interval), best 0.3333 at iteration 12" in text
    assert "validation: lm loss 4.2500, ppl 70.11 at iteration 20; best 4.2500 at iteration 20" in text
    assert "throughput: " in text and str(finished_run["run_dir"].resolve()) in text


def test_csv_disabled_writes_no_csv(tmp_path):
    """DeepSpeed's csv_monitor {enabled: false} / --no-csv: TensorBoard-free, CSV-free run directory."""
    from megazero.monitor import TrainingMonitor

    mon = TrainingMonitor(tmp_path / "run", tensorboard_dir=None, config={}, enabled=True, total_iters=2,
                          log=lambda _: None, csv=False)
    mon.log_train(1, consumed_samples=8, lm_loss=2.0, lr=1e-3, grad_norm=1.0, batch_size=8,
                  iteration_time_ms=10.0, tokens_per_sec=100.0)
    mon.log_eval(1, lm_loss=2.5)
    mon.close()
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "summary.json" in names and not [n for n in names if n.endswith(".csv")], names
