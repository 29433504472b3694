"""timm adapters for `vitfast.patch_model`: forward paths bound to timm modules, reading their own parameters.

- `timm.layers.attention.Attention` (ViT, DeiT, ...; older timm: vision_transformer.Attention): SDPA ->
  vitfast.attention.
- `timm.models.swin_transformer.SwinTransformerBlock`: `_attn` (roll, pad, partition, mask, attention, reverse)
  -> one vitfast.window_attention call on the image-layout map (shift and mask computed in the kernel) when the
  map divides into windows; otherwise timm's path (timm shifts before padding, vitfast after).
- `timm.models.swin_transformer.WindowAttention`: forward -> vitfast.nn.WindowAttention's (used when called on
  its own; the patched block no longer calls it).
- `timm.models.vision_transformer_sam.Attention` (samvit_*: SAM's image encoder, windowed and global blocks): SDPA
  with the dense decomposed relative-position bias -> vitfast.rel_pos_attention (use_rel_pos=False:
  vitfast.attention; with rotary embeddings (use_rope) it keeps timm's path).
- `timm.layers.patch_embed.PatchEmbed`: forward -> vitfast.nn.PatchEmbed's (conv + flatten + LayerNorm fused).
- `timm.layers.mlp.Mlp` (ViT, DeiT, Swin, ...): fc1 + GELU -> vitfast.linear_gelu (other activations: timm's path).
- timm's LayerNorm: integrations/patch.py's LayerNorm adapter under timm's parameter name (x); timm's own path under
  autocast for a LayerNorm built after `timm.layers.set_fast_norm(True)` (it computes in the autocast dtype).
- MViTv2's pooling attention and the attention of `AttentionPoolLatent` ("map" pooling) are left (`LEFT`, with the
  reason in the report).

Nothing here imports timm: modules are matched by class name.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from vitfast.integrations.patch import (Adapter, _layer_norm_forward, conv_takes, head_dim_check, mlp_check,
                                       mlp_fc1, mlp_rows, patch_conv, qualname, shift_mask_changed,
                                       window_index_changed)
from vitfast.integrations.segment_anything import rel_pos_check, sam_attention
from vitfast.nn.patch_embed import PatchEmbed as _VitfastPatchEmbed
from vitfast.nn.window_attention import WindowAttention as _VitfastWindowAttention
from vitfast.nn.window_attention import _attn_dropout_p, _timm_scale
from vitfast.ops.attention import attention
from vitfast.ops.window_attention import window_attention


def _attention_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    if x.dim() != 3:  # (the original's error)
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    # unflatten keeps an empty batch (a reshape to (B, ..., -1) cannot infer -1 there); timm's head_dim where the
    # module has one, so a num_heads changed after construction fails as timm's reshape does
    head_dim = getattr(self, "head_dim", -1)
    q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    # (timm's fused path, its default, passes SDPA no scale and both masks: a changed self.scale counts on its eager
    # path only, which also drops attn_mask under is_causal, timm's resolve_self_attn_mask)
    fused = getattr(self, "fused_attn", False)
    x = attention(q, k, v, attn_mask if fused or not is_causal else None, is_causal=is_causal,
                  scale=_timm_scale(self), dropout_p=_attn_dropout_p(self, fused))
    x = x.transpose(1, 2).flatten(2)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _attention_check(module: nn.Module) -> Optional[str]:
    missing = [a for a in ("qkv", "q_norm", "k_norm", "norm", "proj", "proj_drop", "attn_drop", "scale")
               if not hasattr(module, a)]
    return f"unexpected timm Attention layout (missing {missing})" if missing else head_dim_check(
        getattr(module, "head_dim", None))


def _sam_attention_forward(self, x: Tensor) -> Tensor:
    rel_pos = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else (None, None)
    x = sam_attention(x, self.qkv, self.num_heads, _timm_scale(self), *rel_pos,
                      dropout_p=_attn_dropout_p(self, getattr(self, "fused_attn", False)), q_norm=self.q_norm,
                      k_norm=self.k_norm)
    return self.proj_drop(self.proj(x))


def _sam_attention_check(module: nn.Module) -> Optional[str]:
    missing = [a for a in ("qkv", "q_norm", "k_norm", "proj", "proj_drop", "attn_drop", "scale", "num_heads",
                           "use_rel_pos") if not hasattr(module, a)]
    if missing:
        return f"unexpected timm vision_transformer_sam Attention layout (missing {missing})"
    if getattr(module, "rope", None) is not None:
        return "rotary position embedding (use_rope): timm's path"
    return rel_pos_check(module, "use_rel_pos")


def _window_attention_forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    # (timm's takes windows only: the original's error; vitfast.nn's image layout needs shift_size)
    if x.dim() != 3 or window_index_changed(self.relative_position_index, self.window_size):
        return type(self).forward(self, x, mask)
    return _VitfastWindowAttention.forward(self, x, mask)


def _swin_block_attn(self, x: Tensor) -> Tensor:
    B, H, W, C = x.shape
    (wh, ww), (sh, sw) = self.window_size, self.shift_size
    divisible = H % wh == 0 and W % ww == 0 and (sh == 0 or H > wh) and (sw == 0 or W > ww)
    attn = self.attn
    if (not divisible or window_index_changed(getattr(attn, "relative_position_index", None), (wh, ww))
            or (not getattr(self, "dynamic_mask", False)
                and shift_mask_changed(getattr(self, "attn_mask", None), (H, W), (wh, ww), (sh, sw)))):
        return type(self)._attn(self, x)
    qkv = attn.qkv(x).unflatten(-1, (3, attn.num_heads, -1))
    out = window_attention(qkv, attn.relative_position_bias_table, (wh, ww), (sh, sw),
                           attention_dropout=_attn_dropout_p(attn, getattr(attn, "fused_attn", False)),
                           softmax_scale=_timm_scale(attn), clamp_window=False)
    return attn.proj_drop(attn.proj(out))


def _swin_block_check(module: nn.Module) -> Optional[str]:
    attn = getattr(module, "attn", None)
    if attn is None or not hasattr(attn, "relative_position_bias_table") or not hasattr(module, "_attn"):
        return "SwinTransformerBlock without timm's WindowAttention (relative_position_bias_table) and _attn"
    # (the fused _attn never calls attn: a subclass's own forward, e.g. one that records attention maps, would be
    # skipped)
    if qualname(attn) != "timm.models.swin_transformer.WindowAttention":
        return f"attn is {qualname(attn)}, not timm's WindowAttention: its own forward would be skipped"
    return None


def _window_attention_check(module: nn.Module) -> Optional[str]:
    if not all(hasattr(module, a) for a in ("relative_position_bias_table", "window_area", "dim")):
        return "unexpected timm WindowAttention layout"
    return None


def _patch_embed_forward(self, x: Tensor) -> Tensor:
    # an image of a size, channel count or dtype timm refuses: timm's own path, which raises timm's error; and a
    # proj replaced since patching by a convolution of another geometry
    if (not conv_takes(self.proj, x) or _VitfastPatchEmbed._size_error(self, *x.shape[-2:])
            or _patch_embed_check(self) is not None or (not getattr(self, "dynamic_img_pad", False) and (
                x.shape[-2] < self.proj.kernel_size[0] or x.shape[-1] < self.proj.kernel_size[1]))):
        return type(self).forward(self, x)
    return _VitfastPatchEmbed.forward(self, x)


def _patch_embed_check(module: nn.Module) -> Optional[str]:
    proj = getattr(module, "proj", None)
    if type(proj) is not nn.Conv2d:
        return f"proj is {qualname(proj)}, not torch.nn.Conv2d"
    if not patch_conv(proj) or tuple(proj.kernel_size) != tuple(module.patch_size):
        return ("proj is not a non-overlapping patch convolution (stride = kernel = patch_size, no padding, dilation "
                "or groups)")
    fmt = str(getattr(module.output_fmt, "value", module.output_fmt))
    if not module.flatten and fmt not in ("NCHW", "NHWC", "NLC"):
        return f"output_fmt {fmt} is not supported"
    norm = module.norm
    if not isinstance(norm, nn.Identity) and not module.flatten and fmt == "NCHW":
        return ("a norm on NCHW output (applied to the channels-first map; vitfast fuses a LayerNorm over the "
                "embedding dim only)")
    return None


def _timm_layer_norm_forward(self, x: Tensor) -> Tensor:
    # a fast-norm LayerNorm casts to the autocast dtype and returns it (timm.layers.fast_norm.fast_layer_norm)
    if getattr(self, "_fast_norm", False) and torch.is_autocast_enabled(x.device.type):
        return type(self).forward(self, x)
    return _layer_norm_forward(self, x)


def _mlp_body(self, x: Tensor) -> Tensor:
    x = self.drop1(mlp_fc1(x, self.fc1, self.act))
    return self.drop2(self.fc2(self.norm(x)))


def _mlp_forward(self, x: Tensor) -> Tensor:
    return mlp_rows(self, x, self.fc1, _mlp_body)


def _mlp_check(module: nn.Module) -> Optional[str]:
    missing = [a for a in ("fc1", "act", "drop1", "norm", "fc2", "drop2") if not hasattr(module, a)]
    return f"unexpected timm Mlp layout (missing {missing})" if missing else mlp_check(module)


ADAPTERS = {
    "timm.layers.mlp.Mlp": Adapter("linear_gelu", "fc1 + GELU -> vitfast.linear_gelu", {"forward": _mlp_forward},
                                   _mlp_check),
    "timm.layers.attention.Attention": Adapter(
        "attention", "SDPA -> vitfast.attention", {"forward": _attention_forward}, _attention_check),
    "timm.models.vision_transformer.Attention": Adapter(
        "attention", "SDPA -> vitfast.attention", {"forward": _attention_forward}, _attention_check),
    "timm.models.vision_transformer_sam.Attention": Adapter(
        "rel_pos_attention", "SDPA with the dense decomposed rel-pos bias -> vitfast.rel_pos_attention "
                     "(use_rel_pos=False: vitfast.attention)",
        {"forward": _sam_attention_forward}, _sam_attention_check),
    "timm.models.swin_transformer.SwinTransformerBlock": Adapter(
        "window_attention", "roll/pad/partition/mask/attention -> one fused vitfast.window_attention where the "
                            "map divides into windows (else timm's _attn: it shifts before padding, vitfast after)",
        {"_attn": _swin_block_attn}, _swin_block_check),
    "timm.models.swin_transformer.WindowAttention": Adapter(
        "window_attention", "forward -> vitfast.nn.WindowAttention's (windows in, bias table read in-kernel; "
                            "with a mask, SDPA with the bias and mask folded into one)",
        {"forward": _window_attention_forward}, _window_attention_check),
    "timm.layers.patch_embed.PatchEmbed": Adapter(
        "patch_embed", "conv + flatten + norm -> vitfast.patch_embed",
        {"forward": _patch_embed_forward, "_fused_norm": _VitfastPatchEmbed._fused_norm,
         "_size_error": _VitfastPatchEmbed._size_error}, _patch_embed_check),
    "timm.layers.norm.LayerNorm": Adapter("layer_norm", "LayerNorm -> vitfast.layer_norm",
                                          {"forward": _timm_layer_norm_forward}),
}

_MVITV2 = ("MViTv2 pooling attention (q, k, v pooled to other grids, an optional class token outside the rel-pos key "
           "grid, residual pooling, rel-pos tables indexed without resizing): not covered by "
           "vitfast.rel_pos_attention, timm's path")
_ROPE = "rotary position embedding applied to q and k inside the attention: timm's path"
LEFT = {
    "timm.models.eva.EvaAttention": "EVA attention (rotary position embedding on q and k where the model has one): "
                                    "no adapter, timm's path",
    "timm.layers.attention.AttentionRope": _ROPE,
    "timm.models.beit.Attention": "relative position bias (BEiT) gathered inside the attention: timm's path",
    "timm.models.cait.TalkingHeadAttn": "talking heads (linear maps across heads before and after the softmax): "
                                        "timm's path",
    "timm.models.cait.ClassAttn": "class attention (the class token's query over all tokens): timm's path",
    "timm.models.mvitv2.MultiScaleAttention": _MVITV2,
    "timm.models.mvitv2.MultiScaleAttentionPoolFirst": _MVITV2,
    "timm.layers.attention_pool.AttentionPoolLatent": (
        "attention pooling with learned latent queries (global_pool='map'): its attention keeps timm's path (its "
        "LayerNorm and MLP are patched)"),
}
