"""Context parallelism: attention over a sequence sharded across the cp axis (issue 14).

`context_parallel_attention(q, k, v, cp_group=, comm_type=, core=)` is the one entry point: q
[b, nq, s/cp, d], k, v [b, nkv, s/cp, d] hold this rank's two load-balanced chunks (sharding.py) and
the result is causal attention over the whole sequence for those tokens, [b, nq, s/cp, d].

- comm_type "p2p" (ring_attention.py): K/V blocks circulate around the cp ring, overlapped with the
  blockwise attention; its own online-softmax math (`core` is not used).
- comm_type "a2a" (all_to_all.py, DeepSpeed-Ulysses): two all-to-alls swap sequence sharding for head
  sharding around `core` (default: torch sdpa, causal).
At cp 1 both are `core` itself (default sdpa), i.e. plain causal attention. No attention dropout.
"""

from __future__ import annotations

from typing import Callable

import torch

from megazero import comm
from megazero.context_parallel import ring_attention as ring  # the module: its function keeps its name
from megazero.context_parallel.all_to_all import all_to_all_attention, sdpa_causal
from megazero.context_parallel.ring_attention import ring_send_bytes
from megazero.context_parallel.sharding import chunk_ids, local_positions, shard_sequence, unshard_sequence

COMM_TYPES = ("p2p", "a2a")

__all__ = ["COMM_TYPES", "chunk_ids", "context_parallel_attention", "local_positions", "ring_send_bytes",
           "shard_sequence", "unshard_sequence"]


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cp_group, comm_type: str,
                               core: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of the local tokens against the whole cp-sharded sequence (module docstring)."""
    if comm.group_size(cp_group) == 1:
        return (core or sdpa_causal)(q, k, v)
    if comm_type == "p2p":
        return ring.ring_attention(q, k, v, cp_group)
    if comm_type == "a2a":
        return all_to_all_attention(q, k, v, cp_group, core)
    raise ValueError(f"cp comm type {comm_type!r} is not one of {COMM_TYPES}")
