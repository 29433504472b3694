"""Scaled dot-product attention: reference, torch.library ops, autograd, functional API.

`vitfast::attention` (forward) and `vitfast::attention_backward` are torch.library ops with fake
implementations, so torch.compile sees them whole; each picks its backend at run time: "triton"
(vitfast.triton.attention, FlashAttention-2), "cpp" (the extension's vitfast::attention_fwd/_bwd: ATen's
CPU flash attention where it fits, a plain ATen reference otherwise) or "torch" (plain PyTorch below).
All backends share one saved-state format, so forward and backward may run on different backends:
out in a (B, Nq, H, D) buffer viewed as (B, H, Nq, D), and the per-row log-sum-exp (B, H, Nq) in fp32
(fp64 for fp64 input), -inf or any finite value for a fully masked row (every backward treats such a
row as all zeros). Dropout draws a Philox seed from torch's default generator; the mask is a function
of (seed, batch*head, i, j) only (`dropout_keep_ref` computes it in plain PyTorch), so backward
regenerates it and the triton and torch backends agree exactly. The seed is drawn on the host, so dropout
is refused inside CUDA graph capture (`check_dropout_capture`), where every replay would reuse it.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from vitfast import backend as _backend

OP = "attention"
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Dropout keeps a weight where the top 24 bits of its Philox draw are >= round(p * 2**24), as the Triton
# kernels do (vitfast.triton.attention.DROPOUT_BITS).
_DROPOUT_BITS = 24


def _causal_visible(Nq: int, Nk: int, offset: int, device) -> Tensor:
    """(Nq, Nk) bool: key j is visible from query i when j <= i + offset."""
    return torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril(offset)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                  scale: Optional[float] = None, dropout_keep: Optional[Tensor] = None, dropout_p: float = 0.0,
                  causal_offset: int = 0) -> Tensor:
    """Plain PyTorch attention in the dtype of q, with SDPA's semantics and zeros for fully masked rows.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D).
        attn_mask: bool (True = attend) or float (added), broadcastable to (B, H, Nq, Nk), or None.
        is_causal: key j visible from query i only when j <= i + causal_offset (0: SDPA's top-left
            alignment; Nk - Nq: flash-attn's bottom-right alignment). Combines with attn_mask.
        dropout_keep: (B, H, Nq, Nk) bool keep-mask, applied with scale 1 / (1 - dropout_p).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    if is_causal:
        s = s.masked_fill(~_causal_visible(q.shape[-2], k.shape[-2], causal_offset, q.device), float("-inf"))
    # Fully masked rows: softmax over all -inf is NaN; attention over nothing is defined as zero.
    dead = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    if dropout_keep is not None:
        p = p * dropout_keep / (1.0 - dropout_p)
    return p @ v


def dropout_keep_ref(seed: int, B: int, H: int, Nq: int, Nk: int, dropout_p: float, device=None) -> torch.Tensor:
    """The kernels' dropout keep-mask, (B, H, Nq, Nk) bool, in plain PyTorch (Philox4x32-10, 64-bit ints)."""
    M32 = 0xFFFFFFFF
    idx = torch.arange(B * H * Nq * Nk, dtype=torch.int64, device=device).view(B, H, Nq, Nk)
    c0, c1 = idx & M32, idx >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = int(seed) & M32, (int(seed) >> 32) & M32
    for _ in range(10):
        # 32x32 -> 64-bit products wrap in int64 but keep their low 64 bits, which is all Philox needs.
        p0 = 0xCD9E8D57 * c2
        p1 = 0xD2511F53 * c0
        c0, c1, c2, c3 = (((p0 >> 32) & M32) ^ c1 ^ k0, p0 & M32, ((p1 >> 32) & M32) ^ c3 ^ k1, p1 & M32)
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return (c0 >> (32 - _DROPOUT_BITS)) >= int(round(dropout_p * 2**_DROPOUT_BITS))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bnhd_empty(B: int, H: int, N: int, D: int, like: Tensor) -> Tensor:
    """(B, H, N, D) view of a (B, N, H, D) buffer: the layout every backend returns out, dq, dk, dv in."""
    return torch.empty((B, N, H, D), dtype=like.dtype, device=like.device).transpose(1, 2)


def _dropout_keep(seed: Optional[Tensor], dropout_p: float, q: Tensor, Nk: int) -> Optional[Tensor]:
    if dropout_p <= 0.0:
        return None
    B, H, Nq, _ = q.shape
    return dropout_keep_ref(int(seed.item()), B, H, Nq, Nk, dropout_p, q.device)


def _probs_torch(q, k, bias, is_causal, causal_offset, scale, lse=None):
    """Softmax probabilities in the accumulation dtype, and the LSE (recomputed when not given)."""
    acc = _acc_dtype(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.to(acc)
    if is_causal:
        s = s.masked_fill(~_causal_visible(q.shape[2], k.shape[2], causal_offset, q.device), float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, -1)
    safe = lse.to(acc).masked_fill(lse == float("-inf"), float("inf"))
    return torch.exp(s - safe[..., None]), lse


def _fwd_torch(q, k, v, bias, seed, dropout_p, is_causal, causal_offset, scale):
    p, lse = _probs_torch(q, k, bias, is_causal, causal_offset, scale)
    keep = _dropout_keep(seed, dropout_p, q, k.shape[2])
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    B, H, Nq, D = q.shape
    out = _bnhd_empty(B, H, Nq, D, q)
    out.copy_(p @ v.to(p.dtype))
    return out, lse.contiguous()


def _bwd_torch(dout, q, k, v, out, lse, bias, seed, dropout_p, is_causal, causal_offset, scale, bias_requires_grad):
    p, _ = _probs_torch(q, k, bias, is_causal, causal_offset, scale, lse)
    acc = p.dtype
    do = dout.to(acc)
    dp = do @ v.to(acc).transpose(-2, -1)
    keep = _dropout_keep(seed, dropout_p, q, k.shape[2])
    p_drop = p
    if keep is not None:
        p_drop = p * keep / (1.0 - dropout_p)
        dp = dp * keep / (1.0 - dropout_p)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dq, dk, dv = _bnhd_empty(B, H, Nq, D, q), _bnhd_empty(B, H, Nk, D, k), _bnhd_empty(B, H, Nk, D, v)
    dq.copy_((ds @ k.to(acc)) * scale)
    dk.copy_((ds.transpose(-2, -1) @ q.to(acc)) * scale)
    dv.copy_(p_drop.transpose(-2, -1) @ do)
    dbias = ds.sum_to_size(bias.shape).to(bias.dtype).contiguous() if bias_requires_grad else q.new_empty(0)
    return dq, dk, dv, dbias


def _check_support(backend: str, tensors: tuple) -> Optional[str]:
    q = tensors[0]
    if backend == "triton" and q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (Triton takes float32, float16, bfloat16)"
    # The dropout seed, an int64 tensor, is among the tensors exactly when dropout_p > 0.
    if backend == "cpp" and any(t.dtype == torch.int64 for t in tensors):
        return "dropout (the C++ kernels have no Philox mask; the triton and torch backends do)"
    return None


_backend.register_op(OP, gpu_order=("triton", "torch"), cpu_order=("cpp", "torch"), check=_check_support)


def check_dropout_capture(op: str, dropout_p: float, device: torch.device) -> None:
    """Refuses dropout inside CUDA graph capture: vitfast's dropout seeds are drawn on the host and become launch
    arguments, so a captured graph would apply the same dropout mask at every replay, silently.

    Raises:
        RuntimeError: dropout_p > 0 for CUDA tensors while the current stream is capturing.
    """
    if dropout_p > 0 and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"vitfast.{op}: dropout (p={dropout_p}) inside CUDA graph capture is not supported: the "
                           "dropout seed is drawn on the host, so every replay of the graph would apply the same "
                           "mask. Capture with dropout off (model.eval() or p=0), or run this step outside the graph.")


def _lse_empty(q: Tensor) -> Tensor:
    B, H, Nq, _ = q.shape
    return q.new_empty((B, H, Nq), dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("vitfast::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], seed: Optional[Tensor], dropout_p: float,
                  is_causal: bool, causal_offset: int, scale: float) -> tuple[Tensor, Tensor]:
    """q: (B, H, Nq, D); k, v: (B, H, Nk, D); bias: (B|1, H|1, Nq|1, Nk|1) bool or float; seed: (1,) int64
    on the CPU when dropout_p > 0. Returns out (B, H, Nq, D) in a (B, Nq, H, D) buffer and the LSE (B, H, Nq)."""
    B, H, Nq, D = q.shape
    if q.numel() == 0 or k.shape[2] == 0:
        return torch.zeros_like(_bnhd_empty(B, H, Nq, D, q)), torch.full_like(_lse_empty(q), float("-inf"))
    check_dropout_capture(OP, dropout_p, q.device)
    which = _backend.choose_backend(OP, q, k, v, bias, seed)
    if which == "triton":
        from vitfast.triton.attention import attention_fwd
        return attention_fwd(q, k, v, bias, dropout_p, int(seed.item()) if seed is not None else 0, is_causal,
                             causal_offset, scale)
    if which == "cpp":
        return tuple(torch.ops.vitfast.attention_fwd(q, k, v, bias, dropout_p, is_causal, causal_offset, scale))
    return _fwd_torch(q, k, v, bias, seed, dropout_p, is_causal, causal_offset, scale)


@_attention_op.register_fake
def _(q, k, v, bias, seed, dropout_p, is_causal, causal_offset, scale):
    B, H, Nq, D = q.shape
    return _bnhd_empty(B, H, Nq, D, q), _lse_empty(q)


@torch.library.custom_op("vitfast::attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           bias: Optional[Tensor], seed: Optional[Tensor], dropout_p: float, is_causal: bool,
                           causal_offset: int, scale: float, bias_requires_grad: bool,
                           deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv (in (B, N, H, D) buffers) and dbias (the bias's shape and dtype; empty unless
    bias_requires_grad)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if q.numel() == 0 or Nk == 0:
        dbias = torch.zeros_like(bias, memory_format=torch.contiguous_format) if bias_requires_grad else q.new_empty(0)
        return (torch.zeros_like(_bnhd_empty(B, H, Nq, D, q)), torch.zeros_like(_bnhd_empty(B, H, Nk, D, k)),
                torch.zeros_like(_bnhd_empty(B, H, Nk, D, v)), dbias)
    check_dropout_capture(OP, dropout_p, q.device)
    which = _backend.choose_backend(OP, q, k, v, bias, seed)
    if which == "triton":
        from vitfast.triton.attention import attention_bwd
        return attention_bwd(dout, q, k, v, out, lse, bias, dropout_p, int(seed.item()) if seed is not None else 0,
                             is_causal, causal_offset, scale, bias_requires_grad, deterministic)
    if which == "cpp":
        return tuple(torch.ops.vitfast.attention_bwd(dout, q, k, v, out, lse, bias, dropout_p, is_causal,
                                                     causal_offset, scale, bias_requires_grad))
    return _bwd_torch(dout, q, k, v, out, lse, bias, seed, dropout_p, is_causal, causal_offset, scale,
                      bias_requires_grad)


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, bias, seed, dropout_p, is_causal, causal_offset, scale, bias_requires_grad,
      deterministic):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dbias = bias.new_empty(bias.shape) if bias_requires_grad else q.new_empty(0)
    return _bnhd_empty(B, H, Nq, D, q), _bnhd_empty(B, H, Nk, D, k), _bnhd_empty(B, H, Nk, D, v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, seed, dropout_p, is_causal, causal_offset, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, seed)
    ctx.dropout_p = dropout_p
    ctx.is_causal = is_causal
    ctx.causal_offset = causal_offset
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, seed = ctx.saved_tensors
    bias_requires_grad = bias is not None and bias.is_floating_point() and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _attention_backward_op(
        dout, q, k, v, out, lse, bias, seed, ctx.dropout_p, ctx.is_causal, ctx.causal_offset, ctx.scale,
        bias_requires_grad, torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv, dbias if bias_requires_grad else None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _describe(name: str, t: Tensor) -> str:
    return f"{name} {tuple(t.shape)} {t.dtype} {t.device}"


def _check_inputs(fn: str, layout: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    """q, k, v already in (B, H, N, D); `layout` names the caller's layout for messages."""
    if q.dtype not in _DTYPES:
        raise ValueError(f"vitfast.{fn}: dtype {q.dtype} is not supported (float16, bfloat16, float32, float64)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"vitfast.{fn}: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"vitfast.{fn}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise ValueError(f"vitfast.{fn}: q, k and v must have one head dim, got {q.shape[-1]}, {k.shape[-1]}, "
                         f"{v.shape[-1]} ({layout})")
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] == 0:
        raise ValueError(f"vitfast.{fn}: head dim {q.shape[-1]} is not supported (1..{MAX_HEAD_DIM})")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape:
        raise ValueError(f"vitfast.{fn}: batch and heads of q, k, v must agree and k, v must have one shape "
                         f"({layout}); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _draw_seed(dropout_p: float) -> Optional[Tensor]:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"vitfast.attention: dropout_p must be in [0, 1), got {dropout_p}")
    return torch.randint(0, 2**62, (1,), dtype=torch.int64) if dropout_p > 0.0 else None


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, *, is_causal: bool = False,
              scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
    """Scaled dot-product attention with the layout and semantics of `F.scaled_dot_product_attention`.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); one dtype (float16, bfloat16, float32; float64 on the
            cpp and torch backends) and device; D <= 256. Any strides (views of a packed qkv are read in place).
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to (B, H, Nq, Nk);
            broadcast dims are read with stride 0, never expanded. A float mask that requires grad gets
            its gradient, reduced over its broadcast dims.
        is_causal: query i sees keys j <= i (top-left alignment, as SDPA); may be combined with attn_mask.
        scale: softmax scale, 1/sqrt(D) by default.
        dropout_p: dropout on the attention weights, seeded from torch's default generator; refused (RuntimeError)
            inside CUDA graph capture, where every replay would reuse the seed.

    Under `torch.use_deterministic_algorithms(True)` the backward uses no atomics (bitwise reproducible). fp32
    products are IEEE fp32 unless `torch.backends.cuda.matmul.allow_tf32` allows TF32, as for torch.matmul
    (vitfast's fp32 rule, vitfast.triton.common).

    Returns:
        (B, H, Nq, D), stored as (B, Nq, H, D) (so `.transpose(1, 2).reshape(B, Nq, H * D)` is free).
        Rows with no visible key are zero.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"vitfast.attention: {name} must be 4-D (B, H, N, D), got rank {t.dim()}: "
                             f"{_describe(name, t)}")
    _check_inputs("attention", "(B, H, N, D)", q, k, v)
    bias = _mask_4d(attn_mask, q, k) if attn_mask is not None else None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = _attention_op(q, k, v, bias, _draw_seed(dropout_p), float(dropout_p), bool(is_causal), 0, scale)
    return out


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False) -> Tensor:
    """Attention in flash-attn's layout and signature.

    Args:
        q: (B, Nq, H, D); k, v: (B, Nk, H, D).
        causal: bottom-right aligned, as flash-attn >= 2.1: query i sees keys j <= i + Nk - Nq.

    Returns:
        (B, Nq, H, D), contiguous.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"vitfast.flash_attn_func: {name} must be 4-D (B, N, H, D), got rank {t.dim()}: "
                             f"{_describe(name, t)}")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    _check_inputs("flash_attn_func", "(B, N, H, D)", qt, kt, vt)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    offset = kt.shape[2] - qt.shape[2]
    out, _ = _attention_op(qt, kt, vt, None, _draw_seed(dropout_p), float(dropout_p), bool(causal), offset, scale)
    return out.transpose(1, 2)


def _mask_4d(mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """The mask as a (B|1, H|1, Nq|1, Nk|1) view (leading dims added), after checking it broadcasts."""
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"vitfast.attention: attn_mask must be bool or floating point, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"vitfast.attention: attn_mask is on {mask.device}, q on {q.device}")
    if mask.dim() > 4 or any(m not in (1, t) for m, t in zip(mask.shape[::-1], target[::-1])):
        raise ValueError(f"vitfast.attention: attn_mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"(B, H, Nq, Nk) = {target}")
    return mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
