"""Sharding metadata carried by every parameter (DESIGN.md principle 5).

A parameter's `ShardSpec` says how the local tensor relates to the global (unsharded) one:
which tensor dim is split across the TP group (or None when replicated), the global shape, and the
"logical" extent along the split dim (vocab padding adds rows that exist only to make the split even;
they are always zero and never part of the model's math). Layout-invariant initialisation, grad-norm
de-duplication, ZeRO partitioning and checkpoints all read this instead of guessing from names.
The model sets it where it makes a parameter (tensor_parallel/layers.py, model/gpt.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

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
    # Shared across pipeline stages (the word embedding on the first and on the last stage, owner and
    # copy alike): its gradient is summed over the embedding group, so ZeRO gives it a bucket (and, at
    # stage 3, a gather unit) of its own, with the same shard boundaries on both stages.
    own_bucket: bool = False
    # At most this many distinct slices along tp_dim (the fused QKV of grouped-query attention splits
    # only between whole key/value groups). With more TP ranks than that, each slice is held by
    # tp_size / max_shards consecutive ranks (its replicas), whose gradients the model sums
    # (model/attention.py); norms and checkpoints count replica 0 only. None: tp_size slices.
    max_shards: int | None = None

    @property
    def num_slices(self) -> int:
        """Distinct slices along tp_dim (1 when replicated)."""
        if self.tp_dim is None:
            return 1
        return min(self.tp_size, self.max_shards) if self.max_shards else self.tp_size

    @property
    def replicas(self) -> int:
        """TP ranks holding each slice."""
        return self.tp_size // self.num_slices if self.tp_dim is not None else self.tp_size

    @property
    def slice_index(self) -> int:
        return self.tp_rank // self.replicas if self.tp_dim is not None else 0

    @property
    def replica_index(self) -> int:
        return self.tp_rank % self.replicas if self.tp_dim is not None else self.tp_rank

    @property
    def is_tp_sharded(self) -> bool:
        return self.num_slices > 1

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.tp_dim is None:
            return self.global_shape
        shape = list(self.global_shape)
        assert self.tp_size % self.num_slices == 0, (self.tp_size, self.max_shards)
        assert shape[self.tp_dim] % self.num_slices == 0, (self.global_shape, self.num_slices)
        shape[self.tp_dim] //= self.num_slices
        return tuple(shape)

    @property
    def offset(self) -> int:
        """Start of this rank's slice along tp_dim in the global tensor."""
        if self.tp_dim is None:
            return 0
        return self.slice_index * self.local_shape[self.tp_dim]

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global-shape tensor."""
        assert tuple(full.shape) == self.global_shape, (tuple(full.shape), self.global_shape)
        if self.tp_dim is None:
            return full
        return full.narrow(self.tp_dim, self.offset, self.local_shape[self.tp_dim])


@dataclass(frozen=True)
class ZeroUnit:
    """Parameters ZeRO-3 gathers together (one bucket), declared by the model (GPTModel.zero_units()).
    `module` set: a per-layer unit, gathered around that module's forward and again for its backward,
    released after each. None: a chunk-level unit, gathered at the chunk's first forward of a step and
    kept until the step ends (used at both ends of the chunk)."""

    params: list[nn.Parameter] = field(default_factory=list)
    module: nn.Module | None = None


def set_shard_spec(param: torch.Tensor, spec: ShardSpec) -> None:
    assert tuple(param.shape) == spec.local_shape, (tuple(param.shape), spec)
    setattr(param, _ATTR, spec)


def get_shard_spec(param: torch.Tensor) -> ShardSpec:
    """Parameters without explicit metadata are replicated, full-shape tensors."""
    spec = getattr(param, _ATTR, None)
    return spec if spec is not None else ShardSpec(global_shape=tuple(param.shape))


def counts_toward_norm(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether this rank's copy of `param` is counted in the global gradient norm (and written by
    checkpoints): every element once across the TP group and the pipeline stages.

    - TP-sharded parameters: every TP rank holds a distinct slice, all count; a slice held by several
      ranks (ShardSpec.max_shards: grouped-query QKV with tp > groups) counts on its first holder.
    - TP-replicated parameters (layernorms, biases of row-parallel layers, position embeddings): every
      TP rank holds the same values, only tp rank 0 counts them.
    - The tied word embedding across pipeline stages: the last stage's copy (ShardSpec.tied_copy) holds
      the same gradient as the first stage's after the embedding-group all-reduce; only the first counts.
    Summing over data-parallel ranks is the caller's business (only when gradients are sharded)."""
    spec = get_shard_spec(param)
    if spec.tied_copy:
        return False
    return spec.replica_index == 0 if spec.is_tp_sharded else tp_rank == 0
