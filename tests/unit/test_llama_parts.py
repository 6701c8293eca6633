"""Each Llama-family part against a straightforward reference, forward and backward (one process):
rope (and Llama 3.1 scaling, with transformers' own inverse frequencies as the oracle), grouped-query
attention against explicitly repeated key/value heads, the three attention backends against each
other (on CPU `fused` goes through megazero.ops' dispatch to the reference: recorded), SwiGLU's
interleaved gate/up rows, RMSNorm, and the config checks for the parts."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from megazero import ops
from megazero.config import ModelConfig
from megazero.errors import ConfigError
from megazero.model.attention import core_attention
from megazero.model.parts import check_parts
from megazero.model.rope import RotaryEmbedding, apply_rotary, rope_inverse_frequencies

GEN = torch.Generator().manual_seed(0)


def _rand(*shape, requires_grad=True):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64).float().requires_grad_(requires_grad)


def _rope_reference(x: torch.Tensor, inv_freq: torch.Tensor, rotated: int) -> torch.Tensor:
    """Rope as complex rotation of pairs (i, i + r/2) in float64: x [b, h, s, d]."""
    s = x.shape[-2]
    angle = torch.outer(torch.arange(s, dtype=torch.float64), inv_freq.double())  # [s, r/2]
    xd = x.double()
    a, b = xd[..., :rotated // 2], xd[..., rotated // 2:rotated]
    z = torch.complex(a, b) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag, xd[..., rotated:]], dim=-1)


@pytest.mark.parametrize("percent", [1.0, 0.5])
def test_rope_is_a_rotation_of_pairs(percent):
    cfg = ModelConfig(hidden_size=64, num_attention_heads=4, position_embedding_type="rope", rotary_percent=percent)
    rope = RotaryEmbedding(cfg)
    x = _rand(2, 4, 10, 16)
    y = rope(x)
    torch.testing.assert_close(y.double(), _rope_reference(x, rope.inv_freq, rope.rotated), rtol=1e-5, atol=1e-5)
    # a rotation keeps each pair's norm, so the gradient of sum(y^2) is 2x
    (y.square().sum()).backward()
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=1e-5, atol=1e-5)
    # relative positions: <rope(q)_m, rope(k)_n> depends on m - n only
    q, k = _rand(1, 1, 1, 16, requires_grad=False), _rand(1, 1, 1, 16, requires_grad=False)
    qs, ks = rope(q.expand(1, 1, 10, 16)), rope(k.expand(1, 1, 10, 16))
    dots = (qs[0, 0] @ ks[0, 0].T)
    torch.testing.assert_close(torch.diagonal(dots, -3), torch.full((7,), dots[3, 0].item()), rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = rope_inverse_frequencies(ModelConfig(
        hidden_size=256, num_attention_heads=4, position_embedding_type="rope", rotary_base=500000.0,
        use_rope_scaling=True, rope_scaling_factor=32.0, rope_original_max_positions=8192))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    unscaled = rope_inverse_frequencies(ModelConfig(hidden_size=256, num_attention_heads=4,
                                                    position_embedding_type="rope", rotary_base=500000.0))
    assert torch.equal(ours[:4], unscaled[:4]) and (ours[-4:] < unscaled[-4:]).all()  # only low freqs scaled


def test_apply_rotary_computes_in_fp32_and_returns_the_input_dtype():
    x = _rand(1, 2, 8, 8, requires_grad=False).bfloat16()
    rope = RotaryEmbedding(ModelConfig(hidden_size=16, num_attention_heads=2, position_embedding_type="rope"))
    cos, sin = rope.tables(8, x.device)
    y = apply_rotary(x, cos, sin, 8)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, apply_rotary(x.float(), cos, sin, 8).bfloat16())


def _attention_reference(q, k, v):
    """Causal softmax attention in float64 with key/value head j // (nq / nkv) for query head j."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = q.shape[-2]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("backend", ["sdpa", "fused", "unfused", "auto"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_backends_match_the_reference(backend, kv_heads):
    ops.reset_dispatch_log()
    q, k, v = _rand(2, 4, 12, 8), _rand(2, kv_heads, 12, 8), _rand(2, kv_heads, 12, 8)
    out = core_attention(q, k, v, backend=backend, dropout_p=0.0)
    ref = _attention_reference(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    grad = _rand(*out.shape, requires_grad=False)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(_attention_reference(rq, rk, rv), (rq, rk, rv), grad.double())
    for got, exp in zip((dq, dk, dv), want):  # GQA: the shared k/v heads collect all their queries' grads
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5)
    if backend == "fused":  # CPU: the dispatch takes the reference path and records why
        assert "reference" in ops.dispatch_paths()["scaled_causal_softmax"]


def test_swiglu_interleaved_rows_and_rmsnorm_match_references():
    from megazero.checkpoint.api import single_process_group
    from megazero.model.gpt import MLP
    from megazero.tensor_parallel.init import initialize_parameters, normal_init

    cfg = ModelConfig(hidden_size=16, num_attention_heads=2, swiglu=True, add_bias_linear=False, ffn_hidden_size=24)
    with single_process_group() as group:
        mlp = MLP(cfg, group, normal_init(0.02), torch.float32, None)
        initialize_parameters(mlp, seed=3)
        x = _rand(2, 5, 16)
        w1 = mlp.dense_h_to_4h.weight.detach()
        gate, up, down = w1[0::2], w1[1::2], mlp.dense_4h_to_h.weight.detach()  # rows 2i / 2i + 1
        torch.testing.assert_close(mlp(x), (F.silu(x @ gate.T) * (x @ up.T)) @ down.T, rtol=1e-5, atol=1e-6)
    w = _rand(16)
    y = ops.rms_norm(x, w, 1e-6, use_fused=False)
    ref = x.double() / torch.sqrt(x.double().square().mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields,message", [
    ({"normalization": "rmsnorm"}, "--normalization must be one of LayerNorm, RMSNorm, got 'rmsnorm'"),
    ({"group_query_attention": True, "num_query_groups": 3}, "--num-attention-heads 4 is not divisible by "
                                                             "--num-query-groups 3"),
    ({"num_query_groups": 2}, "--num-query-groups 2 is used only with --group-query-attention"),
    ({"position_embedding_type": "rope", "rotary_percent": 0.05}, "rotates 3 dims; rope needs an even number"),
    ({"use_rope_scaling": True}, "--use-rope-scaling applies to --position-embedding-type rope"),
])
def test_part_checks_are_one_line(fields, message):
    with pytest.raises(ConfigError, match=message):
        check_parts(ModelConfig(hidden_size=256, num_attention_heads=4, **fields))


@pytest.mark.parametrize("theirs,mine,message", [
    ({"untie_embeddings_and_output_weights": True}, {},
     "checkpoint has untie-embeddings-and-output-weights True, this run has False; add "
     "--untie-embeddings-and-output-weights (the block's parts must match"),
    ({"normalization": "RMSNorm"}, {}, "checkpoint has normalization RMSNorm, this run has LayerNorm; "
                                       "--normalization RMSNorm"),
    ({"position_embedding_type": "rope", "rotary_base": 500000.0}, {"position_embedding_type": "rope"},
     "checkpoint has rotary-base 500000.0, this run has 10000.0; --rotary-base 500000.0"),
    ({"group_query_attention": True, "num_query_groups": 2}, {},
     "checkpoint has query-groups 2, this run has 4; --group-query-attention --num-query-groups 2"),
    ({"swiglu": True, "ffn_hidden_size": 128}, {"ffn_hidden_size": 128}, "checkpoint has swiglu True, this run "
                                                                         "has False; add --swiglu"),
    ({"add_bias_linear": False}, {}, "checkpoint has add-bias-linear False, this run has True; add "
                                     "--disable-bias-linear"),
])
def test_loading_a_checkpoint_of_other_block_parts_is_refused(tmp_path, theirs, mine, message):
    """Start-up and load compare the parts, not only the shape: an untied checkpoint loaded into a tied
    run would otherwise drop its output layer silently."""
    import dataclasses

    from megazero.checkpoint.format import CheckpointError
    from megazero.checkpoint.state import check_model_shape
    from megazero.config import RunConfig

    shape = dict(hidden_size=64, num_attention_heads=4, vocab_size=300)
    index = {"config": {"model": dataclasses.asdict(ModelConfig(**shape, **theirs))}}
    with pytest.raises(CheckpointError, match=re.escape(message)):
        check_model_shape(index, RunConfig(model=ModelConfig(**shape, **mine)), tmp_path / "index.json")
    check_model_shape(index, RunConfig(model=ModelConfig(**shape, **theirs)), tmp_path / "index.json")  # same: fine


def test_megatron_attention_backend_names_map_onto_ours():
    from megazero.cli import parse_args

    assert [parse_args(["--attention-backend", name]).model.attention_backend
            for name in ("flash", "local", "fused", "unfused", "sdpa", "auto")] == \
        ["sdpa", "unfused", "fused", "unfused", "sdpa", "auto"]
