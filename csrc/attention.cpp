// Scaled dot-product attention, forward and backward, on the CPU.
//
// Where it fits, this calls ATen's CPU flash attention, at::_scaled_dot_product_flash_attention_for_cpu and
// its _backward: FlashAttention (Dao et al. 2022, arXiv:2205.14135) blocked over queries and keys with an
// online softmax, OpenMP over (batch, head, query block). Its mask must be a float mask in the dtype of q, so
// a bool mask is turned into a 0/-inf mask of the same (broadcast, unexpanded) shape; it reads q, k, v with
// unit inner stride, so a q, k or v whose last dim is strided is copied first (the precondition torch's SDPA
// dispatcher checks before it calls the kernel). Elsewhere a plain ATen reference computes the (Nq, Nk)
// scores in op-math precision: a causal mask with another alignment, a float bias whose gradient is wanted
// (ATen's backward does not return it), and every input where ATen's kernel would not follow vitfast's mask
// semantics (vitfast/ops/attention.py): non-finite q, k or v (an additive -inf mask turns NaN + -inf into
// NaN, and 0 * NaN in P @ V spreads a hidden key's NaN), scores that could overflow, and float masks with
// NaN, +inf or finite entries of magnitude 2^20 or more (ATen's backward reads a single log-sum-exp, which
// loses log(l) for a row at finfo.min and gets its gradients wrong).
//
// Saved-state format shared with the other backends (vitfast/ops/attention.py): out, dq, dk, dv are
// (B, H, N, D) views of (B, N, H, D) buffers; lse is a contiguous (2, B, H, Nq) op-math tensor, the row
// max m of the scores and log(sum exp(s - m)); ATen's log-sum-exp is stored as (lse, 0).
#include <ATen/OpMathType.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace vitfast {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// (B, H, N, D) laid out as (B, N, H, D); not a transposed view, which autograd would refuse to modify in place as
// an op's output.
at::Tensor bnhd_empty(const at::Tensor& like, int64_t N, c10::ScalarType dtype) {
  const int64_t H = like.size(1), D = like.size(3);
  return at::empty_strided({like.size(0), H, N, D}, {N * H * D, D, H * D, 1}, like.options().dtype(dtype));
}

// t (B, H, N, D) in the (B, N, H, D) buffer layout: t itself when it already is, else a copy.
at::Tensor as_bnhd(const at::Tensor& t, c10::ScalarType dtype) {
  at::Tensor r = bnhd_empty(t, t.size(2), dtype);
  if (t.scalar_type() == dtype && t.strides() == r.strides()) return t;
  r.copy_(t);
  return r;
}

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "vitfast ", op, ": q, k, v must be 4-D (B, H, N, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "vitfast ", op,
              ": q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "vitfast ", op,
              ": dtype must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "vitfast ", op,
              ": q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && k.sizes() == v.sizes() && q.size(3) == k.size(3),
              "vitfast ", op, ": q (B, H, Nq, D) and k, v (B, H, Nk, D) do not agree: ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(q.size(3) <= 256, "vitfast ", op, ": head dim ", q.size(3), " > 256");
  if (present(mask)) {
    const at::Tensor& m = *mask;
    const int64_t target[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
    bool ok = m.dim() == 4 && m.device() == q.device() &&
              (m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()));
    for (int d = 0; ok && d < 4; ++d) ok = m.size(d) == 1 || m.size(d) == target[d];
    TORCH_CHECK(ok, "vitfast ", op, ": attn_mask ", m.sizes(), " ", m.scalar_type(), " ", m.device(),
                " must be a bool or float 4-D tensor on ", q.device(), " broadcastable to (B, H, Nq, Nk) = [",
                target[0], ", ", target[1], ", ", target[2], ", ", target[3], "]");
  }
}

// Below this magnitude a score's log-sum-exp keeps log(l) as well as the score itself is rounded.
constexpr double kAtenMaxScore = 1048576.0;  // 2^20

// max |t| when t is finite, else +inf (NaN propagates through the infinity norm, a reduction that reads a strided
// t in place: aminmax copied a non-contiguous q, k, v whole first).
double max_abs(const at::Tensor& t) {
  if (t.numel() == 0) return 0.0;
  const double a = at::linalg_vector_norm(t, kInf).item<double>();
  return std::isfinite(a) ? a : kInf;
}

// max |entry| over the finite entries of a float mask (its -inf entries hide keys), +inf when it holds NaN or +inf.
double mask_bound(const at::Tensor& m) {
  if (m.numel() == 0) return 0.0;
  auto [lo, hi] = at::aminmax(m);
  const double l = lo.item<double>(), h = hi.item<double>();
  if (std::isnan(l) || std::isnan(h) || h == kInf) return kInf;
  if (l > -kInf) return std::max(std::abs(l), std::abs(h));
  return max_abs(m.masked_fill(at::isinf(m), 0.0));
}

// Whether ATen's flash kernel computes what vitfast's semantics ask for these inputs (file comment).
bool fits_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
               double dropout_p, bool is_causal, int64_t causal_offset, double scale) {
  TORCH_CHECK(dropout_p == 0.0, "vitfast attention (cpu): dropout is not supported by the C++ kernels (got ",
              dropout_p, "); the triton and torch backends implement it");
  if (is_causal && causal_offset != 0) return false;
  double bound = max_abs(q) * max_abs(k) * static_cast<double>(q.size(3)) * std::abs(scale);
  if (!(bound < kAtenMaxScore) || max_abs(v) == kInf) return false;
  if (present(mask) && mask->scalar_type() != at::kBool) {
    // ATen's kernel reads the mask in the dtype of q: a float mask wider than a float16 / bfloat16 q would be
    // rounded to it (the other paths add it in op-math precision).
    if (mask->scalar_type() != q.scalar_type() && q.scalar_type() != at::toOpMathType(q.scalar_type())) return false;
    bound += mask_bound(*mask);
  }
  return bound < kAtenMaxScore;
}

// t with unit inner stride, as ATen's flash kernel reads it: t itself, or a contiguous copy.
at::Tensor unit_inner_stride(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// ATen's CPU flash attention takes a float mask in the dtype of q; the shape (broadcast dims) is kept.
std::optional<at::Tensor> aten_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q) {
  if (!present(mask)) return std::nullopt;
  if (mask->scalar_type() == at::kBool) {
    return at::zeros(mask->sizes(), q.options()).masked_fill_(mask->logical_not(), -kInf);
  }
  return mask->to(q.scalar_type());
}

// Scores in op-math precision, (B, H, Nq, Nk), -inf by selection where a row does not see a key (bool mask
// false, mask -inf, causal): whatever q.k is there never reaches the softmax.
at::Tensor scores_ref(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask, bool is_causal,
                      int64_t causal_offset, double scale) {
  const auto acc = at::toOpMathType(q.scalar_type());
  at::Tensor s = at::matmul(q.to(acc), k.to(acc).transpose(-2, -1)).mul_(scale);
  if (present(mask)) {
    if (mask->scalar_type() == at::kBool) {
      s.masked_fill_(mask->logical_not(), -kInf);
    } else {
      const at::Tensor m = mask->to(acc);
      s.add_(m).masked_fill_(at::isinf(m).logical_and(m < 0), -kInf);
    }
  }
  if (is_causal) {
    at::Tensor visible = at::ones({q.size(2), k.size(2)}, q.options().dtype(at::kBool)).tril(causal_offset);
    s.masked_fill_(visible.logical_not(), -kInf);
  }
  return s;
}

// P = exp(S - m - log(l)) from the saved statistics lse (2, B, H, Nq); a row with m = -inf (it sees no key)
// reads m as +inf, so that its P is 0, not NaN.
at::Tensor probs_ref(const at::Tensor& s, const at::Tensor& lse) {
  const at::Tensor m = lse[0].to(s.scalar_type());
  const at::Tensor safe = m.masked_fill(at::isinf(m).logical_and(m < 0), kInf);
  return at::exp((s - safe.unsqueeze(-1)) - lse[1].to(s.scalar_type()).unsqueeze(-1));
}

// P @ V where a key's non-finite values of v reach only the rows that see it (s > -inf), as in exact arithmetic
// (a plain matmul spreads them through P = 0 as 0 * NaN = NaN). As vitfast/ops/attention.py's _probs_at_v.
at::Tensor probs_at_v(const at::Tensor& p, const at::Tensor& s, const at::Tensor& v_in) {
  const at::Tensor v = v_in.to(p.scalar_type());
  const at::Tensor bad = at::isfinite(v).logical_not();
  if (!bad.any().item<bool>()) return at::matmul(p, v);
  const at::Tensor seen = s.ne(-kInf).to(p.scalar_type());
  auto reached = [&](const at::Tensor& which) { return at::matmul(seen, which.to(p.scalar_type())).gt(0); };
  const at::Tensor nan = reached(at::isnan(v)), pos = reached(v.eq(kInf)), neg = reached(v.eq(-kInf));
  at::Tensor out = at::matmul(p, v.masked_fill(bad, 0.0));
  // (a row already NaN, from a NaN score, stays NaN where an infinite v reaches it)
  const at::Tensor nan_out = nan.logical_or(pos.logical_and(neg)).logical_or(at::isnan(out));
  return out.masked_fill_(pos, kInf)
      .masked_fill_(neg, -kInf)
      .masked_fill_(nan_out, std::numeric_limits<double>::quiet_NaN());
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                                     bool is_causal, int64_t causal_offset, double scale) {
  check_inputs("attention_fwd", q, k, v, attn_mask);
  if (fits_aten(q, k, v, attn_mask, dropout_p, is_causal, causal_offset, scale)) {
    auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
        unit_inner_stride(q), unit_inner_stride(k), unit_inner_stride(v), 0.0, is_causal, aten_mask(attn_mask, q),
        scale);
    return {as_bnhd(out, q.scalar_type()), at::stack({lse, at::zeros_like(lse)}).contiguous()};
  }
  at::Tensor s = scores_ref(q, k, attn_mask, is_causal, causal_offset, scale);
  const at::Tensor m = std::get<0>(s.max(-1));
  const at::Tensor dead = at::isinf(m).logical_and(m < 0);
  const at::Tensor log_l = at::exp(s - m.masked_fill(dead, 0.0).unsqueeze(-1)).sum(-1).log_().masked_fill_(dead, 0.0);
  const at::Tensor lse = at::stack({m, log_l});
  at::Tensor out = bnhd_empty(q, q.size(2), q.scalar_type());
  out.copy_(probs_at_v(probs_ref(s, lse), s, v));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    int64_t causal_offset, double scale, bool bias_requires_grad) {
  check_inputs("attention_bwd", q, k, v, attn_mask);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "vitfast attention_bwd: dout ", dout.sizes(),
              " and out ", out.sizes(), " must have the shape of q ", q.sizes());
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == 2 && lse.size(1) == q.size(0) && lse.size(2) == q.size(1) &&
                  lse.size(3) == q.size(2),
              "vitfast attention_bwd: lse must be (2, B, H, Nq) for q ", q.sizes(), ", got ", lse.sizes());
  TORCH_CHECK(!bias_requires_grad || (present(attn_mask) && at::isFloatingType(attn_mask->scalar_type())),
              "vitfast attention_bwd: bias_requires_grad needs a float attn_mask");
  const auto dtype = q.scalar_type();
  if (fits_aten(q, k, v, attn_mask, dropout_p, is_causal, causal_offset, scale) && !bias_requires_grad) {
    // ATen reads one log-sum-exp per row, in a (B, Nq, H) buffer through its strides; a row that sees no key
    // (m = -inf) would give exp(-inf + inf) = NaN there, 0 gives P = 0.
    at::Tensor lse_aten = lse[0] + lse[1];
    lse_aten.masked_fill_(at::isinf(lse_aten), 0.0);
    auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        unit_inner_stride(dout), unit_inner_stride(q), unit_inner_stride(k), unit_inner_stride(v),
        unit_inner_stride(out), lse_aten, 0.0, is_causal, aten_mask(attn_mask, q), scale);
    return {as_bnhd(dq, dtype), as_bnhd(dk, dtype), as_bnhd(dv, dtype), q.new_empty({0})};
  }
  at::Tensor s = scores_ref(q, k, attn_mask, is_causal, causal_offset, scale);
  at::Tensor p = probs_ref(s, lse);
  const auto acc = p.scalar_type();
  at::Tensor dof = dout.to(acc);
  at::Tensor dp = at::matmul(dof, v.to(acc).transpose(-2, -1));
  const at::Tensor hidden = s.eq(-kInf);
  // delta = rowsum(P * dP), as vitfast/ops/attention.py's _bwd_torch (exact dS = 0 where the softmax saturates).
  // Where a row does not see a key, dS is 0 even if dP is NaN (non-finite v of a hidden key), and such a key's
  // non-finite k (a row's non-finite q) enter dQ = dS @ K (dK = dS^T @ Q) as 0 (0 * NaN would be NaN).
  at::Tensor delta = (p * dp).masked_fill_(hidden, 0.0).sum(-1, /*keepdim=*/true);
  at::Tensor ds = (p * (dp - delta)).masked_fill_(hidden, 0.0);
  const at::Tensor kf = k.to(acc), qf = q.to(acc);
  at::Tensor dq = bnhd_empty(q, q.size(2), dtype);
  at::Tensor dk = bnhd_empty(q, k.size(2), dtype);
  at::Tensor dv = bnhd_empty(q, k.size(2), dtype);
  dq.copy_(at::matmul(ds, kf.masked_fill(at::isfinite(kf).logical_not(), 0.0)).mul_(scale));
  dk.copy_(at::matmul(ds.transpose(-2, -1), qf.masked_fill(at::isfinite(qf).logical_not(), 0.0)).mul_(scale));
  dv.copy_(at::matmul(p.transpose(-2, -1), dof));
  at::Tensor dbias = bias_requires_grad ? ds.sum_to_size(attn_mask->sizes()).to(attn_mask->scalar_type()).contiguous()
                                        : q.new_empty({0});
  return {dq, dk, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace vitfast
