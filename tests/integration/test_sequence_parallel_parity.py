"""Sequence parallelism end to end: the parity model of test_layout_parity.py trained with
--sequence-parallel gives the single process's per-step loss and grad norm (fp32, rtol 1e-5, no
dropout) at tp 2 and 4, tp 2 with pp 2 vp 2, tp 2 dp 2 ZeRO-3 and tp 2 dp 2 ZeRO-2 with the optimizer
offloaded to the CPU, for GPT-2 and Llama blocks (tp 4 > 2 key/value groups), and so does the validation
loss after training; bf16 and fp16 with SP match their non-SP twins (fp16: the loss scaler's path, not
compared with fp32: plain tp 2 fp16 is itself 2.2e-3 off in grad norm); the pipeline carries
[b, s/tp, h]; and SP does not change the parameters: a
checkpoint saved with SP resumes without it (and the other way round) with the losses of the
uninterrupted run. Three launches (1, 2 and 4 ranks).
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
    MIXED_NORM_RTOL, MIXED_RTOL, RTOL, STEPS, Layout, _train_layouts, layout_id, parity_config, run_launches,
)

L = Layout
SP = (("sequence_parallel", True),)


def sp(layout: Layout) -> Layout:
    return layout._replace(activation=SP)


def sp_id(world: int, layout: Layout) -> str:
    return layout_id(world, layout) + ("-sp" if layout.activation == SP else "")


SAVED_AT = 8  # the checkpoint runs save at this step (and go on to STEPS); the loads train the rest
SAVERS = [sp(L(tp=2)), L(tp=2)]  # 2 ranks: each also a parity run; each saved run is loaded by the other
MIXED = [sp(L(tp=2, dtype="bf16")), L(tp=2, dtype="bf16"), sp(L(tp=2, dtype="fp16")), L(tp=2, dtype="fp16")]
LAUNCHES = {  # world size -> layouts trained from scratch (dp = world / (tp x pp)); micro 2
    1: [L(), L(model="llama")],  # the references
    2: [sp(L(tp=2, model="llama"))] + MIXED,
    4: [sp(L(tp=4)), sp(L(tp=4, model="llama")), sp(L(tp=2, zero=3)), sp(L(tp=2, pp=2, vp=2)),
        sp(L(tp=2, pp=2, vp=2, model="llama")), sp(L(tp=2, zero=2, offload="cpu"))],
}
PIPELINED = sp(L(tp=2, pp=2, vp=2))  # whose stage-to-stage buffer shape is recorded


def _trainer(rank, world_size, prefix, tokenizer_model, layout, log=lambda _: None, **overrides) -> Trainer:
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    cfg = parity_config(prefix, tokenizer_model, layout).replace(**overrides)
    validate(cfg, world_size)
    topo = Topology.build(GridShape(world_size, tp=layout.tp, pp=layout.pp), rank)
    return Trainer(cfg, topo, data, torch.device("cpu"), run_dir=None, log=log)


def _records(trainer: Trainer, out: dict | None = None, key=None) -> list[tuple[float, float]]:
    """Train; [(loss, grad norm)] per step. With `out`, also out[("eval", key)]: the validation loss after."""
    history = trainer.train()
    if out is not None:
        out[("eval", key)] = trainer.evaluate("valid")
    trainer.close()
    return [(r.lm_loss, r.grad_norm) for r in history]


def _save_and_cross_load(rank, world_size, prefix, tokenizer_model, root) -> dict:
    """Each SAVERS layout trains STEPS steps saving at SAVED_AT; then the other layout loads that
    checkpoint and trains the remaining steps (SP saved -> loaded without SP, and vice versa)."""
    out = {}
    for layout in SAVERS:
        folder = root / sp_id(world_size, layout)
        out[layout] = _records(_trainer(rank, world_size, prefix, tokenizer_model, layout,
                                        checkpoint={"save": str(folder), "save_interval": SAVED_AT}), out, layout)
    for saved, loader in zip(SAVERS, reversed(SAVERS)):
        folder = root / sp_id(world_size, saved) / iteration_dirname(SAVED_AT)
        logs = []
        trainer = _trainer(rank, world_size, prefix, tokenizer_model, loader, log=logs.append,
                           checkpoint={"load": str(folder.parent)})
        trainer.load(folder)
        # the load's duration ("in 0.12 s") differs between ranks: out of what the ranks must agree on
        out[("resumed", saved)] = {"history": _records(trainer), "log": re.sub(r" in [0-9.]+ s", "", " ".join(logs))}
    return out


def _launch(rank, world_size, prefix, tokenizer_model, layouts, root):
    evaluated = [layout for layout in layouts if layout.dtype != "bf16"]  # fp32: vs the single process; fp16: twins
    out = _train_layouts(rank, world_size, prefix, tokenizer_model, layouts, evaluated)
    if world_size == 2:
        out.update(_save_and_cross_load(rank, world_size, prefix, tokenizer_model, root))
    if world_size == 4:
        trainer = _trainer(rank, world_size, prefix, tokenizer_model, PIPELINED, training={"train_iters": 1})
        _records(trainer)  # the p2p asserts every tensor sent has the declared shape
        out["p2p shape"] = trainer.executor.p2p.shape
    return out


@pytest.fixture(scope="module")
def histories(tiny_dataset, tmp_path_factory):
    return run_launches(LAUNCHES, *tiny_dataset, _launch, tmp_path_factory.mktemp("sp_checkpoints"))


def _assert_close(got, reference, rtol: float, norm_rtol: float, first_step: int = 1) -> None:
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, reference), start=first_step):
        assert loss == pytest.approx(ref_loss, rel=rtol), f"step {step} loss {loss} vs {ref_loss}"
        assert norm == pytest.approx(ref_norm, rel=norm_rtol), f"step {step} grad norm {norm} vs {ref_norm}"


FP32 = [(w, layout) for w, layouts in LAUNCHES.items() for layout in layouts if w > 1 and layout.dtype == "fp32"]
FP32 += [(2, layout) for layout in SAVERS]


@pytest.mark.parametrize("key", FP32, ids=[sp_id(*k) for k in FP32])
def test_sequence_parallel_layout_matches_single_process(histories, key):
    got, reference = histories[key], histories[(1, L(model=key[1].model))]
    assert len(got) == len(reference) == STEPS
    _assert_close(got, reference, RTOL, RTOL)


@pytest.mark.parametrize("key", FP32, ids=[sp_id(*k) for k in FP32])
def test_sequence_parallel_validation_loss_matches_single_process(histories, key):
    got, reference = histories[(key[0], ("eval", key[1]))], histories[(1, ("eval", L(model=key[1].model)))]
    assert got == pytest.approx(reference, rel=RTOL)


TWINS = [layout for layout in MIXED if layout.activation == SP]
# SP vs its twin: the same roundings except where SP sums differently (the replicated parameters'
# gradients are rounded per rank's positions, then summed over tp). bf16: bounded by the bf16-vs-fp32
# tolerances of test_layout_parity; fp16 (11-bit mantissa, dynamic loss scale) tighter: its loss
# tolerance for the grad norm too. Not compared with fp32 here: that is the twin's business.
TWIN_RTOL = {"bf16": (MIXED_RTOL["bf16"], MIXED_NORM_RTOL["bf16"]), "fp16": (MIXED_RTOL["fp16"], MIXED_RTOL["fp16"])}


@pytest.mark.parametrize("layout", TWINS, ids=[sp_id(2, layout) for layout in TWINS])
def test_mixed_precision_with_sp_matches_its_twin_without(histories, layout):
    twin_layout = layout._replace(activation=())
    got, twin = histories[(2, layout)], histories[(2, twin_layout)]
    assert len(got) == len(twin) == STEPS
    _assert_close(got, twin, *TWIN_RTOL[layout.dtype])
    if layout.dtype == "fp16":  # the validation loss after training too
        assert histories[(2, ("eval", layout))] == pytest.approx(histories[(2, ("eval", twin_layout))],
                                                                 rel=MIXED_RTOL["fp16"])


def test_pipeline_carries_the_sequence_shard(histories):
    # micro 2, seq 32 / tp 2, hidden 64 (without SP: [2, 32, 64])
    assert histories[(4, "p2p shape")] == (2, 16, 64)


@pytest.mark.parametrize("saved", SAVERS, ids=["saved-with-sp", "saved-without-sp"])
def test_checkpoint_resumes_across_the_sequence_parallel_switch(histories, saved):
    resumed = histories[(2, ("resumed", saved))]
    loader = SAVERS[1 - SAVERS.index(saved)]
    assert f"(iteration {SAVED_AT}" in resumed["log"] and "optimizer state restored" in resumed["log"]
    got = resumed["history"]
    assert len(got) == STEPS - SAVED_AT
    # the loading layout's own uninterrupted run, and the single process
    for reference in (histories[(2, loader)], histories[(1, L())]):
        _assert_close(got, reference[SAVED_AT:], RTOL, RTOL, first_step=SAVED_AT + 1)
