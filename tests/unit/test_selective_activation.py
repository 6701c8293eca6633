"""Selective recomputation of the MLP activation (model/gpt.py MLP, tensor_parallel/layers.py
linear_with_recomputed_activation): fc2 keeps the activation function's input (fc1's output; SwiGLU's
gate/up storage) instead of its output and re-makes the output in backward for its weight gradient.

- the bytes an MLP saves (SavedTensorMeter) drop by exactly the activation's output storage: GELU's
  [b, s, ffn/tp]; SwiGLU's product and silu(gate), [b, s, ffn/tp] each; what remains is fc1's input,
  fc1's output (and SwiGLU's regrouped weight copy), nothing else; GELU and SwiGLU, with and without
  biases, tp 1 and tp 2 with and without sequence parallelism (one 2-process gloo launch);
- forward output, input gradient and every parameter gradient are bitwise those of the plain path
  (fp32 and bf16), and no matmul is re-run in backward (one mm for each gradient, counted);
- the function alone: without grad it is the plain expression; inputs that need no gradient get none;
  a retained graph backpropagates twice.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megazero.activation.saved_tensors import SavedTensorMeter
from megazero.config import ActivationConfig, ModelConfig
from megazero.tensor_parallel.init import initialize_parameters, normal_init
from megazero.tensor_parallel.layers import linear_with_recomputed_activation
from tests.dist_utils import run_distributed

B, S, H, FFN = 2, 16, 32, 128
VARIANTS = {
    "gelu": {},
    "swiglu": dict(swiglu=True, add_bias_linear=False),
    "swiglu bias": dict(swiglu=True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _mlp(group, variant: str, selective: bool, sp: bool, dtype: torch.dtype):
    from megazero.model.gpt import MLP

    cfg = ModelConfig(num_layers=2, hidden_size=H, num_attention_heads=4, seq_length=S, vocab_size=100,
                      ffn_hidden_size=FFN, **VARIANTS[variant])
    act = ActivationConfig(sequence_parallel=sp, recompute_granularity="selective" if selective else None)
    mlp = MLP(cfg, group, normal_init(0.02), dtype, None, act)
    initialize_parameters(mlp, seed=5)
    return mlp


def _run(group, variant: str, selective: bool, sp: bool, dtype: torch.dtype) -> dict:
    """One MLP forward + backward under the meter: the bytes saved after forward, output, grads."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(9)
    x_full = torch.randn(B, S, H, generator=g).to(dtype)
    grad_full = torch.randn(B, S, H, generator=g).to(dtype)
    rows = slice(rank * S // tp, (rank + 1) * S // tp) if sp else slice(None)
    x = x_full[:, rows].clone().requires_grad_(True)
    mlp = _mlp(group, variant, selective, sp, dtype)
    meter = SavedTensorMeter()
    with meter.recording():
        y = mlp(x)
        saved = meter.live_bytes
        y.backward(grad_full[:, rows])
    return {"saved": saved, "released": meter.live_bytes, "out": y.detach(), "x.grad": x.grad,
            **{n: p.grad for n, p in mlp.named_parameters()}}


def _expected(variant: str, tp: int, sp: bool, e: int) -> tuple[int, int]:
    """(selective's saved bytes, the activation output storage the plain path keeps on top)."""
    f, swiglu = FFN // tp, variant.startswith("swiglu")
    fc1_in = B * (S // tp if sp else S) * H * e  # the [b, s/tp, h] shard under SP
    fc1_out = B * S * f * e * (2 if swiglu else 1)  # gelu's input; gate and up (one storage)
    weight_copy = 2 * f * H * e if swiglu else 0  # SwiGLU's regrouped local weight
    activation_out = B * S * f * e * (2 if swiglu else 1)  # gelu(x); silu(gate) and the product
    return fc1_in + fc1_out + weight_copy, activation_out


def _compare(group, variant: str, sp: bool, dtype: str) -> None:
    tp = dist.get_world_size(group)
    plain = _run(group, variant, False, sp, DTYPES[dtype])
    sel = _run(group, variant, True, sp, DTYPES[dtype])
    kept, activation_out = _expected(variant, tp, sp, DTYPES[dtype].itemsize)
    where = (variant, tp, sp, dtype)
    assert sel["saved"] == kept, where
    assert plain["saved"] - sel["saved"] == activation_out, where
    assert sel["released"] == plain["released"] == 0, where
    assert plain.keys() == sel.keys()
    for name in plain:
        if isinstance(plain[name], torch.Tensor):
            assert torch.equal(plain[name], sel[name]), (where, name)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_selective_mlp_saves_the_activation_input_only_and_is_bitwise(tp_group, variant, dtype):
    _compare(tp_group, variant, False, dtype)


def _tp2_checks(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    for variant in VARIANTS:
        for sp in (False, True):
            _compare(group, variant, sp, "fp32")
    return True


def test_selective_mlp_tp2_with_and_without_sequence_parallel():
    assert run_distributed(_tp2_checks, 2) == [True, True]


def _gelu(x):
    return F.gelu(x, approximate="tanh")


def test_backward_runs_no_matmul_again(monkeypatch):
    """Forward: one matmul (F.linear); backward: one mm for grad_W, one for the input's grad."""
    x = torch.randn(2, 4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    y = linear_with_recomputed_activation(_gelu, w, x)
    calls = []
    mm = torch.Tensor.mm
    monkeypatch.setattr(torch.Tensor, "mm", lambda a, b: calls.append(tuple(b.shape)) or mm(a, b))
    y.sum().backward()
    assert sorted(calls) == [(3, 8), (8, 8)]  # grad^T @ g [8, 8 = in]; grad @ W [3, 8]
    ref_x, ref_w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    F.linear(_gelu(ref_x), ref_w).sum().backward()
    assert torch.equal(x.grad, ref_x.grad) and torch.equal(w.grad, ref_w.grad)


def test_without_grad_and_partial_grads():
    x, w = torch.randn(2, 4, 8, requires_grad=True), torch.randn(3, 8)
    with torch.no_grad():
        y = linear_with_recomputed_activation(_gelu, w, x)
    assert y.grad_fn is None and torch.equal(y, F.linear(_gelu(x), w))
    gate, up = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 4, 8)  # up needs no gradient
    w = torch.randn(3, 8, requires_grad=True)
    swiglu = lambda g, u: F.silu(g) * u  # noqa: E731
    linear_with_recomputed_activation(swiglu, w, gate, up).sum().backward()
    ref_gate, ref_w = gate.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    F.linear(swiglu(ref_gate, up), ref_w).sum().backward()
    assert up.grad is None
    assert torch.equal(gate.grad, ref_gate.grad) and torch.equal(w.grad, ref_w.grad)


def test_a_retained_graph_backpropagates_twice():
    x, w = torch.randn(2, 4, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    y = linear_with_recomputed_activation(_gelu, w, x)
    y.sum().backward(retain_graph=True)
    first = x.grad.clone(), w.grad.clone()
    y.sum().backward()
    assert torch.equal(x.grad, 2 * first[0]) and torch.equal(w.grad, 2 * first[1])
