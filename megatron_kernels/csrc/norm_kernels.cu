// LayerNorm and RMSNorm with affine weights over the last dim of a contiguous [rows, hidden] tensor:
// forward (saving fp32 mean / rstd per row) and backward (dx, dweight, dbias), fp32 / fp16 / bf16
// storage, fp32 math.
//
// Design: forward and dx use one thread block per row (128 / 256 / 512 threads by hidden size),
// block-strided element loops (coalesced, no alignment requirement) and warp-shuffle + shared-memory
// block reductions. Forward statistics are two-pass (mean, then sum of squared deviations) over the row,
// which stays in L1/L2, for accuracy equal to torch's. The weight/bias gradient is a deterministic
// two-stage column reduction: stage 1 gives each (32-column, row-chunk) tile a 32x8 thread block writing
// fp32 partial sums to a workspace, stage 2 sums the chunks per column. No atomics: bitwise
// reproducible run to run.
//
//   LayerNorm: y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps) (biased var)
//   RMSNorm:   y = x * rstd * w,               rstd = 1 / sqrt(mean(x^2) + eps)
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w   (RMSNorm: without mean(g))
// Limits: 1 <= hidden <= 65536 (kNormMaxHidden, a dispatch limit; the loops have no hard one);
// rows < 2^31; weight and bias have the input's dtype.

#include "fused_kernels.cuh"
#include "kernel_utils.cuh"

namespace megazero_kernels {
namespace {

constexpr int kColTile = 32;     // columns per stage-1 tile (blockDim.x)
constexpr int kRowThreads = 8;   // blockDim.y of stage 1
constexpr int kMaxChunks = 256;  // row chunks of stage 1

int threads_for(int hidden) { return hidden >= 4096 ? 512 : (hidden >= 1024 ? 256 : 128); }

template <typename T, bool RMS>
__global__ void norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                    T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                    int hidden, float eps) {
  __shared__ float shared[33];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* yr = y + row * hidden;
  float mean = 0.f;
  if (!RMS) {
    float s = 0.f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) s += to_float(xr[c]);
    mean = block_sum(s, shared) / hidden;
  }
  float ss = 0.f;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    const float d = to_float(xr[c]) - mean;
    ss += d * d;
  }
  const float rstd = rsqrtf(block_sum(ss, shared) / hidden + eps);
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    float v = (to_float(xr[c]) - mean) * rstd * to_float(w[c]);
    if (!RMS) v += to_float(b[c]);
    yr[c] = from_float<T>(v);
  }
  if (threadIdx.x == 0) {
    if (!RMS) mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, bool RMS>
__global__ void norm_backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                        const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                        T* __restrict__ dx, int hidden) {
  __shared__ float shared[33];
  const int64_t row = blockIdx.x;
  const T* gr = dy + row * hidden;
  const T* xr = x + row * hidden;
  T* dr = dx + row * hidden;
  const float mean = RMS ? 0.f : mean_in[row];
  const float rstd = rstd_in[row];
  float s_g = 0.f, s_gx = 0.f;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    const float g = to_float(gr[c]) * to_float(w[c]);
    const float xh = (to_float(xr[c]) - mean) * rstd;
    s_g += g;
    s_gx += g * xh;
  }
  const float m_gx = block_sum(s_gx, shared) / hidden;
  const float m_g = RMS ? 0.f : block_sum(s_g, shared) / hidden;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    const float g = to_float(gr[c]) * to_float(w[c]);
    const float xh = (to_float(xr[c]) - mean) * rstd;
    dr[c] = from_float<T>(rstd * (g - m_g - xh * m_gx));
  }
}

// Stage 1: partial[chunk, col] = sum over the chunk's rows of dy * xhat (and dy for the bias).
template <typename T, bool RMS>
__global__ void norm_param_grad_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                               const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                               float* __restrict__ ws, int64_t rows, int hidden,
                                               int64_t rows_per_chunk) {
  __shared__ float sw[kRowThreads][kColTile + 1];
  __shared__ float sb[kRowThreads][kColTile + 1];
  const int col = blockIdx.x * kColTile + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = min(rows, r0 + rows_per_chunk);
  float aw = 0.f, ab = 0.f;
  if (col < hidden) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowThreads) {
      const float g = to_float(dy[r * hidden + col]);
      const float xh = (to_float(x[r * hidden + col]) - (RMS ? 0.f : mean_in[r])) * rstd_in[r];
      aw += g * xh;
      ab += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    float tw = 0.f, tb = 0.f;
#pragma unroll
    for (int i = 0; i < kRowThreads; ++i) {
      tw += sw[i][threadIdx.x];
      tb += sb[i][threadIdx.x];
    }
    const int64_t chunks = gridDim.y;
    ws[static_cast<int64_t>(blockIdx.y) * hidden + col] = tw;
    ws[(chunks + blockIdx.y) * hidden + col] = tb;
  }
}

// Stage 2: dweight[col] = sum_chunks partial_w, dbias[col] = sum_chunks partial_b.
template <typename T, bool RMS>
__global__ void norm_param_grad_final_kernel(const float* __restrict__ ws, T* __restrict__ dw, T* __restrict__ db,
                                             int chunks, int hidden) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= hidden) return;
  float tw = 0.f, tb = 0.f;
  for (int k = 0; k < chunks; ++k) {
    tw += ws[static_cast<int64_t>(k) * hidden + col];
    if (!RMS) tb += ws[static_cast<int64_t>(chunks + k) * hidden + col];
  }
  dw[col] = from_float<T>(tw);
  if (!RMS) db[col] = from_float<T>(tb);
}

template <typename T, bool RMS>
cudaError_t forward_typed(const void* x, const void* w, const void* b, void* y, float* mean, float* rstd,
                          int64_t rows, int hidden, float eps, cudaStream_t stream) {
  norm_forward_kernel<T, RMS><<<static_cast<unsigned>(rows), threads_for(hidden), 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(b), static_cast<T*>(y), mean,
      rstd, hidden, eps);
  return cudaGetLastError();
}

template <typename T, bool RMS>
cudaError_t backward_typed(const void* dy, const void* x, const void* w, const float* mean, const float* rstd,
                           void* dx, void* dw, void* db, float* ws, int64_t rows, int hidden,
                           cudaStream_t stream) {
  norm_backward_dx_kernel<T, RMS><<<static_cast<unsigned>(rows), threads_for(hidden), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(w), mean, rstd,
      static_cast<T*>(dx), hidden);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int chunks = norm_backward_chunks(rows);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  const dim3 grid1((hidden + kColTile - 1) / kColTile, chunks);
  norm_param_grad_partial_kernel<T, RMS><<<grid1, dim3(kColTile, kRowThreads), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), mean, rstd, ws, rows, hidden, rows_per_chunk);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  norm_param_grad_final_kernel<T, RMS><<<(hidden + 255) / 256, 256, 0, stream>>>(
      ws, static_cast<T*>(dw), static_cast<T*>(db), chunks, hidden);
  return cudaGetLastError();
}

cudaError_t check_args(int64_t rows, int hidden) {
  if (rows < 0 || rows > 0x7fffffffLL || hidden < 1 || hidden > kNormMaxHidden) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

int norm_backward_chunks(int64_t rows) {
  // ~32 rows per chunk, at most kMaxChunks chunks, at least one.
  const int64_t c = (rows + 31) / 32;
  return static_cast<int>(c < 1 ? 1 : (c > kMaxChunks ? kMaxChunks : c));
}

cudaError_t launch_norm_forward(const void* x, const void* weight, const void* bias, void* y, float* mean,
                                float* rstd, int64_t rows, int hidden, float eps, int rms, DType dtype,
                                cudaStream_t stream) {
  const cudaError_t err = check_args(rows, hidden);
  if (err != cudaSuccess) return err;
  if (rows == 0) return cudaSuccess;
  if (rms) {
    MZ_DISPATCH_DTYPE(dtype, return (forward_typed<scalar_t, true>(x, weight, bias, y, mean, rstd, rows, hidden,
                                                                   eps, stream)));
  } else {
    MZ_DISPATCH_DTYPE(dtype, return (forward_typed<scalar_t, false>(x, weight, bias, y, mean, rstd, rows, hidden,
                                                                    eps, stream)));
  }
  return cudaSuccess;
}

cudaError_t launch_norm_backward(const void* dy, const void* x, const void* weight, const float* mean,
                                 const float* rstd, void* dx, void* dweight, void* dbias, float* workspace,
                                 int64_t rows, int hidden, int rms, DType dtype, cudaStream_t stream) {
  const cudaError_t err = check_args(rows, hidden);
  if (err != cudaSuccess) return err;
  if (rows == 0) return cudaSuccess;  // the caller zero-fills dweight / dbias
  if (rms) {
    MZ_DISPATCH_DTYPE(dtype, return (backward_typed<scalar_t, true>(dy, x, weight, mean, rstd, dx, dweight, dbias,
                                                                    workspace, rows, hidden, stream)));
  } else {
    MZ_DISPATCH_DTYPE(dtype, return (backward_typed<scalar_t, false>(dy, x, weight, mean, rstd, dx, dweight,
                                                                     dbias, workspace, rows, hidden, stream)));
  }
  return cudaSuccess;
}

}  // namespace megazero_kernels
