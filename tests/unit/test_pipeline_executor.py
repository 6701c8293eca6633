"""The pipeline executor and p2p on real gloo processes, with a synthetic model whose chunks are
small MLPs (so only the schedule machinery is under test; the GPT is covered by layout parity).

- p2p: activations go forward and gradients backward between neighbours, values intact.
- executor: for 1F1B and interleaved schedules, including the tightest case microbatches == pp, every
  chunk's weight gradients and the losses equal running all chunks in sequence in one process.
- activation memory: the most (microbatch, chunk) activations a rank stashes equals the schedule's
  in-flight bound (not the number of microbatches), and every sent output's storage is freed before
  its backward (Megatron's deallocation).
- declared activations: chunks that declare a different stage-boundary shape and dtype (as a
  sequence-sharded model would) and a different input key run through the same executor, shaped
  by PipelineP2P.for_chunks, and still equal the sequential reference.
"""

import pytest
import torch
from torch import nn

from megazero.pipeline_parallel.executor import PipelineExecutor
from megazero.pipeline_parallel.p2p import PipelineP2P
from megazero.pipeline_parallel.partition import virtual_stage
from megazero.pipeline_parallel.schedules import RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, Action, build_plan, in_flight_bound
from megazero.topology import GridShape, Topology
from tests.dist_utils import run_distributed

SHAPE = (2, 3, 8)  # [micro batch, seq, hidden]


def make_chunk(v: int) -> nn.Module:
    torch.manual_seed(100 + v)  # weights depend on the virtual stage only, like the GPT's names
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))


def microbatches(m: int) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [{"tokens": torch.randn(SHAPE, generator=g), "labels": torch.randn(SHAPE, generator=g)} for _ in range(m)]


def loss_fn(chunk, x, batch):
    return (chunk(x) - batch["labels"]).pow(2).mean()


def reference(pp: int, vp: int, m: int, chunk=make_chunk, batches=microbatches, key: str = "tokens"):
    """All pp*vp chunks in sequence in one process: losses and per-virtual-stage grads."""
    chunks = [chunk(v) for v in range(pp * vp)]
    losses = []
    for batch in batches(m):
        x = batch[key]
        for c in chunks[:-1]:
            x = c(x)
        loss = loss_fn(chunks[-1], x, batch)
        (loss / m).backward()
        losses.append(loss.item())
    return losses, {v: [p.grad.clone() for p in c.parameters()] for v, c in enumerate(chunks)}


FLAT = (SHAPE[0] * SHAPE[1], SHAPE[2])  # what DeclaringChunk sends: [micro * seq, hidden] in float64


class DeclaringChunk(nn.Module):
    """Reads [b, s, h] (first stage) or [b * s, h]; sends [b * s, h] in float64, and says so."""

    def __init__(self, v: int):
        super().__init__()
        self.body = make_chunk(v).double()

    def forward(self, x):
        return self.body(x).reshape(FLAT)

    def pipeline_activation(self, micro_batch_size: int):
        return (micro_batch_size * SHAPE[1], SHAPE[2]), torch.float64


def declared_microbatches(m: int) -> list[dict]:
    return [{"inputs": b["tokens"].double(), "labels": b["labels"].double().reshape(FLAT)} for b in microbatches(m)]


def declared_reference(pp: int, vp: int, m: int):
    return reference(pp, vp, m, DeclaringChunk, declared_microbatches, key="inputs")


def _run_declared(rank, world_size, pp, vp, m):
    topo = Topology.build(GridShape(world_size, pp=pp), rank)
    chunks = [DeclaringChunk(virtual_stage(topo.pp_rank, c, pp)) for c in range(vp)]
    p2p = PipelineP2P.for_chunks(chunks, SHAPE[0], topo.pp_ranks, topo.pp_rank, topo.pp_group, torch.device("cpu"))
    ex = PipelineExecutor(chunks, topo.pp_rank, pp, p2p, input_key="inputs")
    losses = ex.run(build_plan(topo.pp_rank, pp, vp, m), declared_microbatches(m), loss_fn)
    return {"pp_rank": topo.pp_rank, "losses": [l.item() for l in losses], "p2p": (p2p.shape, p2p.dtype),
            "freed": ex.outputs_freed_before_backward,
            "grads": {virtual_stage(topo.pp_rank, c, pp): [p.grad.clone() for p in ch.parameters()]
                      for c, ch in enumerate(chunks)}}


def _run_layouts(rank, world_size, layouts):
    results = {}
    for pp, vp, m in layouts:
        topo = Topology.build(GridShape(world_size, pp=pp), rank)
        chunks = [make_chunk(virtual_stage(topo.pp_rank, c, pp)) for c in range(vp)]
        p2p = PipelineP2P(topo.pp_ranks, topo.pp_rank, topo.pp_group, SHAPE, torch.float32, torch.device("cpu"))
        ex = PipelineExecutor(chunks, topo.pp_rank, pp, p2p)
        losses = ex.run(build_plan(topo.pp_rank, pp, vp, m), microbatches(m), loss_fn)
        results[(pp, vp, m)] = {
            "pp_rank": topo.pp_rank,
            "losses": [l.item() for l in losses],
            "grads": {virtual_stage(topo.pp_rank, c, pp): [p.grad.clone() for p in ch.parameters()]
                      for c, ch in enumerate(chunks)},
            "peak": ex.peak_in_flight,
            "freed": ex.outputs_freed_before_backward,
        }
        # evaluation plan: forward only, same losses, no gradients touched
        for ch in chunks:
            ch.zero_grad(set_to_none=True)
        eval_losses = ex.run(build_plan(topo.pp_rank, pp, vp, m, forward_only=True), microbatches(m), loss_fn,
                             forward_only=True)
        results[(pp, vp, m)]["eval_losses"] = [l.item() for l in eval_losses]
        results[(pp, vp, m)]["eval_grads_none"] = all(p.grad is None for ch in chunks for p in ch.parameters())
    results["p2p"] = _p2p_round_trip(rank, world_size)
    results["declared"] = _run_declared(rank, world_size, *DECLARED)
    return results


def _p2p_round_trip(rank, world_size):
    """pp=4: every stage sends an activation forward and a gradient backward in one batch."""
    topo = Topology.build(GridShape(world_size, pp=4), rank)
    r, pp = topo.pp_rank, 4
    p2p = PipelineP2P(topo.pp_ranks, r, topo.pp_group, SHAPE, torch.float32, torch.device("cpu"))
    batch, tensors = [], {}
    if r < pp - 1:
        a = Action(SEND_ACT, 0, 0, r + 1)
        batch.append(a)
        tensors[a] = torch.full(SHAPE, float(10 + r))
    if r > 0:
        a = Action(SEND_GRAD, 0, 0, r - 1)
        batch.append(a)
        tensors[a] = torch.full(SHAPE, float(-10 - r))
        batch.append(Action(RECV_ACT, 0, 0, r - 1))
    if r < pp - 1:
        batch.append(Action(RECV_GRAD, 0, 0, r + 1))
    received, pending = p2p.exchange(batch, tensors)
    for p in pending:
        p.work.wait()
    return {a.kind: t[0, 0, 0].item() for a, t in received.items()} | {"pp_rank": r}


LAYOUTS = [(4, 1, 4), (4, 1, 8), (4, 2, 4), (4, 2, 8), (2, 2, 2), (2, 1, 3)]
DECLARED = (4, 2, 4)  # pp, vp, m


@pytest.fixture(scope="module")
def results():
    return run_distributed(_run_layouts, 4, LAYOUTS)


def test_p2p_round_trip(results):
    for per_rank in results:
        got = per_rank["p2p"]
        r = got["pp_rank"]
        if r > 0:
            assert got[RECV_ACT] == 10 + (r - 1)
        if r < 3:
            assert got[RECV_GRAD] == -10 - (r + 1)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"pp{p}-vp{v}-m{m}" for p, v, m in LAYOUTS])
def test_executor_matches_sequential_reference(results, layout):
    pp, vp, m = layout
    ref_losses, ref_grads = reference(pp, vp, m)
    seen = set()
    for per_rank in results:
        got = per_rank[layout]
        last_stage = got["pp_rank"] == pp - 1
        if last_stage:
            assert got["losses"] == pytest.approx(ref_losses, rel=1e-6)
            assert got["eval_losses"] == pytest.approx(ref_losses, rel=1e-6)
        else:
            assert got["losses"] == [] and got["eval_losses"] == []
        assert got["eval_grads_none"]
        for v, grads in got["grads"].items():
            seen.add(v)
            for g, ref in zip(grads, ref_grads[v]):
                torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-7)
    assert seen == set(range(pp * vp))


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"pp{p}-vp{v}-m{m}" for p, v, m in LAYOUTS])
def test_activation_memory_follows_schedule_bound(results, layout):
    pp, vp, m = layout
    for per_rank in results:
        got = per_rank[layout]
        assert got["peak"] == in_flight_bound(got["pp_rank"], pp, vp, m)
        assert got["freed"], "a sent output still held its storage at backward time"
    if layout == (4, 1, 8):  # stage 0 holds pp = 4 microbatches, not m = 8
        assert max(r[layout]["peak"] for r in results if r[layout]["pp_rank"] == 0) == 4


def test_pipeline_carries_the_declared_activation_and_input_key(results):
    ref_losses, ref_grads = declared_reference(*DECLARED)
    seen = set()
    for per_rank in results:
        got = per_rank["declared"]
        assert got["p2p"] == (FLAT, torch.float64)  # from the chunks, not a fixed [b, s, h]
        assert got["freed"]
        if got["pp_rank"] == DECLARED[0] - 1:
            assert got["losses"] == pytest.approx(ref_losses, rel=1e-12)
        for v, grads in got["grads"].items():
            seen.add(v)
            for g, ref in zip(grads, ref_grads[v]):
                assert g.dtype == torch.float64
                torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)
    assert seen == set(range(DECLARED[0] * DECLARED[1]))
