// Hand-written AVX-512 body of the one-pass Adam step. Included only inside the AVX-512 namespace of
// cpu_adam.cpp (after cpu_adam_impl.h, whose auto-vectorised loop handles the unaligned head/tail).
//
// Why intrinsics here when the AVX2 / generic variants rely on auto-vectorisation: measured on the
// dev box (10 M params, 2 threads), gcc 12's auto-vectorised AVX-512 loop takes 14.0 ms and this body
// 7.8 ms (17.3 vs 8.8 ms with the bf16 copy). We also tried non-temporal (streaming) stores for the
// four output streams to skip the write-allocate reads: no gain at 10 M and slower at 50 M
// (38 vs 33 ms), so the stores are ordinary. The math is the same operation sequence as
// cpu_adam_impl.h (same fused multiply-adds), so results are bit-identical to the other
// FMA variants.

template <typename GradT>
static inline __m512 load16_grad(const GradT* g);
template <>
inline __m512 load16_grad<float>(const float* g) { return _mm512_loadu_ps(g); }
template <>
inline __m512 load16_grad<uint16_t>(const uint16_t* g) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m256i bf16_rne16(__m512 x) {
  __m512i u = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// Processes the 64-byte-aligned middle of [0, n) with intrinsics, the rest with adam_chunk.
template <typename GradT, int OUT>
float adam_chunk_avx512(float* __restrict__ p, const GradT* __restrict__ gr, float* __restrict__ m,
                        float* __restrict__ v, uint16_t* __restrict__ out, int64_t n, AdamScalars s,
                        bool lerp_low) {
  // Peel until param is 64 B aligned; the aligned loads/stores need m, v (64 B) and out (32 B) aligned
  // there too (true for fresh torch allocations), else the whole chunk takes the auto-vectorised loop.
  int64_t head = ((64 - (reinterpret_cast<uintptr_t>(p) & 63)) & 63) / 4;
  if (head > n || (reinterpret_cast<uintptr_t>(p) & 3)) head = n;
  const int64_t body = ((n - head) / 16) * 16;
  const bool aligned = (reinterpret_cast<uintptr_t>(m + head) & 63) == 0 &&
                       (reinterpret_cast<uintptr_t>(v + head) & 63) == 0 &&
                       (OUT == 0 || (reinterpret_cast<uintptr_t>(out + head) & 31) == 0);
  if (!aligned || body == 0)
    return adam_chunk<GradT, OUT>(p, gr, m, v, out, n, s, lerp_low);
  float bad = adam_chunk<GradT, OUT>(p, gr, m, v, out, head, s, lerp_low);
  const __m512 zero = _mm512_setzero_ps(), scale = _mm512_set1_ps(s.grad_scale),
               l2 = _mm512_set1_ps(s.l2), decay = _mm512_set1_ps(s.decay),
               w = _mm512_set1_ps(lerp_low ? s.w1 : s.w1 - 1.f), b2 = _mm512_set1_ps(s.beta2),
               c2 = _mm512_set1_ps(s.one_minus_b2), bc2 = _mm512_set1_ps(s.bc2_sqrt),
               eps = _mm512_set1_ps(s.eps), ns = _mm512_set1_ps(s.neg_step);
  __m512 acc = zero;
  const bool use_l2 = s.l2 != 0.f;  // as adam_chunk: no L2 term at wd 0 (fma(0, inf) is NaN)
  for (int64_t i = head; i < head + body; i += 16) {
    __m512 g = _mm512_mul_ps(load16_grad<GradT>(gr + i), scale);
    acc = _mm512_add_ps(acc, _mm512_mul_ps(g, zero));
    __m512 pi = _mm512_load_ps(p + i);
    __m512 mi = _mm512_load_ps(m + i);
    __m512 vi = _mm512_load_ps(v + i);
    if (use_l2) g = _mm512_fmadd_ps(l2, pi, g);
    pi = _mm512_mul_ps(pi, decay);
    __m512 d = _mm512_sub_ps(g, mi);
    mi = _mm512_fmadd_ps(w, d, lerp_low ? mi : g);
    vi = _mm512_mul_ps(vi, b2);
    vi = _mm512_fmadd_ps(_mm512_mul_ps(c2, g), g, vi);
    __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2), eps);
    pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(ns, mi), denom));
    _mm512_store_ps(p + i, pi);
    _mm512_store_ps(m + i, mi);
    _mm512_store_ps(v + i, vi);
    if (OUT == 1) _mm256_store_si256(reinterpret_cast<__m256i*>(out + i), bf16_rne16(pi));
    if (OUT == 2)
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + i),
                          _mm512_cvtps_ph(pi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  bad += _mm512_reduce_add_ps(acc);
  const int64_t t = head + body;
  bad += adam_chunk<GradT, OUT>(p + t, gr + t, m + t, v + t, out ? out + t : nullptr, n - t, s, lerp_low);
  return bad;
}

#define MZ_ADAM_AVX512_ENTRY(NAME, GT, OUT)                                                   \
  float NAME(float* p, const void* g, float* m, float* v, uint16_t* o, int64_t n,           \
             AdamScalars s, bool lerp_low) {                                                 \
    return adam_chunk_avx512<GT, OUT>(p, static_cast<const GT*>(g), m, v, o, n, s, lerp_low); \
  }
MZ_ADAM_AVX512_ENTRY(adam_avx512_f32_none, float, 0)
MZ_ADAM_AVX512_ENTRY(adam_avx512_f32_bf16, float, 1)
MZ_ADAM_AVX512_ENTRY(adam_avx512_f32_fp16, float, 2)
MZ_ADAM_AVX512_ENTRY(adam_avx512_bf16_none, uint16_t, 0)
MZ_ADAM_AVX512_ENTRY(adam_avx512_bf16_bf16, uint16_t, 1)
MZ_ADAM_AVX512_ENTRY(adam_avx512_bf16_fp16, uint16_t, 2)
#undef MZ_ADAM_AVX512_ENTRY
