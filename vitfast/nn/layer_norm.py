"""vitfast.nn.LayerNorm: a drop-in for torch.nn.LayerNorm backed by vitfast.layer_norm."""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import autocast as _autocast
from vitfast.ops.layer_norm import layer_norm


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm with the same parameters and state dict, computed by vitfast.layer_norm.

    `forward(x, residual=None)`: with a residual it returns `(LN(x + residual), x + residual)`. An input in another
    floating dtype than the parameters outside autocast (a bfloat16 model that keeps its norms in float32), which
    nn.LayerNorm takes and vitfast's kernels do not (they take one dtype), is computed as nn.LayerNorm computes it
    (F.layer_norm).

    Raises:
        ValueError (forward): vitfast.layer_norm's (trailing dims of x not normalized_shape, a residual not of x's
            shape and device).
    """

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        if (self.weight is not None and x.is_floating_point() and x.dtype != self.weight.dtype
                and not _autocast.is_enabled(x.device)):
            s = x if residual is None else x + residual
            y = F.layer_norm(s, self.normalized_shape, self.weight, self.bias, self.eps)
            return y if residual is None else (y, s)
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, residual)


# LayerNorms over the last dim, which vitfast's fused ops may stand in for (an nn.LayerNorm subclass may normalize
# another dim: timm's LayerNorm2d, over dim 1)
_LAST_DIM = {"torch.nn.modules.normalization.LayerNorm", "timm.layers.norm.LayerNorm",
             "vitfast.nn.layer_norm.LayerNorm"}


def normalizes_last_dim(module: nn.Module, width: int) -> bool:
    """Whether `module` is a LayerNorm over a last dim of `width` (torch's, timm's or vitfast's class exactly)."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}" in _LAST_DIM and tuple(module.normalized_shape) == (width,)
