"""vitfast.nn.PatchEmbed: a drop-in for timm.layers.PatchEmbed backed by vitfast.patch_embed."""
import math
from typing import Callable, Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from vitfast.ops.patch_embed import patch_embed


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """timm's PatchEmbed (same arguments, same state dict: `proj.weight`, `proj.bias`, `norm.*`).

    A LayerNorm `norm_layer` (torch's, timm's or vitfast's) is fused into the kernel's epilogue; any other norm
    runs after it. `forward(x, pos_embed=None, prefix_tokens=None, num_prefix_tokens=0)` also fuses ViT's
    class/distillation tokens and positional embedding (see vitfast.patch_embed); with them the output is
    always (B, P + L, E).

    Output formats as timm: flatten=True -> (B, L, E); output_fmt "NHWC" -> (B, Hp, Wp, E) (Swin);
    "NCHW" or flatten=False -> (B, E, Hp, Wp); "NLC" -> (B, L, E).
    """

    def __init__(self, img_size: Optional[Union[int, Tuple[int, int]]] = 224, patch_size: int = 16,
                 in_chans: int = 3, embed_dim: int = 768, norm_layer: Optional[Callable] = None,
                 flatten: bool = True, output_fmt: Optional[str] = None, bias: bool = True,
                 strict_img_size: bool = True, dynamic_img_pad: bool = False, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.patch_size = _pair(patch_size)
        self.img_size = _pair(img_size) if img_size is not None else None
        self.grid_size = (tuple(s // p for s, p in zip(self.img_size, self.patch_size))
                          if self.img_size is not None else None)
        self.num_patches = math.prod(self.grid_size) if self.grid_size is not None else None
        if output_fmt is not None:
            self.flatten = False
            self.output_fmt = str(getattr(output_fmt, "value", output_fmt)).upper()
        else:
            self.flatten = flatten
            self.output_fmt = "NCHW"
        if self.output_fmt not in ("NCHW", "NHWC", "NLC"):
            raise ValueError(f"vitfast.nn.PatchEmbed: output_fmt {output_fmt!r} is not one of NCHW, NHWC, NLC")
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias,
                              **dd)
        norm_dd = {k: v for k, v in dd.items() if v is not None}  # a norm_layer may take no factory kwargs
        self.norm = norm_layer(embed_dim, **norm_dd) if norm_layer else nn.Identity()

    def _fused_norm(self) -> bool:
        n = self.norm
        return isinstance(n, nn.LayerNorm) and tuple(n.normalized_shape) == (self.proj.out_channels,)

    def _size_error(self, H: int, W: int) -> Optional[str]:
        """timm's checks, no more: a fixed size when strict; else whole patches unless padded dynamically. Without
        img_size, as timm's convolution, the pixels past the last whole patch are dropped."""
        ph, pw = self.patch_size
        if self.img_size is not None and self.strict_img_size and (H, W) != tuple(self.img_size):
            return f"input size ({H}, {W}) doesn't match the model's {tuple(self.img_size)} (strict_img_size=True)"
        if self.img_size is not None and not self.strict_img_size and not self.dynamic_img_pad and (H % ph or W % pw):
            return (f"input size ({H}, {W}) should be divisible by the patch size {tuple(self.patch_size)} "
                    f"(strict_img_size=False, dynamic_img_pad=False)")
        return None

    def forward(self, x: Tensor, pos_embed: Optional[Tensor] = None, prefix_tokens: Optional[Tensor] = None,
                num_prefix_tokens: int = 0) -> Tensor:
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        error = self._size_error(H, W)
        if error:
            raise ValueError(f"vitfast.nn.PatchEmbed: {error}")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
            H, W = x.shape[-2:]
        fused = self._fused_norm()
        n = self.norm
        out = patch_embed(x, self.proj.weight, self.proj.bias, self.patch_size, pos_embed=pos_embed,
                          num_prefix_tokens=num_prefix_tokens, prefix_tokens=prefix_tokens,
                          norm_weight=n.weight if fused else None, norm_bias=n.bias if fused else None,
                          eps=n.eps if fused else 1e-5, norm=fused)
        if not fused and not isinstance(n, nn.Identity):
            if pos_embed is not None or prefix_tokens is not None or num_prefix_tokens:
                raise ValueError("vitfast.nn.PatchEmbed: pos_embed/prefix tokens can be fused only with a "
                                 f"LayerNorm (or no) norm_layer, not {type(n).__name__}")
            out = n(out)
        if pos_embed is not None or prefix_tokens is not None or num_prefix_tokens:
            return out
        Hp, Wp = H // ph, W // pw
        if self.flatten or self.output_fmt == "NLC":
            return out
        out = out.unflatten(1, (Hp, Wp))
        return out if self.output_fmt == "NHWC" else out.permute(0, 3, 1, 2)
