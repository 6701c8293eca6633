"""ZeRO engine and mixed precision on real gloo processes.

- The ZeRO step (stages 0-3, dp 2 and 4) equals torch.optim.AdamW on the full parameters with the
  dp-averaged gradient (fp32, rtol 1e-6), including gradient clipping and weight-decay groups.
- Stage 1 optimizer-state bytes per rank are 1/dp of stage 0's (within bucket padding); stage 2 also
  shards gradients, stage 3 parameters.
- A forced non-finite gradient on one rank skips the step on every rank (fp16 and bf16), changes no
  parameter, halves the fp16 loss scale; consecutive skips stop the run naming the iteration.
- The dynamic loss scaler grows after its window and honours hysteresis (pure).
"""

import math

import pytest
import torch
from torch import nn

from megazero.config import OptimizerConfig, ZeroConfig
from megazero.optim.loss_scaler import DynamicLossScaler
from megazero.tensor_parallel.sharding import ZeroUnit
from megazero.topology import GridShape, Topology
from megazero.zero.engine import ZeroEngine
from megazero.zero.stage import ZeroStage
from tests.dist_utils import run_distributed

OPT = OptimizerConfig(lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=0.5)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 12)
        self.norm = nn.LayerNorm(12)

    def forward(self, acc, grads):
        """acc + sum(p * G_p): linear in the parameters, so d loss / d p = G_p exactly."""
        return acc + sum((p * grads[id(p)]).sum() for p in self.parameters())


class TinyModel(nn.Module):
    """Has blocks (its zero_units() declares them as stage-3 units) and non-block parameters, like a
    GPT chunk. Its forward takes the gradient each parameter should receive; running through module
    forwards keeps ZeRO-3's gather / release hooks in the loop."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 12)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(3)})
        self.out = nn.Linear(12, 3)

    def zero_units(self) -> list[ZeroUnit]:
        """The ZeRO-3 contract (as GPTModel.zero_units): the non-block parameters, then each block."""
        blocks = list(self.layers.values())
        in_block = {id(p) for blk in blocks for p in blk.parameters()}
        rest = [p for p in self.parameters() if id(p) not in in_block]
        return [ZeroUnit(rest)] + [ZeroUnit(list(blk.parameters()), blk) for blk in blocks]

    def forward(self, grads):
        ends = [self.inp.weight, self.inp.bias]
        acc = sum((p * grads[id(p)]).sum() for p in ends)
        for blk in self.layers.values():
            acc = blk(acc, grads)
        return acc + sum((p * grads[id(p)]).sum() for p in (self.out.weight, self.out.bias))


def dyadic_grads(model: nn.Module, rank: int, step: int, micro: int) -> dict[int, torch.Tensor]:
    """Per-parameter gradients with few mantissa bits: their sums over ranks and microbatches, and the
    division by dp, are exact in any order, so reduction order cannot blur the comparison."""
    g = torch.Generator().manual_seed(1000 * step + 100 * rank + micro)
    return {id(p): torch.randint(-64, 64, tuple(_shape[n]), generator=g).float() / 16.0
            for n, p in model.named_parameters()}


_shape = {n: p.shape for n, p in TinyModel().named_parameters()}


def _zero_vs_adamw(rank, world, stages, overlap=True):
    topo = Topology.build(GridShape(world), rank)
    results = {}
    for stage in stages:
        model = TinyModel()
        zero = ZeroEngine([model], topo, ZeroConfig(stage=stage, reduce_bucket_size=100, overlap_comm=overlap), OPT,
                          torch.device("cpu"))
        for step in range(3):  # three steps, two microbatches each
            zero.start_step(2)
            for micro in range(2):
                (model(dyadic_grads(model, rank, step, micro)) / 2).backward()
            zero.finish_grad_sync()
            result = zero.step(OPT.lr, OPT.clip_grad, 1.0)
        zero.storage.wait_gathers()
        if stage == 3:  # materialise the sharded parameters to compare them
            for i in range(len(zero.layout.buckets)):
                zero.storage.gather(i)
        results[stage] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                          "norm": result.grad_norm, "memory": zero.memory_bytes()}
        zero.release_params()
    return results


def _reference(world: int):
    """One process: full model, the dp-averaged gradient, torch AdamW + torch's norm clipping."""
    model = TinyModel()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPT.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=OPT.lr, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        opt.zero_grad()
        for rank in range(world):
            for micro in range(2):
                (model(dyadic_grads(model, rank, step, micro)) / 2 / world).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.clip_grad).item()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norm


@pytest.fixture(scope="module")
def zero_results():
    results = {world: run_distributed(_zero_vs_adamw, world, (0, 1, 2, 3)) for world in (2, 4)}
    # --no-overlap-comm: every bucket reduced after backward (stages 2-3 accumulate microbatches first)
    results["no-overlap"] = run_distributed(_zero_vs_adamw, 2, (0, 1, 2, 3), False)
    return results


@pytest.mark.parametrize("world", [2, 4, "no-overlap"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_step_equals_adamw_on_full_parameters(zero_results, world, stage):
    ref_params, ref_norm = _reference(2 if world == "no-overlap" else world)
    for rank, per_rank in enumerate(zero_results[world]):
        got = per_rank[stage]
        assert got["norm"] == pytest.approx(ref_norm, rel=1e-6)
        for name, ref in ref_params.items():
            torch.testing.assert_close(got["params"][name], ref, rtol=1e-6, atol=1e-7, msg=f"rank {rank} {name}")


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_state_bytes(zero_results, world):
    mem = {s: zero_results[world][0][s]["memory"] for s in (0, 1, 2, 3)}
    padding = 4 * 8 * world * len(TinyModel().state_dict())  # at most dp-1 padding elements per bucket, fp32 x3
    assert abs(mem[1]["optimizer"] - mem[0]["optimizer"] / world) <= padding
    assert mem[1]["grads"] == mem[0]["grads"]  # stage 1: full gradients
    assert abs(mem[2]["grads"] - mem[0]["grads"] / world) <= padding  # stage 2: sharded gradients
    assert mem[2]["params"] == mem[1]["params"] >= mem[0]["params"]  # stages 1-2: full parameters (+ padding)
    assert abs(mem[3]["params"] - mem[0]["params"] / world) <= padding  # stage 3: sharded parameters


# ----- skipped steps -------------------------------------------------------------------------------------

def _skip_run(rank, world, prefix, tokenizer_model, dtype, zero_stage, bad_iterations, max_skips):
    from tests.integration.test_layout_parity import L, parity_config
    from megazero.training.data_setup import ResolvedData
    from megazero.training.trainer import Trainer

    cfg = parity_config(prefix, tokenizer_model, L(zero=zero_stage)).replace(
        precision={"params_dtype": dtype, "hysteresis": 1, "max_consecutive_skipped_steps": max_skips},
        training={"train_iters": 6})
    topo = Topology.build(GridShape(world), rank)
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    trainer = Trainer(cfg, topo, data, torch.device("cpu"), run_dir=None, log=lambda _: None)
    batches = trainer._batches("train", 0)
    probe = next(p for n, p in trainer.chunks.named_parameters() if n.endswith("dense_4h_to_h.weight"))
    out = []
    for it in range(1, 7):
        handle = None
        if it in bad_iterations and rank == 1:  # only one rank sees the bad gradient
            handle = probe.register_hook(lambda g: g * float("inf"))
        before = {n: p.detach().float().clone() for n, p in trainer.chunks.named_parameters()}
        try:
            rec = trainer.train_step(batches)
        except FloatingPointError as e:
            out.append(("stopped", str(e)))
            break
        finally:
            if handle is not None:
                handle.remove()
        trainer.zero.storage.wait_gathers()
        unchanged = all(torch.equal(before[n], p.detach().float()) for n, p in trainer.chunks.named_parameters())
        out.append((rec.skipped, rec.loss_scale, unchanged))
    return out


@pytest.mark.parametrize("dtype,zero_stage", [("fp16", 1), ("bf16", 2), ("fp16", 0)])
def test_non_finite_gradient_skips_the_step_on_every_rank(tiny_dataset, dtype, zero_stage):
    prefix, model = tiny_dataset
    per_rank = run_distributed(_skip_run, 2, prefix, model, dtype, zero_stage, (3,), 5)
    for steps in per_rank:
        assert [s[0] for s in steps] == [False, False, True, False, False, False]
        assert steps[2][2], "a skipped step must not change any parameter"
        assert not steps[3][2], "the next good step updates again"
        if dtype == "fp16":
            assert steps[3][1] == steps[2][1] / 2, "hysteresis 1: one overflow halves the scale"
        else:
            assert {s[1] for s in steps} == {1.0}


def test_consecutive_skips_stop_the_run_naming_the_iteration(tiny_dataset):
    prefix, model = tiny_dataset
    per_rank = run_distributed(_skip_run, 2, prefix, model, "bf16", 0, (2, 3, 4), 3)
    for steps in per_rank:
        assert steps[-1][0] == "stopped"
        assert "3 consecutive steps had non-finite gradients (last at iteration 4)" in steps[-1][1]


# ----- the scaler alone ------------------------------------------------------------------------------------

def test_dynamic_scaler_growth_and_hysteresis():
    s = DynamicLossScaler(initial_scale=1024.0, window=3, hysteresis=2, min_scale=256.0)
    s.update(True)
    assert s.scale == 1024.0  # first overflow absorbed by hysteresis
    s.update(True)
    assert s.scale == 512.0  # second halves
    s.update(True)
    assert s.scale == 256.0  # hysteresis budget is not restored by overflows
    s.update(True)
    assert s.scale == 256.0  # never below min_scale
    for _ in range(3):
        s.update(False)
    assert s.scale == 512.0  # grows after `window` good steps, hysteresis restored
    s.update(True)
    assert s.scale == 512.0
    state = s.state_dict()
    t = DynamicLossScaler()
    t.load_state_dict(state)
    assert t.state_dict() == state
    assert math.isclose(DynamicLossScaler(initial_scale=8.0, window=1).scale, 8.0)


def test_zero_stage_policy():
    """What each stage shards, and the facts the zero/ modules read instead of stage numbers."""
    facts = [(s.shards_optimizer_state, s.shards_gradients, s.shards_parameters, s.full_grad_buffer,
              s.flat_param_buffer, s.owns_whole_buffer, s.gather_units) for s in map(ZeroStage.of, range(4))]
    assert facts == [(False, False, False, True, False, True, False),
                     (True, False, False, True, True, False, False),
                     (True, True, False, False, True, False, False),
                     (True, True, True, False, False, False, True)]


def test_gpt_declares_its_zero_units_and_the_shared_embedding():
    """The model/ZeRO contract: a pipelined chunk's word embedding is its own unit (ShardSpec.own_bucket;
    tied_copy on the last stage), then the rest of the chunk, then one unit per block; unpipelined, the
    embedding is part of the rest."""
    from megazero.checkpoint.api import build_gpt, single_process_group
    from megazero.config import ModelConfig
    from megazero.tensor_parallel.sharding import get_shard_spec

    cfg = ModelConfig(num_layers=4, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=50)
    with single_process_group() as group:
        first = build_gpt(cfg, group, layer_range=range(0, 2), pre_process=True, post_process=False, device="meta")
        last = build_gpt(cfg, group, layer_range=range(2, 4), pre_process=False, post_process=True, device="meta")
        whole = build_gpt(cfg, group, device="meta")
    for chunk, tied_copy in ((first, False), (last, True)):
        units = chunk.zero_units()
        emb = chunk.word_embeddings.weight
        assert units[0].params == [emb] and units[0].module is None
        assert get_shard_spec(emb).own_bucket and get_shard_spec(emb).tied_copy == tied_copy
        assert [u.module for u in units[2:]] == list(chunk.layers.values())
        assert sorted(map(id, (p for u in units for p in u.params))) == sorted(map(id, chunk.parameters()))
    units = whole.zero_units()
    assert not get_shard_spec(whole.word_embeddings.weight).own_bucket and len(units) == 1 + 4
    assert any(p is whole.word_embeddings.weight for p in units[0].params)
