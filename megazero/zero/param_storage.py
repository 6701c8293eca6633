"""Where parameter values live at each ZeRO stage.

| stage | per rank                                   | after the optimizer step                      |
|-------|--------------------------------------------|-----------------------------------------------|
| 0     | the parameters' own tensors                | nothing to do: every rank updated everything  |
| 1, 2  | one flat buffer in layout order (params    | each rank's updated shard is all-gathered      |
|       | are views into it)                         | into the buffer, bucket by bucket, async;      |
|       |                                            | waited for before the next forward            |
| 3     | only this rank's shard of each bucket      | nothing: parameters are gathered per unit      |
|       | (unit); `gather` materialises a unit's     | (transformer block) just before use and        |
|       | full parameters, `release` frees them      | released after (stage3.py)                     |

Parameter offload (stage 3, `offload=True`): the shards live in host memory (pinned with CUDA) and
`gather` copies a unit's shard to the device just before all-gathering it; with optimizer offload the
CPU Adam writes the updated values straight into those host shards.
"""

from __future__ import annotations

import torch

from megazero import comm
from megazero.tensor_parallel.sharding import get_shard_spec, set_shard_spec
from megazero.zero.layout import BufferLayout, Fragment
from megazero.zero.stage import ZeroStage


class ParamStorage:
    def __init__(self, layout: BufferLayout, stage: ZeroStage, dp_group, dp_rank: int, offload: bool = False):
        assert not offload or stage.shards_parameters, "parameter offload is a stage-3 feature"
        self.layout, self.stage, self.dp_group, self.dp_rank = layout, stage, dp_group, dp_rank
        self.dp = comm.group_size(dp_group)
        params = [p for b in layout.buckets for p in b.params]
        self.dtype = params[0].dtype if params else torch.float32
        device = params[0].device if params else torch.device("cpu")
        self.device = device
        assert all(p.dtype == self.dtype for p in params), "one parameter dtype per model"
        self.offload = offload
        self._gathers: list = []  # stage 1/2: (handle, shard copy kept alive)
        self._inflight: dict[int, tuple] = {}  # stage 3: bucket -> (handle, full buffer, input shard)
        self.gathered: set[int] = set()
        if stage.flat_param_buffer:
            self.buffer = torch.zeros(layout.numel, dtype=self.dtype, device=device)
            for p in params:
                view = self._view(p)
                view.copy_(p.data)
                p.data = view
        elif stage.shards_parameters:
            self.shapes = {id(p): p.shape for p in params}
            for p in params:  # the global shape must outlive the storage swap (checkpoints, norms read it)
                set_shard_spec(p, get_shard_spec(p))
            self.shards: dict[int, torch.Tensor] = {}
            for b in layout.buckets:
                full = torch.zeros(b.numel, dtype=self.dtype, device=device)
                for p in b.params:
                    lo, hi = layout.range_of[id(p)]
                    full[lo - b.start:hi - b.start].copy_(p.data.reshape(-1))
                lo, hi = b.shard(dp_rank, self.dp)
                shard = full[lo - b.start:hi - b.start]
                self.shards[b.index] = shard.to("cpu", copy=True).pin_memory() if offload and device.type == "cuda" \
                    else shard.to("cpu", copy=True) if offload else shard.clone()
                self.gathered.add(b.index)
                self.release(b.index)

    def _view(self, p: torch.Tensor) -> torch.Tensor:
        lo, hi = self.layout.range_of[id(p)]
        return self.buffer[lo:hi].view_as(p)

    def owned_values(self, f: Fragment) -> torch.Tensor:
        """The current values of a fragment this rank owns (a view: writing it updates storage)."""
        if self.stage.flat_param_buffer:
            return self.buffer[f.buffer_lo:f.buffer_hi]
        if not self.stage.shards_parameters:  # stage 0: the parameters' own tensors
            return f.param.data.view(-1)[f.param_lo:f.param_hi]
        b = self.layout.buckets[f.bucket]
        shard_start = b.shard(self.dp_rank, self.dp)[0]
        return self.shards[b.index][f.buffer_lo - shard_start:f.buffer_hi - shard_start]

    # ----- stages 1 and 2 -------------------------------------------------------------------------
    def after_step(self) -> None:
        """Stages 1/2: start gathering every rank's updated shard into the full buffer."""
        if not self.stage.flat_param_buffer:
            return
        for b in self.layout.buckets:
            lo, hi = b.shard(self.dp_rank, self.dp)
            shard = self.buffer[lo:hi].clone()
            self._gathers.append((comm.all_gather_async(self.buffer[b.start:b.end], shard, self.dp_group), shard))

    def wait_gathers(self) -> None:
        for handle, _ in self._gathers:
            if handle is not None:
                handle.wait()
        self._gathers.clear()

    # ----- stage 3 ------------------------------------------------------------------------------------
    def gather(self, bucket: int, wait: bool = True) -> None:
        """Materialise the full parameters of `bucket` (async when wait=False: `gather` again to wait)."""
        if bucket in self.gathered:
            return
        if bucket not in self._inflight:
            b = self.layout.buckets[bucket]
            full = torch.empty(b.numel, dtype=self.dtype, device=self.device)
            shard = self.shards[bucket].to(self.device, non_blocking=True)  # host -> device when offloaded
            self._inflight[bucket] = (comm.all_gather_async(full, shard, self.dp_group), full, shard)
        if not wait:
            return
        handle, full, _ = self._inflight.pop(bucket)
        if handle is not None:
            handle.wait()
        b = self.layout.buckets[bucket]
        for p in b.params:
            lo, hi = self.layout.range_of[id(p)]
            p.data = full[lo - b.start:hi - b.start].view(self.shapes[id(p)])
        self.gathered.add(bucket)

    def release(self, bucket: int) -> None:
        if bucket not in self.gathered:
            return
        for p in self.layout.buckets[bucket].params:
            p.data = torch.empty(0, dtype=self.dtype, device=p.device)
        self.gathered.discard(bucket)

    def release_all(self) -> None:
        """End of step / evaluation: free every gathered unit and drop prefetches still in flight
        (their values would be stale after the optimizer step)."""
        if not self.stage.shards_parameters:
            return
        for handle, _, _ in self._inflight.values():
            if handle is not None:
                handle.wait()
        self._inflight.clear()
        for bucket in list(self.gathered):
            self.release(bucket)

    def nbytes(self) -> int:
        """Bytes of parameter storage this rank holds between steps on its device."""
        if self.offload and self.device.type != "cpu":
            return 0
        if self.stage.flat_param_buffer:
            return self.buffer.numel() * self.buffer.element_size()
        if self.stage.shards_parameters:
            return sum(t.numel() * t.element_size() for t in self.shards.values())
        return sum(p.numel() * p.element_size() for b in self.layout.buckets for p in b.params)
