"""segment_anything adapters for `vitfast.patch_model`, and the image-encoder attention and MLP that the SAM adapters
of timm and transformers share.

- `segment_anything.modeling.image_encoder.Attention` (the blocks of ImageEncoderViT, ViTDet's layout): the
  (B*heads, N, N) score matrix plus `add_decomposed_rel_pos` -> vitfast.rel_pos_attention (use_rel_pos=False:
  vitfast.attention, or ATen's SDPA where integrations/choice.py says so). Windowed blocks (SAM's padded
  14 x 14 windows) and global blocks both call it; the window partition and padding stay in the block.
- `segment_anything.modeling.common.MLPBlock` (lin1, act, lin2; transformers' SamMLPBlock has the same layout):
  lin1 + GELU -> vitfast.linear_gelu.
- segment_anything's LayerNorm2d (the neck) is no nn.LayerNorm and is left; the blocks' nn.LayerNorm takes the
  generic adapter of integrations/patch.py.

Nothing here imports segment_anything: modules are matched by class name.
"""
import functools
from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from vitfast.integrations.choice import runs_original
from vitfast.integrations.patch import Adapter, head_dim_check, mlp_check, mlp_fc1
from vitfast.ops.attention import attention
from vitfast.ops.rel_pos_attention import decomposed_rel_pos, rel_pos_attention


def sam_attention(x: Tensor, qkv: nn.Module, num_heads: int, scale: Optional[float], rel_pos_h: Optional[Tensor] = None,
                  rel_pos_w: Optional[Tensor] = None, dropout_p: float = 0.0, q_norm: Optional[Callable] = None,
                  k_norm: Optional[Callable] = None) -> Tensor:
    """The attention of a SAM / ViTDet image-encoder block on one (window or whole) map, before the output
    projection: softmax(scale * q k^T + rel_h + rel_w) v with the decomposed relative positions of MViTv2
    (segment_anything's `add_decomposed_rel_pos`), never forming the (N, N) bias.

    Args:
        x: (B, H, W, C): B windows (or images) of H x W tokens.
        qkv: the block's qkv projection, C -> 3 * C, output laid out (3, heads, D) as in every SAM implementation.
        num_heads: heads; D = C // num_heads.
        scale: softmax scale (the module's, D ** -0.5 in SAM; None: D ** -0.5).
        rel_pos_h, rel_pos_w: (L_h, D), (L_w, D) tables, or None for plain attention; resized by linear
            interpolation when L != 2 * size - 1 (see vitfast.decomposed_rel_pos).
        dropout_p: dropout on the attention weights.
        q_norm, k_norm: per-head norms applied to q and k (timm's qk_norm), before the relative-position terms.

    Returns:
        (B, H, W, C) in x's dtype (under autocast, the region's).

    Raises:
        ValueError: from vitfast.rel_pos_attention / vitfast.attention when no backend takes the inputs.
    """
    _, H, W, _ = x.shape
    # unflatten infers -1 from the dim's size (a reshape to (B, ..., -1) cannot for an empty batch)
    q, k, v = qkv(x).flatten(1, 2).unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if rel_pos_h is None:  # plain attention: ATen's on CPU and CUDA (integrations/choice.py)
        sdpa = F.scaled_dot_product_attention if runs_original("attention", q) else attention
        out = sdpa(q, k, v, None, scale=scale, dropout_p=dropout_p)
    else:
        rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, (H, W), (H, W))
        out = rel_pos_attention(q, k, v, rel_h, rel_w, scale=scale, dropout_p=dropout_p)
    return out.transpose(1, 2).flatten(2).unflatten(1, (H, W))


def _attention_forward(self, x: Tensor) -> Tensor:
    rel_pos = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else (None, None)
    return self.proj(sam_attention(x, self.qkv, self.num_heads, self.scale, *rel_pos))


def rel_pos_check(module: nn.Module, flag: str) -> Optional[str]:
    """Why a SAM / ViTDet attention is left: a head dim above the MAX_HEAD_DIM that vitfast.rel_pos_attention (with
    rel-pos tables, its attribute `flag` set: the tables' width) or vitfast.attention (without: qkv's width over 3
    times the heads) takes on every backend; else None."""
    table = getattr(module, "rel_pos_h", None) if getattr(module, flag, False) else None
    if isinstance(table, Tensor):
        return head_dim_check(table.shape[-1], "rel_pos_attention")
    heads = getattr(module, "num_heads", getattr(module, "num_attention_heads", None))
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Linear) and isinstance(heads, int) and heads > 0:
        return head_dim_check(qkv.out_features // (3 * heads))
    return None


def _attention_check(module: nn.Module) -> Optional[str]:
    missing = [a for a in ("qkv", "proj", "num_heads", "scale", "use_rel_pos") if not hasattr(module, a)]
    if missing:
        return f"unexpected segment_anything Attention layout (missing {missing})"
    return rel_pos_check(module, "use_rel_pos")


def mlp_block_forward(self, x: Tensor) -> Tensor:
    return self.lin2(mlp_fc1(x, self.lin1, self.act))


SAM_MLP_BLOCK = Adapter("linear_gelu", "lin1 + GELU -> vitfast.linear_gelu", {"forward": mlp_block_forward},
                        functools.partial(mlp_check, fc1="lin1"))
ADAPTERS = {
    "segment_anything.modeling.common.MLPBlock": SAM_MLP_BLOCK,
    "segment_anything.modeling.image_encoder.Attention": Adapter(
        "rel_pos_attention", "scores + add_decomposed_rel_pos + softmax -> vitfast.rel_pos_attention "
                     "(use_rel_pos=False: vitfast.attention)",
        {"forward": _attention_forward}, _attention_check),
}
