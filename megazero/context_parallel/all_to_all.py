"""All-to-all context parallelism (`--cp-comm-type a2a`, DeepSpeed-Ulysses).

Before the attention, each cp rank holds every local head for its s/cp tokens (the load-balanced
chunks of sharding.py): [b, heads, s/cp, d]. One all-to-all over the cp group trades that for
heads/cp heads over the whole sequence, [b, heads/cp, s, d], put back in natural token order; the
ordinary causal core attention runs on it (heads are independent), and a second all-to-all returns
[b, heads, s/cp, d] in the local chunk order. Each all-to-all moves (cp-1)/cp of the tensor per rank,
independent of how many ranks there are per head; the attention itself needs no cp-aware math.

Requires heads % cp == 0 (query heads). Key/value heads (GQA) must also split evenly; when nkv is not
a multiple of cp, k and v are first repeated (repeat_interleave) to lcm(nkv, cp) heads: query head j
uses kv head j // (nq / nkv) before and after, so the math is unchanged, and autograd sums the
repeated heads' gradients back. That costs cp / gcd(nkv, cp) times the K/V traffic of the exchange.

Autograd: an all-to-all with equal splits maps rank r's piece t to rank t's piece r, a permutation
that is its own inverse, so the backward of an all-to-all is the same all-to-all of the gradient.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from megazero import comm
from megazero.context_parallel.sharding import shard_sequence, unshard_sequence
from megazero.errors import ConfigError


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x [cp, ...]: piece t goes to group rank t; returns [cp, ...] whose piece t came from rank t
    (comm.all_to_all_single: traffic, timeout and failure context like every collective)."""
    x = x.contiguous()
    return comm.all_to_all_single(torch.empty_like(x), x, group)


class _AllToAll(torch.autograd.Function):
    """Differentiable _all_to_all (its own inverse: the backward is the same exchange)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group), None


def _seq_to_heads(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[b, h, s/cp, d] (local chunks) -> [b, h/cp, s, d] (this rank's head slice, natural order)."""
    b, h, s_loc, d = x.shape
    pieces = x.reshape(b, cp, h // cp, s_loc, d).transpose(0, 1)  # [cp, b, h/cp, s/cp, d]: t -> rank t
    gathered = _AllToAll.apply(pieces, group)  # piece t: rank t's tokens of my heads
    return unshard_sequence(gathered.unbind(0), dim=2, cp=cp)


def _heads_to_seq(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """Inverse of _seq_to_heads: [b, h/cp, s, d] -> [b, h, s/cp, d] in the local chunk order."""
    pieces = torch.stack([shard_sequence(x, 2, t, cp) for t in range(cp)])  # [cp, b, h/cp, s/cp, d]
    gathered = _AllToAll.apply(pieces, group)  # piece t: my tokens of rank t's heads
    _, b, hc, s_loc, d = gathered.shape
    return gathered.transpose(0, 1).reshape(b, cp * hc, s_loc, d)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Default core: causal softmax(q k^T / sqrt(d)) v; q [b, nq, s, d], k, v [b, nkv, s, d]."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def kv_heads_for_a2a(num_kv_heads: int, cp: int) -> int:
    """How many kv heads the exchange carries: nkv itself when cp divides it, else lcm(nkv, cp)."""
    return num_kv_heads * cp // math.gcd(num_kv_heads, cp)


def check_a2a_heads(num_heads: int, num_kv_heads: int, cp: int) -> None:
    """Refuse, in one line, head counts the all-to-all cannot split (ConfigError)."""
    if num_heads % cp or num_heads % num_kv_heads:
        raise ConfigError(f"--cp-comm-type a2a needs the attention heads per tensor-parallel rank ({num_heads}) "
                          f"divisible by --context-parallel-size ({cp}) and by the kv heads per rank "
                          f"({num_kv_heads}); use --cp-comm-type p2p, or a --tp that leaves a multiple of {cp} heads")


def all_to_all_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group,
                         core: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """q [b, nq, s/cp, d], k, v [b, nkv, s/cp, d] (local heads, load-balanced chunks) -> [b, nq, s/cp, d].
    `core(q, k, v)` is causal attention on [b, nq/cp, s, d] / [b, nkv'/cp, s, d] (default sdpa_causal)."""
    cp = comm.group_size(cp_group)
    core = core or sdpa_causal
    if cp == 1:
        return core(q, k, v)
    nq, nkv = q.shape[1], k.shape[1]
    check_a2a_heads(nq, nkv, cp)
    wanted = kv_heads_for_a2a(nkv, cp)
    if wanted != nkv:  # fewer / unevenly divisible kv heads: replicate up to a multiple of cp
        k, v = k.repeat_interleave(wanted // nkv, dim=1), v.repeat_interleave(wanted // nkv, dim=1)
    q, k, v = (_seq_to_heads(t, cp_group, cp) for t in (q, k, v))
    return _heads_to_seq(core(q, k, v), cp_group, cp)
