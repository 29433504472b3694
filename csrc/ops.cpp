// Every vitfast schema is declared here, once. <op>.cpp registers the CPU kernels,
// <op>_cuda.cpp the CUDA ones (built only where CUDA is available).
#include <torch/extension.h>
#include <torch/library.h>

#include "dropout.h"

TORCH_LIBRARY(vitfast, m) {
  // x: (M, N) with unit inner stride; weight/bias: (N,); residual: like x.
  // Returns y (M, N), s = x + residual (M, N) or an empty tensor without residual,
  // and the per-row mean and rstd (M,) in float32 (float64 for float64 input).
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps)"
      " -> (Tensor y, Tensor s, Tensor mean, Tensor rstd)");
  // s: the normalized input (x, or x + residual); ds (optional) is added to dx.
  // dweight/dbias are empty tensors where there is no weight / has_bias is false.
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor? ds, Tensor s, Tensor? weight, Tensor mean, Tensor rstd,"
      " bool has_bias) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // attention
  // q: (B, H, Nq, D); k, v: (B, H, Nk, D); attn_mask: bool (True = attend) or float (added), of shape
  // (B|1, H|1, Nq|1, Nk|1). With is_causal, key j is visible from query i when j <= i + causal_offset.
  // q, k, v and attn_mask may have any strides. out/dq/dk/dv are (B, H, N, D) views of (B, N, H, D) buffers;
  // lse is (2, B, H, Nq) in op-math precision: each row's score max m and log(sum exp(s - m)).
  // dbias has the shape and dtype of attn_mask when bias_requires_grad, else it is empty.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, bool is_causal,"
      " int causal_offset, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask,"
      " float dropout_p, bool is_causal, int causal_offset, float scale, bool bias_requires_grad)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  // end attention
  // rel_pos_attention (vitfast/ops/rel_pos_attention.py): q (B, H, Nq, D); k, v (B, H, Nk, D); rel_h (B|1, H|1, Nq, kh),
  // rel_w (B|1, H|1, Nq, kw), any float dtype, Nk = kh * kw; score = scale * q.k + rel_h[i, j / kw] + rel_w[i, j % kw].
  // out/dq/dk/dv are (B, H, N, D) views of (B, N, H, D) buffers; lse is (2, B, H, Nq) in op-math precision
  // (attention's: each row's max score m and log(sum exp(s - m)));
  // drel_h/drel_w have the shapes and dtypes of rel_h/rel_w (summed over their broadcast dims).
  m.def("rel_pos_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor rel_h, Tensor rel_w, float scale)"
        " -> (Tensor out, Tensor lse)");
  m.def(
      "rel_pos_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor rel_h, Tensor rel_w, Tensor out,"
      " Tensor lse, float scale) -> (Tensor dq, Tensor dk, Tensor dv, Tensor drel_h, Tensor drel_w)");
  // end rel_pos_attention
  // patch_embed / patch_merging
  // images: (B, C, H, W); weight: (E, C, ph, pw), stride = kernel; pos_embed: (rows, E), patch token l adds
  // row pos_offset + l (pos_offset == num_prefix: its first rows belong to the prefix tokens); prefix_tokens:
  // (num_prefix, E) or None (zero slots). Returns out (B, num_prefix + L, E); z, the pre-norm tokens (B*L, E)
  // (empty unless has_norm and store_z); mean, rstd (B*L,) in op-math precision (empty without norm).
  m.def(
      "patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, int pos_offset,"
      " Tensor? prefix_tokens, Tensor? norm_weight, Tensor? norm_bias, bool has_norm, int num_prefix, float eps,"
      " bool store_z) -> (Tensor out, Tensor z, Tensor mean, Tensor rstd)");
  // dz: (B, L, E), the gradient of the tokens before pos_embed (after the norm's backward). dimages, dweight and
  // dbias are empty where need_dimages, need_dweight (both weight and bias) or has_bias is false.
  m.def(
      "patch_embed_bwd(Tensor dz, Tensor images, Tensor weight, bool has_bias, bool need_dimages, bool need_dweight)"
      " -> (Tensor dimages, Tensor dweight, Tensor dbias)");
  // x: (B, H, W, C); norm_weight/bias: (4C,); reduction_weight: (N, 4C). Returns out (B, ceil(H/2),
  // ceil(W/2), N) and the per-row LayerNorm mean, rstd (M,) in op-math precision.
  m.def(
      "patch_merging_fwd(Tensor x, Tensor? norm_weight, Tensor? norm_bias, Tensor reduction_weight, float eps)"
      " -> (Tensor out, Tensor mean, Tensor rstd)");
  // dy: (M, N). dnorm_weight/dnorm_bias are empty where the norm has no weight/bias.
  m.def(
      "patch_merging_bwd(Tensor dy, Tensor x, Tensor? norm_weight, Tensor? norm_bias, Tensor reduction_weight,"
      " Tensor mean, Tensor rstd) -> (Tensor dx, Tensor dnorm_weight, Tensor dnorm_bias, Tensor dreduction_weight)");
  // end patch_embed / patch_merging
  // window attention
  // Schemas of vitfast::window_attention / window_attention_backward (vitfast/ops/window_attention.py docstring):
  // qkv (B, H, W, 3, heads, D) with unit inner stride; bias the (num_rel, heads) table or dense (heads, N, N);
  // pad_qkv (3, heads, D); logit_scale (heads,) fp32, fp64 for fp64 qkv (Swin-V2, clamped and exponentiated). out
  // (B, H, W, heads*D), lse (B, heads, nW, N) fp32. window_partition: (B, H, W, C) -> (B*nW, N, C) after pad and
  // roll by -shift; window_reverse: the inverse (roll back, crop to H, W).
  m.def(
      "window_attention_fwd(Tensor qkv, Tensor bias, Tensor? pad_qkv, Tensor? logit_scale, int[2] window_size,"
      " int[2] shift_size, float softmax_scale, float dropout_p, int seed) -> (Tensor out, Tensor lse)");
  m.def(
      "window_attention_bwd(Tensor dout, Tensor qkv, Tensor bias, Tensor? pad_qkv, Tensor? logit_scale, Tensor out,"
      " Tensor lse, int[2] window_size, int[2] shift_size, float softmax_scale, float dropout_p, int seed)"
      " -> (Tensor dqkv, Tensor dbias, Tensor dpad_qkv, Tensor dlogit_scale)");
  m.def("window_partition(Tensor x, int[2] window_size, int[2] shift_size) -> Tensor");
  m.def("window_reverse(Tensor windows, SymInt H, SymInt W, int[2] window_size, int[2] shift_size) -> Tensor");
  // end window attention
  // linear_gelu (vitfast/ops/linear_gelu.py): x (M, K), weight (N, K), bias (N,) or None, one dtype; approximate
  // "none" | "tanh". Returns y = GELU(x @ weight^T + bias) (M, N) and, with save_preact, the pre-activation h (M, N)
  // (else an empty tensor).
  m.def(
      "linear_gelu_fwd(Tensor x, Tensor weight, Tensor? bias, str approximate, bool save_preact)"
      " -> (Tensor y, Tensor preact)");
  // end linear_gelu
}

namespace {

// Autocast stops at the kernels: an AutocastCPU/AutocastCUDA kernel that redispatches below autocast with it
// excluded, so the ATen calls inside a kernel (at::addmm, at::matmul, ...) compute in the dtypes the kernel chose.
// The Python ops that call these kernels apply each op's autocast rule first (vitfast/autocast.py) and run them with
// autocast off already; this keeps a direct call of a kernel op under autocast correct too.
void below_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.redispatchBoxed(ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::AutocastCPU), stack);
}

// Every schema above (tests/test_autocast.py checks that each vitfast op has an autocast kernel).
constexpr const char* kKernelOps[] = {
    "layer_norm_fwd",       "layer_norm_bwd",       "attention_fwd",    "attention_bwd",
    "patch_embed_fwd",      "patch_embed_bwd",      "patch_merging_fwd", "patch_merging_bwd",
    "window_attention_fwd", "window_attention_bwd", "window_partition",  "window_reverse",
    "rel_pos_attention_fwd", "rel_pos_attention_bwd", "linear_gelu_fwd"};

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, AutocastCPU, m) {
  for (const char* name : kKernelOps) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&below_autocast>());
}

TORCH_LIBRARY_IMPL(vitfast, AutocastCUDA, m) {
  for (const char* name : kKernelOps) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&below_autocast>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dropout_keep", &vitfast::dropout_keep,
        "(seed, offset, numel, dropout_p) -> (numel,) bool keep mask (dropout.h)");
  m.def("with_cuda", []() {
#ifdef VITFAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled into this build");
}
