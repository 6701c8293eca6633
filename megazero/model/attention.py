"""Self-attention: fused QKV with query groups (MHA / GQA / MQA), rope, q/k norms, attention backends.

Fused QKV layout. The weight's global output dim is ordered [group, (q_0 .. q_{n-1}, k, v), head_dim]
with n = heads / groups query heads per key/value group (Megatron's GQA layout; with groups = heads it
is [head, (q, k, v), head_dim], GPT-2's as megazero has always stored it). A contiguous TP split
therefore gives each rank whole groups when tp <= groups. When tp > groups (Megatron refuses this) the
split stops at whole groups (ShardSpec.max_shards = groups): the tp / groups ranks sharing a group
each hold the whole group's rows, use their own n / (tp / groups) query heads and the shared k, v, and
`sum_grad_over_tp` (tensor_parallel/collectives.py) adds their weight gradients in backward (each
rank's rows of other ranks' query heads get zero from it), so every replica holds the full gradient;
norms and checkpoints count the first replica only (sharding.counts_toward_norm).

Backends (`--attention-backend`): sdpa (torch.nn.functional.scaled_dot_product_attention; flash /
memory-efficient kernels where torch has them), fused (megatron_kernels' scaled causal softmax through
megazero.ops, which falls back to the reference where the kernel cannot serve: CPU, long keys), unfused
(the plain reference: fp32 softmax of q k^T / sqrt(d) with the causal mask). auto = sdpa: on CPU and on
CUDA it is the fastest of the three for causal attention (bench/attention_backends.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from megazero import comm, ops
from megazero.activation import recompute
from megazero.config import ActivationConfig, ModelConfig
from megazero.context_parallel import context_parallel_attention
from megazero.model.norms import LayerNorm, RMSNorm
from megazero.model.rope import RotaryEmbedding
from megazero.random import RNGStreams
from megazero.tensor_parallel.collectives import sum_grad_over_tp
from megazero.tensor_parallel.init import InitFn, normal_init
from megazero.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megazero.tensor_parallel.sharding import get_shard_spec


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """This rank's place on the cp axis (issue 14): with size > 1 its tokens are the two load-balanced
    chunks (context_parallel/sharding.py) of each sample, s / cp of them, and attention runs through
    context_parallel_attention over `group` with `comm_type` (p2p: ring, a2a: all-to-all)."""
    group: object = None
    rank: int = 0
    size: int = 1
    comm_type: str = "p2p"


def make_norm(cfg: ModelConfig, size: int, dtype, device, grad_sum_group=None) -> nn.Module:
    """The block's normalisation (--normalization) over the last dim of `size`; grad_sum_group: the TP
    group when ranks normalise different data (sequence-parallel region, q/k norms: norms.py)."""
    cls = RMSNorm if cfg.normalization == "RMSNorm" else LayerNorm
    return cls(size, cfg.layernorm_epsilon, dtype, device, cfg.fused_kernels, grad_sum_group)


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str, dropout_p: float,
                   use_fused: bool = True) -> torch.Tensor:
    """Causal attention. q [b, nq, s, d]; k, v [b, nkv, s, d] with nq a multiple of nkv (query head j
    uses key/value head j // (nq / nkv): sdpa's enable_gqa on CUDA, else k / v repeated). Returns
    [b, nq, s, d]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    grouped = k.shape[1] != q.shape[1]
    if backend in ("auto", "sdpa") and q.is_cuda:  # CUDA kernels take grouped heads: no repeated k / v
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale,
                                              enable_gqa=grouped)
    if grouped:  # (CPU sdpa would expand them internally anyway)
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if backend in ("auto", "sdpa"):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    scores = torch.matmul(q, k.transpose(-2, -1))  # [b, nq, s, s]
    if backend == "fused":
        probs = ops.scaled_causal_softmax(scores, scale, use_fused=use_fused)
    else:  # unfused: the reference
        probs = ops.reference.scaled_causal_softmax(scores, scale)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, rng: RNGStreams, output_init: InitFn, dtype, device,
                 activation: ActivationConfig = ActivationConfig(), cp: ContextParallel = ContextParallel()):
        super().__init__()
        self.cp = cp
        self.recompute_core = activation.selective  # where it pays: recompute.core_attention_pays
        tp = self.tp_size = comm.group_size(tp_group)
        self.cfg, self.tp_group, self.rng = cfg, tp_group, rng
        self.head_dim = cfg.head_dim
        groups = cfg.query_groups
        self.per_group = cfg.num_attention_heads // groups  # query heads per key/value group
        self.local_heads = cfg.num_attention_heads // tp
        self.dropout_p = cfg.attention_dropout
        sp = activation.sequence_parallel  # input [b, s/tp, h] gathered by the QKV, output reduce-scattered
        self.query_key_value = ColumnParallelLinear(
            cfg.hidden_size, groups * (self.per_group + 2) * self.head_dim, tp_group=tp_group,
            init_method=normal_init(cfg.init_method_std), bias=cfg.qkv_bias, max_shards=groups,
            sequence_parallel=sp, dtype=dtype, device=device)
        spec = get_shard_spec(self.query_key_value.weight)
        self.num_slices, self.slice_index = spec.num_slices, spec.slice_index
        self.replicas, self.replica_index = spec.replicas, spec.replica_index
        self.local_groups = groups // spec.num_slices  # 1 when the group is shared (tp > groups)
        self.dense = RowParallelLinear(
            cfg.num_attention_heads * self.head_dim, cfg.hidden_size, tp_group=tp_group, init_method=output_init,
            bias=cfg.add_bias_linear, input_is_parallel=True, sequence_parallel=sp, dtype=dtype, device=device)
        self.rotary = RotaryEmbedding(cfg, cp.rank, cp.size) if cfg.position_embedding_type == "rope" else None
        if cfg.qk_layernorm:  # over head_dim, shared by every head (Megatron); replicated over TP, but each
            # rank normalises only its own heads: the weight gradients are summed over the TP group
            self.q_layernorm = make_norm(cfg, self.head_dim, dtype, device, grad_sum_group=tp_group)
            self.k_layernorm = make_norm(cfg, self.head_dim, dtype, device, grad_sum_group=tp_group)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.query_key_value.weight, self.query_key_value.bias
        if self.replicas == 1:
            return self.query_key_value(x)
        weight = sum_grad_over_tp(weight, self.tp_group, self.num_slices, self.slice_index)
        if bias is not None:
            bias = sum_grad_over_tp(bias, self.tp_group, self.num_slices, self.slice_index)
        return self.query_key_value.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, h] (sequence parallel: [b, s/tp, h]) -> the same shape. From the QKV projection on
        every rank holds the whole sequence (gathered there), so rope turns positions 0..s-1 as without SP.
        With context parallelism s is this cp rank's s/cp tokens (its two load-balanced chunks): rope uses
        their global positions and the core attention is context_parallel_attention over the cp group."""
        hd, n = self.head_dim, self.per_group
        qkv = self._project(x)  # [b, s, local qkv features]
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, self.local_groups, n + 2, hd)  # [b, s, groups here, (q.., k, v), hd]
        q, k, v = qkv[:, :, :, :n], qkv[:, :, :, n:n + 1], qkv[:, :, :, n + 1:]
        if self.replicas > 1:  # this rank's share of the group's query heads
            mine = n // self.replicas
            q = q[:, :, :, self.replica_index * mine:(self.replica_index + 1) * mine]
        q = q.reshape(b, s, self.local_heads, hd).transpose(1, 2)  # [b, heads here, s, hd]
        k = k.reshape(b, s, self.local_groups, hd).transpose(1, 2)  # [b, groups here, s, hd]
        v = v.reshape(b, s, self.local_groups, hd).transpose(1, 2)
        if self.cfg.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        dropout_p = self.dropout_p if self.training else 0.0
        # Attention probabilities are sharded by head across TP ranks: draw their dropout from the
        # per-TP-rank stream so ranks do not drop the same positions of different heads. Without dropout
        # nothing is drawn, so the stream swap (3 RNG-state copies per layer) is skipped.
        core = functools.partial(core_attention, backend=self.cfg.attention_backend, dropout_p=dropout_p,
                                 use_fused=self.cfg.fused_kernels)
        if self.cp.size > 1:
            context = self._context_parallel(core, q, k, v)
        else:
            with self.rng.fork("tensor-parallel") if dropout_p > 0 else contextlib.nullcontext():
                if self.recompute_core and recompute.core_attention_pays(self.cfg.attention_backend,
                                                                         q.device.type, dropout_p):
                    # selective recomputation: q, k, v kept, [b, heads, s, s] re-made in backward (the
                    # same dropout mask: the checkpoint replays the stream drawn here)
                    context = recompute.checkpoint(core, q, k, v, rng=self.rng)
                else:
                    context = core(q, k, v)
        context = context.transpose(1, 2).reshape(b, s, self.local_heads * hd)  # [b, s, heads here * hd]
        return self.dense(context)

    def _context_parallel(self, core, q, k, v) -> torch.Tensor:
        """Attention of this cp rank's s/cp tokens against the whole sequence (cp > 1; attention dropout
        is 0, validation.py). p2p runs the ring (its own blockwise math); a2a runs `core` (the configured
        backend) on the head-sharded full sequence. Selective recomputation checkpoints the whole call, so
        backward re-runs the ring / the all-to-alls as Megatron does: core_attention_pays is not consulted
        because the ring keeps its per-block lse and output on top of q, k, v, and the a2a core keeps the
        full-sequence q, k, v; both are worth dropping under selective recomputation."""
        def attend(q, k, v):
            return context_parallel_attention(q, k, v, cp_group=self.cp.group, comm_type=self.cp.comm_type,
                                              core=core)
        if self.recompute_core:
            return recompute.checkpoint(attend, q, k, v, rng=self.rng)
        return attend(q, k, v)
