"""A stopped rank under torchrun (docs/failures.md): real gloo processes, pretrain_gpt.py subprocesses.

1. SIGSTOP of one worker of a tp-2 run with --distributed-timeout-minutes 0.1: the job ends (non-zero)
   instead of hanging for the default 10 minutes, with one message, printed once, that names the
   operation, the group and its ranks, the iteration and the stopped rank; rank 0 exits with code 3.
2. The same under torchrun --max-restarts 1 with --save X --load X, at pp-2 (the stopped rank's
   peer waits in a p2p transfer or a collective): torchrun kills the stopped worker, restarts the
   job, which resumes from the latest checkpoint and finishes (exit code 0).
3. The message's per-rank lines from synthetic heartbeats (no processes): stopped, silent, busy
   elsewhere, waiting too, and silent ranks outside the group.

Both runs go side by side (a module fixture; most of their time is waiting: the timeout, then
torchrun's fixed 30 s grace before it SIGKILLs a worker that ignores SIGTERM, as a stopped one must).
Wall-clock bounds are generous (the machine may be loaded); they only tell "ended" from "hung".
torchrun starts each worker in a session of its own, so cleanup SIGKILLs every worker by pid
(a stopped one gets SIGCONT too) before the launcher: no stopped process outlives a test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.checkpoint_runs import (ENV, TINY_MODEL, TINY_RUN, children, data_flags, latest_iteration,
                                               torchrun, wait_exit, wait_for, workers_of)

ENDED_WITHIN = 240  # s from the SIGSTOP: timeout + torchrun's 30 s grace before it SIGKILLs the stopped worker
GROUP_OP = (r"(all_reduce|all_gather|reduce_scatter|all_gather_object|p2p (send to|recv from) rank \d) "
            r"on the (tp|dp|pp|model|embedding|world) group \(ranks 0, 1\)")


def launch(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def cleanup(proc: subprocess.Popen, stopped: list[int]) -> None:
    """SIGKILL every worker of the launcher (SIGCONT first for the stopped ones), then the launcher."""
    pids = set(stopped)
    if proc.poll() is None:
        pids |= set(children(proc.pid))
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def gone(pid: int) -> bool:
    """The process has exited (and is not merely a zombie awaiting its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def logged_iteration(log: Path) -> int:
    found = re.findall(r"iteration +(\d+)/", log.read_text())
    return int(found[-1]) if found else 0


def stop_rank_1(proc: subprocess.Popen, stopped: list[int]) -> int:
    workers = workers_of(proc.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGSTOP)
    stopped.append(workers[1])
    return workers[1]


def error_lines(text: str) -> list[str]:
    """The lines the workers printed as errors (torchrun's failure summary quotes the error file
    indented, after "traceback :"; that copy is the launcher's, not a second message)."""
    return [line for line in text.splitlines() if line.startswith("error:")]


def message_of(text: str) -> str:
    """The job's message: the error line and its indented continuation lines."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return "\n".join(lines[start:end])


# ----- the two runs, side by side (each spends most of its time waiting: a timeout, torchrun's grace) ---------
RESTART_ITERS, SAVE_INTERVAL = 100, 5


def _stopped_tp_run(tiny_dataset, root: Path, procs: list, stopped: list[int]) -> dict:
    """tp-2, no restarts: SIGSTOP rank 1 after three iterations and wait for the job to end."""
    log = root / "torchrun.log"
    proc = launch(torchrun(2) + [*data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN, "--tp", "2",
                                 "--train-iters", "100000", "--log-interval", "1",
                                 "--distributed-timeout-minutes", "0.1", "--output-dir", str(root / "run")],
                  root, log)
    procs.append(proc)
    try:
        wait_for(lambda: logged_iteration(log) >= 3, proc, "three iterations", log=log)
        pid = stop_rank_1(proc, stopped)
        stopped_at = logged_iteration(log)
        t0 = time.monotonic()
        code = wait_exit(proc, ENDED_WITHIN)
        elapsed = time.monotonic() - t0
        assert code is not None, f"still running {ENDED_WITHIN} s after the SIGSTOP:\n" + log.read_text()[-4000:]
    finally:
        cleanup(proc, stopped)
    return {"code": code, "pid": pid, "stopped_at": stopped_at, "elapsed": elapsed, "text": log.read_text()}


def _stopped_pp_run_with_restarts(tiny_dataset, root: Path, procs: list, stopped: list[int]) -> dict:
    """pp-2 under --max-restarts 1 with --save X --load X: SIGSTOP rank 1 once a checkpoint exists."""
    save, log = root / "ckpt", root / "torchrun.log"
    proc = launch(torchrun(2, "--max-restarts", "1") + [
        *data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN, "--pp", "2", "--train-iters", str(RESTART_ITERS),
        "--log-interval", "5", "--save", str(save), "--load", str(save), "--save-interval", str(SAVE_INTERVAL),
        "--distributed-timeout-minutes", "0.2", "--output-dir", str(root / "run")], root, log)
    procs.append(proc)
    try:
        wait_for(lambda: (latest_iteration(save) or 0) >= SAVE_INTERVAL, proc, "a first checkpoint", log=log)
        pid = stop_rank_1(proc, stopped)
        saved_before = latest_iteration(save)
        t0 = time.monotonic()
        code = wait_exit(proc, ENDED_WITHIN + 120)
        elapsed = time.monotonic() - t0
    finally:
        cleanup(proc, stopped)
    return {"code": code, "pid": pid, "saved_before": saved_before, "elapsed": elapsed, "text": log.read_text(),
            "latest": latest_iteration(save)}


@pytest.fixture(scope="module")
def stopped_runs(tiny_dataset, tmp_path_factory) -> dict:
    """Both runs at once ({name: result dict, or the exception its driver raised}); whatever happens,
    every worker they started is SIGKILLed (SIGCONT first) before this returns."""
    procs: list[subprocess.Popen] = []
    stopped: list[int] = []
    runs = {"tp": _stopped_tp_run, "restart": _stopped_pp_run_with_restarts}
    with ThreadPoolExecutor(len(runs)) as pool:
        try:
            futures = {name: pool.submit(fn, tiny_dataset, tmp_path_factory.mktemp(f"hang_{name}"), procs, stopped)
                       for name, fn in runs.items()}
            return {name: (f.exception() or f.result()) for name, f in futures.items()}
        finally:
            for proc in procs:
                cleanup(proc, stopped)


def outcome(stopped_runs: dict, name: str) -> dict:
    result = stopped_runs[name]
    if isinstance(result, BaseException):
        raise result
    return result


# ----- 1. a stopped tp rank: the job ends with one message ------------------------------------------------
def test_sigstop_of_a_tp_rank_ends_the_job_with_one_message(stopped_runs):
    run = outcome(stopped_runs, "tp")
    text, pid = run["text"], run["pid"]
    print(f"SIGSTOP -> job exit: {run['elapsed']:.1f} s")
    assert run["code"] != 0, text[-4000:]
    assert len(error_lines(text)) == 1, "expected one message for the whole job:\n" + text[-4000:]
    message = message_of(text)
    print(message)
    assert re.match(r"error: collective timeout: " + GROUP_OP +
                    r" did not complete within 6\.0 s \(--distributed-timeout-minutes 0\.1\)$",
                    message.splitlines()[0]), message
    iteration = int(re.search(r"\n  rank 0 was at iteration (\d+), ", message).group(1))
    assert iteration >= run["stopped_at"] + 1, (run["stopped_at"], message)  # logged ones were done
    assert "\n  did not arrive:\n    rank 1 (pid %d on " % pid in message, message
    assert "the process is stopped (SIGSTOP" in message, message
    assert re.search(r"rank +: 0 \(local_rank: 0\)\n +exitcode +: 3 ", text), text[-3000:]  # torchrun's summary
    assert gone(pid), "torchrun must have killed the stopped worker"


# ----- 2. the same under --max-restarts: resume from the latest checkpoint --------------------------------
def test_sigstop_under_max_restarts_resumes_from_the_checkpoint_and_finishes(stopped_runs):
    run = outcome(stopped_runs, "restart")
    text, pid = run["text"], run["pid"]
    print(f"SIGSTOP -> restarted job's exit: {run['elapsed']:.1f} s")
    assert run["code"] == 0, f"exit code {run['code']}:\n" + text[-4000:]
    assert run["saved_before"] < RESTART_ITERS, "the stop must land mid-run"
    assert len(error_lines(text)) == 1, "one message, from the attempt that timed out:\n" + text[-4000:]
    message = message_of(text)
    assert re.match(r"error: collective timeout: " + GROUP_OP + r" did not complete within 12\.0 s",
                    message.splitlines()[0]), message
    assert "rank 1 (pid %d on " % pid in message and "the process is stopped (SIGSTOP" in message, message
    loads = [line for line in text.splitlines() if "loaded checkpoint" in line]
    assert len(loads) == 1, "expected one restart that resumed from `latest`:\n" + text[-4000:]
    resumed = int(loads[0].split("(iteration ")[1].split(",")[0])
    assert run["saved_before"] <= resumed < RESTART_ITERS and resumed % SAVE_INTERVAL == 0, loads[0]
    assert "optimizer state restored" in loads[0]
    assert text.index(message) < text.index(loads[0])
    assert f"iteration {RESTART_ITERS:8d}/{RESTART_ITERS:8d}" in text
    assert run["latest"] == RESTART_ITERS
    assert gone(pid), "torchrun must have killed the stopped worker"


# ----- 3. the message's rank lines, without processes --------------------------------------------------------
def test_report_names_stopped_silent_busy_and_waiting_ranks():
    """format_report classifies every rank expected in the failed collective from its heartbeat (and, on
    this host, its /proc state), and lists silent ranks outside the group."""
    import socket
    import sys

    from megazero.errors import CollectiveTimeout
    from megazero.watchdog import format_report

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()  # reaped: its pid names no process
    host, now = socket.gethostname(), 1000.0
    op = "all_reduce on the dp group (ranks 0, 2, 4, 6)"
    info = {"op_text": op, "rank": 0, "where": "iteration 7, gradient reduction", "expected": [0, 2, 4, 6],
            "timeout_s": 9.0, "cause": "Timed out waiting 9000ms for recv operation to complete"}

    def beat(t, where, pid=os.getpid(), on=host, op=None, state="running"):
        return {"t": t, "where": where, "pid": pid, "host": on, "op": op, "op_for": 8.5 if op else None,
                "state": state}

    beats = {0: beat(999.5, "iteration 7, gradient reduction", op=op),
             2: beat(999.0, "iteration 7, gradient reduction", op=op),  # waiting too
             4: beat(985.0, "iteration 7, forward of microbatch 1 on chunk 0", on="node-b"),  # silent
             6: beat(999.4, "iteration 7, checkpoint save", on="node-b", op="all_gather_object on the world group"),
             5: beat(999.9, "iteration 7, backward of microbatch 0 on chunk 0", pid=exited.pid)}  # outside, gone
    message = format_report(CollectiveTimeout("x", info), beats, now=now, stale=3.0)
    print(message)
    lines = message.splitlines()
    assert lines[0] == f"error: collective timeout: {op} did not complete within 9.0 s " \
                       "(--distributed-timeout-minutes 0.15)"
    assert lines[1] == "  rank 0 was at iteration 7, gradient reduction"
    assert lines[2] == "  did not arrive:"
    assert lines[3].startswith("    rank 4 (pid ") and "no heartbeat for 15.0 s (stopped, hung or dead)" in lines[3]
    assert lines[4].startswith("    rank 6 (pid ") and "alive, at iteration 7, checkpoint save, blocked in " \
        "all_gather_object on the world group for 8.5 s" in lines[4]
    assert lines[5] == "  also waiting in it: rank 2"
    assert lines[6] == "  outside this group:"
    assert lines[7].startswith(f"    rank 5 (pid {exited.pid} on {host}): the process has exited or was killed")
    assert lines[8].startswith("  the failing ranks exit with code 3 and torchrun ends the job")
