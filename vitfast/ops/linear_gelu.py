"""Linear + bias + GELU, the first half of a transformer MLP: reference, torch.library op, autograd, functional API.

`vitfast::linear_gelu` is a torch.library op with a fake implementation, so torch.compile sees it whole; it picks
its backend at run time: "triton" (vitfast.triton.linear_gelu), "onednn" (float32 CPU tensors: oneDNN's inner
product with the bias and GELU in its epilogue, with `prepack` as vitfast.linear's; taken
automatically where vitfast.linear's rule, ops/linear.py's onednn_pays, says oneDNN pays, else the next backend),
"cpp" (the extension's vitfast::linear_gelu_fwd) or "torch" (F.linear + F.gelu below). oneDNN's GELU has the error
of ATen's vectorized float32 F.gelu (at most 1.2e-6 absolute over [-12, 12], as F.gelu on an AVX-512 CPU) and, like
that F.gelu, gives NaN at +inf. With grad the onednn backend runs the product alone and F.gelu after it (autograd
needs h). The other backends take the GEMM from ATen (cuBLAS, MKL / oneDNN); their kernels fuse
what ATen runs around it: GELU in one pass over the GEMM's output, in place when autograd needs nothing (a separate
GELU allocates a tensor of the same size), and on the CPU in fp32 / fp64 the bias too (ATen's addmm first copies it
into its output; cuBLASLt adds it in the GEMM's epilogue). With grad, the forward keeps the pre-activation
h = x W^T + b, as F.linear + F.gelu do, and the backward is ATen's: gelu_backward, then the three GEMMs of a linear
layer.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from vitfast import autocast as _autocast
from vitfast import backend as _backend
from vitfast.ops import linear as _linear

OP = "linear_gelu"
APPROXIMATIONS = ("none", "tanh")


def linear_gelu_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """Plain PyTorch: `F.gelu(F.linear(x, weight, bias), approximate=approximate)`."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def _fwd_torch(x, weight, bias, approximate, save_preact):
    h = F.linear(x, weight, bias)
    return F.gelu(h, approximate=approximate), (h if save_preact else h.new_empty(0))


def _fwd_onednn(x, weight, bias, approximate, save_preact, prepack):
    if save_preact:
        h = _linear.onednn_linear(x, weight, bias)
        return F.gelu(h, approximate=approximate), h
    w = _linear.onednn_weight(weight, prepack)
    return _linear.onednn_linear(x, w, bias, gelu=approximate), x.new_empty(0)


def uses_onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor], save_preact: bool = False,
                prepack: bool = False) -> bool:
    """Whether the automatic choice runs linear_gelu(x, weight, bias) on the onednn backend: oneDNN takes the tensors
    (float32 CPU) and vitfast.linear's rule (ops/linear.py's onednn_pays) says it pays for the product, in the mode
    of the call (save_preact: autograd records it; prepack: no grad and a prepacked Parameter). x: (*, K)."""
    return _onednn_pays(x, weight, save_preact, prepack) and _backend.why_not(OP, "onednn", x, weight, bias) is None


def _onednn_pays(x: Tensor, weight: Tensor, save_preact: bool, prepack: bool) -> bool:
    mode = "grad" if save_preact else "prepacked" if prepack else "plain"
    return _linear.onednn_pays(math.prod(x.shape[:-1]), x.shape[-1], weight.shape[0], mode)


def _check_support(backend: str, tensors: tuple) -> Optional[str]:
    if backend == "triton" and tensors[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {tensors[0].dtype} (Triton takes float32, float16, bfloat16)"
    return _linear.check_support(backend, tensors)


_backend.register_op(OP, gpu_order=("triton", "torch"), cpu_order=("onednn", "cpp", "torch"), check=_check_support)


@torch.library.custom_op("vitfast::linear_gelu", mutates_args=())
def _linear_gelu_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str, save_preact: bool,
                    prepack: bool) -> tuple[Tensor, Tensor]:
    """x: (M, K), weight: (N, K), bias: (N,) or None, one dtype. Returns y = GELU(x W^T + b) (M, N), contiguous,
    and h = x W^T + b (M, N) with save_preact, else an empty tensor. prepack: as vitfast.linear's (the onednn
    backend without save_preact)."""
    if x.numel() == 0 or weight.numel() == 0:
        return _fwd_torch(x, weight, bias, approximate, save_preact)
    skip = () if _onednn_pays(x, weight, save_preact, prepack) else ("onednn",)
    which = _backend.choose_backend(OP, x, weight, bias, skip=skip)
    if which == "onednn":
        return _fwd_onednn(x, weight, bias, approximate, save_preact, prepack)
    if which == "triton":
        from vitfast.triton.linear_gelu import linear_gelu_fwd
        return linear_gelu_fwd(x, weight, bias, approximate, save_preact)
    if which == "cpp":
        return tuple(torch.ops.vitfast.linear_gelu_fwd(x, weight, bias, approximate, save_preact))
    return _fwd_torch(x, weight, bias, approximate, save_preact)


@_linear_gelu_op.register_fake
def _(x, weight, bias, approximate, save_preact, prepack):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_preact else (0,))


def _setup_context(ctx, inputs, output):
    x, weight, bias, approximate, save_preact, _ = inputs
    # the bias only where h is to be recomputed: F.gelu(F.linear(...)) does not save it, so a bias changed in place
    # between forward and backward passes its version check
    _backend.save_for_backward(ctx, x, weight, None if save_preact else bias, output[1])
    ctx.approximate = approximate
    ctx.has_bias = bias is not None


def _backward(ctx, dy, dpreact):
    x, weight, bias, h = ctx.saved_tensors
    # in the forward's dtypes, also when backward() is called inside an autocast region (whose state autograd
    # hands to the backward: its matmuls would run in the region's dtype)
    with _autocast.disabled(dy.device):
        if h.shape != dy.shape:  # called without save_preact (e.g. by opcheck): recompute h
            h = F.linear(x, weight, bias)
        dh = torch.ops.aten.gelu_backward(dy, h, approximate=ctx.approximate)
        if dpreact is not None and dpreact.shape == dh.shape:
            dh = dh + dpreact
        dx = dh @ weight if ctx.needs_input_grad[0] else None
        dweight = dh.t() @ x if ctx.needs_input_grad[1] else None
        dbias = dh.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dweight, dbias, None, None, None


_linear_gelu_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.vitfast.linear_gelu)
def _flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """torch.utils.flop_counter's count (FlopCounterMode): the product's, 2 M K N (GELU, as F.gelu, counts none)."""
    return 2 * x_shape[0] * x_shape[1] * weight_shape[0]


def _autocast_rule(device_type, dtype, x, weight, bias, approximate, save_preact, prepack):
    """F.linear's autocast rule (the region's lower-precision dtype for x, weight and bias, on CPU and CUDA);
    GELU, in no autocast list, then runs in that dtype, as F.gelu(F.linear(...)) does."""
    args = [_autocast.cast(dtype, t) for t in (x, weight, bias)]
    _autocast.check_same_dtype("linear_gelu", **dict(zip(("x", "weight", "bias"), args)))
    return _linear_gelu_op(*args, approximate, save_preact, prepack and args[1] is weight)


_autocast.register("linear_gelu", _autocast_rule)


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, approximate: str = "none",
                prepack: bool = False) -> Tensor:
    """GELU(x @ weight^T + bias): nn.Linear followed by nn.GELU (the first half of a ViT / Swin / CLIP MLP), with
    GELU (and on the CPU the bias) fused into one pass over the GEMM's output, in place without grad (GELU: Hendrycks
    & Gimpel 2016, arXiv:1606.08415).

    Args:
        x: (*, K), floating point, any strides (a non-contiguous x is copied by the GEMM as torch.mm does).
        weight: (N, K), x's dtype and device (any floating dtype under autocast).
        bias: (N,) or None, likewise.
        approximate: "none" (exact, erf) or "tanh", as F.gelu.
        prepack: as vitfast.linear's (oneDNN's blocked copy of an nn.Parameter weight kept between calls without
            grad: for frozen weights). Default False.

    The fp32 CPU kernel computes erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), the formula of
    ATen's vectorized CPU GELU; the other kernels use erf / tanh of the C++ library or of Triton.

    Autocast: as F.linear (x, weight and bias in the region's lower-precision dtype), GELU in that dtype.

    Returns:
        (*, N) in x's dtype (the autocast dtype inside an autocast region), contiguous.

    Raises:
        ValueError: non-floating x, a weight that is not (N, K) with K = x.shape[-1], a bias that is not (N,),
            tensors on different devices or of different dtypes (outside autocast), or an unknown `approximate`.
        NotImplementedError: an input with a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad).
    """
    _backend.check_transforms("linear_gelu", x, weight, bias)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"vitfast.linear_gelu: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    _linear.check_linear_args("linear_gelu", x, weight, bias)
    K, N = x.shape[-1], weight.shape[0]
    save_preact = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    prepack = prepack and not save_preact and isinstance(weight, torch.nn.Parameter)
    y, _ = _linear_gelu_op(x.reshape(math.prod(x.shape[:-1]), K), weight, bias, approximate, save_preact, prepack)
    return y.view(*x.shape[:-1], N)
