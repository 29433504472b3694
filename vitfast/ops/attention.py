"""Scaled dot-product attention: reference, torch.library ops, autograd, functional API.

`vitfast::attention` (forward) and `vitfast::attention_backward` are torch.library ops with fake
implementations, so torch.compile sees them whole; each picks its backend at run time: "triton"
(vitfast.triton.attention, FlashAttention-2), "cpp" (the extension's vitfast::attention_fwd/_bwd: ATen's
CPU flash attention where it fits, a plain ATen reference otherwise) or "torch" (plain PyTorch below).
All backends share one saved-state format, so forward and backward may run on different backends:
out in a (B, Nq, H, D) buffer viewed as (B, H, Nq, D), and the softmax statistics lse (2, B, H, Nq) in fp32
(fp64 for fp64 input): lse[0] the row max m of the scores, lse[1] log(sum_j exp(s_j - m)), so that the
log-sum-exp is their sum. They are kept apart because m + log(l) rounds to m when |m| is huge (a row at
torch.finfo(float32).min, Hugging Face's padding value), which would make the backward's probabilities wrong.
A row that sees no key has m = -inf (or any m where every score is -inf), and every backward reads it as all
zeros. Dropout draws a Philox seed from torch's default generator; the mask is a function of
(seed, batch*head, i, j) only (`dropout_keep_ref` computes it in plain PyTorch), so backward regenerates it and
the triton and torch backends agree exactly. The seed is drawn on the host, so dropout is refused inside CUDA
graph capture (`check_dropout_capture`), where every replay would reuse it. Under autocast the forward follows
F.scaled_dot_product_attention's rule (vitfast.autocast.lower_precision).

Mask semantics, the same on every backend (`attention_ref` is their plain PyTorch statement):
- A bool mask (True = attend), the -inf entries of a float mask and `is_causal` hide keys. A row that sees no
  key gives zeros, and zero gradients.
- A finite float mask is added to the scores, plain arithmetic as in F.scaled_dot_product_attention's math: a
  row whose entries are all torch.finfo(float32).min gives the mean of v, as SDPA does, and so do its
  gradients.
- A hidden key never affects a row that does not see it: its scores are -inf by selection, not by addition
  (NaN or inf in its k, or a q.k that overflows, stay out), and non-finite values of its v reach only the rows
  that see it (where a row does see them, the result is what the arithmetic gives: NaN or inf).
"""
import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from vitfast import _ext
from vitfast import autocast as _autocast
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
    """Plain PyTorch attention in the dtype of q: SDPA's math with the mask semantics of the module docstring.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D).
        attn_mask: bool (True = attend) or float (added), broadcastable to (B, H, Nq, Nk), or None.
        is_causal: key j visible from query i only when j <= i + causal_offset (0: SDPA's top-left
            alignment; Nk - Nq: flash-attn's bottom-right alignment). Combines with attn_mask.
        dropout_keep: (B, H, Nq, Nk) bool keep-mask, applied with scale 1 / (1 - dropout_p).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = _scores(q, k, attn_mask, is_causal, causal_offset, scale, q.dtype)
    p = _probs(s, *_row_stats(s))
    if dropout_keep is not None:
        p = p * dropout_keep / (1.0 - dropout_p)
    return _probs_at_v(p, s, v)


def _scores(q: Tensor, k: Tensor, mask: Optional[Tensor], is_causal: bool, causal_offset: int, scale: float,
            dtype: torch.dtype) -> Tensor:
    """scale * q @ k^T (+ a float mask) in `dtype`, -inf where a row does not see a key (bool mask False, mask
    -inf, causal), set by selection: whatever q.k is there (NaN, inf) never reaches the softmax."""
    s = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            hidden = ~mask
        else:
            mask = mask.to(dtype)
            s = s + mask
            hidden = mask == float("-inf")
        s = s.masked_fill(hidden, float("-inf"))
    if is_causal:
        s = s.masked_fill(~_causal_visible(q.shape[-2], k.shape[-2], causal_offset, q.device), float("-inf"))
    return s


def _row_stats(s: Tensor) -> tuple:
    """The saved softmax statistics of scores s: the row max m (-inf for a row that sees no key) and
    log(sum exp(s - m)) (0 for such a row)."""
    m = s.amax(-1)
    dead = m == float("-inf")
    log_l = torch.exp(s - m.masked_fill(dead, 0.0)[..., None]).sum(-1).log().masked_fill(dead, 0.0)
    return m, log_l


def _probs(s: Tensor, m: Tensor, log_l: Tensor) -> Tensor:
    """exp(s - m - log_l): the softmax of s from its statistics, 0 on a row that sees no key (never NaN)."""
    return torch.exp((s - m.masked_fill(m == float("-inf"), float("inf"))[..., None]) - log_l[..., None])


def _probs_at_v(p: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """p @ v, where a key's non-finite values of v reach only the rows that see it (s > -inf), as in exact
    arithmetic (a plain matmul would spread them through p = 0 as 0 * NaN = NaN)."""
    v = v.to(p.dtype)
    bad = ~torch.isfinite(v)
    if not bad.any():
        return p @ v
    seen = (s != float("-inf")).to(p.dtype)
    nan, pos, neg = ((seen @ which.to(p.dtype)) > 0 for which in (v.isnan(), v == float("inf"), v == float("-inf")))
    out = p @ v.masked_fill(bad, 0.0)
    # (a row already NaN, from a NaN score, stays NaN where an infinite v reaches it)
    nan = nan | (pos & neg) | out.isnan()
    return out.masked_fill(pos, float("inf")).masked_fill(neg, float("-inf")).masked_fill(nan, float("nan"))


def dropout_keep_ref(seed: int, B: int, H: int, Nq: int, Nk: int, dropout_p: float, device=None) -> torch.Tensor:
    """The kernels' dropout keep-mask, (B, H, Nq, Nk) bool, in plain PyTorch (Philox4x32-10, 64-bit ints)."""
    return _philox_keep(seed, torch.arange(B * H * Nq * Nk, dtype=torch.int64, device=device),
                        dropout_p).view(B, H, Nq, Nk)


def _philox_keep(seed: int, offsets: Tensor, dropout_p: float) -> Tensor:
    """Whether the scores at `offsets` (int64) are kept: Philox4x32-10 (Salmon et al., SC 2011) of the counter
    (offset low, offset high, 0, 0) under the key (seed low, seed high), kept where the first word's top
    _DROPOUT_BITS bits reach round(dropout_p * 2**_DROPOUT_BITS)."""
    M32 = 0xFFFFFFFF
    c0, c1 = offsets & M32, offsets >> 32
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


def dropout_keep(seed: int, shape: tuple, dropout_p: float, device: torch.device) -> Tensor:
    """`dropout_keep_ref`'s mask for scores of `shape` (flattened in order), as the torch backends draw it: by the
    C++ extension (vitfast._C.dropout_keep, csrc/dropout.cpp) for CPU tensors, where the PyTorch formula's ten rounds
    over int64 tensors took 10x the whole attention's time; by that formula elsewhere."""
    numel = math.prod(shape)
    if device.type == "cpu" and _ext.HAS_EXT and hasattr(_ext._C, "dropout_keep"):  # (not in an older build)
        return _ext._C.dropout_keep(int(seed), 0, numel, dropout_p).view(shape)
    return _philox_keep(seed, torch.arange(numel, dtype=torch.int64, device=device), dropout_p).view(shape)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bnhd_empty(B: int, H: int, N: int, D: int, like: Tensor) -> Tensor:
    """(B, H, N, D) tensor laid out as (B, N, H, D): the layout every backend returns out, dq, dk, dv in."""
    # (not a view, which autograd would refuse to modify in place as an op's output)
    return torch.empty_strided((B, H, N, D), (N * H * D, D, H * D, 1), dtype=like.dtype, device=like.device)


def _dropout_keep(seed: int, dropout_p: float, q: Tensor, Nk: int) -> Optional[Tensor]:
    if dropout_p <= 0.0:
        return None
    B, H, Nq, _ = q.shape
    return dropout_keep(seed, (B, H, Nq, Nk), dropout_p, q.device)


def _dropped(x: Tensor, keep: Optional[Tensor], dropout_p: float) -> Tensor:
    """x through dropout: kept entries scaled by 1 / (1 - dropout_p), the others 0; x itself without a keep-mask."""
    return x if keep is None else x * keep / (1.0 - dropout_p)


def _fwd_torch(q, k, v, bias, seed, dropout_p, is_causal, causal_offset, scale):
    s = _scores(q, k, bias, is_causal, causal_offset, scale, _acc_dtype(q.dtype))
    m, log_l = _row_stats(s)
    p = _probs(s, m, log_l)
    p = _dropped(p, _dropout_keep(seed, dropout_p, q, k.shape[2]), dropout_p)
    B, H, Nq, D = q.shape
    out = _bnhd_empty(B, H, Nq, D, q)
    out.copy_(_probs_at_v(p, s, v))
    return out, torch.stack([m, log_l])


def _bwd_torch(dout, q, k, v, out, lse, bias, seed, dropout_p, is_causal, causal_offset, scale, bias_requires_grad):
    acc = _acc_dtype(q.dtype)
    s = _scores(q, k, bias, is_causal, causal_offset, scale, acc)
    p = _probs(s, lse[0].to(acc), lse[1].to(acc))
    do = dout.to(acc)
    dp = do @ v.to(acc).transpose(-2, -1)
    keep = _dropout_keep(seed, dropout_p, q, k.shape[2])
    p_drop, dp = _dropped(p, keep, dropout_p), _dropped(dp, keep, dropout_p)
    hidden = s == float("-inf")
    # delta = rowsum(P * dP), which equals rowsum(dO * O) but cancels dP's own rounding where the softmax saturates
    # (there the exact dS is 0; rowsum(dO * O), summed in another order, left |dS| ~ 1 ulp of dP, times |k| in dQ).
    # Where a row does not see a key, dS is 0 even if dP is NaN (non-finite v of a masked key), and such a key's
    # non-finite k (a row's non-finite q) enter dQ = dS @ K (dK = dS^T @ Q) as 0 (0 * NaN would be NaN).
    delta = (p * dp).masked_fill(hidden, 0.0).sum(-1, keepdim=True)
    ds = (p * (dp - delta)).masked_fill(hidden, 0.0)
    kf, qf = k.to(acc), q.to(acc)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dq, dk, dv = _bnhd_empty(B, H, Nq, D, q), _bnhd_empty(B, H, Nk, D, k), _bnhd_empty(B, H, Nk, D, v)
    dq.copy_((ds @ kf.masked_fill(~torch.isfinite(kf), 0.0)) * scale)
    dk.copy_((ds.transpose(-2, -1) @ qf.masked_fill(~torch.isfinite(qf), 0.0)) * scale)
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
    return q.new_empty((2, B, H, Nq), dtype=_acc_dtype(q.dtype))


def _check_op_shapes(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> None:
    """The shapes the kernels index by, checked where the ops are called directly (torch.ops.vitfast.attention: the
    public functions check more, with their callers' layouts): a triton kernel would read past a smaller k, v or
    bias."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[:2] != k.shape[:2] or k.shape != v.shape or (
            q.shape[3] != k.shape[3]):
        raise ValueError(f"vitfast::attention: q (B, H, Nq, D), k and v (B, H, Nk, D) do not agree: "
                         f"{_describe('q', q)}, {_describe('k', k)}, {_describe('v', v)}")
    full = (*q.shape[:3], k.shape[2])
    if bias is not None and (bias.dim() != 4 or any(b != 1 and b != n for b, n in zip(bias.shape, full))):
        raise ValueError(f"vitfast::attention: the mask must broadcast to (B, H, Nq, Nk) = {full} with its own dims, "
                         f"got {_describe('mask', bias)}")


@torch.library.custom_op("vitfast::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], seed: Optional[Tensor], dropout_p: float,
                  is_causal: bool, causal_offset: int, scale: float) -> tuple[Tensor, Tensor]:
    """q: (B, H, Nq, D); k, v: (B, H, Nk, D), any strides; bias: (B|1, H|1, Nq|1, Nk|1) bool or float, any
    strides; seed: (1,) int64 on the CPU when dropout_p > 0. Returns out (B, H, Nq, D) in a (B, Nq, H, D)
    buffer and the softmax statistics lse (2, B, H, Nq) (module docstring)."""
    _check_op_shapes(q, k, v, bias)
    B, H, Nq, D = q.shape
    if q.numel() == 0 or k.shape[2] == 0:
        lse = _lse_empty(q)
        lse[0], lse[1] = float("-inf"), 0.0
        return torch.zeros_like(_bnhd_empty(B, H, Nq, D, q)), lse
    check_dropout_capture(OP, dropout_p, q.device)
    which = _backend.choose_backend(OP, q, k, v, bias, seed)
    seed_value = _backend.seed_value(OP, seed, dropout_p)
    if which == "triton":
        from vitfast.triton.attention import attention_fwd
        return attention_fwd(q, k, v, bias, dropout_p, seed_value, is_causal, causal_offset, scale)
    if which == "cpp":
        return tuple(torch.ops.vitfast.attention_fwd(q, k, v, bias, dropout_p, is_causal, causal_offset, scale))
    return _fwd_torch(q, k, v, bias, seed_value, dropout_p, is_causal, causal_offset, scale)


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
    _check_op_shapes(q, k, v, bias)
    _backend.check_op_shapes("attention_backward", {"dout": (dout, q.shape), "out": (out, q.shape),
                                                    "lse": (lse, (2, *q.shape[:3]))})
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if q.numel() == 0 or Nk == 0:
        dbias = torch.zeros_like(bias, memory_format=torch.contiguous_format) if bias_requires_grad else q.new_empty(0)
        return (torch.zeros_like(_bnhd_empty(B, H, Nq, D, q)), torch.zeros_like(_bnhd_empty(B, H, Nk, D, k)),
                torch.zeros_like(_bnhd_empty(B, H, Nk, D, v)), dbias)
    check_dropout_capture(OP, dropout_p, q.device)
    which = _backend.choose_backend(OP, q, k, v, bias, seed)
    seed_value = _backend.seed_value(OP, seed, dropout_p)
    if which == "triton":
        from vitfast.triton.attention import attention_bwd
        return attention_bwd(dout, q, k, v, out, lse, bias, dropout_p, seed_value, is_causal, causal_offset, scale,
                             bias_requires_grad, deterministic)
    if which == "cpp":
        return tuple(torch.ops.vitfast.attention_bwd(dout, q, k, v, out, lse, bias, dropout_p, is_causal,
                                                     causal_offset, scale, bias_requires_grad))
    return _bwd_torch(dout, q, k, v, out, lse, bias, seed_value, dropout_p, is_causal, causal_offset, scale,
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
    _backend.save_for_backward(ctx, q, k, v, out, lse, bias, seed)
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
_backend.no_double_backward(OP, _attention_backward_op)


def _sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """torch.utils.flop_counter's count (FlopCounterMode) of an op taking q, k, v first (attention, rel_pos_attention:
    its rel terms' additions count none), as for F.scaled_dot_product_attention's kernels."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _sdpa_backward_flops(dout_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """The same for their backward ops, taking dout, q, k, v first."""
    return sdpa_backward_flop_count(dout_shape, q_shape, k_shape, v_shape)


register_flop_formula(torch.ops.vitfast.attention)(_sdpa_flops)
register_flop_formula(torch.ops.vitfast.attention_backward)(_sdpa_backward_flops)


# SDPA's autocast rule: q, k, v and a float mask in the region's dtype.
_autocast.register("attention", _autocast.lower_precision(
    _attention_op, "attention", ("q", "k", "v", "attn_mask")))
_autocast.register("attention_backward", _autocast.keep_dtypes(_attention_backward_op))


def _describe(name: str, t: Tensor) -> str:
    return f"{name} {tuple(t.shape)} {t.dtype} {t.device}"


def _check_inputs(fn: str, layout: str, q: Tensor, k: Tensor, v: Tensor, given: Optional[tuple] = None) -> None:
    """q, k, v already in (B, H, N, D); `layout` names the caller's layout and `given` the caller's q, k, v (their
    shapes in messages; q, k, v when None)."""
    if q.dtype not in _DTYPES:
        raise ValueError(f"vitfast.{fn}: dtype {q.dtype} is not supported (float16, bfloat16, float32, float64)")
    if not (q.dtype == k.dtype == v.dtype or _autocast.is_enabled(q.device)):
        raise ValueError(f"vitfast.{fn}: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype} "
                         f"(they may differ only under autocast, which casts them to its dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"vitfast.{fn}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise ValueError(f"vitfast.{fn}: q, k and v must have one head dim, got {q.shape[-1]}, {k.shape[-1]}, "
                         f"{v.shape[-1]} ({layout})")
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] == 0:
        raise ValueError(f"vitfast.{fn}: head dim {q.shape[-1]} is not supported (1..{MAX_HEAD_DIM})")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape:
        gq, gk, gv = given or (q, k, v)
        raise ValueError(f"vitfast.{fn}: batch and heads of q, k, v must agree and k, v must have one shape "
                         f"({layout}); got q {tuple(gq.shape)}, k {tuple(gk.shape)}, v {tuple(gv.shape)}")


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, *, is_causal: bool = False,
              scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
    """Scaled dot-product attention with the layout and semantics of `F.scaled_dot_product_attention` (the triton
    backend: FlashAttention-2's tiling, Dao, arXiv:2307.08691).

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); one dtype (float16, bfloat16, float32; float64 on the
            cpp and torch backends) and device; D <= 256. Any strides: transposed, a last dim with stride != 1,
            stride-0 (expanded) dims, storage offsets (views of a packed qkv are read in place by the triton
            backend; the cpp backend copies a q, k or v whose last dim is strided, as ATen's kernel needs).
        attn_mask: bool (True = attend) or float (any float dtype, added to the scores in float32, float64 for
            float64 inputs, at its own precision), broadcastable to (B, H, Nq, Nk), any strides; broadcast dims,
            and stride-0 (expanded) dims, are read with stride 0, never materialized.
            A float mask that requires grad gets its gradient, reduced over its broadcast dims (and, through
            autograd, over the dims it was expanded along).
        is_causal: query i sees keys j <= i (top-left alignment, as SDPA); may be combined with attn_mask.
        scale: softmax scale, 1/sqrt(D) by default.
        dropout_p: dropout on the attention weights, seeded from torch's default generator; refused (RuntimeError)
            inside CUDA graph capture, where every replay would reuse the seed.

    Mask semantics (the same on every backend; see the module docstring):
        - bool False, float -inf and causal entries hide keys; a row that sees no key gives zeros (and zero
          gradients);
        - a finite float mask is plain arithmetic, as in SDPA's math: a row all at torch.finfo(float32).min
          gives the mean of v, as SDPA does;
        - a hidden key never affects the rows that do not see it, even if its k or v hold NaN or inf or its
          score overflows.

    Under `torch.use_deterministic_algorithms(True)` the backward uses no atomics (bitwise reproducible). fp32
    products are IEEE fp32 unless `torch.backends.cuda.matmul.allow_tf32` allows TF32, as for torch.matmul
    (vitfast's fp32 rule, vitfast.triton.common).

    Autocast: as F.scaled_dot_product_attention, q, k, v and a float attn_mask are cast to the region's
    dtype (float64 aside), so they may differ in dtype there, and the output is in that dtype.

    Returns:
        (B, H, Nq, D), stored as (B, Nq, H, D) (so `.transpose(1, 2).reshape(B, Nq, H * D)` is free).

    Raises:
        ValueError: q, k or v not 4-D, of different dtypes (outside autocast), devices, batch, heads or head dims, an
            unsupported dtype or head dim, a mask that is not bool or float, on another device, or that does not
            broadcast, dropout_p outside [0, 1), or no backend that takes the inputs.
        NotImplementedError: an input with a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad).
    """
    _backend.check_transforms("attention", q, k, v, attn_mask)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"vitfast.attention: {name} must be 4-D (B, H, N, D), got rank {t.dim()}: "
                             f"{_describe(name, t)}")
    _check_inputs("attention", "(B, H, N, D)", q, k, v)
    bias = _mask_4d(attn_mask, q, k) if attn_mask is not None else None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = _attention_op(q, k, v, bias, _backend.draw_seed("attention", dropout_p), float(dropout_p),
                           bool(is_causal), 0, scale)
    return out


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False) -> Tensor:
    """Attention in flash-attn's layout and signature (flash_attn.flash_attn_func: its first six arguments; not its
    MQA/GQA, k and v with fewer heads than q, nor its keywords after `causal`).

    Args:
        q: (B, Nq, H, D); k, v: (B, Nk, H, D); dtypes, head dims and strides as `attention` takes them (any
            strides, e.g. views of a packed (B, N, 3, H, D) qkv).
        dropout_p: dropout on the attention weights, as `attention`'s.
        softmax_scale: softmax scale, 1/sqrt(D) by default.
        causal: bottom-right aligned, as flash-attn >= 2.1: query i sees keys j <= i + Nk - Nq; a query that
            sees no key (Nq > Nk) gives zeros.

    Autocast: as `attention`.

    Returns:
        (B, Nq, H, D), contiguous.

    Raises:
        ValueError: as `attention`.
        NotImplementedError: an input with a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad).
    """
    _backend.check_transforms("flash_attn_func", q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"vitfast.flash_attn_func: {name} must be 4-D (B, N, H, D), got rank {t.dim()}: "
                             f"{_describe(name, t)}")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    _check_inputs("flash_attn_func", "(B, N, H, D)", qt, kt, vt, (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    offset = kt.shape[2] - qt.shape[2]
    out, _ = _attention_op(qt, kt, vt, None, _backend.draw_seed("flash_attn_func", dropout_p), float(dropout_p),
                           bool(causal), offset, scale)
    return out.transpose(1, 2)


def _mask_4d(mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """The mask as a (B|1, H|1, Nq|1, Nk|1) view (leading dims added), after checking it broadcasts. A dim that
    has stride 0 (an `expand`) becomes the size-1 dim it was expanded from: the kernels then read it as a
    broadcast dim and reduce the mask's gradient over it, and autograd's expand backward gets its shape. Not for a
    leaf that requires grad (an expanded tensor made a leaf) or a mask that retains its grad: their gradient is one
    per element, which the slice's backward would put in the first element only."""
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"vitfast.attention: attn_mask must be bool or floating point, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"vitfast.attention: attn_mask is on {mask.device}, q on {q.device}")
    # (m != 1 and m != t, not m not in (1, t): dynamo takes a symbolic t == m as False inside a tuple)
    if mask.dim() > 4 or any(m != 1 and m != t for m, t in zip(mask.shape[::-1], target[::-1])):
        raise ValueError(f"vitfast.attention: attn_mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"(B, H, Nq, Nk) = {target}")
    mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    expanded = [st == 0 and n > 1 for st, n in zip(mask.stride(), mask.shape)]
    if not any(expanded) or (mask.requires_grad and (mask.is_leaf or mask.retains_grad)):
        return mask
    return mask[tuple(slice(0, 1) if e else slice(None) for e in expanded)]
