"""Swin (shifted) window attention: textbook reference, torch.library ops, autograd, functional API.

`vitfast::window_attention` (forward) and `vitfast::window_attention_backward` are torch.library ops with
fake implementations, so torch.compile sees them whole; each picks its backend at run time: "triton"
(vitfast.triton.window_attention: cyclic shift, padding, window partition, bias gather and shift mask by
index arithmetic in the kernel), "cpp" (csrc/window_attention.cpp, the same fusion on the CPU, registered as
`vitfast::window_attention_fwd` and `vitfast::window_attention_bwd` with the two schemas below, names aside,
`int seed` for the seed's value) or "torch" (the textbook PyTorch below). Every backend shares the schemas, the
saved state (out, lse) and the dropout keep mask (the attention kernels' Philox draw, `dropout_keep_ref`, on each
score's offset in (B, heads, nW, N, N)), so forward and backward may run on different backends, with dropout too.

    window_attention(Tensor qkv, Tensor bias, Tensor? pad_qkv, Tensor? logit_scale, int[2] window_size,
                     int[2] shift_size, float softmax_scale, float dropout_p, Tensor? seed)
        -> (Tensor out, Tensor lse)

    qkv:         (B, H, W, 3, heads, D), any strides with stride(-1) == 1 (e.g. a view of the qkv Linear's
                 output); q, k, v of every pixel of the unpadded feature map.
    bias:        relative position bias, either the table (num_rel = (2wh-1)(2ww-1), heads), read as
                 table[(ty_i - ty_j + wh - 1) * (2ww - 1) + (tx_i - tx_j + ww - 1), head] for tokens
                 i = (ty_i, tx_i), j of a window (token index t = ty * ww + tx), or dense (heads, N, N).
                 Any float dtype; added in fp32, plain arithmetic for finite values of any magnitude (a row at
                 torch.finfo(float32).min weighs its keys equally, as the textbook softmax does; a backward
                 whose saved log-sum-exp has lost log(l) there recomputes that row's statistics). -inf
                 entries are not part of the contract (Swin's shift mask is finite, -100).
    pad_qkv:     (3, heads, D): q, k, v of the padding pixels (rows >= H or columns >= W of the grid padded
                 to multiples of the window), i.e. the qkv bias, since Swin pads the input with zeros
                 before the qkv Linear. None means zeros.
    logit_scale: None for dot-product attention, scores = softmax_scale * q.k; else (heads,) fp32 (fp64
                 for fp64 qkv), the Swin-V2 multiplier already clamped and exponentiated, scores = logit_scale[h] *
                 (q/max(|q|,1e-12)).(k/max(|k|,1e-12)) (softmax_scale is then ignored).
    window_size: (wh, ww), as used (no clamping inside the op). shift_size: (sh, sw), 0 <= s < w, as
                 used (the caller drops it where the window covers the padded map).
    Semantics: pad to (Hp, Wp) = multiples of the window, roll by (-sh, -sw), partition into
                 nW = (Hp/wh)(Wp/ww) windows of N = wh*ww tokens (window index w = wy * (Wp/ww) + wx),
                 scores + bias, + (-100) between tokens of different shift regions when sh + sw > 0 (region
                 per axis of the shifted coordinate p: 0 if p < P - w, 1 if p < P - s, else 2), softmax,
                 dropout with probability dropout_p (score (b, head, w, i, j) kept where
                 dropout_keep_ref(seed, B, heads * nW, N, N, dropout_p) is, scaled by 1 / (1 - dropout_p)), @ v,
                 reverse partition, roll back, crop.
    seed:        (1,) int64 on the CPU, drawn from torch's default generator, where dropout_p > 0; else None. (A
                 tensor, not an int: torch.jit.trace and torch.export keep its draw in the program, where an int
                 became a constant, one dropout mask for every call, or failed non-strict export.) The C++ and
                 Triton launchers take its value as an int.
    out:         (B, H, W, heads * D), qkv's dtype, contiguous.
    lse:         (B, heads, nW, N) fp32, natural-log log-sum-exp of each score row (before dropout).
    Gradients flow to qkv, bias, pad_qkv and logit_scale; window/shift/scale/p/seed are non-differentiable.

    window_attention_backward(Tensor dout, Tensor qkv, Tensor bias, Tensor? pad_qkv, Tensor? logit_scale,
                              Tensor out, Tensor lse, int[2] window_size, int[2] shift_size, float softmax_scale,
                              float dropout_p, Tensor? seed) -> (Tensor dqkv, Tensor dbias, Tensor dpad_qkv,
                              Tensor dlogit_scale)

    dout: (B, H, W, heads * D). dqkv: (B, H, W, 3, heads, D) contiguous, qkv's dtype. dbias: bias's shape
    and dtype, summed over batch and windows. dpad_qkv: (3, heads, D) in pad_qkv's dtype (its q part is
    zero: padding queries are cropped), or empty without pad_qkv. dlogit_scale: (heads,) in logit_scale's
    dtype, or empty (fp32).

Autocast (`_autocast_rule`): qkv and pad_qkv are cast to the region's dtype, as the qkv Linear's output is;
bias and logit_scale are taken as they are and, as in the unfused code (a float32 bias added to low-precision
scores promotes them to float32), enter the scores in fp32; out is in the region's dtype, as attn @ v is.
"""
import math
import numbers
import operator
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

from vitfast import _ext
from vitfast import autocast as _autocast
from vitfast import backend as _backend
from vitfast.ops.attention import check_dropout_capture, dropout_keep
from vitfast.ops.linear import check_linear_args, checked_linear

OP = "window_attention"
MASK_VALUE = -100.0

IntPair = Union[int, Sequence[int]]


def _as_int(x):
    """x as an int (Python, NumPy or symbolic). Raises TypeError for anything else, e.g. a float (truncated before:
    window 2.9 ran as 2), a bool or a tensor. (operator.index, not isinstance: Dynamo traces a NumPy integer as a
    tensor, which isinstance refuses.)"""
    if isinstance(x, (bool, Tensor)):
        raise TypeError
    return x if isinstance(x, torch.SymInt) else operator.index(x)


def _positive_int(v) -> Optional[int]:
    """v as a positive int, or None (a float, bool, tensor or a number below 1)."""
    try:
        v = _as_int(v)
    except TypeError:
        return None
    return v if v >= 1 else None


def _pair(v: IntPair, name: str, fn: str = "vitfast") -> list:
    """[a, b] from an int or a pair of ints (`_as_int`; the pair any iterable: tuple, list, NumPy array, torch.Size),
    for the ops, modules and models that take sizes (window, shift, patch and image sizes); `fn` names the caller in
    the error.

    Raises:
        ValueError: anything else, e.g. a float, a bool or a tensor.
    """
    try:
        # (Dynamo traces a NumPy integer as a 0-d array, not a numbers.Integral; eagerly a 0-d array is refused)
        scalar = isinstance(v, (numbers.Integral, torch.SymInt)) or (
            torch.compiler.is_compiling() and getattr(v, "ndim", None) == 0)
        p = [v, v] if scalar else list(v)
        if len(p) != 2:
            raise TypeError
        return [_as_int(x) for x in p]
    except TypeError:
        raise ValueError(f"{fn}: {name} must be an int or a pair of ints (h, w), got {v!r}") from None


def _positive_pair(v: IntPair, name: str, fn: str) -> list:
    """`_pair`, each entry at least 1 (window, patch and image sizes). Raises ValueError naming fn and name."""
    p = _pair(v, name, fn)
    if min(p) < 1:
        raise ValueError(f"{fn}: {name} must be positive, got {v!r}")
    return p


def _check_num_heads(dim: int, num_heads, fn: str) -> int:
    """For modules and models built with a width and a head count: num_heads as an int (a NumPy int kept as such
    failed torch.compile(dynamic=True)). Raises a ValueError naming fn unless num_heads is a positive int (NumPy's
    too) that divides dim."""
    heads = _positive_int(num_heads)
    if heads is None or dim % heads:
        raise ValueError(f"{fn}: dim={dim} must be divisible by num_heads={num_heads!r}, a positive int")
    return heads


def relative_position_index(window_size: IntPair) -> Tensor:
    """(N*N,) int64: Swin's index into the (num_rel, heads) bias table for each token pair of a window."""
    wh, ww = _pair(window_size, "window_size")
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += wh - 1
    relative_coords[:, :, 1] += ww - 1
    relative_coords[:, :, 0] *= 2 * ww - 1
    return relative_coords.sum(-1).flatten()


def _diagonal_sums(a: Tensor) -> Tensor:
    """(..., n, n) -> (..., 2n - 1): entry d + n - 1 sums a[..., i, j] over i - j = d. Deterministic on every
    device (plain sums: index_add_ adds with atomics on CUDA): row i of a, its columns reversed, is shifted i places
    to the right (a zero-padded row length one short of 2n), so that columns then hold the diagonals."""
    n = a.shape[-1]
    skewed = F.pad(a.flip(-1), (0, n)).flatten(-2)[..., :n * (2 * n - 1)].unflatten(-1, (n, 2 * n - 1))
    return skewed.sum(-2)


def fold_bias_grad(dbias: Tensor, window_size: IntPair) -> Tensor:
    """(heads, N, N) -> (num_rel, heads): the gradient of the relative position bias table from that of the dense
    bias it is read into (relative_position_index): the entry of offset (dy, dx) sums the token pairs at that offset.
    Used by the torch and triton backends."""
    wh, ww = window_size
    heads = dbias.shape[0]
    d = dbias.view(heads, wh, ww, wh, ww).permute(0, 2, 4, 1, 3)  # (heads, xi, xj, yi, yj)
    d = _diagonal_sums(d).permute(0, 3, 1, 2)  # (heads, dy, xi, xj)
    return _diagonal_sums(d).reshape(heads, -1).t().contiguous()  # (heads, dy, dx) -> (num_rel, heads)


def _shift_mask(pad_H: int, pad_W: int, window_size: list, shift_size: list, like: Tensor) -> Tensor:
    """(nW, N, N) of 0 / -100, built as torchvision builds it."""
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    attn_mask = like.new_zeros((pad_H, pad_W))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            attn_mask[h[0]: h[1], w[0]: w[1]] = count
            count += 1
    attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
    attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
    attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, MASK_VALUE).masked_fill(attn_mask == 0, 0.0)


def window_attention_ref(qkv: Tensor, relative_position_bias: Tensor, window_size: IntPair, shift_size: IntPair,
                         qkv_pad: Optional[Tensor] = None, logit_scale: Optional[Tensor] = None,
                         softmax_scale: Optional[float] = None, keep: Optional[Tensor] = None,
                         dropout_p: float = 0.0, return_lse: bool = False):
    """Plain PyTorch, the textbook way: pad, roll, partition, bias gather, mask, softmax, reverse, roll back, crop.

    Args and semantics as the op `vitfast::window_attention` (module docstring); `keep` is an optional
    (B, heads, nW, N, N) bool attention-dropout keep mask (kept entries are scaled by 1/(1 - dropout_p)).
    Returns (B, H, W, heads * D), and the (B, heads, nW, N) fp32 log-sum-exp with `return_lse`.
    """
    B, H, W, _, heads, D = qkv.shape
    window_size, shift_size = _pair(window_size, "window_size"), _pair(shift_size, "shift_size")
    N, C = window_size[0] * window_size[1], heads * D
    x = qkv.reshape(B, H, W, 3 * C)
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    if qkv_pad is not None and (pad_r or pad_b):
        padding = torch.ones(pad_H, pad_W, dtype=torch.bool, device=x.device)
        padding[:H, :W] = False
        x = torch.where(padding[None, :, :, None], qkv_pad.reshape(3 * C).to(x.dtype), x)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], 3 * C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, N, 3 * C)
    qkv_w = x.reshape(B * num_windows, N, 3, heads, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv_w[0], qkv_w[1], qkv_w[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * logit_scale.reshape(heads, 1, 1).to(attn.dtype)
    else:
        q = q * (softmax_scale if softmax_scale is not None else D ** -0.5)
        attn = q.matmul(k.transpose(-2, -1))
    bias = relative_position_bias
    if bias.dim() == 2:
        index = relative_position_index(window_size).to(bias.device)
        bias = bias[index].view(N, N, -1).permute(2, 0, 1)
    attn = attn + bias.reshape(1, heads, N, N).to(attn.dtype)
    if sum(shift_size) > 0:
        attn_mask = _shift_mask(pad_H, pad_W, window_size, shift_size, attn)
        attn = attn.view(B, num_windows, heads, N, N) + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, N, N)
    lse = torch.logsumexp(attn.float(), dim=-1).view(B, num_windows, heads, N).transpose(1, 2)
    attn = F.softmax(attn, dim=-1)
    if keep is not None:
        keep_w = keep.view(B, heads, num_windows, N, N).transpose(1, 2).reshape(-1, heads, N, N)
        attn = attn * keep_w / (1.0 - dropout_p)
    x = attn.matmul(v).transpose(1, 2).reshape(B * num_windows, N, C)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    x = x[:, :H, :W, :].contiguous()
    return (x, lse.contiguous()) if return_lse else x


def shifted_window_attention_ref(input: Tensor, qkv_weight: Tensor, proj_weight: Tensor,
                                 relative_position_bias: Tensor, window_size: list, num_heads: int, shift_size: list,
                                 attention_dropout: float = 0.0, dropout: float = 0.0,
                                 qkv_bias: Optional[Tensor] = None, proj_bias: Optional[Tensor] = None,
                                 logit_scale: Optional[Tensor] = None, training: bool = True) -> Tensor:
    """torchvision.models.swin_transformer.shifted_window_attention, copied: the plain PyTorch reference."""
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = list(shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length: 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        attn = attn * logit_scale
    else:
        q = q * (C // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = _shift_mask(pad_H, pad_W, window_size, shift_size, x)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


# ----------------------------------------------------------------------------------------------- backends

def _dropout_keep(qkv: Tensor, window_size: list, dropout_p: float, seed: int) -> Optional[Tensor]:
    """The keep mask every backend draws, (B, heads, nW, N, N) bool, or None without dropout."""
    if dropout_p <= 0:
        return None
    B, H, W, heads, D, nW, N = _geometry(qkv, window_size)
    return dropout_keep(seed, (B, heads, nW, N, N), dropout_p, qkv.device)


def _fwd_torch(qkv, bias, pad_qkv, logit_scale, window_size, shift_size, softmax_scale, dropout_p, seed):
    """The reference in fp32 (fp64 for fp64 qkv), as the kernels and `_bwd_torch` compute: the bias enters the scores
    in fp32 whatever qkv's dtype; the output is cast to qkv's dtype once."""
    keep = _dropout_keep(qkv, window_size, dropout_p, seed)
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    out, lse = window_attention_ref(qkv.to(acc), bias, window_size, shift_size, pad_qkv, logit_scale, softmax_scale,
                                    keep, dropout_p, return_lse=True)
    B, H, W = qkv.shape[:3]
    return _backend.output_view(out.to(qkv.dtype), (B, H, W, -1)), lse


def _to_windows(x: Tensor, window_size: list, shift_size: list, fill: Optional[Tensor] = None) -> Tensor:
    """(B, H, W, F) -> (B, nW, N, F): pad (with `fill` or zeros), roll by -shift, partition."""
    B, H, W, Fd = x.shape
    wh, ww = window_size
    x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
    Hp, Wp = x.shape[1:3]
    if fill is not None and (Hp, Wp) != (H, W):
        padding = torch.ones(Hp, Wp, dtype=torch.bool, device=x.device)
        padding[:H, :W] = False
        x = torch.where(padding[None, :, :, None], fill.reshape(Fd).to(x.dtype), x)
    x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, Fd).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (Hp // wh) * (Wp // ww), wh * ww, Fd)


def _from_windows(x: Tensor, Hp: int, Wp: int, window_size: list, shift_size: list) -> Tensor:
    """(B, nW, N, F) -> (B, Hp, Wp, F): reverse partition, roll back (no crop)."""
    B, _, _, Fd = x.shape
    wh, ww = window_size
    x = x.view(B, Hp // wh, Wp // ww, wh, ww, Fd).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, Fd)
    return torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))


def _normalize_bwd(dy: Tensor, x: Tensor, eps: float = 1e-12) -> Tensor:
    """Gradient through F.normalize(x, dim=-1) = x / max(|x|, eps)."""
    norm = x.norm(dim=-1, keepdim=True)
    y = x / norm.clamp_min(eps)
    proj = torch.where(norm > eps, (y * dy).sum(-1, keepdim=True), torch.zeros_like(norm))
    return (dy - y * proj) / norm.clamp_min(eps)


def _bwd_torch(dout, qkv, bias, pad_qkv, logit_scale, window_size, shift_size, softmax_scale, dropout_p, seed):
    """The backward written out in PyTorch (a model for a C++ port): windows, recompute P, dS, un-window."""
    B, H, W, _, heads, D = qkv.shape
    wh, ww = window_size
    N, C = wh * ww, heads * D
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    xw = _to_windows(qkv.reshape(B, H, W, 3 * C).to(acc), window_size, shift_size, pad_qkv)
    q, k, v = xw.view(B, -1, N, 3, heads, D).permute(3, 0, 1, 4, 2, 5)  # each (B, nW, heads, N, D)
    nW = q.shape[1]
    if logit_scale is not None:
        qq, kk = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        sc = logit_scale.to(acc).view(1, 1, heads, 1, 1)
    else:
        qq, kk, sc = q, k, softmax_scale
    cos = qq @ kk.transpose(-2, -1)
    dense = bias.to(acc)
    if bias.dim() == 2:
        dense = dense[relative_position_index(window_size).to(bias.device)].view(N, N, heads).permute(2, 0, 1)
    s = cos * sc + dense
    if sum(shift_size) > 0:
        s = s + _shift_mask(Hp, Wp, window_size, shift_size, s).view(1, nW, 1, N, N)
    p = torch.softmax(s, dim=-1)
    do = _to_windows(dout.reshape(B, H, W, C).to(acc), window_size, shift_size)
    do = do.view(B, nW, N, heads, D).transpose(2, 3)
    dp = do @ v.transpose(-2, -1)
    keep = _dropout_keep(qkv, window_size, dropout_p, seed)
    if keep is not None:
        drop = keep.transpose(1, 2).to(acc) / (1.0 - dropout_p)  # (B, nW, heads, N, N)
        pd, dp = p * drop, dp * drop
    else:
        pd = p
    dv = pd.transpose(-2, -1) @ do
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = (ds * sc) @ kk
    dk = (ds * sc).transpose(-2, -1) @ qq
    dscale = qkv.new_empty(0, dtype=torch.float32)
    if logit_scale is not None:
        dscale = (ds * cos).sum((0, 1, 3, 4)).to(logit_scale.dtype)
        dq, dk = _normalize_bwd(dq, q), _normalize_bwd(dk, k)
    dbias = ds.sum((0, 1))  # (heads, N, N)
    if bias.dim() == 2:
        dbias = fold_bias_grad(dbias, window_size)
    grid = torch.stack([dq, dk, dv], dim=3).permute(0, 1, 4, 3, 2, 5).reshape(B, nW, N, 3 * C)
    grid = _from_windows(grid, Hp, Wp, window_size, shift_size)
    dqkv = grid[:, :H, :W].reshape(B, H, W, 3, heads, D).to(qkv.dtype).contiguous()
    dpad = qkv.new_empty(0)
    if pad_qkv is not None:
        dpad = (grid[:, H:].sum((0, 1, 2)) + grid[:, :H, W:].sum((0, 1, 2))).view(3, heads, D).to(pad_qkv.dtype)
    return dqkv, dbias.to(bias.dtype), dpad, dscale


def _check_support(backend: str, tensors: tuple) -> Optional[str]:
    qkv = tensors[0]
    if backend == "triton":
        if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {qkv.dtype} (Triton takes float32, float16, bfloat16)"
        if qkv.shape[-1] > 256:
            return f"head dim {qkv.shape[-1]} > 256"
    return None


_backend.register_op(OP, gpu_order=("triton", "torch"), cpu_order=("cpp", "torch"), check=_check_support)


def _geometry(qkv: Tensor, window_size: Sequence[int]) -> tuple:
    B, H, W, _, heads, D = qkv.shape
    nW = math.ceil(H / window_size[0]) * math.ceil(W / window_size[1])
    return B, H, W, heads, D, nW, window_size[0] * window_size[1]


@torch.library.custom_op("vitfast::window_attention", mutates_args=())
def _window_attention_op(qkv: Tensor, bias: Tensor, pad_qkv: Optional[Tensor], logit_scale: Optional[Tensor],
                         window_size: list[int], shift_size: list[int], softmax_scale: float, dropout_p: float,
                         seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """See the module docstring. Returns out (B, H, W, heads*D) and lse (B, heads, nW, N) fp32."""
    _check_op_shapes(qkv, bias, pad_qkv, logit_scale, window_size, shift_size)
    if qkv.numel() == 0:
        return _fake_fwd(qkv, window_size)
    check_dropout_capture(OP, dropout_p, qkv.device)
    seed = _backend.seed_value(OP, seed, dropout_p)
    which = _backend.choose_backend(OP, qkv, bias, pad_qkv, logit_scale)
    if which == "triton":
        from vitfast.triton.window_attention import window_attention_fwd
        return window_attention_fwd(qkv, bias, pad_qkv, logit_scale, window_size, shift_size, softmax_scale,
                                    dropout_p, seed)
    if which in ("cpp", "cuda"):
        return tuple(torch.ops.vitfast.window_attention_fwd(qkv, bias, pad_qkv, logit_scale, window_size, shift_size,
                                                            softmax_scale, dropout_p, seed))
    return _fwd_torch(qkv, bias, pad_qkv, logit_scale, window_size, shift_size, softmax_scale, dropout_p, seed)


def _check_op_shapes(qkv, bias, pad_qkv, logit_scale, window_size, shift_size) -> None:
    """The shapes the kernels index by, checked where the ops are called directly (torch.ops.vitfast.window_attention;
    the public functions check more): a triton kernel would read past a smaller table, pad_qkv or logit_scale."""
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f"vitfast::{OP}: qkv must be (B, H, W, 3, heads, D), got {tuple(qkv.shape)}")
    heads, D = qkv.shape[4], qkv.shape[5]
    wh, ww = window_size
    if wh < 1 or ww < 1 or not (0 <= shift_size[0] < wh and 0 <= shift_size[1] < ww):
        raise ValueError(f"vitfast::{OP}: window_size {tuple(window_size)} must be positive and shift_size "
                         f"{tuple(shift_size)} in [0, window)")
    N, num_rel = wh * ww, (2 * wh - 1) * (2 * ww - 1)
    if tuple(bias.shape) not in ((num_rel, heads), (heads, N, N)):
        raise ValueError(f"vitfast::{OP}: bias must be a ({num_rel}, {heads}) table or dense ({heads}, {N}, {N}) for "
                         f"window {tuple(window_size)}, got {tuple(bias.shape)}")
    if pad_qkv is not None and tuple(pad_qkv.shape) != (3, heads, D):
        raise ValueError(f"vitfast::{OP}: pad_qkv must be (3, {heads}, {D}), got {tuple(pad_qkv.shape)}")
    if logit_scale is not None and tuple(logit_scale.shape) != (heads,):
        raise ValueError(f"vitfast::{OP}: logit_scale must be ({heads},), got {tuple(logit_scale.shape)}")


def _fake_fwd(qkv, window_size):
    B, H, W, heads, D, nW, N = _geometry(qkv, window_size)
    return qkv.new_empty((B, H, W, heads * D)), qkv.new_empty((B, heads, nW, N), dtype=torch.float32)


@_window_attention_op.register_fake
def _(qkv, bias, pad_qkv, logit_scale, window_size, shift_size, softmax_scale, dropout_p, seed):
    return _fake_fwd(qkv, window_size)


@torch.library.custom_op("vitfast::window_attention_backward", mutates_args=())
def _window_attention_backward_op(dout: Tensor, qkv: Tensor, bias: Tensor, pad_qkv: Optional[Tensor],
                                  logit_scale: Optional[Tensor], out: Tensor, lse: Tensor, window_size: list[int],
                                  shift_size: list[int], softmax_scale: float, dropout_p: float,
                                  seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns dqkv (B, H, W, 3, heads, D), dbias (like bias), dpad_qkv (3, heads, D) or empty, dlogit_scale."""
    _check_op_shapes(qkv, bias, pad_qkv, logit_scale, window_size, shift_size)
    B, H, W, heads, D, nW, N = _geometry(qkv, window_size)
    _backend.check_op_shapes(f"{OP}_backward", {"dout": (dout, (B, H, W, heads * D)),
                                                "out": (out, (B, H, W, heads * D)), "lse": (lse, (B, heads, nW, N))})
    if qkv.numel() == 0:
        return _fake_bwd(qkv, bias, pad_qkv, logit_scale, zero=True)
    check_dropout_capture(OP, dropout_p, qkv.device)
    seed = _backend.seed_value(OP, seed, dropout_p)
    which = _backend.choose_backend(OP, qkv, bias, pad_qkv, logit_scale)
    if which == "triton":
        from vitfast.triton.window_attention import window_attention_bwd
        return window_attention_bwd(dout, qkv, bias, pad_qkv, logit_scale, out, lse, window_size, shift_size,
                                    softmax_scale, dropout_p, seed)
    if which in ("cpp", "cuda"):
        return tuple(torch.ops.vitfast.window_attention_bwd(dout, qkv, bias, pad_qkv, logit_scale, out, lse,
                                                            window_size, shift_size, softmax_scale, dropout_p, seed))
    return _bwd_torch(dout, qkv, bias, pad_qkv, logit_scale, window_size, shift_size, softmax_scale, dropout_p, seed)


def _fake_bwd(qkv, bias, pad_qkv, logit_scale, zero=False):
    new = torch.zeros if zero else torch.empty
    kw = dict(device=qkv.device)
    return (new(qkv.shape, dtype=qkv.dtype, **kw), new(bias.shape, dtype=bias.dtype, **kw),
            new(pad_qkv.shape if pad_qkv is not None else (0,), dtype=(pad_qkv if pad_qkv is not None else qkv).dtype,
                **kw),
            new(logit_scale.shape if logit_scale is not None else (0,),
                dtype=logit_scale.dtype if logit_scale is not None else torch.float32, **kw))


@_window_attention_backward_op.register_fake
def _(dout, qkv, bias, pad_qkv, logit_scale, out, lse, window_size, shift_size, softmax_scale, dropout_p, seed):
    return _fake_bwd(qkv, bias, pad_qkv, logit_scale)


def _setup_context(ctx, inputs, output):
    qkv, bias, pad_qkv, logit_scale, window_size, shift_size, softmax_scale, dropout_p, seed = inputs
    out, lse = output
    _backend.save_for_backward(ctx, qkv, bias, pad_qkv, logit_scale, out, lse, seed)
    ctx.args = (window_size, shift_size, softmax_scale, dropout_p)


def _backward(ctx, dout, dlse):
    qkv, bias, pad_qkv, logit_scale, out, lse, seed = ctx.saved_tensors
    dqkv, dbias, dpad, dscale = _window_attention_backward_op(
        _unit_inner_stride(dout), qkv, bias, pad_qkv, logit_scale, out, lse, *ctx.args, seed)
    return (dqkv, dbias, dpad if pad_qkv is not None else None, dscale if logit_scale is not None else None,
            None, None, None, None, None)


_window_attention_op.register_autograd(_backward, setup_context=_setup_context)
_backend.no_double_backward(OP, _window_attention_backward_op)


def _windows_as_sdpa(qkv_shape, window_size) -> tuple:
    """(B * nW, heads, N, D): the windows' attention as one SDPA's q, k and v shape."""
    B, H, W, _, heads, D = qkv_shape
    return B * _window_count(H, W, window_size), heads, window_size[0] * window_size[1], D


@register_flop_formula(torch.ops.vitfast.window_attention)
def _flops(qkv_shape, bias_shape, pad_shape, scale_shape, window_size, *args, **kwargs) -> int:
    """torch.utils.flop_counter's count (FlopCounterMode): the unfused code's, its two matmuls over the (padded
    map's) windows (the backward: their four, as the unfused backward counts; the kernels' recomputed scores
    aside)."""
    s = _windows_as_sdpa(qkv_shape, window_size)
    return sdpa_flop_count(s, s, s)


@register_flop_formula(torch.ops.vitfast.window_attention_backward)
def _backward_flops(dout_shape, qkv_shape, bias_shape, pad_shape, scale_shape, out_shape_, lse_shape, window_size,
                    *args, **kwargs) -> int:
    s = _windows_as_sdpa(qkv_shape, window_size)
    return 2 * sdpa_flop_count(s, s, s)


def _autocast_rule(device_type, dtype, qkv, bias, pad_qkv, logit_scale, *args):
    """qkv and pad_qkv in the region's dtype (the qkv Linear's output); bias and logit_scale as given."""
    qkv, pad_qkv = _autocast.cast(dtype, qkv), _autocast.cast(dtype, pad_qkv)
    _autocast.check_same_dtype("window_attention", qkv=qkv, qkv_pad=pad_qkv)
    return _window_attention_op(qkv, bias, pad_qkv, logit_scale, *args)


_autocast.register("window_attention", _autocast_rule)
_autocast.register("window_attention_backward", _autocast.keep_dtypes(_window_attention_backward_op))


def _unit_inner_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------ public API

def _check_dense_bias(bias: Tensor, heads: int, n: int, what: str) -> Tensor:
    given = tuple(bias.shape)
    if bias.dim() == 4 and bias.shape[0] == 1:
        bias = bias[0]
    if tuple(bias.shape) != (heads, n, n):
        raise ValueError(f"vitfast.{what}: relative_position_bias must be a (num_rel, heads) table or a "
                         f"(1, heads, N, N) / (heads, N, N) tensor with heads={heads}, N={n}, got {given}")
    return bias


def _check_heads(heads: int, D: int, qkv: Tensor, what: str) -> None:
    if heads == 0 or D == 0:
        raise ValueError(f"vitfast.{what}: qkv (B, H, W, 3, heads, D) = {tuple(qkv.shape)} needs at least one head "
                         f"and a head dim of at least 1")


def _attention_core(qkv: Tensor, bias: Tensor, window_size: list, shift_size: list, qkv_pad: Optional[Tensor],
                    logit_scale: Optional[Tensor], softmax_scale: Optional[float], dropout_p: float,
                    what: str) -> Tensor:
    _backend.check_transforms(what, qkv, bias, qkv_pad, logit_scale)
    B, H, W, three, heads, D = qkv.shape
    _check_heads(heads, D, qkv, what)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"vitfast.{what}: attention_dropout must be in [0, 1), got {dropout_p}")
    N = window_size[0] * window_size[1]
    num_rel = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
    if bias.dim() == 2:
        if tuple(bias.shape) != (num_rel, heads):
            raise ValueError(f"vitfast.{what}: relative position bias table must be ({num_rel}, {heads}) for window "
                             f"{tuple(window_size)} and {heads} heads, got {tuple(bias.shape)}")
    else:
        bias = _check_dense_bias(bias, heads, N, what)
    if bias.device != qkv.device or not bias.is_floating_point():
        raise ValueError(f"vitfast.{what}: relative position bias must be floating point on {qkv.device}, "
                         f"got {bias.dtype} on {bias.device}")
    scale = None
    if logit_scale is not None:
        if logit_scale.numel() != heads or logit_scale.device != qkv.device or not logit_scale.is_floating_point():
            raise ValueError(f"vitfast.{what}: logit_scale must have {heads} floating-point elements (one per head) "
                             f"on {qkv.device}, got shape {tuple(logit_scale.shape)} {logit_scale.dtype} on "
                             f"{logit_scale.device}")
        # fp32, as the unfused code's fp32 parameter gives it, but fp64 for fp64 qkv (whose reference is fp64)
        scale = torch.clamp(logit_scale, max=math.log(100.0)).exp().reshape(heads)
        scale = scale.to(torch.float64 if qkv.dtype == torch.float64 else torch.float32)
    if qkv_pad is not None:
        if qkv_pad.numel() != 3 * heads * D or qkv_pad.device != qkv.device or not qkv_pad.is_floating_point():
            raise ValueError(f"vitfast.{what}: qkv_pad must be {3 * heads * D} (3 * heads * D) floating-point values "
                             f"on {qkv.device}, got {tuple(qkv_pad.shape)} {qkv_pad.dtype} on {qkv_pad.device}")
        # the q, k, v of a padding pixel, in qkv's dtype as the Linear that makes qkv gives them
        qkv_pad = qkv_pad.reshape(3, heads, D).to(qkv.dtype).contiguous()
    softmax_scale = D ** -0.5 if softmax_scale is None else softmax_scale
    out, _ = _window_attention_op(_unit_inner_stride(qkv), bias, qkv_pad, scale, list(window_size), list(shift_size),
                                  float(softmax_scale), float(dropout_p), _backend.draw_seed(what, dropout_p))
    return out


def _used_shift(ws: list, shift: list, H: int, W: int, what: str, modulo: bool = False) -> list:
    """The shift as used: dropped along an axis the window covers (torchvision's rule), else in [0, window). modulo
    (torchvision's function): a shift in [window, padded size) is taken modulo the window, as torchvision's roll
    and shift mask compute (each region of its mask then holds whole windows of the rolled map).

    Raises:
        ValueError: a shift outside [0, window) (with modulo, [0, padded size)) along an axis the window does not
            cover.
    """
    for axis, size in enumerate((H, W)):
        padded = math.ceil(size / ws[axis]) * ws[axis]
        if ws[axis] >= padded:
            shift[axis] = 0
        if modulo and ws[axis] <= shift[axis] < padded:
            shift[axis] %= ws[axis]
        if not 0 <= shift[axis] < ws[axis]:
            limit = "the padded map" if modulo else "window"
            raise ValueError(f"vitfast.{what}: shift_size {tuple(shift)} must be in [0, {limit}) for window "
                             f"{tuple(ws)} on a {H}x{W} map")
    return shift


def window_attention(qkv: Tensor, relative_position_bias: Tensor, window_size: IntPair, shift_size: IntPair = 0, *,
                     qkv_pad: Optional[Tensor] = None, logit_scale: Optional[Tensor] = None,
                     softmax_scale: Optional[float] = None, attention_dropout: float = 0.0, training: bool = True,
                     clamp_window: bool = True) -> Tensor:
    """(Shifted) window attention on a qkv projection in image layout, output in image layout (Swin: Liu et al.,
    arXiv:2103.14030; cosine attention with logit_scale: Swin V2, arXiv:2111.09883).

    Args:
        qkv: (B, H, W, 3, heads, D), float; any strides: with unit inner stride (a view of a Linear's output) it
            is read in place, otherwise copied once.
        relative_position_bias: the (num_rel, heads) table (num_rel = (2wh-1)(2ww-1)), or a dense
            (heads, N, N) / (1, heads, N, N) bias; any strides, any float dtype, added in fp32.
        window_size, shift_size: int or (h, w) pair.
        qkv_pad: (3 * heads * D,) values of q, k, v at padding pixels (the qkv Linear's bias: Swin pads the
            input before the projection), any stride and float dtype (taken in qkv's dtype), or None for zeros.
        logit_scale: Swin-V2 cosine attention: the raw per-head parameter (heads elements); scores are
            cos(q, k) * exp(min(logit_scale, log 100)). None: scaled dot product.
        softmax_scale: dot-product scale, default D ** -0.5.
        attention_dropout, training: dropout on the attention probabilities (when training), in [0, 1); refused
            (RuntimeError) inside CUDA graph capture, where every replay would reuse the host-drawn seed.
        clamp_window: Swin's rule (its square windows: min(H, W) <= window): when the window covers the map
            along an axis (H <= wh or W <= ww), the window shrinks to min(H, W) on both axes and the shift is dropped
            (a table for the full window is cropped to the small one). Without it, only torchvision's rule
            applies: a shift is dropped along an axis the window covers.

    torch.export with a dynamic H or W: the rules above test the map's size against the window, so give the
    dynamic sizes a minimum above it (`torch.export.Dim("H", min=wh + 1)`).

    Autocast: qkv and qkv_pad are cast to the region's dtype, the bias and logit scale are added in fp32
    (as the unfused code's float32 bias promotes the scores), and the output is in the region's dtype.

    fp32 products are IEEE fp32 unless `torch.backends.cuda.matmul.allow_tf32` allows TF32 (vitfast's fp32 rule,
    vitfast.triton.common).

    Returns:
        (B, H, W, heads * D) in qkv's dtype (the region's dtype under autocast), contiguous; empty for an empty
        batch or map.

    Raises:
        ValueError: qkv not (B, H, W, 3, heads, D) or not floating point, a bias of another shape, dtype or
            device, a logit_scale without one element per head, a window_size below 1, a shift outside [0, window),
            no heads or a head dim of 0, a qkv_pad of another size or device, attention_dropout outside [0, 1)
            when training.
        NotImplementedError: an input with a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad).
    """
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f"vitfast.window_attention: qkv must be (B, H, W, 3, heads, D), got {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise ValueError(f"vitfast.window_attention: qkv must be floating point, got {qkv.dtype}")
    B, H, W, _, heads, D = qkv.shape
    _check_heads(heads, D, qkv, "window_attention")
    ws = _positive_pair(window_size, "window_size", "vitfast.window_attention")
    shift = _pair(shift_size, "shift_size", "vitfast.window_attention")
    table = relative_position_bias
    if clamp_window and min(H, W) > 0 and (H <= ws[0] or W <= ws[1]):
        small = [min(ws[0], H, W), min(ws[1], H, W)]
        if small != ws and not _fits(table, small, heads) and _fits(table, ws, heads):
            table = _crop_bias(table, ws, small, heads)  # (a table fitting neither: _attention_core's error)
        ws, shift = small, [0, 0]
    shift = _used_shift(ws, shift, H, W, "window_attention")
    p = attention_dropout if training else 0.0
    return _attention_core(qkv, table, ws, shift, qkv_pad, logit_scale, softmax_scale, p, "window_attention")


def _fits(bias: Tensor, ws: list, heads: int) -> bool:
    """Whether `bias` is already a table or dense bias for window `ws` (Swin builds it for the clamped window)."""
    n, num_rel = ws[0] * ws[1], (2 * ws[0] - 1) * (2 * ws[1] - 1)
    return tuple(bias.shape) == (num_rel, heads) if bias.dim() == 2 else tuple(bias.shape[-2:]) == (n, n)


def _crop_bias(bias: Tensor, ws: list, small: list, heads: int) -> Tensor:
    """A bias made for window `ws`, restricted to the top-left `small` window (Swin's clamped window)."""
    if bias.dim() == 2:
        t = bias.view(2 * ws[0] - 1, 2 * ws[1] - 1, -1)
        t = t[ws[0] - small[0]: ws[0] + small[0] - 1, ws[1] - small[1]: ws[1] + small[1] - 1]
        return t.reshape(-1, bias.shape[-1])
    dense = bias.reshape(-1, ws[0] * ws[1], ws[0] * ws[1])
    idx = (torch.arange(small[0])[:, None] * ws[1] + torch.arange(small[1])[None, :]).flatten().to(bias.device)
    return dense[:, idx][:, :, idx]


def shifted_window_attention(input: Tensor, qkv_weight: Tensor, proj_weight: Tensor, relative_position_bias: Tensor,
                             window_size: list, num_heads: int, shift_size: list, attention_dropout: float = 0.0,
                             dropout: float = 0.0, qkv_bias: Optional[Tensor] = None,
                             proj_bias: Optional[Tensor] = None, logit_scale: Optional[Tensor] = None,
                             training: bool = True) -> Tensor:
    """Drop-in for torchvision.models.swin_transformer.shifted_window_attention (same arguments and results, but
    for where the projection dropout's draws land): Swin's shifted window attention (Liu et al., "Swin Transformer",
    arXiv:2103.14030; V2's cosine attention: arXiv:2111.09883).

    Args:
        input: (B, H, W, C). qkv_weight: (3C, C). proj_weight: (C, C). qkv_bias: (3C,) or None.
        proj_bias: (C,) or None. Any strides (the projections are vitfast.linear's).
        relative_position_bias: (1, heads, N, N) as torchvision's module gathers it, or the (num_rel, heads)
            table itself (no gather at all); any strides.
        window_size, shift_size: [h, w]; the shift is dropped along an axis the window covers, and taken modulo
            the window where it is at least the window but below the padded map (as torchvision computes); not
            mutated.
        num_heads: heads; C must be divisible by it.
        attention_dropout: dropout on the attention probabilities, in [0, 1) (as `window_attention`'s).
        dropout: dropout on the output projection, applied in image layout (torchvision applies it to the shifted,
            partitioned windows: the same rate, other elements, and fewer draws where the map is padded).
        training: whether the two dropouts apply.
        logit_scale: Swin-V2's per-head parameter (heads, 1, 1): cosine attention, and the k part of
            qkv_bias is zeroed, as torchvision does.

    Autocast: the two Linears follow F.linear's rule and the attention core `window_attention`'s, so the
    output is in the region's dtype, as torchvision's.

    torch.export with a dynamic H or W exports (torchvision's function does not: it tests whether the map needs
    padding) where the dynamic sizes have a minimum above the window (`torch.export.Dim("H", min=wh + 1)`), as
    the shift rule tests the map's size.

    Returns:
        (B, H, W, C).

    Raises:
        ValueError: input not (B, H, W, C), C not divisible by num_heads, qkv_weight not (3C, C), proj_weight not
            (C, C), a projection's weight or bias on another device than input or (outside autocast) in another
            dtype, or as `window_attention`.
        NotImplementedError: an input with a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad).
    """
    _backend.check_transforms("shifted_window_attention", input, qkv_weight, proj_weight, relative_position_bias,
                              qkv_bias, proj_bias, logit_scale)
    if input.dim() != 4 or not input.is_floating_point():
        raise ValueError(f"vitfast.shifted_window_attention: input must be floating point (B, H, W, C), got "
                         f"{tuple(input.shape)} {input.dtype}")
    B, H, W, C = input.shape
    try:
        num_heads = _as_int(num_heads)
    except TypeError:
        raise ValueError(f"vitfast.shifted_window_attention: num_heads must be an int, got {num_heads!r}") from None
    if num_heads < 1 or C % num_heads != 0:
        raise ValueError(f"vitfast.shifted_window_attention: channels C={C} must be divisible by num_heads="
                         f"{num_heads}")
    if tuple(qkv_weight.shape) != (3 * C, C) or tuple(proj_weight.shape) != (C, C):
        raise ValueError(f"vitfast.shifted_window_attention: qkv_weight must be (3C, C) = ({3 * C}, {C}) and "
                         f"proj_weight (C, C) = ({C}, {C}) for input {tuple(input.shape)}, got "
                         f"{tuple(qkv_weight.shape)} and {tuple(proj_weight.shape)}")
    for weight, bias, names in ((qkv_weight, qkv_bias, ("input", "qkv_weight", "qkv_bias")),
                                (proj_weight, proj_bias, ("input", "proj_weight", "proj_bias"))):
        check_linear_args("shifted_window_attention", input, weight, bias, names)
    ws = _positive_pair(window_size, "window_size", "vitfast.shifted_window_attention")
    shift = _used_shift(ws, _pair(shift_size, "shift_size", "vitfast.shifted_window_attention"), H, W,
                        "shifted_window_attention", modulo=True)
    pad_H, pad_W = math.ceil(H / ws[0]) * ws[0], math.ceil(W / ws[1]) * ws[1]
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = torch.cat([qkv_bias[:C], torch.zeros_like(qkv_bias[C:2 * C]), qkv_bias[2 * C:]])
    D = C // num_heads
    qkv = checked_linear(input, qkv_weight, qkv_bias).view(B, H, W, 3, num_heads, D)
    # (the op reads pad_qkv at padding pixels only, so passing it where there are none changes nothing; under
    # torch.export it is always passed: a test of the padded size would fix it for a dynamic height or width)
    needs_pad = qkv_bias is not None and (torch.compiler.is_exporting() or pad_H != H or pad_W != W)
    x = _attention_core(qkv, relative_position_bias, ws, shift, qkv_bias if needs_pad else None, logit_scale,
                        None, attention_dropout if training else 0.0, "shifted_window_attention")
    x = checked_linear(x, proj_weight, proj_bias)
    return F.dropout(x, p=dropout, training=training)


# torch.ops.vitfast.window_partition / window_reverse (csrc/window_process.cpp, kernels/window_process.cu: the pad,
# roll and partition of a Swin block and its inverse, for users who keep their own attention) are each other's
# adjoint: the padding partition adds is zeros and reverse crops it, so the gradient of each is the other applied to
# the incoming gradient. Their fakes give the shapes (torch.compile, meta tensors).
def _window_count(H: int, W: int, window_size: Sequence[int]) -> int:
    return (H + window_size[0] - 1) // window_size[0] * ((W + window_size[1] - 1) // window_size[1])


def _check_window_args(op: str, window_size: Sequence[int], shift_size: Sequence[int], H: int = 0, W: int = 0) -> None:
    """The kernels' size checks (csrc/window_process.cpp), with their messages, for the fakes (meta tensors,
    torch.compile, torch.export)."""
    ws, ss = list(window_size), list(shift_size)
    if len(ws) != 2 or len(ss) != 2:
        raise RuntimeError(f"vitfast {op}: window_size and shift_size must be pairs, got {ws} and {ss}")
    if ws[0] <= 0 or ws[1] <= 0:
        raise RuntimeError(f"vitfast {op}: window_size must be positive, got {ws}")
    if not (0 <= ss[0] < ws[0] and 0 <= ss[1] < ws[1]):
        raise RuntimeError(f"vitfast {op}: shift_size {ss} must be in [0, window) for window_size {ws}")
    if H < 0 or W < 0:
        raise RuntimeError(f"vitfast {op}: H and W must be non-negative, got {H}, {W}")


def _partition_fake(x, window_size, shift_size):
    _check_window_args("window_partition", window_size, shift_size)
    B, H, W, C = x.shape
    return x.new_empty(B * _window_count(H, W, window_size), window_size[0] * window_size[1], C)


def _reverse_fake(windows, H, W, window_size, shift_size):
    if windows.dim() != 3:
        raise RuntimeError(f"vitfast window_reverse: windows must be (B * nW, N, C), got {list(windows.shape)}")
    _check_window_args("window_reverse", window_size, shift_size, H, W)
    n, N = _window_count(H, W, window_size), window_size[0] * window_size[1]
    if windows.shape[1] != N or n == 0 or windows.shape[0] % n:
        raise RuntimeError(f"vitfast window_reverse: windows {list(windows.shape)} must be (B * nW, N, C) with N = "
                           f"{N} and nW = {n} for H, W = {H}, {W} and window_size {list(window_size)}")
    return windows.new_empty(windows.shape[0] // n, H, W, windows.shape[2])


def _partition_setup(ctx, inputs, output):
    x, ctx.window_size, ctx.shift_size = inputs
    ctx.shape = x.shape


def _partition_backward(ctx, grad):
    B, H, W, C = ctx.shape
    if H == 0 or W == 0:  # (no windows: window_reverse cannot infer B from them)
        return grad.new_zeros(ctx.shape), None, None
    return torch.ops.vitfast.window_reverse(grad, H, W, ctx.window_size, ctx.shift_size), None, None


def _reverse_setup(ctx, inputs, output):
    _, _, _, ctx.window_size, ctx.shift_size = inputs


def _reverse_backward(ctx, grad):
    return torch.ops.vitfast.window_partition(grad, ctx.window_size, ctx.shift_size), None, None, None, None


if _ext.HAS_EXT:
    torch.library.register_fake("vitfast::window_partition")(_partition_fake)
    torch.library.register_fake("vitfast::window_reverse")(_reverse_fake)
    torch.library.register_autograd("vitfast::window_partition", _partition_backward, setup_context=_partition_setup)
    torch.library.register_autograd("vitfast::window_reverse", _reverse_backward, setup_context=_reverse_setup)
