// Linear + bias + GELU on the CPU: y = GELU(x @ weight^T + bias), GELU(h) = h * Phi(h) (Hendrycks & Gimpel 2016,
// arXiv:1606.08415), exact (erf) or with the tanh approximation, as F.gelu. Schema and semantics are those of
// vitfast/ops/linear_gelu.py.
//
// The GEMM is ATen's (at::mm: MKL / oneDNN), without the bias for fp32 / fp64: at::addmm would first copy the
// broadcast bias into its output (fp16 / bf16 keep addmm, which rounds h once, as F.linear). What vitfast fuses is
// the epilogue: one pass over the GEMM's output, in place, adds the bias and applies GELU, where ATen runs a bias
// copy before the GEMM and a separate GELU pass that allocates its own output (at batch 8, Swin-T's first-stage fc1
// output is 38.5 MB: above glibc's largest mmap threshold, so each fresh tensor of that size is mapped and
// page-faulted anew). With save_preact (autograd needs h = x W^T + b), the pass writes h in place and GELU(h) to a
// new tensor.
//
// fp32 has an 8-lane AVX + FMA version (erf by Abramowitz & Stegun 7.1.26, as ATen's vectorized CPU erf, with
// exp8 of exp_op.h; for h < 0, 1 + erf(h / sqrt 2) is formed as the erfc term itself, without cancellation); the
// tanh form is computed as h * sigmoid(2u), from exp(-2|u|), which cannot overflow. Other dtypes, and fp32 without
// AVX + FMA, take a scalar loop in op-math precision with std::erf / std::tanh.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "exp_op.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

namespace vitfast {
namespace {

constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kSqrtTwoOverPi = 0.79788456080286535588;
constexpr double kTanhCubic = 0.044715;

template <typename A>
C10_ALWAYS_INLINE A gelu_scalar(A h, bool tanh) {
  if (tanh) {
    const A u = A(kSqrtTwoOverPi) * (h + A(kTanhCubic) * h * h * h);
    return A(0.5) * h * (A(1) + std::tanh(u));
  }
  return A(0.5) * h * (A(1) + std::erf(h * A(kSqrtHalf)));
}

#if VITFAST_EXP_AVX
__attribute__((target("avx,fma"))) inline __m256 gelu8(__m256 h, bool tanh) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  if (tanh) {  // 0.5 h (1 + tanh u) = h sigmoid(2u), from e = exp(-2|u|) (no overflow): h / (1 + e) or h e / (1 + e)
    const __m256 h2 = _mm256_mul_ps(h, h);
    const __m256 u = _mm256_mul_ps(_mm256_mul_ps(h, _mm256_set1_ps(float(kSqrtTwoOverPi))),
                                   _mm256_fmadd_ps(h2, _mm256_set1_ps(float(kTanhCubic)), one));
    const __m256 e = exp8(_mm256_mul_ps(_mm256_andnot_ps(sign, u), _mm256_set1_ps(-2.0f)));
    const __m256 negative = _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 num = _mm256_or_ps(_mm256_and_ps(negative, e), _mm256_andnot_ps(negative, one));
    return _mm256_div_ps(_mm256_mul_ps(h, num), _mm256_add_ps(one, e));
  }
  // z = h / sqrt 2; erfc(|z|) ~ t (a1 + a2 t + ... + a5 t^4) exp(-z^2), t = 1 / (1 + p |z|) (A&S 7.1.26);
  // 1 + erf(z) is erfc(|z|) for z < 0 and 2 - erfc(|z|) otherwise.
  const __m256 z = _mm256_mul_ps(h, _mm256_set1_ps(float(kSqrtHalf)));
  const __m256 az = _mm256_andnot_ps(sign, z);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), az, one));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  const __m256 erfc = _mm256_mul_ps(_mm256_mul_ps(p, t), exp8(_mm256_xor_ps(sign, _mm256_mul_ps(z, z))));
  const __m256 negative = _mm256_cmp_ps(h, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 phi2 = _mm256_or_ps(_mm256_and_ps(negative, erfc),
                                   _mm256_andnot_ps(negative, _mm256_sub_ps(_mm256_set1_ps(2.0f), erfc)));
  return _mm256_mul_ps(_mm256_mul_ps(h, _mm256_set1_ps(0.5f)), phi2);
}

// One row: h += bias, then y = GELU(h) (y may be h).
__attribute__((target("avx,fma"))) void bias_gelu_row_avx(float* h, const float* bias, float* y, int64_t N,
                                                          bool tanh, bool save_preact) {
  int64_t j = 0;
  for (; j + 8 <= N; j += 8) {
    __m256 v = _mm256_loadu_ps(h + j);
    if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    if (save_preact) _mm256_storeu_ps(h + j, v);
    _mm256_storeu_ps(y + j, gelu8(v, tanh));
  }
  for (; j < N; ++j) {
    const float v = bias != nullptr ? h[j] + bias[j] : h[j];
    if (save_preact) h[j] = v;
    y[j] = gelu_scalar(v, tanh);
  }
}
#endif

template <typename T>
void bias_gelu_row(T* h, const T* bias, T* y, int64_t N, bool tanh, bool save_preact) {
  using A = at::opmath_type<T>;
  for (int64_t j = 0; j < N; ++j) {
    const A v = bias != nullptr ? A(h[j]) + A(bias[j]) : A(h[j]);
    if (save_preact) h[j] = T(v);
    y[j] = T(gelu_scalar(v, tanh));
  }
}

// Rows of h (M, N): h += bias, y = GELU(h), in parallel over rows.
template <typename T>
void bias_gelu_rows(T* h, const T* bias, T* y, int64_t M, int64_t N, bool tanh, bool save_preact) {
  const int64_t grain = std::max<int64_t>(1, 32768 / N);
#if VITFAST_EXP_AVX
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx_fma()) {
      at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) bias_gelu_row_avx(h + m * N, bias, y + m * N, N, tanh, save_preact);
      });
      return;
    }
  }
#endif
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) bias_gelu_row(h + m * N, bias, y + m * N, N, tanh, save_preact);
  });
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias,
                                                    c10::string_view approximate, bool save_preact) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "vitfast::linear_gelu_fwd: x (M, K) and weight (N, K) must share K, got x ", x.sizes(), " and weight ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && (!bias || bias->scalar_type() == x.scalar_type()),
              "vitfast::linear_gelu_fwd: x, weight and bias must share one dtype, got ", x.scalar_type(), ", ",
              weight.scalar_type(), (bias ? ", " + std::string(c10::toString(bias->scalar_type())) : ""));
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "vitfast::linear_gelu_fwd: bias must be (N,) = (", weight.size(0), ",), got ", bias->sizes());
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "vitfast::linear_gelu_fwd: approximate must be 'none' or 'tanh', got '", approximate, "'");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && (!bias || bias->device().is_cpu()),
              "vitfast::linear_gelu_fwd: CPU tensors expected, got x on ", x.device(), ", weight on ",
              weight.device());
  const bool tanh = approximate == "tanh";
  // fp16 / bf16: the bias inside the GEMM (addmm), so that h is rounded once, as F.linear rounds it.
  const bool fuse_bias = bias && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
  at::Tensor h = bias && !fuse_bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());  // contiguous
  at::Tensor y = save_preact ? at::empty_like(h) : h;
  at::Tensor b = fuse_bias ? bias->contiguous() : at::Tensor();
  const int64_t M = h.size(0), N = h.size(1);
  if (h.numel() == 0) return {y, save_preact ? h : at::empty({0}, h.options())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "linear_gelu_fwd", [&] {
    bias_gelu_rows<scalar_t>(h.data_ptr<scalar_t>(), fuse_bias ? b.data_ptr<scalar_t>() : nullptr,
                             y.data_ptr<scalar_t>(), M, N, tanh, save_preact);
  });
  return {y, save_preact ? h : at::empty({0}, h.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) { m.impl("linear_gelu_fwd", &linear_gelu_fwd); }

}  // namespace vitfast
