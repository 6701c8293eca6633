"""The numeric spec of megazero's fused ops, in pure PyTorch (autograd gives the backward).

The CUDA kernels in megatron_kernels/ (dispatched by megazero/ops/dispatch.py) compute the same
functions with fp32 accumulation; tolerances are in tests/kernels/test_fused_kernels.py.

- scaled_masked_softmax(x, mask, scale): softmax over the last dim of x * scale with the positions
  where ``mask`` is True (masked, Megatron's convention) set to -10000.0 after scaling (Megatron's fill
  value, not -inf: a fully masked row becomes uniform 1/sk instead of NaN). x [b, heads, sq, sk]; mask
  bool broadcastable to x, the fused path takes [b, 1 or heads, sq, sk]; mask None = plain scaled
  softmax. Computed in fp32, rounded once to x.dtype.
- scaled_causal_softmax(x, scale): x [..., sq, sk]; key c masked for query row q when c > q
  (top-left aligned: torch.triu(ones, 1), as SDPA's is_causal); masked outputs are exactly 0.
- layer_norm(x, weight, bias, eps): torch's F.layer_norm over the last dim (biased variance;
  torch computes half/bf16 inputs in fp32 internally).
- rms_norm(x, weight, eps): x * rsqrt(mean(x^2) + eps) * weight over the last dim, in fp32,
  rounded once to x.dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASKED_VALUE = -10000.0


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    z = x.float() * scale
    if mask is not None:
        z = z.masked_fill(mask, MASKED_VALUE)
    return torch.softmax(z, dim=-1).to(x.dtype)


def scaled_causal_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    sq, sk = x.shape[-2], x.shape[-1]
    causal = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(1)
    z = (x.float() * scale).masked_fill(causal, float("-inf"))
    return torch.softmax(z, dim=-1).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)
