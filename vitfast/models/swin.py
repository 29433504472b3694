"""Swin Transformer (Liu et al. 2021, arXiv:2103.14030) and Swin-V2 (Liu et al. 2022, arXiv:2111.09883),
torchvision's layout and parameter names.

torchvision's swin_t/s/b and swin_v2_t/s/b state dicts load as they are; `swin_from_transformers` converts a
Hugging Face SwinModel and `swin_from_timm` a timm SwinTransformer. On the vitfast backend the patch embedding runs
with its LayerNorm fused (vitfast.patch_embed), each block's shifted-window attention is one fused op (pad, roll,
partition, bias gather, shift mask, softmax, reverse, roll back and crop inside the kernel), its second LayerNorm is
fused with the residual add, and patch merging gathers the 2x2 neighbourhood inside the LayerNorm + GEMM. Swin-V2
(`v2=True`) runs the same fused attention with cosine scores and its per-head logit scale; its blocks normalize
after the attention and the MLP (res-post-norm) and its patch merging normalizes after the reduction, so those
LayerNorms are not fused with a residual or a gather. `sdpa` runs the textbook windowing around
F.scaled_dot_product_attention with the bias and shift mask as a float attn_mask; `eager` is torchvision's code.
"""
import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vitfast
from vitfast.integrations.patch import qualname, submodules_intercepted
from vitfast.models.common import (LayerNorm, at_least, check_backend, check_transformers_model, like, set_backend,
                                   size_entry, square, uncompiled, warn_dropped_regularization)
from vitfast.nn.patch_merging import PatchMerging as _FusedPatchMerging
from vitfast.nn.window_attention import ShiftedWindowAttention as _FusedWindowAttention
from vitfast.nn.window_attention import ShiftedWindowAttentionV2 as _FusedWindowAttentionV2
from vitfast.ops.patch_merging import _gather, merge_2x2
from vitfast.ops.window_attention import _from_windows, _pair, _shift_mask, _to_windows, shifted_window_attention_ref

SIZES = {  # name: (embed_dim, depths, num_heads)
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)), "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}


class Permute(nn.Module):
    """torchvision.ops.misc.Permute (no parameters; kept so that the Sequential indices match torchvision)."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(self.dims)


class PatchEmbed(nn.Sequential):
    """torchvision's features[0]: Conv2d(patch, stride patch), Permute to NHWC, LayerNorm."""

    backend = "vitfast"

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__(nn.Conv2d(in_chans, embed_dim, patch_size, patch_size), Permute([0, 2, 3, 1]),
                         LayerNorm(embed_dim, eps=1e-5))

    def forward(self, images: Tensor) -> Tensor:
        conv, norm = self[0], self[2]
        if self.backend != "vitfast" or submodules_intercepted(conv, norm):  # (hooks there: called, so they run)
            return super().forward(images)
        B, _, H, W = images.shape
        p = conv.kernel_size[0]
        tokens = vitfast.patch_embed(images, conv.weight, conv.bias, p, norm_weight=norm.weight, norm_bias=norm.bias,
                                     eps=norm.eps)
        return tokens.view(B, H // p, W // p, conv.out_channels)


class ShiftedWindowAttention(_FusedWindowAttention):
    """torchvision's ShiftedWindowAttention names; forward on the model's backend."""

    backend = "vitfast"

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "vitfast":
            return super().forward(x)
        bias = self.get_relative_position_bias()
        if self.backend == "eager":
            return shifted_window_attention_ref(x, self.qkv.weight, self.proj.weight, bias, self.window_size,
                                                self.num_heads, self.shift_size, self.attention_dropout, self.dropout,
                                                self.qkv.bias, self.proj.bias, self._logit_scale(), self.training)
        return self._sdpa(x, bias)

    def _sdpa(self, x: Tensor, bias: Tensor) -> Tensor:
        B, H, W, C = x.shape
        ws, heads = self.window_size, self.num_heads
        Hp, Wp = -(-H // ws[0]) * ws[0], -(-W // ws[1]) * ws[1]
        shift = [0 if ws[0] >= Hp else self.shift_size[0], 0 if ws[1] >= Wp else self.shift_size[1]]
        logit_scale, qkv_bias = self._logit_scale(), self.qkv.bias
        if logit_scale is not None and qkv_bias is not None:  # Swin-V2 has no key bias
            qkv_bias = torch.cat([qkv_bias[:C], torch.zeros_like(qkv_bias[C:2 * C]), qkv_bias[2 * C:]])
        # Swin pads the input before the projection: padding pixels carry the qkv bias.
        windows = _to_windows(F.linear(x, self.qkv.weight, qkv_bias), ws, shift, fill=qkv_bias)
        nW, N = windows.shape[1:3]
        q, k, v = windows.view(B, nW, N, 3, heads, C // heads).permute(3, 0, 1, 4, 2, 5).unbind(0)
        scale = None
        if logit_scale is not None:  # cosine attention: unit q and k, the per-head scale folded into q
            q = F.normalize(q, dim=-1) * torch.clamp(logit_scale, max=math.log(100.0)).exp()
            k, scale = F.normalize(k, dim=-1), 1.0
        mask = bias if sum(shift) == 0 else bias + _shift_mask(Hp, Wp, ws, shift, bias)[:, None]
        p = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=p, scale=scale)
        out = _from_windows(out.transpose(2, 3).reshape(B, nW, N, C), Hp, Wp, ws, shift)[:, :H, :W]
        return F.dropout(F.linear(out, self.proj.weight, self.proj.bias), self.dropout, self.training)


class ShiftedWindowAttentionV2(ShiftedWindowAttention, _FusedWindowAttentionV2):
    """torchvision's ShiftedWindowAttentionV2 names (logit_scale, cpb_mlp); forward on the model's backend."""


class PatchMerging(_FusedPatchMerging):
    """torchvision's PatchMerging names (norm, reduction); forward on the model's backend."""

    backend = "vitfast"

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "vitfast":
            return super().forward(x)
        return self.reduction(self.norm(merge_2x2(x)))  # (calling the submodules: their hooks run)


class PatchMergingV2(nn.Module):
    """torchvision's PatchMergingV2: gather, reduction, then LayerNorm(2 * dim) (the norm runs on the model's
    backend; it follows the GEMM, so it is not fused into the gather)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = LayerNorm(2 * dim, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        return self.norm(self.reduction(_gather(x)).view(B, (H + 1) // 2, (W + 1) // 2, 2 * C))


class SwinTransformerBlock(nn.Module):
    attn_layer = ShiftedWindowAttention

    def __init__(self, dim: int, num_heads: int, window_size: List[int], shift_size: List[int], mlp_ratio: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn = self.attn_layer(dim, window_size, shift_size, num_heads)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        y, x = self.norm2(self.attn(self.norm1(x)), x)  # fused: x = x + attn(...); y = norm2(x)
        return x + self.mlp(y)


class SwinTransformerBlockV2(SwinTransformerBlock):
    """Swin-V2's block: res-post-norm, x + norm(attn(x)) and x + norm(mlp(x))."""

    attn_layer = ShiftedWindowAttentionV2

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.norm1(self.attn(x))
        return x + self.norm2(self.mlp(x))


class SwinTransformer(nn.Module):
    """Swin-T/S/B (V1, or V2 with `v2=True`) in torchvision's layout: `features` (patch embed, stages, patch
    merging), `norm`, `head`.

    forward(images (B, C, H, W)) -> logits (the pooled features when num_classes is 0); forward_features returns
    each stage's output (B, H_i, W_i, C_i), the last one normalized, for detection and segmentation heads.
    patch_size and window_size: an int or an (n, n) pair (torchvision's [7, 7]).

    Raises:
        ValueError: a non-square patch_size or window_size, depths and num_heads of different lengths, a depth or
            num_classes below 0, in_chans, embed_dim or the MLP width below 1, a from_size name not in SIZES.
    """

    def __init__(self, patch_size: int = 4, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, in_chans: int = 3, v2: bool = False, backend: str = "vitfast"):
        super().__init__()
        self.backend = check_backend(backend)
        window_size = square(window_size, "window_size", "SwinTransformer")
        patch_size = square(patch_size, "patch_size", "SwinTransformer")
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"SwinTransformer needs one depth and one head count per stage, got depths "
                             f"{tuple(depths)} and num_heads {tuple(num_heads)}")
        at_least("SwinTransformer", 1, in_chans=in_chans, embed_dim=embed_dim,
                 mlp_hidden_dim=int(embed_dim * mlp_ratio))
        at_least("SwinTransformer", 0, num_classes=num_classes, **{f"depths[{i}]": d for i, d in enumerate(depths)})
        block = SwinTransformerBlockV2 if v2 else SwinTransformerBlock
        layers: List[nn.Module] = [PatchEmbed(in_chans, embed_dim, patch_size)]
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2 ** i
            layers.append(nn.Sequential(*[
                block(dim, heads, [window_size] * 2, [0 if j % 2 == 0 else window_size // 2] * 2, mlp_ratio)
                for j in range(depth)]))
            if i < len(depths) - 1:
                layers.append(PatchMergingV2(dim) if v2 else
                              PatchMerging(dim, lambda d: LayerNorm(d, eps=1e-5)))
        self.features = nn.Sequential(*layers)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = LayerNorm(self.num_features, eps=1e-5)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        set_backend(self, backend)

    @classmethod
    def from_size(cls, size: str, v2: bool = False, **kw) -> "SwinTransformer":
        """Swin-{tiny, small, base} as torchvision's swin_t/s/b (window 7) or, with v2=True, swin_v2_t/s/b
        (window 8)."""
        dim, depths, heads = size_entry(SIZES, size, "SwinTransformer")
        kw.setdefault("window_size", 8 if v2 else 7)
        return cls(embed_dim=dim, depths=depths, num_heads=heads, v2=v2, **kw)

    def forward_features(self, images: Tensor) -> List[Tensor]:
        p = self.features[0][0].kernel_size[0]
        if images.dim() != 4 or min(images.shape[-2:]) < p:
            raise ValueError(f"SwinTransformer expects images (B, C, H, W) of at least one {p}x{p} patch, got "
                             f"{tuple(images.shape)}")
        x = self.features[0](images)
        stages = []
        for layer in self.features[1:]:
            x = layer(x)
            if isinstance(layer, nn.Sequential):  # a stage, not a patch merging
                stages.append(x)
        stages[-1] = self.norm(stages[-1])
        return stages

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images)[-1].mean((1, 2)))


def _own_buffers(model: SwinTransformer) -> dict:
    """The relative_position_index buffers, which the model computes itself (checkpoints may not carry them)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith("relative_position_index")}


def swin_from_transformers(hf_model: nn.Module, num_classes: int = 0, backend: str = "vitfast") -> SwinTransformer:
    """A SwinTransformer with the weights of a Hugging Face SwinModel (transformers 5 names). With num_classes 0
    (the default) the head is nn.Identity and forward returns the pooled features, (B, C) (SwinModel's
    pooler_output); with num_classes > 0 the head is a new, randomly initialised nn.Linear. Only configurations
    torchvision's layout holds convert: GELU, qkv bias, layer_norm_eps 1e-5, no absolute position embedding, a
    square patch. The converted model follows torchvision's rules, which give Hugging Face's outputs on images whose
    sides are multiples of the patch and on stage maps that are square or larger than the window; elsewhere they
    differ: Hugging Face pads the image to whole patches (torchvision's convolution drops the remainder) and, where
    min(H, W) of a map is at most the window, shrinks the window to it and drops the shift on both axes (torchvision
    drops it per axis, on an axis the window covers).

    The model has no dropout or drop path: the source's are not carried over (a warning says so where it has some).

    Raises:
        ValueError: a model that is not a SwinModel (e.g. SwinForImageClassification: pass its `.swin`; a Swin-V2
            model) or a configuration outside the above.
    """
    hf_model = uncompiled(hf_model)
    check_transformers_model(hf_model, "swin_from_transformers", ("swin",), "a transformers SwinModel")
    warn_dropped_regularization(hf_model, "swin_from_transformers")
    cfg = hf_model.config
    sd = hf_model.state_dict()
    if "embeddings.patch_embeddings.projection.weight" not in sd:
        raise ValueError(f"swin_from_transformers expects a transformers SwinModel, got {type(hf_model).__name__} "
                         f"(for SwinForImageClassification pass its .swin)")
    if cfg.hidden_act != "gelu" or not cfg.qkv_bias or cfg.layer_norm_eps != 1e-5:
        raise ValueError(f"only GELU, qkv_bias=True and layer_norm_eps=1e-5 Swin configs convert, got "
                         f"{cfg.hidden_act!r}, {cfg.qkv_bias}, {cfg.layer_norm_eps}")
    if getattr(cfg, "use_absolute_embeddings", False):
        raise ValueError("Hugging Face Swin with an absolute position embedding (use_absolute_embeddings=True) "
                         "does not convert")
    patch_size = square(cfg.patch_size, "patch_size", "swin_from_transformers")
    model = SwinTransformer(patch_size, cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size, cfg.mlp_ratio,
                            num_classes, cfg.num_channels, backend=backend)
    out = {"features.0.0.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "features.0.0.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "features.0.2.weight": sd["embeddings.norm.weight"], "features.0.2.bias": sd["embeddings.norm.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"], **_own_buffers(model)}
    for i, depth in enumerate(cfg.depths):
        stage = f"features.{1 + 2 * i}."
        for j in range(depth):
            h, o = f"encoder.layers.{i}.blocks.{j}.", f"{stage}{j}."
            out[o + "attn.relative_position_bias_table"] = sd[h + "attention.relative_position_bias.relative_position_bias_table"]
            for part in ("weight", "bias"):
                out[o + f"attn.qkv.{part}"] = torch.cat([sd[h + f"attention.{n}_proj.{part}"] for n in "qkv"])
                for src, dst in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                                 ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.3")):
                    out[o + f"{dst}.{part}"] = sd[h + f"{src}.{part}"]
        if i < len(cfg.depths) - 1:
            merge, h = f"features.{2 + 2 * i}.", f"encoder.layers.{i}.downsample."
            out.update({merge + "reduction.weight": sd[h + "reduction.weight"],
                        merge + "norm.weight": sd[h + "norm.weight"], merge + "norm.bias": sd[h + "norm.bias"]})
    model = like(model, hf_model, "swin_from_transformers")
    missing, unexpected = model.load_state_dict(out, strict=False)
    if set(missing) - {"head.weight", "head.bias"} or unexpected:
        raise ValueError(f"state dict conversion left missing={sorted(missing)} unexpected={sorted(unexpected)}")
    return model


def swin_from_timm(timm_model: nn.Module, backend: str = "vitfast") -> SwinTransformer:
    """A SwinTransformer with the weights (head included) of a timm SwinTransformer (timm >= 0.9 names: each
    stage's downsample at its start). Only the configurations torchvision's layout can hold convert: no absolute
    position embedding, GELU, qkv bias, LayerNorm eps 1e-5, and the same window in every stage (timm shrinks a
    window that covers the whole map, with a smaller bias table; torchvision pads the map instead). On maps that are
    multiples of the window (every standard config) the outputs are timm's; on others they are torchvision's, which
    pads before the cyclic shift where timm shifts first. Each block takes timm's shift, which timm fixes at build
    time (0 in a stage whose map the window covers). A timm model built with strict_img_size=False or
    dynamic_img_size=True and run at a smaller size keeps its shift where the window covers the map; the converted
    model follows torchvision there (no shift on such an axis), so their outputs differ at those sizes. The shifts
    are attributes of the blocks (`attn.shift_size`), not in the state dict: a converted model whose shifts differ
    from torchvision's for its config (timm's fixed 0 where the window covered the map at build time) keeps them only
    saved whole (`torch.save(model)`); its state dict loaded into a new SwinTransformer gets torchvision's.

    Raises:
        ValueError: a model other than timm's SwinTransformer (V1), or a configuration outside the above (also
            always_partition, per-stage embedding widths or MLP ratios, a head_dim other than dim / heads, a
            non-square patch, a global_pool other than 'avg').

    The model has no dropout or drop path: the source's are not carried over (a warning says so where it has some).
    """
    timm_model = uncompiled(timm_model)
    cls = qualname(timm_model)
    if cls != "timm.models.swin_transformer.SwinTransformer":
        raise ValueError(f"swin_from_timm expects timm.models.swin_transformer.SwinTransformer, got {cls}")
    warn_dropped_regularization(timm_model, "swin_from_timm")
    sd = timm_model.state_dict()
    if "absolute_pos_embed" in sd:
        raise ValueError("timm Swin with an absolute position embedding (ape=True) does not convert")
    stages = timm_model.layers
    # (the window from the modules: a bias table's row count alone, (2 wh - 1)(2 ww - 1), also fits other windows,
    # e.g. (5, 13) and 8 x 8 have 225 rows)
    windows = {tuple(w) if isinstance(w, (tuple, list)) else (w, w)
               for w in (b.attn.window_size for s in stages for b in s.blocks)}
    tables = [(k, v.shape[0]) for k, v in sd.items() if k.endswith("attn.relative_position_bias_table")]
    window = next(iter(windows))[0]
    side = 2 * window - 1
    if len(windows) != 1 or window != next(iter(windows))[1] or any(n != side * side for _, n in tables):
        per_stage = [tuple(s.blocks[0].attn.window_size) if len(s.blocks) else None for s in stages]
        largest, patch = max(max(w) for w in windows), timm_model.patch_embed.proj.kernel_size[0]
        # (timm clamps a block's window to a smaller map: a model built for small images, not a per-stage choice)
        clamped = any(tuple(b.attn.window_size) == tuple(getattr(b, "input_resolution", ())) and max(b.attn.window_size)
                      < largest for st in stages for b in st.blocks)
        shrunk = ("; timm shrinks the window of a stage whose map is smaller: a model built for images of at least "
                  f"{largest * patch * 2 ** (len(stages) - 1)} pixels keeps {largest} in every stage"
                  if clamped and all(w[0] == w[1] for w in windows) else "")
        raise ValueError(f"timm Swin with per-stage or non-square windows does not convert: windows per stage "
                         f"{per_stage} (one square window everywhere converts{shrunk})")
    first = stages[0].blocks[0]
    dim = first.norm1.normalized_shape[0]
    kernel = tuple(timm_model.patch_embed.proj.kernel_size)
    if kernel[0] != kernel[1]:
        raise ValueError(f"timm Swin with a non-square patch {kernel} does not convert")
    for i, stage in enumerate(stages):
        for block in stage.blocks:
            width = block.norm1.normalized_shape[0]
            if width != dim * 2 ** i or block.attn.qkv.out_features != 3 * width:
                raise ValueError(f"timm Swin stage {i} has width {width} and qkv width {block.attn.qkv.out_features}"
                                 f"; only widths embed_dim * 2**stage ({dim * 2 ** i}) and head_dim = width / heads "
                                 f"convert")
            if getattr(block, "always_partition", False):
                raise ValueError("timm Swin with always_partition=True (full windows and shifts on maps the window "
                                 "covers) does not convert")
    # timm's own ratio (int(width * mlp_ratio) in every stage) where one ratio gives every stage's fc1 width
    mlp_ratio = getattr(first, "mlp_ratio", first.mlp.fc1.out_features / dim)
    if any(b.mlp.fc1.out_features != int(b.norm1.normalized_shape[0] * mlp_ratio) for s in stages for b in s.blocks):
        raise ValueError(f"timm Swin with per-stage MLP ratios does not convert (fc1 widths "
                         f"{[s.blocks[0].mlp.fc1.out_features for s in stages]})")
    if getattr(timm_model, "global_pool", "avg") != "avg":
        raise ValueError(f"timm Swin with global_pool={timm_model.global_pool!r} does not convert (torchvision's "
                         f"layout average-pools)")
    norms = [m for m in timm_model.modules() if isinstance(m, nn.LayerNorm)]
    if any(n.weight is None or n.bias is None for n in norms):
        raise ValueError("timm Swin with LayerNorms without an affine weight and bias does not convert")
    if not isinstance(first.mlp.act, nn.GELU) or first.attn.qkv.bias is None or any(n.eps != 1e-5 for n in norms):
        raise ValueError(f"only GELU, qkv_bias=True and LayerNorm eps=1e-5 timm Swin models convert, got "
                         f"{type(first.mlp.act).__name__}, qkv bias {first.attn.qkv.bias is not None}, eps "
                         f"{sorted({n.eps for n in norms})}")
    head = sd.get("head.fc.weight")
    model = SwinTransformer(timm_model.patch_embed.proj.kernel_size[0], dim, [len(s.blocks) for s in stages],
                            [s.blocks[0].attn.num_heads for s in stages], window,
                            mlp_ratio, 0 if head is None else head.shape[0],
                            timm_model.patch_embed.proj.in_channels, backend=backend)
    out = {"features.0.0.weight": sd["patch_embed.proj.weight"], "features.0.0.bias": sd["patch_embed.proj.bias"],
           "features.0.2.weight": sd["patch_embed.norm.weight"], "features.0.2.bias": sd["patch_embed.norm.bias"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"], **_own_buffers(model)}
    if head is not None:
        out.update({"head.weight": head, "head.bias": sd["head.fc.bias"]})
    for i, stage in enumerate(stages):
        for j, block in enumerate(stage.blocks):
            # the shift as timm fixed it at build time (0 in a stage whose map the window covered then), which a
            # timm model built with strict_img_size=False keeps at other sizes
            model.features[1 + 2 * i][j].attn.shift_size = _pair(block.shift_size, "shift_size")
            t, o = f"layers.{i}.blocks.{j}.", f"features.{1 + 2 * i}.{j}."
            out[o + "attn.relative_position_bias_table"] = sd[t + "attn.relative_position_bias_table"]
            for part in ("weight", "bias"):
                for src, dst in (("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("norm1", "norm1"),
                                 ("norm2", "norm2"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.3")):
                    out[o + f"{dst}.{part}"] = sd[t + f"{src}.{part}"]
        if i > 0:  # timm's downsample opens stage i; torchvision's PatchMerging closes stage i - 1
            t, o = f"layers.{i}.downsample.", f"features.{2 * i}."
            out.update({o + "reduction.weight": sd[t + "reduction.weight"], o + "norm.weight": sd[t + "norm.weight"],
                        o + "norm.bias": sd[t + "norm.bias"]})
    model = like(model, timm_model, "swin_from_timm")
    model.load_state_dict(out)
    return model
