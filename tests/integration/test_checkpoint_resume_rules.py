"""How --load resolves and what a save may not break, with real pretrain_gpt.py processes:
6. Bad --load input (one line, exit 2, nothing changed) and elastic resume (keep the global batch on
   another world size, or say why not); tools/checkpoint_info.py on a corrupted `latest`.
8. A SIGKILL inside the first save (the restart starts fresh or from the renamed folder, and removes
   the interrupted save); a disk that fills during a save (one line, exit 2 on every rank, previous
   checkpoint intact); one run per save folder (the lock); a finished run re-run: nothing to do.
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


def _bad_load(kind: str, ref_save: Path, tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """(--load folder, extra flags, substrings of the one-line error) for one bad-input case."""
    load = tmp_path / "ckpt"
    final = resolve_checkpoint(ref_save)
    if kind == "not-a-checkpoint":
        load.mkdir()
        (load / "notes.txt").write_text("not a checkpoint\n")
        return load, [], [f"--load {load}: not a checkpoint folder (no 'latest' and no index.json; it holds "
                          f"notes.txt); pass the --save folder of a run, or a missing or empty folder to start from "
                          f"scratch"]
    if kind == "load-is-a-file":
        load.write_text("not a checkpoint\n")
        return load, [], [f"--load {load}: is a file, not a checkpoint folder; pass the --save folder of a run (or "
                          f"one of its iter_* folders), or a missing or empty folder to start from scratch"]
    shutil.copytree(ref_save, load)
    if kind == "latest-names-a-missing-folder":
        (load / LATEST).write_text("iter_0000999\n")
        return load, [], [f"--load {load}: 'latest' names iter_0000999, which is missing or incomplete"]
    if kind in ("latest-garbage", "latest-a-path"):
        raw = b"\x89\xfe\x00\x13binary" if kind == "latest-garbage" else b"../../elsewhere\n"
        (load / LATEST).write_bytes(raw)
        return load, [], [f"{load / LATEST}: corrupted: it must hold one checkpoint name like iter_0000100, but holds "
                          f"{raw!r}; write the name of a complete iter_* folder into it, or name that folder itself "
                          f"instead"]
    if kind == "model-shape":
        return load, ["--hidden-size", "128"], [
            f"{load / final.name / 'index.json'}: checkpoint has hidden-size 64, this run has 128",
            "pass --hidden-size 64"]
    if kind == "batch-cannot-be-kept":
        return load, ["--micro-batch-size", "3"], [f"{load / final.name}: cannot keep the checkpoint's global batch 8",
                                                   "micro batch 3", "data-parallel size 1", "--global-batch-size"]
    raise ValueError(kind)


BAD_LOADS = ["not-a-checkpoint", "load-is-a-file", "latest-names-a-missing-folder", "latest-garbage",
             "latest-a-path", "model-shape", "batch-cannot-be-kept"]
EXACT = ("not-a-checkpoint", "load-is-a-file", "latest-garbage", "latest-a-path")  # needles = the whole line


@pytest.mark.parametrize("kind", BAD_LOADS)
def test_bad_load_is_one_line_and_changes_nothing(kind, tiny_dataset, uninterrupted, tmp_path, capsys, monkeypatch):
    ref_save, _ = uninterrupted
    load, extra, needles = _bad_load(kind, ref_save, tmp_path)
    before = file_hashes(load)
    monkeypatch.chdir(tmp_path)
    argv = [*data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN, "--train-iters", "100", "--load", str(load),
            "--save", str(load), *extra]
    code, err = run_main(argv, capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    if kind in EXACT:
        assert err == f"error: {needles[0]}"
    assert file_hashes(load) == before and not (tmp_path / "output").exists()
    if load.is_file():
        assert load.read_text() == "not a checkpoint\n"


def test_checkpoint_info_on_a_corrupted_latest(uninterrupted, tmp_path):
    ref_save, _ = uninterrupted
    save = tmp_path / "ckpt"
    shutil.copytree(ref_save, save)
    raw = b"\xff\xfe\x00garbage"
    (save / LATEST).write_bytes(raw)
    before = file_hashes(save)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "checkpoint_info.py"), str(save)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"error: {save / LATEST}: corrupted: it must hold one checkpoint name like iter_0000100, "
                           f"but holds {raw!r}; write the name of a complete iter_* folder into "
                           f"it, or name that folder itself instead\n")
    assert file_hashes(save) == before


def test_elastic_resume_on_another_process_count_keeps_the_global_batch(tiny_dataset, tmp_path, uninterrupted):
    """The dp2 checkpoint (micro 2 x accumulation 2 x dp 2 = 8) resumed by one process with only
    --micro-batch-size: accumulation becomes 4, the global batch and data position continue."""
    ref_save, _ = uninterrupted
    save = tmp_path / "ckpt"
    shutil.copytree(ref_save, save)
    proc = run_checked([sys.executable, str(REPO / "pretrain_gpt.py"), *data_flags(tiny_dataset), *TINY_MODEL,
                        *TINY_RUN, "--zero-stage", "1", "--train-iters", str(KILL_ITERS + 2), "--log-interval", "1",
                        "--load", str(save), "--save", str(save), "--output-dir", str(tmp_path / "run")], tmp_path)
    out = proc.stdout
    assert "resume: keeping the checkpoint's global batch 8: gradient accumulation 2 -> 4 (micro 2 x dp 1)" in out
    assert "global batch 8 = micro 2 x 4 accumulation x 1 dp" in out
    assert f"loaded checkpoint {save / iteration_dirname(KILL_ITERS)} (iteration {KILL_ITERS}, saved from tp1 pp1 " \
           f"vp1 dp2 zero1)" in out
    assert f"consumed samples: {(KILL_ITERS + 2) * 8:12d}" in out
    state = state_of(resolve_checkpoint(save))
    assert (state["iteration"], state["consumed_samples"]) == (KILL_ITERS + 2, (KILL_ITERS + 2) * 8)
    assert read_index(resolve_checkpoint(save))["layout"]["dp"] == 1



# ----- 8. checkpoint faults -------------------------------------------------------------------------------
FAULT_FLAGS = [*TINY_MODEL, *TINY_RUN, "--global-batch-size", "8", "--zero-stage", "1", "--log-interval", "1",
               "--save-interval", "2"]


@pytest.mark.parametrize("point", ["rank-files", "renamed"])
def test_sigkill_inside_the_first_save_restarts_cleanly(tiny_dataset, tmp_path, point):
    """torchrun --max-restarts 1, 2 ranks, `--save X --load X`; the *first* save (iteration 2) is held
    at POINT and a worker SIGKILLed. An interrupted first save is no save: the restart starts from
    scratch and removes the `.partial` folder (rank-files), or resumes from the complete folder the
    commit had renamed into place before writing `latest` (renamed); either way the job finishes."""
    save, marker, log = tmp_path / "ckpt", tmp_path / "paused", tmp_path / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
           "1", str(HELPERS), point, "2", str(marker), *data_flags(tiny_dataset), *FAULT_FLAGS, "--train-iters", "4",
           "--save", str(save), "--load", str(save), "--output-dir", str(tmp_path / "run")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)
    try:
        wait_for(marker.exists, proc, f"the first save reach {point}", log=log)
        time.sleep(0.5)  # let the other rank reach the save's next collective
        workers = workers_of(proc.pid, HELPERS.name)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        assert wait_exit(proc, 180) == 0, log.read_text()[-4000:]
    finally:
        kill_session(proc)
    text = log.read_text()
    assert "has iter_* folders but no 'latest'" not in text and "not a checkpoint folder" not in text, text[-4000:]
    assert text.count(f"no checkpoint in {save}: starting from scratch\n") == 1  # the first attempt
    assert "is in use by another run" not in text  # the restart takes the save folder's lock again
    if point == "rank-files":
        assert text.count(f"no checkpoint in {save}, only the interrupted save iter_0000002.partial (never committed): "
                          f"starting from scratch\n") == 1, text[-4000:]
        assert text.count(f"removed the interrupted save {save / 'iter_0000002.partial'} (never committed)\n") == 1
        assert "loaded checkpoint" not in text
    else:
        assert text.count(f"{save} has no 'latest' file (a first save interrupted before writing it, or folders "
                          f"copied without it): resuming from the newest complete checkpoint iter_0000002\n") == 1
        assert f"loaded checkpoint {save / iteration_dirname(2)} (iteration 2," in text
    assert f"iteration {4:8d}/{4:8d}" in text
    assert sorted(p.name for p in save.iterdir()) == [iteration_dirname(2), iteration_dirname(4), LATEST]
    assert latest_iteration(save) == 4 and checkpoint_tensors(resolve_checkpoint(save))



@pytest.mark.parametrize("fault", ["full-disk", "no-room"])
def test_a_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tiny_dataset, tmp_path, fault):
    """2 ranks (dp2 ZeRO-1: both write shards) save every 2 iterations; at the save of iteration 4 the
    disk fills (every write fails: EFBIG) or reports less room than the checkpoint needs (refused before
    writing). Every rank stops with exit 2, rank 0 prints one line naming the folder and the space
    needed, the interrupted save is removed and iteration 2 stays `latest`, intact."""
    save, run_dir = tmp_path / "ckpt", tmp_path / "run"
    cmd = [sys.executable, str(HELPERS), fault, "4", str(tmp_path / "marker"), *data_flags(tiny_dataset),
           *FAULT_FLAGS, "--train-iters", "6", "--save", str(save), "--output-dir", str(run_dir)]
    (code0, out0, err0), (code1, out1, err1) = launch_ranks(cmd, 2, tmp_path)
    assert (code0, code1) == (2, 2), (err0[-3000:], err1[-3000:])
    where = re.escape(f"cannot save checkpoint iter_0000004 into {save}: ")
    reason = (re.escape(f"File too large writing {save / 'iter_0000004.partial'}/rank0000") + r"[01]\.safetensors"
              if fault == "full-disk" else "not enough free space")
    room = r"[\d.]+ [MG]iB free there" if fault == "full-disk" else re.escape("1.0 MiB free there")
    line = (f"error: {where}{reason}; it needs about [\\d.]+ MiB \\({room}\\); free space or choose another --save "
            f"folder \\(the previous checkpoint, if any, is intact\\)\n")
    assert re.fullmatch(line, err0), err0  # one line, rank 0 only, no traceback
    assert err1 == "", err1
    assert "iteration        4/" in out1 + out0 and "iteration        5/" not in out0 + out1
    assert sorted(p.name for p in save.iterdir()) == [iteration_dirname(2), LATEST]  # no .partial, lock released
    assert latest_iteration(save) == 2 and state_of(resolve_checkpoint(save))["iteration"] == 2
    assert_complete_optimizer_state(checkpoint_tensors(save / iteration_dirname(2)))  # every sha256 verified
    assert (run_dir / "config.json").is_file()  # the run folder and its logs stay


def test_one_run_per_save_folder(tiny_dataset, tmp_path):
    """Run A holds --save X; run B with the same --save is refused (one line naming A, nothing
    written); once A is SIGKILLed its lock is gone with it, and run C takes the folder, saying so."""
    import socket

    save = tmp_path / "ckpt"
    base = [sys.executable, str(REPO / "pretrain_gpt.py"), *data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN,
            "--log-interval", "1", "--save", str(save)]
    log = tmp_path / "a.log"
    with open(log, "w") as out:
        a = subprocess.Popen(base + ["--train-iters", "100000", "--output-dir", str(tmp_path / "run_a")], cwd=tmp_path,
                             stdout=out, stderr=subprocess.STDOUT, env=ENV)
    try:
        wait_for(lambda: "iteration        2/" in log.read_text(), a, "run A training", log=log)
        before = file_hashes(save)
        b = subprocess.run(base + ["--train-iters", "2", "--output-dir", str(tmp_path / "run_b")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env=ENV)
        assert b.returncode == 2, b.stderr[-3000:]
        assert re.fullmatch(re.escape(f"error: --save {save} is in use by another run (pid {a.pid} on host "
                                      f"{socket.gethostname()}, started ") + r"[\d-]+ [\d:]+" +
                            re.escape("), which would replace this run's checkpoints or have them replaced; wait for "
                                      "it to finish, or choose another --save folder") + "\n", b.stderr), b.stderr
        assert file_hashes(save) == before and not (tmp_path / "run_b").exists()
        assert a.poll() is None, "run A must be unaffected"
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert (save / ".megazero-save.lock").is_file()  # the record stays; the kernel released the lock itself
    c = run_checked(base + ["--train-iters", "2", "--output-dir", str(tmp_path / "run_c")], tmp_path)
    assert c.stdout.count(f"{save / '.megazero-save.lock'}: the previous run saving here (pid {a.pid} on host "
                          f"{socket.gethostname()}, started ") == 1, c.stdout
    assert "ended without releasing it (killed or crashed; a torchrun restart looks like this too): taking it over" \
        in c.stdout
    assert sorted(p.name for p in save.iterdir()) == [iteration_dirname(2), LATEST]  # lock file removed at exit


def test_rerunning_a_finished_run_has_nothing_to_do(tiny_dataset, uninterrupted, tmp_path, capsys, monkeypatch):
    """`--save X --load X` again after the run reached --train-iters: one line, exit 0, no run folder,
    nothing saved or changed."""
    ref_save, _ = uninterrupted
    save = tmp_path / "ckpt"
    shutil.copytree(ref_save, save)
    run_dir = Path(read_index(resolve_checkpoint(save))["config"]["logging"]["output_dir"])
    before, run_before = file_hashes(save), file_hashes(run_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    argv = [*data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN, "--train-iters", str(KILL_ITERS), "--load", str(save),
            "--save", str(save)]
    assert pretrain_gpt.main(argv) == 0
    out, err = capsys.readouterr()
    assert out == f"checkpoint {save / iteration_dirname(KILL_ITERS)} is at iteration {KILL_ITERS} = --train-iters: " \
                  f"nothing to do\n" and err == ""
    assert file_hashes(save) == before and file_hashes(run_dir) == run_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no new run folder, no lock left
