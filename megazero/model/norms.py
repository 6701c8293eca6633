"""Normalisation layers (replicated on every TP rank). Issue 'megatron_kernels' swaps in fused kernels
behind the same parameter names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megazero.tensor_parallel.init import constant_init, set_init


class LayerNorm(nn.Module):
    """nn.LayerNorm's math and parameter names (weight, bias); params carry layout-invariant inits."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype=torch.float32, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        set_init(self.weight, constant_init(1.0))
        set_init(self.bias, constant_init(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
