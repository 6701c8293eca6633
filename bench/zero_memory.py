"""ZeRO model-state memory per rank, measured vs the ZeRO paper's formulas.

A GPT whose transformer blocks dominate (default 8 layers x hidden 256, vocab 512) is built by the
real Trainer on dp = 2 and dp = 4 gloo processes for every ZeRO stage, trained one step (so the AdamW
moments exist), and each rank's `ZeroEngine.memory_bytes()` (params + grads + optimizer bytes held
between steps) is compared with the ZeRO paper's mixed-precision formulas, with Psi = parameters per
model-parallel rank and N = dp:

    2-byte gradients (--bf16 --grad-reduce-dtype model)    stage 0: 16Psi  1: 4Psi+12Psi/N  2: 2Psi+14Psi/N  3: 16Psi/N
    fp32 gradients   (--bf16, megazero's default)          stage 0: 18Psi  1: 6Psi+12Psi/N  2: 2Psi+16Psi/N  3: 18Psi/N

(2 bytes of bf16 parameters, 2 or 4 of gradients, 12 of optimizer state: fp32 master copy + two fp32
Adam moments.) Target: measured within 5% of the formula.

What the measurement counts: each flat buffer as allocated, i.e. with the shard padding (every bucket
is padded to a multiple of dp so it splits into equal shards) and, at stage 3, the 'rest' unit of a
chunk (word + position embeddings, final LayerNorm) sharded like every block. The padding is printed.
`in flight` is what memory_bytes() does not count but a rank also holds between two steps: the
source copies of the parameter all-gathers that a stage-1/2 step launches and the next forward waits
for (overlap), plus stage-2/3 gradient staging buckets still alive (none, after finish()).

    python bench/zero_memory.py                       # dp 2 and 4, default model
    python bench/zero_memory.py --dp 2 --layers 4     # smaller / faster
    python bench/zero_memory.py --tp 2 --dp 2         # Psi is then the per-tp-rank parameter count
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megazero.config import (
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TrainingConfig,
)
from megazero.topology import GridShape, Topology
from megazero.validation import validate

CORPUS = REPO.parent / "shared" / "data" / "corpus"
TARGET = 0.05
# (paper coefficient of Psi, coefficient of Psi/N) per stage
FORMULAS = {
    "model": {0: (16, 0), 1: (4, 12), 2: (2, 14), 3: (0, 16)},  # 2-byte gradients (the paper's case)
    "fp32": {0: (18, 0), 1: (6, 12), 2: (2, 16), 3: (0, 18)},  # fp32 gradients (megazero's default)
}
FORMULA_TEXT = {
    "model": {0: "16Ψ", 1: "4Ψ+12Ψ/N", 2: "2Ψ+14Ψ/N", 3: "16Ψ/N"},
    "fp32": {0: "18Ψ", 1: "6Ψ+12Ψ/N", 2: "2Ψ+16Ψ/N", 3: "18Ψ/N"},
}


# ----- shared by the three ZeRO benches (comm_volume.py and vs_peers.py import these) ----------------
def add_model_args(ap: argparse.ArgumentParser, *, layers=8, hidden=256, heads=4, seq=64, micro=2) -> None:
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--seq", type=int, default=seq)
    ap.add_argument("--vocab", type=int, default=512, help="tokenizer vocabulary (trained on the shared corpus)")
    ap.add_argument("--micro", type=int, default=micro, help="micro batch size per rank")
    ap.add_argument("--data", default=None,
                    help="existing dataset prefix (with --tokenizer); default: build one in a temp dir")
    ap.add_argument("--tokenizer", default=None)


def build_dataset(root: Path, vocab: int) -> tuple[Path, Path]:
    """(prefix, tokenizer model): ~300 KB of each shared corpus file, the tests' tiny_dataset recipe."""
    from megazero.data import Tokenizer, iter_documents, train_tokenizer, write_dataset

    sources = []
    for name in ("austen.txt", "shakespeare.txt"):
        path = root / name
        path.write_text((CORPUS / name).read_text(encoding="utf-8")[:300_000], encoding="utf-8")
        sources.append(path)
    model = train_tokenizer(sources, root / "tok.model", vocab_size=vocab)
    tokenizer = Tokenizer(model)
    write_dataset((doc for src in sources for doc in iter_documents(src)), tokenizer, root / "bench")
    return root / "bench", model


def dataset(args, tmp: str) -> tuple[Path, Path]:
    if args.data:
        return Path(args.data), Path(args.tokenizer)
    return build_dataset(Path(tmp), args.vocab)


def bench_config(args, prefix, tokenizer, *, dp: int, stage: int, dtype: str = "bf16", grad_reduce: str = "model",
                 accum: int = 1, steps: int = 1, tp: int = 1, pp: int = 1, lr: float = 1e-3,
                 bucket_size: int = 25_000_000) -> RunConfig:
    """The benches' run: no dropout (so every framework and layout computes the same thing), constant
    lr, clipping at 1.0, no evaluation."""
    return RunConfig(
        model=ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                          seq_length=args.seq, vocab_size=args.vocab, make_vocab_size_divisible_by=64,
                          hidden_dropout=0.0, attention_dropout=0.0),
        optimizer=OptimizerConfig(lr=lr, min_lr=lr, lr_warmup_iters=0, lr_decay_style="constant", clip_grad=1.0,
                                  weight_decay=0.1),
        data=DataConfig(data_path=str(prefix), tokenizer_model=str(tokenizer), split="100,0,0"),
        training=TrainingConfig(micro_batch_size=args.micro, global_batch_size=args.micro * accum * dp,
                                train_iters=steps, seed=1234, eval_interval=10**9, eval_iters=0,
                                log_interval=10**9),
    ).replace(parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
              zero={"stage": stage, "grad_reduce_dtype": grad_reduce, "reduce_bucket_size": bucket_size},
              precision={"params_dtype": dtype})


def build_trainer(cfg: RunConfig, world: int, rank: int, prefix, tokenizer, vocab: int):
    from megazero.training.data_setup import ResolvedData
    from megazero.training.trainer import Trainer

    validate(cfg, world)
    p = cfg.parallel
    topo = Topology.build(GridShape(world, tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size), rank)
    data = ResolvedData(prefix=Path(prefix), tokenizer_model=Path(tokenizer), vocab_size=vocab, description="bench")
    return Trainer(cfg, topo, data, torch.device("cpu"), run_dir=None, log=lambda _: None)


def psi_of(trainer) -> int:
    """Parameters this rank holds (its model-parallel slice), unpadded, from the ZeRO layout (at stage 3
    the parameters themselves are empty between uses)."""
    return sum(hi - lo for lo, hi in trainer.zero.layout.range_of.values())


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def spawn(worker, world: int, *args) -> list:
    """Run worker(rank, world, port, out_dir, *args) on `world` gloo processes; per-rank results."""
    from tests.dist_utils import free_port

    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.start_processes(worker, args=(world, free_port(), out, *args), nprocs=world,
                                              start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----- this bench ----------------------------------------------------------------------------------
def in_flight_bytes(engine) -> int:
    """Transient model-state tensors a rank still holds between steps (not in memory_bytes())."""
    total = 0
    for _, shard in getattr(engine.storage, "_gathers", []):  # stage 1/2: all-gather sources
        total += shard.numel() * shard.element_size()
    for _, full in getattr(engine.storage, "_inflight", {}).values():  # stage 3: prefetches
        total += full.numel() * full.element_size()
    for t in getattr(engine.grads, "_staging", {}).values():  # stage 2/3: unreduced buckets
        total += t.numel() * t.element_size()
    return total


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage the Python heap can reach (an independent count: views
    into one flat buffer share a storage and count once)."""
    gc.collect()
    seen: dict[tuple, int] = {}
    with warnings.catch_warnings():  # isinstance() on some heap objects warns (deprecated proxies)
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if torch.is_tensor(obj)]
    for obj in tensors:
        try:
            st = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        seen[(st.data_ptr(), st.device.type)] = st.nbytes()
    return sum(seen.values())


def worker(rank, world, port, out, args, prefix, tokenizer, cases):
    init_gloo(rank, world, port)
    results = {}
    for stage, grad_reduce in cases:
        before = live_tensor_bytes()
        cfg = bench_config(args, prefix, tokenizer, dp=world // (args.tp * args.pp), stage=stage,
                           grad_reduce=grad_reduce, tp=args.tp, pp=args.pp, bucket_size=args.bucket_size)
        trainer = build_trainer(cfg, world, rank, prefix, tokenizer, args.vocab)
        trainer.train_step(trainer._batches("train", 0))
        engine = trainer.zero
        results[(stage, grad_reduce)] = {
            "mem": engine.memory_bytes(), "psi": psi_of(trainer), "padded": engine.layout.numel,
            "buckets": len(engine.layout.buckets), "in_flight": in_flight_bytes(engine),
            "live": live_tensor_bytes() - before, "pp_tp": (trainer.topo.pp_rank, trainer.topo.tp_rank)}
        del trainer, engine
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def mib(x: float) -> str:
    return f"{x / 2**20:.3f}"


def report(dp: int, per_rank: list[dict], cases, args) -> list[str]:
    misses = []
    positions = sorted({r[cases[0]]["pp_tp"] for r in per_rank})  # (pp_rank, tp_rank)
    for grad_reduce in ("model", "fp32"):
        title = ("bf16 params + bf16 gradients (--bf16 --grad-reduce-dtype model): the paper's mixed precision"
                 if grad_reduce == "model" else "bf16 params + fp32 gradients (--bf16, megazero's default)")
        print(f"\n dp N={dp}: {title}")
        print(f" {'stage':<6}{'pp,tp':>6}{'params MiB':>12}{'grads MiB':>11}{'optim MiB':>11}{'measured MiB':>14}"
              f"{'formula':>11}{'formula MiB':>13}{'ratio':>9}{'<=5%':>6}{'padding':>9}{'in flight MiB':>15}"
              f"{'live MiB':>10}")
        for stage in range(4):
            key = (stage, grad_reduce)
            for pos in positions:
                # dp ranks differ only where a shard holds padding (no optimizer state for it): the max
                ranks = [r[key] for r in per_rank if r[key]["pp_tp"] == pos]
                res = max(ranks, key=lambda r: sum(r["mem"].values()))
                m, psi = res["mem"], res["psi"]
                measured = m["params"] + m["grads"] + m["optimizer"]
                a, b = FORMULAS[grad_reduce][stage]
                formula = a * psi + b * psi / dp
                ratio = measured / formula
                ok = abs(ratio - 1) <= TARGET
                if not ok:
                    misses.append(f"dp{dp} stage {stage} grads {grad_reduce} at pp,tp {pos}: ratio {ratio:.4f}")
                print(f" {stage:<6}{f'{pos[0]},{pos[1]}':>6}{mib(m['params']):>12}{mib(m['grads']):>11}"
                      f"{mib(m['optimizer']):>11}{mib(measured):>14}{FORMULA_TEXT[grad_reduce][stage]:>11}"
                      f"{mib(formula):>13}{ratio:>9.5f}{'yes' if ok else 'NO':>6}{res['padded'] - psi:>9}"
                      f"{mib(res['in_flight']):>15}{mib(res['live']):>10}")
    return misses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--bucket-size", type=int, default=25_000_000, help="reduce bucket (elements), stages 0-2")
    args = ap.parse_args()

    cases = [(stage, g) for g in ("model", "fp32") for stage in range(4)]
    misses = []
    with tempfile.TemporaryDirectory() as tmp:
        prefix, tokenizer = dataset(args, tmp)
        header_done = False
        for dp in args.dp:
            world = dp * args.tp * args.pp
            per_rank = spawn(worker, world, args, prefix, tokenizer, cases)
            if not header_done:
                psi = per_rank[0][cases[0]]["psi"]
                h = args.hidden
                blocks = args.layers * (12 * h * h + 13 * h) // (args.tp * args.pp)
                print("ZeRO model-state bytes per rank after one step (ZeroEngine.memory_bytes(): params + grads + "
                      "optimizer), bf16 model, fp32 master weights + AdamW moments")
                print(f"GPT {args.layers} layers x hidden {args.hidden}, vocab {args.vocab}, seq {args.seq}; "
                      f"tp={args.tp} pp={args.pp}; Ψ = {psi:,} parameters on rank 0"
                      f"{f' (transformer blocks ~{100 * blocks / psi:.1f}%)' if args.tp == args.pp == 1 else ''}; "
                      f"target |measured/formula - 1| <= {TARGET:.0%}")
                print("measured = the dp rank holding the most (ranks differ only by padding); padding = elements added so every bucket splits into N equal shards (counted in measured); "
                      "stage 3 counts every unit's shard, the chunk's 'rest' unit (embeddings, final norm) included; "
                      "'in flight' = transient bytes held between steps that memory_bytes() leaves out; "
                      "'live' = an independent count: every tensor storage reachable from Python after the step, "
                      "minus before the Trainer was built")
                header_done = True
            misses += report(dp, per_rank, cases, args)
    print()
    print("all within target" if not misses else "MISSED target:\n  " + "\n  ".join(misses))


if __name__ == "__main__":
    main()
