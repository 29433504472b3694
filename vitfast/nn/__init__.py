"""Modules with the parameter names of the libraries they replace, so state dicts load both ways."""
from vitfast.nn.layer_norm import LayerNorm
from vitfast.nn.patch_embed import PatchEmbed
from vitfast.nn.patch_merging import PatchMerging
from vitfast.nn.window_attention import ShiftedWindowAttention, ShiftedWindowAttentionV2, WindowAttention

__all__ = ["LayerNorm", "PatchEmbed", "PatchMerging", "ShiftedWindowAttention", "ShiftedWindowAttentionV2",
           "WindowAttention"]
