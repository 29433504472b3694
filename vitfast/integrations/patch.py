"""`patch_model` / `unpatch_model`: swap the attention, window attention, LayerNorm, patch embedding, the MLP's
Linear + GELU and the Linear layers of a timm, torchvision, open_clip, transformers or segment_anything model for
vitfast's, in place, keeping every parameter and state-dict key.

    report = vitfast.patch_model(model)      # prints as a table: what was patched, what was left and why
    vitfast.unpatch_model(model)             # the original forward paths again

How: modules are recognised by the qualified name of their class (`type(m).__module__ + "." + __qualname__`), so
nothing from the libraries is imported. A recognised module gets instance attributes (usually `forward`) bound to
vitfast-backed functions that read the module's own parameters; unpatching deletes those attributes, so the class's
methods show through again. The parameters are the same objects throughout (optimizers, DDP and FSDP see no
change), and a patched module deep-copies, pickles and compiles (`torch.compile(fullgraph=True)`) like the original.
A transformers `PreTrainedModel` is switched to `attn_implementation="vitfast"` (see integrations/transformers.py).

An adapter that meets arguments it does not cover at run time (e.g. `need_weights=True` on nn.MultiheadAttention,
a LayerNorm input whose dtype differs from its weight under autocast) calls the original forward for that call, and
so does one whose vitfast op measured slower than the original code for that device and mode
(integrations/choice.py: on CPU tensors LayerNorm and attention always run ATen, patch embedding runs ATen
without grad, the MLP's Linear + GELU runs vitfast only without grad and for outputs of 32 MiB or more or where its
oneDNN backend takes the call, Linear layers run vitfast.linear (oneDNN for large float32 products); on CUDA tensors
LayerNorm, attention, the MLP and Linear layers run ATen); the report says what each kind runs on CPU and CUDA. A
patched module whose submodules carry hooks, or were swapped since patching (a LoRA wrapper, a parametrization),
runs its original forward too, since the patched paths read the submodules' parameters directly.
"""
import functools
import inspect
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module
from torch.utils._python_dispatch import _disable_current_modes

from vitfast import autocast as _autocast
from vitfast import backend as _backend
from vitfast.integrations.choice import describe, mlp_chunk_rows, runs_original
from vitfast.ops.attention import MAX_HEAD_DIM, attention
from vitfast.ops.layer_norm import layer_norm
from vitfast.ops.linear import drop_prepacked, linear
from vitfast.ops.linear_gelu import linear_gelu, uses_onednn as linear_gelu_uses_onednn
from vitfast.ops.window_attention import _shift_mask, relative_position_index

KINDS = ("attention", "rel_pos_attention", "window_attention", "layer_norm", "patch_embed", "linear_gelu", "linear")
_MARK = "_vitfast_patch"  # instance attribute: (kind, {name: each instance attribute the patch set})
_PREPACK = "_vitfast_prepack"  # instance attribute of an nn.Linear: patch_model(prepack_weights=True)
_SCRIPT = "__prepare_scriptable__"  # what torch.jit.script asks each module first (_bind: a clear error)
_LINEAR_CLASSES = ("torch.nn.modules.linear.Linear", "torch.nn.modules.linear.NonDynamicallyQuantizableLinear")


@dataclass(frozen=True)
class Adapter:
    """How to patch one class: `methods` are bound to the module as instance attributes."""
    kind: str
    what: str
    methods: Dict[str, Callable]
    check: Callable[[nn.Module], Optional[str]] = lambda module: None  # why this instance cannot be patched


@dataclass
class Patched:
    name: str
    cls: str
    kind: str
    what: str


@dataclass
class Left:
    name: str
    cls: str
    reason: str


@dataclass
class PatchReport:
    """What `patch_model` swapped (`patched`) and what it recognised or suspected but left (`left`, with why)."""
    patched: List[Patched] = field(default_factory=list)
    left: List[Left] = field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        """Number of patched modules per kind."""
        return {k: sum(p.kind == k for p in self.patched) for k in KINDS if any(p.kind == k for p in self.patched)}

    def __str__(self) -> str:
        lines = [f"vitfast.patch_model: {len(self.patched)} patched, {len(self.left)} left"]
        lines += [f"  patched {p.name or '<model>'} ({p.cls}): {p.kind}: {p.what}; {describe(p.kind)}"
                  for p in self.patched]
        lines += [f"  left    {l.name or '<model>'} ({l.cls}): {l.reason}" for l in self.left]
        return "\n".join(lines)


def qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def adapted_qualname(module: nn.Module) -> str:
    """The class whose adapter patches `module`: its own, or for a module FSDP2's fully_shard (or replicate) has given
    a class of its own (FSDP<class>: hooks that unshard its parameters before its forward runs, no forward), the
    class it wraps. (Not for the submodules an adapter reads the parameters of: those wrapped on their own are
    sharded outside their own forward, so the checks that name them see the FSDP class and leave the module.)"""
    cls = type(module)
    index = getattr(cls, "_orig_cls_mro_index", None)  # (FSDPModule's: where the wrapped class is in the MRO)
    if isinstance(index, int):
        cls = cls.__mro__[index]
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------------------- torch.nn adapters

def _layer_norm_forward(self: nn.LayerNorm, input: Tensor) -> Tensor:  # (nn.LayerNorm's parameter name)
    # autocast or a subclass's own casts: the original semantics; an input of another trailing shape: its error
    if ((self.weight is not None and input.dtype != self.weight.dtype) or not input.is_floating_point()
            or tuple(input.shape[input.dim() - len(self.normalized_shape):]) != tuple(self.normalized_shape)):
        return type(self).forward(self, input)
    return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


def _layer_norm_check(module: nn.Module) -> Optional[str]:
    if type(module).forward is not nn.LayerNorm.forward:
        return "nn.LayerNorm subclass with its own forward (not known to compute a plain LayerNorm)"
    return None


def _linear_forward(self: nn.Linear, input: Tensor) -> Tensor:  # (nn.Linear's parameter name)
    """vitfast.linear (oneDNN where its rule says it pays, else F.linear; prepacked weights where patch_model was
    asked for them); the original where x's dtype differs from the weight's outside autocast (F.linear's own error)
    or x is not floating point, or its last dim is not in_features (F.linear's error)."""
    if (not input.is_floating_point() or input.dim() == 0 or input.shape[-1] != self.in_features
            or (input.dtype != self.weight.dtype and not _autocast.is_enabled(input.device))):
        return nn.Linear.forward(self, input)
    return linear(input, self.weight, self.bias, prepack=self.__dict__.get(_PREPACK, False))


def patch_conv(conv: nn.Module) -> bool:
    """Whether `conv` is a convolution vitfast.patch_embed computes: an nn.Conv2d with stride = kernel, no padding, no
    dilation and one group."""
    return (type(conv) is nn.Conv2d and tuple(conv.stride) == tuple(conv.kernel_size)
            and conv.padding in ((0, 0), "valid") and tuple(conv.dilation) == (1, 1) and conv.groups == 1)


def conv_takes(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether `conv`'s own call takes x as vitfast.patch_embed would: a patch convolution (patch_conv: also one
    swapped in since patching) given an image batch (B, in_channels, H, W), floating point, in the weight's dtype
    (under autocast any but float64, which autocast does not cast). A patch embedding given anything else runs its
    original code, whose error (conv2d's) a user of the original model expects."""
    return (patch_conv(conv) and x.dim() == 4 and x.shape[1] == conv.in_channels and x.is_floating_point()
            and (x.dtype == conv.weight.dtype or (_autocast.is_enabled(x.device) and x.dtype != torch.float64)))


def _mha_forward(self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                 key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                 attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True, is_causal: bool = False):
    """nn.MultiheadAttention.forward on vitfast.attention; returns (output, None) as the original with
    need_weights=False. Masks keep MultiheadAttention's meaning (bool True = masked out, float added)."""
    if (need_weights or not _mha_inputs_fit(self, query, key, value)
            or not _mha_masks_fit(self, query, key, key_padding_mask, attn_mask, is_causal)):
        # (inputs or masks the original refuses, or is_causal without a mask: the original's own errors)
        return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                             average_attn_weights, is_causal)
    if not self.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    B, L, E = query.shape
    S, H = key.shape[1], self.num_heads
    if query is key and key is value:
        q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    else:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    q = q.unflatten(-1, (H, -1)).transpose(1, 2)  # unflatten infers -1 from the dim's size: an empty batch works
    k = k.unflatten(-1, (H, -1)).transpose(1, 2)
    v = v.unflatten(-1, (H, -1)).transpose(1, 2)
    mask = _mha_mask(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
    causal = bool(is_causal and attn_mask is None and key_padding_mask is None)
    out = attention(q, k, v, mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
    # out_proj's weights read, not the module called, as the original does (a subclass's forward is not run there);
    # on vitfast.linear, as a patched out_proj would run (oneDNN's rule, its prepacked weight)
    w_o, b_o = self.out_proj.weight, self.out_proj.bias
    prepack = self.out_proj.__dict__.get(_PREPACK, False)
    if self.batch_first and not self.training:  # (B, L, E) rows, as the original's fast path (inference) gives
        return linear(out.transpose(1, 2).reshape(B, L, E), w_o, b_o, prepack=prepack), None
    # the original's memory order, (L, B, E) rows: a dropout after the module draws for the same elements (seeded
    # training runs as the original), and .view works on the output where it does on the original's
    out = linear(out.permute(2, 0, 1, 3).reshape(L, B, E), w_o, b_o, prepack=prepack)
    return (out.transpose(0, 1) if self.batch_first else out), None


def _mha_inputs_fit(self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether query, key, value are batched inputs MultiheadAttention takes: 3-D, embed_dim wide, in one floating
    dtype, key and value of one batch and length, and the query's batch."""
    b_dim = 0 if self.batch_first else 1
    return (query.dim() == key.dim() == value.dim() == 3 and query.is_floating_point()
            and query.dtype == key.dtype == value.dtype
            and query.shape[2] == key.shape[2] == value.shape[2] == self.embed_dim
            and key.shape[:2] == value.shape[:2] and key.shape[b_dim] == query.shape[b_dim])


def _mha_masks_fit(self: nn.MultiheadAttention, query: Tensor, key: Tensor, key_padding_mask: Optional[Tensor],
                   attn_mask: Optional[Tensor], is_causal: bool) -> bool:
    """Whether the masks have the shapes and dtypes MultiheadAttention takes for batched inputs: attn_mask (L, S) or
    (B * heads, L, S), key_padding_mask (B, S), each bool or in the query's dtype, and a mask wherever is_causal is
    set (its hint)."""
    b_dim = 0 if self.batch_first else 1
    B, L, S = query.shape[b_dim], query.shape[1 - b_dim], key.shape[1 - b_dim]
    if is_causal and attn_mask is None:
        return False
    if any(m is not None and m.dtype not in (torch.bool, query.dtype) for m in (attn_mask, key_padding_mask)):
        return False
    if attn_mask is not None and tuple(attn_mask.shape) not in ((L, S), (B * self.num_heads, L, S)):
        return False
    return key_padding_mask is None or tuple(key_padding_mask.shape) == (B, S)


def _mha_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], B: int, H: int, L: int, S: int,
              dtype: torch.dtype) -> Optional[Tensor]:
    """MultiheadAttention's masks (bool True = masked out, or additive float) as one SDPA-style mask."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask.view(B, H, L, S) if attn_mask.dim() == 3 else attn_mask.view(1, 1, L, S))
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(B, 1, 1, S))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        keep = ~masks[0]
        for m in masks[1:]:
            keep = keep & ~m
        return keep
    total = None
    for m in masks:
        m = torch.zeros_like(m, dtype=dtype).masked_fill(m, -math.inf) if m.dtype == torch.bool else m.to(dtype)
        total = m if total is None else total + m
    return total


def head_dim_check(head_dim: Optional[int], op: str = "attention") -> Optional[str]:
    """Why an attention of heads `head_dim` wide is left: a width above the MAX_HEAD_DIM that vitfast.attention and
    vitfast.rel_pos_attention (op) take on every backend (a forced backend would raise at each call); else None
    (also for None: not known)."""
    if isinstance(head_dim, int) and head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM} (vitfast.{op} takes 1..{MAX_HEAD_DIM})"
    return None


def _mha_check(module: nn.Module) -> Optional[str]:
    if adapted_qualname(module) != "torch.nn.modules.activation.MultiheadAttention":
        return "nn.MultiheadAttention subclass (its forward may differ)"
    if not module._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v projection weights)"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv / add_zero_attn are not supported"
    return head_dim_check(module.head_dim)


# activation classes that compute F.gelu(x, approximate=...) (transformers' Python variants are the same formulas)
_GELU_CLASSES = {"transformers.activations.GELUActivation": "none", "transformers.activations.GELUTanh": "tanh",
                 "timm.layers.activations.GELU": "none", "timm.layers.activations.GELUTanh": "tanh"}


def gelu_approximate(act: Optional[nn.Module]) -> Optional[str]:
    """F.gelu's `approximate` ("none" / "tanh") for an activation module that computes F.gelu: nn.GELU, timm's and
    transformers' GELU classes; None for any other."""
    if type(act) is nn.GELU:
        return act.approximate
    return _GELU_CLASSES.get(qualname(act)) if act is not None else None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


_BUFFER_SEEN: Dict[int, tuple] = {}  # id(buffer) -> (a weak reference to it, its version key, whether it differs)


def _buffer_changed(buffer: Optional[Tensor], key: tuple, expected: Callable[[], Tensor]) -> bool:
    """Whether a buffer that a fused path never reads differs from `expected()` (a CPU tensor; compared flattened,
    in its dtype), so that the module runs its original forward, which reads it. Compared once per version of the
    buffer (a change in place bumps it; on CUDA one synchronisation each: changes that bump no version, through
    `.data`, `.numpy()` or to an inference tensor, are not seen) and per `key` (what expected() depends on); under
    torch.compile and torch.export, on meta and fake tensors (and in a fake mode), the buffer is taken as built;
    under torch.func transforms over a batched buffer (model ensembles), the original runs."""
    if buffer is None or torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(buffer):
        return True
    if (buffer.is_meta or isinstance(buffer, torch._subclasses.FakeTensor)
            or torch._guards.detect_fake_mode() is not None):
        return False
    key = (None if buffer.is_inference() else buffer._version, buffer.data_ptr(), buffer.shape, key)
    ident = id(buffer)
    seen = _BUFFER_SEEN.get(ident)
    if seen is None or seen[0]() is not buffer or seen[1] != key:
        # (real values, on the CPU: not through a tracer's mode (make_fx), nor on a default device set by the user)
        with _disable_current_modes(), torch.device("cpu"):
            want = expected()
            changed = not torch.equal(buffer.reshape(-1).cpu().to(want.dtype), want.reshape(-1))
        seen = (weakref.ref(buffer, lambda _: _BUFFER_SEEN.pop(ident, None)), key, changed)
        _BUFFER_SEEN[ident] = seen
    return seen[2]


def window_index_changed(index: Optional[Tensor], window_size) -> bool:
    """Whether a Swin module's relative_position_index buffer (any shape holding the N * N entries) differs from the
    index that vitfast's window attention computes from the window size: the fused paths never read the buffer, so a
    module whose buffer was changed (e.g. by an EMA averaging buffers, `AveragedModel(use_buffers=True)`, which
    rounds the int64 entries) runs its original forward, which reads it (_buffer_changed: when it is compared)."""
    window_size = tuple(window_size)
    return _buffer_changed(index, window_size, lambda: relative_position_index(window_size))


def shift_mask_changed(mask: Optional[Tensor], map_size: Tuple[int, int], window_size: Tuple[int, int],
                       shift_size: Tuple[int, int]) -> bool:
    """Whether a Swin block's attn_mask buffer (timm's: (nW, N, N) of 0 / -100, built for its input resolution)
    differs from the shift mask that vitfast's window attention computes for an (H, W) map (map_size: whole windows)
    from the window and the shift: the fused path never reads the buffer, so a block whose buffer was replaced
    (torch.func.functional_call) or changed in place, or built for another map size, runs its original forward
    (_buffer_changed: when it is compared). No buffer (None: timm's blocks without a shift, and those with
    dynamic_mask, which build the mask for each call's map) is taken as right."""
    if mask is None:
        return False
    return _buffer_changed(mask, (tuple(map_size), tuple(window_size), tuple(shift_size)),
                           lambda: _shift_mask(*map_size, window_size, shift_size, torch.empty(0)) if any(shift_size)
                           else torch.empty(0))


def _global_hooks() -> bool:
    """Whether hooks for every module are registered (nn.modules.module.register_module_forward_hook and kin)."""
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
                or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks)


def mlp_fc1(x: Tensor, fc1: nn.Module, act: nn.Module) -> Tensor:
    """act(fc1(x)) for an MLP's first layer (a plain nn.Linear and a GELU, as mlp_check and the guard of the
    patched method keep them): one vitfast.linear_gelu call, or the modules' own calls where choice.py says ATen
    (the output's size counts in the dtype autocast gives it; without grad on CPU, where linear_gelu's onednn backend
    takes the call, the table's vitfast holds at any size), where x's dtype differs from the weight's outside
    autocast (F.linear's error) or under torch.export (the size rules would become guards on the traced sizes)."""
    autocast = _autocast.is_enabled(x.device)
    if (x.dtype != fc1.weight.dtype and not autocast) or torch.compiler.is_exporting():
        return act(fc1(x))
    itemsize = torch.get_autocast_dtype(x.device.type).itemsize if autocast else x.element_size()
    M = math.prod(x.shape[:-1])
    prepack = fc1.__dict__.get(_PREPACK, False)
    if runs_original("linear_gelu", x, M * fc1.out_features * itemsize) and (
            autocast or not linear_gelu_uses_onednn(x, fc1.weight, fc1.bias, prepack=prepack)):
        return act(fc1(x))
    return linear_gelu(x, fc1.weight, fc1.bias, gelu_approximate(act), prepack=prepack)


def mlp_rows(module: nn.Module, x: Tensor, fc1: nn.Linear, body: Callable[[nn.Module, Tensor], Tensor]) -> Tensor:
    """body(module, x) for an MLP `module` that computes each row of x (*, C) on its own (fc1: its first Linear),
    run over chunks of x's rows where choice.py's mlp_chunk_rows says so: in inference (autograd records nothing,
    eval mode, not under autocast, nor under torch.compile's or torch.jit.trace's tracing, which would record the
    loop for one batch size) on float32 CPU tensors with a hidden activation of 32 MiB or more and small weights
    (Swin-T's first stage from batch 7); else in one call (as is an x that fc1 does not take, whose error then names
    x's own shape)."""
    rows = (None if module.training or x.shape[-1:] != (fc1.in_features,) or _autocast.is_enabled(x.device)
            or torch.compiler.is_compiling() or torch.jit.is_tracing()
            else mlp_chunk_rows(x, module, fc1.out_features))
    if rows is None or (torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for p in module.parameters()))):
        return body(module, x)
    flat = x.reshape(-1, x.shape[-1])
    first = body(module, flat[:rows])
    out = first.new_empty(flat.shape[0], first.shape[-1])
    out[:rows] = first
    for start in range(rows, flat.shape[0], rows):
        out[start:start + rows] = body(module, flat[start:start + rows])
    return out.view(*x.shape[:-1], first.shape[-1])


def instance_override(module: nn.Module, methods) -> Optional[str]:
    """Why `module` is left: those of the adapter's `methods` set on the instance (by a wrapper, a checkpointing
    helper or a hook library), which binding the adapter would replace; or None."""
    overridden = [m for m in methods if m in module.__dict__]
    return (f"{', '.join(overridden)} set on the instance (a wrapper's or a hook library's): left as it is"
            if overridden else None)


def mlp_check(module: nn.Module, fc1: str = "fc1", act: str = "act") -> Optional[str]:
    """Why an MLP whose first Linear and activation are its attributes `fc1` and `act` (for an nn.Sequential: "0"
    and "1") cannot take vitfast.linear_gelu, or None."""
    first, activation = getattr(module, fc1, None), getattr(module, act, None)
    if type(first) is not nn.Linear:
        return f"{fc1} is {qualname(first)}, not torch.nn.Linear"
    if activation is None:
        return f"no activation {act!r}"
    if gelu_approximate(activation) is None:
        return f"activation {qualname(activation)} does not compute F.gelu (vitfast.linear_gelu fuses GELU only)"
    return None


_LINEAR = Adapter("linear", "Linear -> vitfast.linear", {"forward": _linear_forward})
_TORCH_ADAPTERS = {
    **{cls: _LINEAR for cls in _LINEAR_CLASSES},  # (NonDynamicallyQuantizableLinear: MultiheadAttention's out_proj)
    "torch.nn.modules.activation.MultiheadAttention": Adapter(
        "attention", "nn.MultiheadAttention -> vitfast.attention in need_weights=False calls (need_weights=True, "
                     "its default, runs the original)",
        {"forward": _mha_forward}, _mha_check),
}
_LAYER_NORM = Adapter("layer_norm", "LayerNorm -> vitfast.layer_norm", {"forward": _layer_norm_forward},
                      _layer_norm_check)


# --------------------------------------------------------------------------------------- driver

def _libraries() -> tuple:
    from vitfast.integrations import open_clip, segment_anything, timm, torchvision, transformers

    return timm, torchvision, open_clip, transformers, segment_anything


def _adapters() -> Dict[str, Adapter]:
    table = dict(_TORCH_ADAPTERS)
    for lib in _libraries():
        table.update(lib.ADAPTERS)
    return table


def _known_left() -> Dict[str, str]:
    """Classes that look like what vitfast swaps but compute something its ops do not cover: why each is left."""
    reasons = {}
    for lib in _libraries():
        reasons.update(getattr(lib, "LEFT", {}))
    return reasons


def _is_transformers_model(module: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(module).__mro__)


# classes whose name suggests something vitfast could swap: reported as left when no adapter takes them, unless a
# submodule of theirs was patched for what the name suggests (_COVERING: the word -> the kinds that cover it)
_SUSPECT = re.compile(r"Attention|Attn|LayerNorm|PatchEmbed")
_ATTENTION_KINDS = ("attention", "rel_pos_attention", "window_attention")
_COVERING = {"Attention": _ATTENTION_KINDS, "Attn": _ATTENTION_KINDS, "LayerNorm": ("layer_norm",),
             "PatchEmbed": ("patch_embed",)}
_NO_ADAPTER = "no vitfast adapter for this class"


def _layout(module: nn.Module) -> tuple:
    """`module`'s tree of submodules at patch time, as keys and classes only (no references to the modules, which
    may be replaced and must then be freed): ((key, class, the child's layout), ...) in `_modules` order."""
    return tuple((key, type(child), _layout(child) if child is not None else ())
                 for key, child in module._modules.items())


def _unchanged(module: nn.Module, layout: tuple) -> bool:
    """Whether `module`'s tree still has `layout`'s keys and classes at every depth (no submodule added, removed,
    or replaced by one of another class; torch.nn.utils.parametrize changes the class), no submodule carries
    hooks and none has a forward of its own set on the instance but vitfast's (accelerate's hooks, a wrapper that
    records attention maps): a walk of the `_modules` dicts, a few microseconds for a timm Attention."""
    stack = [(module._modules, layout)]
    while stack:
        children, entries = stack.pop()
        if len(children) != len(entries):
            return False
        for key, cls, below in entries:
            child = children.get(key)
            if type(child) is not cls:
                return False
            if child is not None:
                if _intercepted(child):
                    return False
                if below or child._modules:
                    stack.append((child._modules, below))
    return True


def _intercepted(module: nn.Module) -> bool:
    """Whether calling `module` runs more than its class's forward: hooks on it, or a forward set on its instance
    but vitfast's (accelerate's hooks, a wrapper that records attention maps)."""
    forward = module.__dict__.get("forward")
    return _has_hooks(module) or (forward is not None and getattr(forward, "func", None) is not _guarded)


def submodules_intercepted(*modules: nn.Module) -> bool:
    """For vitfast.nn's modules, whose fused paths read these submodules' parameters instead of calling them:
    whether any of them carries hooks or a forward of its own on the instance (`_intercepted`), or hooks for every
    module are registered. They then call the submodules, so those hooks and wrappers see the call."""
    return _global_hooks() or any(_intercepted(m) for m in modules)


_PLAIN = (Tensor, nn.Parameter)


def _distributed(module: nn.Module, x: Optional[Tensor]) -> bool:
    """Whether the call runs on DTensors (tensor parallelism: parallelize_module makes the module's parameters and
    inputs DTensors), which vitfast's ops have no sharding rules for: the original runs, on DTensor's own. (Plain
    tensors are told apart by type first: importing torch.distributed.tensor takes about a second.)"""
    params = module._parameters.values()
    if (x is None or type(x) in _PLAIN) and all(p is None or type(p) in _PLAIN for p in params):
        return False
    return _backend.has_dtensor(x, *params)


def _input(args: tuple, kwargs: dict) -> Optional[Tensor]:
    """The first tensor among a call's arguments, positional then keyword (a module's inputs share one device)."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)


def _guarded(module: nn.Module, kind: str, name: str, fn: Callable, layout: tuple, *args, **kwargs):
    """The patched method `fn`, or the class's own: where choice.py's table says ATen for `kind` on the input's
    device in this mode (the adapters leave that check to this guard, which asks it first, so that a module that
    runs its original pays a few microseconds, not the adapter's checks: 10-50 us per call measured on this
    project's 2-core CPU), where a
    submodule now carries hooks (a user's forward hook, weight_norm's pre-hook, hooks registered for every module)
    or was swapped since patching (a LoRA wrapper): the patched methods read submodules' parameters directly, which
    would skip those hooks and wrappers (so does a forward set on a submodule's instance: accelerate's hooks); under
    torch.func's gradient transforms and forward-mode AD (jvp, dual tensors), which vitfast's ops do not run under;
    on DTensors (tensor parallelism); and under torch.fx.symbolic_trace (a Proxy input), where the original code is
    what traces."""
    if any(isinstance(a, torch.fx.Proxy) for a in (*args, *kwargs.values())):
        # torch.fx.symbolic_trace (timm's and torchvision's feature extractors): the original code traces (a Proxy
        # among real tensors too: timm's Swin attention with its real attn_mask)
        return getattr(type(module), name)(module, *args, **kwargs)
    x = _input(args, kwargs)
    if ((x is not None and runs_original(kind, x)) or not _unchanged(module, layout)
            or (layout and _global_hooks()) or _backend.transforms_open() or _distributed(module, x)):
        return getattr(type(module), name)(module, *args, **kwargs)
    return fn(module, *args, **kwargs)


def _refuse_script(module: nn.Module) -> nn.Module:
    raise NotImplementedError(
        f"torch.jit.script cannot compile a model patched by vitfast.patch_model (its {qualname(module)} runs "
        f"vitfast's Python adapters): torch.jit.trace and torch.compile take it; or script the model unpatched "
        f"(vitfast.unpatch_model)")


def _bind(module: nn.Module, kind: str, methods: Dict[str, Callable]) -> None:
    # functools.partial rather than types.MethodType: a bound method pickles as getattr(module, fn.__name__),
    # which does not exist on the module; a partial pickles (and deep-copies) with a reference to the module.
    # Methods the class has are guarded (_guarded); helpers the adapter adds are called only from those.
    # torch.jit.script calls every submodule's __prepare_scriptable__ first: it gets a clear error there rather
    # than failing on a partial's missing __globals__.
    # A guarded method keeps the signature of the method it replaces (torch.export's dynamic_shapes are keyed by it).
    layout = _layout(module)
    bound: Dict[str, Callable] = {}
    for name, fn in methods.items():
        if hasattr(type(module), name):
            bound[name] = functools.partial(_guarded, module, kind, name, fn, layout)
            bound[name].__signature__ = inspect.signature(getattr(module, name))
        else:
            bound[name] = functools.partial(fn, module)
    bound[_SCRIPT] = functools.partial(_refuse_script, module)
    bound[_REPLICATE] = functools.partial(_replicate, module)
    for name, method in bound.items():
        object.__setattr__(module, name, method)
    # (the objects themselves: unpatch_model removes an instance attribute only while it is still the one set here)
    object.__setattr__(module, _MARK, (kind, bound))


_REPLICATE = "_replicate_for_data_parallel"


def _replicate(module: nn.Module) -> nn.Module:
    """nn.DataParallel's replica of a patched module (torch.nn.parallel.replicate): the class's shallow copy, whose
    copied __dict__ holds methods bound to `module`; rebound to the replica, which would run `module`'s parameters
    (another device's) otherwise."""
    replica = getattr(type(module), _REPLICATE)(module)
    kind, bound = module.__dict__[_MARK]
    rebound: Dict[str, Callable] = {}
    for name, method in bound.items():
        rebound[name] = functools.partial(method.func, replica, *method.args[1:])
        if hasattr(method, "__signature__"):
            rebound[name].__signature__ = method.__signature__
        if replica.__dict__.get(name) is method:  # (not one set since: a user's or a library's, kept as it is)
            object.__setattr__(replica, name, rebound[name])
    object.__setattr__(replica, _MARK, (kind, rebound))
    return replica


def _check_module(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"vitfast.{fn} takes an nn.Module, got {type(model).__name__}")


def patch_model(model: nn.Module, attention: bool = True, window_attention: bool = True, layer_norm: bool = True,
                patch_embed: bool = True, mlp: bool = True, linear: bool = True,
                prepack_weights: bool = False) -> PatchReport:
    """Swaps vitfast's kernels into `model` in place (parameters and state-dict keys unchanged).

    Args:
        model: a timm, torchvision, open_clip, transformers or segment_anything model (or any module containing
            their blocks).
        attention: global self/cross attention (timm Attention, nn.MultiheadAttention in torchvision's ViT and
            open_clip, open_clip Attention, transformers' attention interface) and the windowed and global attention
            with decomposed relative positions of SAM / ViTDet image encoders (transformers SamVisionAttention,
            SamVisionSdpaAttention and VitDetAttention and the copies of them in other models, timm
            vision_transformer_sam, segment_anything). A transformers model switched to vitfast's attention takes
            `config.output_attentions = True` only if set before patching (transformers 5 accepts it only under the
            name "eager"); `output_attentions=True` per call works either way.
        window_attention: Swin (timm SwinTransformerBlock/WindowAttention, torchvision ShiftedWindowAttention and
            V2, transformers SwinLayer).
        layer_norm: nn.LayerNorm and the known subclasses that compute a plain LayerNorm (not the norm a patched
            patch embedding fuses into its kernel, e.g. Swin's: that one follows `patch_embed`).
        patch_embed: timm PatchEmbed, torchvision VisionTransformer's conv_proj, transformers ViT/DeiT patch
            embeddings and their copies in other models.
        mlp: the first Linear + GELU of MLP blocks -> vitfast.linear_gelu (timm Mlp, torchvision MLP / MLPBlock,
            transformers ViT, DeiT, Swin, CLIP, SAM, SAM-HQ and ViTDet MLPs and their copies in other models
            (vitfast.integrations.transformers.COPIES), segment_anything MLPBlock; other activations, e.g. CLIP's
            quick_gelu, are left with the reason).
        linear: nn.Linear layers (exactly that class and MultiheadAttention's out_proj, not subclasses) ->
            vitfast.linear.
        prepack_weights: the nn.Linear layers' products on oneDNN without grad (vitfast.linear's and the MLPs'
            linear_gelu) keep oneDNN's blocked copy of the weight between calls (`prepack=True`: more memory, faster
            on CPU; ops/linear.py): for frozen weights (inference, serving). Changes PyTorch counts (load_state_dict,
            in-place ops on the Parameter) are seen, others not (`p.data` in place, fused optimizers' steps): change
            the weights only after unpatch_model, which drops the copies. Applies to every nn.Linear of `model` at
            each call (False drops earlier copies). Default False.

    Returns:
        PatchReport: `.patched` and `.left` (with the reason); `print(report)` shows both.
    Raises:
        TypeError: `model` is not an nn.Module, or a flag is not True or False (or equal to one: 0, 1, NumPy's
            bools).
    """
    _check_module("patch_model", model)
    # kind -> (the flag's name, its value)
    flags = {"attention": ("attention", attention), "rel_pos_attention": ("attention", attention),
             "window_attention": ("window_attention", window_attention), "layer_norm": ("layer_norm", layer_norm),
             "patch_embed": ("patch_embed", patch_embed), "linear_gelu": ("mlp", mlp),
             "linear": ("linear", linear)}
    for flag, value in (*flags.values(), ("prepack_weights", prepack_weights)):
        if isinstance(value, str) or value is None or value not in (True, False):  # ("no", "False": truthy)
            raise TypeError(f"vitfast.patch_model: {flag} must be True or False, got {value!r}")
    table, known_left = _adapters(), _known_left()
    for module in model.modules():
        if adapted_qualname(module) in _LINEAR_CLASSES:
            if prepack_weights:
                object.__setattr__(module, _PREPACK, True)
            elif module.__dict__.pop(_PREPACK, False):
                drop_prepacked(module.weight)
    from vitfast.integrations.transformers import SWIN_LAYERS as hf_swin_layers

    report = PatchReport()
    hf_prefixes: List[str] = []
    for name, module in model.named_modules():
        cls = adapted_qualname(module)
        under_hf = any(name == p or name.startswith(p + ".") or p == "" for p in hf_prefixes)
        if getattr(module, _MARK, None) is not None:
            if not (under_hf and cls in hf_swin_layers):  # (transformers' Swin layers are reported with their model)
                report.left.append(Left(name, cls, f"already patched ({getattr(module, _MARK)[0]})"))
            continue
        if _is_transformers_model(module) and not under_hf:
            from vitfast.integrations import transformers as hf

            hf_prefixes.append(name)
            for record in hf.patch(module, name, attention=attention, window_attention=window_attention):
                (report.patched if isinstance(record, Patched) else report.left).append(record)
            continue
        adapter = table.get(cls) or (_LAYER_NORM if isinstance(module, nn.LayerNorm) else None)
        if cls in known_left:
            report.left.append(Left(name, cls, known_left[cls]))
            continue
        if adapter is None:
            # transformers' attention modules that run through the attention interface (switched above; they or a
            # submodule read it) are not left; those with attention of their own (Swin-V2's) are
            if (_SUSPECT.search(type(module).__name__) and not cls.startswith("vitfast.")
                    and not (under_hf and re.search("Attention|Attn", type(module).__name__)
                             and _transformers_calls_interface(module))):
                report.left.append(Left(name, cls, _NO_ADAPTER))
            continue
        flag, on = flags[adapter.kind]
        reason = None if on else f"{flag}=False"
        reason = reason or adapter.check(module)
        reason = reason or instance_override(module, adapter.methods)
        if reason:
            report.left.append(Left(name, cls, reason))
            continue
        _bind(module, adapter.kind, adapter.methods)
        report.patched.append(Patched(name, cls, adapter.kind, adapter.what))
    # a suspect whose parts were patched for what its name suggests (e.g. open_clip's ResidualAttentionBlock around
    # its MultiheadAttention) is covered; one with other parts patched is not (timm's AttentionPoolLatent: its
    # LayerNorm and MLP are patched, its attention is not); one whose part of that kind is reported left is listed
    # through that part (CaiT's LayerScaleBlockClassAttn through its ClassAttn)
    report.left = [l for l in report.left if l.reason != _NO_ADAPTER or not _covered(l, report)]
    return report


def _transformers_calls_interface(module: nn.Module) -> bool:
    from vitfast.integrations import transformers as hf

    return hf._calls_attention_interface(module)


def _suspect_kinds(cls: str) -> set:
    return {k for word in _SUSPECT.findall(cls.rsplit(".", 1)[-1]) for k in _COVERING[word]}


def _covered(left: Left, report: PatchReport) -> bool:
    kinds = _suspect_kinds(left.cls)
    prefix = left.name + "." if left.name else ""  # "": the model itself
    # (or inside a layer patched with the fused window attention, which no longer calls it: Donut's Swin layers)
    return (any(p.name.startswith(prefix) and p.name != left.name and p.kind in kinds for p in report.patched)
            or "window_attention" in kinds and any(
                p.kind == "window_attention" and p.name != left.name
                and left.name.startswith(p.name + "." if p.name else "") for p in report.patched)
            or any(l.name.startswith(prefix) and l.name != left.name and kinds & _suspect_kinds(l.cls)
                   for l in report.left))


def unpatch_model(model: nn.Module) -> int:
    """Restores every module `patch_model` changed in `model` and frees the prepacked copies of its Linear weights
    (prepack_weights=True); returns how many modules were restored. A method set on a patched module's instance
    since patching (a user's or a library's wrapper of its forward) is kept, as it is (one that wraps the patched
    forward goes on calling it).

    Raises:
        TypeError: `model` is not an nn.Module.
    """
    _check_module("unpatch_model", model)
    restored = 0
    hf_models = []
    for module in model.modules():
        if module.__dict__.pop(_PREPACK, False):
            drop_prepacked(module.weight)
        mark = module.__dict__.pop(_MARK, None)
        if mark is not None:
            for name, method in mark[1].items():
                if module.__dict__.get(name) is method:  # (not one set since: a user's or a library's wrapper)
                    del module.__dict__[name]
            restored += 1
        if _is_transformers_model(module):
            hf_models.append(module)
    if hf_models:
        from vitfast.integrations import transformers as hf

        # sub-models first: a sub-model's record, kept up to date by a later patch of it, restores its config, and
        # a model holding it then keeps what its config no longer names as vitfast's
        restored += sum(hf.unpatch(module) for module in reversed(hf_models))
    return restored
