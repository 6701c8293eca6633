"""End-to-end: pretrain_gpt.py under torchrun, 4 ranks, tp=2 x dp=2, on the tests' generated text. The loss falls and
every monitoring file exists (TensorBoard events, CSV, summary.json, PNG, resolved config)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_tp2_dp2_trains_and_writes_monitoring(tiny_dataset, tmp_path):
    prefix, model = tiny_dataset
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(REPO / "pretrain_gpt.py"), "--tp", "2", "--data-path", str(prefix), "--tokenizer-model", str(model),
           "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
           "--micro-batch-size", "4", "--global-batch-size", "16", "--train-iters", "40", "--lr", "2e-3",
           "--lr-warmup-iters", "5", "--log-interval", "5", "--eval-interval", "20", "--eval-iters", "2",
           "--split", "90,10,0", "--output-dir", str(run_dir)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2-way tensor x 1-way pipeline x 2-way data parallel" in proc.stdout
    assert proc.stdout.count("iteration       40/      40") == 1  # one rank prints the log lines

    rows = list(csv.DictReader(open(run_dir / "training_metrics.csv")))
    assert [int(r["iteration"]) for r in rows] == list(range(5, 41, 5))
    losses = [float(r["lm_loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(float(r["tokens_per_sec"]) > 0 for r in rows)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_train_loss"] == losses[-1]
    assert json.loads((run_dir / "config.json").read_text())["parallel"]["tensor_model_parallel_size"] == 2
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    png = (run_dir / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (run_dir / "validation_metrics.csv").read_text().count("\n") == 3  # header + iterations 20, 40


def test_torchrun_pp2_vp2_dp2_records_the_training_timeline(tiny_dataset, tmp_path):
    """Interleaved pipeline x data parallel under torchrun; --timeline-out holds the last *training*
    step (every forward and backward of every chunk), not the evaluation that follows it."""
    prefix, model = tiny_dataset
    timeline = tmp_path / "timeline.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(REPO / "pretrain_gpt.py"), "--pp", "2", "--vp", "2", "--data-path", str(prefix),
           "--tokenizer-model", str(model), "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
           "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "16", "--train-iters", "6",
           "--log-interval", "3", "--eval-interval", "6", "--eval-iters", "1", "--split", "90,10,0",
           "--output-dir", str(tmp_path / "run"), "--timeline-out", str(timeline), "--wall-clock-breakdown"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2-way pipeline (interleaved, 2 chunks per stage) x 2-way data parallel" in proc.stdout
    assert " time (ms) | forward-backward: " in proc.stdout and "| optimizer: " in proc.stdout
    data = json.loads(timeline.read_text())
    assert (data["pp"], data["vp"], data["num_microbatches"]) == (2, 2, 4)
    for rank in data["ranks"]:
        kinds = sorted((e["kind"], e["chunk"], e["microbatch"]) for e in rank["events"])
        assert kinds == sorted((k, c, mb) for k in "FB" for c in range(2) for mb in range(4)), rank["pp_rank"]
    draw = subprocess.run([sys.executable, str(REPO / "tools" / "plot_schedule.py"), "--timeline", str(timeline)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert draw.returncode == 0, draw.stderr
    assert (tmp_path / "timeline.png").read_bytes().startswith(b"\x89PNG")
