"""Shared by the checkpoint tests: reading checkpoints, and running pretrain_gpt.py as subprocesses
(torchrun or plain ranks) with the tiny model: flags, launch, waiting, killing, hashing."""

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

REPO = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().with_name("checkpoint_helpers.py")
RTOL = 1e-5  # fp32, different layouts: the layout-parity tolerance


# ----- reading checkpoints -------------------------------------------------------------------------------
def rng_tensors(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {f"{slot}/{key}": reader.get(entry["file"], f"{entry['prefix']}/{key}")
            for slot, entry in reader.index["rng"].items() for key in [*entry["streams"], "ambient"]}


def assert_complete_optimizer_state(tensors: dict[str, torch.Tensor]) -> None:
    """fp32: model values (= masters) and both Adam moments for every parameter, moments not all zero."""
    params = {n.split("/", 1)[1] for n in tensors}
    kinds = {n.split("/", 1)[0] for n in tensors}
    assert kinds == {"model", "exp_avg", "exp_avg_sq"}, kinds
    assert all(f"{k}/{p}" in tensors for p in params for k in kinds)
    assert any(t.abs().sum() > 0 for n, t in tensors.items() if n.startswith("exp_avg_sq/"))


def state_of(folder: Path) -> dict:
    """The trainer state a checkpoint's index records (iteration, consumed samples, Adam steps, ...)."""
    return read_index(folder)["state"]



# ----- pretrain_gpt.py subprocesses -------------------------------------------------------------------------
TINY_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
TINY_RUN = ["--micro-batch-size", "2", "--lr", "2e-3", "--lr-warmup-iters", "2", "--split", "90,10,0",
            "--eval-interval", "1000", "--eval-iters", "1", "--no-tensorboard", "--no-csv"]
KILL_ITERS, KILL_SAVE_INTERVAL = 60, 5  # test 3: 2 ranks, dp2, ZeRO-1 (both ranks write shards), dropout on
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def data_flags(tiny_dataset) -> list[str]:
    prefix, model = tiny_dataset
    return ["--data-path", str(prefix), "--tokenizer-model", str(model)]


def torchrun(nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *extra,
            str(REPO / "pretrain_gpt.py")]


def kill_run_flags(tiny_dataset, save: Path, output: Path) -> list[str]:
    return [*data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN, "--global-batch-size", "8", "--zero-stage", "1",
            "--train-iters", str(KILL_ITERS), "--log-interval", "5", "--save", str(save), "--load", str(save),
            "--save-interval", str(KILL_SAVE_INTERVAL), "--output-dir", str(output)]


def run_checked(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def latest_iteration(save: Path) -> int | None:
    try:
        return int((save / LATEST).read_text().strip().removeprefix("iter_"))
    except (OSError, ValueError):
        return None


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def worker_rank(pid: int, script: str = "pretrain_gpt.py") -> int | None:
    """RANK from a process's environment, if it is a worker running `script`."""
    try:
        if script not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return None
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                   .split("\0") if "=" in kv)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env else None


def workers_of(launcher: int, script: str = "pretrain_gpt.py") -> dict[int, int]:
    """{rank: pid} of torchrun's live workers (running pretrain_gpt.py, or `script`)."""
    return {rank: pid for pid in children(launcher) if (rank := worker_rank(pid, script)) is not None}


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher started with start_new_session=True and every process of its session
    (torchrun's workers), if still running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code, or None after `timeout` seconds (the caller's finally kills the session)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180.0, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    raise AssertionError(f"never saw {what} (exit code {proc.returncode}); "
                         + (log.read_text()[-3000:] if log is not None and log.exists() else ""))


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}



def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(cmd: list[str], world: int, cwd: Path, timeout: int = 300) -> list[tuple[int, str, str]]:
    """`world` processes of cmd, rendezvous through MASTER_ADDR/PORT (no torchrun): each rank's stderr
    is its own, so "printed once, by rank 0" can be checked exactly. [(code, stdout, stderr)] by rank."""
    port = free_port()
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(world)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()



def run_main(argv, capsys, monkeypatch, world_size=1):
    """pretrain_gpt.run in this process (these errors come before any process group): (code, stderr)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        pretrain_gpt.run(argv)
    return exc.value.code, capsys.readouterr().err.strip()
