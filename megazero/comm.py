"""The one module that calls torch.distributed collectives.

Every collective in megazero goes through these functions so that (a) torch renames touch one file,
(b) every call names its process group explicitly (there is no `group=None` fallback to the world:
DESIGN.md principle 1), and (c) size-1 groups cost nothing.

Backend notes: gloo on CPU supports all_reduce, reduce_scatter_tensor, all_gather_into_tensor
(concatenating along dim 0 only) and batch_isend_irecv; callers that gather along another dim move
that dim to the front first (see tensor_parallel/collectives.py).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

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
    if op == "avg":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor.div_(group_size(group))
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(tensor, op=reduce_op, group=group)
    return tensor


def all_gather_dim0(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0: [n, ...] -> [n * world, ...] (rank order)."""
    world = group_size(group)
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    out = torch.empty((tensor.shape[0] * world, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    traffic.add("all_gather", group, _ring(group, 1, _nbytes(out)))
    _all_gather_flat(out, tensor, group=group)
    return out


def all_reduce_async(tensor: torch.Tensor, group: ProcessGroup):
    """Start an in-place sum all-reduce; returns a handle with .wait() (None for a size-1 group)."""
    if group_size(group) == 1:
        return None
    traffic.add("all_reduce", group, _ring(group, 2, _nbytes(tensor)))
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)


def reduce_scatter_async(out: torch.Tensor, tensor: torch.Tensor, group: ProcessGroup):
    """Start a sum reduce-scatter of `tensor` (dim 0 split in rank order) into `out`; returns a handle
    (None for a size-1 group, where `out` is filled at once)."""
    if group_size(group) == 1:
        out.copy_(tensor)
        return None
    traffic.add("reduce_scatter", group, _ring(group, 1, _nbytes(tensor)))
    return _reduce_scatter_flat(out, tensor.contiguous(), op=dist.ReduceOp.SUM, group=group, async_op=True)


def all_gather_async(out: torch.Tensor, tensor: torch.Tensor, group: ProcessGroup):
    """Start gathering every rank's `tensor` into `out` (dim 0, rank order); handle or None."""
    if group_size(group) == 1:
        out.copy_(tensor)
        return None
    traffic.add("all_gather", group, _ring(group, 1, _nbytes(out)))
    return _all_gather_flat(out, tensor.contiguous(), group=group, async_op=True)


def new_group(ranks: list[int], backend: str | None = None) -> ProcessGroup:
    """Create a process group; must be called by every rank of the world, for every group, in order."""
    return dist.new_group(ranks=ranks, backend=backend)


def all_gather_object(obj, group: ProcessGroup) -> list:
    """Every rank's picklable `obj`, in group-rank order (small metadata only: it pickles)."""
    out = [None] * group_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def batch_isend_irecv(ops: list[dist.P2POp]) -> list:
    for op in ops:
        if op.op is dist.isend:
            traffic.add("p2p_send", op.group, _nbytes(op.tensor))
    return dist.batch_isend_irecv(ops) if ops else []
