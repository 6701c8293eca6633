"""Activation recomputation (Megatron's --recompute-*; DeepSpeed's activation_checkpointing).

CONTRACT (being implemented): `checkpoint(fn, *inputs, rng=, storage=)` returns fn(*inputs) and
keeps only `inputs` for backward, where fn is run again (the recomputation) before its backward:
exact (every named RNG stream and the ambient generator replayed from their state at the forward),
with `storage` deciding where the kept inputs live (partitioned across tp ranks, host memory). With
grad disabled, or no input requiring grad, it is fn(*inputs).

`recompute_spans(layer_ids, act)` -> [(layer ids, checkpointed)] in order: the model runs each span's
blocks, through `checkpoint` when checkpointed (full recomputation; uniform or block method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megazero.config import ActivationConfig
from megazero.random import RNGStreams


@dataclass(frozen=True)
class InputStorage:
    """Where a full-recomputation checkpoint keeps its inputs: split across `partition_group` (each
    rank 1/n, all-gathered before the recomputation), in host memory (`offload`), and whether each
    checkpoint boundary synchronises CUDA (DeepSpeed's synchronize_checkpoint_boundary)."""

    partition_group: object | None = None
    offload: bool = False
    synchronize: bool = False


KEEP = InputStorage()


def checkpoint(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, rng: RNGStreams | None,
               storage: InputStorage = KEEP) -> torch.Tensor:
    return fn(*inputs)  # placeholder until the recomputation lands


def recompute_spans(layer_ids: list[int], act: ActivationConfig) -> list[tuple[list[int], bool]]:
    """A model chunk's layers in order as spans run together; checkpointed spans are recomputed.

    uniform: every `layers_per_checkpoint` consecutive layers form one checkpointed span (the last may
    be shorter); block: the first `layers_per_checkpoint` layers are checkpointed one by one and the rest
    form one span that stores everything; otherwise one span, not checkpointed."""
    if act.method == "uniform":
        n = act.layers_per_checkpoint
        return [(layer_ids[i:i + n], True) for i in range(0, len(layer_ids), n)]
    if act.method == "block":
        n = min(act.layers_per_checkpoint, len(layer_ids))
        rest = [(layer_ids[n:], False)] if layer_ids[n:] else []
        return [([i], True) for i in layer_ids[:n]] + rest
    return [(layer_ids, False)] if layer_ids else []


def core_attention_pays(backend: str, device_type: str, dropout_p: float) -> bool:
    """Selective recomputation re-runs the core attention only where its backward would otherwise keep
    [b, heads, s, s] tensors: the fused / unfused backends, and CPU sdpa with dropout (torch's math path;
    without dropout CPU sdpa is a flash kernel keeping only its output and log-sum-exp, as CUDA sdpa is)."""
    if backend in ("fused", "unfused"):
        return True
    return device_type == "cpu" and dropout_p > 0
