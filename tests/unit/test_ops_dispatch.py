"""megazero.ops: the reference ops are torch's math (forward and backward), the dispatch falls back to
the reference (and says so once) wherever the fused CUDA kernels cannot serve a call, and routing the
GPT's LayerNorms through the dispatch changed nothing: same parameter names, checkpoint keys, and a
bitwise-identical forward/backward. Runs everywhere (CPU)."""

import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megazero import ops
from megazero.ops import reference

TOL = {"rtol": 1e-6, "atol": 1e-6}


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    gen = torch.Generator().manual_seed(11)
    out.backward(torch.randn(out.shape, generator=gen, dtype=out.dtype))
    return out.detach(), [t.grad for t in tensors]


@pytest.fixture(autouse=True)
def _fresh_log():
    ops.reset_dispatch_log()
    yield
    ops.reset_dispatch_log()


# ------------------------------------------------------------------------------ reference = torch
@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 33), (1, 5, 64)])
def test_reference_layer_norm_is_torch(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(shape[-1], generator=gen)
    b = torch.randn(shape[-1], generator=gen)
    y_ref, g_ref = _grads(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), x, w, b)
    y_t, g_t = _grads(lambda x, w, b: F.layer_norm(x, (shape[-1],), w, b, 1e-5), x, w, b)
    torch.testing.assert_close(y_ref, y_t, rtol=0, atol=0)
    for a, e in zip(g_ref, g_t):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 33)])
def test_reference_rms_norm_is_torch(shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(shape[-1], generator=gen)
    y_ref, g_ref = _grads(lambda x, w: reference.rms_norm(x, w, 1e-6), x, w)
    y_t, g_t = _grads(lambda x, w: F.rms_norm(x, (shape[-1],), w, 1e-6), x, w)
    torch.testing.assert_close(y_ref, y_t, **TOL)
    for a, e in zip(g_ref, g_t):
        torch.testing.assert_close(a, e, **TOL)
    # explicit formula in fp64
    xd = x.double()
    expect = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(y_ref.double(), expect, **TOL)


@pytest.mark.parametrize("mask_heads", [1, 3])
def test_reference_masked_softmax_is_torch(mask_heads):
    gen = torch.Generator().manual_seed(2)
    b, h, sq, sk, scale = 2, 3, 5, 9, 0.37
    x = torch.randn(b, h, sq, sk, generator=gen)
    mask = torch.rand(b, mask_heads, sq, sk, generator=gen) < 0.3
    mask[0, :, 1] = True  # one fully masked row: uniform, not NaN
    y, (gx,) = _grads(lambda x: reference.scaled_masked_softmax(x, mask, scale), x)

    def torch_spec(x):  # Megatron: scale, fill masked with -10000, softmax
        return torch.softmax((x * scale).masked_fill(mask, -10000.0), dim=-1)

    y_t, (gx_t,) = _grads(torch_spec, x)
    torch.testing.assert_close(y, y_t, **TOL)
    torch.testing.assert_close(gx, gx_t, **TOL)
    torch.testing.assert_close(y[0, :, 1], torch.full((h, sk), 1.0 / sk), **TOL)
    assert torch.all(gx.expand(b, h, sq, sk)[mask.expand(b, h, sq, sk)] == 0)  # gradient of masked_fill
    # no mask: plain scaled softmax
    torch.testing.assert_close(reference.scaled_masked_softmax(x, None, scale), torch.softmax(x * scale, -1), **TOL)


def test_reference_causal_softmax_is_torch():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 7, 7, generator=gen)
    scale = 0.5
    y, (gx,) = _grads(lambda x: reference.scaled_causal_softmax(x, scale), x)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    y_t, (gx_t,) = _grads(lambda x: torch.softmax((x * scale).masked_fill(causal, float("-inf")), -1), x)
    torch.testing.assert_close(y, y_t, **TOL)
    torch.testing.assert_close(gx, gx_t, **TOL)
    assert torch.all(y[:, causal] == 0) and torch.all(gx[:, causal] == 0)
    # SDPA's is_causal uses the same (top-left) alignment, also for sq != sk
    q = torch.randn(2, 3, 4, 8, generator=gen)
    k = torch.randn(2, 3, 6, 8, generator=gen)
    v = torch.randn(2, 3, 6, 8, generator=gen)
    s = 8 ** -0.5
    out = reference.scaled_causal_softmax(q @ k.transpose(-1, -2), s) @ v
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


def test_reference_half_precision_rounds_once():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 4, 10, generator=gen).to(torch.bfloat16)
    y = reference.scaled_masked_softmax(x, None, 1.0)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, torch.softmax(x.float(), -1).to(torch.bfloat16))
    w = torch.randn(10, generator=gen).to(torch.bfloat16)
    assert reference.rms_norm(x, w, 1e-5).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------ dispatch
def _all_ops(use_fused):
    gen = torch.Generator().manual_seed(5)
    x4 = torch.randn(2, 2, 3, 5, generator=gen)
    mask = torch.rand(2, 1, 3, 5, generator=gen) < 0.5
    xn = torch.randn(3, 16, generator=gen)
    w = torch.randn(16, generator=gen)
    b = torch.randn(16, generator=gen)
    pairs = [
        (ops.scaled_masked_softmax(x4, mask, 0.3, use_fused=use_fused), reference.scaled_masked_softmax(x4, mask, 0.3)),
        (ops.scaled_causal_softmax(x4, 0.3, use_fused=use_fused), reference.scaled_causal_softmax(x4, 0.3)),
        (ops.layer_norm(xn, w, b, 1e-5, use_fused=use_fused), reference.layer_norm(xn, w, b, 1e-5)),
        (ops.rms_norm(xn, w, 1e-5, use_fused=use_fused), reference.rms_norm(xn, w, 1e-5)),
    ]
    for got, expect in pairs:
        assert torch.equal(got, expect)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_dispatch_falls_back_on_cpu_and_logs_once(caplog):
    seen = []
    ops.set_dispatch_callback(lambda op, path, reason: seen.append((op, path, reason)))
    try:
        with caplog.at_level(logging.INFO, logger="megazero.ops"):
            for _ in range(3):
                _all_ops(use_fused=True)
    finally:
        ops.set_dispatch_callback(None)
    names = ["scaled_masked_softmax", "scaled_causal_softmax", "layer_norm", "rms_norm"]
    paths = ops.dispatch_paths()
    assert set(paths) == set(names)
    for name in names:
        assert list(paths[name]) == ["reference"] and "cpu" in paths[name]["reference"]
        msgs = [r.getMessage() for r in caplog.records if f" {name} " in r.getMessage()]
        assert len(msgs) == 1 and "reference" in msgs[0], msgs  # once, not once per call
    assert sorted(op for op, _, _ in seen) == sorted(names)


def test_dispatch_disabled_reason():
    _all_ops(use_fused=False)
    assert all(p == {"reference": "fused kernels disabled"} for p in ops.dispatch_paths().values())


def test_dispatch_is_lazy_on_cpu():
    """A CPU call never imports megatron_kernels (which could start a build)."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.startswith("megatron_kernels")}
    try:
        _all_ops(use_fused=True)
        assert not any(k.startswith("megatron_kernels") for k in sys.modules)
    finally:
        sys.modules.update(saved)


def test_dispatch_backward_matches_reference_on_cpu():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 12, generator=gen)
    w = torch.randn(12, generator=gen)
    b = torch.randn(12, generator=gen)
    y1, g1 = _grads(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, use_fused=True), x, w, b)
    y2, g2 = _grads(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), x, w, b)
    assert torch.equal(y1, y2) and all(torch.equal(a, e) for a, e in zip(g1, g2))


# ------------------------------------------------------------------------- model unchanged
class _LegacyLayerNorm(nn.Module):
    """megazero.model.norms.LayerNorm as it was before the dispatch (F.layer_norm directly)."""

    def __init__(self, hidden_size, eps=1e-5, dtype=torch.float32, device=None, use_fused=True, grad_sum_group=None):
        super().__init__()
        from megazero.tensor_parallel.init import constant_init, set_init

        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        set_init(self.weight, constant_init(1.0))
        set_init(self.bias, constant_init(0.0))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def _gpt_loss_and_grads(tp_group, monkeypatch, legacy: bool):
    from megazero.config import ModelConfig
    from megazero.model import attention, gpt
    from megazero.random import RNGStreams
    from megazero.tensor_parallel.init import initialize_parameters

    if legacy:  # the block's norms are made by attention.make_norm
        monkeypatch.setattr(attention, "LayerNorm", _LegacyLayerNorm)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=200,
                      hidden_dropout=0.1, attention_dropout=0.1)
    with torch.random.fork_rng():
        model = gpt.GPTModel(cfg, tp_group=tp_group, rng=RNGStreams(99, 0, 0, torch.device("cpu")))
        initialize_parameters(model, seed=99)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        tokens = torch.randint(0, 200, (2, 17), generator=gen)
        torch.manual_seed(5)  # dropout masks
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
        loss.backward()
    monkeypatch.undo()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model.state_dict()


def test_gpt_bitwise_unchanged(tp_group, monkeypatch):
    loss_new, grads_new, sd_new = _gpt_loss_and_grads(tp_group, monkeypatch, legacy=False)
    loss_old, grads_old, sd_old = _gpt_loss_and_grads(tp_group, monkeypatch, legacy=True)
    assert list(grads_new) == list(grads_old)  # named_parameters keys and order
    assert any(k.endswith("input_layernorm.weight") for k in grads_new)
    assert "final_layernorm.bias" in grads_new
    assert list(sd_new) == list(sd_old) and all(torch.equal(sd_new[k], sd_old[k]) for k in sd_new)
    assert torch.equal(loss_new, loss_old)
    for name in grads_new:
        assert torch.equal(grads_new[name], grads_old[name]), name


def test_rmsnorm_module():
    from megazero.model.norms import RMSNorm
    from megazero.tensor_parallel.init import initialize_parameters

    m = RMSNorm(8, eps=1e-6)
    initialize_parameters(m, seed=0)
    assert [n for n, _ in m.named_parameters()] == ["weight"] and torch.equal(m.weight, torch.ones(8))
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), F.rms_norm(x, (8,), m.weight, 1e-6), **TOL)
