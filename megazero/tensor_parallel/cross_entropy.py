"""Cross-entropy over vocab-sharded logits, never materialising the full [.., V] logits on one rank.

Rank r holds logits z[..., v] for v in [start_r, end_r). With m = max_v z (all-reduce max),
S = sum_v exp(z_v - m) (all-reduce sum) and z_t the target's logit (owned by one rank; all-reduce sum
of the per-rank contributions, zero elsewhere):

    loss = log S - (z_t - m)
    d loss / d z_v = softmax_v - [v == t]

Vocabulary padding: columns >= the logical vocab size are set to -inf before the max, so they get
probability 0 and gradient 0 and the loss equals the unpadded model's loss whatever the padding.
Communication: three all-reduces of [..] (per-token scalars) instead of gathering [.., V].
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from megazero import comm


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, vocab_start, logical_vocab_size):
        # logits: [..., V_local] (any float dtype; math in fp32), target: [...] int64 global ids.
        v_local = logits.shape[-1]
        n_valid = logical_vocab_size - vocab_start  # columns of this shard that are real vocabulary
        # one fp32 copy at most: a fresh one where padding columns are masked (never the caller's tensor)
        logits = logits.to(torch.float32, copy=n_valid < v_local)
        if n_valid < v_local:
            logits[..., max(n_valid, 0):] = float("-inf")

        logits_max = logits.max(dim=-1).values
        comm.all_reduce_(logits_max, tp_group, op="max")
        shifted = logits - logits_max.unsqueeze(-1)

        outside = (target < vocab_start) | (target >= vocab_start + v_local)
        local_target = (target - vocab_start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        comm.all_reduce_(target_logit, tp_group, op="sum")

        exp = shifted.exp_()  # reuse `shifted` storage: [..., V_local]
        sum_exp = exp.sum(dim=-1)
        comm.all_reduce_(sum_exp, tp_group, op="sum")
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        # In place into the saved softmax (Megatron does the same): no [..., V_local] clone. So backward
        # runs once per graph: megazero never retains it (a second backward with retain_graph=True would
        # see the overwritten softmax); double backward is refused (once_differentiable).
        grad = softmax
        # subtract the one-hot of the target on the rank that owns it
        grad.scatter_add_(-1, local_target.unsqueeze(-1), (outside.float() - 1.0).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group,
                                 vocab_start: int, logical_vocab_size: int) -> torch.Tensor:
    """Per-token loss [...] (fp32) from local logits [..., V/tp]; see module docstring."""
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, vocab_start, logical_vocab_size)
