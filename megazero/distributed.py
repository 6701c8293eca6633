"""Process start-up and teardown: backend/device choice, default process group, rank-aware printing.

Launch contract: `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Without
them (plain `python pretrain_gpt.py`) this is a world of one, still with real (size-1) process groups
so that every code path is the distributed one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megazero import comm, watchdog
from megazero.errors import ConfigError, exit_with_error


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process, read before any process group exists."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> "LaunchEnv":
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def resolve_backend(requested: str | None) -> str:
    backend = requested or default_backend()
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--distributed-backend nccl needs CUDA, which is not available; use gloo (CPU)")
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"--distributed-backend must be nccl or gloo, got {backend!r}")
    return backend


def device_for(backend: str, local_rank: int) -> torch.device:
    """nccl -> this process's GPU; gloo -> CPU (gloo is the tested CPU path, not a toy)."""
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


STARTUP_TIMEOUT_MINUTES = 5.0  # least time group creation waits for every rank (start-up skew is no hang)


def init_process_group(env: LaunchEnv, backend: str, timeout_minutes: float = 10.0) -> None:
    """Create the default (world) group. A world of one uses an in-memory store: no ports, no env.

    `timeout_minutes` (--distributed-timeout-minutes) is every group's collective timeout; creating
    the groups waits at least STARTUP_TIMEOUT_MINUTES for all ranks. With more than one process a
    heartbeat thread records this rank's progress in the rendezvous store (watchdog.py), so a timeout
    can name the ranks that did not arrive (docs/failures.md)."""
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(minutes=timeout_minutes)
    startup = max(timeout, datetime.timedelta(minutes=STARTUP_TIMEOUT_MINUTES))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    namespace = f"megazero/attempt_{attempt}"
    comm.set_timeout(timeout, startup)
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        # nothing to wait for in a world of one: no watchdog
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps one TCPStore (its agent's) for every restart of the job, and torch adds no
        # per-attempt prefix: the groups of a restarted attempt would read the killed attempt's keys
        # (peer addresses) and fail to connect or hang. One namespace per attempt.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                              is_master=False, timeout=startup)
        dist.init_process_group(backend, store=dist.PrefixStore(namespace, store),
                                rank=env.rank, world_size=env.world_size, timeout=startup)
    else:  # MASTER_ADDR/PORT without torchrun's agent: rank 0 hosts the store
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=startup)
    comm.apply_timeout(dist.group.WORLD)
    timeout_s = timeout.total_seconds()
    # The heartbeat's own store client, with a short timeout: an unreachable store must not wedge the
    # heartbeat thread or the failure report.
    store_timeout = datetime.timedelta(seconds=min(30.0, max(2.0, timeout_s / 2)))

    def watchdog_store():
        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                               is_master=False, timeout=store_timeout, wait_for_workers=False)
        return dist.PrefixStore(f"{namespace}/watchdog", client)

    watchdog.start(watchdog_store, env.rank, env.world_size, timeout_s, comm.describe_op)


def teardown() -> None:
    """End of the run: stop the heartbeat and destroy the groups; nothing after a collective failed (a
    group whose peer is stopped cannot be destroyed without waiting for it, and the failure report
    reads the heartbeats: the entry point then leaves with os._exit, watchdog.exit_on_collective_error)."""
    if comm.failure() is not None:
        return  # the heartbeat stays for the failure report
    # The last "exited" record only where the store outlives the ranks (torchrun's agent hosts it).
    watchdog.stop("exited" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else None)
    if dist.is_initialized():
        dist.destroy_process_group()


class RankPrinter:
    """print() for one rank (by default global rank 0): messages appear once, not world_size times."""

    def __init__(self, rank: int, printing_rank: int = 0):
        self.enabled = rank == printing_rank

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)


def fail(message: str, rank: int, exit_code: int = 2) -> "NoReturn":  # noqa: F821
    """One-line user error: printed by rank 0 only, every rank exits with `exit_code`. Under torchrun
    every rank also writes it to its TORCHELASTIC_ERROR_FILE, so torchrun's failure summary names this
    line as the root cause instead of "To enable traceback see: ..." (errors.exit_with_error;
    docs/failures.md)."""
    watchdog.stop(None)  # ranks may wait before exiting (exit_with_error): no beats into a store rank 0 took down
    exit_with_error(f"error: {message}", rank, exit_code)
