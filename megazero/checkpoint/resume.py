"""Start-up's resume decisions (#11 item 6), before any process group exists: which checkpoint
`--load` names, whether there is anything left to do, what the resumed run keeps of the checkpoint's
config (its global batch on another process count, its run folder), whether its optimizer state is
this run's optimizer's, and whether the model shapes agree. pretrain_gpt.py calls `resolve_resume`
after parsing and `check_resume_model` once the vocabulary is known; every message and error is the one-line kind (ConfigError / CheckpointError)."""

from __future__ import annotations

from pathlib import Path

from megazero.checkpoint.format import check_optimizer_state, find_checkpoint, read_index
from megazero.config import RunConfig
from megazero.errors import ConfigError
from megazero.optim.update_rules import build_update_rule


class NothingToDo(Exception):
    """The checkpoint to resume already reached --train-iters (said in one log line): the run ends at
    once, exit 0, no run folder, no save."""


def resolve_resume(cfg: RunConfig, world_size: int, log) -> tuple[RunConfig, Path | None]:
    """(the config to run, the committed checkpoint folder to resume from or None for a fresh start).
    Raises NothingToDo when the checkpoint is already at --train-iters, ConfigError (CheckpointError)
    for a --load that is not a checkpoint or a batch that cannot be kept."""
    folder = checkpoint_to_resume(cfg, log)
    if folder is None:
        return cfg, None
    if nothing_to_do(cfg, folder, log):
        raise NothingToDo(str(folder))
    cfg = keep_checkpoint_batch(cfg, folder, world_size, log)
    index = read_index(folder)
    if not (cfg.checkpoint.no_load_optim or cfg.checkpoint.finetune) and index["state"]["adam_steps"] > 0:
        check_optimizer_state(index, build_update_rule(cfg.optimizer).identity(), folder / "index.json")
    return keep_run_dir(cfg, folder), folder


def check_resume_model(cfg: RunConfig, folder: Path | None) -> None:
    """The checkpoint's model shape against this run's (vocabulary resolved): a one-line error on a mismatch."""
    if folder is not None:
        from megazero.checkpoint.state import check_model_shape  # model and ZeRO imports: after the cheap checks

        check_model_shape(read_index(folder), cfg, folder / "index.json")


def checkpoint_to_resume(cfg: RunConfig, log) -> Path | None:
    """The committed checkpoint folder --load names; None when there is nothing to resume (no --load,
    or a missing folder, or one holding only leftovers such as an interrupted first save: `--save X
    --load X` starts from scratch the first time). Anything else that is not a checkpoint (a file, a
    folder of other things, a corrupted `latest`) is a one-line error (format.find_checkpoint)."""
    if cfg.checkpoint.load is None:
        return None
    folder, note = find_checkpoint(cfg.checkpoint.load)
    if note:
        log(note)
    return folder


def nothing_to_do(cfg: RunConfig, folder: Path, log) -> bool:
    """A resume whose checkpoint already reached --train-iters: say so (no run folder, no save)."""
    iteration, total = read_index(folder, resume=True)["iteration"], cfg.training.train_iters
    if cfg.checkpoint.finetune or iteration < total:
        return False
    log(f"checkpoint {folder} is at iteration {iteration} "
        f"{'=' if iteration == total else f'> {total} ='} --train-iters: nothing to do")
    return True


def keep_checkpoint_batch(cfg: RunConfig, folder: Path, world_size: int, log) -> RunConfig:
    """Elastic resume: unless the batch sizes are given, keep the checkpoint's global batch on this
    world size by changing gradient accumulation (or say why that cannot work)."""
    t = cfg.training
    if t.global_batch_size is not None or t.gradient_accumulation_steps is not None or cfg.checkpoint.finetune:
        return cfg
    saved = read_index(folder)["config"]["training"]
    gbs, micro = saved.get("global_batch_size"), t.micro_batch_size
    if gbs is None:  # an index written without the resolved batch: nothing to keep
        return cfg
    dp = cfg.data_parallel_size(world_size)
    if micro is None or gbs % (micro * dp):
        raise ConfigError(f"{folder}: cannot keep the checkpoint's global batch {gbs} on {world_size} process(es): "
                          f"it is not a multiple of micro batch {micro} x data-parallel size {dp}; pass a "
                          f"--micro-batch-size that makes it one, or --global-batch-size to change the batch")
    accum = gbs // (micro * dp)
    if accum != saved["gradient_accumulation_steps"]:
        log(f"resume: keeping the checkpoint's global batch {gbs}: gradient accumulation "
            f"{saved['gradient_accumulation_steps']} -> {accum} (micro {micro} x dp {dp})")
    return cfg.replace(training={"global_batch_size": gbs})


def keep_run_dir(cfg: RunConfig, folder: Path) -> RunConfig:
    """A resumed run continues the run folder its checkpoint was written from (kept in the
    checkpoint's config), so one run has one set of CSVs, TensorBoard curves and summary; an explicit
    --output-dir wins."""
    if cfg.logging.output_dir:
        return cfg
    saved = read_index(folder)["config"].get("logging", {}).get("output_dir")
    return cfg.replace(logging={"output_dir": saved}) if saved else cfg
