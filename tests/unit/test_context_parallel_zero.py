"""ZeRO over dp x cp and checkpoints across cp (issue 14 item 1), on one 4-process gloo launch.

Parameters are replicated over the context-parallel ranks, so ZeroEngine shards and reduces over the
dp_cp group. At tp1 cp2 dp2 that is all 4 ranks: stages 1-3 take 3 steps equal to torch AdamW on the
gradient averaged over the 4 ranks (test_zero.py's tiny model and dyadic gradients, fp32 rtol 1e-6)
with 1/4 of the optimizer state per rank. Checkpoints hold nothing that depends on cp: saved at cp2
(stage 2), loaded at cp1 dp4 (stage 0), saved again, loaded at cp2 (stage 0: one writer for the dp x
cp replicas), saved again -- the three checkpoints hold identical tensors, the first one equals the
reference AdamW state, and a step after either load equals the uninterrupted run's.
"""

from pathlib import Path

import pytest
import torch

from megazero.checkpoint.state import CheckpointSubject, load_checkpoint, save_checkpoint
from megazero.config import PrecisionConfig, RunConfig, ZeroConfig
from megazero.optim.loss_scaler import build_loss_scaler
from megazero.optim.train_state import TrainState
from megazero.random import RNGStreams
from megazero.topology import GridShape, Topology
from megazero.zero.engine import ZeroEngine
from tests.checkpoint_utils import checkpoint_tensors
from tests.dist_utils import run_distributed
from tests.unit.test_zero import OPT, TinyModel, dyadic_grads

CPU = torch.device("cpu")
WORLD = 4


def _engine(topo: Topology, stage: int, zero_params: bool = False):
    model = TinyModel()
    if zero_params:  # a load must overwrite every value
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    return model, ZeroEngine([model], topo, ZeroConfig(stage=stage, reduce_bucket_size=100), OPT, CPU)


def _step(model, zero, rank: int, step: int):
    zero.start_step(2)
    for micro in range(2):
        (model(dyadic_grads(model, rank, step, micro)) / 2).backward()
    zero.finish_grad_sync()
    return zero.step(OPT.lr, OPT.clip_grad, 1.0)


def _params(model, zero) -> dict[str, torch.Tensor]:
    zero.wait()
    if zero.stage3 is not None:  # materialise the sharded parameters to compare them
        for i in range(len(zero.layout.buckets)):
            zero.storage.gather(i)
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    zero.release_params()
    return out


def _subject(model, zero, topo, cfg, iteration):
    pr = PrecisionConfig()
    scaler = build_loss_scaler("fp32", None, pr.initial_loss_scale, pr.loss_scale_window, pr.hysteresis,
                               pr.min_loss_scale)
    state = TrainState(scaler=scaler, rng=RNGStreams(7, topo.tp_rank, topo.pp_rank, CPU), iteration=iteration)
    return CheckpointSubject(state=state, engine=zero, chunks=[model], topo=topo, cfg=cfg)


def cfg(cp: int, stage: int) -> RunConfig:
    return RunConfig().replace(parallel={"context_parallel_size": cp}, zero={"stage": stage})


def _run(rank, world, folder):
    cp2 = Topology.build(GridShape(world, cp=2), rank)  # tp1 cp2 dp2: dp_cp = the 4 ranks
    cp1 = Topology.build(GridShape(world), rank)  # tp1 cp1 dp4
    out = {"dp_cp": (cp2.dp_cp_rank, cp2.dp_rank, cp2.cp_rank)}
    for stage in (1, 3):  # the other sharded stages: 3 steps, compared with the reference
        model, zero = _engine(cp2, stage)
        for step in range(3):
            _step(model, zero, rank, step)
        out[f"stage{stage}"] = _params(model, zero)
    # stage 2 at cp2, saved after 3 steps, then continued (the uninterrupted run)
    model_a, zero_a = _engine(cp2, 2)
    for step in range(3):
        _step(model_a, zero_a, rank, step)
    out["stage2"], out["memory"] = _params(model_a, zero_a), zero_a.memory_bytes()
    out["buckets"] = len(zero_a.layout.buckets)
    path_a = save_checkpoint(_subject(model_a, zero_a, cp2, cfg(2, 2), 3), f"{folder}/a")["path"]
    _step(model_a, zero_a, rank, 3)
    out["uninterrupted"] = _params(model_a, zero_a)
    # cp2 -> cp1 (dp 4, stage 0), saved again
    model_b, zero_b = _engine(cp1, 0, zero_params=True)
    load_checkpoint(_subject(model_b, zero_b, cp1, cfg(1, 0), 0), path_a, log=lambda _: None)
    path_b = save_checkpoint(_subject(model_b, zero_b, cp1, cfg(1, 0), 3), f"{folder}/b")["path"]
    # cp1 -> cp2 (stage 0: only replica (dp, cp) = (0, 0) writes), saved again
    model_c, zero_c = _engine(cp2, 0, zero_params=True)
    load_checkpoint(_subject(model_c, zero_c, cp2, cfg(2, 0), 0), path_b, log=lambda _: None)
    path_c = save_checkpoint(_subject(model_c, zero_c, cp2, cfg(2, 0), 3), f"{folder}/c")["path"]
    for name, (model, zero) in (("resumed_cp1", (model_b, zero_b)), ("resumed_cp2", (model_c, zero_c))):
        _step(model, zero, rank, 3)
        out[name] = _params(model, zero)
    out["paths"] = (str(path_a), str(path_b), str(path_c))
    return out


def _reference(steps: int):
    """One process: the full model, the gradient averaged over the 4 ranks, torch AdamW + norm clipping."""
    model = TinyModel()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPT.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=OPT.lr, betas=(0.9, 0.95), eps=1e-8)
    snapshots = []
    for step in range(steps):
        opt.zero_grad()
        for rank in range(WORLD):
            for micro in range(2):
                (model(dyadic_grads(model, rank, step, micro)) / 2 / WORLD).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.clip_grad)
        opt.step()
        snapshots.append({"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                          "state": {n: {k: v.clone() for k, v in opt.state[p].items() if k != "step"}
                                    for n, p in model.named_parameters()}})
    return snapshots


@pytest.fixture(scope="module")
def cp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cp_checkpoints")
    return run_distributed(_run, WORLD, str(folder)), _reference(4)


def close(got: dict, ref: dict, what: str) -> None:
    for name, r in ref.items():
        torch.testing.assert_close(got[name], r, rtol=1e-6, atol=1e-7, msg=f"{what} {name}")


def test_zero_shards_and_reduces_over_dp_x_cp(cp_run):
    per_rank, ref = cp_run
    # tp1 cp2: rank = cp + 2 dp, and the dp_cp index follows the global rank
    assert [r["dp_cp"] for r in per_rank] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    for rank, got in enumerate(per_rank):
        for stage in (1, 2, 3):
            close(got[f"stage{stage}"], ref[2]["params"], f"rank {rank} stage {stage}")
    full = sum(p.numel() for p in TinyModel().parameters()) * 4 * 2  # exp_avg + exp_avg_sq, fp32
    owned = [got["memory"]["optimizer"] for got in per_rank]
    padding = 4 * 2 * (WORLD - 1) * per_rank[0]["buckets"]  # each bucket padded to a multiple of 4 elements
    assert sum(owned) == full and max(owned) <= full / WORLD + padding  # each element owned once, 1/4 per rank


def test_checkpoints_do_not_depend_on_cp(cp_run):
    per_rank, ref = cp_run
    paths = [Path(p) for p in per_rank[0]["paths"]]
    assert all(r["paths"] == per_rank[0]["paths"] for r in per_rank)
    a, b, c = (checkpoint_tensors(p) for p in paths)
    assert sorted(a) == sorted(b) == sorted(c)
    for name in a:
        assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name]), name
    # the cp2 save holds every element once: equal to the reference state after 3 steps (no holes)
    for name, state in ref[2]["state"].items():
        torch.testing.assert_close(a[f"model/{name}"], ref[2]["params"][name], rtol=1e-6, atol=1e-7)
        for kind, tensor in state.items():
            torch.testing.assert_close(a[f"{kind}/{name}"], tensor, rtol=1e-6, atol=1e-7, msg=f"{kind}/{name}")
    from megazero.checkpoint.format import read_index

    for path, stage0 in zip(paths, (False, True, True)):
        index = read_index(path)
        # RNG streams: one writer per (pp, tp) slice, the (dp, cp) = (0, 0) rank
        assert list(index["rng"]) == ["pp0.tp0"] and index["rng"]["pp0.tp0"]["file"] == "rank00000.safetensors"
        if stage0:  # every replica holds everything; replica 0 alone writes it, one piece per tensor
            assert set(index["files"]) == {"rank00000.safetensors"}
            assert all(len(t["pieces"]) == 1 for t in index["tensors"].values())
    assert read_index(paths[0])["layout"]["cp"] == 2 and read_index(paths[0])["layout"]["world"] == WORLD


def test_a_step_after_loading_at_another_cp_equals_the_uninterrupted_run(cp_run):
    per_rank, ref = cp_run
    for rank, got in enumerate(per_rank):
        close(got["uninterrupted"], ref[3]["params"], f"rank {rank} uninterrupted")
        for name in ("resumed_cp1", "resumed_cp2"):
            for p, value in got[name].items():
                assert torch.equal(value, got["uninterrupted"][p]), (rank, name, p)


def test_offline_plan_at_cp2_is_the_plan_of_the_same_shard_owners():
    """plan_layout (offline writers) shards over dp x cp like ZeroEngine; with tp-cp-dp-pp order a rank's
    dp_cp index at (cp 2, dp 2) is its dp index at (cp 1, dp 4), so the two plans are the same pieces."""
    from megazero.checkpoint.offline import plan_layout

    base = RunConfig().replace(model={"vocab_size": 256, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4},
                               parallel={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
                               zero={"stage": 1, "reduce_bucket_size": 2000})
    cp2 = plan_layout(base.replace(parallel={"context_parallel_size": 2}), 2)
    assert cp2 == plan_layout(base, 4)
    assert {p.rank for p in cp2} == set(range(16))  # stage 1: every rank of tp2 cp2 dp2 pp2 owns a shard
