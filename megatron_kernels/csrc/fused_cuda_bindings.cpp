// pybind11 / torch-extension bindings of the fused CUDA kernels (softmax_kernels.cu, norm_kernels.cu).
//
// All torch-dependent glue lives here: shape/dtype/device checks (TORCH_CHECK), output and workspace
// allocation, the device guard and the current CUDA stream. The .cu sources see only raw pointers.
// Softmax ops take and return tensors of the input's dtype; norm ops return fp32 mean/rstd per row.

#include <torch/extension.h>

#include <utility>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "fused_kernels.cuh"

namespace mk = megazero_kernels;

namespace {

mk::DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return mk::kFloat32;
    case at::kHalf: return mk::kFloat16;
    case at::kBFloat16: return mk::kBFloat16;
    default: TORCH_CHECK(false, "fused_cuda: unsupported dtype ", t.scalar_type(), " (float32/float16/bfloat16 only)");
  }
  return mk::kFloat32;
}

void check_cuda_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fused_cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "fused_cuda: ", name, " must be contiguous");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fused_cuda: ", op, " launch failed: ", cudaGetErrorString(err));
}

// [b, heads, sq, sk] softmax with an optional bool mask [b, 1 or heads, sq, sk] (true = masked).
// The padding mask of the masked softmax, checked once for forward and backward alike: bool/uint8,
// [b, 1 or heads, sq, sk], contiguous, on x's device. Returns (pointer or nullptr, mask heads).
static std::pair<const uint8_t*, int64_t> mask_arg(const c10::optional<at::Tensor>& mask, int64_t b, int64_t heads,
                                                   int64_t sq, int64_t sk, const at::Tensor& x) {
  if (!mask.has_value()) return {nullptr, 1};
  const at::Tensor& m = *mask;
  check_cuda_contig(m, "mask");
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte, "fused_cuda: mask must be bool");
  TORCH_CHECK(m.dim() == 4 && m.size(0) == b && (m.size(1) == 1 || m.size(1) == heads) && m.size(2) == sq &&
                  m.size(3) == sk,
              "fused_cuda: mask must be [b, 1 or heads, sq, sk] = [", b, ", 1|", heads, ", ", sq, ", ", sk,
              "], got ", m.sizes());
  TORCH_CHECK(m.device() == x.device(), "fused_cuda: mask and x on different devices");
  return {reinterpret_cast<const uint8_t*>(m.data_ptr()), m.size(1)};
}

at::Tensor scaled_masked_softmax_forward(const at::Tensor& x, const c10::optional<at::Tensor>& mask, double scale) {
  check_cuda_contig(x, "x");
  TORCH_CHECK(x.dim() == 4, "fused_cuda: scaled_masked_softmax expects x [b, heads, sq, sk], got ", x.sizes());
  const int64_t b = x.size(0), heads = x.size(1), sq = x.size(2), sk = x.size(3);
  TORCH_CHECK(sk >= 1 && sk <= mk::kSoftmaxMaxKeyLength, "fused_cuda: key length ", sk, " outside [1, ",
              mk::kSoftmaxMaxKeyLength, "]");
  const auto [mptr, mask_heads] = mask_arg(mask, b, heads, sq, sk, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  check_launch(mk::launch_scaled_masked_softmax_forward(
                   x.data_ptr(), mptr, y.data_ptr(), b * heads * sq, static_cast<int>(sk), static_cast<int>(sq),
                   static_cast<int>(heads), static_cast<int>(mask_heads), static_cast<float>(scale), to_dtype(x),
                   c10::cuda::getCurrentCUDAStream().stream()),
               "scaled_masked_softmax_forward");
  return y;
}

at::Tensor scaled_masked_softmax_backward(const at::Tensor& dy, const at::Tensor& y,
                                          const c10::optional<at::Tensor>& mask, double scale) {
  check_cuda_contig(dy, "grad");
  check_cuda_contig(y, "softmax output");
  TORCH_CHECK(y.dim() == 4 && dy.sizes() == y.sizes(), "fused_cuda: grad/output shape mismatch");
  TORCH_CHECK(dy.scalar_type() == y.scalar_type(), "fused_cuda: grad/output dtype mismatch");
  const int64_t b = y.size(0), heads = y.size(1), sq = y.size(2), sk = y.size(3);
  TORCH_CHECK(sk >= 1 && sk <= mk::kSoftmaxMaxKeyLength, "fused_cuda: key length ", sk, " out of range");
  const auto [mptr, mask_heads] = mask_arg(mask, b, heads, sq, sk, y);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  check_launch(mk::launch_scaled_softmax_backward(dy.data_ptr(), y.data_ptr(), mptr, dx.data_ptr(), b * heads * sq,
                                                  static_cast<int>(sk), static_cast<int>(sq), static_cast<int>(heads),
                                                  static_cast<int>(mask_heads), /*causal=*/0,
                                                  static_cast<float>(scale), to_dtype(y),
                                                  c10::cuda::getCurrentCUDAStream().stream()),
               "scaled_masked_softmax_backward");
  return dx;
}

// [..., sq, sk] causal softmax (key c masked when c > query row, top-left aligned).
at::Tensor scaled_causal_softmax_forward(const at::Tensor& x, double scale) {
  check_cuda_contig(x, "x");
  TORCH_CHECK(x.dim() >= 2, "fused_cuda: scaled_causal_softmax expects [..., sq, sk]");
  const int64_t sq = x.size(-2), sk = x.size(-1);
  TORCH_CHECK(sk >= 1 && sk <= mk::kSoftmaxMaxKeyLength, "fused_cuda: key length ", sk, " out of range");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  check_launch(mk::launch_scaled_causal_softmax_forward(x.data_ptr(), y.data_ptr(), x.numel() / sk,
                                                        static_cast<int>(sk), static_cast<int>(sq),
                                                        static_cast<float>(scale), to_dtype(x),
                                                        c10::cuda::getCurrentCUDAStream().stream()),
               "scaled_causal_softmax_forward");
  return y;
}

at::Tensor scaled_causal_softmax_backward(const at::Tensor& dy, const at::Tensor& y, double scale) {
  check_cuda_contig(dy, "grad");
  check_cuda_contig(y, "softmax output");
  TORCH_CHECK(y.dim() >= 2 && dy.sizes() == y.sizes(), "fused_cuda: grad/output shape mismatch");
  TORCH_CHECK(dy.scalar_type() == y.scalar_type(), "fused_cuda: grad/output dtype mismatch");
  const int64_t sq = y.size(-2), sk = y.size(-1);
  TORCH_CHECK(sk >= 1 && sk <= mk::kSoftmaxMaxKeyLength, "fused_cuda: key length ", sk, " out of range");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  check_launch(mk::launch_scaled_softmax_backward(dy.data_ptr(), y.data_ptr(), nullptr, dx.data_ptr(),
                                                  y.numel() / sk, static_cast<int>(sk), static_cast<int>(sq), 1, 1,
                                                  /*causal=*/1, static_cast<float>(scale), to_dtype(y),
                                                  c10::cuda::getCurrentCUDAStream().stream()),
               "scaled_causal_softmax_backward");
  return dx;
}

void check_norm_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_cuda_contig(x, "x");
  check_cuda_contig(weight, "weight");
  TORCH_CHECK(x.dim() >= 1, "fused_cuda: norm input must have a hidden dim");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= mk::kNormMaxHidden, "fused_cuda: hidden size ", hidden, " outside [1, ",
              mk::kNormMaxHidden, "]");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, "fused_cuda: weight must be [", hidden, "]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fused_cuda: weight dtype must equal input dtype");
  TORCH_CHECK(weight.device() == x.device(), "fused_cuda: weight and x on different devices");
  if (bias.has_value()) {
    check_cuda_contig(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == hidden, "fused_cuda: bias must be [", hidden, "]");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "fused_cuda: bias dtype must equal input dtype");
  }
}

// LayerNorm (bias given) or RMSNorm (rms=true, no bias): returns (y, mean, rstd); mean is empty for RMSNorm.
std::vector<at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, double eps, bool rms) {
  check_norm_inputs(x, weight, bias);
  TORCH_CHECK(rms || bias.has_value(), "fused_cuda: layer_norm needs a bias");
  const int64_t hidden = x.size(-1);
  const int64_t rows = x.numel() / hidden;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({rms ? 0 : rows}, f32);
  at::Tensor rstd = at::empty({rows}, f32);
  if (rows == 0) return {y, mean, rstd};
  check_launch(mk::launch_norm_forward(x.data_ptr(), weight.data_ptr(), rms ? nullptr : bias->data_ptr(),
                                       y.data_ptr(), rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                       rows, static_cast<int>(hidden), static_cast<float>(eps), rms ? 1 : 0,
                                       to_dtype(x), c10::cuda::getCurrentCUDAStream().stream()),
               "norm_forward");
  return {y, mean, rstd};
}

// Returns (dx, dweight, dbias); dbias is empty for RMSNorm.
std::vector<at::Tensor> norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& mean, const at::Tensor& rstd, bool rms) {
  check_norm_inputs(x, weight, c10::nullopt);
  check_cuda_contig(dy, "grad");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "fused_cuda: grad must match x");
  const int64_t hidden = x.size(-1);
  const int64_t rows = x.numel() / hidden;
  check_cuda_contig(rstd, "rstd");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows, "fused_cuda: rstd must be fp32 [rows]");
  if (!rms) {
    check_cuda_contig(mean, "mean");
    TORCH_CHECK(mean.scalar_type() == at::kFloat && mean.numel() == rows, "fused_cuda: mean must be fp32 [rows]");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty_like(weight);
  at::Tensor db = rms ? at::empty({0}, weight.options()) : at::empty_like(weight);
  if (rows == 0) {
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  const int chunks = mk::norm_backward_chunks(rows);
  at::Tensor ws = at::empty({2 * static_cast<int64_t>(chunks) * hidden}, x.options().dtype(at::kFloat));
  check_launch(mk::launch_norm_backward(dy.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                        rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                        dx.data_ptr(), dw.data_ptr(), rms ? nullptr : db.data_ptr(),
                                        ws.data_ptr<float>(), rows, static_cast<int>(hidden), rms ? 1 : 0,
                                        to_dtype(x), c10::cuda::getCurrentCUDAStream().stream()),
               "norm_backward");
  return {dx, dw, db};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megazero fused CUDA kernels: scaled masked / causal softmax, LayerNorm, RMSNorm";
  m.attr("SOFTMAX_MAX_KEY_LENGTH") = mk::kSoftmaxMaxKeyLength;
  m.attr("SOFTMAX_MASKED_VALUE") = mk::kSoftmaxMaskedValue;
  m.attr("NORM_MAX_HIDDEN") = mk::kNormMaxHidden;
  m.def("scaled_masked_softmax_forward", &scaled_masked_softmax_forward, "x, mask|None, scale -> y",
        py::arg("x"), py::arg("mask"), py::arg("scale"));
  m.def("scaled_masked_softmax_backward", &scaled_masked_softmax_backward, "grad, y, mask|None, scale -> dx",
        py::arg("grad"), py::arg("y"), py::arg("mask"), py::arg("scale"));
  m.def("scaled_causal_softmax_forward", &scaled_causal_softmax_forward, "x, scale -> y", py::arg("x"),
        py::arg("scale"));
  m.def("scaled_causal_softmax_backward", &scaled_causal_softmax_backward, "grad, y, scale -> dx",
        py::arg("grad"), py::arg("y"), py::arg("scale"));
  m.def("norm_forward", &norm_forward, "x, weight, bias|None, eps, rms -> (y, mean, rstd)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"));
  m.def("norm_backward", &norm_backward, "grad, x, weight, mean, rstd, rms -> (dx, dweight, dbias)",
        py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("rms"));
}
