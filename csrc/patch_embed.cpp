// Fused patch embedding (ViT, Dosovitskiy et al. 2021, arXiv:2010.11929), forward and backward, on the CPU.
//
// A stride = kernel convolution is a GEMM of the (B*L, C*ph*pw) patch matrix with the flattened kernel. On the
// CPU the patch matrix is one copy of a strided view of the image, (B, C, Hp, ph, Wp, pw) permuted to
// (B, Hp, Wp, C, ph, pw), followed by one at::addmm (the bias rides in the GEMM). The epilogue is one
// parallel pass over the tokens: optional LayerNorm (the statistics of layer_norm_stats.h over the cached
// row), the positional embedding, and the store into the patch slots of the (B, P + L, E) output,
// whose prefix slots get the prefix tokens (plus their positional rows). This replaces the eager
// conv + flatten/transpose + cat + add (+ layer_norm) sequence, which makes three or four passes over the
// tokens. Backward: dweight = dZ^T @ patches, dimages = dZ @ W scattered back (patches do not overlap),
// dbias = column sums of dZ.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "layer_norm_stats.h"

#include <optional>
#include <tuple>
#include <vector>

namespace vitfast {
namespace {

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_vec(const std::optional<at::Tensor>& t, const at::Tensor& images, int64_t n, const char* name) {
  if (!present(t)) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "vitfast patch_embed: ", name, " must have shape (", n, ",), got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == images.scalar_type() && t->device() == images.device(), "vitfast patch_embed: ",
              name, " must have the dtype and device of the images (", images.scalar_type(), ", ", images.device(),
              "), got ", t->scalar_type(), ", ", t->device());
}

void check_geometry(const at::Tensor& images, const at::Tensor& weight) {
  TORCH_CHECK(images.dim() == 4, "vitfast patch_embed: images must be (B, C, H, W), got ", images.sizes());
  TORCH_CHECK(images.device().is_cpu(), "vitfast patch_embed (CPU): images must be on the CPU, got ",
              images.device());
  const auto dt = images.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "vitfast patch_embed: images must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == images.size(1), "vitfast patch_embed: weight must be (E, ",
              images.size(1), ", ph, pw), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dt && weight.device() == images.device(),
              "vitfast patch_embed: weight must have the dtype and device of the images");
  TORCH_CHECK(weight.size(2) > 0 && weight.size(3) > 0, "vitfast patch_embed: empty patch ", weight.sizes());
}

// (B*L, C*ph*pw) patch matrix in the kernel's (c, i, j) order: one copy of a strided view. Pixels past the
// last whole patch (H % ph rows, W % pw columns) are dropped, as the stride = kernel convolution drops them.
at::Tensor patches_of(const at::Tensor& images, int64_t ph, int64_t pw) {
  const int64_t B = images.size(0), C = images.size(1);
  const int64_t Hp = images.size(2) / ph, Wp = images.size(3) / pw;
  return images.narrow(2, 0, Hp * ph)
      .narrow(3, 0, Wp * pw)
      .reshape({B, C, Hp, ph, Wp, pw})
      .permute({0, 2, 4, 1, 3, 5})
      .reshape({B * Hp * Wp, C * ph * pw});
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void epilogue_kernel(const scalar_t* z,    // (M, E) GEMM output (bias included), contiguous
                     const scalar_t* pos,  // (rows, E) contiguous, or nullptr; token l adds row pos_offset + l
                     const scalar_t* nw,   // (E,) or nullptr
                     const scalar_t* nb,   // (E,) or nullptr
                     scalar_t* out,        // (B, T, E) contiguous
                     opmath_t* mean,       // (M,) out, or nullptr (no norm)
                     opmath_t* rstd,       // (M,) out, or nullptr
                     int64_t M, int64_t E, int64_t L, int64_t T, int64_t num_prefix, int64_t pos_offset,
                     bool has_norm, opmath_t eps) {
  at::parallel_for(0, M, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(E, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> row(E);
    for (int64_t m = begin; m < end; ++m) {
      const int64_t b = m / L, l = m % L;
      const scalar_t* zi = z + m * E;
      for (int64_t j = 0; j < E; ++j) row[j] = static_cast<opmath_t>(zi[j]);
      if (has_norm) {
        const auto [mu, rs] = row_stats(row.data(), E, eps);
        mean[m] = mu;
        rstd[m] = rs;
        for (int64_t j = 0; j < E; ++j) {
          opmath_t v = (row[j] - mu) * rs;
          if (nw != nullptr) v *= static_cast<opmath_t>(nw[j]);
          if (nb != nullptr) v += static_cast<opmath_t>(nb[j]);
          row[j] = v;
        }
      }
      scalar_t* oi = out + (b * T + num_prefix + l) * E;
      if (pos != nullptr) {
        const scalar_t* pi = pos + (pos_offset + l) * E;
        for (int64_t j = 0; j < E; ++j) oi[j] = static_cast<scalar_t>(row[j] + static_cast<opmath_t>(pi[j]));
      } else {
        for (int64_t j = 0; j < E; ++j) oi[j] = static_cast<scalar_t>(row[j]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_fwd(
    const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& pos_embed, int64_t pos_offset, const std::optional<at::Tensor>& prefix_tokens,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias, bool has_norm,
    int64_t num_prefix, double eps, bool store_z) {
  check_geometry(images, weight);
  TORCH_CHECK(num_prefix >= 0 && pos_offset >= 0,
              "vitfast patch_embed: num_prefix_tokens and pos_offset must be >= 0, got ", num_prefix, " and ",
              pos_offset);
  const int64_t B = images.size(0);
  const int64_t E = weight.size(0), ph = weight.size(2), pw = weight.size(3);
  const int64_t L = (images.size(2) / ph) * (images.size(3) / pw);
  const int64_t M = B * L, T = num_prefix + L;
  check_vec(bias, images, E, "bias");
  check_vec(norm_weight, images, E, "norm_weight");
  check_vec(norm_bias, images, E, "norm_bias");
  if (present(pos_embed)) {
    TORCH_CHECK(pos_embed->dim() == 2 && pos_embed->size(1) == E && pos_embed->size(0) >= pos_offset + L,
                "vitfast patch_embed: pos_embed must be (rows >= ", pos_offset + L, ", ", E, "), got ",
                pos_embed->sizes());
    TORCH_CHECK(pos_embed->scalar_type() == images.scalar_type(), "vitfast patch_embed: pos_embed dtype ",
                pos_embed->scalar_type(), " != images dtype ", images.scalar_type());
  }
  if (present(prefix_tokens)) {
    TORCH_CHECK(prefix_tokens->dim() == 2 && prefix_tokens->size(0) == num_prefix && prefix_tokens->size(1) == E,
                "vitfast patch_embed: prefix_tokens must be (", num_prefix, ", ", E, "), got ",
                prefix_tokens->sizes());
  }
  const auto stat_dtype = at::toOpMathType(images.scalar_type());
  at::Tensor out = at::empty({B, T, E}, images.options());
  at::Tensor mean = at::empty({has_norm ? M : 0}, images.options().dtype(stat_dtype));
  at::Tensor rstd = at::empty({has_norm ? M : 0}, images.options().dtype(stat_dtype));
  if (num_prefix > 0) {
    auto slots = out.narrow(1, 0, num_prefix);
    at::Tensor rows;
    if (present(prefix_tokens)) rows = *prefix_tokens;
    if (present(pos_embed) && pos_offset == num_prefix) {
      auto prow = pos_embed->narrow(0, 0, num_prefix);
      rows = rows.defined() ? rows + prow : prow;
    }
    if (rows.defined()) {
      slots.copy_(rows.unsqueeze(0).expand({B, num_prefix, E}));
    } else {
      slots.zero_();
    }
  }
  if (M == 0) return {out, (has_norm && store_z) ? images.new_empty({0, E}) : images.new_empty({0}), mean, rstd};

  const at::Tensor w2 = weight.reshape({E, -1});
  const at::Tensor patches = patches_of(images, ph, pw);
  const at::Tensor z = present(bias) ? at::addmm(*bias, patches, w2.t()) : at::mm(patches, w2.t());
  const at::Tensor pos = present(pos_embed) ? pos_embed->contiguous() : at::Tensor();
  const at::Tensor nw = present(norm_weight) ? norm_weight->contiguous() : at::Tensor();
  const at::Tensor nb = present(norm_bias) ? norm_bias->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "vitfast_patch_embed_fwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    epilogue_kernel<scalar_t>(z.const_data_ptr<scalar_t>(), pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr,
                              nw.defined() ? nw.const_data_ptr<scalar_t>() : nullptr,
                              nb.defined() ? nb.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
                              has_norm ? mean.mutable_data_ptr<opmath_t>() : nullptr,
                              has_norm ? rstd.mutable_data_ptr<opmath_t>() : nullptr, M, E, L, T, num_prefix,
                              pos_offset, has_norm, static_cast<opmath_t>(eps));
  });
  return {out, (has_norm && store_z) ? z : images.new_empty({0}), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd(const at::Tensor& dz, const at::Tensor& images,
                                                               const at::Tensor& weight, bool has_bias,
                                                               bool need_dimages, bool need_dweight) {
  check_geometry(images, weight);
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t E = weight.size(0), ph = weight.size(2), pw = weight.size(3);
  const int64_t Hp = H / ph, Wp = W / pw, M = B * Hp * Wp;
  TORCH_CHECK(dz.dim() == 3 && dz.size(0) == B && dz.size(1) == Hp * Wp && dz.size(2) == E,
              "vitfast patch_embed_bwd: dz must be (", B, ", ", Hp * Wp, ", ", E, "), got ", dz.sizes());
  TORCH_CHECK(dz.scalar_type() == images.scalar_type(), "vitfast patch_embed_bwd: dz dtype ", dz.scalar_type(),
              " != images dtype ", images.scalar_type());
  const at::Tensor dz2 = dz.reshape({M, E});
  const auto acc = at::toOpMathType(images.scalar_type());
  at::Tensor dweight = need_dweight ? at::mm(dz2.t(), patches_of(images, ph, pw)).view(weight.sizes())
                                    : weight.new_empty({0});
  at::Tensor dbias =
      has_bias && need_dweight ? dz2.sum(0, false, acc).to(weight.scalar_type()) : weight.new_empty({0});
  at::Tensor dimages;
  if (need_dimages) {
    const at::Tensor dpatches =
        at::mm(dz2, weight.reshape({E, -1})).view({B, Hp, Wp, C, ph, pw}).permute({0, 3, 1, 4, 2, 5});
    if (Hp * ph == H && Wp * pw == W) {
      dimages = dpatches.reshape({B, C, H, W});
    } else {
      // The pixels the convolution drops get a zero gradient.
      dimages = at::zeros({B, C, H, W}, images.options());
      dimages.narrow(2, 0, Hp * ph).narrow(3, 0, Wp * pw).view({B, C, Hp, ph, Wp, pw}).copy_(dpatches);
    }
  } else {
    dimages = images.new_empty({0});
  }
  return {dimages, dweight, dbias};
}

}  // namespace
}  // namespace vitfast

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("patch_embed_fwd", &vitfast::patch_embed_fwd);
  m.impl("patch_embed_bwd", &vitfast::patch_embed_bwd);
}
