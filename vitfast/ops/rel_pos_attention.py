"""Attention with decomposed relative positions (SAM, ViTDet, MViTv2): reference, torch.library ops, autograd,
functional API.

MViTv2 (Li et al. 2022, "MViTv2: Improved Multiscale Vision Transformers for Classification and Detection",
arXiv:2112.01526) decomposes the relative-position bias of a query at (y_i, x_i) and a key at (y_j, x_j) of a
kh x kw key grid into a row term and a column term, each computed from the query:

    score[i, j] = scale * q_i . k_j + rel_h[i, j // kw] + rel_w[i, j % kw]
    rel_h[i, r] = q_i . R_h[y_i - r],  rel_w[i, c] = q_i . R_w[x_i - c]

(segment_anything's `add_decomposed_rel_pos`; `decomposed_rel_pos` below computes rel_h and rel_w). Every
library expands the two small terms into a dense (B, H, Nq, Nk) bias; this op never does: its kernels add
rel_h[i, row] + rel_w[i, column] tile by tile and reduce the gradients of rel_h (over each key row) and rel_w
(over each key column) inside the kernel.

`vitfast::rel_pos_attention` (forward) and `vitfast::rel_pos_attention_backward` are torch.library ops with fake
implementations, so torch.compile sees them whole; each picks its backend at run time: "triton"
(vitfast.triton.rel_pos_attention, FlashAttention-2 with the bias from rel_h/rel_w rows), "cpp"
(csrc/rel_pos_attention.cpp, the same fusion on the CPU, as `vitfast::rel_pos_attention_fwd` / `_bwd`) or "torch"
(plain PyTorch with the dense bias, below). All backends share the saved state of vitfast.ops.attention: out in a
(B, Nq, H, D) buffer viewed as (B, H, Nq, D), and the softmax statistics lse (2, B, H, Nq) in fp32 (fp64 for fp64
input), each row's max score and log(sum(exp(s - max))) kept apart (their sum, the log-sum-exp, would lose the log
next to a huge finite bias such as -1e9 or finfo.min), so forward and backward may run on different backends.
Dropout keeps a probability where vitfast.ops.attention.dropout_keep_ref(seed, B, H, Nq, Nk, p) does (Philox on
(seed, batch*head, i, j)); the triton and torch backends implement it, the cpp backend does not (a forced cpp
backend raises, the automatic choice takes torch).

Autocast (vitfast.autocast): like F.scaled_dot_product_attention, q, k and v run in the region's lower-precision
dtype (float64 is never cast); rel_h and rel_w are taken in any float dtype and added in fp32 whatever the region.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from vitfast import autocast as _autocast
from vitfast import backend as _backend
from vitfast.ops.attention import (_acc_dtype, _bnhd_empty, _check_inputs, _describe, _dropout_keep, _dropped, _probs,
                                   _row_stats, _sdpa_backward_flops, _sdpa_flops, check_dropout_capture)

OP = "rel_pos_attention"
# The Triton kernels hold a query block's rel_w row (next power of two of kw columns) in registers.
TRITON_MAX_KW = 128


# --------------------------------------------------------------------------------- relative-position terms

def get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """The relative-position embedding of every (query, key) coordinate pair along one axis, as segment_anything's
    `get_rel_pos`: the table linearly resized to 2 * max(q_size, k_size) - 1 rows when its length differs, and
    the coordinates of the shorter side scaled up to the longer one when q_size != k_size.

    Args:
        q_size, k_size: the query and key grid sizes along the axis.
        rel_pos: (L, C) table.
    Returns:
        (q_size, k_size, C) in rel_pos's dtype and device; differentiable with respect to rel_pos.
    """
    length = int(2 * max(q_size, k_size) - 1)
    table = rel_pos
    if rel_pos.shape[0] != length:
        table = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
        table = table.reshape(-1, length).permute(1, 0)
    # The same arithmetic as segment_anything (torch's default float dtype, truncated), so indices agree exactly.
    q_scale, k_scale = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    return table[((q_coords - k_coords) + (k_size - 1) * k_scale).long()]


def decomposed_rel_pos(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, q_size: Sequence[int],
                       k_size: Sequence[int]) -> tuple:
    """The decomposed relative-position terms of `rel_pos_attention`, as segment_anything's `add_decomposed_rel_pos`
    computes them before it adds them to the dense attention map (MViTv2, arXiv:2112.01526).

    Plain PyTorch (two small einsums); autograd reaches q and the tables through it.

    Args:
        q: (..., Nq, D) queries, unscaled, Nq = q_h * q_w in row-major order (e.g. (B, H, Nq, D) or SAM's
            (B * heads, Nq, D)).
        rel_pos_h: (L_h, D) table of the height axis; rel_pos_w: (L_w, D) of the width axis; q's dtype (any
            dtype under autocast). Resized by linear interpolation when L != 2 * max(q, k) - 1 on that axis.
        q_size: (q_h, q_w); k_size: (k_h, k_w), the query and key grids.
    Returns:
        rel_h (..., Nq, k_h) and rel_w (..., Nq, k_w), in q's dtype (the region's under autocast, whose einsum
        gives it, as segment_anything's code): rel_h[..., i, r] = q_i . R_h[y_i, r] and
        rel_w[..., i, c] = q_i . R_w[x_i, c] with R = get_rel_pos(...).
    Raises:
        ValueError: q_size or k_size is not two positive whole sizes, q's Nq is not q_h * q_w, a table is not 2-D
            with q's head dim or is empty, or dtypes/devices differ.
    """
    for name, size in (("q_size", q_size), ("k_size", k_size)):
        if not hasattr(size, "__len__") or len(size) != 2 or any(
                isinstance(s, (bool, str)) or (isinstance(s, float) and not math.isfinite(s)) or int(s) != s
                or int(s) < 1 for s in size):
            raise ValueError(f"vitfast.decomposed_rel_pos: {name} must be two positive whole sizes (h, w), got "
                             f"{size!r}")
    q_h, q_w = (int(s) for s in q_size)
    k_h, k_w = (int(s) for s in k_size)
    if q.dim() < 2 or q.shape[-2] != q_h * q_w or not q.is_floating_point():
        raise ValueError(f"vitfast.decomposed_rel_pos: q must be floating point (..., Nq, D) with Nq = q_h * q_w = "
                         f"{q_h * q_w} for q_size {(q_h, q_w)}, got {_describe('q', q)}")
    for name, t in (("rel_pos_h", rel_pos_h), ("rel_pos_w", rel_pos_w)):
        if t.dim() != 2 or t.shape[1] != q.shape[-1] or t.shape[0] == 0:
            raise ValueError(f"vitfast.decomposed_rel_pos: {name} must be (L, D) with L >= 1 and D = {q.shape[-1]} "
                             f"(q's head dim), got {_describe(name, t)}")
        if t.device != q.device or (t.dtype != q.dtype and not _autocast.is_enabled(q.device)):
            raise ValueError(f"vitfast.decomposed_rel_pos: {name} must have q's dtype and device "
                             f"({q.dtype}, {q.device}), got {t.dtype}, {t.device}")
    r_q = q.reshape(*q.shape[:-2], q_h, q_w, q.shape[-1])
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, get_rel_pos(q_h, k_h, rel_pos_h))
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, get_rel_pos(q_w, k_w, rel_pos_w))
    return rel_h.reshape(*q.shape[:-1], k_h), rel_w.reshape(*q.shape[:-1], k_w)


# ------------------------------------------------------------------------------------------- reference

def _dense_bias(rel_h: Tensor, rel_w: Tensor, dtype: torch.dtype) -> Tensor:
    """(B|1, H|1, Nq, kh * kw) in `dtype`: rel_h[..., i, j // kw] + rel_w[..., i, j % kw]."""
    bias = rel_h.to(dtype)[..., :, None] + rel_w.to(dtype)[..., None, :]
    return bias.flatten(-2)


def rel_pos_attention_ref(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: Optional[float] = None,
                          dropout_keep: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Plain PyTorch in the dtype of q, the way the libraries compute it: a dense (B, H, Nq, Nk) bias.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); rel_h: (B|1, H|1, Nq, kh); rel_w: (B|1, H|1, Nq, kw); Nk = kh * kw.
        scale: 1/sqrt(D) by default.
        dropout_keep: (B, H, Nq, Nk) bool keep-mask, applied with scale 1 / (1 - dropout_p).
    Returns:
        (B, H, Nq, D).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale + _dense_bias(rel_h, rel_w, q.dtype)
    p = torch.softmax(s, -1)
    if dropout_keep is not None:
        p = p * dropout_keep / (1.0 - dropout_p)
    return p @ v


# ------------------------------------------------------------------------------------------- backends

def _probs_torch(q, k, rel_h, rel_w, scale, lse=None):
    """Softmax probabilities in the accumulation dtype and the softmax statistics lse (2, B, H, Nq), the attention
    op's (the row max and log(sum exp(s - m)) kept apart; computed when not given)."""
    acc = _acc_dtype(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale + _dense_bias(rel_h, rel_w, acc)
    if lse is None:
        lse = torch.stack(_row_stats(s))
    return _probs(s, lse[0].to(acc), lse[1].to(acc)), lse


def _fwd_torch(q, k, v, rel_h, rel_w, seed, dropout_p, scale):
    p, lse = _probs_torch(q, k, rel_h, rel_w, scale)
    p = _dropped(p, _dropout_keep(seed, dropout_p, q, k.shape[2]), dropout_p)
    B, H, Nq, D = q.shape
    out = _bnhd_empty(B, H, Nq, D, q)
    out.copy_(p @ v.to(p.dtype))
    return out, lse


def _bwd_torch(dout, q, k, v, rel_h, rel_w, out, lse, seed, dropout_p, scale):
    p, _ = _probs_torch(q, k, rel_h, rel_w, scale, lse)
    acc = p.dtype
    do = dout.to(acc)
    dp = do @ v.to(acc).transpose(-2, -1)
    keep = _dropout_keep(seed, dropout_p, q, k.shape[2])
    p_drop, dp = _dropped(p, keep, dropout_p), _dropped(dp, keep, dropout_p)
    # delta = rowsum(P * dP), as vitfast.attention's torch backend: rowsum(dO * O) left |dS| ~ 1 ulp of dP where the
    # softmax saturates (exact dS 0), summed over the queries into dK and the rel terms' gradients
    delta = (p * dp).masked_fill(p == 0, 0.0).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dq, dk, dv = _bnhd_empty(B, H, Nq, D, q), _bnhd_empty(B, H, Nk, D, k), _bnhd_empty(B, H, Nk, D, v)
    dq.copy_((ds @ k.to(acc)) * scale)
    dk.copy_((ds.transpose(-2, -1) @ q.to(acc)) * scale)
    dv.copy_(p_drop.transpose(-2, -1) @ do)
    ds = ds.view(B, H, Nq, rel_h.shape[-1], rel_w.shape[-1])
    return (dq, dk, dv, ds.sum(-1).sum_to_size(rel_h.shape).to(rel_h.dtype),
            ds.sum(-2).sum_to_size(rel_w.shape).to(rel_w.dtype))


def _check_support(backend: str, tensors: tuple) -> Optional[str]:
    q, rel_w = tensors[0], tensors[4]
    if backend == "triton":
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {q.dtype} (Triton takes float32, float16, bfloat16)"
        if rel_w.shape[-1] > TRITON_MAX_KW:
            return f"key grid width kw = {rel_w.shape[-1]} (Triton takes kw <= {TRITON_MAX_KW})"
    # The dropout seed, an int64 tensor, is among the tensors exactly when dropout_p > 0.
    if backend == "cpp" and any(t.dtype == torch.int64 for t in tensors):
        return "dropout (the C++ kernels have no Philox mask; the triton and torch backends do)"
    return None


_backend.register_op(OP, gpu_order=("triton", "torch"), cpu_order=("cpp", "torch"), check=_check_support)


# ------------------------------------------------------------------------------------ torch.library ops

def _fake_fwd(q):
    B, H, Nq, D = q.shape
    return _bnhd_empty(B, H, Nq, D, q), q.new_empty((2, B, H, Nq), dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("vitfast::rel_pos_attention", mutates_args=())
def _rel_pos_attention_op(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, seed: Optional[Tensor],
                          dropout_p: float, scale: float) -> tuple[Tensor, Tensor]:
    """q: (B, H, Nq, D); k, v: (B, H, Nk, D); rel_h: (B|1, H|1, Nq, kh); rel_w: (B|1, H|1, Nq, kw), Nk = kh * kw;
    seed: (1,) int64 on the CPU when dropout_p > 0. Returns out (B, H, Nq, D) in a (B, Nq, H, D) buffer and the
    softmax statistics lse (2, B, H, Nq) in the accumulation dtype, in vitfast.ops.attention's format: lse[0] each
    row's max score m (-inf for a row with no visible key), lse[1] log(sum(exp(s - m))) (0 then), kept apart so
    that a huge finite bias (-1e9, finfo.min) cannot absorb log(l) as m + log(l) would."""
    _check_shapes(q, k, v, rel_h, rel_w)
    if q.numel() == 0 or k.shape[2] == 0:
        out, lse = _fake_fwd(q)
        lse[0], lse[1] = float("-inf"), 0.0
        return out.zero_(), lse
    check_dropout_capture(OP, dropout_p, q.device)
    which = _backend.choose_backend(OP, q, k, v, rel_h, rel_w, seed)
    seed_value = _backend.seed_value(OP, seed, dropout_p)
    if which == "triton":
        from vitfast.triton.rel_pos_attention import rel_pos_attention_fwd
        return rel_pos_attention_fwd(q, k, v, rel_h, rel_w, dropout_p, seed_value, scale)
    if which == "cpp":
        return tuple(torch.ops.vitfast.rel_pos_attention_fwd(q, k, v, rel_h, rel_w, scale))
    return _fwd_torch(q, k, v, rel_h, rel_w, seed_value, dropout_p, scale)


@_rel_pos_attention_op.register_fake
def _(q, k, v, rel_h, rel_w, seed, dropout_p, scale):
    return _fake_fwd(q)


def _fake_bwd(q, k, rel_h, rel_w):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    return (_bnhd_empty(B, H, Nq, D, q), _bnhd_empty(B, H, Nk, D, k), _bnhd_empty(B, H, Nk, D, k),
            rel_h.new_empty(rel_h.shape), rel_w.new_empty(rel_w.shape))


@torch.library.custom_op("vitfast::rel_pos_attention_backward", mutates_args=())
def _rel_pos_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor,
                                   out: Tensor, lse: Tensor, seed: Optional[Tensor], dropout_p: float,
                                   scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv (in (B, N, H, D) buffers), drel_h and drel_w (the shapes and dtypes of rel_h and rel_w,
    reduced over their broadcast batch and head dims)."""
    _check_shapes(q, k, v, rel_h, rel_w)
    _backend.check_op_shapes("rel_pos_attention_backward", {"dout": (dout, q.shape), "out": (out, q.shape),
                                                            "lse": (lse, (2, *q.shape[:3]))})
    if q.numel() == 0 or k.shape[2] == 0:
        return tuple(t.zero_() for t in _fake_bwd(q, k, rel_h, rel_w))
    check_dropout_capture(OP, dropout_p, q.device)
    which = _backend.choose_backend(OP, q, k, v, rel_h, rel_w, seed)
    seed_value = _backend.seed_value(OP, seed, dropout_p)
    if which == "triton":
        from vitfast.triton.rel_pos_attention import rel_pos_attention_bwd
        return rel_pos_attention_bwd(dout, q, k, v, rel_h, rel_w, out, lse, dropout_p, seed_value, scale)
    if which == "cpp":
        return tuple(torch.ops.vitfast.rel_pos_attention_bwd(dout, q, k, v, rel_h, rel_w, out, lse, scale))
    return _bwd_torch(dout, q, k, v, rel_h, rel_w, out, lse, seed_value, dropout_p, scale)


@_rel_pos_attention_backward_op.register_fake
def _(dout, q, k, v, rel_h, rel_w, out, lse, seed, dropout_p, scale):
    return _fake_bwd(q, k, rel_h, rel_w)


def _setup_context(ctx, inputs, output):
    q, k, v, rel_h, rel_w, seed, dropout_p, scale = inputs
    out, lse = output
    _backend.save_for_backward(ctx, q, k, v, rel_h, rel_w, out, lse, seed)
    ctx.dropout_p = dropout_p
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, rel_h, rel_w, out, lse, seed = ctx.saved_tensors
    grads = _rel_pos_attention_backward_op(dout, q, k, v, rel_h, rel_w, out, lse, seed, ctx.dropout_p, ctx.scale)
    return *grads, None, None, None


_rel_pos_attention_op.register_autograd(_backward, setup_context=_setup_context)
_backend.no_double_backward(OP, _rel_pos_attention_backward_op)


register_flop_formula(torch.ops.vitfast.rel_pos_attention)(_sdpa_flops)  # (attention's counts)
register_flop_formula(torch.ops.vitfast.rel_pos_attention_backward)(_sdpa_backward_flops)


def _autocast_rule(device_type, dtype, q, k, v, rel_h, rel_w, seed, dropout_p, scale):
    """SDPA's rule for q, k and v (the region's dtype); rel_h and rel_w keep theirs, as the op adds them in fp32."""
    q, k, v = (_autocast.cast(dtype, t) for t in (q, k, v))
    _autocast.check_same_dtype("rel_pos_attention", q=q, k=k, v=v)
    return _rel_pos_attention_op(q, k, v, rel_h, rel_w, seed, dropout_p, scale)


_autocast.register("rel_pos_attention", _autocast_rule)
_autocast.register("rel_pos_attention_backward", _autocast.keep_dtypes(_rel_pos_attention_backward_op))


# ----------------------------------------------------------------------------------------- public API

def _check_rel(name: str, rel: Tensor, q: Tensor) -> None:
    B, H, Nq, _ = q.shape
    # (!= twice, not `not in (1, B)`: dynamo takes a symbolic B equal to the size as False inside a tuple)
    if (rel.dim() != 4 or (rel.shape[0] != 1 and rel.shape[0] != B) or (rel.shape[1] != 1 and rel.shape[1] != H)
            or rel.shape[2] != Nq):
        raise ValueError(f"vitfast.rel_pos_attention: {name} must be (B|1, H|1, Nq, n) = ({B}|1, {H}|1, {Nq}, n) "
                         f"for q {tuple(q.shape)}, got {_describe(name, rel)}")
    if not rel.is_floating_point() or rel.device != q.device:
        raise ValueError(f"vitfast.rel_pos_attention: {name} must be floating point on q's device {q.device}, got "
                         f"{_describe(name, rel)}")


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> None:
    """The public function's shape checks, run by the ops too (called directly, torch.ops.vitfast.rel_pos_attention
    took rel terms of another Nq or key grid to a kernel that read past them)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"vitfast.rel_pos_attention: {name} must be 4-D (B, H, N, D), got rank {t.dim()}: "
                             f"{_describe(name, t)}")
    _check_inputs("rel_pos_attention", "(B, H, N, D)", q, k, v)
    _check_rel("rel_h", rel_h, q)
    _check_rel("rel_w", rel_w, q)
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    if kh * kw != k.shape[2]:
        raise ValueError(f"vitfast.rel_pos_attention: k has Nk = {k.shape[2]} keys but rel_h and rel_w give a "
                         f"kh x kw = {kh} x {kw} = {kh * kw} key grid ({_describe('k', k)}, "
                         f"{_describe('rel_h', rel_h)}, {_describe('rel_w', rel_w)})")


def rel_pos_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: Optional[float] = None,
                      dropout_p: float = 0.0) -> Tensor:
    """softmax(scale * q @ k^T + rel_h[..., j // kw] + rel_w[..., j % kw]) @ v, never forming the (Nq, Nk) bias.

    segment_anything's attention with `add_decomposed_rel_pos` (MViTv2, arXiv:2112.01526), fused as
    FlashAttention-2 (Dao 2023, arXiv:2307.08691): key j sits at row j // kw and column j % kw of the kh x kw
    key grid; the bias of a score is read from the two small terms (e.g. from `decomposed_rel_pos`) tile by tile.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D) with Nk = kh * kw; one dtype (float16, bfloat16, float32; float64 on
            the cpp and torch backends) and device; D <= 256. Any strides (views of a packed qkv are read in place).
        rel_h: (B|1, H|1, Nq, kh); rel_w: (B|1, H|1, Nq, kw): any float dtype, added in fp32 (fp64 for fp64 q);
            a batch or head dim of size 1 is broadcast (read with stride 0, never expanded). Both get gradients,
            reduced over their broadcast dims.
        scale: softmax scale, D ** -0.5 by default.
        dropout_p: dropout on the attention weights, seeded from torch's default generator (the triton and torch
            backends; the automatic choice skips cpp); refused (RuntimeError) inside CUDA graph capture, where every
            replay would reuse the seed. fp32 products are IEEE fp32 unless `torch.backends.cuda.matmul.allow_tf32`
            allows TF32 (vitfast's fp32 rule, vitfast.triton.common).

    Returns:
        (B, H, Nq, D), stored as (B, Nq, H, D) (so `.transpose(1, 2).reshape(B, Nq, H * D)` is free).

    Raises:
        ValueError: shapes that do not agree (named with their shapes, dtypes and devices), Nk != kh * kw,
            an unsupported dtype or head dim, dropout_p outside [0, 1), or a forced backend that cannot take the
            inputs (the triton backend takes kw <= 128 and no float64; the cpp backend no dropout).
        NotImplementedError: an input with a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad).
    """
    _backend.check_transforms("rel_pos_attention", q, k, v, rel_h, rel_w)
    _check_shapes(q, k, v, rel_h, rel_w)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = _rel_pos_attention_op(q, k, v, rel_h, rel_w, _backend.draw_seed("rel_pos_attention", dropout_p),
                                   float(dropout_p), scale)
    return out
