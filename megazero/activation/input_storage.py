"""Where a full-recomputation checkpoint keeps its inputs until the recomputation (recompute.py).

DeepSpeed's activation_checkpointing options, as InputStorage:
- partition_group (partition_activations, --distribute-saved-activations): the input, replicated over
  the tensor-parallel group (the hidden state between blocks), is flattened, padded to a multiple of
  n = group size and split in n chunks; rank r keeps chunk r only ([ceil(numel / n)]), and the chunks
  are all-gathered back to the full tensor just before the recomputation. Never for sharded inputs
  (sequence parallelism: config.py refuses the combination).
- offload (cpu_checkpointing, --cpu-offload-activations): what is kept (the input, or its chunk) is a
  host copy (pinned with CUDA), marked with saved_tensors.mark_host so the meter counts it as host
  bytes (and, like a chunk via derived_from, toward the label of the input it stands for); it is
  copied back when the recomputation needs it, or earlier when `prefetch` started the copy
  (on a side CUDA stream; on CPU the host copy is the tensor used).
- synchronize (synchronize_checkpoint_boundary): torch.cuda.synchronize at each checkpoint's forward
  and recomputation (a profiling aid; nothing on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megazero import comm
from megazero.activation.saved_tensors import derived_from, mark_host

_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}  # per CUDA device: host -> device copies


@dataclass(frozen=True)
class InputStorage:
    """Where a full-recomputation checkpoint keeps its inputs: split across `partition_group` (each
    rank 1/n, all-gathered before the recomputation), in host memory (`offload`), and whether each
    checkpoint boundary synchronises CUDA (DeepSpeed's synchronize_checkpoint_boundary)."""

    partition_group: object | None = None
    offload: bool = False
    synchronize: bool = False

    def boundary(self, device: torch.device) -> None:
        if self.synchronize and device.type == "cuda":
            torch.cuda.synchronize(device)


class KeptInputs:
    """How one checkpoint's inputs are kept. `keep(inputs)` returns the tensors to hand to
    ctx.save_for_backward (held nowhere else: autograd, and so the meter, owns their lifetime);
    `restore(saved)` gives the inputs back (detached, requiring grad as the originals) for the
    recomputation."""

    def __init__(self, storage: InputStorage):
        self.storage = storage
        group = storage.partition_group
        self.partitioned = group is not None and comm.group_size(group) > 1
        self.meta: list[tuple[torch.Size, torch.device, bool]] = []  # per input: shape, device, requires_grad
        self._fetched: tuple[list[torch.Tensor], object] | None = None  # prefetched device copies, stream

    def keep(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        self.meta = [(x.shape, x.device, x.requires_grad) for x in inputs]
        kept = [derived_from(self._chunk(x), x) for x in inputs] if self.partitioned else list(inputs)
        # the meter attributes a chunk or host copy as it would the input (its block's label)
        return [self._to_host(t, x) for t, x in zip(kept, inputs)] if self.storage.offload else kept

    def _chunk(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of x flattened and padded: [ceil(numel / n)] (a copy: x itself can go)."""
        n, r = comm.group_size(self.storage.partition_group), comm.group_rank(self.storage.partition_group)
        flat = x.detach().reshape(-1)
        per = -(-flat.numel() // n)
        mine = flat[r * per:(r + 1) * per]
        chunk = torch.zeros(per, dtype=x.dtype, device=x.device)  # the padding past numel stays 0
        chunk[:mine.numel()] = mine
        return chunk

    @staticmethod
    def _to_host(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)  # ordered on the compute stream; prefetch waits for it
        else:
            host = t.detach().clone()  # a CPU run keeps a separate host copy too (the same bytes counted)
        return mark_host(host, source=source)

    def prefetch(self, saved: tuple[torch.Tensor, ...]) -> None:
        """Start copying the offloaded tensors back to their device (async on CUDA) ahead of `restore`."""
        if not self.storage.offload or self._fetched is not None:
            return
        device = self.meta[0][1]
        if device.type != "cuda":
            self._fetched = (list(saved), None)
            return
        stream = _side_streams.get(device)
        if stream is None:  # one per device, created on first use
            stream = _side_streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the device -> host copies are done
        with torch.cuda.stream(stream):
            self._fetched = ([t.to(device, non_blocking=True) for t in saved], stream)

    def restore(self, saved: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        self.prefetch(saved)
        tensors, stream = self._fetched if self._fetched is not None else (list(saved), None)
        self._fetched = None
        if stream is not None:  # the side-stream copies must finish before the compute stream reads them
            current = torch.cuda.current_stream(stream.device)
            current.wait_stream(stream)
            for t in tensors:
                t.record_stream(current)
        if self.partitioned:  # [ceil(numel / n)] per rank -> [n * ceil(numel / n)] -> x's shape
            group = self.storage.partition_group
            tensors = [comm.all_gather_dim0(t, group)[:shape.numel()].view(shape)
                       for t, (shape, _, _) in zip(tensors, self.meta)]
        return [t.detach().view(shape).requires_grad_(rg) for t, (shape, _, rg) in zip(tensors, self.meta)]
