// Native memory-bandwidth kernels for bench/cpu_adam.py: the limit the one-pass CPU Adam step is
// judged against. Built by megatron_kernels.build.load_extension (same JIT cache and lock as the
// kernel) with the kernel's flags plus -march=native -mprefer-vector-width=512.
//
// Both kernels use at::parallel_for with the kernel's 32 K-element grain, so they run on the same
// OpenMP pool, with the same thread count and the same split of the range, as adam_step. Stores are
// ordinary (the kernel's are too), so both pay the same write-allocate reads: comparing useful bytes
// with useful bytes is like for like.
//
// triad:     a[i] = b[i] + s * c[i]                          STREAM's triad, 12 useful B/elem (fp32)
// adam_mix:  read p, g, m, v (fp32); write p, m, v (fp32) and a bf16 copy of p
//            = exactly the streams of one Adam step, 30 useful B/elem, almost no arithmetic.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace {

constexpr int64_t kGrain = 1 << 15;  // = megatron_kernels/csrc/cpu_adam.cpp's kGrain

void check(const at::Tensor& t, at::ScalarType dt, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == dt, name, " has the wrong dtype");
  TORCH_CHECK(t.numel() == n, name, " has ", t.numel(), " elements, expected ", n);
}

void triad(at::Tensor a, at::Tensor b, at::Tensor c, double scalar) {
  const int64_t n = a.numel();
  check(a, at::kFloat, n, "a");
  check(b, at::kFloat, n, "b");
  check(c, at::kFloat, n, "c");
  float* __restrict__ pa = a.data_ptr<float>();
  const float* __restrict__ pb = b.data_ptr<float>();
  const float* __restrict__ pc = c.data_ptr<float>();
  const float s = static_cast<float>(scalar);
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) pa[i] = pb[i] + s * pc[i];
  });
}

void adam_mix(at::Tensor p, at::Tensor g, at::Tensor m, at::Tensor v, at::Tensor low, double scalar) {
  const int64_t n = p.numel();
  check(p, at::kFloat, n, "p");
  check(g, at::kFloat, n, "g");
  check(m, at::kFloat, n, "m");
  check(v, at::kFloat, n, "v");
  check(low, at::kBFloat16, n, "low");
  float* __restrict__ pp = p.data_ptr<float>();
  const float* __restrict__ pg = g.data_ptr<float>();
  float* __restrict__ pm = m.data_ptr<float>();
  float* __restrict__ pv = v.data_ptr<float>();
  uint16_t* __restrict__ po = reinterpret_cast<uint16_t*>(low.data_ptr());
  const float s = static_cast<float>(scalar);
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      // Every output depends on its inputs, so nothing can be elided; a multiply-add or two each.
      const float gi = pg[i];
      const float pn = pp[i] + s * gi;
      pm[i] = pm[i] + s * gi;
      pv[i] = pv[i] + s * gi * gi;  // stays >= 0: the step may run on these arrays afterwards
      pp[i] = pn;
      uint32_t bits;
      __builtin_memcpy(&bits, &pn, 4);
      po[i] = static_cast<uint16_t>(bits >> 16);  // truncation: the bytes matter, not the rounding
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "bench/cpu_adam.py memory-bandwidth kernels (triad, Adam-mix stream)";
  mod.def("triad", &triad, "a = b + s * c (fp32, in place into a)");
  mod.def("adam_mix", &adam_mix, "the Adam step's streams: read p, g, m, v; write p, m, v, bf16(p)");
}
