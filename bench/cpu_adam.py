"""CPU Adam benchmark: our one-pass step vs torch's multi-pass sequence, AdamW(foreach), DeepSpeedCPUAdam,
and a STREAM-style triad measured in the same run as the memory-bandwidth limit.

    python bench/cpu_adam.py [--sizes 10,50,100,200] [--repeats 5] [--threads 2]

Bytes the step must move per element: read grad, param, exp_avg, exp_avg_sq (4 x 4 B), write param,
exp_avg, exp_avg_sq (3 x 4 B) and the bf16 copy (2 B) = 30 B. "GB/s" for every row is 30 B x params
/ time (the *useful* bandwidth), so rows compare directly; the triad row is its real traffic
(read b, c, write a) over arrays
sized to the step's 30 B/param. %triad compares useful bytes with useful bytes: the step's 30 B/param
and STREAM's 12 B/elem both leave out the write-allocate reads the CPU adds for every written line
(the triad's real traffic, 16 B/elem, is printed as a second line for reference).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_kernels.cpu_adam import cpu_adam_step, kernel_isa  # noqa: E402

BYTES_PER_PARAM = 30


def timeit(fn, repeats):
    fn()  # warm-up (page faults, thread pool, lazy init)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def make(n):
    g = torch.randn(n)
    return g, torch.randn(n), torch.zeros(n), torch.zeros(n)


def bench_ours(n, repeats):
    g, p, m, v = make(n)
    low = torch.empty(n, dtype=torch.bfloat16)
    state = {"t": 0}

    def step():
        state["t"] += 1
        cpu_adam_step(p, g, m, v, step=state["t"], lr=1e-3, weight_decay=0.01, grad_scale=0.5,
                      low_precision_out=low)
    return timeit(step, repeats)


def _torch_opt(n, **kw):
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    return p, torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, **kw)


def fused_supported():
    try:
        p, opt = _torch_opt(16, fused=True)
        opt.step()
        return True
    except Exception:
        return False


def bench_torch_multipass(n, repeats, fused):
    p, opt = _torch_opt(n, **({"fused": True} if fused else {"foreach": True}))
    low = torch.empty(n, dtype=torch.bfloat16)

    def step():
        p.grad.mul_(0.5)          # unscale (1/loss scale) and clip coefficient in one multiply
        opt.step()
        low.copy_(p.detach())     # bf16 copy of the updated params
    return timeit(step, repeats)


def bench_foreach(n, repeats):
    p, opt = _torch_opt(n, foreach=True)
    return timeit(opt.step, repeats)


def bench_deepspeed(n, repeats):
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = torch.randn(n)
        opt = DeepSpeedCPUAdam([p], lr=1e-3, weight_decay=0.01, adamw_mode=True)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
    return timeit(opt.step, repeats), None


def bench_triad(n, repeats):
    # Three fp32 arrays totalling the step's 30 B/param: 10 B/param per array = 2.5 elements/param.
    k = int(n * BYTES_PER_PARAM / 12)
    a, b, c = torch.empty(k), torch.randn(k), torch.randn(k)
    t = timeit(lambda: torch.add(b, c, alpha=3.0, out=a), repeats)
    # STREAM counts 12 B/elem; the CPU also reads each written line first (write-allocate), so the
    # memory system really moved 16 B/elem. Our 30 B/param leaves write-allocate out too, so the
    # 12 B figure is the like-for-like limit.
    return t, k * 12 / t / 1e9, k * 16 / t / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,50,100,200", help="parameter counts in millions")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-deepspeed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fused = fused_supported()
    print(f"torch {torch.__version__}, threads: torch/OpenMP = {torch.get_num_threads()}, "
          f"kernel ISA = {kernel_isa() or 'unavailable (reference path)'}, "
          f"torch AdamW fused on CPU: {fused}")
    print(f"GB/s = {BYTES_PER_PARAM} B/param x params / time (useful bytes); %triad vs STREAM's 12 B/elem triad")
    hdr = f"{'params':>7} {'method':<34} {'ms':>9} {'Mparam/s':>9} {'GB/s':>7} {'%triad':>7} {'vs torch':>8} {'vs DS':>7}"
    print(hdr)
    print("-" * len(hdr))
    ds_err = None
    for size in [int(s) for s in args.sizes.split(",")]:
        n = size * 1_000_000
        t_triad, bw, bw16 = bench_triad(n, args.repeats)
        rows = [("ours one-pass (+bf16 copy)", bench_ours(n, args.repeats))]
        rows.append((f"torch multi-pass ({'fused' if fused else 'foreach'}+bf16)",
                     bench_torch_multipass(n, args.repeats, fused)))
        rows.append(("torch AdamW(foreach) alone", bench_foreach(n, args.repeats)))
        t_ds = None
        if not args.no_deepspeed:
            t_ds, ds_err = bench_deepspeed(n, args.repeats)
            if t_ds is not None:
                rows.append(("DeepSpeedCPUAdam (no bf16 copy)", t_ds))
        t_torch = rows[1][1]
        print(f"{size:>6}M {'STREAM triad a=b+s*c (12 B/elem)':<34} {t_triad * 1e3:9.1f} {'':>9} {bw:7.2f} {100.0:6.0f}%")
        print(f"{size:>6}M {'  (real traffic incl. write-alloc)':<34} {t_triad * 1e3:9.1f} {'':>9} {bw16:7.2f}")
        for name, t in rows:
            gbs = BYTES_PER_PARAM * n / t / 1e9
            vs_ds = f"{t_ds / t:6.2f}x" if t_ds else "    n/a"
            print(f"{size:>6}M {name:<34} {t * 1e3:9.1f} {n / t / 1e6:9.1f} {gbs:7.2f} "
                  f"{100 * gbs / bw:6.0f}% {t_torch / t:7.2f}x {vs_ds}")
    if ds_err:
        print(f"DeepSpeedCPUAdam unavailable: {ds_err}")


if __name__ == "__main__":
    main()
