"""CPU Adam benchmark: the one-pass step vs a native bandwidth limit, torch and DeepSpeed.

    python bench/cpu_adam.py [--sizes 10,50,100,200] [--repeats 5] [--threads N] [--quick]

Bytes the step must move per element: read grad, param, exp_avg, exp_avg_sq (4 x 4 B), write param,
exp_avg, exp_avg_sq (3 x 4 B) and the bf16 copy (2 B) = 30 B. Every row's GB/s is *useful* bytes /
time (30 B x params for the Adam rows, 28 B for those without the bf16 copy), so rows compare
directly.

The limit comes from two native kernels (bench/csrc/stream.cpp), built with the kernel's flags plus
-march=native (512-bit vectors) and run on the kernel's thread pool, thread count and chunking:
- a STREAM triad a = b + s*c over three fp32 arrays totalling the step's 30 B/param (12 B/elem);
- an "Adam-mix" stream over the step's own arrays: read 4 fp32, write 3 fp32 + 1 bf16, i.e. exactly
  the step's streams (30 B/elem) with almost no arithmetic.
limit = the faster of the two. All of these (and the step) use ordinary stores, so the CPU also
reads every written line first (write-allocate: real traffic is 16 B/elem for the triad, 44 B/param
for the step); useful bytes against useful bytes leaves that out on both sides.

Timing: one warm-up call, then --repeats rounds; our step, DeepSpeedCPUAdam, the triad and the
Adam-mix take turns within each round, so a burst of load elsewhere hits them alike; best of the
rounds. The torch rows are timed after, the same way but alone (best of --repeats). The
machine must be otherwise idle: "cpu share" is this process's CPU time over threads x wall time
during those rounds, and a share well below 100% means other processes took our cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from megatron_kernels.build import CPU_CFLAGS, CPU_LDFLAGS, build_error, load_extension  # noqa: E402
from megatron_kernels.cpu_adam import cpu_adam_step, kernel_isa  # noqa: E402

BYTES_PER_PARAM = 30
BYTES_NO_COPY = 28  # the same step without the bf16 copy (torch AdamW alone, DeepSpeedCPUAdam)
MIN_CPU_SHARE = 0.9  # below it the timings are another process's as much as ours
TARGET = 0.90  # the target: >= 90% of the limit for the bytes the step must move
STREAM_NAME = "mz_bench_stream"


def stream_extension():
    """The native bandwidth kernels (JIT-built once into megatron_kernels' locked cache) or None."""
    src = os.path.join(ROOT, "bench", "csrc", "stream.cpp")
    # The kernel's flags; -march=native with 512-bit vectors, as the kernel's AVX-512 body uses
    # (gcc's default tuning for this CPU prefers 256-bit).
    flags = CPU_CFLAGS + ("-march=native", "-mprefer-vector-width=512")
    return load_extension(STREAM_NAME, [src], extra_cflags=flags, extra_ldflags=CPU_LDFLAGS)


def llc_bytes():
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as fh:
            s = fh.read().strip()
        return int(s[:-1]) * {"K": 1 << 10, "M": 1 << 20}[s[-1]] if s[-1] in "KM" else int(s)
    except (OSError, ValueError, KeyError):
        return None


def timeit(fn, repeats):
    fn()  # warm-up (page faults, thread pool, lazy init)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def timeit_interleaved(fns, repeats):
    """Best time of each fn, the fns taking turns in every round; also the CPU share of the rounds."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    share = (time.process_time() - cpu0) / (torch.get_num_threads() * (time.perf_counter() - wall0))
    return best, share


def make(n):
    g = torch.randn(n)
    return g, torch.randn(n), torch.zeros(n), torch.zeros(n)


def ours_step(g, p, m, v, low):
    state = {"t": 0}

    def step():
        state["t"] += 1
        cpu_adam_step(p, g, m, v, step=state["t"], lr=1e-3, weight_decay=0.01, grad_scale=0.5,
                      low_precision_out=low)
    return step


def triad_arrays(n):
    # Three fp32 arrays totalling the step's 30 B/param: 10 B/param per array = 2.5 elements/param.
    k = int(n * BYTES_PER_PARAM / 12)
    return k, torch.empty(k), torch.randn(k), torch.randn(k)


def bench_limit_and_ours(ext, n, repeats, others=()):
    """-> ([(name, seconds, useful bytes)] of the native kernels, our step's seconds, the seconds of
    each of `others` (zero-arg steps timed in the same rounds), cpu share of the rounds)."""
    g, p, m, v = make(n)
    low = torch.empty(n, dtype=torch.bfloat16)
    fns = [ours_step(g, p, m, v, low), *others]
    refs = []
    if ext is not None:
        k, a, b, c = triad_arrays(n)
        fns += [lambda: ext.triad(a, b, c, 3.0), lambda: ext.adam_mix(p, g, m, v, low, 1e-3)]
    times, share = timeit_interleaved(fns, repeats)
    if ext is not None:
        refs = [("native triad a=b+s*c (12 B/elem)", times[-2], 12 * k),
                ("native Adam-mix 4R/3W+bf16 (30 B)", times[-1], BYTES_PER_PARAM * n)]
    return refs, times[0], times[1:1 + len(others)], share


def bench_torch_triad(n, repeats):
    # The previous limit, torch's add kernel: kept to show how it compares with the native triad.
    k, a, b, c = triad_arrays(n)
    return timeit(lambda: torch.add(b, c, alpha=3.0, out=a), repeats), 12 * k


def _torch_opt(n, **kw):
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    return p, torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, **kw)


def fused_supported():
    try:
        _, opt = _torch_opt(16, fused=True)
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
    _, opt = _torch_opt(n, foreach=True)
    return timeit(opt.step, repeats)


def deepspeed_step(n):
    """-> (DeepSpeedCPUAdam's step on n params, None) or (None, why it is unavailable)."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = torch.randn(n)
        opt = DeepSpeedCPUAdam([p], lr=1e-3, weight_decay=0.01, adamw_mode=True)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
    return opt.step, None


def pct(gbs, limit):
    return f"{100 * gbs / limit:6.0f}%" if limit else f"{'n/a':>7}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,50,100,200", help="parameter counts in millions")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--quick", action="store_true", help="sizes 10,50, 3 repeats, no DeepSpeed (~1 min)")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.repeats, args.no_deepspeed = "10,50", 3, True
    torch.set_num_threads(args.threads)
    fused = fused_supported()
    ext = stream_extension()
    llc = llc_bytes()
    print(f"torch {torch.__version__}, threads: torch/OpenMP = {torch.get_num_threads()}, "
          f"kernel ISA = {kernel_isa() or 'unavailable (reference path)'}, "
          f"torch AdamW fused on CPU: {fused}, LLC = {f'{llc / 2**20:.0f} MiB' if llc else 'unknown'}, "
          f"load average {os.getloadavg()[0]:.2f}")
    if ext is None:
        print(f"native bandwidth kernels unavailable ({build_error(STREAM_NAME)}): "
              "no limit, the target cannot be judged; torch.add triad shown for reference only")
    if not args.no_deepspeed:
        try:  # import (and its accelerator warning) before the table, not inside it
            import deepspeed.ops.adam  # noqa: F401
        except Exception:
            pass  # reported after the table by deepspeed_step
    print(f"GB/s = useful bytes / time (Adam rows: {BYTES_PER_PARAM} B/param, {BYTES_NO_COPY} without the "
          "bf16 copy); limit = max(native triad, native Adam-mix), best of repeats")
    hdr = (f"{'params':>7} {'method':<36} {'ms':>9} {'Mparam/s':>9} {'GB/s':>7} {'%limit':>7} "
           f"{'vs torch':>8} {'vs DS':>7}")
    print(hdr)
    print("-" * len(hdr))
    ds_err, verdicts = None, []
    for size in [int(s) for s in args.sizes.split(",")]:
        n = size * 1_000_000
        ds_step, ds_err = deepspeed_step(n) if not args.no_deepspeed else (None, None)
        # DeepSpeed, the main peer, runs in the same interleaved rounds as ours and the limit.
        refs, t_ours, t_others, share = bench_limit_and_ours(ext, n, args.repeats,
                                                             [ds_step] if ds_step else [])
        del ds_step  # frees its 16 B/param before the torch rows allocate theirs
        t_ds = t_others[0] if t_others else None
        limit = max((b / t / 1e9 for _, t, b in refs), default=None)
        refs.append(("torch.add triad (old limit)", *bench_torch_triad(n, args.repeats)))
        # (name, seconds, useful bytes/param): rows without the bf16 copy must move 28 B, not 30.
        rows = [("ours one-pass (+bf16 copy)", t_ours, BYTES_PER_PARAM)]
        rows.append((f"torch multi-pass ({'fused' if fused else 'foreach'}+bf16)",
                     bench_torch_multipass(n, args.repeats, fused), BYTES_PER_PARAM))
        rows.append(("torch AdamW(foreach) alone (28 B)", bench_foreach(n, args.repeats), BYTES_NO_COPY))
        if t_ds is not None:
            rows.append(("DeepSpeedCPUAdam (no bf16, 28 B)", t_ds, BYTES_NO_COPY))
        t_torch = rows[1][1]
        for name, t, b in refs:
            gbs = b / t / 1e9
            print(f"{size:>6}M {name:<36} {t * 1e3:9.1f} {'':>9} {gbs:7.2f} {pct(gbs, limit)}")
        for name, t, bpp in rows:
            gbs = bpp * n / t / 1e9
            vs_ds = f"{t_ds / t:6.2f}x" if t_ds else "    n/a"
            print(f"{size:>6}M {name:<36} {t * 1e3:9.1f} {n / t / 1e6:9.1f} {gbs:7.2f} "
                  f"{pct(gbs, limit)} {t_torch / t:7.2f}x {vs_ds}")
        frac = BYTES_PER_PARAM * n / t_ours / 1e9 / limit if limit else None
        verdicts.append((size, frac, share, llc is not None and BYTES_PER_PARAM * n < 2 * llc))
    if ds_err:
        print(f"DeepSpeedCPUAdam unavailable: {ds_err}")
    for size, frac, share, small in verdicts:
        head = f"target >= {TARGET:.0%} of the limit at {size}M:"
        if frac is None:
            print(f"{head} not judged (no native limit)")
        elif share is not None and share < MIN_CPU_SHARE:
            print(f"{head} not judged: cpu share {share:.0%}, other processes took our cores "
                  f"(measured {frac:.1%}; rerun on an idle machine)")
        else:
            note = "; footprint < 2x LLC, partly a cache number" if small else ""
            print(f"{head} {frac:.1%} -> {'met' if frac >= TARGET else 'NOT met'}  "
                  f"[cpu share {share:.0%}{note}]")

if __name__ == "__main__":
    main()
