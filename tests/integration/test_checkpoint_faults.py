"""Checkpoint faults with real pretrain_gpt.py processes (torchrun or plain ranks, gloo):
3. SIGKILL of one worker under torchrun --max-restarts 1: the job restarts, resumes from `latest`,
   exits 0, and its final checkpoint equals an uninterrupted run's.
4. SIGKILL inside a save (held there by checkpoint_helpers.py): the previous checkpoint stays
   `latest` and loads; a new run resumes from it.
5. One flipped byte in a shard: one-line checksum error naming the file, exit 2, nothing changed.
7. SIGTERM (to one rank only) and --exit-interval: save at a step boundary and exit 0.
The `uninterrupted` run is the session fixture in tests/integration/conftest.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pretrain_gpt
from megazero.checkpoint.format import LATEST, CheckpointReader, iteration_dirname, read_index, resolve_checkpoint
from megazero.topology import GridShape, Topology
from megazero.training.data_setup import ResolvedData
from megazero.training.trainer import Trainer
from megazero.validation import validate
from tests.checkpoint_utils import assert_same_tensors, checkpoint_tensors  # noqa: F401
from tests.dist_utils import run_distributed
from tests.integration.test_layout_parity import Layout, layout_id, parity_config
from tests.integration.checkpoint_runs import *  # noqa: F401,F403 (constants, launch and read helpers)


# ----- 3. SIGKILL under torchrun ---------------------------------------------------------------------------
def test_sigkill_of_a_worker_restarts_and_finishes_like_an_uninterrupted_run(tiny_dataset, tmp_path, uninterrupted):
    ref_save, _ = uninterrupted
    save, log = tmp_path / "ckpt", tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(torchrun(2, "--max-restarts", "1")
                                + kill_run_flags(tiny_dataset, save, tmp_path / "run"),
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        # as soon as a checkpoint is committed, mid-run: SIGKILL rank 1 (no chance to clean up)
        wait_for(lambda: (latest_iteration(save) or 0) >= KILL_SAVE_INTERVAL, proc, "a first checkpoint", log=log)
        workers = workers_of(proc.pid)
        assert sorted(workers) == [0, 1], workers
        killed_at = latest_iteration(save)
        os.kill(workers[1], signal.SIGKILL)
        # normally ~10 s: torchrun stops rank 0, starts two new workers, they resume from `latest`
        assert wait_exit(proc, 120) == 0, log.read_text()[-4000:]
    finally:
        kill_session(proc)
    text = log.read_text()
    assert killed_at < KILL_ITERS, "the kill must land mid-run"
    loads = [line for line in text.splitlines() if "loaded checkpoint" in line]
    assert len(loads) == 1, "expected one restart that resumed from `latest`:\n" + text[-4000:]
    resumed = int(loads[0].split("(iteration ")[1].split(",")[0])
    assert KILL_SAVE_INTERVAL <= resumed < KILL_ITERS and resumed % KILL_SAVE_INTERVAL == 0, loads[0]
    assert "RNG restored" in loads[0] and "optimizer state restored" in loads[0]
    assert f"iteration {KILL_ITERS:8d}/{KILL_ITERS:8d}" in text
    final, reference = resolve_checkpoint(save), resolve_checkpoint(ref_save)
    assert final.name == reference.name == iteration_dirname(KILL_ITERS)
    # same layout, same data position and RNG streams on CPU: bit for bit
    assert_same_tensors(checkpoint_tensors(final), checkpoint_tensors(reference), "killed-and-resumed vs uninterrupted")
    assert_same_tensors(rng_tensors(final), rng_tensors(reference), "RNG streams")
    assert state_of(final) == state_of(reference)
    assert not list(save.glob("*.partial")) and not list(save.glob("*.old"))


# ----- 4. SIGKILL inside a save -----------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["rank-files", "renamed"])
def test_sigkill_inside_a_save_leaves_the_previous_checkpoint(tiny_dataset, tmp_path, point):
    """Saves every 2 iterations; the save of iteration 4 is held at POINT (checkpoint_helpers.py) and the
    process is SIGKILLed there. `latest` still names iteration 2, which verifies and resumes."""
    save, marker = tmp_path / "ckpt", tmp_path / "paused"
    flags = [*data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN, "--global-batch-size", "8", "--log-interval", "1",
             "--save", str(save), "--save-interval", "2", "--output-dir", str(tmp_path / "run")]
    proc = subprocess.Popen([sys.executable, str(HELPERS), point, "4", str(marker), *flags, "--train-iters", "6"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        wait_for(marker.exists, proc, f"the save of iteration 4 reach {point}")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.stdout.close()
    two, four = save / iteration_dirname(2), save / iteration_dirname(4)
    if point == "rank-files":  # the interrupted save: files, no index, never renamed
        partial = save / (four.name + ".partial")
        assert (partial / "rank00000.safetensors").is_file() and not (partial / "index.json").exists()
        assert not four.exists()
    else:  # renamed into place and complete, but `latest` was never moved to it
        assert (four / "index.json").is_file()
    assert (save / LATEST).read_text() == two.name + "\n"
    assert resolve_checkpoint(save) == two
    tensors = checkpoint_tensors(two)  # every file's sha256 verified
    assert_complete_optimizer_state(tensors)
    assert state_of(two)["iteration"] == 2
    # a new run resumes from iteration 2 and saves 4 and 6 over the leftovers
    proc = run_checked([sys.executable, str(REPO / "pretrain_gpt.py"), *flags, "--load", str(save),
                        "--train-iters", "6", "--output-dir", str(tmp_path / "run2")], tmp_path)
    assert f"loaded checkpoint {two} (iteration 2," in proc.stdout
    assert resolve_checkpoint(save) == save / iteration_dirname(6)
    assert state_of(four)["iteration"] == 4 and checkpoint_tensors(four)
    assert sorted(p.name for p in save.iterdir()) == [two.name, four.name, iteration_dirname(6), LATEST]


# ----- 5. a corrupted shard ---------------------------------------------------------------------------------
def test_corrupted_shard_is_a_one_line_checksum_error(tiny_dataset, tmp_path, uninterrupted):
    ref_save, _ = uninterrupted
    save = tmp_path / "ckpt"
    shutil.copytree(ref_save, save)
    shard = resolve_checkpoint(save) / "rank00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) - 1000] ^= 0x01  # one bit of one float in the tensor data (past the header)
    shard.write_bytes(bytes(raw))
    before = file_hashes(save)
    proc = subprocess.run([sys.executable, str(REPO / "pretrain_gpt.py"), *data_flags(tiny_dataset), *TINY_MODEL,
                           *TINY_RUN, "--train-iters", str(KILL_ITERS + 5), "--load", str(save), "--save", str(save),
                           "--output-dir", str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.stdout[-2000:], err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert f"{shard}: checksum mismatch" in err, err
    assert "iteration " not in proc.stdout.replace("(iteration", "")  # no training step ran
    assert file_hashes(save) == before  # nothing written, nothing overwritten
    assert not (tmp_path / "run").exists(), "a failed load must not leave a run directory behind"



# ----- 7. SIGTERM and --exit-interval ----------------------------------------------------------------------
def test_sigterm_to_one_rank_saves_at_the_next_step_and_exits_0(tiny_dataset, tmp_path):
    """Preemption reaching only rank 1: both ranks agree to stop at the same step boundary, save a
    checkpoint of that iteration, and exit 0 (so does torchrun)."""
    save, log = tmp_path / "ckpt", tmp_path / "torchrun.log"
    iters = 100_000
    with open(log, "w") as out:
        proc = subprocess.Popen(torchrun(2) + [*data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN,
                                               "--global-batch-size", "4", "--zero-stage", "2",
                                               "--train-iters", str(iters), "--log-interval", "1",
                                               "--save", str(save), "--output-dir", str(tmp_path / "run")],
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        wait_for(lambda: "iteration        3/" in log.read_text(), proc, "iteration 3", log=log)
        workers = workers_of(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGTERM)
        assert wait_exit(proc, 120) == 0, log.read_text()[-4000:]
    finally:
        kill_session(proc)
    text = log.read_text()
    stops = [line for line in text.splitlines() if line.startswith("SIGTERM: stopping at iteration")]
    assert len(stops) == 1 and stops[0].endswith("after saving a checkpoint"), text[-3000:]
    stopped = int(stops[0].split()[4])
    assert 3 <= stopped < iters
    assert f"iteration {stopped + 1:8d}/" not in text  # no step after the one the signal interrupted
    assert latest_iteration(save) == stopped
    assert [p.name for p in save.iterdir() if p.is_dir()] == [iteration_dirname(stopped)]
    folder = resolve_checkpoint(save)
    assert state_of(folder)["iteration"] == stopped and checkpoint_tensors(folder)


def test_exit_interval_saves_and_exits_at_n(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    proc = run_checked([sys.executable, str(REPO / "pretrain_gpt.py"), *data_flags(tiny_dataset), *TINY_MODEL,
                        *TINY_RUN, "--train-iters", "100", "--log-interval", "1", "--exit-interval", "3",
                        "--save", str(save), "--output-dir", str(tmp_path / "run")], tmp_path)
    assert "--exit-interval 3: stopping at iteration 3 after saving a checkpoint" in proc.stdout
    assert "iteration        4/" not in proc.stdout
    assert sorted(p.name for p in save.iterdir()) == [iteration_dirname(3), LATEST]
    assert latest_iteration(save) == 3 and state_of(resolve_checkpoint(save))["iteration"] == 3
