"""ZeRO stage 3: gather a unit's parameters just before it runs, release them right after.

Units (one bucket each, layout.py) are what the chunk declares (`zero_units()`, a list of
tensor_parallel.sharding.ZeroUnit): every transformer block (per-layer), the word embedding shared
across pipeline stages, and the rest of a chunk (position embeddings, final LayerNorm). Blocks are
gathered in a forward pre-hook and released in the forward post-hook; a hook on the block's output
gradient gathers them again just before the block's backward, and they are released once all of the
block's gradients of that microbatch have been accumulated (GradSync calls back). The next block
(forward) or previous block (backward) is prefetched asynchronously. A chunk's non-block units are
gathered at its first forward of a step and released by `release_all` at the end of the step (they
are used at both ends of the chunk).

Full recomputation (activation/recompute.py): a checkpointed span's blocks run twice. In forward they
run under no_grad inside the checkpoint (gathered, released after, as above: nothing hooks their
output). In backward the checkpoint runs them again (the recomputation) and at once backward through
them: there `recompute.recomputing()` is true, and the hooks keep each block gathered until its
gradients are in (no release after its forward: its saved parameters are used by that backward) and
prefetch block i-1, the next one backward needs, instead of i+1, whose backward is done (a wasted
all-gather, held until that block's next forward or the end of the step). The flag is set by the
checkpoint around the re-run, on the thread running it (the autograd engine's device thread with
CUDA): it says exactly "a recomputation", where torch._C._current_graph_task_id() != -1 (private API)
only says "some backward is running".
"""

from __future__ import annotations

import torch
from torch import nn

from megazero.activation import recompute
from megazero.zero.layout import BufferLayout
from megazero.zero.param_storage import ParamStorage


class Stage3Hooks:
    def __init__(self, chunks: list[nn.Module], layout: BufferLayout, storage: ParamStorage, prefetch: int = 1):
        self.storage, self.prefetch = storage, prefetch
        self.block_buckets: list[list[int]] = []  # per chunk: bucket of each block, forward order
        self._handles = []
        for chunk in chunks:
            units = chunk.zero_units()  # the model's declaration (GPTModel.zero_units)
            blocks = [u.module for u in units if u.module is not None]
            rest = sorted({layout.bucket_of[id(p)] for u in units if u.module is None for p in u.params})
            order = [layout.bucket_of[id(u.params[0])] for u in units if u.module is not None]
            self.block_buckets.append(order)
            self._handles.append(chunk.register_forward_pre_hook(self._gather_all(rest)))
            for i, blk in enumerate(blocks):
                self._handles.append(blk.register_forward_pre_hook(self._before_forward(order, i)))
                self._handles.append(blk.register_forward_hook(self._after_forward(order, i)))
        self.releasable = {b for order in self.block_buckets for b in order}

    def _gather_all(self, buckets: list[int]):
        def hook(module, args):
            for b in buckets:
                self.storage.gather(b)
        return hook

    def _before_forward(self, order: list[int], i: int):
        def hook(module, args):
            self.storage.gather(order[i])
            if recompute.recomputing():  # backward runs next, then block i-1's recomputation / backward
                self._prefetch_backward(order, i)
                return
            for j in range(i + 1, min(i + 1 + self.prefetch, len(order))):
                self.storage.gather(order[j], wait=False)
        return hook

    def _after_forward(self, order: list[int], i: int):
        def hook(module, args, output):
            if recompute.recomputing():
                return  # its backward follows at once: released when its gradients are in
            if torch.is_grad_enabled() and output.requires_grad:
                output.register_hook(self._before_backward(order, i))
            self.storage.release(order[i])
        return hook

    def _before_backward(self, order: list[int], i: int):
        def hook(grad):
            self.storage.gather(order[i])
            self._prefetch_backward(order, i)
            return None
        return hook

    def _prefetch_backward(self, order: list[int], i: int) -> None:
        for j in range(i - 1, max(i - 1 - self.prefetch, -1), -1):
            self.storage.gather(order[j], wait=False)

    def on_bucket_grads_done(self, bucket: int) -> None:
        """GradSync: every gradient of this unit for the current microbatch has been accumulated."""
        if bucket in self.releasable:
            self.storage.release(bucket)
