"""Activation memory, modelled vs measured: for a grid of layouts (tp 1/2/4 with and without sequence
parallelism, selective and full recomputation, offload, pp 2/4 with interleaving; GPT-2 and Llama blocks)
one training step runs on real gloo processes through megazero's model chunks and pipeline executor,
with SavedTensorMeter recording around the schedule as the Trainer does (the step peak of saved-for-
backward bytes per rank). Each row prints the model's peak (megazero/activation/memory_model.py), the
measured peak (max over ranks, and the first stage's), their ratio, and the paper's formula (Korthikanti
et al. 2022; 16-bit activations, 1-byte dropout masks, so on an fp32 run it is scaled x2 to compare
shapes, not bytes). Then the checks: model within 5% of measured on every row; full recomputation keeps
<= 2sbh-equivalent per layer; tp4 + SP keeps <= 1/4 of tp1's bytes in the sharded (norm / dropout /
residual, column-parallel input) regions. Last, the step time of no / selective / full recomputation on
one layout, in one run.

    python bench/activation_memory.py              # the grid + timing, about 2-3 minutes on 2 cores
    python bench/activation_memory.py --rows gpt2  # rows whose name contains "gpt2"
    python bench/activation_memory.py --no-timing

No timing assertions: PASS / FAIL is printed for the memory targets only.
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

from megazero.activation import memory_model as mm  # noqa: E402
from megazero.activation.saved_tensors import SavedTensorMeter  # noqa: E402
from megazero.config import ActivationConfig, ModelConfig, ParallelConfig, PrecisionConfig, RunConfig  # noqa: E402

GPT2 = dict(num_layers=8, hidden_size=128, num_attention_heads=8, seq_length=256, vocab_size=500,
            hidden_dropout=0.1, attention_dropout=0.1)  # dropout: CPU sdpa's math path keeps [b, a, s, s]
LLAMA = dict(GPT2, normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
             group_query_attention=True, num_query_groups=4, add_bias_linear=False,
             untie_embeddings_and_output_weights=True, hidden_dropout=0.0, attention_dropout=0.0)
MODELS = {"gpt2": GPT2, "llama": LLAMA}


@dataclasses.dataclass(frozen=True)
class Row:
    """One layout of the grid: a model (MODELS key + overrides), its memory_model.Layout, ActivationConfig fields."""

    name: str
    model: str = "gpt2"
    lay: mm.Layout = mm.Layout(micro_batch_size=2)
    act: dict = dataclasses.field(default_factory=dict)
    model_overrides: dict = dataclasses.field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.lay.tp * self.lay.pp

    def configs(self) -> tuple[ModelConfig, ActivationConfig, mm.Layout]:
        return ModelConfig(**{**MODELS[self.model], **self.model_overrides}), ActivationConfig(**self.act), self.lay


def L(**layout) -> mm.Layout:
    """A grid layout: micro batch 2 unless given."""
    return mm.Layout(**{"micro_batch_size": 2, **layout})


SP, SEL, FULL = {"sequence_parallel": True}, {"recompute_granularity": "selective"}, {"recompute_granularity": "full"}
GRID = [
    Row("gpt2 tp1"), Row("gpt2 tp2", lay=L(tp=2)), Row("gpt2 tp2 SP", act=SP, lay=L(tp=2)), Row("gpt2 tp4", lay=L(tp=4)),
    Row("gpt2 tp4 SP", act=SP, lay=L(tp=4)), Row("gpt2 tp1 selective", act=SEL),
    Row("gpt2 tp4 SP selective", act={**SP, **SEL}, lay=L(tp=4)), Row("gpt2 tp1 full", act=FULL),
    Row("gpt2 tp4 SP full", act={**SP, **FULL}, lay=L(tp=4)),
    Row("gpt2 tp2 full block 2", act={**FULL, "recompute_method": "block", "recompute_num_layers": 2}, lay=L(tp=2)),
    Row("gpt2 tp2 full distributed", act={**FULL, "distribute_saved_activations": True}, lay=L(tp=2)),
    Row("gpt2 tp1 full offload", act={**FULL, "cpu_offload_activations": True}),
    Row("gpt2 pp2 m4", lay=L(pp=2, num_microbatches=4)), Row("gpt2 pp2 vp2 m4", lay=L(pp=2, vp=2, num_microbatches=4)),
    Row("gpt2 pp4 vp2 m8", lay=L(pp=4, vp=2, num_microbatches=8)),
    Row("gpt2 tp2 SP pp2 vp2 m4", act=SP, lay=L(tp=2, pp=2, vp=2, num_microbatches=4)),
    Row("gpt2 pp4 full m8", act=FULL, lay=L(pp=4, num_microbatches=8)),
    Row("gpt2 pp2 full offload m4", act={**FULL, "cpu_offload_activations": True}, lay=L(pp=2, num_microbatches=4)),
    Row("gpt2 tp2 bf16", lay=L(tp=2, dtype="bf16")),
    Row("llama tp1", model="llama"), Row("llama tp2", model="llama", lay=L(tp=2)),
    Row("llama tp2 SP", model="llama", act=SP, lay=L(tp=2)), Row("llama tp4 SP", model="llama", act=SP, lay=L(tp=4)),
    Row("llama tp1 selective", model="llama", act=SEL), Row("llama tp1 full", model="llama", act=FULL),
    Row("llama tp2 SP pp2 vp2 m4", model="llama", act=SP, lay=L(tp=2, pp=2, vp=2, num_microbatches=4)),
    Row("llama tp1 bf16 dropout", model="llama", lay=L(dtype="bf16"),
        model_overrides={"hidden_dropout": 0.1, "attention_dropout": 0.1}),
]


# ----- measurement (runs in each gloo process) -------------------------------------------------------
def _run_config(row: Row) -> RunConfig:
    m, act, _ = row.configs()
    return RunConfig(model=m, activation=act, precision=PrecisionConfig(params_dtype=row.lay.dtype),
                     parallel=ParallelConfig(tensor_model_parallel_size=row.lay.tp, pipeline_model_parallel_size=row.lay.pp,
                                             virtual_pipeline_model_parallel_size=row.lay.vp if row.lay.vp > 1 else None))


def _setup(rank: int, world: int, row: Row):
    """Build this rank's chunks and executor for `row` as the Trainer does; returns step() -> (peak,
    host peak, seconds) of one training step with the meter recording around the schedule, and the
    rank's pipeline stage."""
    from megazero.pipeline_parallel.executor import PipelineExecutor
    from megazero.pipeline_parallel.p2p import PipelineP2P
    from megazero.pipeline_parallel.schedules import build_plan
    from megazero.random import RNGStreams
    from megazero.topology import GridShape, Topology
    from megazero.training.model_builder import build_model_chunks

    cfg, lay = _run_config(row), row.lay
    cpu = torch.device("cpu")
    topo = Topology.build(GridShape(world, tp=lay.tp, pp=lay.pp), rank)
    rng = RNGStreams(1234, topo.tp_rank, topo.pp_rank, cpu)
    chunks = build_model_chunks(cfg, topo, rng, cpu)
    chunks.train()
    p2p = PipelineP2P.for_chunks(list(chunks), lay.micro_batch_size, topo.pp_ranks, topo.pp_rank, topo.pp_group,
                                 cpu) if lay.pp > 1 else None
    executor = PipelineExecutor(list(chunks), topo.pp_rank, topo.pp, p2p, input_key="tokens")
    plan = build_plan(topo.pp_rank, topo.pp, lay.vp, lay.num_microbatches)
    meter = SavedTensorMeter()
    g = torch.Generator().manual_seed(7)
    shape, v = (lay.micro_batch_size, cfg.model.seq_length), cfg.model.vocab_size

    def step() -> tuple[int, int, float]:
        batches = [{"tokens": torch.randint(0, v, shape, generator=g), "labels": torch.randint(0, v, shape, generator=g)}
                   for _ in range(lay.num_microbatches)]
        meter.reset_peak()
        start = time.perf_counter()
        with meter.recording():
            executor.run(plan, batches, lambda chunk, x, b: chunk(x, b["labels"]).mean())
        seconds = time.perf_counter() - start
        chunks.zero_grad(set_to_none=True)
        return meter.peak_bytes, meter.host_peak_bytes, seconds
    return step, topo.pp_rank


def measure(rank: int, world: int, row: Row) -> dict:
    """One rank of `row`: the peaks of one training step."""
    step, pp_rank = _setup(rank, world, row)
    peak, host, _ = step()
    return {"pp_rank": pp_rank, "peak": peak, "host": host}


def measure_times(rank: int, world: int, rows: list[Row], steps: int) -> list[list[float]]:
    """Step times of `rows` (same world), their steps taken in turn so load changes hit all alike; one
    warm-up step each first."""
    steppers = [_setup(rank, world, row)[0] for row in rows]
    for step in steppers:
        step()
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(steps):
        for i, step in enumerate(steppers):
            times[i].append(step()[2])
    return times


def _worker(rank: int, world: int, port: int, out_dir: str, rows: list[Row], steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1 if world > 1 else 2)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = measure_times(rank, world, rows, steps) if steps else [measure(rank, world, row) for row in rows]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_rows(rows: list[Row], steps: int = 0) -> list[list]:
    """Measure rows of one world size in one launch; returns per row the per-rank results (peaks, or
    with `steps` the step times)."""
    world = rows[0].world
    assert all(r.world == world for r in rows)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, port, out_dir, rows, steps), nprocs=world, join=True,
                           start_method="spawn")
        per_rank = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return [[per_rank[r][i] for r in range(world)] for i in range(len(rows))]


# ----- report ------------------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:8.2f}"


def sharded_region_bytes(row: Row) -> int:
    """Bytes of one layer in the regions SP shards (norm inputs / statistics, dropout masks, the QKV and
    fc1 input shards; fc1's SwiGLU weight copy is 1/tp by TP), modelled."""
    m, act, lay = row.configs()
    names = ("input_norm", "qkv", "attention_dropout", "post_attention_norm", "fc1", "mlp_dropout")
    return sum(n for seg, n in mm.layer_breakdown(m, act, lay) if seg in names)


def memory_table(rows: list[Row]) -> bool:
    by_world: dict[int, list[Row]] = {}
    for row in rows:
        by_world.setdefault(row.world, []).append(row)
    measured: dict[str, list[dict]] = {}
    for world, group in sorted(by_world.items()):
        for row, result in zip(group, run_rows(group)):
            measured[row.name] = result
    print("| layout | model MiB | measured MiB (max rank) | model - measured B | model / measured first stage MiB | "
          "paper first stage MiB | model per layer KiB |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for row in rows:
        m, act, lay = row.configs()
        model_max, model_first = mm.peak_bytes(m, act, lay)
        ranks = measured[row.name]
        meas_max = max(r["peak"] for r in ranks)
        meas_first = max(r["peak"] for r in ranks if r["pp_rank"] == 0)
        paper = mm.paper_first_stage_bytes(m, act, lay) * mm.DTYPE_BYTES[row.lay.dtype] / 2  # 16-bit -> our dtype
        ratio = model_max / meas_max
        host = max(r["host"] for r in ranks)
        ok &= abs(ratio - 1) <= 0.05 and abs(model_first / meas_first - 1) <= 0.05
        ok &= host == max(mm.rank_memory(m, act, lay, r).host_peak_bytes for r in range(lay.pp))
        extra = f" (+{host / 2**20:.2f} host)" if host else ""
        print(f"| {row.name} | {_mib(model_max)} | {_mib(meas_max)}{extra} | {model_max - meas_max} ({ratio:.3f}) | "
              f"{_mib(model_first)} / {_mib(meas_first)} | {_mib(paper)} | "
              f"{mm.layer_bytes(m, act, lay) / 1024:.1f} |")
    print(f"\nmodel within 5% of measured on every row: {'PASS' if ok else 'FAIL'}")
    return ok


def bounds(rows: list[Row]) -> bool:
    ok = True
    for row in rows:
        m, act, lay = row.configs()
        e = mm.DTYPE_BYTES[row.lay.dtype]
        sbh = m.seq_length * row.lay.micro_batch_size * m.hidden_size
        if act.full and act.method == "uniform" and act.layers_per_checkpoint == 1 and not act.cpu_offload_activations:
            per_layer = mm.layer_bytes(m, act, lay)
            good = per_layer <= sbh * e
            ok &= good
            print(f"{row.name}: full recomputation keeps {per_layer / (sbh * e):.3f} x sbh x {e} B per layer "
                  f"(2sbh-equivalent = sbh x {e} B at {row.lay.dtype}): {'PASS' if good else 'FAIL'}")
    for model in MODELS:
        tp1 = sharded_region_bytes(Row("x", model=model))
        tp4 = sharded_region_bytes(Row("x", model=model, act=SP, lay=L(tp=4)))
        good = tp4 * 4 <= tp1
        ok &= good
        print(f"{model}: tp4 + SP keeps {tp4 / tp1:.3f} of tp1's bytes in the sharded regions: "
              f"{'PASS' if good else 'FAIL'}")
    return ok


def timing_table(steps: int) -> None:
    """no / selective / full recomputation, one process each model, one launch: each layout's step in
    turn, after a warm-up step each. GPT-2 here has dropout, so CPU sdpa takes the math path whose
    [b, a, s, s] tensors selective re-runs; Llama has none (flash path: selective re-runs SwiGLU only)."""
    kinds = (("none", {}), ("selective", SEL), ("full", FULL))
    rows = [Row(f"{model} tp1 {name}", model=model, act=act) for model in ("gpt2", "llama") for name, act in kinds]
    results = [r[0] for r in run_rows(rows, steps=steps)]
    print("\n| model | recomputation | step s (median) | vs none |")
    print("|---|---|---|---|")
    for i, (row, times) in enumerate(zip(rows, results)):
        base = statistics.median(results[i - i % len(kinds)])
        t = statistics.median(times)
        model, _, name = row.name.split()
        print(f"| {model} | {name} | {t:.3f} | {t / base:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="", help="only rows whose name contains this")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--timing-steps", type=int, default=5)
    args = ap.parse_args()
    rows = [r for r in GRID if args.rows in r.name]
    start = time.time()
    ok = memory_table(rows)
    ok &= bounds(rows)
    if not args.no_timing:
        timing_table(args.timing_steps)
    print(f"\n{'PASS' if ok else 'FAIL'} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
