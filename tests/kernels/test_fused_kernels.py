"""Fused CUDA kernels (megatron_kernels/fused_cuda) vs the PyTorch reference (megazero/ops/reference.py),
forward and backward, per dtype, odd shapes, and the dispatch's fallback outside the kernel limits.
Skipped without CUDA.

Tolerances. fp32: rtol 1e-5 (the issue's bar), with an absolute floor of 1e-5 x the largest expected
magnitude, since reductions run in a different order than torch's. fp16/bf16: both paths compute in
fp32 and round the result once to the storage dtype, so forward outputs differ by at most ~1 ulp of the
storage type (fp16 2^-10 ~ 1e-3 relative, bf16 2^-7 ~ 8e-3). Backward gradients additionally see that the
kernel reads the *rounded* saved output / inputs where torch's autograd keeps fp32 intermediates, and
dx involves a cancellation (dy - sum(dy * y), g - mean(g) - ...), so they get a few ulp relative plus an
absolute floor of a few ulp of the largest gradient; dweight/dbias are sums over rows in fp32 rounded
once, so the same bound holds.
"""

import os
import shutil

import pytest
import torch

from megazero import ops
from megazero.ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="fused kernels need a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol as a fraction of max |expected|)
FWD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}
BWD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 4e-3), torch.bfloat16: (5e-2, 3e-2)}


@pytest.fixture(scope="module", autouse=True)
def ext():
    from megatron_kernels import fused_cuda

    mod = fused_cuda.extension()
    if mod is None:
        reason = fused_cuda.unavailable_reason()
        if os.environ.get("CI") or shutil.which("nvcc"):
            pytest.fail(f"fused_cuda did not build on a CUDA machine with nvcc: {reason}")
        pytest.skip(f"fused_cuda unavailable: {reason}")
    return mod


@pytest.fixture(autouse=True)
def _fresh_log():
    ops.reset_dispatch_log()
    yield
    ops.reset_dispatch_log()


def _close(actual, expected, tol, what=""):
    rtol, atol_frac = tol
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    atol = atol_frac * max(expected.float().abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _run(fn, inputs, grad_out_seed=0):
    """(output, grads of inputs) for fn(*inputs) with a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator(device="cuda").manual_seed(grad_out_seed)
    dy = torch.randn(out.shape, generator=gen, device="cuda", dtype=torch.float32).to(out.dtype)
    out.backward(dy)
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def _path(op):
    return list(ops.dispatch_paths().get(op, {}))


# ------------------------------------------------------------------------------------ softmax
MASKED_SHAPES = [  # (b, h, sq, sk, mask_heads)
    (2, 3, 5, 7, 1), (2, 3, 5, 7, 3), (1, 2, 4, 1, 1), (2, 2, 3, 33, 2), (1, 1, 2, 127, 1), (1, 1, 3, 128, 1),
    (1, 2, 2, 129, 1), (1, 1, 2, 513, 1), (2, 1, 3, 2048, 1), (1, 1, 2, 4096, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MASKED_SHAPES, ids=str)
def test_scaled_masked_softmax(shape, dtype):
    b, h, sq, sk, mh = shape
    gen = torch.Generator(device="cuda").manual_seed(sk)
    x = (3 * torch.randn(b, h, sq, sk, generator=gen, device="cuda")).to(dtype)
    mask = torch.rand(b, mh, sq, sk, generator=gen, device="cuda") < 0.3
    mask[0, :, 0] = True  # a fully masked row: uniform 1/sk on both paths
    scale = 0.125
    y, (gx,) = _run(lambda x: ops.scaled_masked_softmax(x, mask, scale, use_fused=True), [x])
    assert _path("scaled_masked_softmax") == ["fused"]
    y_ref, (gx_ref,) = _run(lambda x: reference.scaled_masked_softmax(x, mask, scale), [x])
    _close(y, y_ref, FWD_TOL[dtype], "forward")
    _close(gx, gx_ref, BWD_TOL[dtype], "backward")
    assert torch.all(gx.float()[mask.expand(b, h, sq, sk)] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scaled_masked_softmax_no_mask_and_broadcast_mask(dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 4, 6, 40, generator=gen, device="cuda").to(dtype)
    for mask in (None, torch.rand(1, 1, 6, 40, generator=gen, device="cuda") < 0.5,
                 torch.rand(6, 40, generator=gen, device="cuda") < 0.5):
        y, (gx,) = _run(lambda x, m=mask: ops.scaled_masked_softmax(x, m, 0.7, use_fused=True), [x])
        y_ref, (gx_ref,) = _run(lambda x, m=mask: reference.scaled_masked_softmax(x, m, 0.7), [x])
        _close(y, y_ref, FWD_TOL[dtype], "forward")
        _close(gx, gx_ref, BWD_TOL[dtype], "backward")
    assert _path("scaled_masked_softmax") == ["fused"]


CAUSAL_SHAPES = [(3, 7, 7), (4, 1, 1), (2, 65, 65), (1, 300, 300), (2, 5, 9), (2, 9, 5), (1, 8, 4096), (2, 3, 4, 31)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CAUSAL_SHAPES, ids=str)
def test_scaled_causal_softmax(shape, dtype):
    gen = torch.Generator(device="cuda").manual_seed(shape[-1])
    x = (3 * torch.randn(shape, generator=gen, device="cuda")).to(dtype)
    y, (gx,) = _run(lambda x: ops.scaled_causal_softmax(x, 0.3, use_fused=True), [x])
    assert _path("scaled_causal_softmax") == ["fused"]
    y_ref, (gx_ref,) = _run(lambda x: reference.scaled_causal_softmax(x, 0.3), [x])
    _close(y, y_ref, FWD_TOL[dtype], "forward")
    _close(gx, gx_ref, BWD_TOL[dtype], "backward")
    upper = torch.ones(shape[-2], shape[-1], dtype=torch.bool, device="cuda").triu(1)
    assert torch.all(y[..., upper] == 0) and torch.all(gx[..., upper] == 0)


def test_softmax_falls_back_outside_limits():
    x = torch.randn(1, 1, 2, 4097, device="cuda")
    torch.testing.assert_close(ops.scaled_causal_softmax(x, 1.0, use_fused=True),
                               reference.scaled_causal_softmax(x, 1.0))
    assert "key length 4097" in ops.dispatch_paths()["scaled_causal_softmax"]["reference"]
    ops.scaled_masked_softmax(x, None, 1.0, use_fused=True)
    assert _path("scaled_masked_softmax") == ["reference"]
    ops.reset_dispatch_log()
    ops.scaled_masked_softmax(torch.randn(3, 4, 5, device="cuda"), None, 1.0, use_fused=True)  # not 4-D
    assert _path("scaled_masked_softmax") == ["reference"]
    ops.reset_dispatch_log()
    ops.scaled_causal_softmax(torch.randn(2, 4, 5, device="cuda", dtype=torch.float64), 1.0, use_fused=True)
    assert _path("scaled_causal_softmax") == ["reference"]
    ops.reset_dispatch_log()
    ops.scaled_causal_softmax(torch.randn(2, 4, 5, device="cuda"), 1.0, use_fused=False)
    assert ops.dispatch_paths()["scaled_causal_softmax"] == {"reference": "fused kernels disabled"}


# -------------------------------------------------------------------------------------- norms
NORM_SHAPES = [(1, 1), (3, 7), (5, 64), (17, 1000), (64, 1024), (300, 256), (1000, 64), (8, 4097), (2, 12288),
               (2, 3, 96)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_norms(kind, shape, dtype):
    hidden = shape[-1]
    gen = torch.Generator(device="cuda").manual_seed(hidden)
    x = (torch.randn(shape, generator=gen, device="cuda") * 2 + 0.5).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda")).to(dtype)
    b = (0.1 * torch.randn(hidden, generator=gen, device="cuda")).to(dtype)
    if kind == "layer_norm":
        fused = lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, use_fused=True)
        ref = lambda x, w, b: reference.layer_norm(x, w, b, 1e-5)
        inputs = [x, w, b]
    else:
        fused = lambda x, w: ops.rms_norm(x, w, 1e-6, use_fused=True)
        ref = lambda x, w: reference.rms_norm(x, w, 1e-6)
        inputs = [x, w]
    y, grads = _run(fused, inputs)
    assert _path(kind) == ["fused"]
    y_ref, grads_ref = _run(ref, inputs)
    _close(y, y_ref, FWD_TOL[dtype], "forward")
    for name, g, g_ref in zip(["dx", "dweight", "dbias"], grads, grads_ref):
        _close(g, g_ref, BWD_TOL[dtype], name)


def test_norm_backward_is_deterministic():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 1024, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, generator=gen, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1024, generator=gen, device="cuda", dtype=torch.bfloat16)
    _, g1 = _run(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, use_fused=True), [x, w, b])
    _, g2 = _run(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, use_fused=True), [x, w, b])
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))


def test_norm_non_contiguous_input():
    x = torch.randn(64, 8, device="cuda").t()  # [8, 64], non-contiguous
    w, b = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    y, g = _run(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, use_fused=True), [x, w, b])
    y_ref, g_ref = _run(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), [x, w, b])
    _close(y, y_ref, FWD_TOL[torch.float32])
    for a, e in zip(g, g_ref):
        _close(a, e, BWD_TOL[torch.float32])


def test_norms_fall_back_outside_limits():
    x = torch.randn(2, 65537, device="cuda")
    w, b = torch.ones(65537, device="cuda"), torch.zeros(65537, device="cuda")
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-5, use_fused=True), reference.layer_norm(x, w, b, 1e-5))
    assert "hidden size 65537" in ops.dispatch_paths()["layer_norm"]["reference"]
    ops.reset_dispatch_log()
    xb = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    ops.rms_norm(xb, torch.ones(64, device="cuda"), 1e-5, use_fused=True)  # fp32 weight, bf16 input
    assert "dtype" in ops.dispatch_paths()["rms_norm"]["reference"]
    ops.reset_dispatch_log()
    ops.layer_norm(xb, torch.ones(64, device="cuda", dtype=torch.bfloat16), None, 1e-5, use_fused=True)
    assert _path("layer_norm") == ["reference"]
    ops.reset_dispatch_log()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ops.layer_norm(x[:, :64], w[:64], b[:64], 1e-5, use_fused=True)
    assert ops.dispatch_paths()["layer_norm"] == {"reference": "autocast active"}


def test_layernorm_module_on_cuda_keeps_names():
    from megazero.model.norms import LayerNorm, RMSNorm
    from megazero.tensor_parallel.init import initialize_parameters

    ln = LayerNorm(96, device="cuda", dtype=torch.bfloat16)
    rms = RMSNorm(96, device="cuda", dtype=torch.bfloat16)
    initialize_parameters(ln, seed=0)
    initialize_parameters(rms, seed=0)
    assert list(ln.state_dict()) == ["weight", "bias"] and list(rms.state_dict()) == ["weight"]
    x = torch.randn(4, 5, 96, device="cuda", dtype=torch.bfloat16)
    _close(ln(x), reference.layer_norm(x, ln.weight, ln.bias, 1e-5), FWD_TOL[torch.bfloat16])
    _close(rms(x), reference.rms_norm(x, rms.weight, 1e-5), FWD_TOL[torch.bfloat16])
    assert _path("layer_norm") == ["fused"] and _path("rms_norm") == ["fused"]
