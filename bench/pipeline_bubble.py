"""Pipeline bubble, measured: a real pp=4 run over gloo (4 processes) through megazero's executor and
p2p, where every stage does a fixed, equal amount of work per microbatch (backward = 2 x forward).
For 1F1B and interleaved 1F1B (vp=2) at m = 4, 8, 16 microbatches it records each rank's compute
intervals and prints the measured bubble (idle / busy time per rank) next to the theory (p-1)/(v*m).

    python bench/pipeline_bubble.py                 # sleep-timed work (default)
    python bench/pipeline_bubble.py --work matmul   # real arithmetic: needs a free core per rank

Why sleep by default: this bench measures the *schedule*, and on a 2-core machine 4 ranks doing real
arithmetic would contend for cores, so a rank's compute time would depend on what the others do.
Timed work keeps per-microbatch cost fixed and equal, as the schedule theory assumes; everything else
(plans, executor, batched p2p over gloo, output deallocation) is the real code path. With interleaving
each of the v chunks does 1/v of the stage's work, as when a stage's layers are split into v chunks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megazero.pipeline_parallel.executor import PipelineExecutor  # noqa: E402
from megazero.pipeline_parallel.p2p import PipelineP2P  # noqa: E402
from megazero.pipeline_parallel.schedules import RECV_ACT, SEND_ACT, Action, build_all_plans, build_plan  # noqa: E402
from megazero.pipeline_parallel.simulate import simulate  # noqa: E402
from megazero.pipeline_parallel.timeline import make_timeline, measured_bubble  # noqa: E402
from megazero.topology import GridShape, Topology  # noqa: E402

PP = 4
SHAPE = (1, 4, 16)


class FixedWork(torch.autograd.Function):
    """Identity whose forward takes `seconds` and backward 2 x `seconds` of work."""

    @staticmethod
    def forward(ctx, x, seconds, kind):
        ctx.seconds, ctx.kind = seconds, kind
        _work(seconds, kind)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        _work(2 * ctx.seconds, ctx.kind)
        return grad * 1.0, None, None


def _work(seconds: float, kind: str) -> None:
    if kind == "sleep":
        time.sleep(seconds)
    else:  # spin on real matmuls until the time is used
        a = torch.randn(256, 256)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            a = torch.tanh(a @ a)


class Chunk(torch.nn.Module):
    def __init__(self, seconds: float, kind: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seconds, self.kind = seconds, kind

    def forward(self, x, labels=None):
        return FixedWork.apply(x * self.w, self.seconds, self.kind)

    def pipeline_activation(self, micro_batch_size: int):
        return (micro_batch_size, *SHAPE[1:]), torch.float32  # what crosses a stage boundary


def loss_fn(chunk, x, batch):
    return chunk(x).float().mean()


def worker(rank: int, world: int, port: int, cases, stage_seconds: float, kind: str, repeats: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    topo = Topology.build(GridShape(world, pp=PP), rank)
    results = {"latency": p2p_latency(topo)}
    for vp, m in cases:
        chunks = [Chunk(stage_seconds / vp, kind) for _ in range(vp)]
        p2p = PipelineP2P.for_chunks(chunks, SHAPE[0], topo.pp_ranks, topo.pp_rank, topo.pp_group, torch.device("cpu"))
        ex = PipelineExecutor(chunks, topo.pp_rank, PP, p2p, input_key="tokens")
        ex.record_timeline = True
        plan = build_plan(topo.pp_rank, PP, vp, m)
        batches = [{"tokens": torch.ones(SHAPE), "labels": torch.ones(SHAPE)} for _ in range(m)]
        ratios = []
        for _ in range(repeats + 1):  # first run warms up gloo connections
            dist.barrier(group=topo.pp_group)
            ex.run(plan, batches, loss_fn)
            gathered = [None] * PP
            dist.all_gather_object(gathered, ex.events, group=topo.pp_group)
            ratios.append(measured_bubble(make_timeline(PP, vp, m, gathered)))
        results[(vp, m)] = [statistics.median(r[i] for r in ratios[1:]) for i in range(PP)]
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def p2p_latency(topo: Topology, rounds: int = 50) -> float:
    """One-way time of an activation message between neighbouring stages: half the median ping-pong
    round trip of stage 0 <-> stage 1 through the same PipelineP2P path the executor uses."""
    p2p = PipelineP2P(topo.pp_ranks, topo.pp_rank, topo.pp_group, SHAPE, torch.float32, torch.device("cpu"))
    x, trips = torch.ones(SHAPE), []
    for _ in range(rounds):
        dist.barrier(group=topo.pp_group)
        t0 = time.perf_counter()
        if topo.pp_rank == 0:
            _, pending = p2p.exchange([Action(SEND_ACT, 0, 0, 1)], {Action(SEND_ACT, 0, 0, 1): x})
            p2p.exchange([Action(RECV_ACT, 0, 0, 1)], {})
            pending[0].work.wait()
        elif topo.pp_rank == 1:
            received, _ = p2p.exchange([Action(RECV_ACT, 0, 0, 0)], {})
            _, pending = p2p.exchange([Action(SEND_ACT, 0, 0, 0)], {Action(SEND_ACT, 0, 0, 0): x})
            pending[0].work.wait()
        trips.append(time.perf_counter() - t0)
    return statistics.median(trips) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", choices=["sleep", "matmul"], default="sleep")
    ap.add_argument("--stage-ms", type=float, default=100.0,
                    help="forward time of one stage per microbatch (smaller values expose per-action overhead)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import tempfile

    from tests.dist_utils import free_port  # the same free-port helper the tests use

    cases = [(vp, m) for vp in (1, 2) for m in (4, 8, 16)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bubble.pt"
        torch.multiprocessing.start_processes(
            worker, args=(PP, free_port(), cases, args.stage_ms / 1000, args.work, args.repeats, str(out)),
            nprocs=PP, start_method="spawn")
        results = torch.load(out)

    latency = results["latency"]
    print(f"pipeline bubble, pp={PP}, work={args.work}, forward {args.stage_ms} ms per stage per microbatch, "
          f"backward 2x; measured = idle/busy per rank, median over {args.repeats} steps")
    print(f"p2p latency (one way, measured): {1000 * latency:.2f} ms; 'with latency' = the plans simulated with "
          f"that latency per message (the textbook formula assumes 0)")
    print(f"{'schedule':<17}{'m':>3}{'theory':>9}{'with latency':>14}{'measured':>10}{'vs theory':>11}"
          f"{'vs w/ latency':>15}   per rank")
    for vp, m in cases:
        theory = (PP - 1) / (vp * m)
        stage = args.stage_ms / 1000
        sim = simulate(build_all_plans(PP, vp, m), vp, m, forward_cost=stage / vp, backward_cost=2 * stage / vp,
                       comm_cost=latency)
        with_latency = statistics.mean(sim.bubble_ratio(r) for r in range(PP))
        per_rank = results[(vp, m)]
        measured = statistics.mean(per_rank)
        name = "1F1B" if vp == 1 else f"interleaved v={vp}"
        print(f"{name:<17}{m:>3}{theory:>9.3f}{with_latency:>14.3f}{measured:>10.3f}"
              f"{100 * (measured - theory) / theory:>10.1f}%{100 * (measured - with_latency) / with_latency:>14.1f}%"
              f"   {' '.join(f'{r:.3f}' for r in per_rank)}")
        actions = 2 * m * vp  # compute actions per rank per step
        overhead_ms = 1000 * (measured - with_latency) * (3 * stage * m) / actions
        print(f"{'':<20}unexplained idle per compute action (executor overhead): {overhead_ms:.2f} ms")
    for m in (4, 8, 16):
        one, two = statistics.mean(results[(1, m)]), statistics.mean(results[(2, m)])
        print(f"m={m:>2}: interleaving (v=2) cuts the measured bubble by {one / two:.2f}x (theory 2.00x)")


if __name__ == "__main__":
    main()
