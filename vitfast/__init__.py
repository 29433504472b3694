"""vitfast: fused Triton and CUDA kernels for vision transformers."""
from vitfast import _ext  # noqa: F401  (loads the extension: registers the cpp/cuda kernels)
from vitfast.backend import choose_backend, set_backend, use_backend
from vitfast.info import info
from vitfast.ops.attention import attention, flash_attn_func
from vitfast.ops.layer_norm import layer_norm
from vitfast.ops.linear import linear
from vitfast.ops.linear_gelu import linear_gelu
from vitfast.ops.patch_embed import patch_embed, resample_pos_embed
from vitfast.ops.patch_merging import patch_merging
from vitfast.ops.rel_pos_attention import decomposed_rel_pos, rel_pos_attention
from vitfast.ops.window_attention import shifted_window_attention, window_attention
from vitfast import nn
from vitfast.integrations.patch import patch_model, unpatch_model

__version__ = "0.1.0"
__all__ = ["attention", "choose_backend", "decomposed_rel_pos", "flash_attn_func", "info", "layer_norm", "linear",
           "linear_gelu", "nn", "patch_embed", "patch_merging", "patch_model", "rel_pos_attention",
           "resample_pos_embed", "set_backend", "shifted_window_attention", "unpatch_model", "use_backend",
           "window_attention"]
