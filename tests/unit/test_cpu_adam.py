"""megatron_kernels CPU Adam: the reference path and (when it builds here) the one-pass kernel vs
torch.optim.AdamW / Adam, the bf16/fp16 copy, non-finite detection, odd sizes, and the JIT cache.

The kernel's test ids name the variant this machine runs, e.g. `kernel-avx512-sqrt_torch`: the ISA the
kernel dispatches to and whether it takes exp_avg_sq's square root from torch (torch.sqrt is not IEEE
here, e.g. MKL on AMD) or from the hardware. Assertion messages repeat it, and
`test_test_ids_name_the_kernel_variant` checks the ids against the built kernel."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_kernels import build, cpu_adam
from megatron_kernels.cpu_adam import cpu_adam_step, has_non_finite

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Predicted without building the kernel (collection must stay fast); checked against the built kernel.
VARIANT = f"{cpu_adam.expected_isa() or 'unknown-isa'}-sqrt_{cpu_adam.sqrt_mode()}"


def _kernel_or_skip():
    if not cpu_adam.kernel_available():
        pytest.skip(f"CPU Adam extension did not build here: {build.build_error('cpu_adam')}")


PATHS = [
    pytest.param(False, id="reference"),
    pytest.param(True, id=f"kernel-{VARIANT}"),
]


def _variant(use_kernel) -> str:
    return f"CPU Adam kernel ({cpu_adam.kernel_description()})" if use_kernel else "CPU Adam reference"


def _bit_exact(use_kernel) -> bool:
    # The reference is torch's op sequence; the kernel variants with fused multiply-adds fuse exactly
    # where torch's AVX2/AVX-512 kernels do and take torch's sqrt when it is not IEEE: all bit-exact.
    # Only the generic variant (no FMA) may differ from torch's AVX kernels in the last bits.
    return not use_kernel or cpu_adam.kernel_isa() != "generic"


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _assert_same_bits(got, want, what, use_kernel):
    bad = (_bits(got) != _bits(want)).nonzero().flatten()
    if len(bad):
        i = bad[0].item()
        raise AssertionError(f"{_variant(use_kernel)}: {what} differs from torch in {len(bad)} of {got.numel()} "
                             f"elements, first [{i}]: {got[i].item()!r} vs {want[i].item()!r}")


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
    if _bit_exact(use_kernel):
        # Bit for bit: 20 steps compound any difference, and in a bf16 model a 1-ulp master difference
        # flips a bf16 rounding now and then (test_layout_parity's offload cases need exactness).
        _assert_same_bits(p, tp.detach(), "param", use_kernel)
        _assert_same_bits(m, st["exp_avg"], "exp_avg", use_kernel)
        _assert_same_bits(v, st["exp_avg_sq"], "exp_avg_sq", use_kernel)
    else:  # generic variant: no FMA where torch's AVX kernels fuse; 1-ulp differences, atol for ~0
        msg = lambda m: f"{_variant(use_kernel)}: {m}"  # noqa: E731
        torch.testing.assert_close(p, tp.detach(), rtol=1e-6, atol=2.5e-7, msg=msg)
        torch.testing.assert_close(m, st["exp_avg"], rtol=1e-6, atol=1e-7, msg=msg)
        torch.testing.assert_close(v, st["exp_avg_sq"], rtol=1e-6, atol=0.0, msg=msg)
    if low is not None:  # exactly the rounding of .to(bf16/fp16)
        _assert_same_bits(low, p.to(low_dtype), f"the {low_dtype} copy", use_kernel)


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


def test_test_ids_name_the_kernel_variant():
    """The ids (`kernel-<isa>-sqrt_<mode>`) are predicted at collection without building the kernel;
    the built kernel must agree, so a CI log's ids say what ran."""
    _kernel_or_skip()
    assert (cpu_adam.kernel_isa(), cpu_adam.kernel_sqrt()) == (cpu_adam.expected_isa(), cpu_adam.sqrt_mode()), \
        f"test ids say {VARIANT}, the kernel runs {cpu_adam.kernel_description()}"


# Runs in a fresh process: aten::sqrt on CPU is replaced by a deterministic square root that is 1 ulp
# above IEEE wherever the input's lowest mantissa bit is set, i.e. a torch whose sqrt is not IEEE (as
# MKL VML's is on AMD CPUs), but on any machine. torch.optim.AdamW then takes exp_avg_sq.sqrt() from it,
# and the kernel must follow: a kernel with the hardware sqrt differs on ~4% of the parameters per step.
_NON_IEEE_SQRT = r"""
import sys, torch
from megatron_kernels import cpu_adam

def off_by_one_ulp(x):
    r = torch.pow(x, 0.5)  # torch's sqrt kernel, without re-entering aten::sqrt
    if x.dtype != torch.float32:
        return r
    odd = (x.view(torch.int32) & 1) == 1
    return torch.where(odd, torch.nextafter(r, torch.full_like(r, float("inf"))), r)

lib = torch.library.Library("aten", "IMPL")
lib.impl("sqrt", off_by_one_ulp, "CPU")
lib.impl("sqrt.out", lambda x, *, out: out.copy_(off_by_one_ulp(x)), "CPU")
x = torch.rand(1000) + 0.5
assert not torch.equal(torch.sqrt(x), torch.pow(x, 0.5)), "the override is not active"
assert not cpu_adam.torch_sqrt_is_ieee() and cpu_adam.sqrt_mode() == "torch"
torch.set_num_threads(2)  # the kernel calls torch's sqrt from its worker threads

def run(mode):
    cpu_adam.cpu_adam_extension().set_sqrt_mode(mode)
    gen = torch.Generator().manual_seed(3)
    n = 100_003
    p0 = torch.randn(n, generator=gen) * 0.02
    p, m, v, low = p0.clone(), torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)
    tp = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([tp], lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for t in range(1, 6):
        g = torch.randn(n, generator=gen)
        tp.grad = g * 0.25
        opt.step()
        cpu_adam.cpu_adam_step(p, g, m, v, step=t, lr=2e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                               grad_scale=0.25, low_precision_out=low)
    st = opt.state[tp]
    bits = lambda t: t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)
    pairs = ((p, tp.detach()), (m, st["exp_avg"]), (v, st["exp_avg_sq"]), (low, tp.detach().to(torch.bfloat16)))
    return [int((bits(a) != bits(b)).sum()) for a, b in pairs]

cpu_adam.kernel_isa()  # loads and configures the kernel (auto: torch's sqrt, since it is not IEEE)
import json
print(json.dumps({"kernel": cpu_adam.kernel_description(), "torch": run("torch"), "ieee": run("ieee")}))
"""


def test_kernel_takes_torchs_sqrt_where_it_is_not_ieee():
    _kernel_or_skip()
    if cpu_adam.kernel_isa() == "generic":
        pytest.skip("the generic variant has no FMA where torch's AVX kernels fuse: not bit-exact with torch")
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_KERNELS_CPU_SQRT"}
    env["PYTHONPATH"] = REPO
    r = subprocess.run([sys.executable, "-c", _NON_IEEE_SQRT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kernel"].endswith("sqrt torch"), out  # auto mode chose torch's sqrt
    # param / exp_avg / exp_avg_sq / bf16 copy: none differ from torch.optim.AdamW with torch's sqrt ...
    assert out["torch"] == [0, 0, 0, 0], out
    # ... while the hardware sqrt (the kernel before this fix) differs: the test has teeth on any CPU.
    assert out["ieee"][0] > 1000, out


def _ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 sqrt, whatever torch.sqrt is: a float64 estimate, then corrected
    to the float whose rounding interval holds sqrt(x) (midpoints squared are exact in float64)."""
    r = x.double().sqrt().float()
    down, up = torch.nextafter(r, torch.zeros_like(r)), torch.nextafter(r, torch.full_like(r, float("inf")))
    xd = x.double()
    r = torch.where(xd < ((r.double() + down.double()) / 2) ** 2, down, r)
    return torch.where(xd > ((r.double() + up.double()) / 2) ** 2, up, r)


_IEEE_MODE = r"""
import math, sys, torch
from megatron_kernels import cpu_adam
from tests.unit.test_cpu_adam import _ieee_sqrt
assert cpu_adam.kernel_sqrt() == "ieee"
gen = torch.Generator().manual_seed(5)
n = 100_003
p = torch.randn(n, generator=gen) * 0.02
p[: n // 8] *= 1e-36  # tiny and denormal parameters too
kp, km, kv, klow = p.clone(), torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)
tp, tm, tv = p.clone(), torch.zeros(n), torch.zeros(n)
lr, b1, b2, eps, wd = 2e-3, 0.9, 0.95, 1e-8, 0.1
for t in range(1, 6):
    g = torch.randn(n, generator=gen) * 0.05
    cpu_adam.cpu_adam_step(kp, g, km, kv, step=t, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                           grad_scale=0.5, low_precision_out=klow)
    gs = g * 0.5  # torch.optim.AdamW's op sequence with an IEEE sqrt
    tp.mul_(1 - lr * wd)
    tm.lerp_(gs, 1 - b1)
    tv.mul_(b2).addcmul_(gs, gs, value=1 - b2)
    tp.addcdiv_(tm, (_ieee_sqrt(tv) / math.sqrt(1 - b2**t)).add_(eps), value=-lr / (1 - b1**t))
bits = lambda t: t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)
pairs = ((kp, tp), (km, tm), (kv, tv), (klow, tp.to(torch.bfloat16)))
print([int((bits(a) != bits(b)).sum()) for a, b in pairs])
"""


def test_ieee_sqrt_mode_is_torchs_sequence_with_an_ieee_sqrt():
    """The one-pass path (MEGATRON_KERNELS_CPU_SQRT=ieee, the default where torch.sqrt is IEEE) on any
    CPU: bit-exact with torch.optim.AdamW's op sequence computed with a correctly rounded sqrt."""
    _kernel_or_skip()
    if cpu_adam.kernel_isa() == "generic":
        pytest.skip("the generic variant has no FMA where torch's AVX kernels fuse: not bit-exact with torch")
    env = dict(os.environ, MEGATRON_KERNELS_CPU_SQRT="ieee", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", _IEEE_MODE], env=env, capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[0, 0, 0, 0]", f"{cpu_adam.kernel_isa()}: {r.stdout}"


@pytest.mark.parametrize("use_kernel", PATHS)
@pytest.mark.parametrize("low_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_copy_rounds_like_torch_on_special_values(low_dtype, use_kernel):
    """The bf16/fp16 copy vs torch's .to() on the hard cases of the conversion: denormals, exact ties
    (round half to even), values just beside them, overflow to inf, +-0, +-inf; in the intrinsics body
    and the scalar head/tail. lr = 0 and grad = 0 leave each parameter exactly as it was."""
    _maybe_skip(use_kernel)
    gen = torch.Generator().manual_seed(11)
    hi = torch.randint(0, 1 << 16, (4096,), generator=gen, dtype=torch.int32) << 16
    # low halves: ties for bf16 (0x8000), one either side, zero, random; fp16 gets random bit patterns
    lows = torch.tensor([0x8000, 0x7FFF, 0x8001, 0, 0x1234], dtype=torch.int32)
    bits = (hi.view(-1, 1) | lows.view(1, -1)).flatten()
    x = bits.view(torch.float32)
    x = torch.cat([x, torch.randn(4096, generator=gen) * 1e-40, torch.randn(4096, generator=gen) * 6e-5,
                   torch.randn(4096, generator=gen) * 65504, torch.tensor([0.0, -0.0, float("inf"), -float("inf"),
                   3.4028235e38, -3.4028235e38, 65520.0, 65519.0, 1e-45, -1e-45])])
    x = x[~torch.isnan(x)]
    p, g, m, v = x.clone(), torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)
    low = torch.empty(x.numel(), dtype=low_dtype)
    cpu_adam_step(p, g, m, v, step=1, lr=0.0, weight_decay=0.0, low_precision_out=low, use_kernel=use_kernel)
    _assert_same_bits(p, x, "param (lr 0)", use_kernel)
    _assert_same_bits(low, x.to(low_dtype), f"the {low_dtype} copy", use_kernel)
    # NaN: torch's own conversions disagree on the payload (0x7FC0 scalar, 0xFFFF vectorised); only
    # NaN-ness is contractual (a NaN parameter means the step was not skipped on a non-finite grad).
    nan = torch.full((100,), float("nan"))
    low = torch.empty(100, dtype=low_dtype)
    cpu_adam_step(nan.clone(), torch.zeros(100), torch.zeros(100), torch.zeros(100), step=1, lr=0.0,
                  low_precision_out=low, use_kernel=use_kernel)
    assert torch.isnan(low.float()).all(), _variant(use_kernel)


def test_jit_build_is_announced_once(monkeypatch, tmp_path, capsys):
    """A JIT build prints what it builds, where, and how long it took; a cached load prints nothing."""
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("MEGATRON_KERNELS_NO_JIT", raising=False)
    monkeypatch.delenv("MEGATRON_KERNELS_VERBOSE", raising=False)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw["name"]) or object())
    src = tmp_path / "announce_test.cpp"
    src.write_text("// v1\n")
    assert build._jit("cpu_adam", [src], False, ["-O3"], [], []) is not None
    err = capsys.readouterr().err
    assert "building the CPU Adam kernel (once per cache" in err and str(tmp_path / "cpu_adam") in err, err
    assert "the CPU Adam kernel built in" in err, err
    assert build._jit("cpu_adam", [src], False, ["-O3"], [], []) is not None  # cached: quiet
    assert capsys.readouterr().err == ""
    src.write_text("// v2\n")  # a changed source (or flags, or torch) is a rebuild, announced again
    assert build._jit("cpu_adam", [src], False, ["-O3"], [], []) is not None
    assert "building the CPU Adam kernel" in capsys.readouterr().err
    assert build._jit("cpu_adam", [src], False, ["-O2"], [], []) is not None
    assert "building the CPU Adam kernel" in capsys.readouterr().err
    assert calls == ["cpu_adam"] * 4  # torch's load runs every time (it loads the cached module)


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
    assert "megatron_kernels: building" not in r.stderr, r.stderr  # a cached load is quiet


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
