"""Normalisation layers (replicated on every TP rank), computed through megazero.ops: the fused CUDA
kernel where it can serve the call, else the pure-PyTorch reference. Parameter names (weight, bias),
shapes, inits and checkpoint layout are the same on both paths.

`grad_sum_group`: a TP group whose ranks normalise different data with the same (replicated) weights:
the sequence-parallel region (each rank its positions [b, s/tp, h]) and the q/k norms (each rank its
heads). Their weight gradients are then summed over that group in backward (sum_grad_over_tp), so every
rank holds the full gradient, as without the split; norms and checkpoints count tp rank 0's copy."""

from __future__ import annotations

import torch
from torch import nn

from megazero import ops
from megazero.tensor_parallel.collectives import sum_grad_over_tp
from megazero.tensor_parallel.init import constant_init, set_init


class LayerNorm(nn.Module):
    """nn.LayerNorm's math and parameter names (weight, bias); params carry layout-invariant inits.

    use_fused: try the fused CUDA kernel (megazero.ops dispatch; the model passes
    ModelConfig.fused_kernels, i.e. False under --no-fused-kernels)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype=torch.float32, device=None,
                 use_fused: bool = True, grad_sum_group=None):
        super().__init__()
        self.eps, self.use_fused, self.grad_sum_group = eps, use_fused, grad_sum_group
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        set_init(self.weight, constant_init(1.0))
        set_init(self.bias, constant_init(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grad_sum_group
        return ops.layer_norm(x, sum_grad_over_tp(self.weight, g), sum_grad_over_tp(self.bias, g), self.eps,
                              use_fused=self.use_fused)


class RMSNorm(nn.Module):
    """RMSNorm (Llama-style blocks): x * rsqrt(mean(x^2) + eps) * weight; one parameter, `weight`
    (init 1), the name Megatron and Hugging Face Llama use."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype=torch.float32, device=None,
                 use_fused: bool = True, grad_sum_group=None):
        super().__init__()
        self.eps, self.use_fused, self.grad_sum_group = eps, use_fused, grad_sum_group
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        set_init(self.weight, constant_init(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, sum_grad_over_tp(self.weight, self.grad_sum_group), self.eps, use_fused=self.use_fused)
