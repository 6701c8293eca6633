"""Checkpoints end to end (megazero/checkpoint/, docs/checkpoints.md), on CPU with gloo, in-process
(tests/dist_utils.run_distributed, real gloo processes):
1. Cross-layout: the parity model trained at tp2 pp2 dp2 ZeRO-1 and saved loads into tp1, tp4 dp2
   ZeRO-3, pp2 vp2 dp4 ZeRO-2 and CPU / NVMe optimizer offload: saving again right after loading
   gives the same global tensors bit for bit, and the next steps match an uninterrupted run.
2. Same-layout resume with dropout on is bitwise identical (losses, grad norms, final state).

pretrain_gpt.py subprocesses: test_checkpoint_faults.py (kills, corruption, SIGTERM) and
test_checkpoint_resume_rules.py (--load rules, elastic resume, first-save faults, full disk, lock).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pretrain_gpt
from megazero.checkpoint.format import LATEST, CheckpointReader, iteration_dirname, read_index, resolve_checkpoint
from megazero.topology import GridShape, Topology
from megazero.training.data_setup import ResolvedData
from megazero.training.trainer import Trainer
from megazero.validation import validate
from tests.checkpoint_utils import assert_same_tensors, checkpoint_tensors  # noqa: F401
from tests.dist_utils import run_distributed
from tests.integration.test_layout_parity import Layout, layout_id, parity_config
from tests.integration.checkpoint_runs import *  # noqa: F401,F403 (constants, launch and read helpers)


# ----- 1. cross-layout load ------------------------------------------------------------------------------
K, M = 6, 3  # steps before the save, steps after the load
SOURCE = Layout(tp=2, pp=2, micro=2, zero=1)
TARGETS = {  # world size -> layouts that load the source checkpoint
    8: [Layout(tp=4, micro=2, zero=3), Layout(pp=2, vp=2, micro=1, zero=2),  # vp: 2 microbatches, a multiple of pp
        Layout(tp=2, pp=2, micro=2, zero=1, offload="nvme")],
    1: [Layout(micro=2), Layout(micro=2, zero=1, offload="cpu")],
}


def _config(prefix, tokenizer_model, layout: Layout, iters: int, nvme: Path, **checkpoint):
    cfg = parity_config(prefix, tokenizer_model, layout).replace(
        training={"train_iters": iters, "eval_iters": 0, "log_interval": 1000, "eval_interval": 1000},
        checkpoint=checkpoint)
    if layout.offload == "nvme":
        cfg = cfg.replace(zero={"offload_nvme_path": str(nvme)})
    return cfg


def _trainer(rank, world_size, cfg, layout, data, log=lambda _: None) -> Trainer:
    validate(cfg, world_size)
    topo = Topology.build(GridShape(world_size, tp=layout.tp, pp=layout.pp), rank)
    return Trainer(cfg, topo, data, torch.device("cpu"), run_dir=None, log=log)


def _records(history) -> list[tuple[float, float]]:
    return [(r.lm_loss, r.grad_norm) for r in history]


def _cross_layout(rank, world_size, prefix, tokenizer_model, root: Path, reference_steps: bool):
    """On this world size: (8) train the source layout K of K+M steps and save it (--exit-interval K);
    then for every target layout: load the source checkpoint, save it again at once, train M steps.
    (1) also the uninterrupted K+M-step reference."""
    from megazero.checkpoint.state import save_checkpoint

    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    nvme = root / f"nvme-rank{rank}"
    nvme.mkdir(exist_ok=True)
    out = {}
    if world_size == 8:
        cfg = _config(prefix, tokenizer_model, SOURCE, K + M, nvme, save=str(root / "source"), exit_interval=K)
        trainer = _trainer(rank, world_size, cfg, SOURCE, data)
        out["source"] = _records(trainer.train())
        trainer.close()
    if reference_steps:
        cfg = _config(prefix, tokenizer_model, Layout(micro=2), K + M, nvme)
        trainer = _trainer(rank, world_size, cfg, Layout(micro=2), data)
        out["reference"] = _records(trainer.train())
        trainer.close()
    source = resolve_checkpoint(root / "source")
    for layout in TARGETS[world_size]:
        logs = []
        cfg = _config(prefix, tokenizer_model, layout, K + M, nvme, load=str(root / "source"))
        trainer = _trainer(rank, world_size, cfg, layout, data, log=logs.append)
        trainer.load(source)
        save_checkpoint(trainer.checkpoint_subject(), root / f"resaved-{world_size}-{layout_id(world_size, layout)}")
        out[layout] = {"history": _records(trainer.train()), "log": logs}
        trainer.close()
    return out


@pytest.fixture(scope="module")
def cross_layout(tiny_dataset, tmp_path_factory):
    prefix, model = tiny_dataset
    root = tmp_path_factory.mktemp("cross_layout")
    t0 = time.perf_counter()
    eight = run_distributed(_cross_layout, 8, prefix, model, root, False)
    one = run_distributed(_cross_layout, 1, prefix, model, root, True)
    print(f"cross-layout launches: {time.perf_counter() - t0:.1f} s")
    return root, eight, one


def test_source_run_saved_at_the_exit_interval_and_matches_the_reference(cross_layout):
    root, eight, one = cross_layout
    folder = resolve_checkpoint(root / "source")
    assert folder.name == iteration_dirname(K)
    assert (root / "source" / LATEST).read_text() == iteration_dirname(K) + "\n"
    state = state_of(folder)
    assert (state["iteration"], state["consumed_samples"], state["optimizer_steps"], state["adam_steps"]) == \
        (K, K * 8, K, K)
    index = read_index(folder)
    assert {k: index["layout"][k] for k in ("world", "tp", "pp", "vp", "dp", "zero_stage")} == \
        {"world": 8, "tp": 2, "pp": 2, "vp": 1, "dp": 2, "zero_stage": 1}
    assert_complete_optimizer_state(checkpoint_tensors(folder))
    reference = one[0]["reference"]
    assert len(eight[0]["source"]) == K and len(reference) == K + M
    for r in eight[1:]:
        assert r["source"] == eight[0]["source"]
    for (loss, norm), (ref_loss, ref_norm) in zip(eight[0]["source"], reference):
        assert loss == pytest.approx(ref_loss, rel=RTOL) and norm == pytest.approx(ref_norm, rel=RTOL)


CROSS = [(w, layout) for w, layouts in TARGETS.items() for layout in layouts]


@pytest.mark.parametrize("key", CROSS, ids=[layout_id(*k) for k in CROSS])
def test_load_into_another_layout_keeps_every_tensor(cross_layout, key):
    """Save right after loading: every global tensor (model, exp_avg, exp_avg_sq) and the trainer
    state are exactly those of the source checkpoint, though every piece was cut differently."""
    root, _, _ = cross_layout
    world, layout = key
    source = resolve_checkpoint(root / "source")
    resaved = root / f"resaved-{world}-{layout_id(world, layout)}" / iteration_dirname(K)
    assert_same_tensors(checkpoint_tensors(source), checkpoint_tensors(resaved), layout_id(world, layout))
    mine, theirs = state_of(source), state_of(resaved)
    assert {k: mine[k] for k in ("iteration", "consumed_samples", "optimizer_steps", "adam_steps")} == \
        {k: theirs[k] for k in ("iteration", "consumed_samples", "optimizer_steps", "adam_steps")}
    layout_saved = read_index(resaved)["layout"]
    assert (layout_saved["tp"], layout_saved["pp"], layout_saved["vp"], layout_saved["zero_stage"],
            layout_saved["offload_optimizer"]) == (layout.tp, layout.pp, layout.vp, layout.zero, layout.offload)


@pytest.mark.parametrize("key", CROSS, ids=[layout_id(*k) for k in CROSS])
def test_steps_after_a_cross_layout_load_match_the_uninterrupted_run(cross_layout, key):
    root, eight, one = cross_layout
    world, layout = key
    per_rank = eight if world == 8 else one
    got = per_rank[0][layout]["history"]
    for r in per_rank[1:]:
        assert r[layout]["history"] == got, "ranks disagree"
    reference = one[0]["reference"][K:]
    assert len(got) == M
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, reference), start=K + 1):
        assert loss == pytest.approx(ref_loss, rel=RTOL), f"step {step} loss {loss} vs {ref_loss}"
        assert norm == pytest.approx(ref_norm, rel=RTOL), f"step {step} grad norm {norm} vs {ref_norm}"
    log = " ".join(per_rank[0][layout]["log"])
    assert f"loaded checkpoint {resolve_checkpoint(root / 'source')} (iteration {K}, saved from tp2 pp2 vp1 dp2 zero1)" \
        in log and "optimizer state restored" in log
    same_streams = (layout.tp, layout.pp, layout.vp) == (SOURCE.tp, SOURCE.pp, SOURCE.vp)
    assert ("RNG restored" if same_streams else "RNG not restored: tp/pp/vp changed") in log


# ----- 2. same-layout resume, dropout on: bitwise ---------------------------------------------------------
RESUME = Layout(tp=2, micro=2, zero=2)  # 4 ranks: tp2 dp2, accumulation 2
RESUME_STEPS = 20


def _resume_config(prefix, tokenizer_model, **checkpoint):
    return parity_config(prefix, tokenizer_model, RESUME).replace(
        model={"hidden_dropout": 0.1, "attention_dropout": 0.1},
        training={"train_iters": RESUME_STEPS, "deterministic": True, "eval_iters": 0, "log_interval": 1000,
                  "eval_interval": 1000},
        checkpoint=checkpoint)


def _straight_and_resumed(rank, world_size, prefix, tokenizer_model, root: Path):
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    out = {}
    # A: 20 steps straight (saves at the end)
    trainer = _trainer(rank, world_size, _resume_config(prefix, tokenizer_model, save=str(root / "A")), RESUME, data)
    out["A"] = _records(trainer.train())
    trainer.close()
    # B: 10 steps and save (--exit-interval 10), then new Trainers load it and run the other 10
    cfg = _resume_config(prefix, tokenizer_model, save=str(root / "B"), exit_interval=RESUME_STEPS // 2)
    trainer = _trainer(rank, world_size, cfg, RESUME, data)
    first = _records(trainer.train())
    trainer.close()
    logs = []
    cfg = _resume_config(prefix, tokenizer_model, save=str(root / "B"), load=str(root / "B"))
    trainer = _trainer(rank, world_size, cfg, RESUME, data, log=logs.append)
    trainer.load(resolve_checkpoint(root / "B"))
    out["B"] = first + _records(trainer.train())
    trainer.close()
    out["log"] = logs
    # the same model without dropout (guards against a vacuous comparison): its step-1 loss
    cfg = _resume_config(prefix, tokenizer_model).replace(model={"hidden_dropout": 0.0, "attention_dropout": 0.0},
                                                          training={"train_iters": 1})
    trainer = _trainer(rank, world_size, cfg, RESUME, data)
    out["no_dropout_first_loss"] = trainer.train()[0].lm_loss
    trainer.close()
    return out


@pytest.fixture(scope="module")
def resumed(tiny_dataset, tmp_path_factory):
    prefix, model = tiny_dataset
    root = tmp_path_factory.mktemp("resume")
    return root, run_distributed(_straight_and_resumed, 4, prefix, model, root)


def test_same_layout_resume_with_dropout_is_bitwise_identical(resumed):
    root, per_rank = resumed
    a, b = per_rank[0]["A"], per_rank[0]["B"]
    assert len(a) == len(b) == RESUME_STEPS
    first_diff = next((step for step, (x, y) in enumerate(zip(a, b), start=1) if x != y), None)
    assert first_diff is None, f"resumed run differs from step {first_diff}: {b[first_diff - 1]} vs {a[first_diff - 1]}"
    assert any("RNG restored" in line for line in per_rank[0]["log"])
    for r in per_rank[1:]:
        assert r["A"] == a and r["B"] == b
    final_a, final_b = (resolve_checkpoint(root / run) for run in "AB")
    assert final_a.name == final_b.name == iteration_dirname(RESUME_STEPS)
    assert_same_tensors(checkpoint_tensors(final_a), checkpoint_tensors(final_b), "final state")
    assert_same_tensors(rng_tensors(final_a), rng_tensors(final_b), "final RNG streams")
    assert state_of(final_a) == state_of(final_b)
    assert (root / "B" / iteration_dirname(RESUME_STEPS // 2)).is_dir()  # the mid-run checkpoint B resumed from


def test_dropout_is_on_in_the_resume_test(resumed):
    """Guard against a vacuous test 2: without dropout the same model's first loss is different."""
    _, per_rank = resumed
    assert per_rank[0]["no_dropout_first_loss"] != pytest.approx(per_rank[0]["A"][0][0], rel=1e-4)
