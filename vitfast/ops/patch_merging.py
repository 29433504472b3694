"""Fused Swin patch merging: reference, torch.library ops, autograd, functional API.

    x (B, H, W, C) -> zero-pad odd H/W -> cat [x(0::2, 0::2), x(1::2, 0::2), x(0::2, 1::2), x(1::2, 1::2)]
      -> LayerNorm(4C) -> Linear(4C -> N, no bias) -> (B, ceil(H/2), ceil(W/2), N)

The channel order is Swin's x0, x1, x2, x3 (torchvision's `_patch_merging_pad`; timm's reshape/permute
`x.reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5)` gives the same order), so both libraries'
weights apply unchanged.

`vitfast::patch_merging` and `vitfast::patch_merging_backward` are torch.library ops with fake
implementations; each picks its backend at run time: "triton" (vitfast.triton.patch_merging), "cpp" (the
extension's vitfast::patch_merging_fwd/_bwd) or "torch" (plain PyTorch below). All share the saved state:
the input itself and the per-row LayerNorm mean/rstd (fp32; fp64 for fp64 input); the gathered matrix is
never stored. Under autocast every floating-point input is cast to the region's dtype (`patch_merging`).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from vitfast import autocast as _autocast
from vitfast import backend as _backend
from vitfast.ops import layer_norm as _ln

OP = "patch_merging"


def patch_merging_ref(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                      reduction_weight: Tensor, eps: float = 1e-5) -> Tensor:
    """The textbook sequence (torchvision's PatchMerging.forward): pad, slice, cat, LayerNorm, linear."""
    x = merge_2x2(x)
    x = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    return F.linear(x, reduction_weight)


def merge_2x2(x: Tensor) -> Tensor:
    """(..., H, W, C) -> (..., ceil(H/2), ceil(W/2), 4C), torchvision's way: zero-pad odd H and W, then concatenate
    the four pixels of each 2x2 patch, (0, 0), (1, 0), (0, 1), (1, 1)."""
    H, W = x.shape[-3:-1]
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    return torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)


def _gather(x: Tensor) -> Tensor:
    """(B, H, W, C) -> (B*H2*W2, 4C) merged rows (one copy)."""
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    H2, W2 = x.shape[1] // 2, x.shape[2] // 2
    return x.reshape(B, H2, 2, W2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B * H2 * W2, 4 * C)


def _scatter(dxg: Tensor, shape) -> Tensor:
    """Adjoint of _gather: (M, 4C) -> (B, H, W, C), dropping the padding."""
    B, H, W, C = shape
    H2, W2 = (H + 1) // 2, (W + 1) // 2
    d = dxg.view(B, H2, W2, 2, 2, C).permute(0, 1, 4, 2, 3, 5).reshape(B, 2 * H2, 2 * W2, C)
    return d[:, :H, :W].contiguous()


def _fwd_torch(x, nw, nb, rw, eps):
    B, H, W, _ = x.shape
    y, _, mean, rstd = _ln._fwd_torch(_gather(x), nw, nb, None, eps)
    return _backend.output_view(y @ rw.t(), (B, (H + 1) // 2, (W + 1) // 2, rw.shape[0])), mean, rstd


def _bwd_torch(dy, x, nw, nb, rw, mean, rstd):
    xg = _gather(x)
    acc = mean.dtype
    xhat = (xg.to(acc) - mean[:, None]) * rstd[:, None]
    ln = xhat * nw.to(acc) if nw is not None else xhat
    ln = (ln + nb.to(acc) if nb is not None else ln).to(x.dtype)
    drw = (dy.t().to(acc) @ ln.to(acc)).to(rw.dtype)
    dln = dy @ rw
    dxg, dnw, dnb = _ln._bwd_torch(dln, None, xg, nw, mean, rstd, nb is not None)
    return _scatter(dxg, x.shape), dnw, dnb, drw


def _check_support(backend: str, tensors: tuple) -> Optional[str]:
    x = tensors[0]
    if backend == "cpp" and not hasattr(torch.ops.vitfast, "patch_merging_fwd"):
        return "vitfast._C was built without patch_merging_fwd; rebuild the extension"
    if backend == "triton" and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} (Triton takes float32, float16, bfloat16)"
    return None


_backend.register_op(OP, gpu_order=("triton", "torch"), cpu_order=("cpp", "torch"), check=_check_support)


def _check_op_shapes(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                     reduction_weight: Tensor) -> None:
    if x.dim() != 4 or reduction_weight.dim() != 2:
        raise ValueError(f"vitfast::{OP}: x must be (B, H, W, C) and reduction_weight (N, 4C), got {tuple(x.shape)}, "
                         f"{tuple(reduction_weight.shape)}")
    C4 = 4 * x.shape[3]
    _backend.check_op_shapes(OP, {"norm_weight": (norm_weight, (C4,)), "norm_bias": (norm_bias, (C4,)),
                                  "reduction_weight": (reduction_weight, (reduction_weight.shape[0], C4))})


@torch.library.custom_op("vitfast::patch_merging", mutates_args=())
def _patch_merging_op(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                      reduction_weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, H, W, C); norm (4C,); reduction (N, 4C). Returns out (B, H2, W2, N), mean, rstd (B*H2*W2,)."""
    _check_op_shapes(x, norm_weight, norm_bias, reduction_weight)
    which = _backend.choose_backend(OP, x, norm_weight, norm_bias, reduction_weight)
    if which == "triton":
        from vitfast.triton.patch_merging import patch_merging_fwd
        return patch_merging_fwd(x, norm_weight, norm_bias, reduction_weight, eps)
    if which in ("cpp", "cuda"):
        return tuple(torch.ops.vitfast.patch_merging_fwd(x, norm_weight, norm_bias, reduction_weight, eps))
    return _fwd_torch(x, norm_weight, norm_bias, reduction_weight, eps)


@_patch_merging_op.register_fake
def _(x, norm_weight, norm_bias, reduction_weight, eps):
    B, H, W, _ = x.shape
    H2, W2 = (H + 1) // 2, (W + 1) // 2
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    M = B * H2 * W2
    return (x.new_empty(B, H2, W2, reduction_weight.shape[0]), x.new_empty(M, dtype=stats),
            x.new_empty(M, dtype=stats))


@torch.library.custom_op("vitfast::patch_merging_backward", mutates_args=())
def _patch_merging_backward_op(dy: Tensor, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                               reduction_weight: Tensor, mean: Tensor,
                               rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dy (M, N) unit inner stride. Returns dx (B, H, W, C), dnorm_weight, dnorm_bias (4C,) or empty,
    dreduction_weight (N, 4C)."""
    _check_op_shapes(x, norm_weight, norm_bias, reduction_weight)
    B, H, W, _ = x.shape
    M = B * ((H + 1) // 2) * ((W + 1) // 2)
    _backend.check_op_shapes(f"{OP}_backward", {"dy": (dy, (M, reduction_weight.shape[0])), "mean": (mean, (M,)),
                                                "rstd": (rstd, (M,))})
    which = _backend.choose_backend(OP, x, dy, norm_weight, norm_bias, reduction_weight)
    if which == "triton":
        from vitfast.triton.patch_merging import patch_merging_bwd
        return patch_merging_bwd(dy, x, norm_weight, norm_bias, reduction_weight, mean, rstd)
    if which in ("cpp", "cuda"):
        return tuple(torch.ops.vitfast.patch_merging_bwd(dy, x, norm_weight, norm_bias, reduction_weight, mean,
                                                         rstd))
    return _bwd_torch(dy, x, norm_weight, norm_bias, reduction_weight, mean, rstd)


@_patch_merging_backward_op.register_fake
def _(dy, x, norm_weight, norm_bias, reduction_weight, mean, rstd):
    p = reduction_weight
    return (x.new_empty(x.shape), p.new_empty(norm_weight.shape if norm_weight is not None else (0,)),
            p.new_empty(norm_bias.shape if norm_bias is not None else (0,)), p.new_empty(p.shape))


def _setup_context(ctx, inputs, output):
    x, nw, nb, rw, eps = inputs
    _, mean, rstd = output
    _backend.save_for_backward(ctx, x, nw, nb, rw, mean, rstd)


def _backward(ctx, dout, dmean, drstd):
    x, nw, nb, rw, mean, rstd = ctx.saved_tensors
    dy = dout.reshape(-1, dout.shape[-1])
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx, dnw, dnb, drw = _patch_merging_backward_op(dy, x, nw, nb, rw, mean, rstd)
    return dx, dnw if nw is not None else None, dnb if nb is not None else None, drw, None


_patch_merging_op.register_autograd(_backward, setup_context=_setup_context)
_backend.no_double_backward(OP, _patch_merging_backward_op)


def _linear_flops(x_shape, reduction_weight_shape) -> int:
    """2 M 4C N: the reduction Linear's multiply-adds, as torch.utils.flop_counter counts it."""
    *lead, H, W, C = x_shape
    return 2 * math.prod(lead) * ((H + 1) // 2) * ((W + 1) // 2) * 4 * C * reduction_weight_shape[0]


@register_flop_formula(torch.ops.vitfast.patch_merging)
def _flops(x_shape, norm_weight_shape, norm_bias_shape, reduction_weight_shape, *args, **kwargs) -> int:
    """torch.utils.flop_counter's count (FlopCounterMode): the reduction Linear's (LayerNorm counts none)."""
    return _linear_flops(x_shape, reduction_weight_shape)


@register_flop_formula(torch.ops.vitfast.patch_merging_backward)
def _backward_flops(dy_shape, x_shape, norm_weight_shape, norm_bias_shape, reduction_weight_shape, *args,
                    **kwargs) -> int:
    return 2 * _linear_flops(x_shape, reduction_weight_shape)  # dx and dW
_autocast.register("patch_merging", _autocast.lower_precision(
    _patch_merging_op, "patch_merging", ("x", "norm_weight", "norm_bias", "reduction_weight")))
_autocast.register("patch_merging_backward", _autocast.keep_dtypes(_patch_merging_backward_op))


def patch_merging(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], reduction_weight: Tensor,
                  eps: float = 1e-5) -> Tensor:
    """Swin's PatchMerging (arXiv:2103.14030; torchvision's PatchMerging): 2x2 gather (odd sizes zero-padded),
    LayerNorm(4C), Linear(4C -> N, no bias).

    Args:
        x: (..., H, W, C) channels-last (timm's and torchvision's Swin layout), any strides: the triton and cpp
            kernels gather the 2x2 neighbourhoods through the strides (expanded dims too).
        norm_weight, norm_bias: (4C,) or None, any stride. reduction_weight: (N, 4C) (`reduction.weight`), any
            strides (non-contiguous parameters are copied into contiguous ones).
        eps: the LayerNorm's epsilon (statistics as vitfast.layer_norm's: a constant row gives exactly its bias).
        Every tensor has x's dtype and device.

    Autocast: x and the parameters are cast to the region's dtype (so their dtypes may differ there), the
    LayerNorm statistics are fp32 and the output is in the region's dtype, as the unfused Linear's. Unlike
    the unfused code, whose LayerNorm reads a float32 x, the fused kernel reads x rounded to that dtype.

    fp32 products are IEEE fp32 unless `torch.backends.cuda.matmul.allow_tf32` allows TF32 (vitfast's fp32 rule,
    vitfast.triton.common).

    Returns:
        (..., ceil(H/2), ceil(W/2), N), contiguous.

    Raises:
        ValueError: x of fewer than 3 dims or not floating point, or a parameter of another shape, device or dtype
            (the dtype of x outside autocast).
        NotImplementedError: an input with a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad).
    """
    _backend.check_transforms("patch_merging", x, norm_weight, norm_bias, reduction_weight)
    if x.dim() < 3:
        raise ValueError(f"vitfast.patch_merging: x must be (..., H, W, C), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"vitfast.patch_merging: x must be floating point, got {x.dtype}")
    lead = x.shape[:-3]
    H, W, C = x.shape[-3:]
    K = 4 * C
    for name, t, shape in (("norm_weight", norm_weight, (K,)), ("norm_bias", norm_bias, (K,)),
                           ("reduction_weight", reduction_weight, (reduction_weight.shape[0], K))):
        if t is None:
            continue
        if (t.dim() != len(shape) or tuple(t.shape) != shape or t.device != x.device or not t.is_floating_point()
                or (t.dtype != x.dtype and not _autocast.is_enabled(x.device))):
            raise ValueError(f"vitfast.patch_merging: {name} must have shape {shape} (4C = {K} for C = {C}), dtype "
                             f"{x.dtype} (any floating point under autocast) and device {x.device}, got "
                             f"{tuple(t.shape)} {t.dtype} {t.device}")
    x4 = x.reshape(math.prod(lead), H, W, C)  # (not -1: it cannot be inferred for an empty map)
    out, _, _ = _patch_merging_op(x4, norm_weight, norm_bias, reduction_weight, float(eps))
    return out.view(*lead, *out.shape[1:])
