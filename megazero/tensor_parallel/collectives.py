"""Autograd functions that pair a forward collective with its backward over the TP group.

Megatron's four region boundaries (input/output of a TP region):

| function                 | forward                      | backward                    |
|--------------------------|------------------------------|-----------------------------|
| copy_to_tp_region        | identity                     | all-reduce (sum)            |
| reduce_from_tp_region    | all-reduce (sum)             | identity                    |
| scatter_to_tp_region     | keep this rank's last-dim chunk | all-gather along last dim |
| gather_from_tp_region    | all-gather along last dim    | keep this rank's chunk      |

All take the group explicitly. gloo's all_gather_into_tensor concatenates along dim 0 only, so the
last-dim gather moves that dim to the front and back (a copy; TP traffic is the cost anyway).
"""

from __future__ import annotations

import torch

from megazero import comm


def _split_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = comm.group_size(group)
    if world == 1:
        return x
    assert x.shape[-1] % world == 0, f"last dim {x.shape[-1]} not divisible by tp {world}"
    return x.chunk(world, dim=-1)[comm.group_rank(group)].contiguous()


def _gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = comm.group_size(group)
    if world == 1:
        return x
    # [..., n] -> [n, ...] -> gather -> [world*n, ...] -> [..., world*n]
    front = x.movedim(-1, 0)
    gathered = comm.all_gather_dim0(front, group)
    return gathered.movedim(0, -1).contiguous()


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


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromTP.apply(x, group)
