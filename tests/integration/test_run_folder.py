"""One run, one run folder: a run resumed from its checkpoint (no --output-dir) continues the folder
the checkpoint was written from; its CSVs hold every iteration once (rows an attempt logged after
its last checkpoint are replaced), TensorBoard shows one curve, summary.json covers the whole run,
and the console ends with a closing summary naming the folder. In-process single-process runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import pretrain_gpt
from megazero.checkpoint.format import LATEST, iteration_dirname, read_index
from megazero.monitor.csv_log import read_metrics_csv

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "2e-3", "--split", "90,10,0",
        "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1"]


@pytest.fixture
def run(tiny_dataset, tmp_path, monkeypatch):
    prefix, model = tiny_dataset
    monkeypatch.chdir(tmp_path)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)

    def go(*argv: str) -> dict:
        return pretrain_gpt.run(["--data-path", str(prefix), "--tokenizer-model", str(model), *TINY, *argv])
    return go


def test_resume_continues_the_run_folder(run, tmp_path, capsys):
    save = tmp_path / "ckpt"
    run("--train-iters", "6", "--save", str(save), "--save-interval", "3")
    first = capsys.readouterr().out
    (run_dir,) = (tmp_path / "output").iterdir()
    assert read_index(save / iteration_dirname(6))["config"]["logging"]["output_dir"] == str(Path("output") / run_dir.name)
    # The attempt "died" after logging 4..6 but before saving again: only iteration 3 is committed.
    shutil.rmtree(save / iteration_dirname(6))
    (save / LATEST).write_text(iteration_dirname(3) + "\n")

    summary = run("--train-iters", "8", "--save", str(save), "--load", str(save))
    out = capsys.readouterr().out
    assert [p.name for p in (tmp_path / "output").iterdir()] == [run_dir.name], "a resume must not start a new folder"
    rows = read_metrics_csv(run_dir / "training_metrics.csv")
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert [r["iteration"] for r in read_metrics_csv(run_dir / "validation_metrics.csv")] == [2, 4, 6, 8]
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["logged_intervals"] == 8 and on_disk["first_train_loss"] == rows[0]["lm_loss"]
    assert summary["final_train_loss"] == rows[-1]["lm_loss"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("lm loss")] == list(range(1, 9))
    for text in (first, out):  # both attempts end with the closing summary
        assert " run finished at iteration" in text and f" results: {run_dir.resolve()}" in text
        assert " test: " not in text  # split 90,10,0: no test set
    assert " validation: lm loss " in out


def test_logged_loss_is_the_interval_mean(run, tmp_path, capsys):
    summary = run("--train-iters", "4", "--log-interval", "2", "--output-dir", str(tmp_path / "a"), "--log-memory")
    per_step = run("--train-iters", "4", "--log-interval", "1", "--output-dir", str(tmp_path / "b"))
    coarse = read_metrics_csv(tmp_path / "a" / "training_metrics.csv")
    fine = read_metrics_csv(tmp_path / "b" / "training_metrics.csv")
    assert [r["iteration"] for r in coarse] == [2, 4]
    for row, (x, y) in zip(coarse, [(fine[0], fine[1]), (fine[2], fine[3])]):
        assert row["lm_loss"] == pytest.approx((x["lm_loss"] + y["lm_loss"]) / 2, rel=1e-12)
    assert summary["final_train_loss"] == coarse[-1]["lm_loss"] and per_step["final_train_loss"] == fine[-1]["lm_loss"]

    # --log-memory (memory_report.py): per rank, model state then the saved-for-backward line; the
    # summary's memory section (one rank: per_rank has one entry equal to the maxima)
    out = capsys.readouterr().out
    assert " rank 0 (pp 0, dp 0, tp 0): params: " in out and "activation-peak: " in out
    assert "activations saved for backward: peak " in out and "microbatch 0 per layer: 0: " in out
    memory = json.loads((tmp_path / "a" / "summary.json").read_text())["memory"]
    (mine,) = memory["per_rank"]
    assert mine == {"rank": 0, "pp": 0, "dp": 0, "tp": 0, **{k: memory[k] for k in mine if k not in "rank pp dp tp"}}
    assert 0 < memory["activation_bytes"] < memory["peak_bytes"] and memory["activation_host_bytes"] == 0
    assert memory["model_state_bytes"] > 0 and "memory" in per_step
