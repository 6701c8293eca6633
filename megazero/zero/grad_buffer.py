"""Contiguous gradient buffer and bucketed data-parallel reduction (ZeRO stage 0).

Every parameter's `.grad` is a view into one flat fp32 buffer, laid out in reverse parameter order
(roughly the order backward produces gradients), so autograd accumulates microbatch gradients in
place and the DP reduction is a few large collectives over contiguous buckets instead of one per
parameter. `param_range(p)` gives the explicit parameter <-> buffer mapping that ZeRO stages 1-3
(which reduce-scatter buckets and shard the optimizer over this mapping) build on.

Overlap of bucket reduction with the backward pass arrives with the ZeRO issue; today the trainer
calls `reduce_gradients()` once after the last microbatch's backward.
"""

from __future__ import annotations

import torch

from megazero import comm


class GradBuffer:
    def __init__(self, params: list[torch.nn.Parameter], dp_group, bucket_size: int = 25_000_000,
                 dtype: torch.dtype = torch.float32):
        self.dp_group = dp_group
        self.params = [p for p in params if p.requires_grad]
        total = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.buffer = torch.zeros(total, dtype=dtype, device=device)
        self._ranges: dict[int, tuple[int, int]] = {}
        offset = 0
        for p in reversed(self.params):
            n = p.numel()
            self._ranges[id(p)] = (offset, offset + n)
            assert p.dtype == dtype, "mixed-precision gradient buffers arrive with the ZeRO issue"
            p.grad = self.buffer[offset:offset + n].view_as(p)
            offset += n
        # Buckets: contiguous ranges of at most bucket_size elements, cut on parameter boundaries
        # (a parameter larger than bucket_size gets a bucket of its own).
        self.buckets: list[tuple[int, int]] = []
        start = 0
        for p in reversed(self.params):
            lo, hi = self._ranges[id(p)]
            if hi - start > bucket_size and lo > start:
                self.buckets.append((start, lo))
                start = lo
        if total > start:
            self.buckets.append((start, total))

    def param_range(self, param: torch.Tensor) -> tuple[int, int]:
        return self._ranges[id(param)]

    def zero(self) -> None:
        self.buffer.zero_()
        # A view must stay a view: detect anything (e.g. optimizer.zero_grad(set_to_none=True)) that
        # replaced a param's .grad, which would silently drop it from the reduction.
        for p in self.params:
            assert p.grad is not None and p.grad.data_ptr() == self.buffer[self._ranges[id(p)][0]:].data_ptr(), \
                "a parameter's .grad no longer views the gradient buffer"

    def reduce_gradients(self) -> None:
        """Average gradients over the data-parallel group, bucket by bucket."""
        if comm.group_size(self.dp_group) == 1:
            return
        for lo, hi in self.buckets:
            comm.all_reduce_(self.buffer[lo:hi], self.dp_group, op="avg")
