"""Which gradient elements count toward the global gradient norm (each exactly once).

Counting rule, from each parameter's ShardSpec (DESIGN.md principle 5):
- TP-sharded parameters: every TP rank holds a distinct slice -> every rank contributes its slice.
- TP-replicated parameters (LayerNorm, row-parallel bias, position embeddings): identical on every
  TP rank -> only TP rank 0 contributes.
- Tied word embedding across pipeline stages: the last stage's copy (ShardSpec.tied_copy) holds the
  same summed gradient as the first stage's; only the first stage's counts.
- DP: stage 0 replicas hold identical reduced gradients (not summed over dp); at stages 1-3 each DP
  rank holds a distinct shard (summed over dp). zero/optimizer.py does the sums.
"""

from __future__ import annotations

import torch

from megazero.tensor_parallel.sharding import get_shard_spec


def counts_toward_norm(param: torch.Tensor, tp_rank: int) -> bool:
    spec = get_shard_spec(param)
    return not spec.tied_copy and (spec.is_tp_sharded or tp_rank == 0)
