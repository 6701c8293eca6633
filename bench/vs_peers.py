"""megazero ZeRO stages 0-3 vs torch DDP, torch FSDP2 (fully_shard) and DeepSpeed ZeRO 1/2/3.

One tiny GPT, trained the same way by every framework: megazero's own `GPTModel` (at tp=1 it is a
plain nn.Module; the size-1 tensor-parallel group makes every TP collective a no-op), built and
initialised by megazero's `build_model_chunks` (layout-invariant init from the seed), fed the same
batches by megazero's dataset and dp sampler, with the same AdamW (betas 0.9/0.95, eps 1e-8, weight
decay 0.1 except biases and norm weights), constant lr, gradient clipping at 1.0, no dropout, fp32,
dp = 2 on gloo (2 processes), no gradient accumulation. The peers wrap that module:

    megazero 0..3   the real Trainer (Trainer.train_step)
    torch DDP       DistributedDataParallel + torch AdamW + clip_grad_norm_            (stage 0)
    DeepSpeed 1..3  deepspeed.initialize(model, optimizer=torch AdamW,
                    zero_allow_untested_optimizer) on the CPU accelerator, gloo        (stages 1-3)
    torch FSDP2     fully_shard per block + root; reshard_after_forward=False keeps parameters
                    gathered from forward to backward (ZeRO-2-like, SHARD_GRAD_OP), True re-gathers
                    them for backward (ZeRO-3)                                          (stages 2, 3)

Each (framework, stage) runs in 2 fresh processes, so peak RSS (VmHWM) is that run's alone;
`base` is the RSS after imports and process-group set-up, before the model exists. Step time: every
step starts after a barrier; a step's time is the slower rank's; the table shows the median over
--steps steps after --warmup steps, then the median over --rounds interleaved rounds of the whole
sequence (the machine is shared and noisy: the [min-max] of the rounds is printed beside it). A
step is what a training loop does: fetch the batch, forward, backward, gradient reduction, clip,
optimizer step (and parameter gather), and the dp-averaged loss as a Python float (all frameworks).

`megazero/peer` < 1 means megazero is faster. The loss column is the dp-mean loss of the last step;
frameworks training the same thing agree to ~1e-5 in fp32 (reduction orders differ).

    python bench/vs_peers.py                          # ~3.5 minutes on 2 cores (3 rounds)
    python bench/vs_peers.py --steps 30 --rounds 5    # steadier numbers
    python bench/vs_peers.py --only megazero ddp      # a subset
    python bench/vs_peers.py --mmap-threshold 131072  # peak RSS that tracks live memory (see README)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zero_memory import (
    add_model_args,
    bench_config,
    build_trainer,
    dataset,
    init_gloo,
    spawn,
)

# (framework, stage, label); the megazero stage each peer is compared with is `stage`
RUNS = [("megazero", 0, "stage 0"), ("ddp", 0, "DDP"),
        ("megazero", 1, "stage 1"), ("deepspeed", 1, "ZeRO-1"),
        ("megazero", 2, "stage 2"), ("deepspeed", 2, "ZeRO-2"), ("fsdp2", 2, "reshard_after_forward=False"),
        ("megazero", 3, "stage 3"), ("deepspeed", 3, "ZeRO-3"), ("fsdp2", 3, "reshard_after_forward=True")]
NAMES = {"megazero": "megazero", "ddp": "torch DDP", "fsdp2": "torch FSDP2", "deepspeed": "DeepSpeed"}


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def adamw(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    from megazero.zero.optimizer import decays

    o = cfg.optimizer
    params = list(model.named_parameters())
    groups = [{"params": [p for n, p in params if decays(n, p)], "weight_decay": o.weight_decay},
              {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)


def peer_model_and_data(cfg, world: int, rank: int, prefix):
    """megazero's GPT at tp=1 (one chunk, pp=1), its initial weights, and the Trainer's batches."""
    from megazero.data import build_data_iterator, build_train_valid_test_datasets
    from megazero.random import RNGStreams
    from megazero.topology import GridShape, Topology
    from megazero.training.model_builder import build_model_chunks

    topo = Topology.build(GridShape(world, tp=1, pp=1), rank)  # tp_group: this rank alone
    t = cfg.training
    rng = RNGStreams(t.seed, topo.tp_rank, topo.pp_rank, torch.device("cpu"))
    model = build_model_chunks(cfg, topo, rng, torch.device("cpu"))[0]
    gb = cfg.global_batch_size(world)
    train, _, _ = build_train_valid_test_datasets(prefix, cfg.data.split, cfg.model.seq_length, t.seed,
                                                  (t.train_iters * gb, 0, 0))
    batches = build_data_iterator(train, 0, cfg.micro_batch_size(world), topo.dp_rank, topo.dp, 0)
    return model, batches


def mean_loss(loss: torch.Tensor) -> float:
    value = loss.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def make_step(framework: str, stage: int, cfg, world: int, rank: int, prefix, tokenizer, args):
    """A zero-argument callable running one training step and returning the dp-mean loss."""
    if framework == "megazero":
        trainer = build_trainer(cfg, world, rank, prefix, tokenizer, args.vocab)
        batches = trainer._batches("train", 0)

        def step():
            return trainer.train_step(batches).lm_loss
        # Stages 1/2 leave the post-step parameter all-gathers in flight (the next forward waits for
        # them); wait before tearing the process group down, or gloo may abort the process.
        step.finish = trainer.zero.storage.wait_gathers
        return step

    model, batches = peer_model_and_data(cfg, world, rank, prefix)
    clip = cfg.optimizer.clip_grad
    if framework == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        opt = adamw(model, cfg)

        def step():
            b = next(batches)
            opt.zero_grad(set_to_none=True)
            loss = ddp(b["tokens"], b["labels"]).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), clip)
            opt.step()
            return mean_loss(loss)
        return step

    if framework == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        reshard = stage == 3
        for block in model.layers.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        opt = adamw(model, cfg)

        def step():
            b = next(batches)
            opt.zero_grad(set_to_none=True)
            loss = model(b["tokens"], b["labels"]).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            return mean_loss(loss)
        return step

    if framework == "deepspeed":
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size(world),
            "gradient_accumulation_steps": 1,
            "train_batch_size": cfg.global_batch_size(world),
            "gradient_clipping": clip,
            "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                                  "reduce_bucket_size": cfg.zero.reduce_bucket_size,
                                  "allgather_bucket_size": cfg.zero.reduce_bucket_size},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model, cfg), config=ds_config)

        def step():
            b = next(batches)
            loss = engine(b["tokens"], b["labels"]).mean()
            engine.backward(loss)
            engine.step()
            return mean_loss(loss)
        return step
    raise ValueError(framework)


def worker(rank, world, port, out, args, prefix, tokenizer, framework, stage):
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13's collective renames, in peers
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    result: dict = {}
    try:
        if framework == "deepspeed":
            os.environ["DS_ACCELERATOR"] = "cpu"
            import deepspeed  # before measuring the base RSS: its imports are part of it
        init_gloo(rank, world, port)
        if framework == "deepspeed":
            deepspeed.init_distributed(dist_backend="gloo")  # adopts the gloo group made above
        result["base"] = rss_mib("VmRSS")
        total = args.warmup + args.steps
        cfg = bench_config(args, prefix, tokenizer, dp=world, stage=stage if framework == "megazero" else 0,
                           dtype="fp32", grad_reduce="fp32", steps=total, lr=args.lr)
        step = make_step(framework, stage, cfg, world, rank, prefix, tokenizer, args)
        times, losses = [], []
        for _ in range(total):
            dist.barrier()
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
        getattr(step, "finish", lambda: None)()
        result |= {"times": times, "losses": losses, "peak": rss_mib("VmHWM")}
    except Exception as exc:  # noqa: BLE001  (a peer that cannot run here: report why, keep the others)
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, micro=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3,
                    help="repeat the whole (interleaved) sequence; the table shows the median over rounds")
    ap.add_argument("--only", nargs="+", choices=sorted(NAMES), default=sorted(NAMES))
    ap.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="set glibc's MALLOC_MMAP_THRESHOLD_ in the workers (e.g. 131072): large blocks are then "
                         "always mmapped and returned on free, so peak RSS tracks live memory instead of what the "
                         "allocator kept (changes step times too)")
    args = ap.parse_args()
    world = 2
    if args.mmap_threshold is not None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)  # read by glibc at worker start

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average before the runs {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"(1/5/15 min); torch {torch.__version__}", end="")
    try:
        print(f", deepspeed {importlib.metadata.version('deepspeed')}")
    except importlib.metadata.PackageNotFoundError:
        print(", deepspeed not installed (DS_BUILD_OPS=0 pip install -e '.[bench]')")
    runs = [r for r in RUNS if r[0] in args.only]
    results: dict[tuple, list] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prefix, tokenizer = dataset(args, tmp)
        for _ in range(args.rounds):
            for framework, stage, _label in runs:
                try:
                    per_rank = spawn(worker, world, args, prefix, tokenizer, framework, stage)
                except Exception as exc:  # noqa: BLE001  (a crashed process, e.g. in a peer's native code)
                    per_rank = [{"error": f"process failed: {exc}"}]
                results.setdefault((framework, stage), []).append(per_rank)
    elapsed = time.perf_counter() - t_start
    load_after = os.getloadavg()

    print(f"GPT {args.layers} layers x hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}, seq {args.seq}, "
          f"micro batch {args.micro} per rank, dp=2 (gloo, 1 thread per process), fp32, AdamW lr {args.lr}, clip 1.0; "
          f"ms/step = median of {args.steps} steps after {args.warmup} warm-up (slower rank per step), median over "
          f"{args.rounds} interleaved round(s) [min-max of the rounds]; RSS = max over ranks, median over rounds"
          + (f"; MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold is not None else ""))
    print(f"{'framework':<12}{'stage':<29}{'ms/step':>9}{'[rounds]':>15}{'megazero/peer':>15}{'peak RSS MiB':>14}"
          f"{'base':>7}{'peak-base':>11}{f'loss@{args.warmup + args.steps}':>11}{'max|Δloss| vs DDP':>19}")
    summary: dict[tuple, dict] = {}
    errors = []
    for framework, stage in dict.fromkeys((f, s) for f, s, _ in runs):
        rounds = results[(framework, stage)]
        bad = [r for per_rank in rounds for r in per_rank if "error" in r]
        if bad:
            summary[(framework, stage)] = {"error": bad[0]["error"]}
            errors.append((framework, stage, bad[0]))
            continue
        per_round = []
        for per_rank in rounds:
            step_times = [max(r["times"][i] for r in per_rank) for i in range(args.warmup, len(per_rank[0]["times"]))]
            per_round.append(1000 * statistics.median(step_times))
        summary[(framework, stage)] = {
            "ms": statistics.median(per_round), "lo": min(per_round), "hi": max(per_round),
            "peak": statistics.median(max(r["peak"] for r in per_rank) for per_rank in rounds),
            "base": statistics.median(max(r["base"] for r in per_rank) for per_rank in rounds),
            "losses": rounds[-1][0]["losses"]}
    ref = summary.get(("ddp", 0), {}).get("losses")
    slower = []
    for framework, stage, label in runs:
        s = summary[(framework, stage)]
        name = NAMES[framework]
        if "error" in s:
            print(f"{name:<12}{label:<29}{'failed: ' + s['error'][:200]}")
            continue
        mine = summary.get(("megazero", stage), {})
        ratio = "-"
        if framework != "megazero" and "ms" in mine:
            ratio = f"{mine['ms'] / s['ms']:.2f}"
            if mine["ms"] > s["ms"]:
                slower.append(f"stage {stage} vs {name} {label}: {mine['ms']:.1f} vs {s['ms']:.1f} ms ({ratio}x)")
        dl = f"{max(abs(a - b) for a, b in zip(s['losses'], ref)):.2e}" if ref else "-"
        spread = f"[{s['lo']:.0f}-{s['hi']:.0f}]"
        print(f"{name:<12}{label:<29}{s['ms']:>9.1f}{spread:>15}{ratio:>15}{s['peak']:>14.0f}{s['base']:>7.0f}"
              f"{s['peak'] - s['base']:>11.0f}{s['losses'][-1]:>11.5f}{dl:>19}")
    print(f"total {elapsed:.0f} s; load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print("target (megazero at least as fast as each peer at the same stage): "
          + ("met" if not slower else "MISSED: " + "; ".join(slower)))
    for framework, stage, r in errors:
        print(f"\n{NAMES[framework]} stage {stage} failed: {r['error']}")
        if "traceback" in r:
            print("  " + "\n  ".join(r["traceback"].strip().splitlines()[-12:]))


if __name__ == "__main__":
    main()
