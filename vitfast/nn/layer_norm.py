"""vitfast.nn.LayerNorm: a drop-in for torch.nn.LayerNorm backed by vitfast.layer_norm."""
from typing import Optional

from torch import Tensor, nn

from vitfast.ops.layer_norm import layer_norm


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm with the same parameters and state dict, computed by vitfast.layer_norm.

    `forward(x, residual=None)`: with a residual it returns `(LN(x + residual), x + residual)`.
    """

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, residual)
