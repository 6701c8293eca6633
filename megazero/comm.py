"""The one module that calls torch.distributed collectives.

Every collective in megazero goes through these functions so that (a) torch renames touch one file,
(b) every call names its process group explicitly (there is no `group=None` fallback to the world:
DESIGN.md principle 1), and (c) size-1 groups cost nothing.

Backend notes: gloo on CPU supports all_reduce, reduce_scatter_tensor, all_gather_into_tensor
(concatenating along dim 0 only), all_to_all_single and batch_isend_irecv; callers that gather along
another dim move that dim to the front first (see tensor_parallel/collectives.py).

Failures (docs/failures.md). `set_timeout` (distributed.init_process_group, from
--distributed-timeout-minutes) gives every group the run's timeout; gloo then raises a RuntimeError
from a blocking collective or from an async handle's wait() when a peer does not arrive in time, and
a "connection closed" one when a peer exits. Each becomes a CollectiveTimeout / CollectiveError that
says what was running: the operation, the group (kind and global ranks), the iteration and pipeline
action (watchdog.context), this rank, and which ranks were expected. Async calls return a `Handle`
whose wait() does the same. After the first failure every further call on this rank raises that
error at once (cleanup code must not wait a second timeout on a dead group). Per call the cost is
a clock read and two attribute stores (watchdog.context.op: what a heartbeat reports this rank is
blocked in); no collective is added.
"""

from __future__ import annotations

import datetime
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from megazero.errors import CollectiveError, CollectiveTimeout
from megazero.watchdog import context, short_cause

ProcessGroup = dist.ProcessGroup

# torch 2.13 renamed the flat-tensor collectives (*_into_tensor / *_tensor -> *_single) and deprecated
# the old names; pick whichever this torch has.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class TrafficMeter:
    """Bytes this rank sends per collective kind and group (--log-comm), by the ring algorithms'
    per-rank volume: all-reduce 2(n-1)/n x size, reduce-scatter and all-gather (n-1)/n x the full
    size, p2p the message size. Off unless enabled; the trainer resets it every step.

    This is the one piece of module-level state in megazero: an instrumentation counter, like a
    logger, never read by training logic."""

    def __init__(self) -> None:
        self.enabled = False
        self.bytes: dict[tuple[str, str], float] = defaultdict(float)
        self._names: dict[int, str] = {}

    def name_group(self, group: ProcessGroup, name: str) -> None:
        self._names[id(group)] = name

    def add(self, kind: str, group: ProcessGroup | None, nbytes: float) -> None:
        if self.enabled:
            self.bytes[(kind, self._names.get(id(group), "other"))] += nbytes

    def reset(self) -> dict[tuple[str, str], float]:
        snapshot, self.bytes = dict(self.bytes), defaultdict(float)
        return snapshot


traffic = TrafficMeter()


# ----- timeouts and failures ------------------------------------------------------------------------------
_timeout: datetime.timedelta | None = None  # the run's collective timeout; None: torch's defaults
_startup_timeout: datetime.timedelta | None = None  # for creating groups (all ranks must arrive)
_failure: CollectiveError | None = None  # the first failure on this rank; every later call re-raises it

# gloo's texts: "Timed out waiting 6000ms for recv operation to complete", "Connection closed by peer
# [127.0.0.1]:40123", "Connection reset by peer", "Broken pipe" (a peer exited or was killed).
_TIMEOUT_TEXT = ("timed out", "timeout")
_PEER_LOST_TEXT = ("connection closed", "connection reset", "broken pipe", "connection refused", "pair closure",
                   "socket closed", "econnreset", "epipe")


def set_timeout(timeout: datetime.timedelta | None, startup: datetime.timedelta | None = None) -> None:
    """The run's collective timeout (None: torch's defaults). Groups are created with `startup` (all
    ranks must reach the creation; start-up skew is not a hang), then switched to `timeout`."""
    global _timeout, _startup_timeout, _failure
    _timeout, _startup_timeout, _failure = timeout, startup or timeout, None


def timeout_seconds() -> float | None:
    return None if _timeout is None else _timeout.total_seconds()


def apply_timeout(group: ProcessGroup) -> None:
    """Give an existing group (the world) the run's timeout for its collectives."""
    if _timeout is None or group is None or group is dist.GroupMember.NON_GROUP_MEMBER:
        return
    set_pg_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_pg_timeout is not None:
        set_pg_timeout(_timeout, group)


def failure() -> CollectiveError | None:
    """The first collective failure on this rank, if any (distributed.teardown skips the group teardown)."""
    return _failure


def group_name(group: ProcessGroup | None) -> str:
    if group is None or group is dist.group.WORLD:
        return "world"
    return traffic._names.get(id(group), "unnamed")


def group_ranks(group: ProcessGroup | None) -> list[int]:
    try:
        return list(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    except Exception:  # noqa: BLE001 - for a message only
        return []


def describe_op(op: tuple) -> str:
    """'all_reduce on the tp group (ranks 0, 1)' / 'p2p recv from rank 0 on the pp group (ranks 0, 1)'."""
    kind, group, peer = op
    name, ranks = group_name(group), group_ranks(group)
    where = f"the {name} group (ranks {', '.join(map(str, ranks))})" if ranks else f"the {name} group"
    if peer is None:
        return f"{kind} on {where}"
    return f"p2p {kind} {'to' if kind == 'send' else 'from'} rank {peer} on {where}"


def _enter(kind: str, group, peer: int | None = None) -> None:
    if _failure is not None:
        raise _failure
    context.op, context.op_since = (kind, group, peer), time.time()


def _fail(kind: str, group, err: RuntimeError, peer: int | None = None) -> "NoReturn":  # noqa: F821
    """Re-raise a torch error from a collective as CollectiveTimeout / CollectiveError with the context;
    anything else (a programming error) unchanged."""
    global _failure
    text = str(err).lower()
    if any(t in text for t in _TIMEOUT_TEXT):
        cls = CollectiveTimeout
    elif any(t in text for t in _PEER_LOST_TEXT):
        cls = CollectiveError
    else:
        raise err
    op_text = describe_op((kind, group, peer))
    me = dist.get_rank() if dist.is_initialized() else 0
    info = {"op": kind, "group": group_name(group), "ranks": group_ranks(group), "peer": peer, "op_text": op_text,
            "iteration": context.iteration, "where": context.where(), "rank": me,
            "expected": [peer] if peer is not None else group_ranks(group), "timeout_s": timeout_seconds(),
            "cause": short_cause(str(err))}
    what = "did not complete within the timeout" if cls is CollectiveTimeout else "lost its peer"
    _failure = cls(f"{op_text} {what} (rank {me}, at {info['where']}): {info['cause']}", info)
    raise _failure from err


def _blocking(kind: str, group, call):
    """Run a blocking collective: what a heartbeat reports while it waits (_enter), a torch error as
    CollectiveTimeout / CollectiveError with the context (_fail)."""
    _enter(kind, group)
    try:
        return call()
    except RuntimeError as err:
        _fail(kind, group, err)
    finally:
        context.op = None


class Handle:
    """An async collective or p2p transfer in flight: wait() (raises CollectiveTimeout /
    CollectiveError with the context) and is_completed()."""

    __slots__ = ("work", "kind", "group", "peer")

    def __init__(self, work, kind: str, group, peer: int | None = None):
        self.work, self.kind, self.group, self.peer = work, kind, group, peer

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self) -> None:
        _enter(self.kind, self.group, self.peer)
        try:
            if self.peer is not None and _timeout is not None:
                self.work.wait(timeout=_timeout)  # gloo p2p waits the group's creation timeout otherwise
            else:
                self.work.wait()
        except RuntimeError as err:
            _fail(self.kind, self.group, err, self.peer)
        finally:
            context.op = None


def _ring(group: ProcessGroup, factor: float, nbytes: int) -> float:
    n = group_size(group)
    return factor * (n - 1) / n * nbytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def group_size(group: ProcessGroup) -> int:
    assert group is not None, "every collective names its group (no fallback to the world)"
    return dist.get_world_size(group=group)


def group_rank(group: ProcessGroup) -> int:
    return dist.get_rank(group=group)


def all_reduce_(tensor: torch.Tensor, group: ProcessGroup, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum / max / min / avg-as-sum-then-divide) over `group`."""
    if group_size(group) == 1:
        return tensor
    traffic.add("all_reduce", group, _ring(group, 2, _nbytes(tensor)))
    reduce_op = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                 "min": dist.ReduceOp.MIN}[op]
    _blocking("all_reduce", group, lambda: dist.all_reduce(tensor, op=reduce_op, group=group))
    return tensor.div_(group_size(group)) if op == "avg" else tensor


def all_gather_dim0(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0: [n, ...] -> [n * world, ...] (rank order)."""
    world = group_size(group)
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    out = torch.empty((tensor.shape[0] * world, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    traffic.add("all_gather", group, _ring(group, 1, _nbytes(out)))
    _blocking("all_gather", group, lambda: _all_gather_flat(out, tensor, group=group))
    return out


def all_to_all_single(out: torch.Tensor, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Equal-split all-to-all along dim 0 (rank order): piece t of `tensor` goes to group rank t, piece t
    of `out` (same shape) came from rank t. Counted like the ring collectives: (n-1)/n of the tensor
    leaves this rank (its own piece stays)."""
    if group_size(group) == 1:
        return out.copy_(tensor)
    tensor = tensor.contiguous()
    traffic.add("all_to_all", group, _ring(group, 1, _nbytes(tensor)))
    _blocking("all_to_all", group, lambda: dist.all_to_all_single(out, tensor, group=group))
    return out


def _start(kind: str, group, launch) -> Handle:
    """Launch an async collective (gloo queues it; a failure shows at wait())."""
    if _failure is not None:
        raise _failure
    try:
        return Handle(launch(), kind, group)
    except RuntimeError as err:
        _fail(kind, group, err)


def all_reduce_async(tensor: torch.Tensor, group: ProcessGroup):
    """Start an in-place sum all-reduce; returns a handle with .wait() (None for a size-1 group)."""
    if group_size(group) == 1:
        return None
    traffic.add("all_reduce", group, _ring(group, 2, _nbytes(tensor)))
    return _start("all_reduce", group, lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group,
                                                                async_op=True))


def reduce_scatter_async(out: torch.Tensor, tensor: torch.Tensor, group: ProcessGroup):
    """Start a sum reduce-scatter of `tensor` (dim 0 split in rank order) into `out`; returns a handle
    (None for a size-1 group, where `out` is filled at once)."""
    if group_size(group) == 1:
        out.copy_(tensor)
        return None
    traffic.add("reduce_scatter", group, _ring(group, 1, _nbytes(tensor)))
    tensor = tensor.contiguous()
    return _start("reduce_scatter", group, lambda: _reduce_scatter_flat(out, tensor, op=dist.ReduceOp.SUM,
                                                                        group=group, async_op=True))


def all_gather_async(out: torch.Tensor, tensor: torch.Tensor, group: ProcessGroup):
    """Start gathering every rank's `tensor` into `out` (dim 0, rank order); handle or None."""
    if group_size(group) == 1:
        out.copy_(tensor)
        return None
    traffic.add("all_gather", group, _ring(group, 1, _nbytes(out)))
    tensor = tensor.contiguous()
    return _start("all_gather", group, lambda: _all_gather_flat(out, tensor, group=group, async_op=True))


def new_group(ranks: list[int], backend: str | None = None) -> ProcessGroup:
    """Create a process group; must be called by every rank of the world, for every group, in order.
    With set_timeout: created with the start-up timeout, then given the run's (torch's new_group does
    not inherit the default group's timeout)."""
    if _timeout is None:
        return dist.new_group(ranks=ranks, backend=backend)
    group = _blocking("new_group", None, lambda: dist.new_group(ranks=ranks, backend=backend,
                                                                 timeout=_startup_timeout))
    apply_timeout(group)
    return group


def all_gather_object(obj, group: ProcessGroup) -> list:
    """Every rank's picklable `obj`, in group-rank order (small metadata only: it pickles)."""
    out = [None] * group_size(group)
    _blocking("all_gather_object", group, lambda: dist.all_gather_object(out, obj, group=group))
    return out


def batch_isend_irecv(ops: list[dist.P2POp]) -> list[Handle]:
    """Post p2p sends and receives together; a Handle per op, in order (P2POp peers are global ranks)."""
    if not ops:
        return []
    for op in ops:
        if op.op is dist.isend:
            traffic.add("p2p_send", op.group, _nbytes(op.tensor))
    kinds = ["send" if op.op is dist.isend else "recv" for op in ops]
    if _failure is not None:
        raise _failure
    try:
        works = dist.batch_isend_irecv(ops)
    except RuntimeError as err:
        _fail(kinds[0], ops[0].group, err, ops[0].peer)
    return [Handle(w, k, op.group, op.peer) for w, k, op in zip(works, kinds, ops)]
