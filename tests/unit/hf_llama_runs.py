"""The distributed half of tests/unit/test_hf_llama.py, in a module of its own so that the spawned ranks
import neither transformers nor the test module (each rank would pay seconds for it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megazero.checkpoint import format as fmt


def continue_pretraining(rank: int, world_size: int, prefix, tokenizer_model, root, names, vocab_size: int) -> None:
    """The continue-pretraining flow at tp2: load each imported checkpoint `root/{name}_import` (a Hugging
    Face import at tp1), train 3 steps on the tiny dataset, save into `root/{name}_trained`."""
    from megazero.checkpoint.api import run_config_from_dict
    from megazero.checkpoint.state import load_checkpoint, save_checkpoint
    from megazero.topology import GridShape, Topology
    from megazero.training.data_setup import ResolvedData
    from megazero.training.trainer import Trainer
    from megazero.validation import validate

    root = Path(root)
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=vocab_size, description="tiny")
    for name in names:
        folder = fmt.resolve_checkpoint(root / f"{name}_import")
        cfg = run_config_from_dict(json.loads((folder / "index.json").read_text())["config"]).replace(
            parallel={"tensor_model_parallel_size": 2},
            optimizer={"lr": 1e-2, "lr_warmup_iters": 0},
            data={"data_path": str(prefix), "tokenizer_model": str(tokenizer_model), "split": "90,10,0"},
            training={"micro_batch_size": 2, "global_batch_size": 4, "gradient_accumulation_steps": None,
                      "train_iters": 3, "eval_iters": 0, "log_interval": 100, "eval_interval": 100})
        validate(cfg, world_size)
        cfg = cfg.resolved(world_size)
        trainer = Trainer(cfg, Topology.build(GridShape(world_size, tp=2), rank), data, torch.device("cpu"),
                          run_dir=None, log=lambda _: None)
        # an import holds no optimizer state and a fresh run's RNG streams for tp1; tp2 keeps its own seeds
        load_checkpoint(trainer.checkpoint_subject(), folder, load_rng=False, log=lambda _: None)
        trainer.train()
        save_checkpoint(trainer.checkpoint_subject(), root / f"{name}_trained")
        trainer.close()
