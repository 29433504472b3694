"""vitfast.nn.PatchMerging: a drop-in for timm's and torchvision's Swin PatchMerging, backed by
vitfast.patch_merging."""
import math
from typing import Callable, Optional, Union

from torch import Tensor, nn

from vitfast import autocast as _autocast
from vitfast.integrations.patch import submodules_intercepted
from vitfast.nn.layer_norm import normalizes_last_dim
from vitfast.ops.patch_merging import _gather, patch_merging


class PatchMerging(nn.Module):
    """Swin patch merging with the parameters of timm (`PatchMerging(dim, out_dim, norm_layer)`) and torchvision
    (`PatchMerging(dim, norm_layer)`): `norm` (LayerNorm(4*dim)) and `reduction` (Linear(4*dim, out_dim,
    bias=False)), so their state dicts load unchanged. Registered in the order of the library whose call it is
    (torchvision's positional norm_layer: reduction first; otherwise timm's: norm first), so that an optimizer's
    state, which PyTorch matches to parameters() by position, resumes on it.

    forward(x): (..., H, W, dim) -> (..., ceil(H/2), ceil(W/2), out_dim); odd H or W is zero-padded as Swin does.
    A norm_layer that is not a LayerNorm, or one whose parameters are in another dtype than x and the reduction
    outside autocast (a bfloat16 model that keeps its norms in float32: vitfast's kernels take one dtype), runs
    unfused (gather, norm, reduction in PyTorch), and so does a call where `norm` or `reduction` carries hooks (or
    hooks for every module are registered), so that the hooks run.

    Raises:
        ValueError (forward): x not (..., H, W, dim).
    """

    def __init__(self, dim: int, out_dim: Union[int, Callable, None] = None, norm_layer: Callable = nn.LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        torchvision = callable(out_dim)
        if torchvision:  # torchvision's positional PatchMerging(dim, norm_layer), as its SwinTransformer calls it
            out_dim, norm_layer = None, out_dim
        # torchvision calls norm_layer(4 * dim) without factory kwargs: pass them only when given
        dd = {k: v for k, v in dict(device=device, dtype=dtype).items() if v is not None}
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        # in the library's order (torchvision: reduction, then norm; timm: norm first), so that parameters() and an
        # optimizer's state, which it matches by position, line up with the module replaced
        if torchvision:
            self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False, **dd)
        self.norm = norm_layer(4 * dim, **dd)
        if not torchvision:
            self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False, **dd)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[-1] != self.dim:  # (a wrong C: an error about the norm's weight before)
            raise ValueError(f"vitfast.nn.PatchMerging: x must be (..., H, W, {self.dim}), got shape "
                             f"{tuple(x.shape)}")
        n = self.norm
        # hooks on norm or reduction (or for every module): the unfused path, which calls them
        if (not submodules_intercepted(n, self.reduction) and normalizes_last_dim(n, 4 * self.dim)
                and (_autocast.is_enabled(x.device) or all(p.dtype == x.dtype for p in (*n.parameters(),
                                                                                        self.reduction.weight)))):
            return patch_merging(x, n.weight, n.bias, self.reduction.weight, n.eps)
        lead, (H, W, C) = x.shape[:-3], x.shape[-3:]
        merged = _gather(x.reshape(math.prod(lead), H, W, C)).view(*lead, (H + 1) // 2, (W + 1) // 2, 4 * C)
        return self.reduction(n(merged))
