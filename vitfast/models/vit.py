"""ViT (Dosovitskiy et al. 2021, arXiv:2010.11929) and DeiT (Touvron et al. 2021, arXiv:2012.12877).

Parameter names are timm's VisionTransformer/VisionTransformerDistilled names, so timm state dicts load
as they are; `vit_from_transformers` converts a Hugging Face ViTModel/DeiTModel. On the vitfast backend
the patch embedding (conv + class/distillation tokens + position embedding), the attention and the
LayerNorms run as vitfast ops, with the second LayerNorm of each block fused with its residual add.
"""

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vitfast
from vitfast.integrations.patch import submodules_intercepted
from vitfast.models.common import (LayerNorm, at_least, attend, check_backend, check_transformers_model, like,
                                   set_backend, size_entry, square, uncompiled, warn_dropped_regularization)
from vitfast.ops.patch_embed import resample_pos_embed
from vitfast.ops.window_attention import _check_num_heads

SIZES = {  # name: (embed_dim, depth, num_heads)
    "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "vitfast"):
        super().__init__()
        num_heads = _check_num_heads(dim, num_heads, f"{type(self).__module__}.{type(self).__qualname__}")
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        # (3, B, H, N, D) views of the packed projection: vitfast reads them in place.
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(attend(self.backend, q, k, v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool, eps: float, backend: str):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, backend)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        y, x = self.norm2(self.attn(self.norm1(x)), x)  # fused: x = x + attn(...); y = norm2(x)
        return x + self.mlp(y)


class PatchEmbed(nn.Module):
    """timm's PatchEmbed names (proj.weight, proj.bias); the class tokens and position embedding live on the
    model, as in timm, and are fused into the embedding on the vitfast backend."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, backend: str):
        super().__init__()
        img_size, patch_size = square(img_size, "img_size", "VisionTransformer"), square(patch_size, "patch_size",
                                                                                        "VisionTransformer")
        if img_size < patch_size:
            raise ValueError(f"VisionTransformer: img_size {img_size} holds no {patch_size}x{patch_size} patch")
        self.patch_size, self.backend = patch_size, backend
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, images: Tensor, prefix: Tensor, pos_embed: Tensor) -> Tensor:
        if images.dim() != 4 or min(images.shape[-2:]) < self.patch_size:
            raise ValueError(f"VisionTransformer expects images (B, C, H, W) of at least one {self.patch_size}x"
                             f"{self.patch_size} patch, got {tuple(images.shape)}")
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        if grid != (self.grid, self.grid):  # resampled here, where the prefix rows are known to be there
            pos_embed = resample_pos_embed(pos_embed, grid, (self.grid, self.grid), prefix.shape[1])
        if self.backend == "vitfast" and not submodules_intercepted(self.proj):  # (hooks there: proj is called)
            return vitfast.patch_embed(images, self.proj.weight, self.proj.bias, self.patch_size,
                                       pos_embed=pos_embed, prefix_tokens=prefix)
        x = self.proj(images).flatten(2).transpose(1, 2)
        return torch.cat([prefix.expand(x.shape[0], -1, -1), x], 1) + pos_embed


class VisionTransformer(nn.Module):
    """ViT, or DeiT with `distilled=True` (class + distillation tokens, two heads averaged at inference).

    forward(images (B, C, H, W)) -> logits (B, num_classes); training DeiT returns (cls logits, dist logits).
    With num_classes=0 the heads are nn.Identity (timm's headless models, whose state dicts load): the pooled
    tokens (B, embed_dim) come out instead. forward_features returns the normalized tokens (B, prefix + patches,
    embed_dim). timm state dicts carry no pooling, activation, padding or LayerNorm eps: models with timm's
    global_pool 'avg', 'max' or 'avgmax' and fc_norm=False (with timm's default fc_norm their fc_norm weights do
    not load), another act_layer, dynamic_img_pad=True (timm pads an image to whole patches; here the last
    H % patch rows and W % patch columns are dropped, as by a stride = kernel convolution) or another norm eps than
    `eps` load without error but compute something else. img_size and patch_size: an int or an (n, n) pair. The
    MLP's hidden width is int(embed_dim * mlp_ratio), as timm rounds it, or mlp_hidden_dim where given. Images of
    another size than img_size take the position embedding resampled (bicubic, as timm's dynamic_img_size) on every
    backend.

    Raises:
        ValueError: a non-square img_size or patch_size, depth or num_classes below 0, in_chans, embed_dim or the
            MLP width below 1, eps not positive, a from_size name not in SIZES (at construction); images not
            (B, C, H, W) or smaller than one patch.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, distilled: bool = False, eps: float = 1e-6, backend: str = "vitfast",
                 mlp_hidden_dim: Optional[int] = None):
        super().__init__()
        self.backend = check_backend(backend)
        hidden = int(embed_dim * mlp_ratio) if mlp_hidden_dim is None else mlp_hidden_dim  # (timm's rounding)
        at_least("VisionTransformer", 1, in_chans=in_chans, embed_dim=embed_dim, mlp_hidden_dim=hidden)
        at_least("VisionTransformer", 0, depth=depth, num_classes=num_classes)
        if not eps > 0:
            raise ValueError(f"VisionTransformer: eps must be positive, got {eps!r}")
        self.num_prefix_tokens = 2 if distilled else 1
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, backend)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_prefix_tokens + self.patch_embed.grid ** 2,
                                                  embed_dim) * 0.02)
        # (after pos_embed, as timm's VisionTransformerDistilled registers it: an optimizer state saved on timm's
        # model maps its tensors by position)
        self.dist_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02) if distilled else None
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, hidden, qkv_bias, eps, backend)
                                      for _ in range(depth)])
        self.norm = LayerNorm(embed_dim, eps=eps)
        head = (lambda: nn.Linear(embed_dim, num_classes)) if num_classes > 0 else nn.Identity
        self.head = head()
        self.head_dist = head() if distilled else None
        set_backend(self, backend)

    @classmethod
    def from_size(cls, size: str, patch_size: int = 16, **kw) -> "VisionTransformer":
        """ViT-{tiny, small, base, large, huge}/patch_size, e.g. from_size("base", 16)."""
        dim, depth, heads = size_entry(SIZES, size, "VisionTransformer")
        return cls(patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads, **kw)

    def forward_features(self, images: Tensor) -> Tensor:
        prefix = self.cls_token if self.dist_token is None else torch.cat([self.cls_token, self.dist_token], 1)
        return self.norm(self.blocks(self.patch_embed(images, prefix, self.pos_embed)))

    def forward(self, images: Tensor):
        x = self.forward_features(images)
        if self.head_dist is None:
            return self.head(x[:, 0])
        cls, dist = self.head(x[:, 0]), self.head_dist(x[:, 1])
        return (cls, dist) if self.training else (cls + dist) / 2


def vit_from_transformers(hf_model: nn.Module, num_classes: int = 0, backend: str = "vitfast") -> VisionTransformer:
    """A VisionTransformer with the encoder weights of a Hugging Face ViTModel or DeiTModel (transformers 5 names;
    older checkpoints are renamed by transformers when it loads them). With num_classes 0 (the default) the heads
    are nn.Identity and forward returns the final-norm class token, (B, hidden_size) (DeiT in eval mode: the mean of
    the class and distillation tokens; in train mode the pair); with num_classes > 0 the heads are new, randomly
    initialised nn.Linear. A ViTModel's pooler (a dense layer and tanh: pooler_output) is not carried over (a
    warning says so). The model has no dropout: the source's is not carried over (a warning says so where it has
    some). At another image size it resamples the position embedding as timm does (bicubic with antialiasing, the
    model's docstring), which differs from transformers' interpolate_pos_encoding (bicubic without antialiasing, on
    ViT and DeiT: outputs ~1e-2 apart).

    Raises:
        ValueError: a model that is not a transformers ViT or DeiT base model, or a configuration it cannot hold.
    """
    hf_model = uncompiled(hf_model)
    check_transformers_model(hf_model, "vit_from_transformers", ("vit", "deit"), "a transformers ViTModel or DeiTModel")
    cfg = hf_model.config
    if not hasattr(hf_model, "embeddings"):
        raise ValueError(f"vit_from_transformers expects a ViTModel or DeiTModel, got {type(hf_model).__name__} "
                         f"(for a ...ForImageClassification pass its .vit or .deit)")
    warn_dropped_regularization(hf_model, "vit_from_transformers")
    if getattr(hf_model, "pooler", None) is not None:
        warnings.warn("vit_from_transformers: the source's pooler (a dense layer and tanh, its pooler_output) is not "
                      "carried over: the converted model's features are the final-norm class token "
                      "(last_hidden_state[:, 0])", UserWarning, stacklevel=2)
    image_size = square(cfg.image_size, "image_size", "vit_from_transformers")
    patch_size = square(cfg.patch_size, "patch_size", "vit_from_transformers")
    distilled = getattr(hf_model.embeddings, "distillation_token", None) is not None
    model = VisionTransformer(image_size, patch_size, cfg.num_channels, num_classes, cfg.hidden_size,
                              cfg.num_hidden_layers, cfg.num_attention_heads, qkv_bias=cfg.qkv_bias,
                              distilled=distilled, eps=cfg.layer_norm_eps, backend=backend,
                              mlp_hidden_dim=cfg.intermediate_size)
    if cfg.hidden_act != "gelu":
        raise ValueError(f"only GELU MLPs are supported, got hidden_act={cfg.hidden_act!r}")
    sd = hf_model.state_dict()
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    if distilled:
        out["dist_token"] = sd["embeddings.distillation_token"]
    for i in range(cfg.num_hidden_layers):
        h, o = f"layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            if part == "weight" or cfg.qkv_bias:
                out[o + f"attn.qkv.{part}"] = torch.cat([sd[h + f"attention.{n}_proj.{part}"] for n in "qkv"])
            for src, dst in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                             ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[o + f"{dst}.{part}"] = sd[h + f"{src}.{part}"]
    model = like(model, hf_model, "vit_from_transformers")
    missing, unexpected = model.load_state_dict(out, strict=False)
    heads = {k for k in missing if k.startswith(("head.", "head_dist."))}
    if set(missing) - heads or unexpected:
        raise ValueError(f"state dict conversion left missing={sorted(set(missing) - heads)} "
                         f"unexpected={sorted(unexpected)}")
    return model
