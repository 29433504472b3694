"""open_clip adapters for `vitfast.patch_model`.

- `open_clip.transformer.Attention` (the custom attention of CustomResidualAttentionBlock / attentional pooling):
  forward -> vitfast.attention; its scaled-cosine variant runs as vitfast.attention on unit-norm q (times the
  per-head exp(logit_scale)) and k with scale 1.
- ResidualAttentionBlock's nn.MultiheadAttention: the torch.nn adapter of integrations/patch.py; open_clip's
  LayerNorm / LayerNormFp32: its LayerNorm adapter under their parameter name (x), the output cast back to x's
  dtype as theirs is (under CUDA autocast vitfast.layer_norm, as F.layer_norm, returns float32).

Nothing here imports open_clip: modules are matched by class name.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast.integrations.patch import Adapter, _layer_norm_forward, head_dim_check
from vitfast.nn.window_attention import _attn_dropout_p
from vitfast.ops.attention import attention


def _attention_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
    N, L, C = x.shape
    q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    # unflatten infers -1 from the dim's size (a reshape to (B, ..., -1) cannot for an empty batch)
    q = q.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
    k = k.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
    v = v.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
    if attn_mask is not None:
        if attn_mask.ndim == 3:
            attn_mask = attn_mask.reshape(N, self.num_heads, L, L)
        # open_clip's bool masks mean "masked out"; vitfast's (SDPA's) mean "attend"
        attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
    p = _attn_dropout_p(self, self.logit_scale is None and getattr(self, "use_fsdpa", False))
    if self.logit_scale is not None:
        scale = torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
        x = attention(F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1), v, attn_mask, scale=1.0, dropout_p=p)
    else:
        # (open_clip's SDPA path passes SDPA no scale: a changed `scale` attribute counts on its other path alone)
        scale = None if getattr(self, "use_fsdpa", False) else self.scale
        x = attention(self.ln_q(q), self.ln_k(k), v, attn_mask, scale=scale, dropout_p=p)
    if self.head_scale is not None:
        x = x * self.head_scale
    x = x.transpose(1, 2).reshape(N, L, C)
    x = self.ln_inner(x)
    return self.out_drop(self.out_proj(x))


def _layer_norm_x_forward(self, x: Tensor) -> Tensor:
    return _layer_norm_forward(self, x).to(x.dtype)


def _attention_check(module: nn.Module) -> Optional[str]:
    missing = [a for a in ("in_proj_weight", "in_proj_bias", "logit_scale", "ln_q", "ln_k", "head_scale", "ln_inner",
                           "out_proj", "out_drop", "attn_drop", "scale") if not hasattr(module, a)]
    return f"unexpected open_clip Attention layout (missing {missing})" if missing else head_dim_check(
        getattr(module, "head_dim", None))


ADAPTERS = {
    "open_clip.transformer.Attention": Adapter(
        "attention", "SDPA / scaled-cosine attention -> vitfast.attention", {"forward": _attention_forward},
        _attention_check),
    **{f"open_clip.transformer.{name}": Adapter("layer_norm", "LayerNorm -> vitfast.layer_norm",
                                                {"forward": _layer_norm_x_forward})
       for name in ("LayerNorm", "LayerNormFp32")},
}
