// One-pass AdamW/Adam element loop. Included three times by cpu_adam.cpp, each time inside its own
// namespace under a different `#pragma GCC target` (avx512 / avx2+fma / generic), so one translation
// unit carries all three ISA variants and the best one is picked at runtime with
// __builtin_cpu_supports. No torch headers here: everything this file needs is included before the
// pragmas, so nothing from libtorch is recompiled for a foreign ISA.
//
// The loop is written so that gcc auto-vectorises it (`#pragma omp simd`, built with -fopenmp):
// straight-line per-element math, the non-finite check folded into a float reduction
// (x * 0 is 0 for finite x and NaN for inf/NaN, so the sum is NaN iff some g is non-finite) and the
// bf16/fp16 stores as integer bit manipulation. Built with -ffp-contract=off so the compiler never
// fuses on its own: the only fused multiply-adds are the explicit MZ_FMA ones in the lerp and the
// addcmul, exactly where torch's vectorised kernels fuse, so the result is bit-identical to torch.optim.AdamW on AVX2/AVX-512
// given the same square root (cpu_adam.cpp: torch's own where torch.sqrt is not IEEE).

using AdamScalars = ::MzAdamScalars;  // defined once in cpu_adam.cpp, shared by every ISA variant

static inline float load_grad(const float* g, int64_t i) { return g[i]; }
static inline float load_grad(const uint16_t* g, int64_t i) {  // bf16 -> fp32 is exact: a shift
  uint32_t u = static_cast<uint32_t>(g[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t to_bf16_rne(float f) {  // same rounding as torch's .to(torch.bfloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return nan ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}

// OUT: 0 = no low-precision copy, 1 = bf16, 2 = fp16. Returns the NaN-sum (NaN iff a non-finite g).
template <typename GradT, int OUT>
float adam_chunk(float* __restrict__ p, const GradT* __restrict__ gr, float* __restrict__ m,
                 float* __restrict__ v, uint16_t* __restrict__ out, int64_t n, AdamScalars s,
                 bool lerp_low) {
  float bad = 0.f;
  // Only when there is an L2 term (torch skips grad.add(param) at wd 0): fma(0, inf, g) would be NaN.
  const bool use_l2 = s.l2 != 0.f;
  // exp_avg.lerp_(g, w1) exactly as torch's vectorised lerp: fmadd(w, g - m, m) for w < 0.5, else
  // fmadd(w - 1, g - m, g); MZ_FMA is a fused multiply-add where the ISA has one (the variants that
  // torch's own AVX2/AVX-512 kernels would use) and a*b+c in the generic variant.
  if (lerp_low) {  // the weight branch is hoisted out of the loop
#pragma omp simd reduction(+ : bad)
    for (int64_t i = 0; i < n; ++i) {
      float g = load_grad(gr, i) * s.grad_scale;
      bad += g * 0.f;
      float pi = p[i];
      if (use_l2) g = MZ_FMA(s.l2, pi, g);  // L2 mode: grad.add(param, alpha=wd), fused as in torch
      pi = pi * s.decay;
      float mi = MZ_FMA(s.w1, g - m[i], m[i]);
      float vi = v[i] * s.beta2;
      vi = MZ_FMA(s.one_minus_b2 * g, g, vi);  // addcmul_: torch fuses this one too
      float denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
      pi = pi + s.neg_step * mi / denom;
      p[i] = pi; m[i] = mi; v[i] = vi;
      if (OUT == 1) out[i] = to_bf16_rne(pi);
      if (OUT == 2) out[i] = c10::detail::fp16_ieee_from_fp32_value(pi);
    }
  } else {  // weight >= 0.5 -> g - (g - m)*(1 - w)
    const float w1c = s.w1 - 1.f;  // torch's lerp_vec: fmadd(w - 1, end - start, end)
#pragma omp simd reduction(+ : bad)
    for (int64_t i = 0; i < n; ++i) {
      float g = load_grad(gr, i) * s.grad_scale;
      bad += g * 0.f;
      float pi = p[i];
      if (use_l2) g = MZ_FMA(s.l2, pi, g);  // L2 mode: grad.add(param, alpha=wd), fused as in torch
      pi = pi * s.decay;
      float mi = MZ_FMA(w1c, g - m[i], g);
      float vi = v[i] * s.beta2;
      vi = MZ_FMA(s.one_minus_b2 * g, g, vi);  // addcmul_: torch fuses this one too
      float denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
      pi = pi + s.neg_step * mi / denom;
      p[i] = pi; m[i] = mi; v[i] = vi;
      if (OUT == 1) out[i] = to_bf16_rne(pi);
      if (OUT == 2) out[i] = c10::detail::fp16_ieee_from_fp32_value(pi);
    }
  }
  return bad;
}

// The same step split in two around the square root, for when the sqrt must be torch's own
// (cpu_adam.cpp, "sqrt mode torch"): adam_moments writes exp_avg / exp_avg_sq, the caller computes
// sq = torch.sqrt(exp_avg_sq) with ATen, then adam_apply finishes the parameter. The operations and
// their order are exactly adam_chunk's, so with sq = std::sqrt(v) the results are bit-identical.
template <typename GradT>
float adam_moments(const float* __restrict__ p, const GradT* __restrict__ gr, float* __restrict__ m,
                   float* __restrict__ v, int64_t n, AdamScalars s, bool lerp_low) {
  float bad = 0.f;
  const bool use_l2 = s.l2 != 0.f;
  if (lerp_low) {
#pragma omp simd reduction(+ : bad)
    for (int64_t i = 0; i < n; ++i) {
      float g = load_grad(gr, i) * s.grad_scale;
      bad += g * 0.f;
      if (use_l2) g = MZ_FMA(s.l2, p[i], g);
      float mi = MZ_FMA(s.w1, g - m[i], m[i]);
      float vi = v[i] * s.beta2;
      m[i] = mi;
      v[i] = MZ_FMA(s.one_minus_b2 * g, g, vi);
    }
  } else {
    const float w1c = s.w1 - 1.f;
#pragma omp simd reduction(+ : bad)
    for (int64_t i = 0; i < n; ++i) {
      float g = load_grad(gr, i) * s.grad_scale;
      bad += g * 0.f;
      if (use_l2) g = MZ_FMA(s.l2, p[i], g);
      float mi = MZ_FMA(w1c, g - m[i], g);
      float vi = v[i] * s.beta2;
      m[i] = mi;
      v[i] = MZ_FMA(s.one_minus_b2 * g, g, vi);
    }
  }
  return bad;
}

template <int OUT>
void adam_apply(float* __restrict__ p, const float* __restrict__ m, const float* __restrict__ sq,
                uint16_t* __restrict__ out, int64_t n, AdamScalars s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float pi = p[i] * s.decay;
    float denom = sq[i] / s.bc2_sqrt + s.eps;
    pi = pi + s.neg_step * m[i] / denom;
    p[i] = pi;
    if (OUT == 1) out[i] = to_bf16_rne(pi);
    if (OUT == 2) out[i] = c10::detail::fp16_ieee_from_fp32_value(pi);
  }
}

template <typename GradT>
float nonfinite_chunk(const GradT* __restrict__ gr, int64_t n, float scale) {
  float bad = 0.f;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = 0; i < n; ++i) bad += (load_grad(gr, i) * scale) * 0.f;
  return bad;
}

// Non-template entry points (one per ISA namespace) so the dispatcher can take their addresses.
#define MZ_ADAM_ENTRY(NAME, GT, OUT)                                                          \
  float NAME(float* p, const void* g, float* m, float* v, uint16_t* o, int64_t n,           \
             AdamScalars s, bool lerp_low) {                                                 \
    return adam_chunk<GT, OUT>(p, static_cast<const GT*>(g), m, v, o, n, s, lerp_low);       \
  }
MZ_ADAM_ENTRY(adam_f32_none, float, 0)
MZ_ADAM_ENTRY(adam_f32_bf16, float, 1)
MZ_ADAM_ENTRY(adam_f32_fp16, float, 2)
MZ_ADAM_ENTRY(adam_bf16_none, uint16_t, 0)
MZ_ADAM_ENTRY(adam_bf16_bf16, uint16_t, 1)
MZ_ADAM_ENTRY(adam_bf16_fp16, uint16_t, 2)
#undef MZ_ADAM_ENTRY
float nonfinite_f32(const void* g, int64_t n, float scale) {
  return nonfinite_chunk<float>(static_cast<const float*>(g), n, scale);
}
float nonfinite_bf16(const void* g, int64_t n, float scale) {
  return nonfinite_chunk<uint16_t>(static_cast<const uint16_t*>(g), n, scale);
}
float moments_f32(const float* p, const void* g, float* m, float* v, int64_t n, AdamScalars s, bool lerp_low) {
  return adam_moments<float>(p, static_cast<const float*>(g), m, v, n, s, lerp_low);
}
float moments_bf16(const float* p, const void* g, float* m, float* v, int64_t n, AdamScalars s, bool lerp_low) {
  return adam_moments<uint16_t>(p, static_cast<const uint16_t*>(g), m, v, n, s, lerp_low);
}
void apply_none(float* p, const float* m, const float* sq, uint16_t* o, int64_t n, AdamScalars s) {
  adam_apply<0>(p, m, sq, o, n, s);
}
void apply_bf16(float* p, const float* m, const float* sq, uint16_t* o, int64_t n, AdamScalars s) {
  adam_apply<1>(p, m, sq, o, n, s);
}
void apply_fp16(float* p, const float* m, const float* sq, uint16_t* o, int64_t n, AdamScalars s) {
  adam_apply<2>(p, m, sq, o, n, s);
}
