// Fused Swin patch merging (Liu et al. 2021, arXiv:2103.14030), forward and backward, on the CPU.
//
// Forward: one parallel pass gathers each output token's 2x2 neighbourhood from the (B, H, W, C) input in
// Swin's order [x(0,0), x(1,0), x(0,1), x(1,1)] (zeros past an odd edge, as Swin pads), normalizes the 4C row
// while it is in L1 (the statistics of layer_norm_stats.h) and writes it once; one GEMM applies the reduction.
// The eager sequence (pad, four strided slices, cat, layer_norm, linear) makes three passes before its GEMM.
// Backward: the normalized rows are recomputed the same way from the saved mean/rstd for dR = dY^T @ LN(x);
// dLN = dY @ R; then one pass per row forms the LayerNorm backward and scatters dx straight into the input
// layout, with dgamma/dbeta reduced over fixed row chunks into a (num_chunks, 4C) buffer summed in order
// (deterministic for a given thread count).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "layer_norm_stats.h"

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace vitfast {
namespace {

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

struct Geometry {
  int64_t B, H, W, C, H2, W2, M, K;
  int64_t sb, sh, sw, sc;
};

Geometry geometry(const at::Tensor& x) {
  Geometry g;
  g.B = x.size(0);
  g.H = x.size(1);
  g.W = x.size(2);
  g.C = x.size(3);
  g.H2 = (g.H + 1) / 2;
  g.W2 = (g.W + 1) / 2;
  g.M = g.B * g.H2 * g.W2;
  g.K = 4 * g.C;
  g.sb = x.stride(0);
  g.sh = x.stride(1);
  g.sw = x.stride(2);
  g.sc = x.stride(3);
  return g;
}

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& nw, const std::optional<at::Tensor>& nb,
                  const at::Tensor& rw, const char* op) {
  TORCH_CHECK(x.dim() == 4, "vitfast ", op, ": x must be (B, H, W, C), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "vitfast ", op, " (CPU): x must be on the CPU, got ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "vitfast ", op,
              ": x must be float32, float64, float16 or bfloat16, got ", dt);
  const int64_t K = 4 * x.size(3);
  for (const auto* p : {&nw, &nb}) {
    if (!present(*p)) continue;
    TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == K && (*p)->scalar_type() == dt, "vitfast ", op,
                ": norm weight/bias must be (", K, ",) of dtype ", dt, ", got ", (*p)->sizes(), " ",
                (*p)->scalar_type());
  }
  TORCH_CHECK(rw.dim() == 2 && rw.size(1) == K && rw.scalar_type() == dt, "vitfast ", op,
              ": reduction_weight must be (N, ", K, ") of dtype ", dt, ", got ", rw.sizes(), " ", rw.scalar_type());
}

// Gathers merged row m (4C values, zero past an odd edge) as op-math values into `row`.
template <typename scalar_t, typename opmath_t>
inline void gather_row(const scalar_t* x, const Geometry& g, int64_t m, opmath_t* row) {
  const int64_t b = m / (g.H2 * g.W2), t = m % (g.H2 * g.W2);
  const int64_t h = 2 * (t / g.W2), w = 2 * (t % g.W2);
  for (int64_t q = 0; q < 4; ++q) {
    const int64_t hh = h + (q % 2), ww = w + (q / 2);
    opmath_t* dst = row + q * g.C;
    if (hh < g.H && ww < g.W) {
      const scalar_t* src = x + b * g.sb + hh * g.sh + ww * g.sw;
      for (int64_t c = 0; c < g.C; ++c) dst[c] = static_cast<opmath_t>(src[c * g.sc]);
    } else {
      std::fill(dst, dst + g.C, opmath_t(0));
    }
  }
}

// ln (M, K) = LayerNorm(gathered rows); with COMPUTE_STATS the row statistics are computed and stored,
// otherwise the given ones are used (backward's recomputation).
template <typename scalar_t, bool COMPUTE_STATS, typename opmath_t = at::opmath_type<scalar_t>>
void gather_norm_kernel(const scalar_t* x, const Geometry& g, const scalar_t* nw, const scalar_t* nb, opmath_t eps,
                        const opmath_t* mean_in,  // (M,) used without COMPUTE_STATS
                        const opmath_t* rstd_in,
                        opmath_t* mean_out,  // (M,) written with COMPUTE_STATS
                        opmath_t* rstd_out,
                        scalar_t* ln) {
  const int64_t K = g.K;
  at::parallel_for(0, g.M, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> row(K);
    for (int64_t m = begin; m < end; ++m) {
      gather_row(x, g, m, row.data());
      opmath_t mu, rs;
      if constexpr (COMPUTE_STATS) {
        const RowStats<opmath_t> st = row_stats(row.data(), K, eps);
        mu = st.mean;
        rs = st.rstd;
        mean_out[m] = mu;
        rstd_out[m] = rs;
      } else {
        mu = mean_in[m];
        rs = rstd_in[m];
      }
      scalar_t* li = ln + m * K;
      for (int64_t k = 0; k < K; ++k) {
        opmath_t v = (row[k] - mu) * rs;
        if (nw != nullptr) v *= static_cast<opmath_t>(nw[k]);
        if (nb != nullptr) v += static_cast<opmath_t>(nb[k]);
        li[k] = static_cast<scalar_t>(v);
      }
    }
  });
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void norm_bwd_scatter_kernel(const scalar_t* x, const Geometry& g, const scalar_t* dln,  // (M, K) contiguous
                             const scalar_t* nw, const opmath_t* mean, const opmath_t* rstd,
                             scalar_t* dx,       // (B, H, W, C) contiguous
                             opmath_t* dw_part,  // (num_chunks, K) or nullptr
                             opmath_t* db_part,  // (num_chunks, K) or nullptr
                             int64_t num_chunks) {
  const int64_t K = g.K, C = g.C;
  const int64_t rows_per_chunk = (g.M + num_chunks - 1) / num_chunks;
  const opmath_t inv_k = opmath_t(1) / static_cast<opmath_t>(K);
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<opmath_t> row(K), xhat(K), gr(K);
    for (int64_t ch = chunk_begin; ch < chunk_end; ++ch) {
      opmath_t* dwp = dw_part != nullptr ? dw_part + ch * K : nullptr;
      opmath_t* dbp = db_part != nullptr ? db_part + ch * K : nullptr;
      if (dwp != nullptr) std::fill(dwp, dwp + K, opmath_t(0));
      if (dbp != nullptr) std::fill(dbp, dbp + K, opmath_t(0));
      const int64_t row_end = std::min(g.M, (ch + 1) * rows_per_chunk);
      for (int64_t m = ch * rows_per_chunk; m < row_end; ++m) {
        gather_row(x, g, m, row.data());
        const opmath_t mu = mean[m], rs = rstd[m];
        const scalar_t* di = dln + m * K;
        opmath_t c1 = 0, c2 = 0;
        for (int64_t k = 0; k < K; ++k) {
          const opmath_t d = static_cast<opmath_t>(di[k]);
          xhat[k] = (row[k] - mu) * rs;
          gr[k] = nw != nullptr ? d * static_cast<opmath_t>(nw[k]) : d;
          c1 += gr[k] * xhat[k];
          c2 += gr[k];
          if (dwp != nullptr) dwp[k] += d * xhat[k];
          if (dbp != nullptr) dbp[k] += d;
        }
        c1 *= inv_k;
        c2 *= inv_k;
        const int64_t b = m / (g.H2 * g.W2), t = m % (g.H2 * g.W2);
        const int64_t h = 2 * (t / g.W2), w = 2 * (t % g.W2);
        for (int64_t q = 0; q < 4; ++q) {
          const int64_t hh = h + (q % 2), ww = w + (q / 2);
          if (hh >= g.H || ww >= g.W) continue;
          scalar_t* dst = dx + ((b * g.H + hh) * g.W + ww) * C;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t k = q * C + c;
            dst[c] = static_cast<scalar_t>(rs * (gr[k] - xhat[k] * c1 - c2));
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merging_fwd(const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& norm_weight,
                                                                 const std::optional<at::Tensor>& norm_bias,
                                                                 const at::Tensor& reduction_weight, double eps) {
  check_inputs(x, norm_weight, norm_bias, reduction_weight, "patch_merging_fwd");
  const Geometry g = geometry(x);
  const int64_t N = reduction_weight.size(0);
  const auto stat_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor mean = at::empty({g.M}, x.options().dtype(stat_dtype));
  at::Tensor rstd = at::empty({g.M}, x.options().dtype(stat_dtype));
  if (g.M == 0) return {at::empty({g.B, g.H2, g.W2, N}, x.options()), mean, rstd};
  at::Tensor ln = at::empty({g.M, g.K}, x.options());
  const at::Tensor nw = present(norm_weight) ? norm_weight->contiguous() : at::Tensor();
  const at::Tensor nb = present(norm_bias) ? norm_bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vitfast_patch_merging_fwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    gather_norm_kernel<scalar_t, true, opmath_t>(x.const_data_ptr<scalar_t>(), g,
                                       nw.defined() ? nw.const_data_ptr<scalar_t>() : nullptr,
                                       nb.defined() ? nb.const_data_ptr<scalar_t>() : nullptr,
                                       static_cast<opmath_t>(eps), nullptr, nullptr, mean.mutable_data_ptr<opmath_t>(),
                                       rstd.mutable_data_ptr<opmath_t>(), ln.mutable_data_ptr<scalar_t>());
  });
  // (_unsafe_view: not a view of the product, which autograd would refuse to modify in place as an op's output)
  at::Tensor out = at::_unsafe_view(at::mm(ln, reduction_weight.t()), {g.B, g.H2, g.W2, N});
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_merging_bwd(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias, const at::Tensor& reduction_weight, const at::Tensor& mean_in,
    const at::Tensor& rstd_in) {
  check_inputs(x, norm_weight, norm_bias, reduction_weight, "patch_merging_bwd");
  const Geometry g = geometry(x);
  const int64_t N = reduction_weight.size(0);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == g.M && dy.size(1) == N && dy.scalar_type() == x.scalar_type(),
              "vitfast patch_merging_bwd: dy must be (", g.M, ", ", N, ") of dtype ", x.scalar_type(), ", got ",
              dy.sizes(), " ", dy.scalar_type());
  const auto stat_dtype = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(mean_in.numel() == g.M && rstd_in.numel() == g.M && mean_in.scalar_type() == stat_dtype &&
                  rstd_in.scalar_type() == stat_dtype,
              "vitfast patch_merging_bwd: mean/rstd must be (", g.M, ",) of dtype ", stat_dtype);
  const bool has_nw = present(norm_weight), has_nb = present(norm_bias);
  const auto pdt = reduction_weight.scalar_type();
  at::Tensor dx = at::empty({g.B, g.H, g.W, g.C}, x.options());
  at::Tensor dnw = has_nw ? at::zeros({g.K}, x.options().dtype(pdt)) : x.new_empty({0}, x.options().dtype(pdt));
  at::Tensor dnb = has_nb ? at::zeros({g.K}, x.options().dtype(pdt)) : x.new_empty({0}, x.options().dtype(pdt));
  if (g.M == 0) return {dx.zero_(), dnw, dnb, at::zeros_like(reduction_weight)};
  const at::Tensor nw = has_nw ? norm_weight->contiguous() : at::Tensor();
  const at::Tensor nb = has_nb ? norm_bias->contiguous() : at::Tensor();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor dyc = dy.contiguous();

  at::Tensor ln = at::empty({g.M, g.K}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vitfast_patch_merging_bwd_ln", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    gather_norm_kernel<scalar_t, false, opmath_t>(
        x.const_data_ptr<scalar_t>(), g, has_nw ? nw.const_data_ptr<scalar_t>() : nullptr,
        has_nb ? nb.const_data_ptr<scalar_t>() : nullptr, opmath_t(0), mean.const_data_ptr<opmath_t>(),
        rstd.const_data_ptr<opmath_t>(), nullptr, nullptr, ln.mutable_data_ptr<scalar_t>());
  });
  at::Tensor drw = at::mm(dyc.t(), ln);
  ln = at::Tensor();
  const at::Tensor dln = at::mm(dyc, reduction_weight);

  const int64_t num_chunks = std::min<int64_t>(g.M, 4 * static_cast<int64_t>(at::get_num_threads()));
  at::Tensor parts = at::empty({2, num_chunks, g.K}, x.options().dtype(stat_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vitfast_patch_merging_bwd_dx", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    opmath_t* p = parts.mutable_data_ptr<opmath_t>();
    norm_bwd_scatter_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), g, dln.const_data_ptr<scalar_t>(),
                                      has_nw ? nw.const_data_ptr<scalar_t>() : nullptr,
                                      mean.const_data_ptr<opmath_t>(), rstd.const_data_ptr<opmath_t>(),
                                      dx.mutable_data_ptr<scalar_t>(), has_nw ? p : nullptr,
                                      has_nb ? p + num_chunks * g.K : nullptr, num_chunks);
  });
  if (has_nw) dnw = parts[0].sum(0).to(pdt);
  if (has_nb) dnb = parts[1].sum(0).to(pdt);
  return {dx, dnw, dnb, drw};
}

}  // namespace
}  // namespace vitfast

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("patch_merging_fwd", &vitfast::patch_merging_fwd);
  m.impl("patch_merging_bwd", &vitfast::patch_merging_bwd);
}
