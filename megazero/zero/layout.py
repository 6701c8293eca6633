"""Where every parameter lives in the flat ZeRO buffers (pure: no tensors allocated, no processes).

Parameters are laid out in reverse order (roughly the order backward produces their gradients) in
*buckets*; each bucket is padded to a multiple of the data-parallel size so it splits into dp equal
contiguous shards: DP rank r owns elements [start + r * shard, start + (r + 1) * shard) of every
bucket. Shards are what ZeRO stages 1-3 keep per rank (optimizer state, then gradients, then
parameters); `fragments_of_rank` lists, per owned shard, the pieces of each parameter it contains.

Bucket rules:
- a bucket closes once it holds >= bucket_size elements (stages 0-2), or per *unit* (stage 3: the
  caller passes explicit groups, one per transformer block etc., so a unit is gathered as one);
- the tied word embedding always gets a bucket of its own, so on the first and last pipeline stage it
  has the same shard boundaries and its gradient shards can be summed across stages directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megazero.tensor_parallel.sharding import get_shard_spec


@dataclass
class Bucket:
    index: int
    start: int  # buffer offset of the first element
    end: int  # padded end: (end - start) % dp == 0
    params: list[torch.nn.Parameter] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard(self, dp_rank: int, dp: int) -> tuple[int, int]:
        size = self.numel // dp
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size


@dataclass(frozen=True)
class Fragment:
    """The part [param_lo, param_hi) of a parameter's flattened elements that lies in an owned range;
    it sits at [buffer_lo, buffer_hi) in the flat buffers."""

    param: torch.nn.Parameter
    bucket: int
    param_lo: int
    param_hi: int
    buffer_lo: int
    buffer_hi: int

    @property
    def numel(self) -> int:
        return self.param_hi - self.param_lo


class BufferLayout:
    def __init__(self, groups: list[list[torch.nn.Parameter]], dp: int, bucket_size: int | None):
        """groups: parameter groups in forward order; a group never shares a bucket with another when
        bucket_size is None (stage 3 units), else consecutive groups are packed up to bucket_size.
        A group holding a parameter whose ShardSpec says `own_bucket` (the word embedding shared across
        pipeline stages) is always alone."""
        self.dp = dp
        self.buckets: list[Bucket] = []
        self.range_of: dict[int, tuple[int, int]] = {}  # id(param) -> (lo, hi) in the buffer
        self.bucket_of: dict[int, int] = {}
        offset = 0
        current: Bucket | None = None

        def close() -> None:
            nonlocal current, offset
            if current is not None and current.params:
                pad = (-(offset - current.start)) % dp
                offset += pad
                current.end = offset
                self.buckets.append(current)
            current = None

        for group in reversed(groups):
            alone = bucket_size is None or any(get_shard_spec(p).own_bucket for p in group)
            if alone:
                close()
            for p in reversed(group):
                if current is None:
                    current = Bucket(len(self.buckets), offset, offset)
                self.range_of[id(p)] = (offset, offset + p.numel())
                self.bucket_of[id(p)] = current.index
                current.params.append(p)
                offset += p.numel()
                if bucket_size is not None and not alone and offset - current.start >= bucket_size:
                    close()
            if alone:
                close()
        close()
        self.numel = offset

    def fragments_of_rank(self, dp_rank: int, whole: bool = False) -> list[Fragment]:
        """Pieces of parameters in this rank's shard of every bucket (or in the whole buffer)."""
        out = []
        for b in self.buckets:
            lo, hi = (b.start, b.end) if whole else b.shard(dp_rank, self.dp)
            for p in b.params:
                p_lo, p_hi = self.range_of[id(p)]
                a, z = max(lo, p_lo), min(hi, p_hi)
                if a < z:
                    out.append(Fragment(p, b.index, a - p_lo, z - p_lo, a, z))
        return out
