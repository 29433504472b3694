// Fused residual-add + LayerNorm, forward and backward, on the CPU.
//
// LayerNorm (Ba, Kiros, Hinton 2016, arXiv:1607.06450) over the last dim of a (M, N) view, with the
// pre-norm residual pattern: s = x + residual is stored (rounded to the input dtype, as `x + residual`
// would be) and normalized. Forward: at::parallel_for over rows; each row is read once into L1 (as
// op-math values) and its mean and variance are taken in two passes over that cached row, which stays
// accurate for rows with a large mean, unlike a one-pass sum of squares. Backward: dx per row, and
// dweight/dbias by a two-stage reduction: each chunk of rows accumulates op-math column partials into
// one row of a (num_chunks, N) buffer, which a second loop sums in a fixed order. The chunk count
// depends only on M and the thread count, so the result is deterministic for a given thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace vitfast {
namespace {

// Returns t itself when its rows have unit inner stride (any row stride), else a contiguous copy.
at::Tensor unit_inner_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

void check_like_rows(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "vitfast layer_norm: ", name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "vitfast layer_norm: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "vitfast layer_norm: ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

void check_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), "vitfast layer_norm: ", name, " must have shape (",
              x.size(1), ",) to match x ", x.sizes(), ", got ", p->sizes());
  TORCH_CHECK(p->scalar_type() == x.scalar_type(), "vitfast layer_norm: ", name, " must have the dtype of x (",
              x.scalar_type(), "), got ", p->scalar_type());
  TORCH_CHECK(p->device() == x.device(), "vitfast layer_norm: ", name, " must be on the device of x (", x.device(),
              "), got ", p->device());
}

void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "vitfast ", op, ": ",
              name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

void check_stat(const at::Tensor& stat, const at::Tensor& s, const char* name) {
  const auto stat_dtype = at::toOpMathType(s.scalar_type());
  TORCH_CHECK(stat.dim() == 1 && stat.size(0) == s.size(0), "vitfast layer_norm_bwd: ", name, " must have shape (",
              s.size(0), ",) to match s ", s.sizes(), ", got ", stat.sizes());
  TORCH_CHECK(stat.scalar_type() == stat_dtype, "vitfast layer_norm_bwd: ", name, " must be ", stat_dtype,
              " for s of dtype ", s.scalar_type(), ", got ", stat.scalar_type());
  TORCH_CHECK(stat.device() == s.device(), "vitfast layer_norm_bwd: ", name, " must be on the device of s (",
              s.device(), "), got ", stat.device());
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Rows per parallel task: enough elements per task to amortize the thread hand-off.
int64_t row_grain(int64_t N) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(N, 1)); }

// A (N,) parameter as op-math values: the tensor's own data when scalar_t is already the op-math type,
// else a converted copy (done once, not once per row).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
const opmath_t* param_as_opmath(const at::Tensor& p, std::vector<opmath_t>& storage) {
  if (!p.defined()) return nullptr;
  const scalar_t* src = p.const_data_ptr<scalar_t>();
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return src;
  } else {
    storage.resize(p.numel());
    for (int64_t j = 0; j < p.numel(); ++j) storage[j] = static_cast<opmath_t>(src[j]);
    return storage.data();
  }
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void layer_norm_fwd_kernel(const scalar_t* x,  // (M, N), row stride x_stride
                           int64_t x_stride,
                           const scalar_t* r,  // (M, N) residual, row stride r_stride, or nullptr
                           int64_t r_stride,
                           const opmath_t* w,  // (N,) or nullptr
                           const opmath_t* b,  // (N,) or nullptr
                           scalar_t* y,        // (M, N) out, contiguous
                           scalar_t* s,        // (M, N) out, contiguous: x + residual (unused without r)
                           opmath_t* mean,     // (M,) out
                           opmath_t* rstd,     // (M,) out
                           int64_t M,
                           int64_t N,
                           opmath_t eps) {
  constexpr bool kSameType = std::is_same_v<scalar_t, opmath_t>;
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> row_buf(kSameType ? 0 : N);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xi = x + i * x_stride;
      scalar_t* yi = y + i * N;
      const opmath_t* v;  // the row being normalized, as op-math values
      if (r != nullptr) {
        const scalar_t* ri = r + i * r_stride;
        scalar_t* si = s + i * N;
        if constexpr (kSameType) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) si[j] = xi[j] + ri[j];
          v = si;
        } else {
          opmath_t* buf = row_buf.data();
          for (int64_t j = 0; j < N; ++j) {
            const scalar_t sj = static_cast<scalar_t>(static_cast<opmath_t>(xi[j]) + static_cast<opmath_t>(ri[j]));
            si[j] = sj;
            buf[j] = static_cast<opmath_t>(sj);
          }
          v = buf;
        }
      } else if constexpr (kSameType) {
        v = xi;
      } else {
        opmath_t* buf = row_buf.data();
        for (int64_t j = 0; j < N; ++j) buf[j] = static_cast<opmath_t>(xi[j]);
        v = buf;
      }

      // Corrected two-pass algorithm (Chan, Golub, LeVeque 1983): the second pass also sums the
      // deviations from the first-pass mean, whose rounding error is relative to the spread of the row
      // rather than to its mean, and uses that sum to correct both the mean and the variance.
      opmath_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < N; ++j) sum += v[j];
      const opmath_t inv_n = N > 0 ? opmath_t(1) / static_cast<opmath_t>(N) : opmath_t(0);
      const opmath_t mu0 = sum * inv_n;
      opmath_t dev = 0;
      opmath_t sq = 0;
#pragma omp simd reduction(+ : dev, sq)
      for (int64_t j = 0; j < N; ++j) {
        const opmath_t d = v[j] - mu0;
        dev += d;
        sq += d * d;
      }
      const opmath_t mu = mu0 + dev * inv_n;
      const opmath_t var = std::max(opmath_t(0), (sq - dev * dev * inv_n) * inv_n);
      const opmath_t rs = opmath_t(1) / std::sqrt(var + eps);
      mean[i] = mu;
      rstd[i] = rs;

      // Four loops rather than per-element branches, so that each one vectorizes.
      if (w != nullptr && b != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) yi[j] = static_cast<scalar_t>((v[j] - mu) * rs * w[j] + b[j]);
      } else if (w != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) yi[j] = static_cast<scalar_t>((v[j] - mu) * rs * w[j]);
      } else if (b != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) yi[j] = static_cast<scalar_t>((v[j] - mu) * rs + b[j]);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) yi[j] = static_cast<scalar_t>((v[j] - mu) * rs);
      }
    }
  });
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void layer_norm_bwd_kernel(const scalar_t* dy,  // (M, N), row stride dy_stride
                           int64_t dy_stride,
                           const scalar_t* ds,  // (M, N), row stride ds_stride, or nullptr
                           int64_t ds_stride,
                           const scalar_t* s,  // (M, N), row stride s_stride
                           int64_t s_stride,
                           const opmath_t* w,     // (N,) or nullptr
                           const opmath_t* mean,  // (M,)
                           const opmath_t* rstd,  // (M,)
                           scalar_t* dx,          // (M, N) out, contiguous
                           opmath_t* dw_part,     // (num_chunks, N) out: column partials of dy*xhat (nullptr iff w is)
                           opmath_t* db_part,     // (num_chunks, N) out, or nullptr: column partials of dy
                           int64_t M,
                           int64_t N,
                           int64_t num_chunks) {
  constexpr bool kSameType = std::is_same_v<scalar_t, opmath_t>;
  const int64_t rows_per_chunk = (M + num_chunks - 1) / num_chunks;
  const opmath_t inv_n = opmath_t(1) / static_cast<opmath_t>(N);
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<opmath_t> s_buf(kSameType ? 0 : N);
    std::vector<opmath_t> dy_buf(kSameType ? 0 : N);
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      opmath_t* dwp = w != nullptr ? dw_part + c * N : nullptr;
      opmath_t* dbp = db_part != nullptr ? db_part + c * N : nullptr;
      if (dwp != nullptr) std::fill(dwp, dwp + N, opmath_t(0));
      if (dbp != nullptr) std::fill(dbp, dbp + N, opmath_t(0));
      const int64_t row_end = std::min(M, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < row_end; ++i) {
        const opmath_t* si;
        const opmath_t* dyi;
        if constexpr (kSameType) {
          si = s + i * s_stride;
          dyi = dy + i * dy_stride;
        } else {
          const scalar_t* s_row = s + i * s_stride;
          const scalar_t* dy_row = dy + i * dy_stride;
          for (int64_t j = 0; j < N; ++j) {
            s_buf[j] = static_cast<opmath_t>(s_row[j]);
            dy_buf[j] = static_cast<opmath_t>(dy_row[j]);
          }
          si = s_buf.data();
          dyi = dy_buf.data();
        }
        const opmath_t mu = mean[i];
        const opmath_t rs = rstd[i];

        // Row sums of g*xhat and g (g = dy*w), and the column partials for dweight/dbias, in one pass.
        opmath_t sum_gx = 0;
        opmath_t sum_g = 0;
        if (w != nullptr) {
#pragma omp simd reduction(+ : sum_gx, sum_g)
          for (int64_t j = 0; j < N; ++j) {
            const opmath_t xhat = (si[j] - mu) * rs;
            const opmath_t g = dyi[j] * w[j];
            sum_gx += g * xhat;
            sum_g += g;
            dwp[j] += dyi[j] * xhat;
          }
        } else {
#pragma omp simd reduction(+ : sum_gx, sum_g)
          for (int64_t j = 0; j < N; ++j) {
            const opmath_t xhat = (si[j] - mu) * rs;
            sum_gx += dyi[j] * xhat;
            sum_g += dyi[j];
          }
        }
        if (dbp != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) dbp[j] += dyi[j];
        }

        const opmath_t c1 = sum_gx * inv_n;
        const opmath_t c2 = sum_g * inv_n;
        scalar_t* dxi = dx + i * N;
        const scalar_t* dsi = ds != nullptr ? ds + i * ds_stride : nullptr;
        if (w != nullptr && dsi != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const opmath_t xhat = (si[j] - mu) * rs;
            dxi[j] = static_cast<scalar_t>(rs * (dyi[j] * w[j] - c1 * xhat - c2) + static_cast<opmath_t>(dsi[j]));
          }
        } else if (w != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const opmath_t xhat = (si[j] - mu) * rs;
            dxi[j] = static_cast<scalar_t>(rs * (dyi[j] * w[j] - c1 * xhat - c2));
          }
        } else if (dsi != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const opmath_t xhat = (si[j] - mu) * rs;
            dxi[j] = static_cast<scalar_t>(rs * (dyi[j] - c1 * xhat - c2) + static_cast<opmath_t>(dsi[j]));
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const opmath_t xhat = (si[j] - mu) * rs;
            dxi[j] = static_cast<scalar_t>(rs * (dyi[j] - c1 * xhat - c2));
          }
        }
      }
    }
  });
}

// out[j] = sum over chunks of part[c, j], in chunk order.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void sum_partials(const opmath_t* part,  // (num_chunks, N)
                  scalar_t* out,         // (N,) out
                  int64_t num_chunks,
                  int64_t N) {
  at::parallel_for(0, N, at::internal::GRAIN_SIZE / std::max<int64_t>(num_chunks, 1) + 1,
                   [&](int64_t begin, int64_t end) {
                     std::vector<opmath_t> acc(part + begin, part + end);
                     for (int64_t c = 1; c < num_chunks; ++c) {
                       const opmath_t* pc = part + c * N;
#pragma omp simd
                       for (int64_t j = begin; j < end; ++j) acc[j - begin] += pc[j];
                     }
                     for (int64_t j = begin; j < end; ++j) out[j] = static_cast<scalar_t>(acc[j - begin]);
                   });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x_in,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          const std::optional<at::Tensor>& bias,
                                                                          const std::optional<at::Tensor>& residual,
                                                                          double eps) {
  TORCH_CHECK(x_in.dim() == 2, "vitfast layer_norm_fwd: x must be 2-D (M, N), got shape ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "vitfast layer_norm_fwd (CPU): x must be on the CPU, got ", x_in.device());
  check_dtype(x_in, "layer_norm_fwd", "x");
  check_param(weight, x_in, "weight");
  check_param(bias, x_in, "bias");
  const bool has_residual = present(residual);
  if (has_residual) check_like_rows(*residual, x_in, "residual", "x");

  const at::Tensor x = unit_inner_stride(x_in);
  const at::Tensor r = has_residual ? unit_inner_stride(*residual) : at::Tensor();
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  const auto stat_dtype = at::toOpMathType(x.scalar_type());

  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor s = has_residual ? at::empty({M, N}, x.options()) : x.new_empty({0});
  at::Tensor mean = at::empty({M}, x.options().dtype(stat_dtype));
  at::Tensor rstd = at::empty({M}, x.options().dtype(stat_dtype));
  if (M == 0) return {y, s, mean, rstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vitfast_layer_norm_fwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<opmath_t> w_storage, b_storage;
    const opmath_t* w = present(weight) ? param_as_opmath<scalar_t>(weight->contiguous(), w_storage) : nullptr;
    const opmath_t* b = present(bias) ? param_as_opmath<scalar_t>(bias->contiguous(), b_storage) : nullptr;
    layer_norm_fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), x.stride(0),
                                    has_residual ? r.const_data_ptr<scalar_t>() : nullptr,
                                    has_residual ? r.stride(0) : 0, w, b, y.mutable_data_ptr<scalar_t>(),
                                    has_residual ? s.mutable_data_ptr<scalar_t>() : nullptr,
                                    mean.mutable_data_ptr<opmath_t>(), rstd.mutable_data_ptr<opmath_t>(), M, N,
                                    static_cast<opmath_t>(eps));
  });
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy_in,
                                                              const std::optional<at::Tensor>& ds_in,
                                                              const at::Tensor& s_in,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean_in,
                                                              const at::Tensor& rstd_in,
                                                              bool has_bias) {
  TORCH_CHECK(s_in.dim() == 2, "vitfast layer_norm_bwd: s must be 2-D (M, N), got shape ", s_in.sizes());
  TORCH_CHECK(s_in.device().is_cpu(), "vitfast layer_norm_bwd (CPU): s must be on the CPU, got ", s_in.device());
  check_dtype(s_in, "layer_norm_bwd", "s");
  check_like_rows(dy_in, s_in, "dy", "s");
  const bool has_ds = present(ds_in);
  if (has_ds) check_like_rows(*ds_in, s_in, "ds", "s");
  check_param(weight, s_in, "weight");
  const int64_t M = s_in.size(0);
  const int64_t N = s_in.size(1);
  const auto stat_dtype = at::toOpMathType(s_in.scalar_type());
  check_stat(mean_in, s_in, "mean");
  check_stat(rstd_in, s_in, "rstd");

  const at::Tensor s = unit_inner_stride(s_in);
  const at::Tensor dy = unit_inner_stride(dy_in);
  const at::Tensor ds = has_ds ? unit_inner_stride(*ds_in) : at::Tensor();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const bool has_weight = present(weight);

  at::Tensor dx = at::empty({M, N}, s.options());
  at::Tensor dweight = has_weight ? at::zeros({N}, s.options()) : s.new_empty({0});
  at::Tensor dbias = has_bias ? at::zeros({N}, s.options()) : s.new_empty({0});
  if (M == 0 || N == 0) return {dx, dweight, dbias};

  // A few chunks per thread for load balance; few enough that the (num_chunks, N) partials stay small.
  const int64_t num_chunks = std::min<int64_t>(M, 4 * static_cast<int64_t>(at::get_num_threads()));
  at::Tensor dw_part = has_weight ? at::empty({num_chunks, N}, s.options().dtype(stat_dtype)) : at::Tensor();
  at::Tensor db_part = has_bias ? at::empty({num_chunks, N}, s.options().dtype(stat_dtype)) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "vitfast_layer_norm_bwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<opmath_t> w_storage;
    const opmath_t* w = has_weight ? param_as_opmath<scalar_t>(weight->contiguous(), w_storage) : nullptr;
    opmath_t* dwp = has_weight ? dw_part.mutable_data_ptr<opmath_t>() : nullptr;
    opmath_t* dbp = has_bias ? db_part.mutable_data_ptr<opmath_t>() : nullptr;
    layer_norm_bwd_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), dy.stride(0),
                                    has_ds ? ds.const_data_ptr<scalar_t>() : nullptr, has_ds ? ds.stride(0) : 0,
                                    s.const_data_ptr<scalar_t>(), s.stride(0), w, mean.const_data_ptr<opmath_t>(),
                                    rstd.const_data_ptr<opmath_t>(), dx.mutable_data_ptr<scalar_t>(), dwp, dbp, M, N,
                                    num_chunks);
    if (has_weight) sum_partials<scalar_t>(dwp, dweight.mutable_data_ptr<scalar_t>(), num_chunks, N);
    if (has_bias) sum_partials<scalar_t>(dbp, dbias.mutable_data_ptr<scalar_t>(), num_chunks, N);
  });
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace vitfast

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("layer_norm_fwd", &vitfast::layer_norm_fwd);
  m.impl("layer_norm_bwd", &vitfast::layer_norm_bwd);
}
