"""Thin binding of the fused CUDA kernels (csrc/softmax_kernels.cu, csrc/norm_kernels.cu,
csrc/fused_cuda_bindings.cpp): scaled masked / causal softmax, LayerNorm and RMSNorm, fwd + bwd.

`extension()` returns the compiled module (prebuilt by setup.py as ``megatron_kernels._fused_cuda``,
else JIT-built and cached by `megatron_kernels.build.load_extension`) or None. Nothing is built at
import time: the first `extension()` call does it, and it is never attempted without a CUDA device
(so a CPU-only process never starts an nvcc build). Raw ops only; autograd pairing and fallbacks
live in megazero/ops/dispatch.py. Imports torch only.

Limits (mirrored from csrc/fused_kernels.cuh; the ops raise outside them):
    softmax: contiguous, 1 <= sk <= SOFTMAX_MAX_KEY_LENGTH, fp32/fp16/bf16, mask bool [b, 1|h, sq, sk]
    norms:   contiguous, 1 <= hidden <= NORM_MAX_HIDDEN, weight/bias dtype == input dtype
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (
    CSRC / "fused_cuda_bindings.cpp",
    CSRC / "softmax_kernels.cu",
    CSRC / "norm_kernels.cu",
)
NAME = "fused_cuda"

SOFTMAX_MAX_KEY_LENGTH = 4096
SOFTMAX_MASKED_VALUE = -10000.0
NORM_MAX_HIDDEN = 65536
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# torch adds -std and the half/bf16 defines itself; no --use_fast_math (the kernels call expf / rsqrtf).
CUDA_CFLAGS = ("-O3",)

_lock = threading.Lock()
_state: dict[str, object] = {}


def extension():
    """The compiled extension module or None (why: `unavailable_reason()`). Cached per process."""
    with _lock:
        if "mod" in _state:
            return _state["mod"]
        mod, reason = None, None
        if not torch.cuda.is_available():
            reason = "no CUDA device (torch.cuda.is_available() is False)"
        else:
            try:
                from megatron_kernels.build import build_error, load_extension
            except ImportError as exc:  # loader not present in this checkout
                reason = f"megatron_kernels.build unavailable: {exc}"
            else:
                mod = load_extension(NAME, [str(s) for s in SOURCES], cuda=True,
                                     extra_cuda_cflags=CUDA_CFLAGS)
                if mod is None:
                    reason = build_error(NAME) or "extension did not build"
        _state["mod"], _state["reason"] = mod, reason
        return mod


def is_available() -> bool:
    return extension() is not None


def unavailable_reason() -> str | None:
    extension()
    return _state.get("reason")  # type: ignore[return-value]


def _ext():
    mod = extension()
    if mod is None:
        raise RuntimeError(f"fused_cuda extension unavailable: {unavailable_reason()}")
    return mod


def scaled_masked_softmax_forward(x, mask, scale: float):
    return _ext().scaled_masked_softmax_forward(x, mask, float(scale))


def scaled_masked_softmax_backward(grad, y, mask, scale: float):
    return _ext().scaled_masked_softmax_backward(grad, y, mask, float(scale))


def scaled_causal_softmax_forward(x, scale: float):
    return _ext().scaled_causal_softmax_forward(x, float(scale))


def scaled_causal_softmax_backward(grad, y, scale: float):
    return _ext().scaled_causal_softmax_backward(grad, y, float(scale))


def norm_forward(x, weight, bias, eps: float, rms: bool):
    """-> (y, mean, rstd); mean is empty for RMSNorm."""
    return _ext().norm_forward(x, weight, bias, float(eps), bool(rms))


def norm_backward(grad, x, weight, mean, rstd, rms: bool):
    """-> (dx, dweight, dbias); dbias is empty for RMSNorm."""
    return _ext().norm_backward(grad, x, weight, mean, rstd, bool(rms))
