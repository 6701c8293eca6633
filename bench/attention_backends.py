"""megazero's attention backends side by side: core_attention (megazero/model/attention.py) with
backend sdpa / fused / unfused, forward and forward+backward time, at a few shapes including grouped-
query attention (k, v with fewer heads than q), and each backend's max |difference| from the unfused
reference (the plain fp32 softmax of q k^T / sqrt(d) with the causal mask, megazero/ops/reference.py).

    sdpa      torch.nn.functional.scaled_dot_product_attention(is_causal=True); `auto` is this one
    fused     q k^T, then megazero.ops.scaled_causal_softmax: megatron_kernels' fused scaled causal
              softmax on CUDA (JIT-built on first use), the PyTorch reference elsewhere (the output says
              which path it took and why), then probs @ v
    unfused   q k^T, ops.reference.scaled_causal_softmax, probs @ v

For GQA shapes core_attention repeats k and v to the query heads (repeat_interleave) before fused and
unfused, and before sdpa on CPU; sdpa on CUDA takes the groups as they are (enable_gqa). One more row,
`sdpa enable_gqa`, calls SDPA with the groups directly (no repeat): what core_attention's sdpa does on
CUDA and what Hugging Face's Llama does on any device when there is no mask. On CPU it shows what the
repeat costs or saves.

Timing: every method runs once per round, in turn (the order rotating from round to round), over --reps
rounds after --warmup (the machine is shared and noisy: a burst of someone else's work lands in one
round of every method, not in all rounds of one); each cell is the median over the rounds. fwd:
forward only, under no_grad. fwd+bwd: forward with inputs that need gradients, then backward of the
output with a fixed random gradient. On CUDA, each call is synchronised. `vs sdpa` = the method's
fwd+bwd time / sdpa's (> 1: slower than sdpa).
max|dout| and max|dgrad| compare the output and the gradients of q, k, v with the unfused reference's.

    python bench/attention_backends.py                           # 4 shapes, fp32, ~1 min on 2 cores
    python bench/attention_backends.py --shapes 2x32x8x1024x64 --reps 9
    python bench/attention_backends.py --threads 2 --dtype bf16
    python bench/attention_backends.py --device cuda --dtype bf16   # GPU: the fused kernel runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megazero import ops  # noqa: E402
from megazero.model.attention import core_attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# b x q-heads x kv-heads x seq x head_dim
DEFAULT_SHAPES = [
    "8x8x8x256x32",    # llama-tiny's heads with every head its own k/v (MHA)
    "8x8x2x256x32",    # llama-tiny: 8 query heads in 2 key/value groups (GQA 4:1)
    "4x12x12x512x64",  # GPT-2 small's heads at seq 512
    "1x32x8x1024x64",  # Llama 3 8B's head layout (GQA 4:1) at seq 1024
]
METHODS = ["sdpa", "fused", "unfused", "sdpa enable_gqa"]


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    try:
        b, nq, nkv, s, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: want BxHQxHKVxSxD, e.g. 8x8x2x256x32") from None
    if min(b, nq, nkv, s, d) < 1 or nq % nkv:
        raise argparse.ArgumentTypeError(f"shape {text!r}: sizes must be >= 1 and q-heads a multiple of kv-heads")
    return b, nq, nkv, s, d


def attention(method: str, q, k, v):
    if method == "sdpa enable_gqa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=q.shape[-1] ** -0.5,
                                              enable_gqa=k.shape[1] != q.shape[1])
    return core_attention(q, k, v, backend=method, dropout_p=0.0, use_fused=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_shape(shape, methods, args, device, dtype) -> dict:
    b, nq, nkv, s, d = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    q0, k0, v0 = (torch.randn(b, n, s, d, generator=gen).to(device, dtype) for n in (nq, nkv, nkv))
    dy = torch.randn(b, nq, s, d, generator=gen).to(device, dtype)

    def fwd(method):
        with torch.no_grad():
            return attention(method, q0, k0, v0)

    def fwd_bwd(method):
        q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
        out = attention(method, q, k, v)
        out.backward(dy)
        return out.detach(), (q.grad, k.grad, v.grad)

    ref_out, ref_grads = fwd_bwd("unfused")
    result = {}
    for m in methods:
        out, grads = fwd_bwd(m)
        result[m] = {"dout": (out.float() - ref_out.float()).abs().max().item(),
                     "dgrad": max((g.float() - r.float()).abs().max().item() for g, r in zip(grads, ref_grads)),
                     "fwd": [], "fb": []}
    del ref_out, ref_grads
    for rep in range(args.warmup + args.reps):
        for m in methods[rep % len(methods):] + methods[:rep % len(methods)]:  # rotate: no method always first
            for key, fn in (("fwd", fwd), ("fb", fwd_bwd)):
                sync(device)
                t0 = time.perf_counter()
                fn(m)
                sync(device)
                if rep >= args.warmup:
                    result[m][key].append(time.perf_counter() - t0)
    for m in methods:
        for key in ("fwd", "fb"):
            result[m][key] = 1000 * statistics.median(result[m][key])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                    metavar="BxHQxHKVxSxD", help=f"batch x query heads x key/value heads x seq x head dim "
                    f"(default: {' '.join(DEFAULT_SHAPES)})")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per shape (median)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)

    load = os.getloadavg()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"machine: {os.cpu_count()} cores, load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"torch {torch.__version__}; {where}; {args.dtype}; causal, no dropout")
    print(f"ms = median of {args.reps} interleaved rounds after {args.warmup} warm-up; vs sdpa = fwd+bwd time / "
          f"sdpa's; max|dout|, max|dgrad| (q, k, v) vs the unfused reference")
    ops.reset_dispatch_log()
    t_start = time.perf_counter()
    print(f"{'b x hq x hkv x s x d':<22}{'method':<17}{'fwd ms':>9}{'fwd+bwd ms':>12}{'vs sdpa':>9}"
          f"{'max|dout|':>11}{'max|dgrad|':>12}")
    slower_than = []
    for shape in args.shapes:
        methods = [m for m in METHODS if m != "sdpa enable_gqa" or shape[1] != shape[2]]
        res = run_shape(shape, methods, args, device, dtype)
        label = "x".join(map(str, shape)) + (" GQA" if shape[1] != shape[2] else "")
        for m in methods:
            r = res[m]
            print(f"{label:<22}{m:<17}{r['fwd']:>9.2f}{r['fb']:>12.2f}{r['fb'] / res['sdpa']['fb']:>9.2f}"
                  f"{r['dout']:>11.1e}{r['dgrad']:>12.1e}")
            label = ""
        fastest = min(("sdpa", "fused", "unfused"), key=lambda m: res[m]["fb"])
        if fastest != "sdpa":
            slower_than.append(f"{'x'.join(map(str, shape))}: {fastest} "
                               f"{res[fastest]['fb']:.2f} < sdpa {res['sdpa']['fb']:.2f} ms")
    elapsed = time.perf_counter() - t_start
    load = os.getloadavg()
    print(f"total {elapsed:.0f} s; load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    paths = ops.dispatch_paths().get("scaled_causal_softmax", {})
    print("fused backend's softmax took: " + "; ".join(
        f"{'megatron_kernels fused CUDA kernel' if p == 'fused' else 'the PyTorch reference'}"
        + (f" ({why})" if why else "") for p, why in paths.items())
        + (" -- so on this device `fused` computes what `unfused` does, plus the dispatch check"
           if "fused" not in paths else ""))
    print("claim (auto = sdpa is the fastest of sdpa / fused / unfused, fwd+bwd): "
          + ("holds at every shape" if not slower_than else "does NOT hold: " + "; ".join(slower_than)))


if __name__ == "__main__":
    main()
