"""torchvision adapters for `vitfast.patch_model`: forward paths bound to torchvision modules, reading their own
parameters.

- `ShiftedWindowAttention` (Swin V1): forward -> vitfast.shifted_window_attention with the bias table itself
  (torchvision gathers a (1, heads, N, N) bias first; vitfast reads the table inside the kernel).
- `ShiftedWindowAttentionV2`: the same, with the continuous position bias table (16 * sigmoid(cpb_mlp(coords)),
  which commutes with the gather) and the cosine-attention logit scale.
- `VisionTransformer._process_input`: conv_proj + flatten + transpose -> vitfast.patch_embed.
- `torchvision.ops.MLP` (Swin's) and ViT's `MLPBlock` (nn.Sequential: Linear, GELU, Dropout, Linear, Dropout):
  forward -> vitfast.linear_gelu for the first two, then the other layers.
- ViT's nn.MultiheadAttention (EncoderBlock.self_attention) and nn.LayerNorm: the torch.nn adapters of
  integrations/patch.py.

Nothing here imports torchvision: modules are matched by class name.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from vitfast.integrations.patch import (Adapter, conv_takes, mlp_check, mlp_fc1, mlp_rows, patch_conv, qualname,
                                       window_index_changed)
from vitfast.ops.patch_embed import patch_embed
from vitfast.ops.window_attention import shifted_window_attention


def _swa_forward(self, x: Tensor) -> Tensor:
    if window_index_changed(getattr(self, "relative_position_index", None), self.window_size):
        return type(self).forward(self, x)
    return shifted_window_attention(
        x, self.qkv.weight, self.proj.weight, self.relative_position_bias_table, self.window_size, self.num_heads,
        shift_size=self.shift_size, attention_dropout=self.attention_dropout, dropout=self.dropout,
        qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, training=self.training)


def _swa_v2_forward(self, x: Tensor) -> Tensor:
    if window_index_changed(getattr(self, "relative_position_index", None), self.window_size):
        return type(self).forward(self, x)
    table = 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))
    return shifted_window_attention(
        x, self.qkv.weight, self.proj.weight, table, self.window_size, self.num_heads,
        shift_size=self.shift_size, attention_dropout=self.attention_dropout, dropout=self.dropout,
        qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, logit_scale=self.logit_scale, training=self.training)


def _swa_check(module: nn.Module) -> Optional[str]:
    missing = [a for a in ("qkv", "proj", "window_size", "shift_size", "num_heads", "attention_dropout", "dropout")
               if not hasattr(module, a)]
    if missing:
        return f"unexpected ShiftedWindowAttention layout (missing {missing})"
    for name in ("qkv", "proj"):  # (a quantized Linear has no weight tensor to hand to the fused op)
        if type(getattr(module, name)) is not nn.Linear:
            return f"{name} is {qualname(getattr(module, name))}, not torch.nn.Linear"
    return None


def _vit_process_input(self, x: Tensor) -> Tensor:
    # (another channel count or dtype: the original's error; a conv of another geometry swapped in: its result)
    if not conv_takes(self.conv_proj, x) or tuple(self.conv_proj.kernel_size) != (self.patch_size, self.patch_size):
        return type(self)._process_input(self, x)
    n, c, h, w = x.shape
    p = self.patch_size
    torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
    torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
    return patch_embed(x, self.conv_proj.weight, self.conv_proj.bias, p)


def _vit_check(module: nn.Module) -> Optional[str]:
    conv = getattr(module, "conv_proj", None)
    if type(conv) is not nn.Conv2d:
        return "conv_proj is not a single Conv2d (a conv stem): patch embedding left as is"
    if not patch_conv(conv) or tuple(conv.kernel_size) != (module.patch_size, module.patch_size):
        return ("conv_proj is not a non-overlapping patch convolution (stride = kernel = patch_size, no padding, "
                "dilation or groups)")
    return None


def _mlp_body(self, x: Tensor) -> Tensor:
    x = mlp_fc1(x, self[0], self[1])
    for layer in list(self)[2:]:
        x = layer(x)
    return x


def _mlp_forward(self, input: Tensor) -> Tensor:  # (nn.Sequential's parameter name)
    return mlp_rows(self, input, self[0], _mlp_body)


def _mlp_check(module: nn.Module) -> Optional[str]:
    return mlp_check(module, "0", "1")


_MLP = Adapter("linear_gelu", "Linear + GELU -> vitfast.linear_gelu", {"forward": _mlp_forward}, _mlp_check)
ADAPTERS = {
    "torchvision.ops.misc.MLP": _MLP,
    "torchvision.models.vision_transformer.MLPBlock": _MLP,
    "torchvision.models.swin_transformer.ShiftedWindowAttention": Adapter(
        "window_attention", "shifted_window_attention -> vitfast's (bias table read in-kernel)",
        {"forward": _swa_forward}, _swa_check),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": Adapter(
        "window_attention", "shifted_window_attention (V2: cosine, CPB) -> vitfast's",
        {"forward": _swa_v2_forward}, _swa_check),
    "torchvision.models.vision_transformer.VisionTransformer": Adapter(
        "patch_embed", "_process_input (conv_proj + flatten) -> vitfast.patch_embed",
        {"_process_input": _vit_process_input}, _vit_check),
}
