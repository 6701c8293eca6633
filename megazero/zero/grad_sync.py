"""Gradient accumulation and data-parallel reduction over the flat layout (layout.py).

Each parameter gets a post-accumulate-grad hook. The trainer says how many microbatches the step has
(`start_step(m)`); a bucket's reduction starts as soon as its last gradient of the step (stages 0-1)
or of the microbatch (stages 2-3) has been accumulated, overlapping the rest of backward, and
`finish()` (called by the trainer, not poked from the schedule) waits for all of them.

| stage | gradient storage per rank              | reduction                                        |
|-------|-----------------------------------------|--------------------------------------------------|
| 0     | full fp32 buffer                        | all-reduce each bucket once per step             |
| 1     | full fp32 buffer                        | reduce-scatter each bucket once per step         |
| 2, 3  | fp32 shard (1/dp) + transient buckets   | reduce-scatter each bucket once per *microbatch* |

Stages 2 and 3 never hold a full gradient beyond the buckets being reduced, which is what makes them
lighter than stage 1, at a price with gradient accumulation: m reduce-scatters per step instead of
one (docs/architecture.md, "ZeRO"). fp32 parameters whose full buffer exists (stages 0-1) use the
buffer itself as `.grad`, so autograd accumulates in place; otherwise the hook adds `.grad` (any
dtype) into the gradient storage and drops it. Storage is fp32 unless grad_dtype says otherwise
(--grad-reduce-dtype model). Averaging over dp happens after the sum. Throughout zero/, "dp" is the
group of ranks holding replicas of the same parameters, which ZeroEngine passes in: data parallel x
context parallel (topology's dp_cp group; dp itself while cp = 1).

Listeners register explicitly: `register_bucket_done_hook(fn)` (fn(bucket) once a microbatch's
gradients of a bucket are all in: ZeRO-3 releases the unit) and `register_bucket_reduced_hook(fn)`
(fn(bucket) once its reduced gradient for the step is final: CPU offload copies it to the host).
"""

from __future__ import annotations

import torch

from collections.abc import Callable

from megazero import comm
from megazero.tensor_parallel.sharding import get_shard_spec
from megazero.zero.layout import Bucket, BufferLayout, Fragment
from megazero.zero.stage import ZeroStage


class GradSync:
    def __init__(self, layout: BufferLayout, stage: ZeroStage, dp_group, dp_rank: int, device: torch.device,
                 overlap: bool = True, embedding_group=None, grad_dtype: torch.dtype = torch.float32):
        self.layout, self.stage, self.dp_group, self.dp_rank = layout, stage, dp_group, dp_rank
        self.dp = comm.group_size(dp_group)
        self.overlap, self.embedding_group = overlap, embedding_group
        self.full = stage.full_grad_buffer
        self.dtype, self.device = grad_dtype, device
        self.params = [p for b in layout.buckets for p in b.params]
        if self.full:
            self.buffer = torch.zeros(layout.numel, dtype=grad_dtype, device=device)
            self._in_place = {id(p) for p in self.params if p.dtype == grad_dtype}
            for p in self.params:
                if id(p) in self._in_place:
                    p.grad = self._view(p)
            self._view_ptrs = [(p, p.grad.data_ptr()) for p in self.params if id(p) in self._in_place]
        else:
            self.shards = {b.index: torch.zeros(b.numel // self.dp, dtype=grad_dtype, device=device)
                           for b in layout.buckets}
            self._staging: dict[int, torch.Tensor] = {}
            self._spare: dict[int, list[torch.Tensor]] = {}  # recycled staging buffers by size
        self._count = [0] * len(layout.buckets)
        self._launched = [False] * len(layout.buckets)
        # (bucket, collective handle, reduce-scatter output, input kept alive until the handle completes)
        self._pending: list[tuple[Bucket, object, torch.Tensor | None, torch.Tensor | None]] = []
        self.num_microbatches = 1
        self._bucket_done_hooks: list[Callable[[int], None]] = []
        self._bucket_reduced_hooks: list[Callable[[int], None]] = []
        self._reductions = [0] * len(layout.buckets)
        self._reported: set[int] = set()  # buckets handed to the bucket-reduced hooks this step
        self._tied = {b.index for b in layout.buckets if any(get_shard_spec(p).own_bucket for p in b.params)}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def register_bucket_done_hook(self, fn: Callable[[int], None]) -> None:
        """fn(bucket) each time every gradient of that bucket for the current microbatch is in."""
        self._bucket_done_hooks.append(fn)

    def register_bucket_reduced_hook(self, fn: Callable[[int], None]) -> None:
        """fn(bucket) once per step, when the bucket's reduced gradient (this rank's region) is final."""
        self._bucket_reduced_hooks.append(fn)

    def _view(self, p: torch.Tensor) -> torch.Tensor:
        lo, hi = self.layout.range_of[id(p)]
        return self.buffer[lo:hi].view_as(p)

    # ----- per step ---------------------------------------------------------------------------------
    def start_step(self, num_microbatches: int) -> None:
        assert not self._pending, "finish() the previous step first"
        self.num_microbatches = num_microbatches
        self._count = [0] * len(self.layout.buckets)
        self._launched = [False] * len(self.layout.buckets)
        self._reductions = [0] * len(self.layout.buckets)
        self._reported.clear()
        if self.full:
            self.buffer.zero_()
            for p, ptr in self._view_ptrs:  # a view must stay a view (nothing may replace or drop it)
                assert p.grad is not None and p.grad.data_ptr() == ptr, \
                    "a parameter's .grad no longer views the gradient buffer"
        else:
            for t in self.shards.values():
                t.zero_()

    def _on_grad(self, p: torch.Tensor) -> None:
        b = self.layout.buckets[self.layout.bucket_of[id(p)]]
        if self.full:
            if id(p) not in self._in_place:
                self._view(p).add_(p.grad)
                p.grad = None
        else:
            staging = self._staging.get(b.index)
            if staging is None:
                self._reclaim(b.index)  # this bucket's previous microbatch must be reduced first
                staging = self._staging[b.index] = self._fresh_staging(b.numel)
            lo, hi = self.layout.range_of[id(p)]
            staging[lo - b.start:hi - b.start].add_(p.grad.reshape(-1))
            p.grad = None
        self._count[b.index] += 1
        if self._bucket_done_hooks and self._count[b.index] % len(b.params) == 0:
            for fn in self._bucket_done_hooks:
                fn(b.index)
        per_launch = len(b.params) * (self.num_microbatches if self.full else 1)
        if self.overlap and self._count[b.index] % per_launch == 0:
            self._launch(b)

    def _fresh_staging(self, numel: int) -> torch.Tensor:
        spare = self._spare.get(numel)
        if spare:
            return spare.pop().zero_()
        return torch.zeros(numel, dtype=self.dtype, device=self.device)

    def _complete(self, entry) -> None:
        """Wait for one pending reduction and fold its result into the gradient storage."""
        b, work, out, staging = entry
        if work is not None:
            work.wait()
        lo, hi = b.shard(self.dp_rank, self.dp)
        if self.stage.owns_whole_buffer:
            if self.dp > 1:  # (dividing by 1 would still pass over every gradient element)
                self.buffer[b.start:b.end].div_(self.dp)
        elif self.full:
            self.buffer[lo:hi].copy_(out).div_(self.dp)
        else:
            self.shards[b.index].add_(out, alpha=1.0 / self.dp)
            self._spare.setdefault(staging.numel(), []).append(staging)
        self._reductions[b.index] += 1
        if (self.full or self._reductions[b.index] == self.num_microbatches) and b.index not in self._tied:
            self._report(b.index)  # tied buckets: after the cross-stage sum in finish()

    def _reclaim(self, bucket: int | None = None) -> None:
        """Complete finished reductions (and, for `bucket`, its unfinished one) so staging buffers are
        recycled: at stages 2-3 only the buckets actually in flight hold full-size gradients."""
        keep = []
        for entry in self._pending:
            work = entry[1]
            if entry[0].index == bucket or work is None or work.is_completed():
                self._complete(entry)
            else:
                keep.append(entry)
        self._pending = keep

    def _launch(self, b: Bucket) -> None:
        if self.full:
            if self._launched[b.index]:
                return
            self._launched[b.index] = True
            region = self.buffer[b.start:b.end]
            if self.stage.owns_whole_buffer:
                self._pending.append((b, comm.all_reduce_async(region, self.dp_group), None, None))
            else:
                out = torch.empty(b.numel // self.dp, dtype=region.dtype, device=region.device)
                self._pending.append((b, comm.reduce_scatter_async(out, region, self.dp_group), out, None))
        else:
            staging = self._staging.pop(b.index)  # released once its reduce-scatter completes
            out = torch.empty(b.numel // self.dp, dtype=staging.dtype, device=staging.device)
            self._pending.append((b, comm.reduce_scatter_async(out, staging, self.dp_group), out, staging))

    def finish(self) -> None:
        """Launch what has not been launched (overlap off, or unused parameters), wait for every
        reduction, average over dp, then sum tied-embedding gradient shards across pipeline stages."""
        for b in self.layout.buckets:
            if (not self._launched[b.index]) if self.full else b.index in self._staging:
                self._launch(b)
        for entry in self._pending:
            self._complete(entry)
        self._pending.clear()
        if not self.full:
            self._spare.clear()  # recycle within a step only: between steps stages 2-3 hold shards alone
        if self.embedding_group is not None:
            for b in self.layout.buckets:
                if b.index in self._tied:
                    comm.all_reduce_(self.owned_bucket_grad(b), self.embedding_group)
        for b in self.layout.buckets:  # tied buckets, and any whose reductions did not run per microbatch
            self._report(b.index)

    def _report(self, bucket: int) -> None:
        if self._bucket_reduced_hooks and bucket not in self._reported:
            self._reported.add(bucket)
            for fn in self._bucket_reduced_hooks:
                fn(bucket)

    # ----- what the optimizer reads ----------------------------------------------------------------
    def owned_bucket_grad(self, b: Bucket) -> torch.Tensor:
        """This rank's reduced gradient region of bucket b (whole bucket at stage 0, else its shard)."""
        if self.stage.owns_whole_buffer:
            return self.buffer[b.start:b.end]
        if self.full:
            lo, hi = b.shard(self.dp_rank, self.dp)
            return self.buffer[lo:hi]
        return self.shards[b.index]

    def fragment_grad(self, f: Fragment) -> torch.Tensor:
        b = self.layout.buckets[f.bucket]
        region_start = b.start if self.stage.owns_whole_buffer else b.shard(self.dp_rank, self.dp)[0]
        return self.owned_bucket_grad(b)[f.buffer_lo - region_start:f.buffer_hi - region_start]

    def nbytes(self) -> int:
        if self.full:
            return self.buffer.numel() * self.buffer.element_size()
        return sum(t.numel() * t.element_size() for t in self.shards.values())

