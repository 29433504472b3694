"""Swin Transformer (Liu et al. 2021, arXiv:2103.14030), torchvision's layout and parameter names.

torchvision's swin_t/s/b state dicts load as they are; `swin_from_transformers` converts a Hugging Face
SwinModel. On the vitfast backend the patch embedding runs with its LayerNorm fused (vitfast.patch_embed),
each block's shifted-window attention is one fused op (pad, roll, partition, bias gather, shift mask,
softmax, reverse, roll back and crop inside the kernel), its second LayerNorm is fused with the residual
add, and patch merging gathers the 2x2 neighbourhood inside the LayerNorm + GEMM. `sdpa` runs the textbook
windowing around F.scaled_dot_product_attention with the bias and shift mask as a float attn_mask; `eager`
is torchvision's code.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vitfast
from vitfast.models.common import LayerNorm, check_backend, set_backend
from vitfast.nn.patch_merging import PatchMerging as _FusedPatchMerging
from vitfast.nn.window_attention import ShiftedWindowAttention as _FusedWindowAttention
from vitfast.ops.patch_merging import _gather
from vitfast.ops.window_attention import _from_windows, _shift_mask, _to_windows, shifted_window_attention_ref

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
        if self.backend != "vitfast":
            return super().forward(images)
        conv, norm = self[0], self[2]
        B, _, H, W = images.shape
        p = conv.kernel_size[0]
        tokens = vitfast.patch_embed(images, conv.weight, conv.bias, p, norm_weight=norm.weight, norm_bias=norm.bias,
                                     eps=norm.eps)
        return tokens.view(B, H // p, W // p, -1)


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
                                                self.qkv.bias, self.proj.bias, training=self.training)
        return self._sdpa(x, bias)

    def _sdpa(self, x: Tensor, bias: Tensor) -> Tensor:
        B, H, W, C = x.shape
        ws, heads = self.window_size, self.num_heads
        Hp, Wp = -(-H // ws[0]) * ws[0], -(-W // ws[1]) * ws[1]
        shift = [0 if ws[0] >= Hp else self.shift_size[0], 0 if ws[1] >= Wp else self.shift_size[1]]
        # Swin pads the input before the projection: padding pixels carry the qkv bias.
        windows = _to_windows(F.linear(x, self.qkv.weight, self.qkv.bias), ws, shift, fill=self.qkv.bias)
        nW, N = windows.shape[1:3]
        q, k, v = windows.view(B, nW, N, 3, heads, C // heads).permute(3, 0, 1, 4, 2, 5).unbind(0)
        mask = bias if sum(shift) == 0 else bias + _shift_mask(Hp, Wp, ws, shift, bias)[:, None]
        p = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=p)
        out = _from_windows(out.transpose(2, 3).reshape(B, nW, N, C), Hp, Wp, ws, shift)[:, :H, :W]
        return F.dropout(F.linear(out, self.proj.weight, self.proj.bias), self.dropout, self.training)


class PatchMerging(_FusedPatchMerging):
    """torchvision's PatchMerging names (norm, reduction); forward on the model's backend."""

    backend = "vitfast"

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "vitfast":
            return super().forward(x)
        return self.reduction(self.norm(_gather(x)))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: List[int], shift_size: List[int], mlp_ratio: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn = ShiftedWindowAttention(dim, window_size, shift_size, num_heads)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        y, x = self.norm2(self.attn(self.norm1(x)), x)  # fused: x = x + attn(...); y = norm2(x)
        return x + self.mlp(y)


class SwinTransformer(nn.Module):
    """Swin-T/S/B in torchvision's layout: `features` (patch embed, stages, patch merging), `norm`, `head`.

    forward(images (B, C, H, W)) -> logits; forward_features returns each stage's output (B, H_i, W_i, C_i),
    the last one normalized, for detection and segmentation heads.
    """

    def __init__(self, patch_size: int = 4, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, in_chans: int = 3, backend: str = "vitfast"):
        super().__init__()
        self.backend = check_backend(backend)
        layers: List[nn.Module] = [PatchEmbed(in_chans, embed_dim, patch_size)]
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2 ** i
            layers.append(nn.Sequential(*[
                SwinTransformerBlock(dim, heads, [window_size] * 2, [0 if j % 2 == 0 else window_size // 2] * 2,
                                     mlp_ratio) for j in range(depth)]))
            if i < len(depths) - 1:
                layers.append(PatchMerging(dim, norm_layer=lambda d: LayerNorm(d, eps=1e-5)))
        self.features = nn.Sequential(*layers)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = LayerNorm(self.num_features, eps=1e-5)
        self.head = nn.Linear(self.num_features, num_classes)
        set_backend(self, backend)

    @classmethod
    def from_size(cls, size: str, **kw) -> "SwinTransformer":
        """Swin-{tiny, small, base} with window 7, as torchvision's swin_t/s/b."""
        dim, depths, heads = SIZES[size]
        return cls(embed_dim=dim, depths=depths, num_heads=heads, **kw)

    def forward_features(self, images: Tensor) -> List[Tensor]:
        x = self.features[0](images)
        stages = []
        for layer in self.features[1:]:
            x = layer(x)
            if not isinstance(layer, PatchMerging):
                stages.append(x)
        stages[-1] = self.norm(stages[-1])
        return stages

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images)[-1].mean((1, 2)))


def swin_from_transformers(hf_model: nn.Module, num_classes: int = 1, backend: str = "vitfast") -> SwinTransformer:
    """A SwinTransformer with the weights of a Hugging Face SwinModel (transformers 5 names); the head stays
    randomly initialised."""
    cfg = hf_model.config
    if cfg.hidden_act != "gelu" or not cfg.qkv_bias or cfg.layer_norm_eps != 1e-5:
        raise ValueError(f"only GELU, qkv_bias=True and layer_norm_eps=1e-5 Swin configs convert, got "
                         f"{cfg.hidden_act!r}, {cfg.qkv_bias}, {cfg.layer_norm_eps}")
    model = SwinTransformer(cfg.patch_size, cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size, cfg.mlp_ratio,
                            num_classes, cfg.num_channels, backend)
    sd = hf_model.state_dict()
    out = {"features.0.0.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "features.0.0.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "features.0.2.weight": sd["embeddings.norm.weight"], "features.0.2.bias": sd["embeddings.norm.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    for i, depth in enumerate(cfg.depths):
        stage = f"features.{1 + 2 * i}."
        for j in range(depth):
            h, o = f"encoder.layers.{i}.blocks.{j}.", f"{stage}{j}."
            out[o + "attn.relative_position_bias_table"] = sd[h + "attention.relative_position_bias.relative_position_bias_table"]
            out[o + "attn.relative_position_index"] = model.state_dict()[o + "attn.relative_position_index"]
            for part in ("weight", "bias"):
                out[o + f"attn.qkv.{part}"] = torch.cat([sd[h + f"attention.{n}_proj.{part}"] for n in "qkv"])
                for src, dst in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                                 ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.3")):
                    out[o + f"{dst}.{part}"] = sd[h + f"{src}.{part}"]
        if i < len(cfg.depths) - 1:
            merge, h = f"features.{2 + 2 * i}.", f"encoder.layers.{i}.downsample."
            out.update({merge + "reduction.weight": sd[h + "reduction.weight"],
                        merge + "norm.weight": sd[h + "norm.weight"], merge + "norm.bias": sd[h + "norm.bias"]})
    missing, unexpected = model.load_state_dict(out, strict=False)
    if set(missing) - {"head.weight", "head.bias"} or unexpected:
        raise ValueError(f"state dict conversion left missing={sorted(missing)} unexpected={sorted(unexpected)}")
    return model
