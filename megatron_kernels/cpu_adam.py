"""One-pass CPU Adam/AdamW: the compiled kernel when it builds, else a pure-PyTorch reference.

`cpu_adam_step` steps one flat fp32 shard (the ZeRO offload unit). Semantics, identical on both
paths (the reference below *is* the numeric spec, torch.optim.AdamW's own op sequence; the kernel follows
its operation order, fuses multiply-adds where torch's AVX2/AVX-512 kernels do, and takes the square
root from torch when torch's is not IEEE, so it equals torch.optim.AdamW bit for bit; see
docs/kernels.md):

    g = grad.float() * grad_scale                 # grad_scale = clip_coeff / loss_scale
    found_non_finite = any(!isfinite(g))
    if adamw: param *= 1 - lr * weight_decay      # decoupled decay first, as torch.optim.AdamW
    else:     g = g + weight_decay * param        # L2, as torch.optim.Adam(weight_decay=...)
    exp_avg    = lerp(exp_avg, g, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
    denom = sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps
    param = param - lr / (1 - beta1**step) * exp_avg / denom
    low_precision_out (bf16/fp16), if given = param rounded to nearest even

`step` is the step count *including* this update (1 on the first call), as torch's state["step"].

Non-finite contract: the step is one pass, so it writes even when it finds a non-finite gradient
(the affected elements become NaN/inf) and returns True. A caller that must leave the state
untouched on overflow checks first, either from its grad-norm sums (megazero's ZeRO optimizer
already skips the whole step when they are non-finite) or with `check_first=True`, a read-only
pre-pass over grad (4 of the 30 bytes per element the step moves) that returns True and modifies
nothing when a non-finite value is found.
"""

from __future__ import annotations

import math
import os
import platform
import re
import threading
from pathlib import Path

import torch

from .build import build_error, cpu_adam_extension

__all__ = ["cpu_adam_step", "cpu_adam_step_reference", "expected_isa", "has_non_finite", "kernel_available",
           "kernel_description", "kernel_isa", "kernel_sqrt", "sqrt_mode", "torch_sqrt_is_ieee"]


def _use_kernel() -> bool:
    return os.environ.get("MEGATRON_KERNELS_FORCE_REFERENCE", "0") in ("", "0")


_sqrt_probe: bool | None = None
_configured = threading.Lock()
_configured_ext = None


def torch_sqrt_is_ieee() -> bool:
    """Whether torch.sqrt on float32 CPU tensors is the correctly rounded (IEEE) square root here.

    It is not everywhere: torch's x86 wheels compute it with MKL VML (vmsSqrt, HA mode), which is IEEE
    on the CPUs MKL dispatches to its Intel code paths but off by 1 ulp on ~16% of inputs elsewhere
    (AMD EPYC). Probed once on 2^17 fixed inputs (a mantissa sweep of [1, 4) and random finite
    positive bit patterns, denormals included); each result r is checked exactly in float64: r is the
    rounded sqrt(x) iff x lies strictly between the squares of the midpoints to r's neighbours (those
    midpoints have 25 significant bits, so their squares are exact in float64).
    """
    global _sqrt_probe
    if _sqrt_probe is None:
        gen = torch.Generator().manual_seed(0x5157)
        sweep = 1.0 + 3.0 * torch.arange(1 << 16, dtype=torch.float64) / (1 << 16)
        bits = torch.randint(1, 0x7F7FFFFF, (1 << 16,), generator=gen, dtype=torch.int32)
        x = torch.cat([sweep.float(), bits.view(torch.float32)])
        r = torch.sqrt(x)
        xd, rd = x.double(), r.double()
        lo = (rd + torch.nextafter(r, torch.zeros_like(r)).double()) / 2
        hi = (rd + torch.nextafter(r, torch.full_like(r, math.inf)).double()) / 2
        _sqrt_probe = bool(((lo * lo < xd) & (xd < hi * hi)).all())
    return _sqrt_probe


def sqrt_mode() -> str:
    """The square root the kernel should use: MEGATRON_KERNELS_CPU_SQRT=torch|ieee forces one; by
    default (auto) 'ieee' (the hardware sqrt, one pass) where torch.sqrt is IEEE, else 'torch' (torch's
    own sqrt through ATen, bit-exact with torch.optim.AdamW whatever torch.sqrt computes)."""
    forced = os.environ.get("MEGATRON_KERNELS_CPU_SQRT", "auto").strip().lower()
    if forced in ("torch", "ieee"):
        return forced
    return "ieee" if torch_sqrt_is_ieee() else "torch"


def _extension():
    """The compiled extension with its sqrt mode set (once per process), or None."""
    global _configured_ext
    ext = cpu_adam_extension()
    if ext is not None and _configured_ext is not ext:
        with _configured:
            if _configured_ext is not ext:
                ext.set_sqrt_mode(sqrt_mode())
                _configured_ext = ext
    return ext


def kernel_available() -> bool:
    """True if the compiled kernel is importable or JIT-builds (the first call may compile)."""
    return _extension() is not None


def kernel_isa() -> str | None:
    """'avx512' / 'avx512-autovec' / 'avx2' / 'generic' for the compiled kernel, None if unavailable."""
    ext = _extension()
    return ext.isa() if ext is not None else None


def kernel_sqrt() -> str | None:
    """'torch' or 'ieee': the square root the compiled kernel uses; None if it is unavailable."""
    ext = _extension()
    return ext.sqrt_mode() if ext is not None else None


def kernel_description() -> str | None:
    """e.g. 'avx512, sqrt torch': what run logs and test messages show; None if unavailable."""
    ext = _extension()
    return f"{ext.isa()}, sqrt {ext.sqrt_mode()}" if ext is not None else None


def expected_isa() -> str | None:
    """The variant the kernel picks on this machine, predicted without building it (test ids): the
    same rule as pick_table() in csrc/cpu_adam.cpp, from /proc/cpuinfo. None where that is unreadable."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    try:
        found = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return None
    if found is None:
        return None
    flags = set(found.group(1).split())
    has512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    has2 = {"avx2", "fma", "f16c"} <= flags
    force = os.environ.get("MEGATRON_KERNELS_CPU_ISA", "")
    if force == "generic":
        return "generic"
    if force == "avx2" and has2:
        return "avx2"
    if force == "avx512-autovec" and has512:
        return "avx512-autovec"
    if force in ("", "avx512") and has512:
        return "avx512"
    return "avx2" if has2 else "generic"


def has_non_finite(grad: torch.Tensor, grad_scale: float = 1.0, *, use_kernel: bool | None = None) -> bool:
    """Read-only: whether any element of grad * grad_scale is inf or NaN."""
    ext = _extension() if (use_kernel if use_kernel is not None else _use_kernel()) else None
    if ext is not None and grad.dtype in (torch.float32, torch.bfloat16) and grad.is_contiguous():
        return bool(ext.nonfinite(grad, float(grad_scale)))
    g = grad.float() * grad_scale if grad_scale != 1.0 or grad.dtype != torch.float32 else grad
    return not bool(torch.isfinite(g).all())


def _check(param, grad, exp_avg, exp_avg_sq, low_precision_out, step):
    if param.dtype != torch.float32 or exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise ValueError("cpu_adam_step: param, exp_avg and exp_avg_sq must be float32")
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("low_precision_out", low_precision_out)):
        if t is not None and t.numel() != param.numel():
            raise ValueError(f"cpu_adam_step: {name} has {t.numel()} elements, param has {param.numel()}")
    if low_precision_out is not None and low_precision_out.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("cpu_adam_step: low_precision_out must be bfloat16 or float16")
    if step < 1:
        raise ValueError(f"cpu_adam_step: step must be >= 1 (the count including this update), got {step}")


def cpu_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    adamw: bool = True,
    low_precision_out: torch.Tensor | None = None,
    check_first: bool = False,
    use_kernel: bool | None = None,
) -> bool:
    """One Adam(W) step on flat CPU tensors, in place. Returns True if a non-finite grad was seen.

    With `check_first=True` a non-finite gradient leaves every tensor untouched. `use_kernel=False`
    (or MEGATRON_KERNELS_FORCE_REFERENCE=1) forces the reference.
    """
    _check(param, grad, exp_avg, exp_avg_sq, low_precision_out, step)
    want_kernel = use_kernel if use_kernel is not None else _use_kernel()
    ext = _extension() if want_kernel else None
    flat_ok = all(
        t.device.type == "cpu" and t.is_contiguous()
        for t in (param, grad, exp_avg, exp_avg_sq) + ((low_precision_out,) if low_precision_out is not None else ())
    ) and grad.dtype in (torch.float32, torch.bfloat16)
    if check_first and has_non_finite(grad, grad_scale, use_kernel=want_kernel):
        return True
    if ext is not None and flat_ok:
        return bool(
            ext.adam_step(param, grad, exp_avg, exp_avg_sq, low_precision_out, int(step), float(lr),
                          float(beta1), float(beta2), float(eps), float(weight_decay),
                          float(grad_scale), bool(adamw))
        )
    return cpu_adam_step_reference(
        param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, grad_scale=grad_scale, adamw=adamw, low_precision_out=low_precision_out,
    )


@torch.no_grad()
def cpu_adam_step_reference(
    param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
    weight_decay=0.0, grad_scale=1.0, adamw=True, low_precision_out=None,
) -> bool:
    """The numeric spec, in torch ops and in torch.optim.AdamW's / Adam's order (multi-pass)."""
    g = grad.float()
    if grad_scale != 1.0:
        g = g * grad_scale
    found = not bool(torch.isfinite(g).all())
    if adamw:
        if weight_decay != 0.0:
            param.mul_(1 - lr * weight_decay)
    elif weight_decay != 0.0:
        g = g.add(param, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    if low_precision_out is not None:
        low_precision_out.copy_(param)
    return found
