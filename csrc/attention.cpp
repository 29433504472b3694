// Scaled dot-product attention, forward and backward, on the CPU.
//
// Where it fits (no dropout; causal masks top-left aligned, as SDPA's), this calls ATen's CPU flash
// attention, at::_scaled_dot_product_flash_attention_for_cpu and its _backward: FlashAttention
// (Dao et al. 2022, arXiv:2205.14135) blocked over queries and keys with an online softmax, OpenMP
// over (batch, head, query block). Its mask must be a float mask in the dtype of q, so a bool mask is
// turned into a 0/-inf mask of the same (broadcast, unexpanded) shape. Where it does not fit (a causal
// mask with another alignment, or a float bias whose gradient is wanted, which ATen's backward does not
// return), a plain ATen reference computes the (Nq, Nk) scores in op-math precision.
//
// Saved-state format shared with the other backends (vitfast/ops/attention.py): out, dq, dk, dv are
// (B, H, N, D) views of (B, N, H, D) buffers; lse is a contiguous (B, H, Nq) op-math tensor, any value
// for a fully masked row (ATen writes 0, the Triton kernel -inf; both are read as "all zeros").
#include <ATen/OpMathType.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

namespace vitfast {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

at::Tensor bnhd_empty(const at::Tensor& like, int64_t N, c10::ScalarType dtype) {
  return at::empty({like.size(0), N, like.size(1), like.size(3)}, like.options().dtype(dtype)).transpose(1, 2);
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

bool fits_aten(double dropout_p, bool is_causal, int64_t causal_offset) {
  TORCH_CHECK(dropout_p == 0.0, "vitfast attention (cpu): dropout is not supported by the C++ kernels (got ",
              dropout_p, "); the triton and torch backends implement it");
  return !is_causal || causal_offset == 0;
}

// ATen's CPU flash attention takes a float mask in the dtype of q; the shape (broadcast dims) is kept.
std::optional<at::Tensor> aten_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q) {
  if (!present(mask)) return std::nullopt;
  if (mask->scalar_type() == at::kBool) {
    return at::zeros(mask->sizes(), q.options()).masked_fill_(mask->logical_not(), -kInf);
  }
  return mask->to(q.scalar_type());
}

// Scores in op-math precision, -inf where masked: (B, H, Nq, Nk).
at::Tensor scores_ref(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask, bool is_causal,
                      int64_t causal_offset, double scale) {
  const auto acc = at::toOpMathType(q.scalar_type());
  at::Tensor s = at::matmul(q.to(acc), k.to(acc).transpose(-2, -1)).mul_(scale);
  if (present(mask)) {
    if (mask->scalar_type() == at::kBool) {
      s.masked_fill_(mask->logical_not(), -kInf);
    } else {
      s.add_(mask->to(acc));
    }
  }
  if (is_causal) {
    at::Tensor visible = at::ones({q.size(2), k.size(2)}, q.options().dtype(at::kBool)).tril(causal_offset);
    s.masked_fill_(visible.logical_not(), -kInf);
  }
  return s;
}

// P = exp(S - lse), with a fully masked row's lse (-inf) read as +inf so that its P is 0, not NaN.
at::Tensor probs_ref(const at::Tensor& s, const at::Tensor& lse) {
  at::Tensor safe = lse.to(s.scalar_type()).masked_fill(at::isinf(lse).logical_and(lse < 0), kInf);
  return at::exp(s - safe.unsqueeze(-1));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                                     bool is_causal, int64_t causal_offset, double scale) {
  check_inputs("attention_fwd", q, k, v, attn_mask);
  if (fits_aten(dropout_p, is_causal, causal_offset)) {
    auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, aten_mask(attn_mask, q),
                                                                      scale);
    return {as_bnhd(out, q.scalar_type()), lse.contiguous()};
  }
  at::Tensor s = scores_ref(q, k, attn_mask, is_causal, causal_offset, scale);
  at::Tensor lse = at::logsumexp(s, -1);
  at::Tensor out = bnhd_empty(q, q.size(2), q.scalar_type());
  out.copy_(at::matmul(probs_ref(s, lse), v.to(s.scalar_type())));
  return {out, lse.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    int64_t causal_offset, double scale, bool bias_requires_grad) {
  check_inputs("attention_bwd", q, k, v, attn_mask);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "vitfast attention_bwd: dout ", dout.sizes(),
              " and out ", out.sizes(), " must have the shape of q ", q.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "vitfast attention_bwd: lse must be (B, H, Nq) for q ", q.sizes(), ", got ", lse.sizes());
  TORCH_CHECK(!bias_requires_grad || (present(attn_mask) && at::isFloatingType(attn_mask->scalar_type())),
              "vitfast attention_bwd: bias_requires_grad needs a float attn_mask");
  const auto dtype = q.scalar_type();
  if (fits_aten(dropout_p, is_causal, causal_offset) && !bias_requires_grad) {
    // ATen writes lse in a (B, Nq, H) buffer and reads it back through its strides; a fully masked row's
    // -inf (from the Triton kernel) would give exp(-inf + inf) = NaN there, 0 gives P = 0.
    at::Tensor lse_aten = lse.masked_fill(at::isinf(lse), 0.0);
    auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse_aten, 0.0, is_causal, aten_mask(attn_mask, q), scale);
    return {as_bnhd(dq, dtype), as_bnhd(dk, dtype), as_bnhd(dv, dtype), q.new_empty({0})};
  }
  at::Tensor s = scores_ref(q, k, attn_mask, is_causal, causal_offset, scale);
  at::Tensor p = probs_ref(s, lse);
  const auto acc = p.scalar_type();
  at::Tensor dof = dout.to(acc);
  at::Tensor dp = at::matmul(dof, v.to(acc).transpose(-2, -1));
  at::Tensor delta = (dof * out.to(acc)).sum(-1, /*keepdim=*/true);
  at::Tensor ds = p * (dp - delta);
  at::Tensor dq = bnhd_empty(q, q.size(2), dtype);
  at::Tensor dk = bnhd_empty(q, k.size(2), dtype);
  at::Tensor dv = bnhd_empty(q, k.size(2), dtype);
  dq.copy_(at::matmul(ds, k.to(acc)).mul_(scale));
  dk.copy_(at::matmul(ds.transpose(-2, -1), q.to(acc)).mul_(scale));
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
