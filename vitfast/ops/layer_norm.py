"""LayerNorm with an optional fused residual add: reference, torch.library ops, autograd, functional API.

`vitfast::layer_norm` (forward) and `vitfast::layer_norm_backward` are torch.library ops with fake
implementations, so torch.compile sees them whole; each picks its backend at run time:
"triton" (vitfast.triton.layer_norm), "cuda"/"cpp" (the extension's vitfast::layer_norm_fwd/_bwd),
or "torch" (plain PyTorch below). All backends share one saved-state format (the normalized input and
per-row mean/rstd in fp32, fp64 for fp64 input), so forward and backward may run on different backends.
Under autocast the forward follows `_autocast_rule` (F.layer_norm's rule, see vitfast.autocast).
"""
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from vitfast import autocast as _autocast
from vitfast import backend as _backend

OP = "layer_norm"


def layer_norm_ref(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, residual: Optional[Tensor] = None):
    """Plain PyTorch: `F.layer_norm(x + residual)`; returns `(y, x + residual)` with a residual, else y."""
    s = x if residual is None else x + residual
    y = F.layer_norm(s, tuple(normalized_shape), weight, bias, eps)
    return y if residual is None else (y, s)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_stats(x: Tensor, eps: float) -> tuple:
    """Mean and 1 / sqrt(var + eps) of the rows of x (M, N) in x's dtype, by the corrected two-pass algorithm of
    csrc/layer_norm_stats.h (Chan, Golub, LeVeque 1983), which every kernel that normalizes rows uses: accurate
    for rows with a large mean and exact for constant rows (LN(x) is then exactly the bias); rows whose squared
    deviations overflow take the deviations times 2^-100 (fp32; 2^-600 fp64), as that header says (ATen's LayerNorm
    gives the bias or NaN for them)."""
    mu0 = x.mean(-1, keepdim=True)
    d = x - mu0
    over = d.square().sum(-1, keepdim=True) == float("inf")
    up = torch.exp2(over.to(x.dtype) * (100 if x.dtype == torch.float32 else 600))
    d = d / up
    dev = d.mean(-1, keepdim=True)
    var_down = (d.square().mean(-1, keepdim=True) - dev * dev).clamp_min(0.0)
    var = var_down * up * up
    rstd = torch.where(var == float("inf"), torch.rsqrt(var_down) / up, torch.rsqrt(var + eps))
    return (mu0 + dev * up)[:, 0], rstd[:, 0]


def _fwd_torch(x, weight, bias, residual, eps):
    s = x if residual is None else x + residual
    sf = s.to(_stats_dtype(x.dtype))
    mean, rstd = _row_stats(sf, eps)
    y = (sf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    # (contiguous, as the fake says: element-wise results keep the layout of a permuted x)
    return y.to(x.dtype).contiguous(), (s.contiguous() if residual is not None else x.new_empty(0)), mean, rstd


def _bwd_torch(dy, ds, s, weight, mean, rstd, has_bias):
    acc = mean.dtype
    dyf = dy.to(acc)
    xhat = (s.to(acc) - mean[:, None]) * rstd[:, None]
    g = dyf * weight.to(acc) if weight is not None else dyf
    dx = (g - xhat * (g * xhat).mean(-1, keepdim=True) - g.mean(-1, keepdim=True)) * rstd[:, None]
    if ds is not None:
        dx = dx + ds
    param_dtype = weight.dtype if weight is not None else s.dtype
    dweight = (dyf * xhat).sum(0).to(param_dtype) if weight is not None else s.new_empty(0, dtype=param_dtype)
    dbias = dyf.sum(0).to(param_dtype) if has_bias else s.new_empty(0, dtype=param_dtype)
    return dx.to(s.dtype).contiguous(), dweight, dbias


def _check_support(backend: str, tensors: tuple) -> Optional[str]:
    x = tensors[0]
    if backend == "triton":
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {x.dtype} (Triton takes float32, float16, bfloat16)"
        from vitfast.triton.layer_norm import MAX_N
        if x.shape[-1] > MAX_N:
            return f"hidden size {x.shape[-1]} > {MAX_N}"
    if backend == "cuda" and x.dtype == torch.float64:
        return "dtype torch.float64 (the CUDA kernel takes float32, float16, bfloat16)"
    return None


_backend.register_op(OP, gpu_order=("triton", "cuda", "torch"), cpu_order=("cpp", "torch"), check=_check_support)


@torch.library.custom_op("vitfast::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: (M, N) with unit inner stride, any row stride; weight, bias: (N,), any stride. Returns y, s
    (x + residual, or empty), mean, rstd."""
    if x.dim() != 2:
        raise ValueError(f"vitfast::{OP}: x must be (M, N), got {tuple(x.shape)}")
    _backend.check_op_shapes(OP, {"weight": (weight, x.shape[1:]), "bias": (bias, x.shape[1:]),
                                  "residual": (residual, x.shape)})
    if x.numel() == 0:
        return _fwd_torch(x, weight, bias, residual, eps)
    which = _backend.choose_backend(OP, x, weight, bias, residual)
    if which == "triton":
        from vitfast.triton.layer_norm import layer_norm_fwd
        return layer_norm_fwd(x, weight, bias, residual, eps)
    if which in ("cpp", "cuda"):
        return tuple(torch.ops.vitfast.layer_norm_fwd(x, weight, bias, residual, eps))
    return _fwd_torch(x, weight, bias, residual, eps)


@_layer_norm_op.register_fake
def _(x, weight, bias, residual, eps):
    M, N = x.shape
    stats = _stats_dtype(x.dtype)
    return (x.new_empty((M, N)), x.new_empty((M, N) if residual is not None else (0,)),
            x.new_empty(M, dtype=stats), x.new_empty(M, dtype=stats))


@torch.library.custom_op("vitfast::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: Tensor, ds: Optional[Tensor], s: Tensor, weight: Optional[Tensor], mean: Tensor,
                            rstd: Tensor, has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx (M, N), dweight (N,) or empty, dbias (N,) or empty."""
    if s.dim() != 2:
        raise ValueError(f"vitfast::{OP}_backward: s must be (M, N), got {tuple(s.shape)}")
    _backend.check_op_shapes(f"{OP}_backward", {"dy": (dy, s.shape), "ds": (ds, s.shape),
                                                "weight": (weight, s.shape[1:]), "mean": (mean, s.shape[:1]),
                                                "rstd": (rstd, s.shape[:1])})
    if s.numel() == 0:
        return _bwd_torch(dy, ds, s, weight, mean, rstd, has_bias)
    which = _backend.choose_backend(OP, s, dy, ds, weight)
    if which == "triton":
        from vitfast.triton.layer_norm import layer_norm_bwd
        return layer_norm_bwd(dy, ds, s, weight, mean, rstd, has_bias)
    if which in ("cpp", "cuda"):
        return tuple(torch.ops.vitfast.layer_norm_bwd(dy, ds, s, weight, mean, rstd, has_bias))
    return _bwd_torch(dy, ds, s, weight, mean, rstd, has_bias)


@_layer_norm_backward_op.register_fake
def _(dy, ds, s, weight, mean, rstd, has_bias):
    N = s.shape[1]
    param_dtype = weight.dtype if weight is not None else s.dtype
    return (s.new_empty(s.shape), s.new_empty(N if weight is not None else 0, dtype=param_dtype),
            s.new_empty(N if has_bias else 0, dtype=param_dtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    _, s, mean, rstd = output
    _backend.save_for_backward(ctx, s if residual is not None else x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def _backward(ctx, dy, ds, dmean, drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_backward_op(
        _unit_inner_stride(dy), _unit_inner_stride(ds) if ctx.has_residual and ds is not None else None,
        s, weight, mean, rstd, ctx.has_bias)
    # x and residual get the same gradient, but autograd must not hand one tensor to both: two leaves
    # would then share one .grad and accumulate into each other.
    both = ctx.needs_input_grad[0] and ctx.needs_input_grad[3]
    dresidual = (dx.clone() if both else dx) if ctx.has_residual else None
    return dx, dweight if weight is not None else None, dbias if ctx.has_bias else None, dresidual, None


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)
_backend.no_double_backward(OP, _layer_norm_backward_op)


def _autocast_rule(device_type, dtype, x, weight, bias, residual, eps):
    """F.layer_norm's autocast rule: float32 on CUDA (autocast's float32 list); on the CPU, autocast leaves
    it alone and its kernel computes in float32 and returns the input's dtype. Either way every input is
    taken in float32 here; y comes back in float32 (CUDA) or in the dtype of x + residual (CPU), and s in
    the dtype of x + residual (type promotion), as the unfused add would give it."""
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    args = [_autocast.cast(torch.float32, t) for t in (x, weight, bias, residual)]
    # (the public function hands x over promoted to x + residual's dtype: named so)
    names = ("x" if residual is None else "x (promoted with residual)", "weight", "bias", "residual")
    _autocast.check_same_dtype("layer_norm", **dict(zip(names, args)))
    y, s, mean, rstd = _layer_norm_op(*args, eps)
    return y.to(s_dtype if device_type == "cpu" else y.dtype), s.to(s_dtype), mean, rstd


_autocast.register("layer_norm", _autocast_rule)
_autocast.register("layer_norm_backward", _autocast.keep_dtypes(_layer_norm_backward_op))


def _unit_inner_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_param(name: str, t: Optional[Tensor], x: Tensor, shape: tuple) -> None:
    if t is None:
        return
    if (tuple(t.shape) != shape or t.device != x.device or not t.is_floating_point()
            or (t.dtype != x.dtype and not _autocast.is_enabled(x.device))):
        raise ValueError(f"vitfast.layer_norm: {name} must have shape {shape}, dtype {x.dtype} (any floating "
                         f"point under autocast) and device {x.device}, as the normalized input, got "
                         f"{tuple(t.shape)} {t.dtype} {t.device}")


def layer_norm(x: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, residual: Optional[Tensor] = None):
    """LayerNorm (Ba et al., arXiv:1607.06450) over the trailing `normalized_shape` dims, with an optional fused
    residual add.

    Args:
        x: (*, *normalized_shape), float32/float16/bfloat16 (float64 on the cpp and torch backends). Any strides:
            rows whose normalized elements are contiguous are read in place at any row stride (0 too, for an
            expanded x); other layouts are copied once.
        normalized_shape: the trailing dims to normalize over.
        weight, bias: (*normalized_shape) in the dtype of the normalized input (x, or x + residual) and on
            its device, or None; any floating dtype under autocast; any strides (the kernels copy a
            non-contiguous one, e.g. an expanded or sliced parameter, into a contiguous vector).
        eps: added to the variance.
        residual: x's shape and device, any floating dtype and strides: x + residual follows PyTorch's type
            promotion (a bfloat16 branch plus a float32 residual stream is float32), or None.

    The statistics are the corrected two-pass ones of csrc/layer_norm_stats.h on every backend: a constant row
    gives exactly the bias (and a zero weight gradient).

    Autocast: as F.layer_norm. On CUDA the op runs in float32 and returns float32 (autocast's float32 list);
    on the CPU, where autocast leaves F.layer_norm alone, it computes in float32 and returns y in the dtype
    of the normalized input. s (x + residual) keeps its promoted dtype.

    Returns:
        y = LN(x), contiguous, in the dtype of the normalized input; with `residual`, the pair (y, s) where
        s = x + residual and y = LN(s).

    Raises:
        ValueError: x not floating point, normalized_shape not its trailing dims, a weight, bias or residual whose
            shape, device or dtype does not fit (naming them), or no backend that takes the inputs.
        NotImplementedError: an input with a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad).
    """
    _backend.check_transforms("layer_norm", x, weight, bias, residual)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not x.is_floating_point():
        raise ValueError(f"vitfast.layer_norm: input must be floating point, got {x.dtype}")
    if len(shape) == 0 or tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(f"vitfast.layer_norm: normalized_shape {shape} must match the trailing dims of the "
                         f"input of shape {tuple(x.shape)}")
    if residual is not None:
        if residual.shape != x.shape or residual.device != x.device or not residual.is_floating_point():
            raise ValueError(f"vitfast.layer_norm: residual {tuple(residual.shape)} {residual.dtype} "
                             f"{residual.device} must be floating point with the shape and device of the input "
                             f"{tuple(x.shape)} {x.dtype} {x.device}")
        s_dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(s_dtype), residual.to(s_dtype)
    _check_param("weight", weight, x, shape)
    _check_param("bias", bias, x, shape)
    n, rows = math.prod(shape), math.prod(x.shape[:x.dim() - len(shape)])
    x2 = _unit_inner_stride(x.reshape(rows, n))
    r2 = _unit_inner_stride(residual.reshape(rows, n)) if residual is not None else None
    w = weight.reshape(n) if weight is not None else None
    b = bias.reshape(n) if bias is not None else None
    y, s, _, _ = _layer_norm_op(x2, w, b, r2, float(eps))
    y = y.view(x.shape)
    return y if residual is None else (y, s.view(x.shape))
