// One-pass CPU Adam/AdamW for ZeRO optimizer offload (see docs/kernels.md, "CPU Adam").
//
// Per element, in one memory pass over flat contiguous tensors: read grad (fp32 or bf16), fp32 master
// param, exp_avg, exp_avg_sq; g = grad * grad_scale (grad_scale = clip_coeff / loss_scale); AdamW
// (decoupled decay applied first, torch.optim.AdamW's order) or Adam with L2 (g += wd * p,
// torch.optim.Adam); bias correction from the step count; write param, moments and optionally a
// bf16/fp16 copy of the new param. Returns whether any scaled grad element was non-finite.
//
// Contract on non-finite gradients: the step still writes (a second pass to undo it would double the
// traffic), so the affected elements are NaN/inf afterwards. Callers that need skip-on-overflow check
// first: megazero's ZeRO optimizer already skips the step when the grad-norm sums are non-finite, and
// `nonfinite()` below is a read-only pre-pass (4 of the step's 30 bytes per element) for callers that
// have no norm. The returned flag is a safety net.
//
// ISA: the element loop (cpu_adam_impl.h) is compiled three times, for AVX-512, AVX2+FMA and generic
// x86-64 (or once, generic, on other architectures), and the variant is chosen at runtime from
// __builtin_cpu_supports, so one binary built at install time is correct and fast on any x86 CPU.
// MEGATRON_KERNELS_CPU_ISA=avx512|avx512-autovec|avx2|generic forces a variant (benchmarks, tests);
// "avx512" is the hand-written intrinsics body (cpu_adam_avx512.h), "avx512-autovec" gcc's loop.
//
// Square root: torch's CPU float sqrt is not always IEEE. With MKL (the x86 wheels) torch.sqrt is MKL
// VML's vmsSqrt in HA mode, which on CPUs MKL does not dispatch to its Intel code paths (AMD EPYC:
// "Intel(R) Architecture processors" in MKL_VERBOSE) is off by 1 ulp on ~16% of inputs. torch.optim.AdamW
// takes exp_avg_sq.sqrt() from it, so a kernel using the hardware sqrt differs there in ~4% of the
// parameters per step (and, in bf16 models, flips a bf16 rounding now and then). set_sqrt_mode("torch")
// (the default until the Python side has probed torch.sqrt, see cpu_adam.py) therefore runs the step in
// two passes per 8 K-element block around at::sqrt_out, torch's own sqrt; "ieee" keeps the one-pass loop
// with the hardware sqrt, used where torch.sqrt is IEEE (the probe found no difference).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

struct MzAdamScalars {
  float decay;        // 1 - lr*wd (AdamW) or 1 (Adam / L2)
  float l2;           // wd (Adam / L2 mode) or 0
  float grad_scale;   // clip_coeff / loss_scale
  float w1;           // 1 - beta1, torch's lerp weight
  float beta2;
  float one_minus_b2;
  float bc2_sqrt;     // sqrt(1 - beta2^t)
  float eps;
  float neg_step;     // -lr / (1 - beta1^t)
};

#if defined(__x86_64__) && defined(__GNUC__)
#define MZ_X86 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define MZ_FMA(a, b, c) __builtin_fmaf(a, b, c)
namespace isa_avx512 {
#include "cpu_adam_impl.h"
#include "cpu_adam_avx512.h"
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#include "cpu_adam_impl.h"
}
#pragma GCC pop_options
#undef MZ_FMA
#endif
#define MZ_FMA(a, b, c) ((a) * (b) + (c))
namespace isa_generic {
#include "cpu_adam_impl.h"
}

namespace {

using AdamFn = float (*)(float*, const void*, float*, float*, uint16_t*, int64_t,
                         MzAdamScalars, bool);
using CheckFn = float (*)(const void*, int64_t, float);
using MomentsFn = float (*)(const float*, const void*, float*, float*, int64_t, MzAdamScalars, bool);
using ApplyFn = void (*)(float*, const float*, const float*, uint16_t*, int64_t, MzAdamScalars);

struct Table {
  const char* name;
  AdamFn adam[2][3];  // [grad bf16?][out none/bf16/fp16]
  CheckFn check[2];
  MomentsFn moments[2];  // sqrt mode "torch": the step's first half, [grad bf16?]
  ApplyFn apply[3];      // and its second half, [out none/bf16/fp16]
};

#define MZ_TABLE(NS, NAME)                                                              \
  Table {                                                                               \
    NAME,                                                                               \
        {{NS::adam_f32_none, NS::adam_f32_bf16, \
          NS::adam_f32_fp16},                                  \
         {NS::adam_bf16_none, NS::adam_bf16_bf16, \
          NS::adam_bf16_fp16}},                                \
        {NS::nonfinite_f32, NS::nonfinite_bf16},                                         \
        {NS::moments_f32, NS::moments_bf16},                                             \
        {NS::apply_none, NS::apply_bf16, NS::apply_fp16}                                 \
  }

static Table pick_table() {
  const char* force = std::getenv("MEGATRON_KERNELS_CPU_ISA");
  std::string f = force ? force : "";
#ifdef MZ_X86
  __builtin_cpu_init();
  bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
              __builtin_cpu_supports("f16c");
  if (f == "generic") return MZ_TABLE(isa_generic, "generic");
  if (f == "avx2" && has2) return MZ_TABLE(isa_avx2, "avx2");
  if (f == "avx512-autovec" && has512) return MZ_TABLE(isa_avx512, "avx512-autovec");
  if ((f.empty() || f == "avx512") && has512) {
    Table t = MZ_TABLE(isa_avx512, "avx512");  // hand-written intrinsics body (cpu_adam_avx512.h)
    AdamFn simd[2][3] = {{isa_avx512::adam_avx512_f32_none, isa_avx512::adam_avx512_f32_bf16,
                          isa_avx512::adam_avx512_f32_fp16},
                         {isa_avx512::adam_avx512_bf16_none, isa_avx512::adam_avx512_bf16_bf16,
                          isa_avx512::adam_avx512_bf16_fp16}};
    std::memcpy(t.adam, simd, sizeof(simd));
    return t;
  }
  if (has2) return MZ_TABLE(isa_avx2, "avx2");
#endif
  return MZ_TABLE(isa_generic, "generic");
}

const Table& table() {
  static const Table t = pick_table();
  return t;
}

constexpr int64_t kGrain = 1 << 15;  // elements per task: 32 K x 30 B ~ 1 MB, well above fork cost
constexpr int64_t kSqrtBlock = 1 << 13;  // sqrt mode torch: 8 K elements (32 KB per array) per at::sqrt_out

// true: the square root is torch's own (at::sqrt_out), so the step equals torch.optim.AdamW bit for bit
// whatever torch.sqrt is on this machine; false: the hardware (IEEE) sqrt in the one-pass loop.
std::atomic<bool> g_torch_sqrt{true};

void check_flat(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == n, name, " has ", t.numel(), " elements, expected ", n);
}

int grad_kind(const at::Tensor& g) {
  if (g.scalar_type() == at::kFloat) return 0;
  if (g.scalar_type() == at::kBFloat16) return 1;
  TORCH_CHECK(false, "grad must be float32 or bfloat16, got ", g.scalar_type());
}

bool adam_step(at::Tensor param, at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
               c10::optional<at::Tensor> low, int64_t step, double lr, double beta1, double beta2,
               double eps, double weight_decay, double grad_scale, bool adamw) {
  const int64_t n = param.numel();
  TORCH_CHECK(param.scalar_type() == at::kFloat, "param must be float32 (the master weights)");
  TORCH_CHECK(exp_avg.scalar_type() == at::kFloat && exp_avg_sq.scalar_type() == at::kFloat,
              "exp_avg and exp_avg_sq must be float32");
  TORCH_CHECK(step >= 1, "step must be >= 1 (the count after this update), got ", step);
  check_flat(param, "param", n);
  check_flat(grad, "grad", n);
  check_flat(exp_avg, "exp_avg", n);
  check_flat(exp_avg_sq, "exp_avg_sq", n);
  int out = 0;
  uint16_t* o = nullptr;
  if (low.has_value() && low->defined()) {
    check_flat(*low, "low_precision_out", n);
    if (low->scalar_type() == at::kBFloat16) out = 1;
    else if (low->scalar_type() == at::kHalf) out = 2;
    else TORCH_CHECK(false, "low_precision_out must be bfloat16 or float16");
    o = reinterpret_cast<uint16_t*>(low->data_ptr());
  }
  const int gk = grad_kind(grad);
  // Scalars in double, then rounded to float: the same values torch.optim.AdamW hands its kernels.
  MzAdamScalars s;
  s.decay = adamw ? static_cast<float>(1.0 - lr * weight_decay) : 1.f;
  s.l2 = adamw ? 0.f : static_cast<float>(weight_decay);
  s.grad_scale = static_cast<float>(grad_scale);
  s.w1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_b2 = static_cast<float>(1.0 - beta2);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(eps);
  s.neg_step = static_cast<float>(-(lr / bc1));
  const bool lerp_low = std::abs(s.w1) < 0.5f;

  AdamFn fn = table().adam[gk][out];
  float* p = param.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const char* g = static_cast<const char*>(grad.data_ptr());
  const int64_t gsize = grad.element_size();
  std::atomic<bool> bad{false};
  if (!g_torch_sqrt.load(std::memory_order_relaxed)) {
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      float r = fn(p + b, g + b * gsize, m + b, v + b, o ? o + b : nullptr, e - b, s, lerp_low);
      if (r != r) bad.store(true, std::memory_order_relaxed);
    });
    return bad.load();
  }
  // Two passes per block (the block stays in L1/L2): moments, torch's sqrt of exp_avg_sq, parameter.
  MomentsFn moments = table().moments[gk];
  ApplyFn apply = table().apply[out];
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    std::unique_ptr<float[]> sq(new float[kSqrtBlock]);
    float r = 0.f;
    for (int64_t i = b; i < e; i += kSqrtBlock) {
      const int64_t k = std::min(kSqrtBlock, e - i);
      r += moments(p + i, g + i * gsize, m + i, v + i, k, s, lerp_low);
      at::Tensor sq_t = at::from_blob(sq.get(), {k}, opts);
      at::sqrt_out(sq_t, at::from_blob(v + i, {k}, opts));  // nested in parallel_for: runs inline
      apply(p + i, m + i, sq.get(), o ? o + i : nullptr, k, s);
    }
    if (r != r) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

void set_sqrt_mode(const std::string& mode) {
  TORCH_CHECK(mode == "torch" || mode == "ieee", "sqrt mode must be 'torch' or 'ieee', got '", mode, "'");
  g_torch_sqrt.store(mode == "torch");
}

std::string sqrt_mode() { return g_torch_sqrt.load() ? "torch" : "ieee"; }

bool nonfinite(at::Tensor grad, double grad_scale) {
  TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous(), "grad must be a contiguous CPU tensor");
  CheckFn fn = table().check[grad_kind(grad)];
  const char* g = static_cast<const char*>(grad.data_ptr());
  const int64_t gsize = grad.element_size();
  const float scale = static_cast<float>(grad_scale);
  std::atomic<bool> bad{false};
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t b, int64_t e) {
    float r = fn(g + b * gsize, e - b, scale);
    if (r != r) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

std::string isa() { return table().name; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "megatron_kernels one-pass CPU Adam (see docs/kernels.md)";
  mod.def("adam_step", &adam_step, "one-pass Adam/AdamW step; returns True if a grad was non-finite",
          py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
          py::arg("low_precision_out"), py::arg("step"), py::arg("lr"), py::arg("beta1"),
          py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("grad_scale"),
          py::arg("adamw"), py::call_guard<py::gil_scoped_release>());
  mod.def("nonfinite", &nonfinite, "read-only check: any non-finite grad*grad_scale",
          py::arg("grad"), py::arg("grad_scale") = 1.0, py::call_guard<py::gil_scoped_release>());
  mod.def("isa", &isa, "the ISA variant chosen at runtime: avx512, avx2 or generic");
  mod.def("set_sqrt_mode", &set_sqrt_mode,
          "'torch': exp_avg_sq's sqrt through at::sqrt_out (bit-exact with torch.optim.AdamW on any CPU); "
          "'ieee': the hardware sqrt in one pass (equal where torch.sqrt is IEEE)", py::arg("mode"));
  mod.def("sqrt_mode", &sqrt_mode, "the square root in use: 'torch' or 'ieee'");
}
