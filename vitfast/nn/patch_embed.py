"""vitfast.nn.PatchEmbed: a drop-in for timm.layers.PatchEmbed backed by vitfast.patch_embed."""
import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import autocast as _autocast
from vitfast.integrations.patch import submodules_intercepted
from vitfast.nn.layer_norm import normalizes_last_dim
from vitfast.ops import patch_embed as _pe_ops
from vitfast.ops.patch_embed import patch_embed
from vitfast.ops.window_attention import _positive_pair


class PatchEmbed(nn.Module):
    """timm's PatchEmbed (same arguments, same state dict: `proj.weight`, `proj.bias`, `norm.*`).

    A LayerNorm `norm_layer` (torch's, timm's or vitfast's) is fused into the kernel's epilogue where timm's norm
    sees channels-last tokens (not for the NCHW output, where timm normalizes the map); any other norm runs after
    the layout change, as timm runs it. Where `proj` or `norm` carries hooks (or hooks for every module are
    registered), they are called instead of read, so the hooks run.

    `forward(x, pos_embed=None, prefix_tokens=None, num_prefix_tokens=0)` also fuses ViT's class/distillation
    tokens and positional embedding (see vitfast.patch_embed); with them the output is always (B, P + L, E).

    Output formats as timm: flatten=True -> (B, L, E); output_fmt "NHWC" -> (B, Hp, Wp, E) (Swin);
    "NCHW" or flatten=False -> (B, E, Hp, Wp); "NLC" -> (B, L, E).

    Raises:
        ValueError: an output_fmt not "NCHW", "NHWC" or "NLC"; in forward, x not (B, C, H, W), an image size that
            timm's rules refuse (strict_img_size, dynamic_img_pad), pos_embed or prefix tokens with a norm_layer
            that cannot be fused, and vitfast.patch_embed's errors.
    """

    def __init__(self, img_size: Optional[Union[int, Tuple[int, int]]] = 224, patch_size: int = 16,
                 in_chans: int = 3, embed_dim: int = 768, norm_layer: Optional[Callable] = None,
                 flatten: bool = True, output_fmt: Optional[str] = None, bias: bool = True,
                 strict_img_size: bool = True, dynamic_img_pad: bool = False, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.patch_size = tuple(_positive_pair(patch_size, "patch_size", "vitfast.nn.PatchEmbed"))
        self.img_size, self.grid_size, self.num_patches = self._sizes(img_size)
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

    def _sizes(self, img_size) -> tuple:
        """img_size as a pair, the token grid and the number of patches it gives (None, None, None without one)."""
        if img_size is None:
            return None, None, None
        img_size = tuple(_positive_pair(img_size, "img_size", "vitfast.nn.PatchEmbed"))
        grid = tuple(s // p for s, p in zip(img_size, self.patch_size))
        return img_size, grid, math.prod(grid)

    def feat_ratio(self, as_scalar: bool = True) -> Union[int, Tuple[int, int]]:
        """timm's: the input pixels per output token along each axis (the patch size; its larger side as a
        scalar)."""
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """timm's: the token grid (Hp, Wp) of an image of size (H, W), rounded up where the module pads dynamically."""
        (ph, pw), (H, W) = self.patch_size, img_size
        return (-(-H // ph), -(-W // pw)) if self.dynamic_img_pad else (H // ph, W // pw)

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """timm's: a new image size (grid_size and num_patches follow) and/or patch size. A new patch size resamples
        the projection with timm's resample_patch_embed (FlexiViT's pseudo-inverse resize, Beyer et al. 2023,
        arXiv:2212.08013), so it needs timm (ImportError without it)."""
        new_patch = (tuple(_positive_pair(patch_size, "patch_size", "vitfast.nn.PatchEmbed.set_input_size"))
                     if patch_size is not None else None)
        if new_patch is not None and new_patch != self.patch_size:
            try:
                from timm.layers import resample_patch_embed
            except ImportError as e:
                raise ImportError("vitfast.nn.PatchEmbed.set_input_size: a new patch_size resamples the projection "
                                  "with timm's resample_patch_embed; install timm") from e
            old = self.proj
            proj = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=new_patch, stride=new_patch,
                             bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                proj.weight.copy_(resample_patch_embed(old.weight, list(new_patch), verbose=False))
                if old.bias is not None:
                    proj.bias.copy_(old.bias)
            proj.weight.requires_grad_(old.weight.requires_grad)
            if old.bias is not None:
                proj.bias.requires_grad_(old.bias.requires_grad)
            proj.train(old.training)
            self.proj = proj
            self.patch_size = new_patch
        img_size = self.img_size if img_size is None else img_size  # (0 was taken as None: ignored)
        if img_size != self.img_size or new_patch is not None:
            self.img_size, self.grid_size, self.num_patches = self._sizes(img_size)

    def _fused_norm(self) -> bool:
        """Whether the norm is a LayerNorm over the embedding whose parameters are in the projection's dtype (a
        bfloat16 model that keeps its norms in float32 runs the norm unfused: vitfast's kernels take one dtype;
        under autocast every parameter is cast to the region's dtype)."""
        n = self.norm
        return (normalizes_last_dim(n, self.proj.out_channels)
                and (_autocast.is_enabled(self.proj.weight.device)
                     or all(p.dtype == self.proj.weight.dtype for p in n.parameters())))

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
        if x.dim() != 4:
            raise ValueError(f"vitfast.nn.PatchEmbed: x must be (B, C, H, W) images, got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        error = self._size_error(H, W)
        if error:
            raise ValueError(f"vitfast.nn.PatchEmbed: {error}")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
            H, W = x.shape[-2:]
        tokens = pos_embed is not None or prefix_tokens is not None or bool(num_prefix_tokens)
        n = self.norm
        if tokens and not isinstance(n, nn.Identity) and not self._fused_norm():
            raise ValueError("vitfast.nn.PatchEmbed: pos_embed/prefix tokens can be fused only with a "
                             f"LayerNorm (or no) norm_layer in the projection's dtype, not {type(n).__name__} "
                             f"({', '.join(str(p.dtype) for p in n.parameters()) or 'no parameters'})")
        # hooks on proj or norm (or for every module), or a forward set on their instances: call them, as timm does
        hooked = submodules_intercepted(self.proj, n)
        nchw = not self.flatten and self.output_fmt == "NCHW"
        # timm's norm sees the NCHW map where the output is NCHW: the LayerNorm over E is fused only for tokens
        fused = not hooked and self._fused_norm() and (tokens or not nchw)
        if hooked:
            out = self.proj(x).flatten(2).transpose(1, 2)
        else:
            out = patch_embed(x, self.proj.weight, self.proj.bias, self.patch_size, pos_embed=pos_embed,
                              num_prefix_tokens=num_prefix_tokens, prefix_tokens=prefix_tokens,
                              norm_weight=n.weight if fused else None, norm_bias=n.bias if fused else None,
                              eps=n.eps if fused else 1e-5, norm=fused)
        if tokens:
            return _prefix_and_pos(n(out), (H // ph, W // pw), pos_embed, prefix_tokens,
                                   num_prefix_tokens) if hooked else out
        Hp, Wp = H // ph, W // pw
        if not (self.flatten or self.output_fmt == "NLC"):
            out = out.unflatten(1, (Hp, Wp))
            out = out if self.output_fmt == "NHWC" else out.permute(0, 3, 1, 2)
        return out if fused or (isinstance(n, nn.Identity) and not hooked) else n(out)


def _prefix_and_pos(tokens: Tensor, grid: Tuple[int, int], pos_embed: Optional[Tensor],
                    prefix_tokens: Optional[Tensor], num_prefix_tokens: int) -> Tensor:
    """(B, L, E) patch tokens (from the called proj and norm) -> (B, P + L, E) as vitfast.patch_embed adds
    prefix tokens and pos_embed to them (a pos_embed of another square grid resampled)."""
    E = tokens.shape[-1]
    P = prefix_tokens.shape[-2] if prefix_tokens is not None else int(num_prefix_tokens)
    offset = 0
    if pos_embed is not None:
        pos_embed, offset = _pe_ops._pos_rows(pos_embed, P, grid)
    return _pe_ops._prefix_and_pos(tokens, pos_embed, offset,
                                   prefix_tokens.reshape(P, E) if prefix_tokens is not None else None, P)
