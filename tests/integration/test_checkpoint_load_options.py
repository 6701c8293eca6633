"""--finetune, --no-load-optim, --no-load-rng (Megatron's meanings), in one single-process launch:
what each restores and what it leaves fresh; and --exit-duration-in-mins."""

from pathlib import Path

import torch

from megazero.checkpoint.state import save_checkpoint
from megazero.training.data_setup import ResolvedData
from tests.dist_utils import run_distributed
from tests.integration.test_checkpoint import _config, _trainer
from tests.integration.test_layout_parity import Layout

LAYOUT = Layout(micro=2, zero=1)


def _state(trainer) -> dict:
    opt = trainer.zero.optimizer
    moments = [m for _, state in opt.export_state() for m in state.values()]
    return {"iteration": trainer.iteration, "consumed": trainer.consumed_samples, "steps": trainer.optimizer_steps,
            "adam_steps": opt.step_count(), "moments_zero": all(not m.any() for m in moments),
            "values": [v.clone() for v in opt.values], "rng": trainer.rng.state_dict()["ambient"].clone()}


def _with_dropout(cfg):
    return cfg.replace(model={"hidden_dropout": 0.1})  # so the RNG streams advance and restoring them shows


def _run(rank, world_size, prefix, tokenizer_model, root: Path):
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    trainer = _trainer(rank, world_size, _with_dropout(_config(prefix, tokenizer_model, LAYOUT, 3, root)), LAYOUT, data)
    trainer.train()
    saved = _state(trainer)
    folder = save_checkpoint(trainer.checkpoint_subject(), root / "ckpt")["path"]
    trainer.close()
    out = {"saved": saved}
    for name, options in {"plain": {}, "finetune": {"finetune": True}, "no_load_optim": {"no_load_optim": True},
                          "no_load_rng": {"no_load_rng": True}}.items():
        cfg = _with_dropout(_config(prefix, tokenizer_model, LAYOUT, 5, root, load=str(root / "ckpt"), **options))
        loaded = _trainer(rank, world_size, cfg, LAYOUT, data)
        loaded.load(folder)
        out[name] = _state(loaded)
        out[name]["next_loss"] = loaded.train()[0].lm_loss
        loaded.close()
    return out


def test_load_options(tiny_dataset, tmp_path):
    prefix, model = tiny_dataset
    r = run_distributed(_run, 1, prefix, model, tmp_path)[0]
    saved = r["saved"]
    assert saved["iteration"] == 3 and saved["adam_steps"] == 3 and not saved["moments_zero"]
    for name in ("plain", "finetune", "no_load_optim", "no_load_rng"):  # weights always load
        assert all(torch.equal(a, b) for a, b in zip(r[name]["values"], saved["values"])), name
    plain, fine, no_optim, no_rng = r["plain"], r["finetune"], r["no_load_optim"], r["no_load_rng"]
    assert (plain["iteration"], plain["adam_steps"], plain["moments_zero"]) == (3, 3, False)
    assert torch.equal(plain["rng"], saved["rng"])
    # --finetune: weights only; counters, data position, optimizer and RNG start fresh
    assert (fine["iteration"], fine["consumed"], fine["steps"], fine["adam_steps"]) == (0, 0, 0, 0)
    assert fine["moments_zero"] and not torch.equal(fine["rng"], saved["rng"])
    # --no-load-optim: counters and data position restored, Adam state fresh
    assert (no_optim["iteration"], no_optim["consumed"], no_optim["adam_steps"]) == (3, saved["consumed"], 0)
    assert no_optim["moments_zero"]
    # --no-load-rng: everything but the RNG streams
    assert (no_rng["iteration"], no_rng["adam_steps"], no_rng["moments_zero"]) == (3, 3, False)
    assert not torch.equal(no_rng["rng"], saved["rng"])
    # step 4's loss precedes its update: same weights, data and dropout masks give the same loss
    assert no_optim["next_loss"] == plain["next_loss"]
    assert no_rng["next_loss"] != plain["next_loss"]  # other dropout masks
    assert fine["next_loss"] != plain["next_loss"]  # finetune restarts the data at sample 0


def _exit_duration(rank, world_size, prefix, tokenizer_model, root: Path):
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    cfg = _config(prefix, tokenizer_model, LAYOUT, 50, root, save=str(root / "ckpt"), exit_duration_in_mins=1e-4)
    trainer = _trainer(rank, world_size, cfg, LAYOUT, data)
    history = trainer.train()
    trainer.close()
    return len(history)


def test_exit_duration_saves_and_stops_at_the_next_step(tiny_dataset, tmp_path):
    """--exit-duration-in-mins 1e-4 (6 ms) has passed after the first step: save it, stop there."""
    from megazero.checkpoint.format import read_index, resolve_checkpoint

    prefix, model = tiny_dataset
    assert run_distributed(_exit_duration, 1, prefix, model, tmp_path)[0] == 1  # of 50 iterations
    folder = resolve_checkpoint(tmp_path / "ckpt")
    assert folder.name == "iter_0000001" and read_index(folder)["state"]["iteration"] == 1
