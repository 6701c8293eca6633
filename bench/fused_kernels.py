"""Fused CUDA kernels vs torch eager vs torch.compile: softmax (masked, causal), LayerNorm, RMSNorm.

    python bench/fused_kernels.py [--quick] [--ops ...] [--no-compile] [--peak-gbs 3350]

Needs a CUDA GPU (without one it prints a line and exits 0; `--cpu-check` runs the harness on CPU with
tiny shapes and no fused rows, to check the script, not to measure). For every op, shape, dtype and
direction (fwd, bwd) it times:

- fused:    megatron_kernels.fused_cuda's raw ops (forward; backward from saved outputs / statistics);
- eager:    the numeric spec megazero/ops/reference.py (plain torch ops, autograd for the backward);
- compile:  torch.compile of that eager function (inductor; backward through AOTAutograd);
- torch.*:  the closest native torch kernel: F.layer_norm, F.rms_norm, and torch.softmax(x) without
            scale or mask (less work than the op: a speed-of-light row, not a drop-in replacement).

Timing: CUDA events around each call, after zeroing a buffer of 2x the L2 size so no call finds its
inputs in L2 (several norm shapes fit in an H100's 50 MB L2); median over --reps calls after warm-up.

Byte model (useful bytes, the minimum any implementation must move; GB/s = bytes / median time, the
same bytes for every row of a case, so GB/s ranks rows exactly as time does). s = element size,
N = b*h*sq*sk, R x H = rows x hidden:
    softmax fwd: read x, write y                        2*N*s   (+ b*sq*sk B of bool mask, masked)
    softmax bwd: read dy and saved y, write dx          3*N*s   (+ the mask)
    norm fwd:    read x, weight (+bias); write y and the fp32 statistics saved for backward
                 (rstd, + mean for LayerNorm)           2*R*H*s + p*H*s + 4*p*R       (p = 2 LN, 1 RMS)
    norm bwd:    read dy, saved x, weight, statistics; write dx, dweight (+dbias)
                                                        3*R*H*s + (1+p)*H*s + 4*p*R
The causal softmax model counts the whole row (the masked upper triangle is still written, as zeros).
%peak is against the device's spec memory bandwidth (table below or --peak-gbs); %copy against a
device-to-device copy measured in the same run (read + write), the practical limit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megazero.ops import reference  # noqa: E402

# Spec HBM bandwidth, GB/s, matched as substrings of torch.cuda.get_device_name() in this order
# (more specific names first: "GH200" contains "H200", "A100" contains "A10").
PEAK_GBS = [
    ("GH200", 4000),  # the HBM3 GH200; the HBM3e one has 4900: pass --peak-gbs
    ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
    ("H800", 3350), ("A100 80GB PCIe", 1935), ("A100-SXM4-80GB", 2039), ("A100", 1555),
    ("L40S", 864), ("L40", 864), ("L4", 300), ("A10", 600), ("V100", 900),
]
OPS = ("softmax_masked", "softmax_causal", "layer_norm", "rms_norm")
SOFTMAX_SHAPES = [(8, 12, 1024, 1024), (4, 16, 2048, 2048)]  # GPT-2 small / medium-like [b, h, sq, sk]
NORM_SHAPES = [(16384, 1024), (16384, 4096), (8192, 8192)]   # [tokens, hidden]
SOFTMAX_DTYPES = (torch.float16, torch.bfloat16)
NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-5
# Loose: catches a wrong call or argument order, not rounding (the tests own the tolerances).
SANITY_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def peak_gbs(name: str) -> float | None:
    for key, gbs in PEAK_GBS:
        if key in name:
            return float(gbs)
    return None


class Timer:
    """Median seconds per call: CUDA events with an L2 flush before each call, or wall clock on CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.flush = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
            self.flush = torch.empty(2 * l2, dtype=torch.uint8, device=device)

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):  # also triggers torch.compile and lazy init
            fn()
        times = []
        if self.flush is None:
            for _ in range(self.reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        else:
            torch.cuda.synchronize(self.device)
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
            for start, end in ev:
                self.flush.zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(self.device)
            times = [start.elapsed_time(end) / 1e3 for start, end in ev]
        times.sort()
        return times[len(times) // 2]


def copy_gbs(device, timer) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes), the practical limit."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / t / 1e9


def _autograd_bwd(fn, inputs, dy):
    """A backward-only callable: the graph is built once, each call replays it (retain_graph)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)


def _maybe_compile(fn, enabled):
    return torch.compile(fn, dynamic=False) if enabled else None


def softmax_case(kind, shape, dtype, device, fused, use_compile):
    """-> (bytes fwd, bytes bwd, {dir: [(method, fn)]}, sanity pairs)."""
    b, _, sq, sk = shape
    s = torch.finfo(dtype).bits // 8
    x = torch.randn(shape, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    scale = 1.0 / math.sqrt(64)
    mask = torch.rand(b, 1, sq, sk, device=device) < 0.1 if kind == "masked" else None
    mask_b = mask.numel() if mask is not None else 0
    n = x.numel()
    if kind == "masked":
        def eager(t):
            return reference.scaled_masked_softmax(t, mask, scale)
    else:
        def eager(t):
            return reference.scaled_causal_softmax(t, scale)
    comp = _maybe_compile(eager, use_compile)

    def plain(t):
        return torch.softmax(t, dim=-1)

    fwd = [("eager (reference.py)", lambda: eager(x))]
    bwd = [("eager (reference.py)", _autograd_bwd(eager, [x], dy))]
    if comp is not None:
        fwd.append(("torch.compile(eager)", lambda: comp(x)))
        bwd.append(("torch.compile(eager)", _autograd_bwd(comp, [x], dy)))
    fwd.append(("torch.softmax, no scale/mask", lambda: plain(x)))
    bwd.append(("torch.softmax, no scale/mask", _autograd_bwd(plain, [x], dy)))
    sanity = []
    if fused is not None:
        if kind == "masked":
            y = fused.scaled_masked_softmax_forward(x, mask, scale)
            f_fwd = lambda: fused.scaled_masked_softmax_forward(x, mask, scale)
            f_bwd = lambda: fused.scaled_masked_softmax_backward(dy, y, mask, scale)
        else:
            y = fused.scaled_causal_softmax_forward(x, scale)
            f_fwd = lambda: fused.scaled_causal_softmax_forward(x, scale)
            f_bwd = lambda: fused.scaled_causal_softmax_backward(dy, y, scale)
        fwd.insert(0, ("fused", f_fwd))
        bwd.insert(0, ("fused", f_bwd))
        sanity = [("fwd", y, eager(x)), ("bwd dx", f_bwd(), bwd[1][1]()[0])]
    return 2 * n * s + mask_b, 3 * n * s + mask_b, {"fwd": fwd, "bwd": bwd}, sanity


def norm_case(kind, shape, dtype, device, fused, use_compile):
    rows, hidden = shape
    s = torch.finfo(dtype).bits // 8
    rms = kind == "rms_norm"
    p = 1 if rms else 2
    x = torch.randn(shape, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    w = 1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)
    bias = None if rms else 0.1 * torch.randn(hidden, device=device, dtype=dtype)
    params = [w] if rms else [w, bias]
    if rms:
        def eager(t, w_):
            return reference.rms_norm(t, w_, EPS)

        def native(t, w_):
            return F.rms_norm(t, (hidden,), w_, EPS)
        native_name = "F.rms_norm"
    else:
        def eager(t, w_, b_):
            return reference.layer_norm(t, w_, b_, EPS)  # = F.layer_norm: eager and native coincide

        native, native_name = None, None
    comp = _maybe_compile(eager, use_compile)
    fwd = [("eager (reference.py)", lambda: eager(x, *params))]
    bwd = [("eager (reference.py)", _autograd_bwd(eager, [x, *params], dy))]
    if comp is not None:
        fwd.append(("torch.compile(eager)", lambda: comp(x, *params)))
        bwd.append(("torch.compile(eager)", _autograd_bwd(comp, [x, *params], dy)))
    if native is not None and hasattr(F, "rms_norm"):
        fwd.append((native_name, lambda: native(x, w)))
        bwd.append((native_name, _autograd_bwd(native, [x, w], dy)))
    sanity = []
    if fused is not None:
        y, mean, rstd = fused.norm_forward(x, w, bias, EPS, rms)
        fwd.insert(0, ("fused", lambda: fused.norm_forward(x, w, bias, EPS, rms)))
        f_bwd = lambda: fused.norm_backward(dy, x, w, mean, rstd, rms)
        bwd.insert(0, ("fused", f_bwd))
        ref_grads = bwd[1][1]()
        got = f_bwd()
        sanity = [("fwd", y, eager(x, *params)), ("bwd dx", got[0], ref_grads[0]),
                  ("bwd dweight", got[1], ref_grads[1])]
    rh = rows * hidden
    return (2 * rh * s + p * hidden * s + 4 * p * rows,
            3 * rh * s + (1 + p) * hidden * s + 4 * p * rows, {"fwd": fwd, "bwd": bwd}, sanity)


def check_sanity(sanity, dtype, label):
    for what, got, want in sanity:
        err = (got.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-6)
        if not err <= SANITY_TOL[dtype]:
            print(f"  WARNING {label} {what}: fused differs from eager by {err:.2e} of max |eager| "
                  f"(> {SANITY_TOL[dtype]:.0e}); its timing may not mean anything")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--quick", action="store_true", help="first shape of each op, bf16 only")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per row (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-gbs", type=float, default=None, help="device memory bandwidth, GB/s "
                    "(default: from the device name)")
    ap.add_argument("--cpu-check", action="store_true",
                    help="no GPU: run the harness on CPU with tiny shapes (checks the script only)")
    args = ap.parse_args()
    ops = [o for o in args.ops.split(",") if o]
    unknown = set(ops) - set(OPS)
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; choose from {','.join(OPS)}")

    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
        softmax_shapes, norm_shapes = SOFTMAX_SHAPES, NORM_SHAPES
        softmax_dtypes, norm_dtypes = SOFTMAX_DTYPES, NORM_DTYPES
    elif args.cpu_check:
        device, name = torch.device("cpu"), "CPU (--cpu-check: harness check, not a benchmark)"
        softmax_shapes, norm_shapes = [(2, 2, 64, 64)], [(64, 256)]
        softmax_dtypes, norm_dtypes = (torch.bfloat16,), (torch.float32, torch.bfloat16)
        args.reps, args.warmup = min(args.reps, 3), 1
    else:
        print("bench/fused_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.")
        return 0
    if args.quick:
        softmax_shapes, norm_shapes = softmax_shapes[:1], norm_shapes[:1]
        softmax_dtypes, norm_dtypes = (torch.bfloat16,), (torch.bfloat16,)

    fused, why = None, "CPU run"
    if device.type == "cuda":
        from megatron_kernels import fused_cuda
        fused, why = fused_cuda.extension(), fused_cuda.unavailable_reason()
    timer = Timer(device, args.reps, args.warmup)
    peak = args.peak_gbs or (peak_gbs(name) if device.type == "cuda" else None)
    copy = copy_gbs(device, timer)
    print(f"device: {name}; torch {torch.__version__}; peak {f'{peak:.0f} GB/s' if peak else 'unknown (--peak-gbs)'}"
          f"{' (--peak-gbs)' if args.peak_gbs else ''}; D2D copy {f'{copy:.0f} GB/s' if copy else 'n/a'}"
          f"{f' = {100 * copy / peak:.0f}% of peak' if copy and peak else ''}")
    if fused is None:
        print(f"fused kernels unavailable ({why}): fused rows left out")
    print(f"ms = median per call{' (L2 flushed before each)' if device.type == 'cuda' else ''}; "
          "GB/s = useful bytes / time (model in the docstring); vs eager = eager ms / ms")
    hdr = (f"{'op':<15} {'shape':<20} {'dtype':<5} {'dir':<3} {'method':<29} {'ms':>8} {'GB/s':>7} "
           f"{'%peak':>6} {'%copy':>6} {'vs eager':>8}")
    print(hdr)
    print("-" * len(hdr))
    short = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for op in ops:
        is_softmax = op.startswith("softmax")
        for shape in softmax_shapes if is_softmax else norm_shapes:
            for dtype in softmax_dtypes if is_softmax else norm_dtypes:
                torch._dynamo.reset()  # a fresh compile cache per case: no recompile limit, no dynamic shapes
                build = softmax_case if is_softmax else norm_case
                kind = op.split("_", 1)[1] if is_softmax else op
                label = f"{op} {'x'.join(map(str, shape))} {short[dtype]}"
                try:
                    b_fwd, b_bwd, methods, sanity = build(kind, shape, dtype, device, fused,
                                                          not args.no_compile)
                except torch.OutOfMemoryError as exc:
                    print(f"{label}: skipped, out of memory ({str(exc).splitlines()[0]})")
                    continue
                check_sanity(sanity, dtype, label)
                for direction, nbytes in (("fwd", b_fwd), ("bwd", b_bwd)):
                    lead = f"{op:<15} {'x'.join(map(str, shape)):<20} {short[dtype]:<5} {direction:<3}"
                    timed = []
                    for method, fn in methods[direction]:
                        try:
                            timed.append((method, timer(fn)))
                        except Exception as exc:  # e.g. a compile failure: report, keep going
                            timed.append((method, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
                    t_eager = next((t for m, t in timed if m.startswith("eager") and isinstance(t, float)), None)
                    for method, t in timed:
                        if isinstance(t, str):
                            print(f"{lead} {method:<29} {t}")
                            continue
                        gbs = nbytes / t / 1e9
                        pk = f"{100 * gbs / peak:5.0f}%" if peak else f"{'n/a':>6}"
                        cp = f"{100 * gbs / copy:5.0f}%" if copy else f"{'n/a':>6}"
                        vs = f"{t_eager / t:7.2f}x" if t_eager else f"{'n/a':>8}"
                        print(f"{lead} {method:<29} {t * 1e3:8.3f} {gbs:7.1f} {pk} {cp} {vs}")
                del methods, sanity
    return 0


if __name__ == "__main__":
    sys.exit(main())
