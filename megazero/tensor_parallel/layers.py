"""Tensor-parallel layers whose math equals nn.Linear / nn.Embedding at tp=1.

Partition math (W is the global weight of nn.Linear, shape [out, in]; y = x W^T + b):

- ColumnParallelLinear splits W along `out` (dim 0): rank r holds W_r [out/tp, in] and b_r [out/tp],
  computes y_r = x W_r^T + b_r, i.e. the r-th chunk of y's last dim. Input x is replicated, so its
  gradient is the sum over ranks (copy_to_tp_region: identity forward, all-reduce backward).
  gather_output=True all-gathers y back to [.., out].
- RowParallelLinear splits W along `in` (dim 1): rank r holds W_r [out, in/tp] and consumes the r-th
  chunk x_r of the input's last dim, so y = sum_r x_r W_r^T + b (reduce_from_tp_region: all-reduce
  forward, identity backward). b is replicated and added once, after the reduction.
- VocabParallelEmbedding splits the table along vocab (dim 0): rank r holds rows [r*V/tp, (r+1)*V/tp);
  ids outside a rank's range look up zeros there and the all-reduce assembles each row from its owner.

Sequence parallelism (`sequence_parallel=True`, Megatron's; collectives.py): the activations outside the
TP regions are [b, s/tp, h], each rank its own positions. ColumnParallelLinear (and the vocab-parallel
output layer) all-gathers its input along s instead of copy_to_tp_region (backward: reduce-scatter
instead of all-reduce), through linear_with_sequence_parallel, which keeps only the [b, s/tp, in] shard
for the weight gradient and gathers it again in backward; RowParallelLinear and VocabParallelEmbedding
reduce-scatter their output along s instead of all-reducing it: [b, s, out] partial sums ->
[b, s/tp, out]. The row-parallel bias is then
added on the shard, so each rank sees the gradient of its positions only: sum_grad_over_tp adds them.
Same bytes on the wire as the all-reduce (= reduce-scatter + all-gather), 1/tp of the activations.

RowParallelLinear.forward(*inputs, activation=fn) computes F.linear(fn(*inputs), W) keeping the
activation function's INPUTS, not its output, for the weight gradient (selective recomputation of the
MLP activation: linear_with_recomputed_activation); the reduction and the bias are the same.

Parameters are created empty with a ShardSpec and an init function; `initialize_parameters` fills them
layout-invariantly (tensor_parallel/init.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megazero import comm
from megazero.tensor_parallel.collectives import (
    copy_to_tp_region,
    gather_from_tp_region,
    linear_with_sequence_parallel,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
    sum_grad_over_tp,
)
from megazero.tensor_parallel.init import InitFn, constant_init, set_init
from megazero.tensor_parallel.sharding import ShardSpec, get_shard_spec, set_shard_spec


def _make_param(spec: ShardSpec, init: InitFn, dtype: torch.dtype, device) -> nn.Parameter:
    param = nn.Parameter(torch.empty(spec.local_shape, dtype=dtype, device=device))
    set_shard_spec(param, spec)
    set_init(param, init)
    return param


def _check_divisible(size: int, tp: int, what: str) -> None:
    assert size % tp == 0, f"{what} ({size}) must be divisible by tensor-parallel size {tp}"


def _vocab_parallel_weight(num_embeddings: int, embedding_dim: int, tp_group, init_method: InitFn,
                           logical_vocab_size: int | None, dtype, device) -> nn.Parameter:
    """A [V_padded, dim] table split along the vocabulary (rows >= logical_vocab_size: zero padding)."""
    tp, tp_rank = comm.group_size(tp_group), comm.group_rank(tp_group)
    _check_divisible(num_embeddings, tp, "padded vocabulary size")
    spec = ShardSpec((num_embeddings, embedding_dim), tp_dim=0, tp_rank=tp_rank, tp_size=tp,
                     logical_size=logical_vocab_size or num_embeddings)
    return _make_param(spec, init_method, dtype, device)


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp_group,
                           sequence_parallel: bool) -> torch.Tensor:
    """x W^T + b for a TP-parallel W [out_local, in] (a parameter or a tensor derived from one): x is
    [b, s, in] replicated (copy; its gradient all-reduced) or, with SP, [b, s/tp, in], all-gathered along
    s for the matmul with only the shard kept for backward (its gradient reduce-scattered back).
    Returns [b, s, out_local]."""
    if sequence_parallel:
        return linear_with_sequence_parallel(x, weight, bias, tp_group)
    return F.linear(copy_to_tp_region(x, tp_group), weight, bias)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along output features. Input [..., in] (with SP [b, s/tp, in]) ->
    output [..., out/tp] (or [..., out] with gather_output)."""

    def __init__(self, in_features: int, out_features: int, *, tp_group, init_method: InitFn,
                 bias: bool = True, gather_output: bool = False, max_shards: int | None = None,
                 sequence_parallel: bool = False, dtype=torch.float32, device=None):
        """max_shards: split `out` into at most this many slices, each held by tp / max_shards ranks
        when tp is larger (ShardSpec.max_shards; the caller sums the replicas' gradients)."""
        super().__init__()
        assert not (sequence_parallel and gather_output), "SP: the output's s is whole, gather_output would not be"
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        tp, tp_rank = comm.group_size(tp_group), comm.group_rank(tp_group)
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        spec = ShardSpec((out_features, in_features), tp_dim=0, tp_rank=tp_rank, tp_size=tp, max_shards=max_shards)
        _check_divisible(out_features, spec.num_slices, "output features")
        self.weight = _make_param(spec, init_method, dtype, device)
        self.bias = (
            _make_param(ShardSpec((out_features,), tp_dim=0, tp_rank=tp_rank, tp_size=tp, max_shards=max_shards),
                        constant_init(0.0), dtype, device)
            if bias else None
        )

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This layer's matmul (its input handling: copy, or SP's gather) with a weight / bias derived from
        its own, for callers that transform them first: SwiGLU's regrouped rows, the QKV replicas' summed
        gradients. x [b, s, in] ([b, s/tp, in] with SP) -> [b, s, rows of weight]."""
        return column_parallel_linear(x, weight, bias, self.tp_group, self.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x, self.weight, self.bias)
        return gather_from_tp_region(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along input features. Input [..., in/tp] (input_is_parallel) or
    [..., in] (scattered here) -> output [..., out], replicated on every TP rank; with SP [b, s/tp, out],
    this rank's positions."""

    def __init__(self, in_features: int, out_features: int, *, tp_group, init_method: InitFn,
                 bias: bool = True, input_is_parallel: bool = True, sequence_parallel: bool = False,
                 dtype=torch.float32, device=None):
        super().__init__()
        assert input_is_parallel or not sequence_parallel, "SP takes the input already split by features"
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        tp, tp_rank = comm.group_size(tp_group), comm.group_rank(tp_group)
        _check_divisible(in_features, tp, "input features")
        self.in_features, self.out_features, self.input_is_parallel = in_features, out_features, input_is_parallel
        self.weight = _make_param(
            ShardSpec((out_features, in_features), tp_dim=1, tp_rank=tp_rank, tp_size=tp), init_method, dtype, device)
        self.bias = (
            _make_param(ShardSpec((out_features,)), constant_init(0.0), dtype, device) if bias else None
        )

    def forward(self, *inputs: torch.Tensor,
                activation: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """forward(x), or forward(*inputs, activation=fn) for x = fn(*inputs) with fn re-run in backward
        from its inputs instead of keeping x (linear_with_recomputed_activation; input_is_parallel)."""
        if activation is not None:
            assert self.input_is_parallel, "the activation's inputs are this rank's feature columns"
            y = linear_with_recomputed_activation(activation, self.weight, *inputs)
        else:
            (x,) = inputs
            if not self.input_is_parallel:
                x = scatter_to_tp_region(x, self.tp_group)
            y = F.linear(x, self.weight)  # [b, s, out] partial sums over this rank's input features
        if not self.sequence_parallel:
            y = reduce_from_tp_region(y, self.tp_group)
            return y + self.bias if self.bias is not None else y
        y = reduce_scatter_to_sequence_parallel_region(y, self.tp_group)  # [b, s/tp, out]
        return y + sum_grad_over_tp(self.bias, self.tp_group) if self.bias is not None else y


def linear_with_recomputed_activation(activation: Callable[..., torch.Tensor], weight: torch.Tensor,
                                      *inputs: torch.Tensor) -> torch.Tensor:
    """F.linear(activation(*inputs), weight) (no bias) keeping `inputs` and `weight` for backward, not
    the activation's output: backward re-makes it from the inputs for the weight gradient (an
    elementwise, RNG-free function: GELU, SwiGLU's silu(gate) * up), so no matmul is re-run. The ops
    and their order are those of the plain expression's backward, so fp32 results are bitwise equal.
    Without grad (or nothing requiring it) it is the plain expression."""
    if not torch.is_grad_enabled() or not (weight.requires_grad or any(x.requires_grad for x in inputs)):
        return F.linear(activation(*inputs), weight)
    return _LinearWithRecomputedActivation.apply(activation, weight, *inputs)


class _LinearWithRecomputedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, activation, weight: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.activation = activation
        ctx.save_for_backward(weight, *inputs)  # the activation's inputs: its output is not kept
        return F.linear(activation(*inputs), weight)  # [b, s, out]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        weight, *inputs = ctx.saved_tensors  # (kept with retain_graph: a second backward works too)
        activation = ctx.activation
        needs = ctx.needs_input_grad[2:]
        detached = [x.detach().requires_grad_(need) for x, need in zip(inputs, needs)]
        with torch.enable_grad():
            g = activation(*detached)  # the activation's output again: [b, s, in]
        # F.linear(g, W) with 3-d g is matmul: g folded to [b*s, in] @ W^T, then viewed back. Its
        # backward: the output grad reshaped to [b*s, out]; mm's grad for W^T (column-major) is
        # (grad^T g)^T, so grad_W = grad^T g; for g, grad W
        grad_2d = grad_y.reshape(-1, grad_y.shape[-1])
        grad_w = grad_2d.t().mm(g.detach().reshape(-1, g.shape[-1])) if ctx.needs_input_grad[1] else None
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        wanted = [i for i, need in enumerate(needs) if need]
        if wanted:
            grad_g = grad_2d.mm(weight).reshape(g.shape)
            for i, grad in zip(wanted, torch.autograd.grad(g, [detached[i] for i in wanted], grad_g)):
                grads[i] = grad
        return (None, grad_w, *grads)


class VocabParallelEmbedding(nn.Module):
    """Token ids [...] -> embeddings [..., dim], table split along the (padded) vocabulary.

    `num_embeddings` is the padded vocab (divisible by tp); rows >= `logical_vocab_size` are padding:
    zero-initialised, never looked up, and masked out of the loss (cross_entropy.py).
    With SP, ids [b, s] -> [b, s/tp, dim], this rank's positions.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group, init_method: InitFn,
                 logical_vocab_size: int | None = None, sequence_parallel: bool = False,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.logical_vocab_size = logical_vocab_size or num_embeddings
        self.weight = _vocab_parallel_weight(num_embeddings, embedding_dim, tp_group, init_method,
                                             logical_vocab_size, dtype, device)
        spec = get_shard_spec(self.weight)
        self.vocab_start = spec.offset
        self.vocab_end = spec.offset + spec.local_shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        emb = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # [b, s, dim], own rows
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(emb, self.tp_group)
        return reduce_from_tp_region(emb, self.tp_group)


class VocabParallelOutput(nn.Module):
    """An output layer of its own (untied from the word embedding): weight [V_padded, h] split along the
    vocabulary like VocabParallelEmbedding (padding rows zero), hidden [..., h] (with SP [b, s/tp, h]) ->
    local logits [..., V/tp] (the whole sequence)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group, init_method: InitFn,
                 logical_vocab_size: int | None = None, sequence_parallel: bool = False,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.weight = _vocab_parallel_weight(num_embeddings, embedding_dim, tp_group, init_method,
                                             logical_vocab_size, dtype, device)
        self.vocab_start = get_shard_spec(self.weight).offset

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return parallel_lm_logits(hidden, self.weight, self.tp_group, self.sequence_parallel)


def parallel_lm_logits(hidden: torch.Tensor, word_embeddings: torch.Tensor, tp_group,
                       sequence_parallel: bool = False) -> torch.Tensor:
    """Output layer tied to the (vocab-sharded) input embedding: [..., h] -> local logits [..., V/tp].
    With SP the hidden [b, s/tp, h] is all-gathered for the matmul (only the shard kept for backward);
    the logits are vocab-parallel, so the gradient of the gathered hidden is a partial sum per rank and
    goes back reduce-scattered."""
    return column_parallel_linear(hidden, word_embeddings, None, tp_group, sequence_parallel)
