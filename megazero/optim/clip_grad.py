"""Global gradient norm over tp x pp x dp with every parameter counted exactly once, and clipping.

Counting rule (from each parameter's ShardSpec, DESIGN.md principle 5):
- TP-sharded parameters: every TP rank holds a distinct slice -> every rank contributes its slice.
- TP-replicated parameters (LayerNorm, row-parallel bias, position embeddings): identical on every
  TP rank -> only TP rank 0 contributes.
- DP: after the data-parallel reduction every DP replica holds the same gradient, so the sum is taken
  over the model-parallel group (tp x pp) only.
- Tied word embedding across pipeline stages: the last stage's copy (ShardSpec.tied_copy) holds the
  same summed gradient as the first stage's; only the first stage's counts.
"""

from __future__ import annotations

from typing import Iterable

import torch

from megazero import comm
from megazero.tensor_parallel.sharding import get_shard_spec


def counts_toward_norm(param: torch.Tensor, tp_rank: int) -> bool:
    spec = get_shard_spec(param)
    return not spec.tied_copy and (spec.is_tp_sharded or tp_rank == 0)


def global_grad_norm(params: Iterable[torch.Tensor], *, tp_rank: int, model_group) -> float:
    """L2 norm of all gradients of the whole model (fp32 accumulation)."""
    total = torch.zeros((), dtype=torch.float32)
    for p in params:
        if p.grad is not None and counts_toward_norm(p, tp_rank):
            total += p.grad.detach().float().pow(2).sum().cpu()
    comm.all_reduce_(total, model_group, op="sum")
    return total.sqrt().item()


@torch.no_grad()
def clip_grads_(params: Iterable[torch.Tensor], grad_norm: float, max_norm: float) -> float:
    """Scale gradients in place so their global norm is at most max_norm (torch's rule). Returns the
    coefficient applied (1.0 when no clipping happened or max_norm is 0 = disabled)."""
    if max_norm <= 0:
        return 1.0
    coeff = max_norm / (grad_norm + 1e-6)
    if coeff >= 1.0:
        return 1.0
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coeff)
    return coeff
