"""core_attention's backends on CUDA (skipped without a CUDA device): sdpa with grouped key/value heads
(enable_gqa), fused (megatron_kernels' scaled causal softmax through megazero.ops: the dispatch must
take the kernel) and unfused agree with a float64 reference, forward and backward, MHA and GQA.
On CPU, tests/unit/test_llama_parts.py covers the same calls (fused falls back to the reference)."""

import math

import pytest
import torch

from megazero import ops
from megazero.model.attention import core_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 2e-2)}  # (rtol, atol): bf16 rounds its inputs


def _reference(q, k, v):
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = q.shape[-2]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["sdpa", "fused", "unfused"])
@pytest.mark.parametrize("kv_heads", [8, 2], ids=["mha", "gqa"])
def test_backends_on_cuda(dtype, backend, kv_heads):
    ops.reset_dispatch_log()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 128, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
    k = torch.randn(2, kv_heads, 128, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
    v = torch.randn(2, kv_heads, 128, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
    out = core_attention(q, k, v, backend=backend, dropout_p=0.0)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), _reference(q, k, v), rtol=rtol, atol=atol)
    grad = torch.randn(out.shape, device="cuda", generator=gen).to(dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(_reference(rq, rk, rv), (rq, rk, rv), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=10 * rtol, atol=10 * atol)
    if backend == "fused":
        assert "fused" in ops.dispatch_paths()["scaled_causal_softmax"], ops.dispatch_paths()
