// Scaled masked softmax (padding mask) and scaled upper-triangular (causal) softmax, forward and
// backward, fp32 / fp16 / bf16 storage, fp32 math.
//
// Design: one warp per row (4 rows per 128-thread block). Forward keeps the row in registers: lane l
// holds columns l, l + 32, ..., l + 32 * (ELEMS - 1), so every load/store of the warp touches 32
// consecutive elements (coalesced, no alignment requirement), then one warp max, one warp sum, one
// write. ELEMS is a template bucket (1, 4, 16, 64, 128 -> sk <= 32, 128, 512, 2048, 4096), which keeps
// the instantiation count at 5 per dtype. The backward streams the row twice from global memory (dot
// product, then write; the second read hits L1/L2), so it needs no bucket and no register array.
//
// Semantics (identical to megazero/ops/reference.py):
//   masked:  y = softmax(masked_fill(x * scale, mask, -10000.0))   (Megatron's fill value)
//   causal:  y = softmax(masked_fill(x * scale, col > row, -inf))  (masked outputs exactly 0)
//   backward: dx = scale * y * (dy - sum(dy * y)), zero where masked (gradient of masked_fill).
// Limits: 1 <= sk <= 4096 (kSoftmaxMaxKeyLength); contiguous rows; rows < 2^31.

#include <cmath>

#include "fused_kernels.cuh"
#include "kernel_utils.cuh"

namespace megazero_kernels {
namespace {

constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ const uint8_t* mask_row(const uint8_t* mask, int64_t row, int sk, int sq,
                                                   int heads, int mask_heads) {
  if (mask == nullptr) return nullptr;
  const int64_t bh = row / sq;
  const int64_t q = row - bh * sq;
  const int64_t b = bh / heads;
  const int64_t h = mask_heads == 1 ? 0 : bh - b * heads;
  return mask + ((b * mask_heads + h) * sq + q) * sk;
}

template <typename T, int ELEMS>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
softmax_forward_kernel(const T* __restrict__ x, const uint8_t* __restrict__ mask, T* __restrict__ y,
                       int64_t rows, int sk, int sq, int heads, int mask_heads, int causal, float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;  // warp-uniform
  const T* xr = x + row * sk;
  T* yr = y + row * sk;
  const uint8_t* mr = mask_row(mask, row, sk, sq, heads, mask_heads);
  const int q = static_cast<int>(row % sq);
  const int limit = causal ? min(sk, q + 1) : sk;  // columns >= limit are causal-masked

  float v[ELEMS];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    const int c = lane + i * 32;
    float t = -INFINITY;
    if (c < limit) {
      t = to_float(xr[c]) * scale;
      if (mr != nullptr && mr[c]) t = kSoftmaxMaskedValue;
    }
    v[i] = t;
    mx = fmaxf(mx, t);
  }
  mx = warp_max(mx);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    const int c = lane + i * 32;
    const float e = c < limit ? expf(v[i] - mx) : 0.f;
    v[i] = e;
    s += e;
  }
  s = warp_sum(s);
  const float inv = 1.f / s;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    const int c = lane + i * 32;
    if (c < sk) yr[c] = from_float<T>(v[i] * inv);
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
softmax_backward_kernel(const T* __restrict__ dy, const T* __restrict__ y, const uint8_t* __restrict__ mask,
                        T* dx, int64_t rows, int sk, int sq, int heads, int mask_heads, int causal,
                        float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* gr = dy + row * sk;
  const T* yr = y + row * sk;
  T* dr = dx + row * sk;
  const uint8_t* mr = mask_row(mask, row, sk, sq, heads, mask_heads);
  const int q = static_cast<int>(row % sq);
  const int limit = causal ? min(sk, q + 1) : sk;

  // sum over all unmasked-by-causality positions (padding-masked ones included: y there is the
  // softmax of the -10000 fill, exactly as in the reference's autograd graph).
  float dot = 0.f;
  for (int c = lane; c < limit; c += 32) dot += to_float(gr[c]) * to_float(yr[c]);
  dot = warp_sum(dot);
  for (int c = lane; c < sk; c += 32) {
    float g = 0.f;
    if (c < limit && (mr == nullptr || !mr[c])) {
      const float p = to_float(yr[c]);
      g = scale * p * (to_float(gr[c]) - dot);
    }
    dr[c] = from_float<T>(g);  // dx may alias dy: each element is read before it is written
  }
}

template <typename T, int ELEMS>
cudaError_t launch_forward_bucket(const void* x, const uint8_t* mask, void* y, int64_t rows, int sk, int sq,
                                  int heads, int mask_heads, int causal, float scale, cudaStream_t stream) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  softmax_forward_kernel<T, ELEMS><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(x), mask, static_cast<T*>(y), rows, sk, sq, heads, mask_heads, causal, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_forward_typed(const void* x, const uint8_t* mask, void* y, int64_t rows, int sk, int sq,
                                 int heads, int mask_heads, int causal, float scale, cudaStream_t stream) {
  if (sk <= 32) return launch_forward_bucket<T, 1>(x, mask, y, rows, sk, sq, heads, mask_heads, causal, scale, stream);
  if (sk <= 128) return launch_forward_bucket<T, 4>(x, mask, y, rows, sk, sq, heads, mask_heads, causal, scale, stream);
  if (sk <= 512) return launch_forward_bucket<T, 16>(x, mask, y, rows, sk, sq, heads, mask_heads, causal, scale, stream);
  if (sk <= 2048) return launch_forward_bucket<T, 64>(x, mask, y, rows, sk, sq, heads, mask_heads, causal, scale, stream);
  return launch_forward_bucket<T, 128>(x, mask, y, rows, sk, sq, heads, mask_heads, causal, scale, stream);
}

cudaError_t check_args(int64_t rows, int sk, int sq, int heads, int mask_heads) {
  if (rows < 0 || sk < 1 || sk > kSoftmaxMaxKeyLength || sq < 1 || heads < 1) return cudaErrorInvalidValue;
  if (mask_heads != 1 && mask_heads != heads) return cudaErrorInvalidValue;
  if ((rows + kWarpsPerBlock - 1) / kWarpsPerBlock > 0x7fffffffLL) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_scaled_masked_softmax_forward(const void* x, const uint8_t* mask, void* y, int64_t rows,
                                                 int sk, int sq, int heads, int mask_heads, float scale,
                                                 DType dtype, cudaStream_t stream) {
  const cudaError_t err = check_args(rows, sk, sq, heads, mask_heads);
  if (err != cudaSuccess) return err;
  if (rows == 0) return cudaSuccess;
  MZ_DISPATCH_DTYPE(dtype, return launch_forward_typed<scalar_t>(x, mask, y, rows, sk, sq, heads, mask_heads,
                                                                 /*causal=*/0, scale, stream));
  return cudaSuccess;
}

cudaError_t launch_scaled_causal_softmax_forward(const void* x, void* y, int64_t rows, int sk, int sq,
                                                 float scale, DType dtype, cudaStream_t stream) {
  const cudaError_t err = check_args(rows, sk, sq, 1, 1);
  if (err != cudaSuccess) return err;
  if (rows == 0) return cudaSuccess;
  MZ_DISPATCH_DTYPE(dtype, return launch_forward_typed<scalar_t>(x, nullptr, y, rows, sk, sq, 1, 1,
                                                                 /*causal=*/1, scale, stream));
  return cudaSuccess;
}

cudaError_t launch_scaled_softmax_backward(const void* dy, const void* y, const uint8_t* mask, void* dx,
                                           int64_t rows, int sk, int sq, int heads, int mask_heads,
                                           int causal, float scale, DType dtype, cudaStream_t stream) {
  const cudaError_t err = check_args(rows, sk, sq, heads, mask_heads);
  if (err != cudaSuccess) return err;
  if (rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  MZ_DISPATCH_DTYPE(dtype, {
    softmax_backward_kernel<scalar_t><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(y), mask, static_cast<scalar_t*>(dx),
        rows, sk, sq, heads, mask_heads, causal, scale);
    return cudaGetLastError();
  });
  return cudaSuccess;
}

}  // namespace megazero_kernels
