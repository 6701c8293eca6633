"""Sharding metadata carried by every parameter (DESIGN.md principle 5).

A parameter's `ShardSpec` says how the local tensor relates to the global (unsharded) one:
which tensor dim is split across the TP group (or None when replicated), the global shape, and the
"logical" extent along the split dim (vocab padding adds rows that exist only to make the split even;
they are always zero and never part of the model's math). Layout-invariant initialisation, grad-norm
de-duplication, ZeRO partitioning and checkpoints all read this instead of guessing from names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ATTR = "megazero_shard"


@dataclass(frozen=True)
class ShardSpec:
    global_shape: tuple[int, ...]
    tp_dim: int | None = None  # tensor dim split across TP ranks; None = replicated on every TP rank
    tp_rank: int = 0
    tp_size: int = 1
    logical_size: int | None = None  # size of tp_dim without padding (None = no padding)
    # A copy of a parameter owned by another pipeline stage (the tied word embedding on the last
    # stage): its gradient is summed with the owner's, and norms/checkpoints count only the owner.
    tied_copy: bool = False

    @property
    def is_tp_sharded(self) -> bool:
        return self.tp_dim is not None and self.tp_size > 1

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.tp_dim is None:
            return self.global_shape
        shape = list(self.global_shape)
        assert shape[self.tp_dim] % self.tp_size == 0, (self.global_shape, self.tp_size)
        shape[self.tp_dim] //= self.tp_size
        return tuple(shape)

    @property
    def offset(self) -> int:
        """Start of this rank's slice along tp_dim in the global tensor."""
        if self.tp_dim is None:
            return 0
        return self.tp_rank * self.local_shape[self.tp_dim]

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global-shape tensor."""
        assert tuple(full.shape) == self.global_shape, (tuple(full.shape), self.global_shape)
        if self.tp_dim is None:
            return full
        return full.narrow(self.tp_dim, self.offset, self.local_shape[self.tp_dim])


def set_shard_spec(param: torch.Tensor, spec: ShardSpec) -> None:
    assert tuple(param.shape) == spec.local_shape, (tuple(param.shape), spec)
    setattr(param, _ATTR, spec)


def get_shard_spec(param: torch.Tensor) -> ShardSpec:
    """Parameters without explicit metadata are replicated, full-shape tensors."""
    spec = getattr(param, _ATTR, None)
    return spec if spec is not None else ShardSpec(global_shape=tuple(param.shape))
