// Shared declarations for megazero's fused CUDA kernels (softmax_kernels.cu, norm_kernels.cu).
//
// The .cu files depend only on the CUDA toolkit headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h),
// never on torch: they expose plain host launchers taking raw pointers, sizes, a dtype code and a
// cudaStream_t. All torch glue (shape/dtype checks, allocation, current stream) lives in
// fused_cuda_bindings.cpp. This keeps the .cu sources compilable with bare nvcc (CI: nvcc, no GPU,
// CPU torch wheel) and keeps template instantiations few.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace megazero_kernels {

// Element dtype of x / y / dy / weights. Accumulation is always fp32.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------------------------
// Softmax (softmax_kernels.cu). One warp per row of length sk; rows are contiguous.
// Limits: 1 <= sk <= kSoftmaxMaxKeyLength; no alignment requirement (element-wise, bounds-checked
// loads); rows < 2^31.
// ---------------------------------------------------------------------------------------------
constexpr int kSoftmaxMaxKeyLength = 4096;
// Value written (after scaling) to masked positions of the padding-masked softmax (Megatron's
// convention): a fully masked row therefore becomes uniform 1/sk, never NaN.
constexpr float kSoftmaxMaskedValue = -10000.0f;

// Padding-masked forward. x, y: [rows, sk] with rows = b * heads * sq (logical [b, heads, sq, sk]).
// mask: nullptr (no mask) or bool/uint8 [b, mask_heads, sq, sk] with mask_heads in {1, heads};
// nonzero = masked. y = softmax(masked_fill(x * scale, mask, -10000)) in fp32, rounded once.
cudaError_t launch_scaled_masked_softmax_forward(
    const void* x, const uint8_t* mask, void* y, int64_t rows, int sk, int sq, int heads,
    int mask_heads, float scale, DType dtype, cudaStream_t stream);

// Causal (upper-triangular) forward. x, y: [rows, sk], rows = batches * sq; row r holds query
// q = r % sq; key c is masked when c > q (top-left aligned, as torch SDPA is_causal); masked outputs
// are exactly 0.
cudaError_t launch_scaled_causal_softmax_forward(
    const void* x, void* y, int64_t rows, int sk, int sq, float scale, DType dtype, cudaStream_t stream);

// Backward of both: dx = scale * y * (dy - sum_k(dy * y)), and dx = 0 at masked positions (the
// gradient of masked_fill; mask as in forward, or nullptr) and at causal-masked positions when
// causal != 0. dx may alias dy.
cudaError_t launch_scaled_softmax_backward(
    const void* dy, const void* y, const uint8_t* mask, void* dx, int64_t rows, int sk, int sq,
    int heads, int mask_heads, int causal, float scale, DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// LayerNorm / RMSNorm (norm_kernels.cu) over the last dim (hidden) of a contiguous [rows, hidden]
// input, one thread block per row, fp32 statistics. Weight/bias have the input's dtype.
// Limits: 1 <= hidden <= kNormMaxHidden; rows < 2^31; no alignment requirement.
// ---------------------------------------------------------------------------------------------
constexpr int kNormMaxHidden = 65536;

// rms != 0: RMSNorm (bias ignored, may be nullptr; mean output untouched, may be nullptr).
// Saves mean [rows] (LayerNorm only) and rstd [rows] in fp32.
cudaError_t launch_norm_forward(
    const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
    int64_t rows, int hidden, float eps, int rms, DType dtype, cudaStream_t stream);

// Number of row chunks of the two-stage weight/bias-gradient reduction; the caller provides an fp32
// workspace of 2 * norm_backward_chunks(rows) * hidden floats.
int norm_backward_chunks(int64_t rows);

// dx: [rows, hidden]; dweight, dbias: [hidden] (dbias ignored when rms). Deterministic (no atomics).
cudaError_t launch_norm_backward(
    const void* dy, const void* x, const void* weight, const float* mean, const float* rstd,
    void* dx, void* dweight, void* dbias, float* workspace, int64_t rows, int hidden, int rms,
    DType dtype, cudaStream_t stream);

}  // namespace megazero_kernels
