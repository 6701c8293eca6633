"""One dispatch API for megazero's fusable ops: the fused CUDA kernel when it can serve the call, else
the pure-PyTorch reference (megazero/ops/reference.py, the numeric spec).

Each op takes the reference's arguments plus ``use_fused`` (default True): True tries the kernel, False
forces the reference (``--no-fused-kernels``: the model passes ModelConfig.fused_kernels down to its
layers; there is no process-wide switch). The kernel path is taken only when all of these hold, else
the reference:

- use_fused, and torch autocast is not active (the reference keeps autocast's dtype rules);
- the tensor is on CUDA, with dtype float32 / float16 / bfloat16;
- the shapes are within the kernel limits (softmax: x [b, h, sq, sk] (masked) or [..., sq, sk]
  (causal), 1 <= sk <= 4096, mask broadcastable to [b, 1 or h, sq, sk]; norms: 1 <= hidden <= 65536,
  1-D weight (and bias) of the input's dtype, LayerNorm with a bias);
- the extension is available (prebuilt, or JIT-built on the first qualifying call; never attempted on
  a CPU-only process, and megatron_kernels is imported only then).

Every op logs once per path (logger ``megazero.ops``, INFO) which path it took and why it fell back;
`dispatch_paths()` returns the same record for tests and run summaries. Parameters are plain tensors
passed in by the caller, so parameter names and checkpoint layout never depend on the path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from megazero.ops import reference

logger = logging.getLogger("megazero.ops")

FUSED = "fused"
REFERENCE = "reference"

SOFTMAX_MAX_KEY_LENGTH = 4096  # = megatron_kernels.fused_cuda.SOFTMAX_MAX_KEY_LENGTH
NORM_MAX_HIDDEN = 65536  # = megatron_kernels.fused_cuda.NORM_MAX_HIDDEN
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_paths: dict[str, dict[str, str]] = {}  # op -> {path: first reason}
_callback: Callable[[str, str, str], None] | None = None


def set_dispatch_callback(fn: Callable[[str, str, str], None] | None) -> None:
    """Also call fn(op, path, reason) the first time each op takes each path."""
    global _callback
    _callback = fn


def dispatch_paths() -> dict[str, dict[str, str]]:
    """{op: {path: reason}} for every (op, path) taken so far in this process."""
    with _lock:
        return {op: dict(p) for op, p in _paths.items()}


def reset_dispatch_log() -> None:
    """Forget which paths were logged (tests)."""
    with _lock:
        _paths.clear()


def _record(op: str, path: str, reason: str) -> None:
    with _lock:
        seen = _paths.setdefault(op, {})
        if path in seen:
            return
        seen[path] = reason
    if path == FUSED:
        logger.info("megazero.ops: %s uses the fused CUDA kernel", op)
    else:
        logger.info("megazero.ops: %s uses the PyTorch reference (%s)", op, reason)
    if _callback is not None:
        _callback(op, path, reason)


def _fused_ext():
    """The fused_cuda module or None; imports megatron_kernels only here (lazy)."""
    try:
        from megatron_kernels import fused_cuda
    except ImportError:
        return None, "megatron_kernels not importable"
    if fused_cuda.extension() is None:
        return None, f"extension unavailable: {fused_cuda.unavailable_reason()}"
    return fused_cuda, ""


def _common_reason(x: torch.Tensor, use_fused: bool) -> str | None:
    """Why the fused path cannot serve x (None: it may, subject to the op's own limits)."""
    if not use_fused:
        return "fused kernels disabled"
    if not x.is_cuda:
        return f"tensor on {x.device.type}, kernels are CUDA-only"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} unsupported"
    if torch.is_autocast_enabled("cuda"):
        return "autocast active"
    return None


def _choose(op: str, reason: str | None):
    """(fused_cuda module or None) after the shape checks; records the path."""
    if reason is None:
        mod, why = _fused_ext()
        if mod is not None:
            _record(op, FUSED, "")
            return mod
        reason = why
    _record(op, REFERENCE, reason)
    return None


# --------------------------------------------------------------------------------------- softmax
class _ScaledMaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale, mod):
        y = mod.scaled_masked_softmax_forward(x, mask, scale)
        ctx.save_for_backward(y, mask) if mask is not None else ctx.save_for_backward(y)
        ctx.has_mask, ctx.scale, ctx.mod = mask is not None, scale, mod
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        y, mask = (saved[0], saved[1]) if ctx.has_mask else (saved[0], None)
        dx = ctx.mod.scaled_masked_softmax_backward(grad.contiguous(), y, mask, ctx.scale)
        return dx, None, None, None


class _ScaledCausalSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, mod):
        y = mod.scaled_causal_softmax_forward(x, scale)
        ctx.save_for_backward(y)
        ctx.scale, ctx.mod = scale, mod
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return ctx.mod.scaled_causal_softmax_backward(grad.contiguous(), y, ctx.scale), None, None


def _fused_mask(x: torch.Tensor, mask: torch.Tensor | None):
    """(mask as contiguous bool [b, 1|h, sq, sk] or None, reason it cannot be)."""
    if mask is None:
        return None, None
    if mask.dtype != torch.bool:
        return None, f"mask dtype {mask.dtype} (bool only)"
    if mask.device != x.device:
        return None, "mask on another device"
    if mask.dim() > 4:
        return None, "mask has more than 4 dims"
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    b, h, sq, sk = x.shape
    mh = h if m.size(1) == h else 1
    try:
        m = m.expand(b, mh, sq, sk)
    except RuntimeError:
        return None, f"mask {tuple(mask.shape)} not broadcastable to [b, 1|h, sq, sk]"
    return m.contiguous(), None


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor | None, scale: float, *,
                          use_fused: bool = True) -> torch.Tensor:
    """softmax(masked_fill(x * scale, mask, -10000)) over the last dim; mask True = masked."""
    reason = _common_reason(x, use_fused)
    fmask = None
    if reason is None:
        if x.dim() != 4:
            reason = f"x must be [b, h, sq, sk], got {x.dim()}-D"
        elif not 1 <= x.size(-1) <= SOFTMAX_MAX_KEY_LENGTH:
            reason = f"key length {x.size(-1)} outside [1, {SOFTMAX_MAX_KEY_LENGTH}]"
        else:
            fmask, reason = _fused_mask(x, mask)
    mod = _choose("scaled_masked_softmax", reason)
    if mod is None:
        return reference.scaled_masked_softmax(x, mask, scale)
    return _ScaledMaskedSoftmax.apply(x.contiguous(), fmask, float(scale), mod)


def scaled_causal_softmax(x: torch.Tensor, scale: float, *, use_fused: bool = True) -> torch.Tensor:
    """softmax of x * scale with keys c > query q masked (outputs exactly 0) over [..., sq, sk]."""
    reason = _common_reason(x, use_fused)
    if reason is None:
        if x.dim() < 2:
            reason = "x must be [..., sq, sk]"
        elif not 1 <= x.size(-1) <= SOFTMAX_MAX_KEY_LENGTH:
            reason = f"key length {x.size(-1)} outside [1, {SOFTMAX_MAX_KEY_LENGTH}]"
    mod = _choose("scaled_causal_softmax", reason)
    if mod is None:
        return reference.scaled_causal_softmax(x, scale)
    return _ScaledCausalSoftmax.apply(x.contiguous(), float(scale), mod)


# ----------------------------------------------------------------------------------------- norms
class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms, mod):
        y, mean, rstd = mod.norm_forward(x, weight, bias, eps, rms)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.rms, ctx.mod = rms, mod
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = ctx.mod.norm_backward(grad.contiguous(), x, weight, mean, rstd, ctx.rms)
        return dx, dw, (None if ctx.rms else db), None, None, None


def _norm_reason(x, weight, bias, use_fused, need_bias: bool) -> str | None:
    reason = _common_reason(x, use_fused)
    if reason is not None:
        return reason
    hidden = x.size(-1) if x.dim() else 0
    if not 1 <= hidden <= NORM_MAX_HIDDEN:
        return f"hidden size {hidden} outside [1, {NORM_MAX_HIDDEN}]"
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            if name == "bias" and need_bias:
                return "layer_norm without bias"
            continue
        if p.dim() != 1 or p.size(0) != hidden:
            return f"{name} shape {tuple(p.shape)} is not [{hidden}]"
        if p.dtype != x.dtype:
            return f"{name} dtype {p.dtype} != input dtype {x.dtype}"
        if p.device != x.device:
            return f"{name} on another device"
    return None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, *,
               use_fused: bool = True) -> torch.Tensor:
    """LayerNorm over the last dim (torch's F.layer_norm semantics)."""
    mod = _choose("layer_norm", _norm_reason(x, weight, bias, use_fused, need_bias=True))
    if mod is None:
        return reference.layer_norm(x, weight, bias, eps)
    return _FusedNorm.apply(x.contiguous(), weight.contiguous(), bias.contiguous(), float(eps), False, mod)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, use_fused: bool = True) -> torch.Tensor:
    """RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * weight, fp32 math."""
    mod = _choose("rms_norm", _norm_reason(x, weight, None, use_fused, need_bias=False))
    if mod is None:
        return reference.rms_norm(x, weight, eps)
    return _FusedNorm.apply(x.contiguous(), weight.contiguous(), None, float(eps), True, mod)
