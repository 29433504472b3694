"""Reference models in eager PyTorch with a backend switch: "vitfast" (fused ops), "sdpa" (PyTorch's
scaled_dot_product_attention and LayerNorm), "eager" (the textbook ops)."""
from vitfast.models.vit import VisionTransformer, vit_from_transformers

__all__ = ["VisionTransformer", "vit_from_transformers"]
