// Fused residual-add + LayerNorm, forward and backward, on the CPU.
//
// LayerNorm (Ba, Kiros, Hinton 2016, arXiv:1607.06450) over the last dim of a (M, N) view, with the
// pre-norm residual pattern: s = x + residual is stored (rounded to the input dtype, as `x + residual`
// would be) and normalized. Forward: at::parallel_for over rows; each row is read once into L1 (as
// op-math values) and its mean and variance are taken by the corrected two-pass algorithm (Chan, Golub,
// LeVeque 1983; layer_norm_stats.h, shared with the LayerNorm fused into patch_embed and patch_merging) over
// that cached row, which stays accurate for rows with a large mean, unlike a one-pass sum of squares, and is
// exact for constant rows. Backward: dx per row, and dweight/dbias by a two-stage reduction: each chunk of at
// most 64 rows accumulates op-math column partials into one row of a (num_chunks, N) buffer, which a
// second loop sums in a fixed order. The chunking depends only on M and the thread count, so the
// result is deterministic for a given thread count.
//
// The extension is built for baseline x86-64 (SSE2). The row loops are written once as force-inlined
// templates and instantiated twice: a baseline copy and an AVX2 + F16C copy (a GCC/Clang target
// attribute), chosen at run time where the CPU has both and PyTorch's CPU capability
// (ATEN_CPU_CAPABILITY) allows it. Both copies add in the same order and round the same way, so they
// give bit-identical results.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/macros/Macros.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "layer_norm_stats.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VITFAST_LN_AVX2 1
#include <immintrin.h>
#else
#define VITFAST_LN_AVX2 0
#endif

namespace vitfast {
namespace {

bool use_avx2() {
#if VITFAST_LN_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                           at::get_cpu_capability() != "DEFAULT";
  return avx2;
#else
  return false;
#endif
}

#if VITFAST_LN_AVX2
// c10::Half's portable conversions do not vectorize; F16C converts 8 at a time, rounding the same way
// (to nearest even), so the AVX2 copy stays bit-identical to the baseline one.
__attribute__((target("avx2,f16c"))) inline void half_to_float_f16c(const c10::Half* C10_RESTRICT src,
                                                                    float* C10_RESTRICT dst,
                                                                    int64_t N) {
  int64_t j = 0;
  for (; j + 8 <= N; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  for (; j < N; ++j) dst[j] = static_cast<float>(src[j]);
}

__attribute__((target("avx2,f16c"))) inline void float_to_half_f16c(const float* C10_RESTRICT src,
                                                                    c10::Half* C10_RESTRICT dst,
                                                                    int64_t N) {
  int64_t j = 0;
  for (; j + 8 <= N; j += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; j < N; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}
#endif

// dst[0:N] = src[0:N] as op-math values.
template <bool kAvx2, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void load_row(const scalar_t* C10_RESTRICT src, opmath_t* C10_RESTRICT dst, int64_t N) {
#if VITFAST_LN_AVX2
  if constexpr (kAvx2 && std::is_same_v<scalar_t, c10::Half>) {
    half_to_float_f16c(src, dst, N);
    return;
  }
#endif
  for (int64_t j = 0; j < N; ++j) dst[j] = static_cast<opmath_t>(src[j]);
}

// dst[0:N] = src[0:N] rounded to scalar_t.
template <bool kAvx2, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void store_row(const opmath_t* C10_RESTRICT src, scalar_t* C10_RESTRICT dst, int64_t N) {
#if VITFAST_LN_AVX2
  if constexpr (kAvx2 && std::is_same_v<scalar_t, c10::Half>) {
    float_to_half_f16c(src, dst, N);
    return;
  }
#endif
  for (int64_t j = 0; j < N; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

// Row sums of g*xhat and g, with xhat = (s - mu) * rs and g = dy * w (g = dy without a weight). With a
// weight it also adds dy*xhat into the column partials dwp, while the row is in registers.
template <typename T, bool kHasWeight>
C10_ALWAYS_INLINE std::pair<T, T> row_grad_sums(const T* C10_RESTRICT s,
                                                const T* C10_RESTRICT dy,
                                                const T* C10_RESTRICT w,
                                                T mu,
                                                T rs,
                                                T* C10_RESTRICT dwp,
                                                int64_t N) {
  T gx[kLanes<T>] = {};
  T gs[kLanes<T>] = {};
  int64_t j = 0;
  for (; j + kLanes<T> <= N; j += kLanes<T>) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes<T>; ++k) {
      const T xhat = (s[j + k] - mu) * rs;
      const T g = kHasWeight ? dy[j + k] * w[j + k] : dy[j + k];
      gx[k] += g * xhat;
      gs[k] += g;
      if constexpr (kHasWeight) dwp[j + k] += dy[j + k] * xhat;
    }
  }
  for (int64_t k = 0; j + k < N; ++k) {
    const T xhat = (s[j + k] - mu) * rs;
    const T g = kHasWeight ? dy[j + k] * w[j + k] : dy[j + k];
    gx[k] += g * xhat;
    gs[k] += g;
    if constexpr (kHasWeight) dwp[j + k] += dy[j + k] * xhat;
  }
  return {tree_sum(gx), tree_sum(gs)};
}

template <typename scalar_t>
struct FwdArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x;  // (M, N), row stride x_stride
  int64_t x_stride;
  const scalar_t* r;  // (M, N) residual, row stride r_stride; nullptr without residual
  int64_t r_stride;
  const opmath_t* w;  // (N,), or nullptr
  const opmath_t* b;  // (N,), or nullptr
  scalar_t* y;        // (M, N) out, contiguous
  scalar_t* s;        // (M, N) out, contiguous: x + residual; nullptr without residual
  opmath_t* mean;     // (M,) out
  opmath_t* rstd;     // (M,) out
  int64_t N;
  opmath_t eps;
};

// Forward for rows [begin, end). buf: 3 * N op-math values of scratch (unused when scalar_t is op-math).
template <bool kAvx2, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
C10_ALWAYS_INLINE void layer_norm_fwd_rows(const FwdArgs<scalar_t>& a,
                                           int64_t begin,
                                           int64_t end,
                                           opmath_t* C10_RESTRICT buf) {
  constexpr bool kSameType = std::is_same_v<scalar_t, opmath_t>;
  const int64_t N = a.N;
  const opmath_t* C10_RESTRICT w = a.w;
  const opmath_t* C10_RESTRICT b = a.b;
  opmath_t* C10_RESTRICT in_buf = buf;
  opmath_t* C10_RESTRICT res_buf = buf + N;
  opmath_t* C10_RESTRICT out_buf = buf + 2 * N;
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* C10_RESTRICT xi = a.x + i * a.x_stride;
    scalar_t* C10_RESTRICT yi = a.y + i * N;
    const opmath_t* v;  // the row being normalized, as op-math values (may be s_i or in_buf)
    if (a.r != nullptr) {
      const scalar_t* C10_RESTRICT ri = a.r + i * a.r_stride;
      scalar_t* C10_RESTRICT si = a.s + i * N;
      if constexpr (kSameType) {
        for (int64_t j = 0; j < N; ++j) si[j] = xi[j] + ri[j];
        v = si;
      } else {
        // Statistics of s as stored: add in op-math, round to scalar_t, read the rounded values back.
        load_row<kAvx2>(xi, in_buf, N);
        load_row<kAvx2>(ri, res_buf, N);
        for (int64_t j = 0; j < N; ++j) in_buf[j] += res_buf[j];
        store_row<kAvx2>(in_buf, si, N);
        load_row<kAvx2>(si, in_buf, N);
        v = in_buf;
      }
    } else if constexpr (kSameType) {
      v = xi;
    } else {
      load_row<kAvx2>(xi, in_buf, N);
      v = in_buf;
    }

    const auto [mu, rs] = row_stats(v, N, a.eps);
    a.mean[i] = mu;
    a.rstd[i] = rs;

    opmath_t* C10_RESTRICT out;
    if constexpr (kSameType) {
      out = yi;
    } else {
      out = out_buf;
    }
    if (w != nullptr && b != nullptr) {
      for (int64_t j = 0; j < N; ++j) out[j] = (v[j] - mu) * rs * w[j] + b[j];
    } else if (w != nullptr) {
      for (int64_t j = 0; j < N; ++j) out[j] = (v[j] - mu) * rs * w[j];
    } else if (b != nullptr) {
      for (int64_t j = 0; j < N; ++j) out[j] = (v[j] - mu) * rs + b[j];
    } else {
      for (int64_t j = 0; j < N; ++j) out[j] = (v[j] - mu) * rs;
    }
    if constexpr (!kSameType) store_row<kAvx2>(out_buf, yi, N);
  }
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void layer_norm_fwd_rows_baseline(const FwdArgs<scalar_t>& a, int64_t begin, int64_t end, opmath_t* buf) {
  layer_norm_fwd_rows<false>(a, begin, end, buf);
}

#if VITFAST_LN_AVX2
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
__attribute__((target("avx2,f16c"))) void layer_norm_fwd_rows_avx2(const FwdArgs<scalar_t>& a,
                                                                   int64_t begin,
                                                                   int64_t end,
                                                                   opmath_t* buf) {
  layer_norm_fwd_rows<true>(a, begin, end, buf);
}
#endif

// Rows per parallel task: enough elements per task to amortize the thread hand-off.
int64_t row_grain(int64_t N) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(N, 1)); }

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void layer_norm_fwd_kernel(const FwdArgs<scalar_t>& a, int64_t M) {
  const bool avx2 = use_avx2();
  at::parallel_for(0, M, row_grain(a.N), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buf(std::is_same_v<scalar_t, opmath_t> ? 0 : 3 * a.N);
#if VITFAST_LN_AVX2
    if (avx2) {
      layer_norm_fwd_rows_avx2(a, begin, end, buf.data());
      return;
    }
#endif
    layer_norm_fwd_rows_baseline(a, begin, end, buf.data());
  });
}

template <typename scalar_t>
struct BwdArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;  // (M, N), row stride dy_stride
  int64_t dy_stride;
  const scalar_t* ds;  // (M, N), row stride ds_stride; nullptr without ds
  int64_t ds_stride;
  const scalar_t* s;  // (M, N), row stride s_stride
  int64_t s_stride;
  const opmath_t* w;     // (N,), or nullptr
  const opmath_t* mean;  // (M,)
  const opmath_t* rstd;  // (M,)
  scalar_t* dx;          // (M, N) out, contiguous
  opmath_t* dw_part;     // (num_chunks, N) out: column partials of dy*xhat; nullptr iff w is
  opmath_t* db_part;     // (num_chunks, N) out: column partials of dy; nullptr without bias
  int64_t M;
  int64_t N;
  int64_t rows_per_chunk;  // chunk c is rows [c * rows_per_chunk, (c + 1) * rows_per_chunk) of M
};

// Backward for chunks [chunk_begin, chunk_end). buf: 4 * N op-math values of scratch (unused when
// scalar_t is op-math).
template <bool kAvx2, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
C10_ALWAYS_INLINE void layer_norm_bwd_chunks(const BwdArgs<scalar_t>& a,
                                             int64_t chunk_begin,
                                             int64_t chunk_end,
                                             opmath_t* C10_RESTRICT buf) {
  constexpr bool kSameType = std::is_same_v<scalar_t, opmath_t>;
  const int64_t N = a.N;
  const opmath_t* C10_RESTRICT w = a.w;
  const opmath_t inv_n = opmath_t(1) / static_cast<opmath_t>(N);
  opmath_t* C10_RESTRICT s_buf = buf;
  opmath_t* C10_RESTRICT dy_buf = buf + N;
  opmath_t* C10_RESTRICT ds_buf = buf + 2 * N;
  opmath_t* C10_RESTRICT out_buf = buf + 3 * N;
  for (int64_t c = chunk_begin; c < chunk_end; ++c) {
    opmath_t* C10_RESTRICT dwp = w != nullptr ? a.dw_part + c * N : nullptr;
    opmath_t* C10_RESTRICT dbp = a.db_part != nullptr ? a.db_part + c * N : nullptr;
    if (dwp != nullptr) std::fill(dwp, dwp + N, opmath_t(0));
    if (dbp != nullptr) std::fill(dbp, dbp + N, opmath_t(0));
    const int64_t row_end = std::min(a.M, (c + 1) * a.rows_per_chunk);
    for (int64_t i = c * a.rows_per_chunk; i < row_end; ++i) {
      const opmath_t* C10_RESTRICT si;
      const opmath_t* C10_RESTRICT dyi;
      const opmath_t* C10_RESTRICT dsi = nullptr;
      opmath_t* C10_RESTRICT out;
      scalar_t* C10_RESTRICT dxi = a.dx + i * N;
      if constexpr (kSameType) {
        si = a.s + i * a.s_stride;
        dyi = a.dy + i * a.dy_stride;
        if (a.ds != nullptr) dsi = a.ds + i * a.ds_stride;
        out = dxi;
      } else {
        load_row<kAvx2>(a.s + i * a.s_stride, s_buf, N);
        load_row<kAvx2>(a.dy + i * a.dy_stride, dy_buf, N);
        if (a.ds != nullptr) {
          load_row<kAvx2>(a.ds + i * a.ds_stride, ds_buf, N);
          dsi = ds_buf;
        }
        si = s_buf;
        dyi = dy_buf;
        out = out_buf;
      }
      const opmath_t mu = a.mean[i];
      const opmath_t rs = a.rstd[i];
      const auto [sum_gx, sum_g] = w != nullptr ? row_grad_sums<opmath_t, true>(si, dyi, w, mu, rs, dwp, N)
                                                : row_grad_sums<opmath_t, false>(si, dyi, w, mu, rs, dwp, N);
      if (dbp != nullptr) {
        for (int64_t j = 0; j < N; ++j) dbp[j] += dyi[j];
      }

      // dx = rstd * (g - mean(g*xhat) * xhat - mean(g)) (+ ds)
      const opmath_t c1 = sum_gx * inv_n;
      const opmath_t c2 = sum_g * inv_n;
      if (w != nullptr && dsi != nullptr) {
        for (int64_t j = 0; j < N; ++j) out[j] = rs * (dyi[j] * w[j] - c1 * ((si[j] - mu) * rs) - c2) + dsi[j];
      } else if (w != nullptr) {
        for (int64_t j = 0; j < N; ++j) out[j] = rs * (dyi[j] * w[j] - c1 * ((si[j] - mu) * rs) - c2);
      } else if (dsi != nullptr) {
        for (int64_t j = 0; j < N; ++j) out[j] = rs * (dyi[j] - c1 * ((si[j] - mu) * rs) - c2) + dsi[j];
      } else {
        for (int64_t j = 0; j < N; ++j) out[j] = rs * (dyi[j] - c1 * ((si[j] - mu) * rs) - c2);
      }
      if constexpr (!kSameType) store_row<kAvx2>(out_buf, dxi, N);
    }
  }
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void layer_norm_bwd_chunks_baseline(const BwdArgs<scalar_t>& a, int64_t chunk_begin, int64_t chunk_end, opmath_t* buf) {
  layer_norm_bwd_chunks<false>(a, chunk_begin, chunk_end, buf);
}

#if VITFAST_LN_AVX2
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
__attribute__((target("avx2,f16c"))) void layer_norm_bwd_chunks_avx2(const BwdArgs<scalar_t>& a,
                                                                     int64_t chunk_begin,
                                                                     int64_t chunk_end,
                                                                     opmath_t* buf) {
  layer_norm_bwd_chunks<true>(a, chunk_begin, chunk_end, buf);
}
#endif

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void layer_norm_bwd_kernel(const BwdArgs<scalar_t>& a) {
  const bool avx2 = use_avx2();
  const int64_t num_chunks = (a.M + a.rows_per_chunk - 1) / a.rows_per_chunk;
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<opmath_t> buf(std::is_same_v<scalar_t, opmath_t> ? 0 : 4 * a.N);
#if VITFAST_LN_AVX2
    if (avx2) {
      layer_norm_bwd_chunks_avx2(a, chunk_begin, chunk_end, buf.data());
      return;
    }
#endif
    layer_norm_bwd_chunks_baseline(a, chunk_begin, chunk_end, buf.data());
  });
}

// out[j] = sum over chunks c of part[c, j], in chunk order, for dweight and dbias in one parallel region
// (each pair may be null).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void sum_partials(const opmath_t* dw_part,  // (num_chunks, N), or nullptr
                  scalar_t* dw,             // (N,) out, or nullptr
                  const opmath_t* db_part,  // (num_chunks, N), or nullptr
                  scalar_t* db,             // (N,) out, or nullptr
                  int64_t num_chunks,
                  int64_t N) {
  at::parallel_for(0, N, at::internal::GRAIN_SIZE / num_chunks + 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> acc(end - begin);
    for (const auto& [part, out] : {std::pair{dw_part, dw}, std::pair{db_part, db}}) {
      if (part == nullptr) continue;
      opmath_t* C10_RESTRICT accp = acc.data();
      std::copy(part + begin, part + end, accp);
      for (int64_t c = 1; c < num_chunks; ++c) {
        const opmath_t* C10_RESTRICT pc = part + c * N + begin;
        for (int64_t j = 0; j < end - begin; ++j) accp[j] += pc[j];
      }
      for (int64_t j = 0; j < end - begin; ++j) out[begin + j] = static_cast<scalar_t>(accp[j]);
    }
  });
}

// A (N,) parameter as op-math values: the tensor's own data when scalar_t is already the op-math type,
// else a copy converted once (rather than once per row).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
const opmath_t* param_as_opmath(const at::Tensor& p, std::vector<opmath_t>& storage) {
  const scalar_t* src = p.const_data_ptr<scalar_t>();
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return src;
  } else {
    storage.assign(p.numel(), opmath_t(0));
    for (int64_t j = 0; j < p.numel(); ++j) storage[j] = static_cast<opmath_t>(src[j]);
    return storage.data();
  }
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// t itself when its rows have unit inner stride (any row stride), else a contiguous copy.
at::Tensor unit_inner_stride(const at::Tensor& t) { return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous(); }

void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "vitfast ", op, ": ",
              name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "vitfast ", op, ": ", name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "vitfast ", op, ": ", name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "vitfast ", op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

void check_param(const std::optional<at::Tensor>& p,
                 const at::Tensor& x,
                 const char* op,
                 const char* name,
                 const char* x_name) {
  if (!present(p)) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), "vitfast ", op, ": ", name, " must have shape (", x.size(1),
              ",) to match ", x_name, " ", x.sizes(), ", got ", p->sizes());
  TORCH_CHECK(p->scalar_type() == x.scalar_type(), "vitfast ", op, ": ", name, " must have the dtype of ", x_name,
              " (", x.scalar_type(), "), got ", p->scalar_type());
  TORCH_CHECK(p->device() == x.device(), "vitfast ", op, ": ", name, " must be on the device of ", x_name, " (",
              x.device(), "), got ", p->device());
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x_in,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          const std::optional<at::Tensor>& bias,
                                                                          const std::optional<at::Tensor>& residual,
                                                                          double eps) {
  constexpr const char* op = "layer_norm_fwd";
  TORCH_CHECK(x_in.dim() == 2, "vitfast layer_norm_fwd: x must be 2-D (M, N), got shape ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "vitfast layer_norm_fwd (CPU kernel): x must be on the CPU, got ",
              x_in.device());
  check_dtype(x_in, op, "x");
  check_param(weight, x_in, op, "weight", "x");
  check_param(bias, x_in, op, "bias", "x");
  const bool has_residual = present(residual);
  if (has_residual) check_like(*residual, x_in, op, "residual", "x");

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
    const at::Tensor w = present(weight) ? weight->contiguous() : at::Tensor();
    const at::Tensor b = present(bias) ? bias->contiguous() : at::Tensor();
    FwdArgs<scalar_t> args{};
    args.x = x.const_data_ptr<scalar_t>();
    args.x_stride = x.stride(0);
    args.r = has_residual ? r.const_data_ptr<scalar_t>() : nullptr;
    args.r_stride = has_residual ? r.stride(0) : 0;
    args.w = w.defined() ? param_as_opmath<scalar_t>(w, w_storage) : nullptr;
    args.b = b.defined() ? param_as_opmath<scalar_t>(b, b_storage) : nullptr;
    args.y = y.mutable_data_ptr<scalar_t>();
    args.s = has_residual ? s.mutable_data_ptr<scalar_t>() : nullptr;
    args.mean = mean.mutable_data_ptr<opmath_t>();
    args.rstd = rstd.mutable_data_ptr<opmath_t>();
    args.N = N;
    args.eps = static_cast<opmath_t>(eps);
    layer_norm_fwd_kernel(args, M);
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
  constexpr const char* op = "layer_norm_bwd";
  TORCH_CHECK(s_in.dim() == 2, "vitfast layer_norm_bwd: s must be 2-D (M, N), got shape ", s_in.sizes());
  TORCH_CHECK(s_in.device().is_cpu(), "vitfast layer_norm_bwd (CPU kernel): s must be on the CPU, got ",
              s_in.device());
  check_dtype(s_in, op, "s");
  check_like(dy_in, s_in, op, "dy", "s");
  const bool has_ds = present(ds_in);
  if (has_ds) check_like(*ds_in, s_in, op, "ds", "s");
  check_param(weight, s_in, op, "weight", "s");
  check_stat(mean_in, s_in, "mean");
  check_stat(rstd_in, s_in, "rstd");

  const at::Tensor s = unit_inner_stride(s_in);
  const at::Tensor dy = unit_inner_stride(dy_in);
  const at::Tensor ds = has_ds ? unit_inner_stride(*ds_in) : at::Tensor();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const bool has_weight = present(weight);
  const int64_t M = s.size(0);
  const int64_t N = s.size(1);
  at::Tensor dx = at::empty({M, N}, s.options());
  at::Tensor dweight = has_weight ? at::zeros({N}, s.options()) : s.new_empty({0});
  at::Tensor dbias = has_bias ? at::zeros({N}, s.options()) : s.new_empty({0});
  if (M == 0 || N == 0) return {dx, dweight, dbias};

  // Chunks of at most kMaxChunkRows rows keep each partial column sum short (accuracy); at least four
  // chunks per thread balance the load. The partials stay a small fraction of the size of dy.
  constexpr int64_t kMaxChunkRows = 64;
  const int64_t threads = at::get_num_threads();
  const int64_t rows_per_chunk = std::clamp<int64_t>((M + 4 * threads - 1) / (4 * threads), 1, kMaxChunkRows);
  const int64_t num_chunks = (M + rows_per_chunk - 1) / rows_per_chunk;
  const auto part_options = s.options().dtype(at::toOpMathType(s.scalar_type()));
  at::Tensor dw_part = has_weight ? at::empty({num_chunks, N}, part_options) : at::Tensor();
  at::Tensor db_part = has_bias ? at::empty({num_chunks, N}, part_options) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "vitfast_layer_norm_bwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<opmath_t> w_storage;
    const at::Tensor w = has_weight ? weight->contiguous() : at::Tensor();
    BwdArgs<scalar_t> args{};
    args.dy = dy.const_data_ptr<scalar_t>();
    args.dy_stride = dy.stride(0);
    args.ds = has_ds ? ds.const_data_ptr<scalar_t>() : nullptr;
    args.ds_stride = has_ds ? ds.stride(0) : 0;
    args.s = s.const_data_ptr<scalar_t>();
    args.s_stride = s.stride(0);
    args.w = has_weight ? param_as_opmath<scalar_t>(w, w_storage) : nullptr;
    args.mean = mean.const_data_ptr<opmath_t>();
    args.rstd = rstd.const_data_ptr<opmath_t>();
    args.dx = dx.mutable_data_ptr<scalar_t>();
    args.dw_part = has_weight ? dw_part.mutable_data_ptr<opmath_t>() : nullptr;
    args.db_part = has_bias ? db_part.mutable_data_ptr<opmath_t>() : nullptr;
    args.M = M;
    args.N = N;
    args.rows_per_chunk = rows_per_chunk;
    layer_norm_bwd_kernel(args);
    if (has_weight || has_bias) {
      sum_partials(args.dw_part, has_weight ? dweight.mutable_data_ptr<scalar_t>() : nullptr, args.db_part,
                   has_bias ? dbias.mutable_data_ptr<scalar_t>() : nullptr, num_chunks, N);
    }
  });
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace vitfast

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("layer_norm_fwd", &vitfast::layer_norm_fwd);
  m.impl("layer_norm_bwd", &vitfast::layer_norm_bwd);
}
