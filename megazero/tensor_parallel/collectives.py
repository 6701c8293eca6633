"""Autograd functions that pair a forward collective with its backward over the TP group.

Megatron's region boundaries. The tensor-parallel (TP) ones split or sum the last (feature) dim; the
sequence-parallel (SP) ones split the sequence dim s of batch-first activations [b, s, h], where the
norm / dropout regions hold [b, s/tp, h] (rank r: positions [r*s/tp, (r+1)*s/tp)):

| function                          | forward                         | backward                           |
|-----------------------------------|---------------------------------|------------------------------------|
| copy_to_tp_region                 | identity                        | all-reduce (sum)                   |
| reduce_from_tp_region             | all-reduce (sum)                | identity                           |
| scatter_to_tp_region              | keep this rank's last-dim chunk | all-gather along last dim          |
| gather_from_tp_region             | all-gather along last dim       | keep this rank's chunk             |
| scatter_to_sequence_parallel_region  | keep this rank's s chunk     | all-gather along s                 |
| gather_from_sequence_parallel_region | all-gather along s           | reduce-scatter along s (*)         |
| reduce_scatter_to_sequence_parallel_region | reduce-scatter along s | all-gather along s                 |
| sum_grad_over_tp                  | identity                        | all-reduce (sum) of the gradient   |
| linear_with_sequence_parallel     | all-gather along s, x W^T + b   | all-gather x again, reduce-scatter |
|                                   | (keeps the [b, s/tp, in] shard) | grad_x along s (**)                |

(*) By default the SP gather feeds a TP-parallel consumer (a column-parallel matmul; the layers use
linear_with_sequence_parallel for theirs, which gathers itself: **): each rank's gradient of the
gathered [b, s, h] is a partial sum over its own columns, so the backward sums them and keeps this
rank's s chunk (reduce-scatter), as copy_to_tp_region's all-reduce does without SP. With
`tensor_parallel_output_grad=False` the consumer is replicated (every rank computes the same thing
from the full sequence, so the gradient is already the full one on every rank) and the backward only
keeps this rank's chunk (Megatron's flag of the same name).

(**) The column-parallel matmul under SP as one function (Megatron's
LinearWithGradAccumulationAndAsyncCommunication with sequence_parallel). The SP gather then F.linear
would let F.linear save the gathered [b, s, in] input for its weight gradient, tp times
the shard; this saves the shard and all-gathers it again in backward, started before grad_x = g W so
the two overlap, then reduce-scatters grad_x while grad_W = g^T x is computed. The price: one more
all-gather per column-parallel layer in backward, for (1 - 1/tp) b s in elements less kept.

sum_grad_over_tp is for parameters replicated over TP whose ranks see different data: norm weights and
row-parallel biases in the SP region (each rank its own positions), q/k norms (each rank its heads),
and the replicas of a QKV slice shared by several ranks (tp > query groups).

All take the group explicitly. gloo's all_gather_into_tensor / reduce_scatter_tensor work along dim 0
only, so a gather / reduce-scatter along another dim moves that dim to the front and back (a copy; the
TP traffic is the cost anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megazero import comm

SEQ_DIM = 1  # activations are batch-first [b, s, h]


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's chunk of `dim` (rank order)."""
    world = comm.group_size(group)
    if world == 1:
        return x
    assert x.shape[dim] % world == 0, f"dim {dim} of size {x.shape[dim]} not divisible by tp {world}"
    return x.chunk(world, dim=dim)[comm.group_rank(group)].contiguous()


def _gather_start(x: torch.Tensor, dim: int, group):
    """Start all-gathering `x` along `dim` (world > 1): returns the [world*n, ...] buffer, `dim` moved to
    the front (gloo gathers along dim 0 only), and the handle; `_finish` waits and moves `dim` back."""
    front = x.movedim(dim, 0).contiguous()  # [n, ...]
    out = front.new_empty((front.shape[0] * comm.group_size(group), *front.shape[1:]))
    return out, comm.all_gather_async(out, front, group)


def _reduce_scatter_start(x: torch.Tensor, dim: int, group):
    """Start a sum reduce-scatter of `x` along `dim` (world > 1): returns the [n/world, ...] buffer, `dim`
    in front, and the handle."""
    world = comm.group_size(group)
    assert x.shape[dim] % world == 0, f"dim {dim} of size {x.shape[dim]} not divisible by tp {world}"
    front = x.movedim(dim, 0).contiguous()  # [n, ...]
    out = front.new_empty((front.shape[0] // world, *front.shape[1:]))
    return out, comm.reduce_scatter_async(out, front, group)


def _finish(front: torch.Tensor, handle, dim: int) -> torch.Tensor:
    """Wait for a started gather / reduce-scatter; its buffer with the front dim moved back to `dim`."""
    if handle is not None:
        handle.wait()
    return front.movedim(0, dim).contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim` (rank order): [.., n, ..] -> [.., world*n, ..]."""
    if comm.group_size(group) == 1:
        return x
    return _finish(*_gather_start(x, dim, group), dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over the ranks, keep this rank's chunk of `dim`: [.., n, ..] -> [.., n/world, ..]."""
    if comm.group_size(group) == 1:
        return x
    return _finish(*_reduce_scatter_start(x, dim, group), dim)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce_(grad.contiguous(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce_(x.contiguous().clone(), group) if comm.group_size(group) > 1 else x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Split(torch.autograd.Function):
    """Keep this rank's chunk of `dim`; backward all-gathers the gradient along it."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    """All-gather along `dim`; backward keeps this rank's chunk of the gradient, summed over the ranks
    first (reduce-scatter) when each rank's gradient is a partial sum (`grad_is_partial`)."""

    @staticmethod
    def forward(ctx, x, group, dim, grad_is_partial):
        ctx.group, ctx.dim, ctx.grad_is_partial = group, dim, grad_is_partial
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQ_DIM, ctx.group), None


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the TP ranks holding the same slice (its
    replicas), through one all-reduce over the TP group of a [slices, *shape] buffer in which each rank
    fills its slice's row (the rest zero): no extra process groups. With one slice (a parameter
    replicated on every TP rank) the buffer is the gradient itself."""

    @staticmethod
    def forward(ctx, weight, group, num_slices: int, slice_index: int):
        ctx.group, ctx.num_slices, ctx.slice_index = group, num_slices, slice_index
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        if ctx.num_slices == 1:
            return comm.all_reduce_(grad.contiguous().clone(), ctx.group), None, None, None
        buf = grad.new_zeros((ctx.num_slices, *grad.shape))
        buf[ctx.slice_index] = grad
        comm.all_reduce_(buf, ctx.group)
        return buf[ctx.slice_index], None, None, None


class _LinearWithSequenceParallel(torch.autograd.Function):
    """y = gather_s(x) W^T + b for x [b, s/tp, in], W [out_local, in] (a parameter or a tensor derived
    from one), y [b, s, out_local]; saves x's shard and W, not the gathered input (table note **).

    Backward, g = dL/dy [b, s, out_local]: start the all-gather of x; grad_x = g W [b, s, in] (a partial
    sum over this rank's output columns); wait; start reduce-scatter of grad_x along s -> [b, s/tp, in];
    grad_W = g^T x_full and grad_b = sum of g over b, s (F.linear's backward: the same mm on the same
    [b*s, .] operands, so the gradients are those of F.linear on the gathered input); wait."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group = group
        ctx.save_for_backward(x, weight)
        return F.linear(_gather(x, SEQ_DIM, group), weight, bias)  # the gathered input is freed here

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        group, distributed = ctx.group, comm.group_size(ctx.group) > 1
        out = grad.shape[-1]
        grad_2d = grad.reshape(-1, out)  # [b*s, out_local]
        if need_w:  # overlaps the grad_x matmul
            gathering = _gather_start(x, SEQ_DIM, group) if distributed else None
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = grad_2d.mm(weight).view(*grad.shape[:-1], weight.shape[1])  # [b, s, in]
        if need_w:
            x_full = _finish(*gathering, SEQ_DIM) if distributed else x  # [b, s, in]
        if need_x and distributed:  # overlaps the grad_W matmul
            scattering = _reduce_scatter_start(grad_x, SEQ_DIM, group)
        if need_w:
            grad_w = grad_2d.t().mm(x_full.reshape(-1, x_full.shape[-1]))  # [out_local, in]
        if need_b:
            grad_b = grad_2d.sum(0)
        if need_x and distributed:
            grad_x = _finish(*scattering, SEQ_DIM)  # [b, s/tp, in]
        return grad_x, grad_w, grad_b, None


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _Split.apply(x, group, -1)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _Gather.apply(x, group, -1, False)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h] replicated -> [b, s/tp, h], this rank's positions."""
    return _Split.apply(x, group, SEQ_DIM)


def gather_from_sequence_parallel_region(x: torch.Tensor, group, tensor_parallel_output_grad: bool = True
                                         ) -> torch.Tensor:
    """[b, s/tp, h] -> [b, s, h] on every rank (see the table for the backward)."""
    return _Gather.apply(x, group, SEQ_DIM, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h] partial sums -> [b, s/tp, h], the sum's positions of this rank."""
    return _ReduceScatterToSP.apply(x, group)


def linear_with_sequence_parallel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group
                                  ) -> torch.Tensor:
    """x [b, s/tp, in] -> x_gathered W^T + b, [b, s, out_local]: a column-parallel matmul under SP that
    keeps only x's shard for backward (its gradient goes back reduce-scattered along s)."""
    return _LinearWithSequenceParallel.apply(x, weight, bias, group)


def sum_grad_over_tp(param: torch.Tensor, group, num_slices: int = 1, slice_index: int = 0) -> torch.Tensor:
    """`param` itself (a view); its gradient is summed over the TP ranks holding the same slice."""
    if group is None or comm.group_size(group) == 1:
        return param
    return _SumGradOverTP.apply(param, group, num_slices, slice_index)
