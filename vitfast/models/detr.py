"""DETR (Carion et al. 2020, arXiv:2005.12872): a ResNet backbone, a post-norm transformer encoder-decoder over
the flattened feature map with 2D sine positions, and set-prediction heads (class + box per object query).

Parameter names follow the original implementation (facebookresearch/detr): torchvision's ResNet names in
`backbone` (conv1, bn1, layer1..layer4 of Bottleneck blocks with FrozenBatchNorm2d), nn.MultiheadAttention's
packed `in_proj_weight` / `out_proj`, linear1/linear2/norm1..3 in the layers, `query_embed`, `input_proj`,
`class_embed`, `bbox_embed`. `detr_from_transformers` converts a Hugging Face DetrForObjectDetection built with
its own ResNet backbone (use_timm_backbone=False). On the vitfast backend the attention runs as
vitfast.attention with the image padding as a (B, 1, 1, Nk) key mask read without expanding, and each
post-norm LayerNorm is fused with its residual add.
"""
import math
import warnings
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast.models.common import (LayerNorm, attend, check_backend, check_transformers_model, like,
                                   set_backend, uncompiled)
from vitfast.ops.window_attention import _check_num_heads


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters), as DETR's backbone."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # torchvision's BatchNorm2d state dicts carry it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv): 1x1 -> 3x3 -> 1x1 (width = out // 4) + shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        width = out_ch // 4
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), FrozenBatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet-50 by default (depths 3, 4, 6, 3; widths 256..2048; stem 64), without pooling or classifier.

    forward(images (B, C, H, W)) -> the last stage's map (B, widths[-1], H / 32, W / 32) (ceil at each stride).
    As DETR trains it, the stem and layer1 are frozen (requires_grad False) when `freeze_stem_and_layer1`.
    """

    def __init__(self, depths: Sequence[int] = (3, 4, 6, 3), widths: Sequence[int] = (256, 512, 1024, 2048),
                 stem_width: int = 64, in_chans: int = 3, freeze_stem_and_layer1: bool = True):
        super().__init__()
        if len(depths) != 4 or len(widths) != 4:
            raise ValueError(f"ResNet needs 4 stages, got depths={list(depths)} widths={list(widths)}")
        self.num_channels = widths[-1]
        self.conv1 = nn.Conv2d(in_chans, stem_width, 7, 2, 3, bias=False)
        self.bn1 = FrozenBatchNorm2d(stem_width)
        in_ch = stem_width
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = [Bottleneck(in_ch if j == 0 else width, width, 2 if (j == 0 and i > 0) else 1)
                      for j in range(depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = width
        if freeze_stem_and_layer1:
            for p in [*self.conv1.parameters(), *self.layer1.parameters()]:
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def sine_position_embedding(mask: Tensor, num_pos_feats: int, temperature: float = 10000.0,
                            scale: float = 2 * math.pi, dtype: torch.dtype = torch.float32) -> Tensor:
    """DETR's 2D sine positions (normalize=True): (B, H, W) bool, True = valid pixel -> (B, 2 * num_pos_feats, H, W),
    the y features first. Positions count valid pixels only, normalised to (0, scale] per row and column."""
    valid = mask.to(dtype)
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, device=mask.device).to(dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameters (packed in_proj_weight/in_proj_bias, out_proj), batch first, with separate
    query, key and value inputs (DETR adds positions to queries and keys only) on the model backend.

    forward(query (B, Nq, C), key (B, Nk, C), value (B, Nk, C), attn_mask bool (B|1, 1, 1|Nq, Nk) True = attend)
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, backend: str = "vitfast"):
        super().__init__()
        num_heads = _check_num_heads(dim, num_heads, f"{type(self).__module__}.{type(self).__qualname__}")
        self.num_heads, self.dropout, self.backend = num_heads, dropout, backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        C = query.shape[-1]
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:  # self-attention: one GEMM for q and k
            q, k = F.linear(query, w[:2 * C], b[:2 * C]).chunk(2, -1)
        else:
            q, k = F.linear(query, w[:C], b[:C]), F.linear(key, w[C:2 * C], b[C:2 * C])
        v = F.linear(value, w[2 * C:], b[2 * C:])
        out = attend(self.backend, self._heads(q), self._heads(k), self._heads(v), attn_mask,
                     dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """Post-norm: x = norm1(x + attn(x + pos, x + pos, x)); x = norm2(x + ffn(x)). Dropout rates: `dropout` on
    the residual branches, `attention_dropout` on the attention weights, `activation_dropout` after the ReLU."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, backend: str,
                 attention_dropout: float, activation_dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads, attention_dropout, backend)
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.norm1, self.norm2 = LayerNorm(dim), LayerNorm(dim)
        self.dropout, self.activation_dropout = dropout, activation_dropout

    def _ffn(self, x: Tensor) -> Tensor:
        h = F.dropout(F.relu(self.linear1(x)), self.activation_dropout, self.training)
        return F.dropout(self.linear2(h), self.dropout, self.training)

    def forward(self, x: Tensor, pos: Tensor, mask: Optional[Tensor]) -> Tensor:
        qk = x + pos
        x = self.norm1(F.dropout(self.self_attn(qk, qk, x, mask), self.dropout, self.training), x)[0]
        return self.norm2(self._ffn(x), x)[0]


class DecoderLayer(EncoderLayer):
    """Post-norm: self-attention over the queries (query_pos on q and k), cross-attention to the memory
    (query_pos on q, pos on the memory's keys, the memory as values), FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, backend: str,
                 attention_dropout: float, activation_dropout: float):
        super().__init__(dim, num_heads, ffn_dim, dropout, backend, attention_dropout, activation_dropout)
        self.multihead_attn = MultiheadAttention(dim, num_heads, attention_dropout, backend)
        self.norm3 = LayerNorm(dim)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                memory_mask: Optional[Tensor]) -> Tensor:
        qk = tgt + query_pos
        tgt = self.norm1(F.dropout(self.self_attn(qk, qk, tgt), self.dropout, self.training), tgt)[0]
        attn = self.multihead_attn(tgt + query_pos, memory + pos, memory, memory_mask)
        tgt = self.norm2(F.dropout(attn, self.dropout, self.training), tgt)[0]
        return self.norm3(self._ffn(tgt), tgt)[0]


class Encoder(nn.Module):
    def __init__(self, num_layers: int, *args):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(*args) for _ in range(num_layers)])

    def forward(self, x: Tensor, pos: Tensor, mask: Optional[Tensor]) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos, mask)
        return x


class Decoder(nn.Module):
    """Returns the final LayerNorm of every layer's output (B, Q, C) as a list; the layers chain un-normalized."""

    def __init__(self, num_layers: int, dim: int, *args):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(dim, *args) for _ in range(num_layers)])
        self.norm = LayerNorm(dim)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                memory_mask: Optional[Tensor]) -> List[Tensor]:
        out = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, memory_mask)
            out.append(self.norm(tgt))
        return out


class Transformer(nn.Module):
    def __init__(self, d_model: int, nhead: int, num_encoder_layers: int, num_decoder_layers: int,
                 dim_feedforward: int, dropout: float, backend: str, attention_dropout: float,
                 activation_dropout: float):
        super().__init__()
        args = (nhead, dim_feedforward, dropout, backend, attention_dropout, activation_dropout)
        self.encoder = Encoder(num_encoder_layers, d_model, *args)
        self.decoder = Decoder(num_decoder_layers, d_model, *args)


class BoxMLP(nn.Module):
    """DETR's box head: num_layers linears with ReLU between them."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


class DETR(nn.Module):
    """DETR for object detection.

    forward(images (B, in_chans, H, W), pixel_mask (B, H, W) with 1 = pixel, 0 = padding, or None) -> dict with
    "pred_logits" (B, num_queries, num_classes + 1; the last class is "no object"), "pred_boxes" (B, num_queries, 4)
    normalized (cx, cy, w, h), and with aux_loss "aux_outputs": the same pair for every decoder layer but the last.
    `dropout` applies to the transformer's residual branches and, unless given their own rates, to the attention
    weights and after the FFN's ReLU, as in the original DETR (transformers' DetrConfig has the three rates).
    """

    def __init__(self, num_classes: int = 91, num_queries: int = 100, d_model: int = 256, nhead: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, aux_loss: bool = True, backbone_depths: Sequence[int] = (3, 4, 6, 3),
                 backbone_widths: Sequence[int] = (256, 512, 1024, 2048), backbone_stem_width: int = 64,
                 backend: str = "vitfast", attention_dropout: Optional[float] = None,
                 activation_dropout: Optional[float] = None, in_chans: int = 3):
        super().__init__()
        self.backend = check_backend(backend)
        self.aux_loss = aux_loss
        self.backbone = ResNet(backbone_depths, backbone_widths, backbone_stem_width, in_chans)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d_model, 1)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.transformer = Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
                                       dropout, backend, dropout if attention_dropout is None else attention_dropout,
                                       dropout if activation_dropout is None else activation_dropout)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = BoxMLP(d_model, d_model, 4, 3)
        set_backend(self, backend)

    def forward(self, images: Tensor, pixel_mask: Optional[Tensor] = None) -> dict:
        in_chans = self.backbone.conv1.in_channels
        if images.dim() != 4 or images.shape[1] != in_chans or not images.is_floating_point():
            raise ValueError(f"DETR expects floating-point images (B, {in_chans}, H, W), got {tuple(images.shape)} "
                             f"{images.dtype}")
        B, _, H, W = images.shape
        features = self.backbone(images)
        h, w = features.shape[-2:]
        if pixel_mask is None:
            valid = torch.ones(B, h, w, dtype=torch.bool, device=images.device)
            key_mask = None
        else:
            if tuple(pixel_mask.shape) != (B, H, W):
                raise ValueError(f"pixel_mask must be (B, H, W) = {(B, H, W)}, got {tuple(pixel_mask.shape)}")
            valid = F.interpolate(pixel_mask[:, None].float(), size=(h, w)).to(torch.bool)[:, 0]
            key_mask = valid.view(B, 1, 1, h * w)
        d_model = self.query_embed.weight.shape[1]
        pos = sine_position_embedding(valid, d_model // 2, dtype=images.dtype).flatten(2).transpose(1, 2)
        src = self.input_proj(features).flatten(2).transpose(1, 2)
        memory = self.transformer.encoder(src, pos, key_mask)
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)
        hs = self.transformer.decoder(torch.zeros_like(query_pos), memory, pos, query_pos, key_mask)
        outs = [{"pred_logits": self.class_embed(x), "pred_boxes": self.bbox_embed(x).sigmoid()} for x in hs]
        result = dict(outs[-1])
        if self.aux_loss:
            result["aux_outputs"] = outs[:-1]
        return result

    @staticmethod
    @torch.no_grad()
    def post_process(outputs: dict, target_sizes: Tensor, threshold: Optional[float] = None) -> List[dict]:
        """Scored boxes per image: softmax over the classes, the best real class (no-object dropped) and its score,
        boxes as (x0, y0, x1, y1) in pixels of target_sizes (B, 2) = (height, width) per image; with `threshold`
        only the detections scoring above it."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"target_sizes must be ({logits.shape[0]}, 2), got {tuple(target_sizes.shape)}")
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        h, w = target_sizes.to(boxes.dtype).unbind(1)
        boxes = box_cxcywh_to_xyxy(boxes) * torch.stack([w, h, w, h], 1)[:, None, :]
        results = []
        for s, l, b in zip(scores, labels, boxes):
            keep = s > threshold if threshold is not None else slice(None)
            results.append({"scores": s[keep], "labels": l[keep], "boxes": b[keep]})
        return results


def _backbone_from_transformers(sd: dict, prefix: str) -> dict:
    out = {}
    bn = ("weight", "bias", "running_mean", "running_var")
    stem = prefix + "embedder.embedder."
    out["backbone.conv1.weight"] = sd[stem + "convolution.weight"]
    out.update({f"backbone.bn1.{n}": sd[stem + f"normalization.{n}"] for n in bn})
    for key in sd:
        if not key.startswith(prefix + "encoder.stages."):
            continue
        s, _, j, kind, *rest = key[len(prefix + "encoder.stages."):].split(".")
        dst = f"backbone.layer{int(s) + 1}.{j}."
        if kind == "shortcut":
            dst += "downsample.0." if rest[0] == "convolution" else "downsample.1."
        else:  # layer.{0,1,2}.{convolution,normalization}
            k, rest = int(rest[0]), rest[1:]
            dst += f"conv{k + 1}." if rest[0] == "convolution" else f"bn{k + 1}."
        out[dst + rest[-1]] = sd[key]
    return out


def _attn(sd: dict, src: str, dst: str) -> dict:
    return {dst + "in_proj_weight": torch.cat([sd[src + f"{n}_proj.weight"] for n in "qkv"]),
            dst + "in_proj_bias": torch.cat([sd[src + f"{n}_proj.bias"] for n in "qkv"]),
            dst + "out_proj.weight": sd[src + "o_proj.weight"], dst + "out_proj.bias": sd[src + "o_proj.bias"]}


def detr_from_transformers(hf_model: nn.Module, backend: str = "vitfast") -> DETR:
    """A DETR with the weights of a Hugging Face DetrForObjectDetection whose backbone is transformers' ResNet
    (use_timm_backbone=False; transformers 5 names). Its three dropout rates are kept, and the source's train/eval
    mode.
    (transformers also drops out the encoder's input at config.dropout, which the original DETR and this model do
    not: training differs there.)

    With config.auxiliary_loss, transformers feeds every decoder layer the final LayerNorm of the previous layer's
    output; this model follows the original DETR (the LayerNorm only on the outputs), so its predictions match
    transformers' when auxiliary_loss is False (the released checkpoints' setting); a warning says so otherwise.
    An image whose pixel_mask is all zeros gives zeros where no key is seen, as transformers' SDPA attention (its
    default); its eager attention averages over all keys there. Which parameters train is this model's own (its
    ResNet freezes the stem and layer1, as the original DETR's): requires_grad is not carried over from hf_model
    (transformers' DetrConvEncoder freezes more or less of the backbone depending on its version)."""
    hf_model = uncompiled(hf_model)
    check_transformers_model(hf_model, "detr_from_transformers", ("detr",), "a transformers DetrForObjectDetection")
    cfg = hf_model.config
    if not hasattr(hf_model, "bbox_predictor"):
        raise ValueError(f"detr_from_transformers expects a DetrForObjectDetection (the heads are converted too), "
                         f"got {type(hf_model).__name__}")
    bb = cfg.backbone_config
    if getattr(bb, "model_type", None) != "resnet":
        raise ValueError("only DETR with transformers' ResNet backbone (use_timm_backbone=False) is supported")
    unsupported = {"layer_type": (bb.layer_type, "bottleneck"), "hidden_act": (bb.hidden_act, "relu"),
                   "downsample_in_bottleneck": (bb.downsample_in_bottleneck, False),
                   "downsample_in_first_stage": (bb.downsample_in_first_stage, False),
                   "out_features": (list(bb.out_features), ["stage4"]),
                   "position_embedding_type": (cfg.position_embedding_type, "sine"),
                   "activation_function": (cfg.activation_function, "relu")}
    for name, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"unsupported DETR config: {name} = {got!r} (supported: {want!r})")
    for name, enc, dec in [("attention heads", cfg.encoder_attention_heads, cfg.decoder_attention_heads),
                           ("ffn_dim", cfg.encoder_ffn_dim, cfg.decoder_ffn_dim)]:
        if enc != dec:
            raise ValueError(f"unsupported DETR config: the encoder and decoder must have the same {name}, got "
                             f"{enc} and {dec}")
    if cfg.dilation:
        raise ValueError("unsupported DETR config: dilation = True")
    if cfg.auxiliary_loss:
        warnings.warn("detr_from_transformers: config.auxiliary_loss is set, under which transformers feeds each "
                      "decoder layer the LayerNorm of the previous layer's output; the converted model follows the "
                      "original DETR, so its predictions differ from this transformers model's")
    model = DETR(cfg.num_labels, cfg.num_queries, cfg.d_model, cfg.encoder_attention_heads, cfg.encoder_layers,
                 cfg.decoder_layers, cfg.encoder_ffn_dim, cfg.dropout, cfg.auxiliary_loss, bb.depths,
                 bb.hidden_sizes, bb.embedding_size, backend, cfg.attention_dropout, cfg.activation_dropout,
                 in_chans=bb.num_channels)
    sd = hf_model.state_dict()
    out = _backbone_from_transformers(sd, "model.backbone.model.")
    out["query_embed.weight"] = sd["model.query_position_embeddings.weight"]
    for part in ("weight", "bias"):
        out[f"input_proj.{part}"] = sd[f"model.input_projection.{part}"]
        out[f"class_embed.{part}"] = sd[f"class_labels_classifier.{part}"]
        out[f"transformer.decoder.norm.{part}"] = sd[f"model.decoder.layernorm.{part}"]
        for k in range(3):
            out[f"bbox_embed.layers.{k}.{part}"] = sd[f"bbox_predictor.layers.{k}.{part}"]
    names = {"self_attn_layer_norm": "norm1", "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
    for i in range(cfg.encoder_layers):
        h, o = f"model.encoder.layers.{i}.", f"transformer.encoder.layers.{i}."
        out.update(_attn(sd, h + "self_attn.", o + "self_attn."))
        for src, dst in {**names, "final_layer_norm": "norm2"}.items():
            out.update({o + f"{dst}.{p}": sd[h + f"{src}.{p}"] for p in ("weight", "bias")})
    for i in range(cfg.decoder_layers):
        h, o = f"model.decoder.layers.{i}.", f"transformer.decoder.layers.{i}."
        out.update(_attn(sd, h + "self_attn.", o + "self_attn."))
        out.update(_attn(sd, h + "encoder_attn.", o + "multihead_attn."))
        for src, dst in {**names, "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3"}.items():
            out.update({o + f"{dst}.{p}": sd[h + f"{src}.{p}"] for p in ("weight", "bias")})
    model = like(model, hf_model, "detr_from_transformers")
    model.load_state_dict(out)
    return model
