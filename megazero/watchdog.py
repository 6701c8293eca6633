"""Hang detection: what this rank is doing, a heartbeat in the rendezvous store, and the one message a
failed collective ends the job with (docs/failures.md).

Three pieces:

- `context` (RunContext): the iteration, the phase (set by the trainer) and the pipeline action (set
  by the executor, per action: one attribute store, nothing formatted) this rank is in, and the
  collective it is blocked in (set by megazero/comm.py around every blocking call). Formatted only
  when a heartbeat is written or a failure is reported.
- `Heartbeat`: a daemon thread that writes this rank's {time, iteration, action, blocking op} to the
  rendezvous store every `interval` seconds. A SIGSTOPped (or dead) process's thread stops with it,
  so a stale heartbeat names the rank that did not arrive; a live rank blocked somewhere else shows
  where. Under torchrun the store is the agent's, which outlives any worker.
- `exit_on_collective_error(err)`: called by the entry point for a CollectiveError (comm.py raises
  it for a timeout or a lost peer). The first failing rank of the job to claim a key in the store
  (store.add) prints the message; every failing rank then flushes and leaves with os._exit(exit
  code): a process group whose peer is stopped cannot be torn down without blocking.

No collective is added to any step; the per-step cost is a few attribute stores.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

from megazero.errors import CollectiveError, CollectiveTimeout, write_elastic_error_file

_ACTION_TEXT = {  # pipeline_parallel.schedules action kinds (not imported: imports flow one way)
    "F": "forward of microbatch {m} on chunk {c}",
    "B": "backward of microbatch {m} on chunk {c}",
    "send_act": "send activation of microbatch {m} to stage {p}",
    "recv_act": "recv activation of microbatch {m} from stage {p}",
    "send_grad": "send gradient of microbatch {m} to stage {p}",
    "recv_grad": "recv gradient of microbatch {m} from stage {p}",
}


def describe_action(action: Any) -> str:
    """'forward of microbatch 3 on chunk 1', 'recv activation of microbatch 0 from stage 0 + ...'."""
    if action is None:
        return ""
    if isinstance(action, str):
        return action
    if isinstance(action, (list, tuple)):
        return " + ".join(describe_action(a) for a in action)
    text = _ACTION_TEXT.get(action.kind, f"{action.kind} of microbatch {{m}} on chunk {{c}}")
    return text.format(m=action.microbatch, c=action.chunk, p=action.peer)


class RunContext:
    """What this rank is doing. Written by the main thread, read by the heartbeat thread and by
    comm.py when a collective fails; plain attribute stores, no lock (a torn read costs one stale
    word in a heartbeat)."""

    __slots__ = ("iteration", "phase", "action", "op", "op_since")

    def __init__(self) -> None:
        self.iteration: int | None = None  # the iteration being run (trainer: iteration + 1)
        self.phase = "start-up"
        self.action: Any = None  # a pipeline Action, a list of them (one p2p batch), or None
        self.op: tuple | None = None  # (kind, group, peer) while blocked in a comm.py call
        self.op_since = 0.0

    def step(self, iteration: int, phase: str) -> None:
        self.iteration, self.phase, self.action = iteration, phase, None

    def set_phase(self, phase: str) -> None:
        self.phase, self.action = phase, None

    def where(self) -> str:
        """'iteration 4, forward of microbatch 0 on chunk 0' / 'start-up'."""
        action = describe_action(self.action)
        doing = (action if self.phase == "forward/backward" else f"{self.phase}: {action}") if action else self.phase
        return doing if self.iteration is None else f"iteration {self.iteration}, {doing}"


context = RunContext()


# ----- the heartbeat ------------------------------------------------------------------------------------
def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats: a sixth of the timeout, within [0.5, 5]."""
    return min(5.0, max(0.5, timeout_s / 6))


def stale_after(interval: float) -> float:
    """A heartbeat older than this is a rank that stopped (three missed beats, at least 2 s)."""
    return max(3 * interval, 2.0)


def _key(rank: int) -> str:
    return f"heartbeat/{rank}"


class Heartbeat:
    """This rank's liveness record in the store, refreshed by a daemon thread. `store_factory` makes
    the heartbeat's own store client (not the process groups'), created on first use."""

    def __init__(self, store_factory: Callable[[], Any], rank: int, world_size: int, timeout_s: float,
                 describe_op: Callable[[tuple], str]):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = heartbeat_interval(timeout_s)
        self.describe_op = describe_op
        self._factory = store_factory
        self._store = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host = socket.gethostname()

    @property
    def store(self):
        if self._store is None:
            self._store = self._factory()
        return self._store

    def record(self, state: str = "running") -> dict:
        now = time.time()
        op = context.op
        beat = {"t": now, "where": context.where(), "pid": os.getpid(), "host": self._host, "state": state,
                "op": self.describe_op(op) if op else None, "op_for": round(now - context.op_since, 1) if op else None}
        return beat

    def beat(self, state: str = "running") -> None:
        try:
            self.store.set(_key(self.rank), json.dumps(self.record(state)))
        except Exception:  # noqa: BLE001 - the store gone (job ending) or slow: the next beat retries
            self._store = None

    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="megazero-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self, state: str | None = "exited", join: bool = True) -> None:
        """End the beats; record `state` as the last one unless it is None (the store may be gone: a
        store hosted by rank 0 rather than torchrun's agent dies with rank 0, and writing to it then
        prints a c10d 'Broken pipe' warning on this rank's stderr)."""
        self._stop.set()
        if join and self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)
        if state is not None:
            self.beat(state)

    def read_all(self) -> dict[int, dict]:
        """Every rank's last heartbeat (ranks that never wrote one are absent)."""
        out = {}
        for r in range(self.world_size):
            try:
                if self.store.check([_key(r)]):
                    out[r] = json.loads(self.store.get(_key(r)))
            except Exception:  # noqa: BLE001 - report what can be read
                break
        return out

    def claim_report(self) -> bool:
        """True for the first rank of this attempt to ask: it prints the job's message."""
        try:
            return self.store.add("report", 1) == 1
        except Exception:  # noqa: BLE001 - no store: better a message per failing rank than none
            return True


_heartbeat: Heartbeat | None = None  # this process's heartbeat (one per process, like the default group)


def start(store_factory: Callable[[], Any], rank: int, world_size: int, timeout_s: float,
          describe_op: Callable[[tuple], str]) -> None:
    global _heartbeat
    stop()
    _heartbeat = Heartbeat(store_factory, rank, world_size, timeout_s, describe_op)
    _heartbeat.start()


def stop(state: str | None = "exited") -> None:
    """Stop this process's heartbeat; state None writes no last record (see Heartbeat.stop)."""
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop(state)
        _heartbeat = None


# ----- the report -----------------------------------------------------------------------------------------
def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


_PROC_STATES = {"T": "stopped (SIGSTOP / SIGTSTP)", "t": "stopped by a debugger", "Z": "exited",
                "X": "exited", "D": "in uninterruptible sleep (I/O or driver)"}


def process_state(pid: int, host: str) -> str | None:
    """'stopped (SIGSTOP / SIGTSTP)', 'exited', ... for a process on this host; None when it runs
    normally or lives on another host (unknowable from here)."""
    if host != socket.gethostname():
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "exited"
    return _PROC_STATES.get(state)


def short_cause(text: str) -> str:
    """gloo's error without its source location and boilerplate advice."""
    text = " ".join(text.split())
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0]


def _rank_status(r: int, beat: dict | None, now: float, stale: float, op_text: str | None) -> tuple[str, str]:
    """(category, text) for one rank. Categories: gone, stopped, silent, waiting (blocked in op_text,
    heartbeat fresh), elsewhere (alive, somewhere else), unknown (no heartbeat)."""
    if beat is None:
        return "unknown", f"rank {r}: no heartbeat recorded"
    age = now - beat["t"]
    where = f"rank {r} (pid {beat['pid']} on {beat['host']})"
    last = f"last heartbeat {_seconds(age)} ago at {beat['where']}" + (f", in {beat['op']}" if beat.get("op") else "")
    if beat.get("state") != "running":
        return "gone", f"{where}: {beat.get('state')}; {last}"
    proc = process_state(beat["pid"], beat["host"])
    if proc == "exited":
        return "gone", f"{where}: the process has exited or was killed; {last}"
    if proc is not None:
        return "stopped", f"{where}: the process is {proc}; {last}"
    if age > stale:
        return "silent", f"{where}: no heartbeat for {_seconds(age)} (stopped, hung or dead); {last}"
    if op_text is not None and beat.get("op") == op_text:
        return "waiting", f"{where}: waiting in it too"
    if beat.get("op"):
        return "elsewhere", f"{where}: alive, at {beat['where']}, blocked in {beat['op']} for " \
                            f"{_seconds(beat.get('op_for') or 0.0)}"
    return "elsewhere", f"{where}: alive, at {beat['where']} (not in a collective)"


def format_report(err: CollectiveError, beats: dict[int, dict] | None, now: float | None = None,
                  stale: float | None = None) -> str:
    """The job's message: what failed, where this rank was, and which ranks did not arrive."""
    info = err.info
    now = time.time() if now is None else now
    if stale is None:
        interval = _heartbeat.interval if _heartbeat is not None else heartbeat_interval(info["timeout_s"] or 60)
        stale = stale_after(interval)
    timed_out = isinstance(err, CollectiveTimeout)
    if timed_out:
        limit = "the process-group timeout" if info["timeout_s"] is None else \
            f"{_seconds(info['timeout_s'])} (--distributed-timeout-minutes {info['timeout_s'] / 60:g})"
        head = f"error: collective timeout: {info['op_text']} did not complete within {limit}"
    else:
        head = f"error: communication failure: {info['op_text']} lost its peer: {info['cause']}"
    lines = [head, f"  rank {info['rank']} was at {info['where']}"]
    expected = [r for r in info["expected"] if r != info["rank"]]
    if beats is None:
        lines.append(f"  expected in it: rank {', '.join(map(str, expected))} (no heartbeats to say more: no "
                     f"store)")
    else:
        status = {r: _rank_status(r, beats.get(r), now, stale, info["op_text"]) for r in expected}
        waiting = [r for r in expected if status[r][0] == "waiting"]
        absent = [status[r][1] for r in expected if status[r][0] != "waiting"]
        if absent:
            lines.append("  did not arrive:" if timed_out else "  peers:")
            lines += [f"    {text}" for text in absent]
        elif timed_out:
            lines.append("  every other rank of the group was waiting in it too (a transport problem?)")
        if waiting:
            lines.append(f"  also waiting in it: rank{'s' if len(waiting) > 1 else ''} "
                         f"{', '.join(map(str, waiting))}")
        others = [text for r, b in sorted(beats.items()) if r not in info["expected"]
                  for category, text in [_rank_status(r, b, now, stale, None)]
                  if category in ("gone", "stopped", "silent")]
        if others:
            lines.append("  outside this group:")
            lines += [f"    {text}" for text in others]
    lines.append(f"  the failing ranks exit with code {err.exit_code} and torchrun ends the job; with --max-restarts N "
                 f"it restarts it, resuming from the latest checkpoint (--save DIR --load DIR); see docs/failures.md")
    return "\n".join(lines)


def exit_on_collective_error(err: CollectiveError) -> "NoReturn":  # noqa: F821
    """Print the job's one message if this rank is the first to fail, then leave at once with the
    error's exit code (no process-group teardown: it would wait for a stopped peer). Every failing
    rank hands its text to torchrun's error file (the failure summary's root cause)."""
    _flush()  # what this rank logged comes before the message
    hb = _heartbeat
    claimed = hb.claim_report() if hb is not None else True
    if claimed:
        message = format_report(err, hb.read_all() if hb is not None else None)
        print(message, file=sys.stderr, flush=True)
    else:
        message = f"error: {err.kind} on rank {err.info['rank']}: {err} (the job's message was printed by the " \
                  f"first rank to fail)"
    write_elastic_error_file(message)
    if hb is not None:
        hb.stop(state=f"failed ({err.kind}, exit code {err.exit_code})", join=False)
    _flush()
    os._exit(err.exit_code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not keep the process alive
            pass
