"""Context parallelism end to end (issue 14): the parity model of test_layout_parity.py (seq 32, 4 heads,
dropout 0) trained with the sequence split over cp ranks gives the single process's per-step loss and
grad norm (fp32, rtol 1e-5): cp 2 with p2p (ring) and a2a (all-to-all), GPT-2 (learned positions) and
Llama (rope + GQA, 2 key/value groups); cp 4 p2p (and a2a for Llama: groups replicated to 4); cp 2 with
tp 2 + sequence parallelism, with pp 2, with dp 2 under ZeRO-1 and ZeRO-3, with selective recomputation
(the cp attention re-run in backward); cp2 tp2 pp2 with SP (Llama) on 8 ranks; and the validation
loss after training. The pipeline carries [b, s/cp, h] ([b, s/(cp tp), h] with SP). A checkpoint saved
at cp 2 resumes at cp 1 (dp 2) with the uninterrupted run's losses. One launch per world size (1, 2, 4,
8); each parity test prints its max relative differences (pytest -s).
"""

import re

import pytest
import torch

from megazero.checkpoint.format import iteration_dirname
from megazero.topology import GridShape, Topology
from megazero.training.data_setup import ResolvedData
from megazero.training.trainer import Trainer
from megazero.validation import validate
from tests.integration.test_layout_parity import (
    RTOL, STEPS, Layout, _train_layouts, layout_id, parity_config, run_launches,
)

L = Layout
SP = (("sequence_parallel", True),)
SELECTIVE = (("recompute_granularity", "selective"),)


def cp_id(world: int, layout: Layout) -> str:
    extra = {(): "", SP: "-sp", SELECTIVE: "-selective"}[layout.activation]
    return layout_id(world, layout) + extra


SAVED_AT = 8  # the cp 2 run saves at this step (and goes on to STEPS); the cp 1 load trains the rest
SAVER, LOADER = L(cp=2), L()  # on 2 ranks: cp 2 dp 1 saves, cp 1 dp 2 loads
LAUNCHES = {  # world size -> layouts trained from scratch; micro 2
    1: [L(), L(model="llama")],  # the references
    2: [L(cp=2, cp_comm="a2a"), L(cp=2, model="llama"), L(cp=2, cp_comm="a2a", model="llama"),
        L(cp=2, activation=SELECTIVE)],
    4: [L(cp=4), L(cp=4, cp_comm="a2a", model="llama"),
        L(cp=2, tp=2, activation=SP), L(cp=2, tp=2, model="llama", activation=SP),
        L(cp=2, tp=2, cp_comm="a2a", activation=SP), L(cp=2, pp=2), L(cp=2, zero=1), L(cp=2, zero=3)],
    8: [L(cp=2, tp=2, pp=2, model="llama", activation=SP)],  # 8 processes start slowly: one layout
}
PIPELINED = [(4, L(cp=2, pp=2)), (8, L(cp=2, tp=2, pp=2, model="llama", activation=SP))]  # buffer shapes recorded


def _trainer(rank, world_size, prefix, tokenizer_model, layout, log=lambda _: None, **overrides) -> Trainer:
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    cfg = parity_config(prefix, tokenizer_model, layout).replace(**overrides)
    validate(cfg, world_size)
    topo = Topology.build(GridShape(world_size, tp=layout.tp, pp=layout.pp, cp=layout.cp), rank)
    return Trainer(cfg, topo, data, torch.device("cpu"), run_dir=None, log=log)


def _records(trainer: Trainer, out: dict | None = None, key=None) -> list[tuple[float, float]]:
    """Train; [(loss, grad norm)] per step. With `out`, also out[("eval", key)]: the validation loss after;
    with a pipeline, out[("p2p shape", key)]: the stage-to-stage buffer shape."""
    history = trainer.train()
    if out is not None:
        out[("eval", key)] = trainer.evaluate("valid")
        if trainer.executor.p2p is not None:
            out[("p2p shape", key)] = trainer.executor.p2p.shape
    trainer.close()
    return [(r.lm_loss, r.grad_norm) for r in history]


def _launch(rank, world_size, prefix, tokenizer_model, layouts, root):
    out = {}
    for layout in layouts:
        out[layout] = _records(_trainer(rank, world_size, prefix, tokenizer_model, layout), out, layout)
    if world_size == 2:  # the saver is also the cp 2 p2p GPT-2 parity run
        folder = root / "cp2"
        out[SAVER] = _records(_trainer(rank, world_size, prefix, tokenizer_model, SAVER,
                                       checkpoint={"save": str(folder), "save_interval": SAVED_AT}), out, SAVER)
        logs = []
        trainer = _trainer(rank, world_size, prefix, tokenizer_model, LOADER, log=logs.append,
                           checkpoint={"load": str(folder)})
        trainer.load(folder / iteration_dirname(SAVED_AT))
        out["resumed"] = {"history": _records(trainer), "log": re.sub(r" in [0-9.]+ s", "", " ".join(logs))}
        out[LOADER] = _train_layouts(rank, world_size, prefix, tokenizer_model, [LOADER])[LOADER]  # cp1 dp2
    return out


@pytest.fixture(scope="module")
def histories(tiny_dataset, tmp_path_factory):
    return run_launches(LAUNCHES, *tiny_dataset, _launch, tmp_path_factory.mktemp("cp_checkpoints"))


def max_rel_diff(got, reference) -> tuple[float, float]:
    """(loss, grad norm): the largest relative difference over the steps (the closing note's table)."""
    return tuple(max(abs(g[i] - r[i]) / abs(r[i]) for g, r in zip(got, reference)) for i in (0, 1))


def _assert_close(got, reference, first_step: int = 1) -> None:
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, reference), start=first_step):
        assert loss == pytest.approx(ref_loss, rel=RTOL), f"step {step} loss {loss} vs {ref_loss}"
        assert norm == pytest.approx(ref_norm, rel=RTOL), f"step {step} grad norm {norm} vs {ref_norm}"


PARITY = [(w, layout) for w, layouts in LAUNCHES.items() if w > 1 for layout in layouts] + [(2, SAVER)]


@pytest.mark.parametrize("key", PARITY, ids=[cp_id(*k) for k in PARITY])
def test_context_parallel_layout_matches_single_process(histories, key):
    got, reference = histories[key], histories[(1, L(model=key[1].model))]
    assert len(got) == len(reference) == STEPS
    print(f"{cp_id(*key)}: max rel diff loss %.1e grad norm %.1e" % max_rel_diff(got, reference))
    _assert_close(got, reference)


@pytest.mark.parametrize("key", PARITY, ids=[cp_id(*k) for k in PARITY])
def test_context_parallel_validation_loss_matches_single_process(histories, key):
    got, reference = histories[(key[0], ("eval", key[1]))], histories[(1, ("eval", L(model=key[1].model)))]
    assert got == pytest.approx(reference, rel=RTOL)


def test_pipeline_carries_the_local_sequence(histories):
    # micro 2, hidden 64; seq 32 / cp 2 = 16; with SP also / tp 2 = 8
    assert histories[(4, ("p2p shape", PIPELINED[0][1]))] == (2, 16, 64)
    assert histories[(8, ("p2p shape", PIPELINED[1][1]))] == (2, 8, 64)


def test_checkpoint_saved_at_cp2_resumes_at_cp1(histories):
    resumed = histories[(2, "resumed")]
    assert f"(iteration {SAVED_AT}" in resumed["log"] and "optimizer state restored" in resumed["log"]
    got = resumed["history"]
    assert len(got) == STEPS - SAVED_AT
    # the loading layout's own uninterrupted run, the saver's, and the single process
    for reference in (histories[(2, LOADER)], histories[(2, SAVER)], histories[(1, L())]):
        _assert_close(got, reference[SAVED_AT:], first_step=SAVED_AT + 1)
