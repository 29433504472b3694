// CUDA implementations of vitfast::layer_norm_fwd and vitfast::layer_norm_bwd (schemas in csrc/ops.cpp):
// checks at the boundary, device guard and current stream, allocation of the outputs and of the fp32
// partial buffer of the two-stage dweight/dbias reduction, and dispatch to the launchers of
// kernels/layer_norm.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "layer_norm.cuh"

namespace {

constexpr const char* kFwdName = "vitfast::layer_norm_fwd (CUDA)";
constexpr const char* kBwdName = "vitfast::layer_norm_bwd (CUDA)";

// The ATen scalar type with the same bits as the CUDA type T.
template <typename T>
struct AtenScalar;
template <>
struct AtenScalar<float> {
  using type = float;
};
template <>
struct AtenScalar<__half> {
  using type = at::Half;
};
template <>
struct AtenScalar<__nv_bfloat16> {
  using type = at::BFloat16;
};

template <typename T>
const T* const_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr<typename AtenScalar<T>::type>()) : nullptr;
}

template <typename T>
T* mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr<typename AtenScalar<T>::type>());
}

void check_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (M, N), got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(t.size(1) <= vitfast::kLayerNormMaxN, op, ": hidden size N must be at most ",
              vitfast::kLayerNormMaxN, ", got ", name, " of shape ", t.sizes());
}

// `t` must have shape `shape` and the dtype and device of `ref` (named ref_name).
void check_like(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == ref.scalar_type() && t.device() == ref.device(), op, ": ",
              name, " must have shape ", shape, ", dtype ", ref.scalar_type(), " and device ", ref.device(),
              " (those of ", ref_name, "), got shape ", t.sizes(), ", dtype ", t.scalar_type(), ", device ",
              t.device());
}

void check_stats(const char* name, const at::Tensor& t, const at::Tensor& s) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == s.size(0) && t.scalar_type() == at::kFloat && t.device() == s.device(),
              kBwdName, ": ", name, " must have shape [", s.size(0), "], dtype float32 and device ", s.device(),
              " (one per row of s of shape ", s.sizes(), "), got shape ", t.sizes(), ", dtype ", t.scalar_type(),
              ", device ", t.device());
}

// The kernels take any row stride but need unit inner stride.
at::Tensor unit_inner_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

template <typename T>
cudaError_t launch_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& residual, at::Tensor& y, at::Tensor& s, at::Tensor& mean, at::Tensor& rstd,
                       float eps, cudaStream_t stream) {
  return vitfast::layer_norm_fwd<T>(const_ptr<T>(x), x.stride(0), const_ptr<T>(residual),
                                    residual.defined() ? residual.stride(0) : 0, const_ptr<T>(weight),
                                    const_ptr<T>(bias), mutable_ptr<T>(y),
                                    residual.defined() ? mutable_ptr<T>(s) : nullptr, mean.mutable_data_ptr<float>(),
                                    rstd.mutable_data_ptr<float>(), x.size(0), x.size(1), eps, stream);
}

template <typename T>
cudaError_t launch_bwd(const at::Tensor& dy, const at::Tensor& ds, const at::Tensor& s, const at::Tensor& weight,
                       const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& partial,
                       at::Tensor& dweight, at::Tensor& dbias, bool has_bias, int64_t num_blocks,
                       cudaStream_t stream) {
  const int64_t N = s.size(1);
  const bool has_dweight = weight.defined();
  float* partials = partial.defined() ? partial.mutable_data_ptr<float>() : nullptr;
  return vitfast::layer_norm_bwd<T>(
      const_ptr<T>(dy), dy.stride(0), const_ptr<T>(ds), ds.defined() ? ds.stride(0) : 0, const_ptr<T>(s),
      s.stride(0), const_ptr<T>(weight), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
      mutable_ptr<T>(dx), has_dweight ? partials : nullptr,
      has_bias ? partials + (has_dweight ? num_blocks * N : 0) : nullptr,
      has_dweight ? mutable_ptr<T>(dweight) : nullptr, has_bias ? mutable_ptr<T>(dbias) : nullptr, s.size(0), N,
      num_blocks, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& residual_in, double eps) {
  check_input(kFwdName, "x", x_in);
  const int64_t M = x_in.size(0);
  const int64_t N = x_in.size(1);
  if (weight_in.has_value()) check_like(kFwdName, "weight", *weight_in, {N}, x_in, "x");
  if (bias_in.has_value()) check_like(kFwdName, "bias", *bias_in, {N}, x_in, "x");
  if (residual_in.has_value()) check_like(kFwdName, "residual", *residual_in, x_in.sizes(), x_in, "x");

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_inner_stride(x_in);
  const at::Tensor residual = residual_in.has_value() ? unit_inner_stride(*residual_in) : at::Tensor();
  const at::Tensor weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();

  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor s = residual.defined() ? at::empty({M, N}, x.options()) : x.new_empty({0});
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) {
    // The mean and variance of an empty row are undefined, as in the PyTorch reference.
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, s, mean, rstd};
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float eps_f = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat:
      C10_CUDA_CHECK(launch_fwd<float>(x, weight, bias, residual, y, s, mean, rstd, eps_f, stream));
      break;
    case at::kHalf:
      C10_CUDA_CHECK(launch_fwd<__half>(x, weight, bias, residual, y, s, mean, rstd, eps_f, stream));
      break;
    case at::kBFloat16:
      C10_CUDA_CHECK(launch_fwd<__nv_bfloat16>(x, weight, bias, residual, y, s, mean, rstd, eps_f, stream));
      break;
    default:
      TORCH_CHECK(false, kFwdName, ": unsupported dtype ", x.scalar_type());
  }
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy_in, const std::optional<at::Tensor>& ds_in, const at::Tensor& s_in,
    const std::optional<at::Tensor>& weight_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    bool has_bias) {
  check_input(kBwdName, "s", s_in);
  const int64_t M = s_in.size(0);
  const int64_t N = s_in.size(1);
  check_like(kBwdName, "dy", dy_in, s_in.sizes(), s_in, "s");
  if (ds_in.has_value()) check_like(kBwdName, "ds", *ds_in, s_in.sizes(), s_in, "s");
  if (weight_in.has_value()) check_like(kBwdName, "weight", *weight_in, {N}, s_in, "s");
  check_stats("mean", mean_in, s_in);
  check_stats("rstd", rstd_in, s_in);

  const c10::cuda::CUDAGuard guard(s_in.device());
  const at::Tensor s = unit_inner_stride(s_in);
  const at::Tensor dy = unit_inner_stride(dy_in);
  const at::Tensor ds = ds_in.has_value() ? unit_inner_stride(*ds_in) : at::Tensor();
  const at::Tensor weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();

  // dweight has weight's dtype, dbias weight's dtype if there is one, else s's: both are s's dtype here.
  at::Tensor dx = at::empty({M, N}, s.options());
  at::Tensor dweight = at::empty({weight.defined() ? N : 0}, s.options());
  at::Tensor dbias = at::empty({has_bias ? N : 0}, s.options());
  if (M == 0 || N == 0) {
    dweight.zero_();  // a sum over no rows
    dbias.zero_();
    return {dx, dweight, dbias};
  }

  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t num_blocks = vitfast::layer_norm_bwd_num_blocks(M, N, num_sms);
  // (num_blocks, N) of dweight partials, then (num_blocks, N) of dbias partials, for those requested.
  const int64_t num_partial_sets = (weight.defined() ? 1 : 0) + (has_bias ? 1 : 0);
  at::Tensor partial = num_partial_sets > 0
                           ? at::empty({num_partial_sets * num_blocks, N}, s.options().dtype(at::kFloat))
                           : at::Tensor();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (s.scalar_type()) {
    case at::kFloat:
      C10_CUDA_CHECK(launch_bwd<float>(dy, ds, s, weight, mean, rstd, dx, partial, dweight, dbias, has_bias,
                                       num_blocks, stream));
      break;
    case at::kHalf:
      C10_CUDA_CHECK(launch_bwd<__half>(dy, ds, s, weight, mean, rstd, dx, partial, dweight, dbias, has_bias,
                                        num_blocks, stream));
      break;
    case at::kBFloat16:
      C10_CUDA_CHECK(launch_bwd<__nv_bfloat16>(dy, ds, s, weight, mean, rstd, dx, partial, dweight, dbias,
                                               has_bias, num_blocks, stream));
      break;
    default:
      TORCH_CHECK(false, kBwdName, ": unsupported dtype ", s.scalar_type());
  }
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}
