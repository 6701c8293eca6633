// Device helpers shared by the .cu sources: explicit dtype conversions (torch builds define
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, so no implicit casts) and warp
// reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace megazero_kernels {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `shared` holds >= 33 floats. Ends with a barrier so `shared` may be reused right after.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nwarps ? shared[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) shared[32] = t;
  }
  __syncthreads();
  const float r = shared[32];
  __syncthreads();
  return r;
}

}  // namespace megazero_kernels

// Dispatch a DType code to a C++ element type named `scalar_t`.
#define MZ_DISPATCH_DTYPE(dtype, ...)                                     \
  switch (dtype) {                                                        \
    case ::megazero_kernels::kFloat32: {                                  \
      using scalar_t = float;                                             \
      __VA_ARGS__;                                                        \
      break;                                                              \
    }                                                                     \
    case ::megazero_kernels::kFloat16: {                                  \
      using scalar_t = __half;                                            \
      __VA_ARGS__;                                                        \
      break;                                                              \
    }                                                                     \
    case ::megazero_kernels::kBFloat16: {                                 \
      using scalar_t = __nv_bfloat16;                                     \
      __VA_ARGS__;                                                        \
      break;                                                              \
    }                                                                     \
    default:                                                              \
      return cudaErrorInvalidValue;                                       \
  }
