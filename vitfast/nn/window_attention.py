"""Swin window attention modules with torchvision's and timm's parameter names, backed by vitfast's fused op.

- `ShiftedWindowAttention`, `ShiftedWindowAttentionV2`: torchvision.models.swin_transformer's (state dicts
  load both ways): qkv, proj, relative_position_bias_table (V1) / logit_scale + cpb_mlp (V2), and the
  relative_position_index (+ V2's relative_coords_table) buffers.
- `WindowAttention`: timm.models.swin_transformer.WindowAttention's names (qkv, proj,
  relative_position_bias_table, non-persistent relative_position_index); takes timm's (B*nW, N, C) windows
  (optionally with a shift mask) or an image-layout (B, H, W, C) map that it windows itself.
"""
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast.ops.window_attention import (_check_num_heads, _pair, _positive_int, _positive_pair,
                                          relative_position_index, shifted_window_attention, window_attention)


def _attn_dropout_p(module: nn.Module, fused: bool) -> float:
    """The attention-dropout probability a timm or open_clip attention module applies now: on its SDPA (fused) path
    the module's own training flag decides, on its eager path the flag of its attn_drop Dropout, which can be in eval
    alone (the patched modules read the block's or module's flag and dropped where the original did not)."""
    return module.attn_drop.p if (module.training if fused else module.attn_drop.training) else 0.0


def _timm_scale(module: nn.Module) -> Optional[float]:
    """The softmax scale a timm attention module applies now: its fused path passes SDPA no scale (the head dim's
    default), so a changed `scale` counts on its eager path only; None for the default."""
    return None if getattr(module, "fused_attn", False) else module.scale


class ShiftedWindowAttention(nn.Module):
    """torchvision's ShiftedWindowAttention (Liu et al. 2021, "Swin Transformer"; same arguments, parameters and
    buffers, so its state dict loads), computed by vitfast.shifted_window_attention with the map padded to whole
    windows, the cyclic shift, the window partition, the relative position bias (read from the table inside the
    kernel, never gathered) and the shift mask fused.

    forward(x (B, H, W, C) floating point, C = dim) -> (B, H, W, C) in x's dtype.

    Raises:
        ValueError: at construction, a window_size or shift_size that is not an int or a pair, num_heads that does
            not divide dim; in forward, the errors of vitfast.shifted_window_attention (x not (B, H, W, dim),
            dtypes or devices that differ).
    """

    def __init__(self, dim: int, window_size: List[int], shift_size: List[int], num_heads: int, qkv_bias: bool = True,
                 proj_bias: bool = True, attention_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        fn = f"vitfast.nn.{type(self).__name__}"
        window_size = _positive_pair(window_size, "window_size", fn)
        shift_size = _pair(shift_size, "shift_size", fn)
        num_heads = _check_num_heads(dim, num_heads, fn)
        self.window_size = window_size
        self.shift_size = shift_size
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.define_relative_coords()

    def define_relative_coords(self):
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1), self.num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def bias_table(self) -> Tensor:
        """(num_rel, heads): what the kernel gathers from."""
        return self.relative_position_bias_table

    def get_relative_position_bias(self) -> Tensor:
        """(1, heads, N, N), as torchvision's method returns it (not used by forward)."""
        N = self.window_size[0] * self.window_size[1]
        bias = self.bias_table()[self.relative_position_index].view(N, N, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def _logit_scale(self) -> Optional[Tensor]:
        return None

    def forward(self, x: Tensor) -> Tensor:
        return shifted_window_attention(
            x, self.qkv.weight, self.proj.weight, self.bias_table(), self.window_size, self.num_heads,
            shift_size=self.shift_size, attention_dropout=self.attention_dropout, dropout=self.dropout,
            qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, logit_scale=self._logit_scale(), training=self.training)


class ShiftedWindowAttentionV2(ShiftedWindowAttention):
    """torchvision's ShiftedWindowAttentionV2 (Liu et al. 2022, "Swin Transformer V2": scaled cosine attention with a
    learned per-head logit scale clamped at log(100), a continuous position bias from an MLP over log-spaced
    relative coordinates, 16 * sigmoid of it). Same arguments, parameters and buffers as torchvision's; forward and
    errors as ShiftedWindowAttention's, and a ValueError at construction where window_size (or
    pretrained_window_size, where set) is below 2 on an axis (torchvision's table is NaN there).
    """

    def __init__(self, dim: int, window_size: List[int], shift_size: List[int], num_heads: int, qkv_bias: bool = True,
                 proj_bias: bool = True, attention_dropout: float = 0.0, dropout: float = 0.0,
                 pretrained_window_size: Sequence[int] = (0, 0)):
        self.pretrained_window_size = list(pretrained_window_size)
        super().__init__(dim, window_size, shift_size, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                         attention_dropout=attention_dropout, dropout=dropout)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        if qkv_bias:
            length = self.qkv.bias.numel() // 3
            self.qkv.bias[length: 2 * length].data.zero_()

    def define_relative_coords(self):
        wh, ww = self.window_size
        rh = torch.arange(-(wh - 1), wh, dtype=torch.float32)
        rw = torch.arange(-(ww - 1), ww, dtype=torch.float32)
        table = torch.stack(torch.meshgrid([rh, rw], indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
        ref = self.pretrained_window_size if self.pretrained_window_size[0] > 0 else self.window_size
        if min(ref) < 2:  # (torchvision's gives a table of NaN: 0 / 0)
            raise ValueError(f"vitfast.nn.ShiftedWindowAttentionV2: the log-spaced coordinates divide by the window "
                             f"minus 1: window_size (or pretrained_window_size) must be at least 2 on each axis, got "
                             f"{list(ref)}")
        table[:, :, :, 0] /= ref[0] - 1
        table[:, :, :, 1] /= ref[1] - 1
        table *= 8
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / 3.0
        self.register_buffer("relative_coords_table", table)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))

    def bias_table(self) -> Tensor:
        # 16 * sigmoid commutes with the gather, so the kernel gathers from the transformed table.
        return 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))

    def _logit_scale(self) -> Optional[Tensor]:
        return self.logit_scale


class WindowAttention(nn.Module):
    """timm's WindowAttention (same parameter and buffer names), computed by vitfast.window_attention.

    forward(x, mask=None):
        x (B*nW, N, C) windows as timm passes them, with timm's optional (nW, N, N) shift mask; or an
        image-layout map (B, H, W, C), windowed (and shifted by `shift_size`) inside the kernel.

    The image-layout path follows torchvision's convention: the map is padded to whole windows, then shifted (and
    masked by regions of the padded map). timm's SwinTransformerBlock shifts first, then pads; on a map that
    divides into windows the two agree, on one that does not (a (5, 7) map with window 3) the outputs differ.
    timm's own blocks pass windows, which this module takes as timm does.

    As timm's: `reset_parameters()` (a new bias table and index), `_init_buffers()` /
    `init_non_persistent_buffers()` (rebuild the non-persistent relative_position_index, (N, N) as timm's, which
    load_state_dict does not restore: after construction on the meta device and `to_empty()`) and
    `set_window_size(window_size)` (timm's Swin `set_input_size`).

    Raises:
        ValueError (forward): x neither 3-D nor 4-D, its last dim not `dim`, windows whose token count is not the
            window area, a mask with a map input or a mask not (nW, N, N) with nW dividing the windows.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None,
                 window_size: Union[int, Sequence[int]] = 7, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, shift_size: Union[int, Sequence[int]] = 0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)  # timm's factory kwargs
        self.dim = dim
        self.window_size = tuple(_positive_pair(window_size, "window_size", "vitfast.nn.WindowAttention"))
        self.shift_size = tuple(_pair(shift_size, "shift_size", "vitfast.nn.WindowAttention"))
        self.window_area = self.window_size[0] * self.window_size[1]
        heads = _positive_int(num_heads)
        if heads is None:
            raise ValueError(f"vitfast.nn.WindowAttention: num_heads must be a positive int, got {num_heads!r}")
        self.num_heads = num_heads = heads  # (an int: a NumPy int failed torch.compile(dynamic=True))
        head_dim = head_dim or dim // num_heads  # (timm's: dim need not divide; qkv is num_heads * head_dim wide)
        if head_dim < 1:
            raise ValueError(f"vitfast.nn.WindowAttention: head_dim={head_dim} (dim={dim} // num_heads={num_heads}) "
                             f"must be positive")
        attn_dim = head_dim * num_heads
        self.scale = head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1), num_heads, **dd))
        self.register_buffer("relative_position_index", torch.empty(self.window_area, self.window_area,
                                                                    device=device, dtype=torch.long),
                             persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's: the bias table drawn again (trunc_normal, std 0.02) and the index rebuilt."""
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._init_buffers()

    def _init_buffers(self) -> None:
        """timm's: fill the non-persistent relative_position_index (N, N) on its device."""
        with torch.no_grad():
            self.relative_position_index.copy_(
                relative_position_index(self.window_size).view(self.window_area, self.window_area))

    def init_non_persistent_buffers(self) -> None:
        """timm's name for rebuilding the non-persistent buffers (see _init_buffers)."""
        self._init_buffers()

    def set_window_size(self, window_size: Union[int, Sequence[int]]) -> None:
        """timm's: a new window size; the bias table is resized with timm's resize_rel_pos_bias_table (so this needs
        timm, ImportError without it) and the index rebuilt. shift_size (image layout only) is left as it is."""
        window_size = tuple(_pair(window_size, "window_size"))
        if window_size == self.window_size:
            return
        try:
            from timm.layers import resize_rel_pos_bias_table
        except ImportError as e:
            raise ImportError("vitfast.nn.WindowAttention.set_window_size: resizing the bias table uses timm's "
                              "resize_rel_pos_bias_table; install timm") from e
        old_window_size, self.window_size = self.window_size, window_size
        win_h, win_w = window_size
        self.window_area = win_h * win_w
        table = self.relative_position_bias_table
        with torch.no_grad():
            self.relative_position_bias_table = nn.Parameter(
                resize_rel_pos_bias_table(table, new_window_size=window_size,
                                          new_bias_shape=((2 * win_h - 1) * (2 * win_w - 1), self.num_heads),
                                          old_window_size=old_window_size),
                requires_grad=table.requires_grad)
        self.register_buffer("relative_position_index",
                             relative_position_index(window_size).view(self.window_area, self.window_area).to(
                                 table.device), persistent=False)

    def _get_rel_pos_bias(self) -> Tensor:
        """(1, heads, N, N), as timm's method returns it."""
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        heads = self.num_heads
        p = _attn_dropout_p(self, getattr(self, "fused_attn", True))  # (timm's WindowAttention has fused_attn)
        if x.dim() in (3, 4) and x.shape[-1] != self.dim:
            raise ValueError(f"vitfast.nn.WindowAttention: x has {x.shape[-1]} channels, expected dim={self.dim}, "
                             f"got shape {tuple(x.shape)}")
        if x.dim() == 4:
            if mask is not None:
                raise ValueError("vitfast.nn.WindowAttention: an image-layout input takes no mask (the shift mask is "
                                 "computed in the kernel from shift_size)")
            # unflatten infers -1 from the dim's size (a reshape to (B, ..., -1) cannot for an empty batch)
            qkv = self.qkv(x).unflatten(-1, (3, heads, -1))
            out = window_attention(qkv, self.relative_position_bias_table, self.window_size, self.shift_size,
                                   qkv_pad=self.qkv.bias, attention_dropout=p, training=self.training,
                                   softmax_scale=_timm_scale(self), clamp_window=False)
            return self.proj_drop(self.proj(out))
        if x.dim() != 3:
            raise ValueError(f"vitfast.nn.WindowAttention: x must be (B*nW, {self.window_area}, C) windows or a "
                             f"(B, H, W, C) map, got shape {tuple(x.shape)}")
        B_, N, C = x.shape
        if N != self.window_area:
            raise ValueError(f"vitfast.nn.WindowAttention: {N} tokens per window, expected {self.window_area} for "
                             f"window {self.window_size}")
        qkv = self.qkv(x).unflatten(-1, (3, heads, -1))  # (B_, N, 3, heads, D), B_ may be 0
        if mask is None:
            wh, ww = self.window_size
            out = window_attention(qkv.unflatten(1, (wh, ww)), self.relative_position_bias_table,
                                   self.window_size, 0, attention_dropout=p, training=self.training,
                                   softmax_scale=_timm_scale(self), clamp_window=False)
            return self.proj_drop(self.proj(out.flatten(1, 2)))
        # An arbitrary per-window mask: SDPA with bias + mask folded into one float mask.
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        num_win = mask.shape[0] if mask.dim() else 0
        if num_win == 0 or mask.numel() != num_win * N * N or B_ % num_win:
            raise ValueError(f"vitfast.nn.WindowAttention: mask must be (nW, {N}, {N}) with nW dividing the "
                             f"{B_} windows of x {tuple(x.shape)}, got shape {tuple(mask.shape)}")
        attn_mask = (self._get_rel_pos_bias().to(q.dtype).view(1, 1, heads, N, N)
                     + mask.to(q.dtype).view(1, num_win, 1, N, N)).expand(B_ // num_win, -1, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.reshape(B_, heads, N, N), dropout_p=p,
                                             scale=_timm_scale(self))
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))
