"""Context parallelism (issue 14), the targets: a tiny Llama-style model (rope, GQA, SwiGLU, RMSNorm, no
dropout, fp32) over a long sequence, one training step per layout on real gloo processes (cp ranks =
processes; the step is the model chunk's forward + backward, as in bench/activation_memory.py).

1. Per-rank activation bytes at cp 1 / 2 / 4 (p2p and a2a): SavedTensorMeter's step peak vs the
   activation model extended for cp (`cp_model_bytes`: memory_model.py's segments at s / cp, with the
   core attention's saves replaced by what the ring / the all-to-all path keeps), within 5%; and the
   attention region (QKV, rope, core attention, dense input) per layer and rank vs 1/cp of cp 1's.
2. Bytes each rank sends on the cp group per step (comm.traffic): ring p2p vs (cp-1) local K/V blocks
   per layer forward and 2 (cp-1) backward (ring_send_bytes; the same as the issue's (cp-1)/cp of the
   whole sequence's K+V forward, twice that backward), a2a vs (cp-1)/cp of q, k, v, out per layer,
   forward and backward; within 2%.
3. The ring's communication not hidden behind compute: the ring attention op alone (forward +
   backward) timed as is, with every p2p transfer replaced by a local copy (the same compute, no
   communication), and the transfers alone (no compute); exposed share = (ring - local copy) / comm
   only; also the time spent in the transfers' wait().
4. Step time cp 1 / 2 / 4, p2p and a2a, side by side (no timing assertions).

    python bench/context_parallel.py                       # about 1 minute on 2 cores
    python bench/context_parallel.py --seq 1024 --steps 3  # quicker

PASS / FAIL is printed for the byte targets (1 and 2) only. The activation model's cp extension lives
here, not in megazero/activation/memory_model.py (it covers this bench's model: rope + GQA, no
recomputation, one microbatch, pp 1, tp 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from activation_memory import LLAMA, _mib  # noqa: E402

from megazero import comm  # noqa: E402
from megazero.activation import memory_model as mm  # noqa: E402
from megazero.activation.saved_tensors import SavedTensorMeter  # noqa: E402
from megazero.config import ActivationConfig, ModelConfig, ParallelConfig, RunConfig  # noqa: E402
from megazero.context_parallel import ring_attention as ring  # noqa: E402
from megazero.context_parallel import ring_send_bytes, shard_sequence  # noqa: E402
from megazero.context_parallel.all_to_all import kv_heads_for_a2a  # noqa: E402

CPS = (1, 2, 4)
E = 4  # fp32
ATTENTION_REGION = ("qkv", "rope", "core_attention", "dense")  # memory_model segment names


def model_config(args) -> ModelConfig:
    return ModelConfig(**{**LLAMA, "num_layers": args.layers, "hidden_size": args.hidden,
                          "num_attention_heads": args.heads, "num_query_groups": args.groups, "seq_length": args.seq})


def layouts() -> list[tuple[int, str]]:
    return [(1, "-")] + [(cp, c) for cp in CPS[1:] for c in ("p2p", "a2a")]


# ----- the activation model, extended for cp ---------------------------------------------------------
def _cp_attention(seg: mm.Seg, m_local: ModelConfig, cp: int, comm_type: str) -> mm.Seg:
    """One segment of memory_model's block at s/cp, with what the cp attention keeps instead of cp 1's
    core attention. p2p (RingAttention.save_for_backward(q, k, v, out, lse)): q after rope, contiguous
    copies of k (after rope) and v [b, nkv, s/cp, d] (not v's view of the fused QKV output), the output
    [b, nq, s/cp, d] and the fp32 lse [b, nq, s/cp]; k, v unrepeated (the ring repeats GQA groups per
    block, unsaved). a2a: the core
    attention on [b, nq/cp, s, d] keeps what cp 1's keeps at s/cp (same bytes: heads / cp x s = heads x
    s / cp), so its segment stays. Both: the output comes back [b, nq, s/cp, d] contiguous, so the dense
    layer's input (transpose + reshape) is a copy, not a view of the attention output as with CPU flash."""
    if cp == 1:
        return seg
    sh = mm._Shapes(m_local, ActivationConfig(), mm.Layout())
    b, s, a, g, d = sh.b, sh.s, sh.a_l, sh.g_l, sh.d
    prefix = seg.saves[0][0][:2] if seg.saves else None  # ("L", i)
    if seg.name == "core_attention" and comm_type == "p2p":
        assert m_local.position_embedding_type == "rope" and not m_local.qk_layernorm, "modelled: rope, no qk norm"
        return mm.Seg(seg.name, [(prefix + ("rope.q",), b * a * s * d * E, False),
                                 (prefix + ("ring.k",), b * g * s * d * E, False),
                                 (prefix + ("ring.v",), b * g * s * d * E, False),
                                 (prefix + ("ring.out",), b * a * s * d * E, False),
                                 (prefix + ("ring.lse",), b * a * s * mm.FP32, False)])
    if seg.name == "dense":
        return mm.Seg(seg.name, [(prefix + ("dense.in",), n, host) for _, n, host in seg.saves])
    return seg


def cp_model_bytes(m: ModelConfig, cp: int, comm_type: str) -> tuple[int, int]:
    """(step peak per rank, attention-region bytes per layer) of one microbatch at cp (pp 1, tp 1, no
    recomputation: nothing is saved during backward, so the peak is everything the forward saved)."""
    m_local = dataclasses.replace(m, seq_length=m.seq_length // cp)
    segs = [_cp_attention(seg, m_local, cp, comm_type)
            for seg in mm.chunk_segments(m_local, ActivationConfig(), mm.Layout(), range(m.num_layers), True, True)]
    storages = {key: n for seg in segs for key, n, _ in seg.saves}
    region = {key: n for seg in segs for key, n, _ in seg.saves  # layer 0's (its rope tables: ("shared", "L", 0, ..))
              if seg.name in ATTENTION_REGION and ("L", 0) in (key[:2], key[1:3])}
    return sum(storages.values()), sum(region.values())


# ----- theory of the cp group's traffic ---------------------------------------------------------------
def ring_theory(m: ModelConfig, cp: int, b: int = 1) -> tuple[int, float]:
    """(bytes one rank sends per step by ring_send_bytes, the same by the issue's whole-sequence
    phrasing: per layer (cp-1)/cp of K+V forward, twice that backward)."""
    k = torch.empty(b, m.query_groups, m.seq_length // cp, m.head_dim, device="meta")
    per_call = ring_send_bytes(k, k, cp)
    whole_kv = 2 * b * m.query_groups * m.seq_length * m.head_dim * E
    return m.num_layers * (per_call["forward"] + per_call["backward"]), m.num_layers * 3 * (cp - 1) / cp * whole_kv


def a2a_theory(m: ModelConfig, cp: int, b: int = 1) -> float:
    """Bytes one rank sends per step: per layer four all-to-alls forward (q, k, v: seq -> heads; the
    output: heads -> seq) and their four transposes backward, (cp-1)/cp of each local tensor
    [b, heads, s/cp, d] (k, v with kv_heads_for_a2a heads)."""
    heads = 2 * m.num_attention_heads + 2 * kv_heads_for_a2a(m.query_groups, cp)
    return m.num_layers * 2 * (cp - 1) / cp * heads * b * (m.seq_length // cp) * m.head_dim * E


# ----- measurement (runs in each gloo process) -------------------------------------------------------
def _stepper(rank: int, world: int, m: ModelConfig, comm_type: str):
    """This rank's model chunk at cp = world; returns step(meter) -> seconds of one forward + backward on
    this rank's load-balanced share of one sample (the global tokens are the same on every rank)."""
    from megazero.random import RNGStreams
    from megazero.topology import GridShape, Topology
    from megazero.training.model_builder import build_model_chunks

    parallel = ParallelConfig(context_parallel_size=world, cp_comm_type=comm_type if world > 1 else "p2p")
    cfg = RunConfig(model=m, activation=ActivationConfig(), parallel=parallel)
    cpu = torch.device("cpu")
    topo = Topology.build(GridShape(world, cp=world), rank)
    chunk = build_model_chunks(cfg, topo, RNGStreams(1234, topo.tp_rank, topo.pp_rank, cpu), cpu)[0]
    chunk.train()
    g = torch.Generator().manual_seed(7)

    def step(meter: SavedTensorMeter | None = None) -> float:
        tokens, labels = (shard_sequence(torch.randint(0, m.vocab_size, (1, m.seq_length), generator=g), 1,
                                         topo.cp_rank, world) for _ in range(2))
        dist.barrier()
        start = time.perf_counter()
        if meter is None:
            chunk(tokens, labels).mean().backward()
        else:
            meter.reset_peak()
            with meter.recording():
                chunk(tokens, labels).mean().backward()
        seconds = time.perf_counter() - start
        chunk.zero_grad(set_to_none=True)
        return seconds
    return step


def _ring_overlap(world: int, m: ModelConfig, reps: int) -> dict[str, list[float]]:
    """The ring attention op alone (forward + backward) on this rank's [1, heads, s/cp, d] q and
    [1, groups, s/cp, d] k, v, three ways, taken in turn each rep: "ring" as is (and "wait": the time
    inside its transfers' wait()), "local" with every transfer replaced by a local copy, "comm" the
    same transfers alone (forward cp-1 K/V posts, backward cp-1 K/V and cp-1 dK/dV posts)."""
    group = dist.group.WORLD
    s = m.seq_length // world
    g = torch.Generator().manual_seed(dist.get_rank())
    q = torch.randn(1, m.num_attention_heads, s, m.head_dim, generator=g, requires_grad=True)
    k, v = (torch.randn(1, m.query_groups, s, m.head_dim, generator=g, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)
    post, wait = ring._Ring.post, ring._Transfer.wait
    waited = [0.0]

    def timed_wait(self):
        t = time.perf_counter()
        try:
            return wait(self)
        finally:
            waited[0] += time.perf_counter() - t

    def local_post(self, tensors, tags):
        return ring._Transfer([t.contiguous().clone() for t in tensors], [], None)

    def op():
        ring.ring_attention(q, k, v, group).backward(dout)

    def comm_only():
        r = ring._Ring(group)
        for _ in range(world - 1):  # forward
            r.post((k.detach(), v.detach()), (1, 2)).wait()
        for _ in range(world - 1):  # backward: K/V and the travelling dK/dV
            a, b = r.post((k.detach(), v.detach()), (1, 2)), r.post((k.detach(), v.detach()), (3, 4))
            a.wait()
            b.wait()

    times: dict[str, list[float]] = {"ring": [], "wait": [], "local": [], "comm": []}
    try:
        for rep in range(reps + 1):  # the first: warm-up
            for mode in ("ring", "local", "comm"):
                ring._Ring.post = local_post if mode == "local" else post
                ring._Transfer.wait = timed_wait if mode == "ring" else wait
                waited[0] = 0.0
                dist.barrier()
                start = time.perf_counter()
                comm_only() if mode == "comm" else op()
                seconds = time.perf_counter() - start
                if rep:
                    times[mode].append(seconds)
                    if mode == "ring":
                        times["wait"].append(waited[0])
    finally:
        ring._Ring.post, ring._Transfer.wait = post, wait
    return times


def _worker(rank: int, world: int, port: int, out_dir: str, m: ModelConfig, steps: int, reps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1 if world > 1 else 2)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        comm_types = ("p2p", "a2a") if world > 1 else ("-",)
        steppers = {c: _stepper(rank, world, m, c) for c in comm_types}
        result: dict = {}
        for c, step in steppers.items():
            meter = SavedTensorMeter()
            comm.traffic.enabled = True
            comm.traffic.reset()
            step(meter)
            sent = comm.traffic.reset()
            comm.traffic.enabled = False
            result[c] = {"peak": meter.peak_bytes, "sent": sent, "times": []}
        for _ in range(steps):  # layouts in turn, so load changes hit all alike (the metered step: warm-up)
            for c, step in steppers.items():
                result[c]["times"].append(step())
        if world > 1:
            result["overlap"] = _ring_overlap(world, m, reps)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(world: int, m: ModelConfig, steps: int, reps: int) -> list[dict]:
    """One launch of `world` gloo processes (cp = world); the per-rank results."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, port, out_dir, m, steps, reps), nprocs=world, join=True,
                           start_method="spawn")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----- report ------------------------------------------------------------------------------------------
def _ok(good: bool) -> str:
    return "PASS" if good else "FAIL"


def memory_table(m: ModelConfig, runs: dict[int, list[dict]]) -> bool:
    print(f"\n### Activation bytes per rank (one step, micro batch 1, s {m.seq_length}, {m.num_layers} layers)\n")
    print("| cp | comm | model MiB | measured MiB (max rank) | model / measured | vs cp 1 measured | "
          "attention region per layer KiB (model) | x cp / cp 1's | |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    base_meas = max(r["-"]["peak"] for r in runs[1])
    base_region = cp_model_bytes(m, 1, "-")[1]
    for cp, c in layouts():
        model, region = cp_model_bytes(m, cp, c)
        measured = max(r[c]["peak"] for r in runs[cp])
        good = abs(model / measured - 1) <= 0.05
        ok &= good
        print(f"| {cp} | {c} | {_mib(model)} | {_mib(measured)} | {model / measured:.4f} | "
              f"{measured / base_meas:.3f} (1/cp = {1 / cp:.3f}) | {region / 1024:.1f} | "
              f"{region * cp / base_region:.3f} | {_ok(good)} |")
    print(f"\nmodel within 5% of measured at every cp: {_ok(ok)}")
    return ok


def traffic_table(m: ModelConfig, runs: dict[int, list[dict]]) -> bool:
    print("\n### Bytes each rank sends on the cp group per step\n")
    print("| cp | comm | measured MiB (max rank) | theory MiB | measured / theory | issue's formula MiB | "
          "other traffic | |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for cp, c in layouts():
        if cp == 1:
            continue
        kind = "p2p_send" if c == "p2p" else "all_to_all"
        measured = max(r[c]["sent"].get((kind, "cp"), 0.0) for r in runs[cp])
        other = sorted({k for r in runs[cp] for k in r[c]["sent"] if k != (kind, "cp")})
        if c == "p2p":
            theory, issue = ring_theory(m, cp)
            issue_cell = f"{_mib(issue)}"
        else:
            theory, issue_cell = a2a_theory(m, cp), "-"
        good = abs(measured / theory - 1) <= 0.02 and not other
        ok &= good
        print(f"| {cp} | {c} | {_mib(measured)} | {_mib(theory)} | {measured / theory:.4f} | {issue_cell} | "
              f"{', '.join(map(str, other)) or 'none'} | {_ok(good)} |")
    print(f"\ncp traffic within 2% of theory: {_ok(ok)}")
    return ok


def overlap_table(runs: dict[int, list[dict]]) -> None:
    """exposed = ring - local copy: what the op costs beyond its compute; not hidden = exposed / comm
    only, capped at 1 (above 1 the transfers cost more inside the op than alone: nothing hidden)."""
    print("\n### Ring attention op (forward + backward): communication not hidden\n")
    print("| cp | ring ms | local copy ms | exposed ms | comm only ms | not hidden (exposed / comm, cap 1) | "
          "in wait() ms | wait / ring |")
    print("|---|---|---|---|---|---|---|---|")
    for cp in CPS[1:]:
        med = {mode: max(statistics.median(r["overlap"][mode]) for r in runs[cp])
               for mode in ("ring", "local", "comm", "wait")}
        exposed = med["ring"] - med["local"]
        share = min(1.0, max(0.0, exposed / med["comm"]))
        print(f"| {cp} | {med['ring'] * 1e3:.1f} | {med['local'] * 1e3:.1f} | {exposed * 1e3:.1f} | "
              f"{med['comm'] * 1e3:.1f} | {share:.2f} ({exposed / med['comm']:.2f}) | {med['wait'] * 1e3:.1f} | "
              f"{med['wait'] / med['ring']:.2f} |")


def timing_table(m: ModelConfig, runs: dict[int, list[dict]]) -> None:
    print("\n### Step time (forward + backward of one sample; median over steps of the slowest rank)\n")
    print("| cp | comm | processes x threads | step s | vs cp 1 | tokens / s |")
    print("|---|---|---|---|---|---|")
    base = None
    for cp, c in layouts():
        per_step = [max(ts) for ts in zip(*(r[c]["times"] for r in runs[cp]))]
        t = statistics.median(per_step)
        base = base or t
        threads = 2 if cp == 1 else 1
        print(f"| {cp} | {c} | {cp} x {threads} | {t:.3f} | {t / base:.2f}x | {m.seq_length / t:,.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4, help="key/value groups (GQA)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions of the ring op per mode")
    args = ap.parse_args()
    m = model_config(args)
    start = time.time()
    print(f"Llama-style: {m.num_layers} layers, h {m.hidden_size}, {m.num_attention_heads} heads, "
          f"{m.query_groups} kv groups, s {m.seq_length}, vocab {m.vocab_size}, fp32, micro batch 1, no dropout")
    runs = {cp: launch(cp, m, args.steps, args.reps) for cp in CPS}
    ok = memory_table(m, runs)
    ok &= traffic_table(m, runs)
    overlap_table(runs)
    timing_table(m, runs)
    print(f"\n{_ok(ok)} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
