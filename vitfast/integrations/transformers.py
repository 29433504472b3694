"""Hugging Face transformers: `attn_implementation="vitfast"` for every model that uses AttentionInterface.

    import vitfast.integrations.transformers as vt
    vt.register()
    model = ViTModel(config, attn_implementation="vitfast")   # or model.set_attn_implementation("vitfast")

Both interfaces are registered: AttentionInterface runs the attention, AttentionMaskInterface builds the
masks. Without the second, transformers silently drops masks for an unknown implementation name (CLIP's
text padding would be lost). Masks are the SDPA ones: bool (True = attend) or additive float. (Models that pick
attention classes by this name when built, SAM's vision encoder or GIT, take it where their modeling file was
imported before register(): their own attention then runs, which patch_model's adapters replace.)

`vitfast.patch_model` also binds forward paths to the vision attention modules that do not use the interface:
SAM's (`SamVisionAttention`, `SamVisionSdpaAttention`, and SAM-HQ's copies) and ViTDet's (`VitDetAttention`), whose
dense decomposed relative-position bias becomes vitfast.rel_pos_attention (see integrations/segment_anything.py);
calls that ask for the attention weights take the original path; to Swin's layers (SwinLayer, and the older layer
with attention of its own in Donut's, MaskFormer's and CLAP's audio Swin: _OLD_SWIN_LAYERS), whose pad, roll,
partition, shift mask and attention become one vitfast.window_attention; and to the MLPs of ViT, DeiT, Swin, CLIP, SAM,
SAM-HQ and ViTDet, whose first Linear + GELU becomes vitfast.linear_gelu (CLIP's default quick_gelu is left, with the
reason).
"""
import contextlib
import dataclasses
import functools
import inspect
import logging
import re
import sys
import weakref
from typing import Optional

import torch

from vitfast import backend as _backend
from vitfast.integrations.choice import runs_original
from vitfast.integrations.patch import (Adapter, _distributed, conv_takes, instance_override, mlp_check, mlp_fc1,
                                       mlp_rows, patch_conv, window_index_changed)
from vitfast.integrations.segment_anything import SAM_MLP_BLOCK, mlp_block_forward, rel_pos_check, sam_attention
from vitfast.ops.attention import attention
from vitfast.ops.linear import linear
from vitfast.ops.patch_embed import patch_embed
from vitfast.ops.window_attention import window_attention

NAME = "vitfast"
NAME_EAGER = "vitfast_eager"  # the same attention, with eager's masks: what patch_model gives a model that ran eager


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention signature: q, k, v (B, H, S, D) in; (B, S, H, D) out, and no weights; the masks are
    SDPA's (NAME). Where integrations/choice.py says ATen is faster (CPU and CUDA tensors), under torch.func's
    gradient transforms and forward-mode AD (as patch_model's other modules), and for what vitfast.attention does not
    take (a value head dim other than q's, a query batch broadcast against the keys', DTensors), transformers' own SDPA
    path runs instead. A call that asks for the attention weights (output_attentions, or transformers 5's recording of
    them with hooks) or passes a position_bias, softcap or attention sinks runs the module's own eager attention
    (_eager_function), with the mask made additive as eager expects (so a model that ran SDPA, whose transformers 5
    SDPA path returns no weights, returns eager's); a module without one raises ValueError."""
    return _forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, eager_masks=False,
                    **kwargs)


def eager_masks_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask, dropout: float = 0.0, scaling=None,
                                  is_causal=None, **kwargs):
    """attention_forward for eager's masks (NAME_EAGER: a model that ran eager attention before patch_model). Where
    attention_forward runs transformers' SDPA path, this runs the module's own eager attention, the code the model ran
    before: SDPA given eager's finfo.min masks gets the gradients of a query that sees no key wrong (off by
    O(1), torch 2.13, CPU)."""
    return _forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, eager_masks=True,
                    **kwargs)


def _forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, eager_masks, **kwargs):
    if eager_masks:  # eager's masks carry any causality (eager functions read no is_causal)
        is_causal = False
    else:
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    # (a bool mask given to a model that ran eager, whose own masks are float, is the caller's: transformers 5's
    # eager attention adds it to the scores, 1 where True, masking nothing; its eager attention runs, as before)
    if (kwargs.get("output_attentions") or _attentions_recorded() or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") or _sinks(module, kwargs)
            or eager_masks and attention_mask is not None and attention_mask.dtype == torch.bool):
        return _eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, eager_masks, **kwargs)
    # (transformers' SDPA takes a value head dim other than q's (ConditionalDETR's cross-attention) and a query batch
    # of 1 against keys of B; vitfast.attention takes neither)
    # (and DTensors, tensor parallelism's, which vitfast.attention has no sharding rule for)
    if (runs_original("attention", query) or _backend.transforms_open() or value.shape[-1] != query.shape[-1]
            or query.shape[0] != key.shape[0] or _distributed(module, query)):
        if eager_masks:
            return _eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, True, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if eager_masks and attention_mask is not None and attention_mask.is_floating_point() and (
            torch.is_autocast_enabled(query.device.type)):
        # eager's finfo(float32).min, which attention's autocast rule casts to the region's dtype, became -inf in
        # bfloat16: a query that sees no key got zeros, not eager's average over the keys. float16's own minimum
        # (-65504) does not swamp the scores as eager's does: its eager attention runs there.
        low = torch.get_autocast_dtype(query.device.type)
        if low == torch.float16:
            return _eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, True, **kwargs)
        attention_mask = attention_mask.clamp(min=torch.finfo(low).min)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = attention(query, key, value, attention_mask, is_causal=is_causal, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def _sinks(module: torch.nn.Module, kwargs: dict) -> bool:
    """Whether the call has attention sinks (GPT-OSS's learned per-head logits joining each row's softmax: s_aux or
    sinks in the call, or the module's `sinks`), which vitfast.attention does not take."""
    return (kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None
            or getattr(module, "sinks", None) is not None)


def _eager_function(module: torch.nn.Module):
    """The eager attention `module` runs under attn_implementation="eager" (the default its forward gives
    get_interface): the one function whose name ends in eager_attention_forward that its forward reads (Llama4's
    vision_eager_attention_forward, Phi4's simple_eager_attention_forward), else its modeling file's
    eager_attention_forward, else None."""
    forward = inspect.unwrap(type(module).forward)
    scope = getattr(forward, "__globals__", None) or vars(sys.modules.get(type(module).__module__, sys))
    names = {n for n in getattr(getattr(forward, "__code__", None), "co_names", ())
             if n.endswith("eager_attention_forward") and callable(scope.get(n))}
    return scope[names.pop()] if len(names) == 1 else scope.get("eager_attention_forward")


def _eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, eager_masks, **kwargs):
    """The module's eager attention (_eager_function), given SDPA's masks (NAME) made additive, or eager's masks
    (eager_masks: NAME_EAGER) as they are."""
    eager = _eager_function(module)
    if eager is None:
        raise ValueError(f"vitfast attention returns no attention weights and takes no position_bias, softcap or "
                         f"attention sinks, and {type(module).__name__}'s modeling file has no eager_attention_forward "
                         f"to run them; use attn_implementation='eager'")
    if attention_mask is None and is_causal:  # the SDPA mask function leaves a plain causal mask to is_causal
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()[
            None, None]
    if attention_mask is None or attention_mask.dtype != torch.bool or eager_masks:
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # SDPA's bool mask (True = attend) as eager's additive one; a query that sees no key, which eager's finfo.min
    # mask averages over all keys, gets zeros (and zero weights), as SDPA and vitfast.attention give it
    dead = ~attention_mask.any(-1, keepdim=True)  # (B|1, H|1, Nq, 1)
    mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
        ~attention_mask, torch.finfo(query.dtype).min)
    out, weights = eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    out = out.masked_fill(dead.transpose(1, 2), 0)  # out: (B, Nq, H, D)
    return out, weights.masked_fill(dead, 0) if weights is not None else None


def register(name: str = NAME, masks: str = "sdpa") -> None:
    """Registers `name` with transformers' AttentionInterface and AttentionMaskInterface, with transformers' SDPA
    masks (masks="sdpa": bool, True = attend; attention_forward) or its eager ones (masks="eager": additive float,
    finfo.min where masked, so that a query which sees no key averages over all the keys, as eager attention gives;
    eager_masks_attention_forward; patch_model registers them as NAME_EAGER for models that ran eager)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    if masks not in ("sdpa", "eager"):
        raise ValueError(f"vitfast.integrations.transformers.register: masks must be 'sdpa' or 'eager', got {masks!r}")
    AttentionInterface.register(name, attention_forward if masks == "sdpa" else eager_masks_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask if masks == "sdpa" else eager_mask)
    # Models that pick attention classes by name when built (SAM's vision encoder: SAM_VISION_ATTENTION_CLASSES[name],
    # GIT, SuperGlue) get `name` as an alias of the class of its masks, in the modeling files imported so far: a model
    # built from a patched model's config then builds (it raised KeyError: 'vitfast'). Those classes run their own
    # attention, which patch_model's adapters (SAM's) replace. (`masks` names that class: "sdpa" or "eager".)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("transformers.models."):
            for key, table in list(vars(module).items()):
                if key.endswith("ATTENTION_CLASSES") and isinstance(table, dict) and masks in table:
                    table.setdefault(name, table[masks])


# ------------------------------------------------------------------------------- vitfast.patch_model support

def _register_names() -> None:
    """Registers the two names patch_model gives models: NAME (SDPA's masks) and NAME_EAGER (eager's)."""
    register()
    register(NAME_EAGER, "eager")


_SWIN_LAYER = "transformers.models.swin.modeling_swin.SwinLayer"


def _swin_layer_check(layer: torch.nn.Module) -> Optional[str]:
    """The fused forward reads the attention's q/k/v weights and never calls the attention module: a subclass of
    either (a LoRA Linear, a quantized one, an attention that records its maps) would be skipped."""
    from vitfast.integrations.patch import qualname

    attn = getattr(layer, "attention", None)
    if qualname(attn) != "transformers.models.swin.modeling_swin.SwinAttention":
        return f"attention is {qualname(attn)}, not transformers' SwinAttention: its own forward would be skipped"
    other = [n for n in ("q_proj", "k_proj", "v_proj") if type(getattr(attn, n, None)) is not torch.nn.Linear]
    if other:
        return f"attention.{', '.join(other)} not plain nn.Linear (their weights are read, their forward skipped)"
    return None


def _qkv_parameters(q: torch.nn.Linear, k: torch.nn.Linear, v: torch.nn.Linear, x: torch.Tensor):
    """The (3C, C) weight and (3C,) bias (or None) of one product for a Swin attention's q, k and v Linears, or None
    where their calls differ from one product: a bias on some of them only (a projection swapped since patching), or
    another dtype than each other's or, outside autocast, than x's (the original's error)."""
    weights, biases = (q.weight, k.weight, v.weight), (q.bias, k.bias, v.bias)
    given = [b for b in biases if b is not None]
    dtypes = {t.dtype for t in (*weights, *given)}
    if (given and len(given) != 3 or len(dtypes) != 1
            or x.dtype not in dtypes and not torch.is_autocast_enabled(x.device.type)):
        return None
    return torch.cat(weights), torch.cat(given) if given else None


def _swin_layer_forward(self, hidden_states: torch.Tensor, input_dimensions, always_partition: bool = False,
                        **kwargs):
    """SwinLayer.forward with pad, roll, partition, shift mask, attention and the reverse fused into one
    vitfast.window_attention call on the image-layout qkv. Falls back to transformers' path where the semantics
    differ: always_partition on a map no larger than the window (SwinBackbone's calls: elsewhere it changes
    nothing), a window clamped to the input, or attention weights requested."""
    if always_partition and min(input_dimensions) <= self.window_size:  # (elsewhere it changes nothing)
        return type(self).forward(self, hidden_states, input_dimensions, always_partition, **kwargs)
    self.set_shift_and_window_size(input_dimensions)
    attn = self.attention
    ws = attn.relative_position_bias.window_size
    params = _qkv_parameters(attn.q_proj, attn.k_proj, attn.v_proj, hidden_states)
    if (kwargs.get("output_attentions") or params is None or tuple(ws) != (self.window_size, self.window_size)
            or window_index_changed(getattr(attn.relative_position_bias, "relative_position_index", None), ws)):
        return type(self).forward(self, hidden_states, input_dimensions, **kwargs)
    height, width = input_dimensions
    batch_size, _, channels = hidden_states.shape
    shortcut = hidden_states
    x = self.layernorm_before(hidden_states).view(batch_size, height, width, channels)
    weight, bias = params
    qkv = linear(x, weight, bias).unflatten(-1, (3, attn.num_attention_heads, -1))
    out = window_attention(qkv, attn.relative_position_bias.relative_position_bias_table, ws, self.shift_size,
                           qkv_pad=bias, softmax_scale=attn.scaling, attention_dropout=attn.attention_dropout,
                           training=attn.training, clamp_window=False)  # (the attention module's flag, as transformers)
    out = self.dropout(attn.o_proj(out)).view(batch_size, height * width, channels)
    hidden_states = shortcut + self.drop_path(out)
    residual = hidden_states
    hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states))) + residual
    return hidden_states, None


def _old_swin_layer_check(layer: torch.nn.Module) -> Optional[str]:
    """As _swin_layer_check, for the older layer (_OLD_SWIN_LAYERS)."""
    from vitfast.integrations.patch import qualname

    expected = _OLD_SWIN_LAYERS[qualname(layer)][0]  # (the self-attention's; the attention's and its output's
    # classes are named alike: DonutSwinAttention, DonutSwinSelfOutput)
    attention = getattr(layer, "attention", None)
    for path, module, cls in (("attention", attention, expected.replace("SelfAttention", "Attention")),
                              ("attention.self", getattr(attention, "self", None), expected),
                              ("attention.output", getattr(attention, "output", None),
                               expected.replace("SelfAttention", "SelfOutput"))):
        if qualname(module) != cls:
            return f"{path} is {qualname(module)}, not {cls}: its own forward would be skipped"
    attn = attention.self
    other = [n for n in ("query", "key", "value") if type(getattr(attn, n, None)) is not torch.nn.Linear]
    if other:
        return f"attention.self.{', '.join(other)} not plain nn.Linear (their weights are read, their forward skipped)"
    return None


def _old_swin_layer_forward(self, hidden_states: torch.Tensor, input_dimensions, output_attentions=False,
                            always_partition=False):
    """The older SwinLayer.forward (Donut's, CLAP's) as _swin_layer_forward: one vitfast.window_attention call."""
    if not always_partition:
        self.set_shift_and_window_size(input_dimensions)
    return _old_swin_layer(self, hidden_states, input_dimensions, output_attentions, always_partition,
                           lambda: type(self).forward(self, hidden_states, input_dimensions, output_attentions,
                                                      always_partition))


def _maskformer_swin_layer_forward(self, hidden_states: torch.Tensor, input_dimensions, output_attentions=False):
    """MaskFormerSwinLayer.forward (it always partitions) as _swin_layer_forward."""
    return _old_swin_layer(self, hidden_states, input_dimensions, output_attentions, True,
                           lambda: type(self).forward(self, hidden_states, input_dimensions, output_attentions))


def _old_swin_layer(self, hidden_states, input_dimensions, output_attentions, always_partition, original):
    attn = self.attention.self
    ws = attn.window_size
    params = _qkv_parameters(attn.query, attn.key, attn.value, hidden_states)
    if (output_attentions or params is None or (always_partition and min(input_dimensions) <= self.window_size)
            or tuple(ws) != (self.window_size, self.window_size)
            or window_index_changed(getattr(attn, "relative_position_index", None), ws)):
        return original()
    height, width = input_dimensions
    batch_size, _, channels = hidden_states.shape
    x = self.layernorm_before(hidden_states).view(batch_size, height, width, channels)
    weight, bias = params
    qkv = linear(x, weight, bias).unflatten(-1, (3, attn.num_attention_heads, -1))
    out = window_attention(qkv, attn.relative_position_bias_table, ws, self.shift_size, qkv_pad=bias,
                           softmax_scale=attn.attention_head_size ** -0.5, attention_dropout=attn.dropout.p,
                           training=attn.dropout.training, clamp_window=False)
    output = self.attention.output
    out = output.dropout(output.dense(out)).view(batch_size, height * width, channels)
    hidden_states = hidden_states + self.drop_path(out)
    return (hidden_states + self.output(self.intermediate(self.layernorm_after(hidden_states))),)


# the Swin layer of transformers' older modeling code, copied into Donut's and MaskFormer's Swin backbones and CLAP's
# audio encoder: its own attention (attention.self: query, key, value, the bias table; attention.output.dense), the MLP
# as intermediate + output; a tuple out; MaskFormer's always partitions (no always_partition argument). Per layer: its
# self-attention class and the forward bound to it.
_OLD_SWIN_LAYERS = {
    "transformers.models.donut.modeling_donut_swin.DonutSwinLayer": (
        "transformers.models.donut.modeling_donut_swin.DonutSwinSelfAttention", _old_swin_layer_forward),
    "transformers.models.maskformer.modeling_maskformer_swin.MaskFormerSwinLayer": (
        "transformers.models.maskformer.modeling_maskformer_swin.MaskFormerSwinSelfAttention",
        _maskformer_swin_layer_forward),
    "transformers.models.clap.modeling_clap.ClapAudioLayer": (
        "transformers.models.clap.modeling_clap.ClapAudioSelfAttention", _old_swin_layer_forward),
}
SWIN_LAYERS = (_SWIN_LAYER, *_OLD_SWIN_LAYERS)


def _sub_models(model: torch.nn.Module, prefix: str) -> list:
    """The records of the sub-models of a model left as a whole that take vitfast's name on their own (Mask2Former's
    Dinov2 or Swin backbone; a ViT encoder beside a GPT-2 decoder, whose code tests the name), each the outermost
    such: switched, or left with the reason (the sub-models of one left for its name test are tried in turn)."""
    from vitfast.integrations.patch import Left, _is_transformers_model, qualname

    records: list = []
    outer: list = []  # (sub-models switched, or already)
    tested: list = []  # (sub-models left for their name test: their own sub-models are tried, reported once)
    kept = [model.config]  # (configs that must keep their name: a sub-model sharing one is not switched)
    for name, module in model.named_modules():
        if (name and _is_transformers_model(module) and module._can_set_attn_implementation()
                and _calls_attention_interface(module) and not any(name.startswith(s + ".") for s in outer)):
            full = f"{prefix}.{name}" if prefix else name
            if _switched(module):
                records.append(_switch_again(module, full))
            elif (why := _name_tested(module)) is not None or any(module.config is c for c in kept):
                kept.append(module.config)
                if not any(name.startswith(s + ".") for s in tested):
                    records.append(Left(full, qualname(module), why or
                                        "shares its config with a model left with its attention implementation"))
                tested.append(name)
                continue
            else:
                records.append(_switch(module, full))
            outer.append(name)
    return records


def patch(model: torch.nn.Module, prefix: str, attention: bool = True, window_attention: bool = True) -> list:
    """For vitfast.patch_model: switches a PreTrainedModel to attn_implementation="vitfast" and binds the fused
    window-attention forward to its SwinLayers. Returns the `Patched` / `Left` records."""
    from vitfast.integrations.patch import (_MARK, Left, Patched, _bind, _is_transformers_model, adapted_qualname,
                                           qualname)

    cls, records = qualname(model), []
    if _switched(model):
        records.append(_switch_again(model, prefix) if attention else
                       Left(prefix, cls, "already patched (attn_implementation)"))
    elif not attention:
        records.append(Left(prefix, cls, "attention=False"))
    elif not model._can_set_attn_implementation():
        records.append(Left(prefix, cls, "transformers does not let the model set an attention implementation "
                                         "(_can_set_attn_implementation() is False)"))
        records += _sub_models(model, prefix)
    elif not _calls_attention_interface(model):
        records.append(Left(prefix, cls, "no module of the model calls transformers' AttentionInterface"))
    elif (why := _name_tested(model)) is not None:
        records.append(Left(prefix, cls, why))
        records += _sub_models(model, prefix)
    else:
        records.append(_switch(model, prefix))
    for name, module in model.named_modules():
        layer = adapted_qualname(module)
        if layer not in SWIN_LAYERS:
            continue
        full = f"{prefix}.{name}" if prefix else name
        check = _swin_layer_check if layer == _SWIN_LAYER else _old_swin_layer_check
        reason = ("window_attention=False" if not window_attention
                  else "already patched" if getattr(module, _MARK, None) is not None
                  else check(module) or instance_override(module, ("forward",)))
        if reason:
            records.append(Left(full, layer, reason))
            continue
        forward = _swin_layer_forward if layer == _SWIN_LAYER else _OLD_SWIN_LAYERS[layer][1]
        _bind(module, "window_attention", {"forward": forward})
        records.append(Patched(full, layer, "window_attention",
                               "pad/roll/partition/mask/attention -> one fused vitfast.window_attention"))
    return records


def _switched(model: torch.nn.Module) -> bool:
    """Whether `model`'s config (or a sub-config) names vitfast's attention: switched by patch, or a sub-model switched
    by the model holding it (which restores it at its unpatch); not one set to another implementation since."""
    return (model.config._attn_implementation in (NAME, NAME_EAGER)
            or "_vitfast_attn_previous" in model.__dict__ and _names_vitfast(_implementations(model.config)))


def _names_vitfast(implementations: dict) -> bool:
    """Whether a nested dict of _implementations names vitfast's attention (a model set to another one since
    patching, by the user's set_attn_implementation, does not)."""
    return any(_names_vitfast(v) if isinstance(v, dict) else v in (NAME, NAME_EAGER) for v in implementations.values())


def _calls_attention_interface(model: torch.nn.Module) -> bool:
    """Whether a module of `model` has a class (its own or a base: a user's subclass) whose code reads transformers'
    ALL_ATTENTION_FUNCTIONS (the attention of every modeling file that goes through the interface does, imported by
    name, module-qualified or inside forward). A model may say it can set an implementation and have no attention
    (ResNet, ConvNeXt), or its own (VitDet, SamVisionModel, Data2VecVision's classes picked at construction):
    switching its name changes nothing, and was reported as patched. (The models' _supports_* flags do not tell:
    GIT, BridgeTower and ALIGN call the interface without any.)"""
    return any(_reads_attention_functions(c) for module in model.modules() for c in type(module).__mro__)


_READS: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()


def _reads_attention_functions(cls: type) -> bool:
    """Whether the source of `cls` names ALL_ATTENTION_FUNCTIONS (without its source: whether its Python module
    imports it); not transformers.modeling_utils's classes (PreTrainedModel names it) nor torch's."""
    if cls not in _READS:
        if cls.__module__ == "transformers.modeling_utils" or cls.__module__.split(".")[0] in ("torch", "builtins"):
            _READS[cls] = False
        else:
            source = _source(cls)
            _READS[cls] = ("ALL_ATTENTION_FUNCTIONS" in source if source
                           else hasattr(sys.modules.get(cls.__module__), "ALL_ATTENTION_FUNCTIONS"))
    return _READS[cls]


# a test of the implementation's name in modeling code: `config._attn_implementation == "sdpa"`, `... in ("eager",
# "sdpa")`, `!= "eager"` (transformers 5.24: Gemma 4's KV-shared query slicing, DeepSeek-V3.2's and its kin's sparse
# top-k mask, GPT-2's eager upcast), outside construction (__init__ / post_init: TimmBackbone's and TimmWrapper's
# warnings there ran before patch_model did)
_NAME_TEST = re.compile(r"""_attn_implementation\s*(?:==|!=|(?:not\s+)?in)\s*[(\[{]?\s*["'](?:sdpa|eager)["']""")
_TESTS_NAME: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()


def _source(obj) -> str:
    """The source of a class or function, or "" where none is kept (defined in a REPL) or its file no longer parses
    (edited since it was imported: inspect parses it for a class)."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError, SyntaxError):
        return ""


def _name_tested(model: torch.nn.Module) -> Optional[str]:
    """Why `model` cannot be renamed to vitfast's implementation, or None: a class of its modules (its own or a
    base) tests the implementation's name against "sdpa" or "eager", and would take another branch under vitfast's
    (Gemma 4 sliced its KV-shared layers' queries where it must not: logits 85% off; DeepSeek-V3.2's sparse attention
    turned dense)."""
    for module in model.modules():
        for c in type(module).__mro__:
            if c not in _TESTS_NAME:
                methods = {name: getattr(f, "__func__", getattr(f, "fget", f)) for name, f in vars(c).items()}
                _TESTS_NAME[c] = c.__module__.startswith("transformers.models.") and any(
                    _NAME_TEST.search(_source(f)) for name, f in methods.items()
                    if inspect.isfunction(f) and name not in ("__init__", "post_init"))
            if _TESTS_NAME[c]:
                return (f"{c.__qualname__} ({c.__module__}) tests the attention implementation's name against "
                        f"'sdpa' or 'eager' and would take another branch under vitfast's: left on "
                        f"{model.config._attn_implementation!r}")
    return None


def _switch(model: torch.nn.Module, prefix: str):
    """Sets `model` (and its sub-models) to vitfast's attention names, keeping what it had for unpatch; returns the
    Patched record."""
    from vitfast.integrations.patch import Left, Patched, qualname

    _register_names()
    previous = _implementations(model.config)
    names = _vitfast_names(previous)
    if names == previous:  # (flex_attention, flash_attention_2, ...: vitfast replaces eager and SDPA)
        return Left(prefix, qualname(model), f"attn_implementation {previous['']!r} kept: vitfast replaces 'eager' "
                                              f"and 'sdpa'")
    with _quiet_sub_config_warning():
        model.set_attn_implementation(names)
    model.__dict__["_vitfast_attn_previous"] = _Previous(_original_names(previous))
    for module in model.modules():  # (a part saved on its own: its attention reads the config's name)
        if hasattr(module, "config"):
            module.__dict__[_REGISTERS] = _REGISTRATION
    what = (f"attn_implementation {previous['']!r} -> {names['']!r}" if names[""] != previous[""] else
            f"attn_implementation {previous['']!r} kept; sub-configs "
            f"{', '.join(k for k in names if k and names[k] != previous[k])} -> vitfast's")
    return Patched(prefix, qualname(model), "attention", what)


def _switch_again(model: torch.nn.Module, prefix: str):
    """A switched model's record: "already patched", or where the user set "eager" or "sdpa" on it or a sub-config
    since patch_model switched it (set_attn_implementation({"vision_config": "eager"})), those switched to vitfast's
    names, the user's kept for unpatch by every record of what patch replaced that the model holds, its own and its
    sub-models' (not a record of a model holding it: unpatch_model of that model restores the first patch's
    originals). A model the user built on vitfast's names is left as it is."""
    from vitfast.integrations.patch import Left, Patched, qualname

    current = _implementations(model.config)
    names = _vitfast_names(current)
    if names == current or _REGISTERS not in model.__dict__:
        return Left(prefix, qualname(model), "already patched (attn_implementation)")
    for module in model.modules():
        previous = module.__dict__.get("_vitfast_attn_previous")
        if previous is not None:
            module.__dict__["_vitfast_attn_previous"] = _Previous(_restored(_implementations(module.config),
                                                                            previous))
    with _quiet_sub_config_warning():
        model.set_attn_implementation(names)
    changed = ", ".join(f"{key or 'model'} {value!r}" for key, value in _changed(current, names))
    return Patched(prefix, qualname(model), "attention", f"attn_implementation set since patching ({changed}) -> "
                                                         f"vitfast's")


def _changed(current: dict, names: dict, path: str = "") -> list:
    """(dotted sub-config path, name) of each implementation in `current` that `names` replaces."""
    out = []
    for key, value in current.items():
        where = ".".join(p for p in (path, key) if p)
        if isinstance(value, dict):
            out += _changed(value, names[key], where)
        elif value != names[key]:
            out.append((where, value))
    return out


def _restored(current: dict, previous) -> dict:
    """`_implementations`' nesting with each of vitfast's names as `previous` (what patch replaced) has it, and the
    other names as they are now (set by the user since patching)."""
    previous = previous if isinstance(previous, dict) else {}
    return {key: _restored(value, previous.get(key)) if isinstance(value, dict)
            else previous.get(key, _ORIGINAL_NAMES[value]) if value in (NAME, NAME_EAGER)
            else value for key, value in current.items()}


class _SubConfigWarning(logging.Filter):
    """Drops transformers' "We set the attention implementation for the sub-config ... to `vitfast` without finding
    the associated sub-model ... undefined behavior": sub-configs read by modules that are not sub-models (SAM's mask
    decoder, MaskFormer's) take vitfast's name as they took the one it replaces, which is all the warning is about."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("without finding the associated sub-model" in message
                    and (f"`{NAME}`" in message or f"`{NAME_EAGER}`" in message))


@contextlib.contextmanager
def _quiet_sub_config_warning():
    log = logging.getLogger("transformers.modeling_utils")
    quiet = _SubConfigWarning()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def _implementations(config) -> dict:
    """The attention implementation of `config` and of each sub-config, nested as set_attn_implementation takes
    them (a DETR's backbone or a CLIP's towers may differ from the top model)."""
    out = {"": config._attn_implementation}
    for key in config.sub_configs:
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = _implementations(sub)
    return out


_VITFAST_NAMES = {"eager": NAME_EAGER, "sdpa": NAME}
_ORIGINAL_NAMES = {v: k for k, v in _VITFAST_NAMES.items()}


def _vitfast_names(implementations: dict) -> dict:
    """`_implementations`' nesting with "eager" replaced by NAME_EAGER (its masks decide what a query that sees no key
    gives: eager's averages the keys, SDPA's differs) and "sdpa" by NAME; the others kept (flex_attention,
    flash_attention_2, a user's own: a model built for them may need what SDPA has not, e.g. GPT-OSS's sinks)."""
    return {key: _vitfast_names(value) if isinstance(value, dict) else _VITFAST_NAMES.get(value, value)
            for key, value in implementations.items()}


def _original_names(implementations: dict) -> dict:
    """`_implementations`' nesting with vitfast's names as the implementations they replace (a sub-model a user
    patched first: its model's unpatch restores what it had before that)."""
    return {key: _original_names(value) if isinstance(value, dict) else _ORIGINAL_NAMES.get(value, value)
            for key, value in implementations.items()}


class _Previous(dict):
    """The implementations `patch` replaced, kept on the model for `unpatch`. Unpickled (a patched model saved whole
    with torch.save and loaded in another process), it registers vitfast's names with transformers first: the model's
    config names them, and nothing else in that process may have imported this module."""

    def __reduce__(self):
        return _restore_previous, (dict(self),)


def _restore_previous(implementations: dict) -> _Previous:
    _register_names()
    return _Previous(implementations)


class _Registration:
    """Held by each module of a switched model that holds its config: unpickled (the module, or a part of the model
    holding it, saved with torch.save and loaded in another process), it registers vitfast's names, which the config
    names, with transformers (a backbone saved alone raised KeyError: 'vitfast' is not a valid attention
    implementation)."""

    def __reduce__(self):
        return _registration, ()


def _registration() -> "_Registration":
    _register_names()
    return _REGISTRATION


_REGISTRATION = _Registration()
_REGISTERS = "_vitfast_registers_names"


def unpatch(model: torch.nn.Module) -> int:
    """Restores the attention implementation `patch` replaced (SwinLayers are restored by unpatch_model)."""
    previous = model.__dict__.pop("_vitfast_attn_previous", None)
    if previous is None:
        return 0
    for module in model.modules():
        module.__dict__.pop(_REGISTERS, None)
    current = _implementations(model.config)
    if not _names_vitfast(current):  # (set to another implementation since: kept)
        return 1
    # through the config's setter, which takes the nested values as they were (None for a sub-config never set,
    # which set_attn_implementation refuses); sub-models share these config objects. A (sub-)config set to another
    # implementation since patching keeps it.
    model.config._attn_implementation = _restored(current, previous)
    return 1


def _patch_embeddings_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
    conv = self.projection
    # (what the original refuses, e.g. an image smaller than a patch, gets the original's error)
    if (pixel_values.dim() != 4 or pixel_values.shape[1] != self.num_channels or not conv_takes(conv, pixel_values)
            or pixel_values.shape[2] < conv.kernel_size[0] or pixel_values.shape[3] < conv.kernel_size[1]):
        return type(self).forward(self, pixel_values)
    return patch_embed(pixel_values, conv.weight, conv.bias, tuple(conv.kernel_size))


def _patch_embeddings_check(module: torch.nn.Module) -> Optional[str]:
    if not patch_conv(getattr(module, "projection", None)):
        return "projection is not a non-overlapping patch Conv2d (stride = kernel, no padding, dilation or groups)"
    return None


def _attentions_recorded() -> bool:
    """Whether the running forward collects attention weights: transformers 5 no longer passes output_attentions
    to SAM's vision attention but records its outputs with hooks, under a context variable."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # transformers 4: output_attentions reaches the module's forward
        return False
    if torch.compiler.is_compiling():
        # dynamo cannot trace ContextVar.get: transformers keeps the collector in a plain attribute where its set()
        # ran under compilation (a compiled model); a compiled sub-module (one layer) sees none
        collected = _active_collector.global_var if getattr(_active_collector, "compiling", False) else None
    else:
        collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _sam_vision_attention(self, hidden_states: torch.Tensor, output_attentions, dropout_p: float):
    if output_attentions or _attentions_recorded():
        return type(self).forward(self, hidden_states, output_attentions=output_attentions)
    rel_pos = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else (None, None)
    out = sam_attention(hidden_states, self.qkv, self.num_attention_heads, self.scale, *rel_pos, dropout_p=dropout_p)
    return self.proj(out), None


def _sam_vision_attention_forward(self, hidden_states: torch.Tensor, output_attentions=None):
    """SamVisionAttention.forward (eager: dropout on the weights) on vitfast.rel_pos_attention; returns
    (output, None) where the original returns the weights, unless they are asked for."""
    return _sam_vision_attention(self, hidden_states, output_attentions, self.dropout if self.training else 0.0)


def _sam_vision_sdpa_attention_forward(self, hidden_states: torch.Tensor, output_attentions=False):
    """SamVisionSdpaAttention.forward (its SDPA call has no dropout) on vitfast.rel_pos_attention."""
    return _sam_vision_attention(self, hidden_states, output_attentions, 0.0)


def _sam_vision_attention_check(module: torch.nn.Module) -> Optional[str]:
    missing = [a for a in ("qkv", "proj", "num_attention_heads", "scale", "dropout", "use_rel_pos")
               if not hasattr(module, a)]
    return (f"unexpected SAM vision attention layout (missing {missing})" if missing
            else rel_pos_check(module, "use_rel_pos"))


def _vitdet_attention_forward(self, hidden_state: torch.Tensor, output_attentions: bool = False):
    if output_attentions:
        return type(self).forward(self, hidden_state, output_attentions)
    rel_pos = (self.rel_pos_h, self.rel_pos_w) if self.use_relative_position_embeddings else (None, None)
    return (self.proj(sam_attention(hidden_state, self.qkv, self.num_heads, self.scale, *rel_pos)),)


def _vitdet_attention_check(module: torch.nn.Module) -> Optional[str]:
    missing = [a for a in ("qkv", "proj", "num_heads", "scale", "use_relative_position_embeddings")
               if not hasattr(module, a)]
    return (f"unexpected VitDetAttention layout (missing {missing})" if missing
            else rel_pos_check(module, "use_relative_position_embeddings"))


def _mlp_body(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return self.fc2(mlp_fc1(hidden_states, self.fc1, self.activation_fn))


def _mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """ViTMLP / DeiTMLP / SwinMLP / CLIPMLP: fc1, activation_fn, fc2."""
    return mlp_rows(self, hidden_states, self.fc1, _mlp_body)


def _vitdet_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """VitDetMlp: fc1, act, drop, fc2, drop."""
    return self.drop(self.fc2(self.drop(mlp_fc1(x, self.fc1, self.act))))


def _sam_mlp_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """segment_anything's MLPBlock adapter under SamMLPBlock.forward's parameter name (keyword calls)."""
    return mlp_block_forward(self, hidden_states)


_MLP = Adapter("linear_gelu", "fc1 + GELU -> vitfast.linear_gelu", {"forward": _mlp_forward},
               functools.partial(mlp_check, act="activation_fn"))
_REL_POS = ("dense decomposed rel-pos bias -> vitfast.rel_pos_attention (no rel-pos: vitfast.attention); "
            "calls that return the attention weights keep the original path")
_SAM_VISION_ATTENTION = Adapter("rel_pos_attention", _REL_POS, {"forward": _sam_vision_attention_forward},
                                _sam_vision_attention_check)
_SAM_VISION_SDPA_ATTENTION = Adapter("rel_pos_attention", _REL_POS, {"forward": _sam_vision_sdpa_attention_forward},
                                     _sam_vision_attention_check)
_SAM_MLP_BLOCK = dataclasses.replace(SAM_MLP_BLOCK, methods={"forward": _sam_mlp_block_forward})
_PATCH_EMBEDDINGS = Adapter("patch_embed", "projection conv + flatten -> vitfast.patch_embed",
                            {"forward": _patch_embeddings_forward}, _patch_embeddings_check)
ADAPTERS = {
    "transformers.models.vit.modeling_vit.ViTMLP": _MLP,
    "transformers.models.deit.modeling_deit.DeiTMLP": _MLP,
    "transformers.models.swin.modeling_swin.SwinMLP": _MLP,
    "transformers.models.clip.modeling_clip.CLIPMLP": _MLP,
    "transformers.models.sam.modeling_sam.SamMLPBlock": _SAM_MLP_BLOCK,
    "transformers.models.sam_hq.modeling_sam_hq.SamHQMLPBlock": _SAM_MLP_BLOCK,
    "transformers.models.vitdet.modeling_vitdet.VitDetMlp": Adapter(
        "linear_gelu", "fc1 + GELU -> vitfast.linear_gelu", {"forward": _vitdet_mlp_forward}, mlp_check),
    "transformers.models.vit.modeling_vit.ViTPatchEmbeddings": _PATCH_EMBEDDINGS,
    "transformers.models.deit.modeling_deit.DeiTPatchEmbeddings": _PATCH_EMBEDDINGS,
    "transformers.models.sam.modeling_sam.SamVisionAttention": _SAM_VISION_ATTENTION,
    "transformers.models.sam.modeling_sam.SamVisionSdpaAttention": _SAM_VISION_SDPA_ATTENTION,
    "transformers.models.sam_hq.modeling_sam_hq.SamHQVisionAttention": _SAM_VISION_ATTENTION,
    "transformers.models.sam_hq.modeling_sam_hq.SamHQVisionSdpaAttention": _SAM_VISION_SDPA_ATTENTION,
    "transformers.models.vitdet.modeling_vitdet.VitDetAttention": Adapter(
        "rel_pos_attention", _REL_POS, {"forward": _vitdet_attention_forward}, _vitdet_attention_check),
}
# Classes of other models whose source is that of a class above under other names (transformers' "# Copied from"
# code, found by comparing the sources of transformers 5.24): the class copied -> "<model module>.<copy>"
_M = "transformers.models."
COPIES = {
    _M + "clip.modeling_clip.CLIPMLP": (
        "altclip.AltCLIPMLP", "blip.BlipMLP", "blip_2.Blip2MLP", "canary.CanaryDecoderMLP",
        "chinese_clip.ChineseCLIPVisionMLP", "clipseg.CLIPSegMLP", "cohere_asr.CohereAsrDecoderMLP",
        "cosmos3_edge.Cosmos3EdgeMLP", "git.GitVisionMLP", "glm_image.GlmImageVisionMLP",
        "granite_docling.GraniteDoclingVisionMLP", "hunyuan_vl.HunYuanVLVisionMLP", "hy_v4_vl.HYV4VLVisionMLP",
        "idefics2.Idefics2VisionMLP", "idefics3.Idefics3VisionMLP", "inkling2.Inkling2VisionMLP",
        "instructblip.InstructBlipMLP", "instructblipvideo.InstructBlipVideoMLP", "internvl.InternVLVisionMLP",
        "jina_embeddings_v3.JinaEmbeddingsV3MLP", "kosmos2.Kosmos2VisionMLP", "metaclip_2.MetaClip2MLP",
        "minicpm_ocr.MiniCPMOcrVisionMLP", "minicpmv4_6.MiniCPMV4_6VisionMLP", "minicpmv4_7.MiniCPMV4_7VisionMLP",
        "minimax_m3_vl.MiniMaxM3VLVisionMLP", "mlcd.MLCDMLP", "mllama.MllamaVisionMLP", "molmo2.Molmo2VisionMLP",
        "nemotron3_5_transcribe.Nemotron3_5TranscribeMLP", "nemotron3_diarization.Nemotron3DiarizationMLP",
        "owlv2.Owlv2MLP", "owlvit.OwlViTMLP", "phi.PhiMLP", "phi4_multimodal.Phi4MultimodalVisionMLP",
        "qianfan_ocr.QianfanOCRVisionMLP", "sam3_lite_text.Sam3LiteTextTextMLP", "siglip.SiglipMLP",
        "siglip2.Siglip2MLP", "smolvlm.SmolVLMVisionMLP", "step3p7.Step3p7VisionMLP", "tipsv2.Tipsv2MLP",
        "unlimited_ocr.UnlimitedOcrMLP", "video_llama_3.VideoLlama3VisionMLP"),
    _M + "vit.modeling_vit.ViTMLP": (
        "audio_spectrogram_transformer.ASTMLP", "beit.BeitMLP", "ijepa.IJepaMLP", "videoprism.VideoPrismMLP",
        "vit_mae.ViTMAEMLP", "vit_msn.ViTMSNMLP", "vivit.VivitMLP"),
    _M + "vit.modeling_vit.ViTPatchEmbeddings": (
        "beit.BeitPatchEmbeddings", "ijepa.IJepaPatchEmbeddings", "pixio.PixioPatchEmbeddings",
        "vit_mae.ViTMAEPatchEmbeddings", "vit_msn.ViTMSNPatchEmbeddings"),
    _M + "vitdet.modeling_vitdet.VitDetMlp": ("lw_detr.LwDetrViTMlp",),
    _M + "sam.modeling_sam.SamMLPBlock": (
        "deepseek_ocr2.DeepseekOcr2SamMLPBlock", "unlimited_ocr.UnlimitedOcrSamMLPBlock", "got_ocr2.GotOcr2MLPBlock",
        "pp_formulanet.PPFormulaNetMLPBlock", "slanext.SLANeXtMLPBlock", "seggpt.SegGptMlp"),
    _M + "sam.modeling_sam.SamVisionAttention": (
        "deepseek_ocr2.DeepseekOcr2SamVisionAttention", "unlimited_ocr.UnlimitedOcrSamVisionAttention",
        "got_ocr2.GotOcr2VisionAttention", "pp_formulanet.PPFormulaNetVisionAttention",
        "slanext.SLANeXtVisionAttention"),
    _M + "sam.modeling_sam.SamVisionSdpaAttention": (
        "deepseek_ocr2.DeepseekOcr2SamVisionSdpaAttention", "unlimited_ocr.UnlimitedOcrSamVisionSdpaAttention"),
}
ADAPTERS.update({f"{_M}{name.split('.')[0]}.modeling_{name}": ADAPTERS[original]
                 for original, names in COPIES.items() for name in names})
