"""megatron_kernels CPU Adam: the reference path and (when it builds here) the one-pass kernel vs
torch.optim.AdamW / Adam, the bf16/fp16 copy, non-finite detection, odd sizes, and the JIT cache."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_kernels import build, cpu_adam
from megatron_kernels.cpu_adam import cpu_adam_step, has_non_finite

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _kernel_or_skip():
    if not cpu_adam.kernel_available():
        pytest.skip(f"CPU Adam extension did not build here: {build.build_error('cpu_adam')}")


PATHS = [
    pytest.param(False, id="reference"),
    pytest.param(True, id="kernel"),
]


def _maybe_skip(use_kernel):
    if use_kernel:
        _kernel_or_skip()


def _run_vs_torch(n, use_kernel, *, adamw, steps=20, wd=0.1, low_dtype=torch.bfloat16, grad_dtype=torch.float32):
    gen = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=gen)
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    low = torch.empty(n, dtype=low_dtype) if low_dtype is not None else None
    tp = torch.nn.Parameter(p0.clone())
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    opt = cls([tp], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    loss_scale = 1024.0
    for t in range(1, steps + 1):
        g = (torch.randn(n, generator=gen) * loss_scale).to(grad_dtype)
        clip = 0.3 if t % 3 == 0 else 1.0  # the clip coefficient some steps apply
        scale = clip / loss_scale
        tp.grad = g.float() * scale  # torch's multi-pass: unscale, clip, then step
        opt.step()
        found = cpu_adam_step(p, g, m, v, step=t, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                              weight_decay=wd, grad_scale=scale, adamw=adamw,
                              low_precision_out=low, use_kernel=use_kernel)
        assert found is False
    st = opt.state[tp]
    # fp32 rtol 1e-6. The kernel follows torch's op order and fuses exactly where torch's AVX kernels
    # fuse; a handful of elements still differ by 1 ulp (torch's scalar tail / op-level differences),
    # hence the 1-ulp-at-|p|~1 atol for elements that crossed zero.
    torch.testing.assert_close(p, tp.detach(), rtol=1e-6, atol=2.5e-7)
    torch.testing.assert_close(m, st["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, st["exp_avg_sq"], rtol=1e-6, atol=0.0)
    if low is not None:
        assert torch.equal(low, p.to(low_dtype))  # exactly the rounding of .to(bf16/fp16)


@pytest.mark.parametrize("use_kernel", PATHS)
# 1_048_583: a size spanning many threads' chunks and the intrinsics body's aligned middle.
@pytest.mark.parametrize("n", [1, 7, 1023, 100_003, 1_048_583])
def test_adamw_matches_torch(n, use_kernel):
    _maybe_skip(use_kernel)
    _run_vs_torch(n, use_kernel, adamw=True)


def test_reference_is_bit_exact_with_torch_adamw():
    # The reference is torch.optim.AdamW's own op sequence, so it is the numeric spec bit for bit.
    n = 4099
    p0 = torch.randn(n)
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    tp = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([tp], lr=1e-3, weight_decay=0.01)
    for t in range(1, 6):
        g = torch.randn(n)
        tp.grad = g.clone()
        opt.step()
        cpu_adam_step(p, g, m, v, step=t, lr=1e-3, weight_decay=0.01, use_kernel=False)
    assert torch.equal(p, tp.detach())


@pytest.mark.parametrize("use_kernel", PATHS)
@pytest.mark.parametrize("n", [7, 100_003])
def test_l2_mode_matches_torch_adam(n, use_kernel):
    _maybe_skip(use_kernel)
    _run_vs_torch(n, use_kernel, adamw=False)


@pytest.mark.parametrize("use_kernel", PATHS)
def test_fp16_copy_and_bf16_grads(use_kernel):
    _maybe_skip(use_kernel)
    _run_vs_torch(1023, use_kernel, adamw=True, low_dtype=torch.float16, steps=5)
    _run_vs_torch(1023, use_kernel, adamw=True, grad_dtype=torch.bfloat16, steps=5)


@pytest.mark.parametrize("use_kernel", PATHS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_detected(bad, use_kernel):
    _maybe_skip(use_kernel)
    n = 1_048_583  # spans several parallel chunks
    for pos in (0, 4097, 700_001, n - 1):  # first element, mid-vector, body, scalar tail
        g = torch.randn(n)
        g[pos] = bad
        p, m, v = torch.randn(n), torch.zeros(n), torch.zeros(n)
        assert has_non_finite(g, use_kernel=use_kernel)
        assert cpu_adam_step(p, g, m, v, step=1, lr=1e-3, use_kernel=use_kernel) is True
        # check_first: a read-only pre-pass, nothing is modified
        p, m, v = torch.randn(n), torch.zeros(n), torch.zeros(n)
        before = (p.clone(), m.clone(), v.clone())
        assert cpu_adam_step(p, g, m, v, step=1, lr=1e-3, check_first=True, use_kernel=use_kernel) is True
        assert all(torch.equal(a, b) for a, b in zip((p, m, v), before))
    g = torch.full((7,), 1e30)
    assert has_non_finite(g, grad_scale=1e10, use_kernel=use_kernel)  # overflow after scaling counts
    assert not has_non_finite(torch.randn(n), use_kernel=use_kernel)


def test_isa_variants_agree():
    _kernel_or_skip()
    code = (
        "import torch; from megatron_kernels.cpu_adam import cpu_adam_step, kernel_isa\n"
        "torch.manual_seed(0); n=1048583; p=torch.randn(n); m=torch.zeros(n); v=torch.zeros(n)\n"
        "for t in range(1,4): cpu_adam_step(p, torch.randn(n), m, v, step=t, lr=1e-2, weight_decay=0.1)\n"
        "print(kernel_isa(), p.double().sum().item(), p.abs().max().item(), v.double().sum().item())\n"
    )
    outs = {}
    for isa in ("generic", "avx2", "avx512-autovec", "avx512"):
        env = dict(os.environ, MEGATRON_KERNELS_CPU_ISA=isa, PYTHONPATH=REPO)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        name, *vals = r.stdout.split()
        outs[name] = vals
    # generic has no FMA where torch's AVX kernels fuse, so it may differ in the last bits; the
    # AVX2, AVX-512 auto-vectorised and AVX-512 intrinsics variants are bit-identical.
    fused = [outs[k] for k in ("avx2", "avx512-autovec", "avx512") if k in outs]
    assert all(o == fused[0] for o in fused)
    ref = [float(x) for x in next(iter(outs.values()))]
    for vals in outs.values():
        assert all(abs(float(a) - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(vals, ref))


def test_jit_build_is_cached():
    _kernel_or_skip()
    if build._prebuilt("cpu_adam") is not None:
        pytest.skip("extension is prebuilt by setup.py; no JIT cache involved")
    code = (
        "import time; t=time.perf_counter(); from megatron_kernels.build import cpu_adam_extension\n"
        "assert cpu_adam_extension() is not None; print(time.perf_counter()-t)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO, MEGATRON_KERNELS_VERBOSE="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # A recompile takes tens of seconds; a cached load is an import plus a ninja no-op check.
    assert float(r.stdout.strip().splitlines()[-1]) < 10.0
    assert "Building extension module" not in r.stdout + r.stderr


def test_missing_toolchain_returns_none(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGATRON_KERNELS_NO_JIT", "1")
    monkeypatch.setattr(build, "_modules", {})
    monkeypatch.setattr(build, "_errors", {})
    assert build.load_extension("nonexistent_kernel", [tmp_path / "x.cpp"]) is None
    assert "MEGATRON_KERNELS_NO_JIT" in build.build_error("nonexistent_kernel")
    monkeypatch.delenv("MEGATRON_KERNELS_NO_JIT")
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    assert build.load_extension("bad_kernel_for_test", [bad]) is None  # never raises
    assert build.build_error("bad_kernel_for_test")


def test_input_validation():
    with pytest.raises(ValueError, match="float32"):
        cpu_adam_step(torch.zeros(3, dtype=torch.float64), torch.zeros(3), torch.zeros(3), torch.zeros(3), step=1, lr=1.0)
    with pytest.raises(ValueError, match="step must be >= 1"):
        cpu_adam_step(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), step=0, lr=1.0)
    with pytest.raises(ValueError, match="elements"):
        cpu_adam_step(torch.zeros(3), torch.zeros(4), torch.zeros(3), torch.zeros(3), step=1, lr=1.0)
