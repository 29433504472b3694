"""Linear layer, y = x W^T + b: reference, torch.library op, autograd, functional API.

vitfast writes no GEMM of its own. On the CPU the op picks the faster of the two GEMM libraries PyTorch ships:
"onednn" runs oneDNN's inner-product primitive (torch.ops.mkldnn._linear_pointwise, the kernel behind
torch.compile's frozen CPU graphs, with the bias added in its epilogue), "torch" runs F.linear, which for float32 on
x86-64 CPUs is MKL's sgemm (cblas). At the larger Linear shapes of ViT-B/16, DeiT-S, CLIP ViT-B/32 and Swin-T
(`python bench/cpu_choice.py -k "linear "`, 2 threads, float32, 2026-12-01, integrations/choice.py) oneDNN is
1.05-1.3x faster on an AVX-512 (Zen 4) CPU; at small ones its higher cost per call loses, so the automatic choice
takes it only where `onednn_pays` (below). The onednn backend takes float32 (the dtype measured); other dtypes, and
CUDA tensors (cuBLAS), take the torch backend.

Prepacked weights (opt-in, `prepack=True`; `patch_model(prepack_weights=True)`), for frozen weights (inference,
serving), as torch.compile's freezing and IPEX's optimize treat them: where autograd does not record the call and
the weight is an nn.Parameter, the op keeps oneDNN's blocked copy of it, made on first use. It is redone when
PyTorch sees the Parameter change (its version counter: load_state_dict, in-place ops on it; its storage:
`w.data = ...`), but not for changes PyTorch does not count: `w.data` changed in place, steps of optimizers built
with fused=True (their kernels bump no version counter), writes through another alias of the storage. So weights
must not change while prepacked: change them after `drop_prepacked` (unpatch_model calls it), or do not prepack.
The copy doubles the memory of the weights it packs (ViT-B/16: +330 MB) and saves oneDNN's reorder of the weight on
each call (timm ViT-B/16 at batch 1, every nn.Linear on oneDNN against F.linear, interleaved whole-model rounds on
the machine above: 1.21x prepacked, 1.13x with the plain weight).

Backward: dx = dy W is the same primitive with W^T as its weight (a strided view, no copy); dW = dy^T x and db stay
ATen's.
"""
import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from vitfast import autocast as _autocast
from vitfast import backend as _backend

OP = "linear"


def linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Plain PyTorch: `F.linear(x, weight, bias)`."""
    return F.linear(x, weight, bias)


def check_support(backend: str, tensors: tuple) -> Optional[str]:
    """Why `backend` cannot take these tensors of a linear product (the onednn backend: float32, K > 0), or None."""
    if backend == "onednn":
        if tensors[0].dtype != torch.float32:
            return f"dtype {tensors[0].dtype} (the onednn backend takes float32)"
        if tensors[0].shape[-1] == 0:
            return "an empty inner dim K = 0 (oneDNN has no inner product for it)"
    return None


# (a forced triton, cuda or cpp names vitfast's own kernels, of which a GEMM has none: linear's choice stays automatic)
_backend.register_op(OP, gpu_order=("torch",), cpu_order=("onednn", "torch"), check=check_support,
                     obeys=("onednn", "torch"))

# oneDNN's inner product costs ~15 us a call more than F.linear (ideep's tensor and primitive-cache set-up: 15.5 vs
# 2.8 us on a 4 x 8 x 6 product), so it gains only on large enough products; which ones depends on the mode (2
# threads, Zen 4, 30-40 interleaved calls against F.linear, M x K -> N):
# - prepacked weight (no grad, prepack=True, an nn.Parameter): 25088 x 96 -> 288 1.13x, 25088 x 384 -> 96 1.34x,
#   6272 x 192 -> 192 1.15x, 3136 x 96 -> 288 1.02x, 784 x 192 -> 576 1.01x, 400 x 768 -> 768 1.04x, but below 2**25
#   multiply-adds: 197 x 384 -> 384 0.94x, 3136 x 96 -> 96 0.94x, 784 x 192 -> 192 0.92x, 1 x 768 -> 768 0.54x;
# - plain weight without grad (read in its own layout): 197 x 768 -> 768 1.12x, 50 x 768 -> 3072 1.29x, 197 x 384 ->
#   1152 1.14x, 400 x 768 -> 768 1.06x; with a small K or N a first run measured 784 x 192 -> 576 0.95x, 3136 x 96 ->
#   288 0.81x, 3136 x 384 -> 96 0.98x, but the same products interleaved call by call (21 rounds, 2026-12-01) 1.02x,
#   1.00x, 1.11x, and 25088 x 96 -> 288 1.10x, 25088 x 384 -> 96 1.30x, 6272 x 192 -> 576 1.10x; whole models settle
#   it: every nn.Linear of at least 2**25 multiply-adds on oneDNN whatever its K and N (and linear_gelu's), against
#   the same with K, N >= 384 only (the ratio of their paired speedups over the original model, 11 interleaved rounds,
#   inference, random weights): timm Swin-T batch 1 1.06x and 1.03x (two runs), batch 8 1.07x,
#   torchvision Swin-T batch 1 1.06x and 1.04x, transformers Swin-T batch 1 1.04x, batch 8 1.00x, timm ViT-B/16 and
#   DeiT-S batch 1 1.01x and 1.00x (their products all have K, N >= 384). With oneDNN, MKL and ATen held to AVX2 on
#   the same machine (ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2) the same
#   comparison went the other way at batch 8: timm Swin-T 0.94x and 0.97x, torchvision 0.96x, transformers 1.00x (at
#   batch 1 timm 0.97x, torchvision 1.07x), so below AVX-512 (ATen's CPU capability) the rule keeps K, N >= 384;
# - with grad the op's autograd adds ~0.1 ms a call of Python (its backward and the dx product's dispatch), and
#   products with a dim of 384 lose: forward + backward at 394 x 384 -> 384, 1152, 1536 and 394 x 1536 -> 384
#   (DeiT-S at batch 2) 0.78-0.96x, a whole DeiT-S training step 0.95x, where ViT-B/16's (768) measured 1.07x.
# So the automatic choice takes oneDNN for float32 products of at least ONEDNN_MIN_MACS multiply-adds whose K and N
# are at least ONEDNN_MIN_DIM[mode], F.linear for the others.
ONEDNN_MIN_MACS = 2**25
ONEDNN_MIN_DIM = {"prepacked": 1, "plain": 1 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 384,
                  "grad": 768}


def onednn_pays(M: int, K: int, N: int, mode: str = "plain") -> bool:
    """Whether the automatic choice runs an (M, K) x (K, N) product on oneDNN (the rule above), dtype aside; mode:
    "prepacked" (no grad, a prepacked nn.Parameter weight), "plain" (no grad, the weight as it is) or "grad"
    (autograd records the call)."""
    return min(K, N) >= ONEDNN_MIN_DIM[mode] and M * K * N >= ONEDNN_MIN_MACS


def onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: Optional[str] = None) -> Tensor:
    """oneDNN's inner product: x (M, K), weight (N, K) (any strides: a transposed view is read in place; or its
    prepacked copy, `onednn_weight`), bias (N,) (any strides) or None; float32 CPU tensors, K > 0. gelu: "none"
    (erf) or "tanh" applies GELU in the product's epilogue (oneDNN's eltwise GELU). Returns (M, N), contiguous."""
    # (the op reads the bias as if contiguous whatever its stride: a strided or expanded bias gives wrong sums)
    bias = bias.contiguous() if bias is not None else None
    if gelu is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], gelu)


# id(weight Parameter) -> (a weak reference to it, (its version, data pointer, strides, shape: `w.data = w.data.t()`
# keeps the other three), a weak reference to the storage it packed (PyTorch keeps one Python object per live
# storage), oneDNN's blocked copy of it); an entry leaves with its
# Parameter (the weak reference's callback). (Not a WeakKeyDictionary: its lookups compare tensors with ==.) The
# storage, not only the data pointer, identifies what was packed: after `w.data = new` the allocator may give the new
# storage the old one's address (the old copy then went on being used), and holding the old storage instead would
# keep its memory (e.g. after module.to(dtype)).
_PACKED: dict = {}


def drop_prepacked(weight: Tensor) -> None:
    """Frees the prepacked copy of `weight` (an nn.Parameter), if there is one: its next prepacked use packs anew."""
    entry = _PACKED.get(id(weight))
    if entry is not None and entry[0]() is weight:
        del _PACKED[id(weight)]


def onednn_weight(weight: Tensor, prepack: bool) -> Tensor:
    """`weight` as oneDNN's products read it: with prepack, oneDNN's blocked copy of this nn.Parameter, made once and
    redone when PyTorch sees it change (module docstring: its version counter or its storage); else (and for an
    inference tensor, which has no version counter) the weight itself."""
    if not prepack or weight.is_inference():
        return weight
    storage = weight.untyped_storage()
    key = (weight._version, weight.data_ptr(), weight.stride(), tuple(weight.shape))
    entry = _PACKED.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != key or entry[2]() is not storage:
        ident = id(weight)
        ref = weakref.ref(weight, lambda _: _PACKED.pop(ident, None))
        entry = (ref, key, weakref.ref(storage), torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        _PACKED[ident] = entry
    return entry[3]


def _gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], prepack: bool = False) -> Tensor:
    """x W^T + b for x (M, K), weight (N, K) on the backend chosen for these tensors. A forced onednn or torch
    backend is obeyed (onednn raises where it cannot take the tensors); else oneDNN where it can take the tensors
    and `onednn_pays`, else F.linear."""
    pays = onednn_pays(x.shape[0], x.shape[1], weight.shape[0], "prepacked" if prepack else "plain")
    if _backend.choose_backend(OP, x, weight, bias, skip=() if pays else ("onednn",)) == "torch":
        return F.linear(x, weight, bias)
    return onednn_linear(x, onednn_weight(weight, prepack), bias)


@torch.library.custom_op("vitfast::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], prepack: bool) -> Tensor:
    """x: (M, K), weight: (N, K), bias: (N,) or None, one dtype and device. Returns x W^T + b (M, N). prepack: a
    oneDNN product reads its cached blocked copy of weight (an nn.Parameter; autograd does not record the call)."""
    return _gemm(x, weight, bias, prepack)


@_linear_op.register_fake
def _(x, weight, bias, prepack):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _backend.save_for_backward(ctx, x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    # in the forward's dtypes, also when backward() is called inside an autocast region
    with _autocast.disabled(dy.device):
        # (through the op, which torch.compile keeps opaque: Inductor cannot lower oneDNN's op on a strided weight;
        # N = 0: zeros, the product of an empty inner dim, which a forced onednn backend refuses)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _linear_op(dy, weight.t(), None, False) if dy.shape[1] else dy.new_zeros(x.shape)
        dweight = dy.t() @ x if ctx.needs_input_grad[1] else None
        dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dweight, dbias, None


_linear_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.vitfast.linear)
def _flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """torch.utils.flop_counter's count (FlopCounterMode): F.linear's, 2 M K N."""
    return 2 * x_shape[0] * x_shape[1] * weight_shape[0]


def _autocast_rule(device_type, dtype, x, weight, bias, prepack):
    """F.linear's autocast rule: x, weight and bias in the region's lower-precision dtype, on CPU and CUDA (a cast
    weight is a new tensor: not prepacked)."""
    args = [_autocast.cast(dtype, t) for t in (x, weight, bias)]
    _autocast.check_same_dtype("linear", **dict(zip(("x", "weight", "bias"), args)))
    return _linear_op(*args, prepack and args[1] is weight)


_autocast.register("linear", _autocast_rule)


def check_linear_args(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      names: tuple = ("x", "weight", "bias")) -> None:
    """The argument checks of F.linear-like ops (vitfast.linear, vitfast.linear_gelu, shifted_window_attention's
    projections), with vitfast's messages naming the caller's arguments (`names`: those of x, weight and bias).

    Raises:
        ValueError: non-floating x, a weight that is not (N, K) with K = x.shape[-1], a bias that is not (N,),
            tensors on different devices or of different dtypes (outside autocast).
    """
    nx, nw, nb = names
    if not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"vitfast.{op}: {nx} must be a floating-point tensor with at least one dim, got "
                         f"{tuple(x.shape)} {x.dtype}")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"vitfast.{op}: {nw} must be (N, {K}) for {nx} of shape {tuple(x.shape)}, got "
                         f"{tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"vitfast.{op}: {nb} must be ({N},) for {nw} {tuple(weight.shape)}, got "
                         f"{tuple(bias.shape)}")
    present = {k: t for k, t in zip(names, (x, weight, bias)) if t is not None}
    if len({t.device for t in present.values()}) > 1 or (
            not _autocast.is_enabled(x.device) and len({t.dtype for t in present.values()}) > 1):
        listed = ", ".join(f"{k} {t.dtype} {t.device}" for k, t in present.items())
        which = ", ".join(list(present)[:-1]) + " and " + list(present)[-1]
        raise ValueError(f"vitfast.{op}: {which} must share one device and (outside autocast) one dtype, got "
                         f"{listed}")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, prepack: bool = False) -> Tensor:
    """x @ weight^T + bias, as F.linear (nn.Linear's forward), on the faster GEMM library for the device (module
    docstring: oneDNN for float32 CPU products where `onednn_pays`, else F.linear itself, called directly).

    Args:
        x: (*, K), floating point, any strides.
        weight: (N, K), x's dtype and device (any floating dtype under autocast); any strides.
        bias: (N,) or None, likewise.
        prepack: where oneDNN runs the product without grad and weight is an nn.Parameter, keep oneDNN's blocked copy
            of it between calls (module docstring): for frozen weights; change them only after drop_prepacked(weight).
            Default False.

    Autocast: as F.linear (x, weight and bias in the region's lower-precision dtype).

    Returns:
        (*, N) in x's dtype (the autocast dtype inside an autocast region), contiguous.

    Raises:
        ValueError: non-floating x, a weight that is not (N, K) with K = x.shape[-1], a bias that is not (N,),
            tensors on different devices or of different dtypes (outside autocast), or a forced backend that cannot
            take the inputs (e.g. VITFAST_BACKEND=onednn with float64 or CUDA tensors; a forced triton, cuda or cpp,
            which name vitfast's own kernels, of which it has none, leaves its choice automatic).
        NotImplementedError: an input with a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad).
    """
    _backend.check_transforms("linear", x, weight, bias)
    check_linear_args("linear", x, weight, bias)
    return checked_linear(x, weight, bias, prepack)


def checked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, prepack: bool = False) -> Tensor:
    """`linear` for a caller that has already run its checks (check_transforms, check_linear_args) on these
    tensors, as shifted_window_attention does with its own argument names."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    prepack = prepack and not grad and isinstance(weight, nn.Parameter)
    mode = "grad" if grad else "prepacked" if prepack else "plain"
    automatic = _backend.forced_for(OP) is None
    # (a nested tensor's ragged size has no product to test; DTensors, which the op has no sharding rule for, run
    # F.linear with DTensor's rule at every size: the op raised where oneDNN's rule held)
    if automatic and (x.is_nested or _backend.has_dtensor(x, weight)):
        return F.linear(x, weight, bias)
    M, K, N = math.prod(x.shape[:-1]), x.shape[-1], weight.shape[0]
    # (under torch.export the op, which applies the rule to each call's sizes: a test here, on the traced sizes,
    # would become a guard on them, which export with a bounded dynamic batch refused)
    if automatic and not (x.is_cpu and (torch.compiler.is_exporting() or onednn_pays(M, K, N, mode))):
        return F.linear(x, weight, bias)  # (the op's automatic choice, without its dispatch: ~40 us a call)
    y = _linear_op(x.reshape(M, K), weight, bias, prepack)
    return y.view(*x.shape[:-1], N)
