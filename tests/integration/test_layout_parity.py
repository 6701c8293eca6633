"""Layout parity: the same tiny GPT, seed and data trained under every tp x dp layout that fits in 8
ranks gives the same per-step loss and grad norm as one process (fp32, rtol 1e-5).

Dropout is 0: dropout masks on head-sharded activations are drawn per TP rank by design, so they
cannot match a different tp size. Global batch 8 with micro batch 2 makes gradient accumulation 4 / 2
/ 1 at dp 1 / 2 / 4, so accumulation is covered too. One launch per world size runs every layout of
that size.
"""

import pytest
import torch

from megazero.config import ModelConfig, OptimizerConfig, RunConfig, TrainingConfig, DataConfig
from megazero.topology import GridShape, Topology
from megazero.training.data_setup import ResolvedData
from megazero.training.trainer import Trainer
from tests.dist_utils import run_distributed

STEPS = 12
RTOL = 1e-5


def parity_config(prefix, tokenizer_model, tp: int, micro: int) -> RunConfig:
    return RunConfig(
        model=ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, seq_length=64, vocab_size=512,
                          make_vocab_size_divisible_by=64, hidden_dropout=0.0, attention_dropout=0.0),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=3, clip_grad=1.0, weight_decay=0.1),
        data=DataConfig(data_path=str(prefix), tokenizer_model=str(tokenizer_model), split="90,10,0"),
        training=TrainingConfig(micro_batch_size=micro, global_batch_size=8, train_iters=STEPS, seed=7,
                                eval_interval=STEPS, eval_iters=1, log_interval=STEPS),
    ).replace(parallel={"tensor_model_parallel_size": tp})


def _train_layouts(rank, world_size, prefix, tokenizer_model, layouts):
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    out = {}
    for tp, micro in layouts:
        cfg = parity_config(prefix, tokenizer_model, tp, micro)
        cfg.validate(world_size)
        topo = Topology.build(GridShape(world_size, tp=tp), rank)
        trainer = Trainer(cfg, topo, data, torch.device("cpu"), run_dir=None, log=lambda _: None)
        history = trainer.train()
        out[(tp, world_size // tp, micro)] = [(r.lm_loss, r.grad_norm) for r in history]
    return out


# world size -> layouts (tp, micro batch) run in that launch
LAUNCHES = {
    1: [(1, 2), (1, 8)],      # reference (accumulation 4) and the no-accumulation single process
    2: [(2, 2), (1, 2)],      # (tp2, dp1), (tp1, dp2)
    4: [(4, 2), (2, 2)],      # (tp4, dp1), (tp2, dp2)
    8: [(2, 1)],              # (tp2, dp4), micro 1 -> accumulation 2
}


@pytest.fixture(scope="module")
def histories(tiny_dataset):
    prefix, model = tiny_dataset
    merged = {}
    for world, layouts in LAUNCHES.items():
        per_rank = run_distributed(_train_layouts, world, prefix, model, layouts)
        for layout in per_rank[0]:
            # every rank reports the same (dp-averaged) loss and the same global grad norm
            for r in per_rank[1:]:
                assert r[layout] == per_rank[0][layout], f"ranks disagree in layout {layout}"
            merged[layout] = per_rank[0][layout]
    return merged


def _layout_id(layout):
    tp, dp, micro = layout
    return f"tp{tp}-dp{dp}-accum{8 // (micro * dp)}"


@pytest.mark.parametrize("layout", [(1, 1, 8), (2, 1, 2), (4, 1, 2), (1, 2, 2), (2, 2, 2), (2, 4, 1)],
                         ids=_layout_id)
def test_layout_matches_single_process(histories, layout):
    reference = histories[(1, 1, 2)]
    got = histories[layout]
    assert len(got) == len(reference) == STEPS
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, reference), start=1):
        assert loss == pytest.approx(ref_loss, rel=RTOL), f"step {step} loss {loss} vs {ref_loss}"
        assert norm == pytest.approx(ref_norm, rel=RTOL), f"step {step} grad norm {norm} vs {ref_norm}"


def test_training_moves_the_loss(histories):
    losses = [loss for loss, _ in histories[(1, 1, 2)]]
    assert losses[-1] < losses[0] - 0.5, losses
