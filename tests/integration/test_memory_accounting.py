"""Activation accounting on real gloo processes (megazero/training/memory_report.py): a pp 2 run of 8
microbatches under 1F1B, where the first stage holds min(pp, m) = 2 microbatches' saved tensors at
its peak and the last stage 1; --log-memory's per-rank lines and TensorBoard scalars; summary.json's
`memory` section (max over ranks and per_rank); the same layout with full recomputation of every layer
and its kept inputs offloaded to host memory; which steps the meter records (the first, and those
--log-memory logs); the start-up line naming the activation settings. One launch of 2 processes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from megazero.topology import GridShape, Topology
from megazero.training.data_setup import ResolvedData
from megazero.training.memory_report import STATE_PARTS
from megazero.training.trainer import Trainer
from megazero.validation import validate
from tests.dist_utils import run_distributed
from tests.integration.test_layout_parity import Layout, parity_config

PP, MICROBATCHES, STEPS = 2, 8, 2
LAYERS_PER_STAGE, HIDDEN_BYTES = 4, 1 * 32 * 64 * 4  # parity model: 8 layers; [b=1, s=32, h=64] fp32
FULL_OFFLOAD = (("recompute_granularity", "full"), ("recompute_method", "uniform"), ("recompute_num_layers", 1),
                ("cpu_offload_activations", True))


def _train_pp2(rank, world_size, prefix, tokenizer_model, run_dir):
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    cfg = parity_config(prefix, tokenizer_model, Layout(pp=PP, micro=1)).replace(
        training={"train_iters": STEPS, "log_interval": 1, "eval_interval": STEPS},
        logging={"log_memory": True, "output_dir": run_dir})
    validate(cfg, world_size)
    topo = Topology.build(GridShape(world_size, tp=1, pp=PP), rank)
    logs = []
    trainer = Trainer(cfg, topo, data, torch.device("cpu"), run_dir=Path(run_dir), log=logs.append)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.train()
    meter = trainer.activation_meter
    parts = trainer.zero.memory_bytes()
    result = {"peak": meter.peak_bytes, "live": meter.live_bytes, "labels": dict(trainer.memory.logged_labels),
              "model_state": sum(parts[k] for k in STATE_PARTS), "stdout": out.getvalue(), "log": logs,
              "recorded": {"log_memory": trainer.memory.recorded_iterations}}
    trainer.close()

    cfg = parity_config(prefix, tokenizer_model, Layout(pp=PP, micro=1, activation=FULL_OFFLOAD)).replace(
        training={"train_iters": 1})
    validate(cfg, world_size)
    logs = []
    trainer = Trainer(cfg, topo, data, torch.device("cpu"), run_dir=None, log=logs.append)
    trainer.train()
    meter = trainer.activation_meter
    result["full_offload"] = {"peak": meter.peak_bytes, "host_peak": meter.host_peak_bytes,
                              "labels": dict(meter.bytes_by_label), "log": logs}
    trainer.close()

    # which steps run with the meter: 5 steps logged every 2nd (2, 4 and the last, 5), with and without
    # --log-memory, and a run resumed at iteration 2 (its first step is 3)
    for name, logging, start in (("log_memory_interval2", {"log_memory": True}, 0), ("plain", {}, 0),
                                 ("resumed_at_2", {}, 2)):
        cfg = parity_config(prefix, tokenizer_model, Layout(pp=PP, micro=1)).replace(
            training={"train_iters": 5, "log_interval": 2, "eval_interval": 5, "eval_iters": 0}, logging=logging)
        validate(cfg, world_size)
        trainer = Trainer(cfg, topo, data, torch.device("cpu"), run_dir=None, log=lambda _: None)
        trainer.iteration = start
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        result["recorded"][name] = trainer.memory.recorded_iterations
        trainer.close()
    return result


@pytest.fixture(scope="module")
def pp2_run(tiny_dataset, tmp_path_factory):
    prefix, model = tiny_dataset
    run_dir = tmp_path_factory.mktemp("memory_accounting")
    return run_distributed(_train_pp2, PP, prefix, model, str(run_dir)), run_dir


def test_first_stage_peak_holds_its_in_flight_microbatches(pp2_run):
    (first, last), _ = pp2_run
    for stage, layers in ((first, {0, 1, 2, 3}), (last, {4, 5, 6, 7})):
        labels = stage["labels"]
        assert stage["live"] == 0  # every saved tensor released by the step's backward
        assert {k[1] for k in labels if isinstance(k[1], int)} == layers  # global layer numbers
        assert {k[0] for k in labels} == set(range(MICROBATCHES))  # no recomputation, nothing saved in backward
        per_mb = [sum(v for k, v in labels.items() if k[0] == mb) for mb in range(MICROBATCHES)]
        assert len(set(per_mb)) == 1 and per_mb[0] > 0  # same shapes, same bytes
        per_layer = {labels[(mb, layer)] for mb in range(MICROBATCHES) for layer in layers}
        assert len(per_layer) == 1  # identical blocks save identical bytes
    one = sum(v for k, v in first["labels"].items() if k[0] == 0)
    assert first["peak"] == min(PP, MICROBATCHES) * one  # 1F1B: stage 0 holds pp microbatches at its peak
    assert last["peak"] == sum(v for k, v in last["labels"].items() if k[0] == 0)  # the last stage holds 1


def test_summary_memory_section(pp2_run):
    ranks, run_dir = pp2_run
    memory = json.loads((run_dir / "summary.json").read_text())["memory"]
    per_rank = memory["per_rank"]
    assert [(r["rank"], r["pp"], r["dp"], r["tp"]) for r in per_rank] == [(0, 0, 0, 0), (1, 1, 0, 0)]
    for entry, mine in zip(per_rank, ranks):
        assert entry["activation_bytes"] == mine["peak"]  # every step has the same peak
        assert entry["model_state_bytes"] == mine["model_state"] and entry["activation_host_bytes"] == 0
        assert entry["peak_bytes"] > entry["activation_bytes"] + entry["model_state_bytes"]  # peak RSS: everything
    for key in ("activation_bytes", "activation_host_bytes", "model_state_bytes", "peak_bytes"):
        assert memory[key] == max(r[key] for r in per_rank)


def test_log_memory_lines_and_scalars(pp2_run):
    (first, last), run_dir = pp2_run
    assert first["stdout"] == ""  # the last rank writes
    out = last["stdout"]
    for it in range(1, STEPS + 1):
        assert f" per-rank accounting at iteration {it}:" in out
    for r in range(PP):
        assert f" rank {r} (pp {r}, dp 0, tp 0): params: " in out
    lines = [line for line in out.splitlines() if "activations saved for backward: peak " in line]
    assert len(lines) == PP * STEPS
    assert "microbatch 0 per layer: 0: " in lines[0] and "microbatch 0 per layer: 4: " in lines[1]
    layers, per_mb = lines[0].split("per layer: ")[1].split("; per microbatch: ")
    assert [item.split(":")[0] for item in layers.split(" | ")] == ["0", "1", "2", "3", "other"]
    assert per_mb.count(" KiB") == MICROBATCHES

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for r, stage in enumerate((first, last)):
        assert [(e.step, e.value) for e in acc.Scalars(f"memory/rank{r}/activation-peak-bytes")] == [
            (it, stage["peak"]) for it in range(1, STEPS + 1)]


def test_full_recomputation_with_offload(pp2_run):
    """Each layer's kept input (one [b, s, h]) lives in host memory, except on stage 1 the first layer's:
    the buffer received from stage 0, which the executor keeps for its gradient anyway, is kept as it is.
    Stage 0 holds 2 microbatches' worth at its peak, stage 1 one; the device holds only a recomputation's
    transients, the received inputs and the "other" parts, less than without recomputation; every layer
    is recomputed in backward."""
    (first, last), _ = pp2_run
    for stage, in_flight, offloaded, layers in ((first, 2, LAYERS_PER_STAGE, range(4)),
                                                (last, 1, LAYERS_PER_STAGE - 1, range(4, 8))):
        full = stage["full_offload"]
        assert full["host_peak"] == in_flight * offloaded * HIDDEN_BYTES
        assert 0 < full["peak"] < stage["peak"]
        assert {k[1] for k in full["labels"] if k[0] == "recompute" and k[1] != "other"} == set(layers)


def test_the_meter_records_the_first_step_and_the_logged_ones(pp2_run):
    """Its hooks cost time: only the steps whose numbers are reported run with it (summary.json's
    activation_bytes is the max over those; every step saves the same bytes)."""
    (first, last), _ = pp2_run
    for stage in (first, last):
        assert stage["recorded"] == {"log_memory": [1, 2], "log_memory_interval2": [1, 2, 4, 5], "plain": [1],
                                     "resumed_at_2": [3]}


def test_start_up_line_names_the_activation_settings(pp2_run):
    (first, _), _ = pp2_run
    model_line = [line for line in first["log"] if line.startswith("model: ")]
    assert len(model_line) == 1 and "; activations: no recomputation); " in model_line[0]
    model_line = [line for line in first["full_offload"]["log"] if line.startswith("model: ")]
    assert ("; activations: full recomputation (uniform, 1 layer per checkpoint, inputs offloaded to host)); "
            in model_line[0])
