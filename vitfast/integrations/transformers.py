"""Hugging Face transformers: `attn_implementation="vitfast"` for every model that uses AttentionInterface.

    import vitfast.integrations.transformers as vt
    vt.register()
    model = ViTModel(config, attn_implementation="vitfast")   # or model.set_attn_implementation("vitfast")

Both interfaces are registered: AttentionInterface runs the attention, AttentionMaskInterface builds the
masks. Without the second, transformers silently drops masks for an unknown implementation name (CLIP's
text padding would be lost). Masks are the SDPA ones: bool (True = attend) or additive float.
"""
import torch

from vitfast.ops.attention import attention

NAME = "vitfast"


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention signature: q, k, v (B, H, S, D) in; (B, S, H, D) out, and no weights."""
    if kwargs.get("output_attentions") or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
        raise ValueError("vitfast attention returns no attention weights and takes no position_bias or softcap; "
                         "use attn_implementation='eager' for these")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    out = attention(query, key, value, attention_mask, is_causal=is_causal, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Registers `name` with transformers' AttentionInterface and AttentionMaskInterface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
