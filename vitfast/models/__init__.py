"""Reference models in eager PyTorch with a backend switch: "vitfast" (fused ops), "sdpa" (PyTorch's
scaled_dot_product_attention and LayerNorm), "eager" (the textbook ops)."""
from vitfast.models.clip import CLIP, clip_from_open_clip, clip_from_transformers, contrastive_loss
from vitfast.models.detr import DETR, detr_from_transformers
from vitfast.models.swin import SwinTransformer, swin_from_timm, swin_from_transformers
from vitfast.models.vit import VisionTransformer, vit_from_transformers

__all__ = ["CLIP", "DETR", "SwinTransformer", "VisionTransformer", "clip_from_open_clip", "clip_from_transformers",
           "contrastive_loss", "detr_from_transformers", "swin_from_timm", "swin_from_transformers",
           "vit_from_transformers"]
