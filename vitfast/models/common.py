"""Pieces every reference model shares: the backend switch, attention and LayerNorm on each backend."""
import operator
import copy
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vitfast

MODEL_BACKENDS = ("vitfast", "sdpa", "eager")


def check_transformers_model(model: nn.Module, loader: str, model_types: tuple, expected: str) -> None:
    """Raises ValueError unless `model` is a transformers model whose config.model_type is one of `model_types`
    (a loader given another library's model, or a transformers model of another family)."""
    got = getattr(getattr(model, "config", None), "model_type", None)
    if got not in model_types:
        raise ValueError(f"{loader} expects {expected}, got {type(model).__name__}"
                         + (f" (model_type {got!r})" if got is not None else " (not a transformers model)"))


# where libraries keep dropout rates: dropout modules' p; float attributes of attention modules (transformers'
# ViT and CLIP attention, nn.MultiheadAttention) and DropPath modules (timm's, transformers' drop_prob)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_RATE_ATTRIBUTES = ("drop_prob", "dropout", "dropout_prob", "attention_dropout")


def _rate(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def warn_dropped_regularization(model: nn.Module, loader: str) -> None:
    """Warns where `model` has dropout or stochastic depth (drop path) that the converted model, which has none, does
    not carry over: inference is the same, training (fine-tuning) is not."""
    rates = {m.p for m in model.modules() if isinstance(m, _DROPOUT_MODULES)}
    rates |= {_rate(getattr(m, a, None)) for m in model.modules() for a in _RATE_ATTRIBUTES}
    rates = sorted({round(r, 4) for r in rates if r > 0})
    if rates:
        warnings.warn(f"{loader}: the source model's dropout / drop path (rates {rates}) are not carried over: the "
                      f"converted model has none (its outputs in eval mode are the same; training is not)",
                      stacklevel=3)


def square(value, name: str, model: str) -> int:
    """An int size from an int or an (n, n) pair; the reference models take square sizes only.

    Raises:
        ValueError: another pair or value, or a size below 1, naming `model` and `name`.
    """
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    size = _integer(value)
    if size is None or size < 1:
        raise ValueError(f"{model} takes a square {name}: a positive int or an (n, n) pair, got {value!r}")
    return size


def at_least(model: str, minimum: int, **values) -> None:
    """Raises ValueError naming `model` and the argument where an int argument in `values` is below `minimum` (a
    negative depth built an empty stack, a negative num_classes a headless model, in_chans=0 a convolution no image
    fits)."""
    for name, value in values.items():
        number = _integer(value)
        if number is None or number < minimum:
            raise ValueError(f"{model}: {name} must be an int of at least {minimum}, got {value!r}")


def _integer(value) -> Optional[int]:
    """value as an int where it is one of any integer type (a NumPy int from a config too; not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:  # (a float, an array, a tensor of several elements)
        return None


def size_entry(table: dict, size: str, model: str):
    """table[size] for a from_size name, or a ValueError listing the names."""
    if size not in table:
        raise ValueError(f"{model}.from_size: size must be one of {list(table)}, got {size!r}")
    return table[size]


def check_backend(backend: str) -> str:
    if backend not in MODEL_BACKENDS:
        raise ValueError(f"unknown model backend {backend!r}; expected one of {MODEL_BACKENDS}")
    return backend


def attend(backend: str, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False,
           dropout_p: float = 0.0) -> Tensor:
    """Attention over (B, H, N, D) with SDPA's mask semantics on the chosen model backend."""
    if backend == "vitfast":
        return vitfast.attention(q, k, v, mask, is_causal=is_causal, dropout_p=dropout_p)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, mask, dropout_p=dropout_p, is_causal=is_causal)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    dead = torch.isneginf(s).all(-1, keepdim=True)  # a row that sees no key: zeros, and zero gradients
    p = s.masked_fill(dead, 0.0).softmax(-1).masked_fill(dead, 0.0)
    return F.dropout(p, dropout_p) @ v


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same state dict) that runs vitfast.layer_norm on the vitfast backend, fused with a
    residual add when one is given: `norm(x, residual)` returns (LN(x + residual), x + residual)."""

    backend = "vitfast"

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        if self.backend == "vitfast":
            return vitfast.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, residual)
        if residual is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        s = x + residual
        return F.layer_norm(s, self.normalized_shape, self.weight, self.bias, self.eps), s


def uncompiled(model):
    """`model` as the converters read it: a `torch.compile`d module (its state dict keys hold "_orig_mod.") is
    replaced by the module it wraps, the model itself and any of its submodules (e.g. an open_clip CLIP whose visual
    tower alone is compiled). The modules above a compiled one are shallow copies sharing the parameters; `model` is
    not changed."""
    if not isinstance(model, nn.Module):
        return model
    model = getattr(model, "_orig_mod", model)
    children = {name: uncompiled(child) for name, child in model._modules.items()}
    if all(children[name] is child for name, child in model._modules.items()):
        return model
    model = copy.copy(model)
    model._modules = children
    return model


def like(model: nn.Module, source: nn.Module, fn: str) -> nn.Module:
    """`model` in `source`'s train/eval mode, on the device of `source`'s first floating-point parameter and in the
    floating dtype that holds most of `source`'s parameter elements: the converters (`fn`, for the warning) build
    their model so before loading the source's weights (built in the default dtype on the CPU, a float64 or float16
    source was loaded rounded to float32). A source with several floating dtypes (open_clip's precision="bf16" keeps
    its norms and embeddings in float32) is converted whole to that dtype, with a warning: the reference models hold
    one dtype."""
    model.train(source.training)  # (a DETR from an eval-mode source ran its dropout)
    elements: dict = {}
    for t in source.parameters():
        if t.is_floating_point():
            elements[t.dtype] = elements.get(t.dtype, 0) + t.numel()
    if not elements:
        return model
    dtype = max(elements, key=elements.get)
    if len(elements) > 1:
        others = ", ".join(f"{n} {str(d).replace('torch.', '')}" for d, n in elements.items() if d != dtype)
        warnings.warn(f"vitfast.models.{fn}: the source's parameters are in several dtypes ({elements[dtype]} "
                      f"elements {str(dtype).replace('torch.', '')}, {others}); the converted model is all "
                      f"{str(dtype).replace('torch.', '')}, the others cast to it", stacklevel=3)
    device = next(t.device for t in source.parameters() if t.is_floating_point())
    return model.to(device=device, dtype=dtype)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Sets the backend of every submodule that has one; returns the model."""
    check_backend(backend)
    for m in model.modules():
        if hasattr(m, "backend"):  # an instance attribute, or a class default such as LayerNorm's
            m.backend = backend
    return model
