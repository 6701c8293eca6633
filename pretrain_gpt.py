"""Pretrain a GPT: parse config -> validate -> init distributed -> build -> train.

    python pretrain_gpt.py                                  # one process, default data
    torchrun --nproc-per-node 4 pretrain_gpt.py --tp 2      # 2-way tensor x 2-way data parallel

Flags follow Megatron-LM (`python pretrain_gpt.py --help`). Bad input ends with one line on stderr
(printed by rank 0) and exit code 2, before any process group or file is created. A collective that
times out (--distributed-timeout-minutes) or loses its peer ends the job with one message and exit
code 3 or 4 (docs/failures.md).
"""

from __future__ import annotations

import datetime
import shutil
import sys
from pathlib import Path

if __package__ in (None, "") and str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without install

from megazero.cli import parse_args  # noqa: E402
from megazero.config import RunConfig  # noqa: E402
from megazero.distributed import (LaunchEnv, RankPrinter, device_for, fail, init_process_group,  # noqa: E402
                                  resolve_backend, teardown)
from megazero.errors import CollectiveError, ConfigError  # noqa: E402
from megazero.validation import validate  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402


def make_run_dir(cfg: RunConfig) -> tuple[Path, Path | None]:
    """The run directory, and the topmost folder this call created (None if it existed)."""
    if cfg.logging.output_dir:
        run_dir = Path(cfg.logging.output_dir)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("output") / f"run-{stamp}"
        n = 1
        while run_dir.exists():  # never reuse another run's folder
            run_dir, n = Path("output") / f"run-{stamp}-{n}", n + 1
    created = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, created


def lock_save_folder(cfg: RunConfig, rank: int, world_group, log):
    """Rank 0 takes the --save folder's lock (one run per folder; checkpoint/lock.py) and removes the
    interrupted saves it holds; every rank gets the same one-line error if the folder is taken."""
    from megazero import comm
    from megazero.checkpoint.format import remove_interrupted_saves
    from megazero.checkpoint.lock import SaveLock

    lock, error = None, None
    if cfg.checkpoint.save and rank == 0:
        try:
            lock = SaveLock(cfg.checkpoint.save)
            note = lock.acquire()
            if note:
                log(note)
            removed = remove_interrupted_saves(Path(cfg.checkpoint.save))
            if removed:
                log(f"removed the interrupted save{'s' if len(removed) > 1 else ''} "
                    f"{', '.join(str(p) for p in removed)} (never committed)")
        except ConfigError as err:
            lock, error = None, str(err)
    error = comm.all_gather_object(error, world_group)[0]
    if error:
        fail(error, rank)
    return lock


def prepare(argv: list[str] | None, env: LaunchEnv, log):
    """parse -> resume resolution -> validate -> data, before any process group or file exists:
    (cfg, the checkpoint to resume or None, backend, data, datasets), or None when the checkpoint is
    already at --train-iters (nothing to do). Bad input is one line on stderr and exit 2."""
    try:
        cfg = parse_args(argv, rank=env.rank)
        from megazero.checkpoint.resume import NothingToDo, check_resume_model, resolve_resume

        try:
            cfg, resume_from = resolve_resume(cfg, env.world_size, log)
        except NothingToDo:
            return None
        validate(cfg, env.world_size)
        cfg = cfg.resolved(env.world_size)
        backend = resolve_backend(cfg.parallel.distributed_backend)
        from megazero.training.data_setup import build_datasets, resolve_data  # heavy imports after cheap checks

        data = resolve_data(cfg, log)
        cfg = cfg.replace(model={"vocab_size": data.vocab_size})
        check_resume_model(cfg, resume_from)
        datasets = build_datasets(cfg, data, env.world_size)
    except ConfigError as err:
        fail(str(err), env.rank)
    return cfg, resume_from, backend, data, datasets


def open_run_dir(cfg: RunConfig, env: LaunchEnv, world_group) -> tuple[RunConfig, Path | None, Path | None]:
    """The writer rank (the last) makes the run folder and writes config.json; every rank records the
    writer's folder in its config, so checkpoints carry it (resume). Returns (cfg, the run folder on the
    writer or None, the topmost folder this call created or None)."""
    from megazero import comm

    writer = env.rank == env.world_size - 1
    run_dir, created = make_run_dir(cfg) if writer else (None, None)
    cfg = cfg.replace(logging={"output_dir": str(comm.all_gather_object(run_dir, world_group)[-1])})
    if run_dir is not None:
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")
        print(f"run directory: {run_dir.resolve()}", flush=True)
    return cfg, run_dir, created


def run(argv: list[str] | None = None) -> dict:
    """Train; returns the run summary (what summary.json holds) on the writing rank, {} elsewhere."""
    env = LaunchEnv.from_environ()
    log = RankPrinter(env.rank)
    prepared = prepare(argv, env, log)
    if prepared is None:
        return {}
    cfg, resume_from, backend, data, datasets = prepared

    import torch

    from megazero.topology import GridShape, Topology
    from megazero.training.trainer import Trainer

    init_process_group(env, backend, cfg.parallel.distributed_timeout_minutes)
    lock = None
    try:
        par = cfg.parallel
        topo = Topology.build(GridShape(env.world_size, tp=par.tensor_model_parallel_size,
                                        pp=par.pipeline_model_parallel_size, cp=par.context_parallel_size), env.rank)
        lock = lock_save_folder(cfg, env.rank, topo.world_group, log)  # before anything is written
        device = device_for(backend, env.local_rank)
        log(f"megazero: {env.world_size} process(es), backend {backend}, device {device.type}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) per process")
        log(f"data: {data.description}")
        cfg, run_dir, created = open_run_dir(cfg, env, topo.world_group)

        def abort(err: ConfigError) -> None:
            """Bad input found after start (no room for NVMe offload files, a corrupted checkpoint):
            the same line on every rank; leave nothing behind (the run folder holds only config.json)."""
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            fail(str(err), env.rank)

        try:
            trainer = Trainer(cfg, topo, data, device, run_dir, log, datasets=datasets)
        except ConfigError as err:
            abort(err)
        try:
            if resume_from is not None:
                try:
                    trainer.load(resume_from)
                except ConfigError as err:
                    abort(err)
            try:
                trainer.train()
            except ConfigError as err:  # a checkpoint that could not be saved: the run folder keeps its logs
                fail(str(err), env.rank)
        finally:
            trainer.close()
        return getattr(trainer, "summary", {})
    finally:
        if lock is not None:
            lock.release(remove_created_if_empty=True)
        teardown()


@record  # under torchrun, an unexpected exception's traceback becomes the failure summary's root cause
def main(argv: list[str] | None = None) -> int:
    """Console entry point (`megazero-pretrain-gpt`): exit code 0 on success. A collective that timed
    out or lost its peer (a rank stopped, hung or killed) ends the job with one message, printed by the
    first rank to fail, and exit code 3 (timeout) or 4 (peer lost) on every failing rank
    (watchdog.exit_on_collective_error; docs/failures.md)."""
    try:
        run(argv)
    except CollectiveError as err:
        from megazero.watchdog import exit_on_collective_error

        exit_on_collective_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
