"""CLIP (Radford et al. 2021, arXiv:2103.00020): a ViT image encoder and a causal text transformer trained
contrastively into one embedding space.

The blocks are the ViT blocks of vitfast.models.vit (fused qkv, timm names) with CLIP's activation (QuickGELU
or GELU) and, in the text tower, a causal attention combined with the padding mask. `clip_from_transformers`
converts a Hugging Face CLIPModel (transformers 5 names) and reproduces its outputs, including its rule for
pooling the end-of-text token; `clip_from_open_clip` converts an open_clip CLIP.
"""
import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast.models import vit
from vitfast.models.common import (LayerNorm, attend, check_backend, check_transformers_model, like, set_backend,
                                   uncompiled, warn_dropped_regularization)


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def _tanh_gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_new": _tanh_gelu, "gelu_pytorch_tanh": _tanh_gelu}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Attention(vit.Attention):
    """vit.Attention with SDPA's mask arguments: attn_mask (bool, True = attend) and is_causal."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(self.backend, q, k, v, attn_mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(vit.Mlp):
    def __init__(self, dim: int, hidden: int, act: str = "quick_gelu"):
        super().__init__(dim, hidden)
        self.act = _activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (vit.Block's names) with CLIP's activation and optional masks."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str, eps: float, backend: str):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, True, backend)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, act)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        y, x = self.norm2(self.attn(self.norm1(x), attn_mask, is_causal), x)  # fused residual add + norm2
        return x + self.mlp(y)


class CLIPVision(nn.Module):
    """CLIP's image tower: patch embedding (conv without bias) + class token + positions, pre-LayerNorm,
    blocks, post-LayerNorm of the class token, projection without bias. Images of another size than image_size take
    the position embedding resampled as timm does (bicubic with antialiasing), where transformers refuses them
    unless interpolate_pos_encoding=True (bicubic without antialiasing: outputs ~1e-4 apart) and open_clip refuses
    them.

    forward(images (B, C, H, W)) -> (B, output_dim), not normalized.
    """

    def __init__(self, image_size: int = 224, patch_size: int = 32, in_chans: int = 3, width: int = 768,
                 layers: int = 12, heads: int = 12, mlp_dim: int = 3072, hidden_act: str = "quick_gelu",
                 eps: float = 1e-5, output_dim: int = 512, backend: str = "vitfast"):
        super().__init__()
        self.backend = check_backend(backend)
        self.patch_embed = vit.PatchEmbed(image_size, patch_size, in_chans, width, backend)
        self.patch_embed.proj.bias = None  # CLIP's patch conv has no bias
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.patch_embed.grid ** 2, width) * 0.02)
        self.norm_pre = LayerNorm(width, eps=eps)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_dim, hidden_act, eps, backend) for _ in range(layers)])
        self.norm = LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, output_dim, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        x = self.norm_pre(self.patch_embed(images, self.cls_token, self.pos_embed))
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x[:, 0]))


class CLIPText(nn.Module):
    """CLIP's text tower: token + position embeddings, causal blocks (with the padding mask of attention_mask),
    final LayerNorm, the state at the end-of-text token, projection without bias.

    Pooling follows transformers: with eos_token_id == 2 (or None) the position of the largest token id (OpenAI's
    rule, the end-of-text token being the last of the vocabulary); otherwise the first position of eos_token_id.

    forward(input_ids (B, N) int, attention_mask (B, N) with 1 = token, 0 = padding, or None) -> (B, output_dim).
    """

    def __init__(self, vocab_size: int = 49408, context_length: int = 77, width: int = 512, layers: int = 12,
                 heads: int = 8, mlp_dim: int = 2048, hidden_act: str = "quick_gelu", eps: float = 1e-5,
                 output_dim: int = 512, eos_token_id: Optional[int] = 49407, backend: str = "vitfast"):
        super().__init__()
        self.backend = check_backend(backend)
        self.eos_token_id = eos_token_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_dim, hidden_act, eps, backend) for _ in range(layers)])
        self.norm = LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, output_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def _mask(self, attention_mask: Optional[Tensor], B: int, N: int):
        """(attn_mask, is_causal) for the blocks: the padding mask as a (B, 1, 1, N) bool view that vitfast reads
        without expanding, with is_causal; SDPA takes one or the other, so it gets them combined."""
        if attention_mask is None:
            return None, True
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"CLIP's text tower expects attention_mask as a tensor (B, N), got "
                            f"{type(attention_mask).__name__}")
        if attention_mask.shape != (B, N):
            raise ValueError(f"CLIP's text tower expects attention_mask (B, N) = {(B, N)} like input_ids, got "
                             f"{tuple(attention_mask.shape)}")
        keep = attention_mask.bool()[:, None, None, :]
        if self.backend != "sdpa":
            return keep, True
        causal = torch.ones(N, N, dtype=torch.bool, device=keep.device).tril()
        return keep & causal, False

    def pool(self, x: Tensor, input_ids: Tensor) -> Tensor:
        """The states (B, N, C) at each sequence's end-of-text token -> (B, C)."""
        if self.eos_token_id is None or self.eos_token_id == 2:
            idx = input_ids.to(torch.int).argmax(-1)
        else:
            idx = (input_ids == self.eos_token_id).int().argmax(-1)
        return x[torch.arange(x.shape[0], device=x.device), idx]

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"CLIP's text tower expects input_ids (B, N), got {tuple(input_ids.shape)}")
        N = input_ids.shape[-1]
        if not 1 <= N <= self.pos_embed.shape[0]:
            raise ValueError(f"{N} tokens do not fit the context length {self.pos_embed.shape[0]} (from 1 token: "
                             f"the features are taken at a token)")
        x = self.token_embedding(input_ids) + self.pos_embed[:N]
        mask, is_causal = self._mask(attention_mask, input_ids.shape[0], N)
        for block in self.blocks:
            x = block(x, mask, is_causal)
        return self.proj(self.pool(self.norm(x), input_ids))


class CLIPOutput(NamedTuple):
    image_embeds: Tensor  # (B_img, embed_dim), unit norm
    text_embeds: Tensor  # (B_txt, embed_dim), unit norm
    logits_per_image: Tensor  # (B_img, B_txt), scaled cosine similarities
    logits_per_text: Tensor  # (B_txt, B_img)


def contrastive_loss(logits_per_image: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE loss (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision", its Figure 3; open_clip's ClipLoss on one process): the mean of the cross-entropies of the rows and
    of the columns of logits_per_image, (B, B) floating point (CLIPOutput.logits_per_image), where image i and text i
    are a pair. Returns a 0-d tensor of the logits' dtype.

    Raises:
        ValueError: logits that are not a square (B, B) matrix with B >= 1, or not floating point.
    """
    if logits_per_image.dim() != 2 or logits_per_image.shape[0] != logits_per_image.shape[1] \
            or logits_per_image.shape[0] == 0 or not logits_per_image.is_floating_point():
        raise ValueError(f"contrastive_loss expects square (B, B) floating-point logits with B >= 1 (image i paired "
                         f"with text i), got {tuple(logits_per_image.shape)} {logits_per_image.dtype}")
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2


class CLIP(nn.Module):
    """CLIP: image and text towers projected into `embed_dim`, compared by cosine similarity times exp(logit_scale).

    vision_cfg / text_cfg are the keyword arguments of CLIPVision / CLIPText (output_dim and backend excepted).
    forward(input_ids (B_txt, N), pixel_values (B_img, C, H, W), attention_mask (B_txt, N) or None) -> CLIPOutput.
    """

    def __init__(self, embed_dim: int = 512, vision_cfg: Optional[dict] = None, text_cfg: Optional[dict] = None,
                 logit_scale_init: float = math.log(1 / 0.07), backend: str = "vitfast"):
        super().__init__()
        self.backend = check_backend(backend)
        self.visual = CLIPVision(**(vision_cfg or {}), output_dim=embed_dim, backend=backend)
        self.text = CLIPText(**(text_cfg or {}), output_dim=embed_dim, backend=backend)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        set_backend(self, backend)

    def encode_image(self, pixel_values: Tensor, normalize: bool = False) -> Tensor:
        """(B_img, C, H, W) images -> (B_img, embed_dim) projected features, unit norm where `normalize`
        (open_clip's encode_image)."""
        x = self.visual(pixel_values)
        return x / x.norm(dim=-1, keepdim=True) if normalize else x

    def encode_text(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    normalize: bool = False) -> Tensor:
        """(B_txt, N) token ids, attention_mask (B_txt, N) (1 or True: a token to attend, 0 or False: padding) or
        None -> (B_txt, embed_dim) projected features, unit norm where `normalize` (open_clip's encode_text).

        Raises:
            ValueError: input_ids not 2-D, a token count N outside 1 .. the context length, or an attention_mask
                not (B, N).
            TypeError: an attention_mask that is not a tensor."""
        x = self.text(input_ids, attention_mask)
        return x / x.norm(dim=-1, keepdim=True) if normalize else x

    def forward(self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Optional[Tensor] = None) -> CLIPOutput:
        image = self.encode_image(pixel_values, normalize=True)
        text = self.encode_text(input_ids, attention_mask, normalize=True)
        logits_per_text = (text @ image.t()) * self.logit_scale.exp()
        return CLIPOutput(image, text, logits_per_text.t(), logits_per_text)


def _blocks_from_transformers(sd: dict, prefix: str, dst: str, layers: int) -> dict:
    out = {}
    for i in range(layers):
        h, o = f"{prefix}encoder.layers.{i}.", f"{dst}blocks.{i}."
        for part in ("weight", "bias"):
            out[o + f"attn.qkv.{part}"] = torch.cat([sd[h + f"self_attn.{n}_proj.{part}"] for n in "qkv"])
            for src, name in (("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"),
                              ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[o + f"{name}.{part}"] = sd[h + f"{src}.{part}"]
    return out


def clip_from_transformers(hf_model: nn.Module, backend: str = "vitfast") -> CLIP:
    """A CLIP with the weights of a Hugging Face CLIPModel (transformers 5 names). The model has no dropout: the
    source's is not carried over (a warning says so where it has some).

    Raises:
        ValueError: a model that is not a transformers CLIPModel (both towers; not CLIPVisionModel or
            CLIPTextModel), or a configuration it cannot hold.
    """
    hf_model = uncompiled(hf_model)
    check_transformers_model(hf_model, "clip_from_transformers", ("clip",), "a transformers CLIPModel (both towers)")
    warn_dropped_regularization(hf_model, "clip_from_transformers")
    cfg, vc, tc = hf_model.config, hf_model.config.vision_config, hf_model.config.text_config
    eos = tc.eos_token_id
    if eos is not None and not isinstance(eos, int):
        raise ValueError(f"only a single eos_token_id is supported, got {eos!r}")
    vision_cfg = dict(image_size=vc.image_size, patch_size=vc.patch_size, in_chans=vc.num_channels,
                      width=vc.hidden_size, layers=vc.num_hidden_layers, heads=vc.num_attention_heads,
                      mlp_dim=vc.intermediate_size, hidden_act=vc.hidden_act, eps=vc.layer_norm_eps)
    text_cfg = dict(vocab_size=tc.vocab_size, context_length=tc.max_position_embeddings, width=tc.hidden_size,
                    layers=tc.num_hidden_layers, heads=tc.num_attention_heads, mlp_dim=tc.intermediate_size,
                    hidden_act=tc.hidden_act, eps=tc.layer_norm_eps, eos_token_id=eos)
    model = CLIP(cfg.projection_dim, vision_cfg, text_cfg, backend=backend)
    sd = hf_model.state_dict()
    v, t = "vision_model.", "text_model."
    out = {"logit_scale": sd["logit_scale"],
           "visual.cls_token": sd[v + "embeddings.class_embedding"].view(1, 1, -1),
           "visual.pos_embed": sd[v + "embeddings.position_embedding.weight"][None],
           "visual.patch_embed.proj.weight": sd[v + "embeddings.patch_embedding.weight"],
           "visual.proj.weight": sd["visual_projection.weight"],
           "text.token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
           "text.pos_embed": sd[t + "embeddings.position_embedding.weight"],
           "text.proj.weight": sd["text_projection.weight"]}
    for part in ("weight", "bias"):
        out[f"visual.norm_pre.{part}"] = sd[v + f"pre_layrnorm.{part}"]
        out[f"visual.norm.{part}"] = sd[v + f"post_layernorm.{part}"]
        out[f"text.norm.{part}"] = sd[t + f"final_layer_norm.{part}"]
    out.update(_blocks_from_transformers(sd, v, "visual.", vc.num_hidden_layers))
    out.update(_blocks_from_transformers(sd, t, "text.", tc.num_hidden_layers))
    model = like(model, hf_model, "clip_from_transformers")
    model.load_state_dict(out)
    return model


def _blocks_from_open_clip(sd: dict, prefix: str, dst: str, layers: int) -> dict:
    out = {}
    for i in range(layers):
        o, c = f"{dst}blocks.{i}.", f"{prefix}transformer.resblocks.{i}."
        out[o + "attn.qkv.weight"] = sd[c + "attn.in_proj_weight"]
        out[o + "attn.qkv.bias"] = sd[c + "attn.in_proj_bias"]
        for part in ("weight", "bias"):
            for src, name in (("attn.out_proj", "attn.proj"), ("ln_1", "norm1"), ("ln_2", "norm2"),
                              ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[o + f"{name}.{part}"] = sd[c + f"{src}.{part}"]
    return out


def _open_clip_tower(tower: nn.Module, name: str) -> dict:
    """The CLIPVision / CLIPText keyword arguments shared by an open_clip transformer stack; raises for the block
    variants vitfast's model does not have (layer scale, custom attention blocks, other norms or activations)."""
    blocks = list(tower.resblocks)
    first = blocks[0]
    unsupported = [type(b).__name__ for b in blocks if type(b).__name__ != "ResidualAttentionBlock"]
    unsupported += ["layer scale"] * any(not isinstance(b.ls_1, nn.Identity) for b in blocks)
    acts = {type(b.mlp.gelu).__name__ if not isinstance(b.mlp.gelu, nn.GELU) or b.mlp.gelu.approximate == "none"
            else "tanh GELU" for b in blocks}
    if unsupported or not acts <= {"QuickGELU", "GELU"} or len(acts) != 1:
        raise ValueError(f"open_clip {name} tower does not convert: {sorted(set(unsupported)) or sorted(acts)}")
    return dict(width=tower.width, layers=len(blocks), heads=first.attn.num_heads, mlp_dim=first.mlp.c_fc.out_features,
                hidden_act="quick_gelu" if acts == {"QuickGELU"} else "gelu", eps=first.ln_1.eps)


def clip_from_open_clip(oc_model: nn.Module, backend: str = "vitfast") -> CLIP:
    """A CLIP with the weights of an open_clip `CLIP` (the ViT image tower and the built-in text tower, as in
    ViT-B-32/B-16/L-14 and their quickgelu variants). Refused with a ValueError: attentional pooling, average
    pooling, no pre-LayerNorm, layer scale, patch dropout, a logit bias (SigLIP), a text projection with bias or
    none, no image projection, a bidirectional text tower, a text class embedding, and pooling at an eos id of 2
    (which transformers' rule reads as argmax). The model has no dropout: the source's is not carried over (a
    warning says so where it has some)."""
    oc_model = uncompiled(oc_model)
    if not hasattr(oc_model, "visual") or not hasattr(oc_model, "encode_text"):
        raise ValueError(f"clip_from_open_clip expects an open_clip CLIP, got {type(oc_model).__name__}")
    warn_dropped_regularization(oc_model, "clip_from_open_clip")
    visual = oc_model.visual
    vit_tower = type(visual).__name__ == "VisionTransformer"
    own_text_tower = hasattr(oc_model, "token_embedding")  # (CustomTextCLIP's is a module of its own class)
    checks = [("an image tower that is not open_clip's VisionTransformer", not vit_tower)]
    if vit_tower:  # (another tower's attributes say nothing: RN50's projection is its attention pool's)
        checks += [
            ("attentional pooling", getattr(visual, "attn_pool", None) is not None),
            ("image pooling other than the class token", getattr(visual, "pool_type", "tok") != "tok"),
            ("no pre-LayerNorm", isinstance(getattr(visual, "ln_pre", None), nn.Identity)),
            ("patch dropout", not isinstance(getattr(visual, "patch_dropout", nn.Identity()), nn.Identity)),
            ("no image projection (proj_type 'none')", getattr(visual, "proj", None) is None)]
    checks += [("a logit bias", getattr(oc_model, "logit_bias", None) is not None),
               ("a LayerNorm without bias", any(m.bias is None for m in oc_model.modules()
                                                if isinstance(m, nn.LayerNorm))),
               (f"a text tower of its own class ({type(oc_model).__name__})", not own_text_tower)]
    if own_text_tower:
        checks += [
            ("a text projection with bias", isinstance(getattr(oc_model, "text_projection", None), nn.Linear)),
            ("no text projection (proj_type 'none')", getattr(oc_model, "text_projection", None) is None),
            ("a bidirectional text tower", getattr(oc_model, "attn_mask", None) is None),
            ("a text class embedding (embed_cls: open_clip's CLIP drops it and cannot run)",
             oc_model.positional_embedding.shape[0] != oc_model.context_length),
            ("text pooling other than argmax or eos",
             getattr(oc_model, "text_pool_type", "") not in ("argmax", "eos"))]
    problems = [what for what, bad in checks if bad]
    if problems:
        raise ValueError(f"open_clip model does not convert: {', '.join(problems)}")
    eos = getattr(oc_model, "text_eos_id", None) if oc_model.text_pool_type == "eos" else None
    if eos == 2:
        raise ValueError("open_clip text pooling at eos id 2 does not convert (id 2 selects the argmax rule)")
    patch, grid = visual.patch_size, visual.grid_size
    if patch[0] != patch[1] or grid[0] != grid[1]:
        raise ValueError(f"only square images and patches convert, got patch {patch} and grid {grid}")
    vision_cfg = dict(image_size=patch[0] * grid[0], patch_size=patch[0], in_chans=visual.conv1.in_channels,
                      **_open_clip_tower(visual.transformer, "image"))
    text_cfg = dict(vocab_size=oc_model.vocab_size, context_length=oc_model.context_length, eos_token_id=eos,
                    **_open_clip_tower(oc_model.transformer, "text"))
    model = CLIP(oc_model.text_projection.shape[1], vision_cfg, text_cfg, backend=backend)
    sd = oc_model.state_dict()
    out = {"logit_scale": sd["logit_scale"],
           "visual.cls_token": sd["visual.class_embedding"].view(1, 1, -1),
           "visual.pos_embed": sd["visual.positional_embedding"][None],
           "visual.patch_embed.proj.weight": sd["visual.conv1.weight"],
           "visual.proj.weight": sd["visual.proj"].t(),
           "text.token_embedding.weight": sd["token_embedding.weight"],
           "text.pos_embed": sd["positional_embedding"],
           "text.proj.weight": sd["text_projection"].t()}
    for part in ("weight", "bias"):
        out[f"visual.norm_pre.{part}"] = sd[f"visual.ln_pre.{part}"]
        out[f"visual.norm.{part}"] = sd[f"visual.ln_post.{part}"]
        out[f"text.norm.{part}"] = sd[f"ln_final.{part}"]
    out.update(_blocks_from_open_clip(sd, "visual.", "visual.", vision_cfg["layers"]))
    out.update(_blocks_from_open_clip(sd, "", "text.", text_cfg["layers"]))
    model = like(model, oc_model, "clip_from_open_clip")
    model.load_state_dict(out)
    return model
