"""The activation-memory model (megazero/activation/memory_model.py) against SavedTensorMeter.

- per layer, one process: the bytes the meter attributes to each block of a GPTModel forward equal
  memory_model.layer_bytes, for GPT-2 / Llama parts, dropout on / off, fp32 / bf16, every attention
  backend, GQA, q/k norms, partial rope, selective recomputation; and the step peak equals rank_memory's
  (full recomputation and offload included: their backward transients are part of the peak).
- on gloo (one 4-process launch, several layouts in turn): every rank's step peak equals the model's
  for tp 4 + SP + selective with GQA groups shared by tp ranks, tp 2 + SP with pp 2 vp 2, and full
  recomputation with partitioned / offloaded inputs under pp 2.
- the paper's formulas and the plan's in-flight counts (pure); under SP the column-parallel inputs are
  the shard, and the paper's accounting gives its 34sbh/t plus what the paper omits.

Exact equality: the model enumerates what torch (2.13) saves op by op; a change in the block or in torch
that saves something else shows here, and layer_breakdown says which segment to look at.
"""

import pytest
import torch

from megazero.activation import memory_model as mm
from megazero.activation.saved_tensors import SavedTensorMeter
from megazero.config import ActivationConfig, ModelConfig
from tests.dist_utils import run_distributed

TINY = dict(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100)
LLAMA = dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True, group_query_attention=True,
             num_query_groups=2, add_bias_linear=False, untie_embeddings_and_output_weights=True)
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)
SEL, FULL = dict(recompute_granularity="selective"), dict(recompute_granularity="full")

CASES = {
    "gpt2": ({}, {}, "fp32"),
    "gpt2 no dropout bf16": (NO_DROPOUT, {}, "bf16"),
    "gpt2 unfused bf16": (dict(attention_backend="unfused"), {}, "bf16"),
    "gpt2 fused no dropout": (dict(attention_backend="fused", **NO_DROPOUT), {}, "fp32"),
    "gpt2 gqa": (dict(group_query_attention=True, num_query_groups=2), {}, "fp32"),
    "gpt2 selective": ({}, SEL, "fp32"),
    "gpt2 unfused bf16 selective": (dict(attention_backend="unfused"), SEL, "bf16"),
    "llama": ({**LLAMA, **NO_DROPOUT}, {}, "fp32"),
    "llama bf16 dropout qk-norm partial rope": ({**LLAMA, "qk_layernorm": True, "rotary_percent": 0.5}, {}, "bf16"),
    "llama layernorm qk-norm": ({**LLAMA, "normalization": "LayerNorm", "qk_layernorm": True}, {}, "fp32"),
    "llama selective": ({**LLAMA, **NO_DROPOUT}, SEL, "bf16"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _configs(model: dict, act: dict, dtype: str, micro: int = 2):
    return ModelConfig(**{**TINY, **model}), ActivationConfig(**act), mm.Layout(micro_batch_size=micro, dtype=dtype)


def _one_step(tp_group, m: ModelConfig, act: ActivationConfig, dtype: str, micro: int = 2):
    """A GPTModel forward + backward of one microbatch under the meter, blocks labelled."""
    from megazero.model import GPTModel
    from megazero.random import RNGStreams
    from megazero.tensor_parallel.init import initialize_parameters

    model = GPTModel(m, tp_group=tp_group, rng=RNGStreams(3, 0, 0, torch.device("cpu")), dtype=DTYPES[dtype],
                     activation=act)
    initialize_parameters(model, seed=3)
    model.train()
    meter = SavedTensorMeter()
    meter.label_layers({i: model.layers[str(i)] for i in range(m.num_layers)})
    tokens = torch.randint(0, m.vocab_size, (micro, m.seq_length), generator=torch.Generator().manual_seed(1))
    with meter.recording(), meter.scope((0, "other")):
        model(tokens, tokens).mean().backward()
    return meter


@pytest.mark.parametrize("case", list(CASES))
def test_layer_and_step_peak_match_the_meter(tp_group, case):
    m, act, lay = _configs(*CASES[case])
    meter = _one_step(tp_group, m, act, lay.dtype)
    breakdown = mm.layer_breakdown(m, act, lay)
    for i in range(m.num_layers):
        assert meter.bytes_by_label[(0, i)] == mm.layer_bytes(m, act, lay), (case, i, breakdown)
    assert meter.peak_bytes == mm.rank_memory(m, act, lay, 0).peak_bytes, (case, breakdown)


@pytest.mark.parametrize("act", [FULL, dict(FULL, recompute_method="block", recompute_num_layers=2),
                                 dict(FULL, recompute_num_layers=2, cpu_offload_activations=True)])
def test_full_recomputation_peak_matches_the_meter(tp_group, act):
    m, act, lay = _configs({**LLAMA, "hidden_dropout": 0.1, "attention_dropout": 0.1}, act, "fp32")
    meter = _one_step(tp_group, m, act, lay.dtype)
    model = mm.rank_memory(m, act, lay, 0)
    assert (meter.peak_bytes, meter.host_peak_bytes) == (model.peak_bytes, model.host_peak_bytes)


def test_received_chunk_input_is_kept_as_it_is(tp_group):
    """Full recomputation with offloaded inputs on a chunk fed by the previous stage (pre_process False):
    the first span keeps the received buffer itself (the executor holds it for its .grad anyway), only
    the later spans' inputs go to host memory; the model (pp 2, rank 1) says the same."""
    from megazero.model import GPTModel
    from megazero.random import RNGStreams
    from megazero.tensor_parallel.init import initialize_parameters

    m = ModelConfig(**{**TINY, "num_layers": 6})
    act = ActivationConfig(cpu_offload_activations=True, **FULL)
    lay = mm.Layout(pp=2, micro_batch_size=2)
    chunk = GPTModel(m, tp_group=tp_group, rng=RNGStreams(3, 0, 1, torch.device("cpu")), layer_range=range(3, 6),
                     pre_process=False, post_process=True, activation=act)
    initialize_parameters(chunk, seed=3)
    chunk.train()
    g = torch.Generator().manual_seed(1)
    received = torch.randn(2, m.seq_length, m.hidden_size, generator=g).requires_grad_(True)
    labels = torch.randint(0, m.vocab_size, (2, m.seq_length), generator=g)
    meter = SavedTensorMeter()
    with meter.recording():
        loss = chunk(received, labels).mean()
        x_bytes = received.untyped_storage().nbytes()
        assert meter.host_live_bytes == 2 * x_bytes  # spans 4 and 5; span 3 keeps `received` on device
        loss.backward()
    model = mm.rank_memory(m, act, lay, 1)
    assert (meter.peak_bytes, meter.host_peak_bytes) == (model.peak_bytes, model.host_peak_bytes)
    assert received.grad is not None


def _measure_rows(rank, world, rows):
    from bench.activation_memory import measure

    return [measure(rank, world, row) for row in rows]


def test_gloo_layouts_every_rank_matches():
    from bench.activation_memory import L, Row

    small = dict(TINY, num_layers=4)
    rows = [
        Row("llama tp4 SP selective", model="llama", act={"sequence_parallel": True, **SEL},
            lay=L(tp=4), model_overrides={**small, "num_query_groups": 2, "hidden_dropout": 0.1,
                                          "attention_dropout": 0.1}),
        Row("llama tp4 > 2 groups (one head per rank) dropout", model="llama", lay=L(tp=4),
            model_overrides={**small, "num_query_groups": 2, "hidden_dropout": 0.1, "attention_dropout": 0.1}),
        Row("gpt2 tp4 unfused bf16", lay=L(tp=4, dtype="bf16"), model_overrides={**small, "attention_backend": "unfused"}),
        Row("gpt2 tp2 SP pp2 vp2", act={"sequence_parallel": True}, lay=L(tp=2, pp=2, vp=2, num_microbatches=4),
            model_overrides=small),
        Row("gpt2 tp2 full distributed pp2", act={**FULL, "distribute_saved_activations": True},
            lay=L(tp=2, pp=2, num_microbatches=3), model_overrides=small),
        Row("llama tp2 SP full offload pp2", model="llama",
            act={"sequence_parallel": True, **FULL, "cpu_offload_activations": True},
            lay=L(tp=2, pp=2, num_microbatches=2), model_overrides=small),
    ]
    per_rank = run_distributed(_measure_rows, 4, rows)  # [rank][row]
    for row, ranks in zip(rows, zip(*per_rank)):
        m, act, lay = row.configs()
        for r in ranks:
            model = mm.rank_memory(m, act, lay, r["pp_rank"])
            assert (r["peak"], r["host"]) == (model.peak_bytes, model.host_peak_bytes), row.name


def test_in_flight_follows_the_plan_and_the_paper():
    m, act, _ = _configs({}, {}, "fp32")
    m = ModelConfig(**{**TINY, "num_layers": 8})
    one_f_one_b = [mm.rank_memory(m, act, mm.Layout(pp=4, num_microbatches=8), r).peak_in_flight for r in range(4)]
    assert one_f_one_b == [4, 3, 2, 1]  # 1F1B: rank r holds p - r microbatches
    interleaved = mm.rank_memory(m, act, mm.Layout(pp=4, vp=2, num_microbatches=8), 0).peak_in_flight
    assert interleaved == 2 * (4 - 1) + (2 - 1) * 4 + 1  # warm-up forwards + 1 (Megatron's schedule)
    assert mm.paper_in_flight_layers(8, 4, 1, 8) == 8  # p microbatches of L/p layers
    assert mm.paper_in_flight_layers(8, 4, 2, 8) == 8 * (1 + 3 / 8)


def test_paper_formulas():
    m = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=100)
    sbh, a_s_h = 32 * 64, 5 * 4 * 32 / 64
    assert mm.paper_layer_bytes(m, ActivationConfig(), 1, 1) == sbh * (34 + a_s_h)
    assert mm.paper_layer_bytes(m, ActivationConfig(), 4, 1) == sbh * (10 + 24 / 4 + a_s_h / 4)
    assert mm.paper_layer_bytes(m, ActivationConfig(sequence_parallel=True), 4, 1) == sbh / 4 * (34 + a_s_h)
    sel_sp = ActivationConfig(sequence_parallel=True, recompute_granularity="selective")
    assert mm.paper_layer_bytes(m, sel_sp, 4, 1) == 34 * sbh / 4
    assert mm.paper_layer_bytes(m, ActivationConfig(recompute_granularity="full"), 1, 1) == 2 * sbh


def test_sequence_parallel_column_inputs_are_the_shard():
    """Under SP the QKV, fc1 and output-layer matmuls keep their [b, s/tp, h] input shard, not the
    gathered [b, s, h] (linear_with_sequence_parallel; the gloo test above checks it against the meter);
    with the paper's accounting (bf16, CUDA: bool masks, flash attention, selective recomputation) the
    layer is its 34sbh/t plus what the paper leaves out (fp32 norm statistics, flash's log-sum-exp) less
    the GELU output fc2 keeps in the paper (8sbh/t bytes at 16 bits), re-made in backward here."""
    b, tp = 2, 4
    for model in ({}, LLAMA):
        m = ModelConfig(**{**TINY, **model})
        act, lay = ActivationConfig(sequence_parallel=True), mm.Layout(tp=tp, micro_batch_size=b)
        shard = b * m.seq_length // tp * m.hidden_size * 4
        breakdown = dict(mm.layer_breakdown(m, act, lay))
        swiglu_weight = 2 * m.ffn_size // tp * m.hidden_size * 4 if m.swiglu else 0
        assert (breakdown["qkv"], breakdown["fc1"]) == (shard, shard + swiglu_weight), breakdown
        head = dict((seg.name, seg.saves) for seg in mm.chunk_segments(m, act, lay, range(0), False, True))
        assert head["output_layer"] == [(("head", "lnf.out"), shard, False)]
    m = ModelConfig(**TINY)
    act = ActivationConfig(sequence_parallel=True, recompute_granularity="selective")
    lay = mm.Layout(tp=tp, micro_batch_size=b, dtype="bf16", device_type="cuda")
    rows = b * m.seq_length // tp
    norm_stats, lse = 2 * 2 * rows * 4, b * m.num_attention_heads // tp * m.seq_length * 4
    gelu_out = rows * m.ffn_size * 2  # [b, s, 4h/tp] in bf16 = 8sbh/t bytes
    assert mm.layer_bytes(m, act, lay) == mm.paper_layer_bytes(m, act, tp, b) - gelu_out + norm_stats + lse


def test_full_recomputation_keeps_the_block_input_only():
    m, act, lay = _configs({}, FULL, "bf16")
    assert mm.layer_bytes(m, act, lay) == 2 * m.seq_length * m.hidden_size * 2  # b = 2, 2 bytes: 2sbh
    sp = mm.Layout(tp=4, micro_batch_size=2, dtype="bf16")
    assert mm.layer_bytes(m, ActivationConfig(sequence_parallel=True, recompute_granularity="full"), sp) * 4 == \
        mm.layer_bytes(m, act, lay)
