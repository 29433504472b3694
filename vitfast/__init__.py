"""vitfast: fused Triton and CUDA kernels for vision transformers."""
from vitfast import _ext
from vitfast.backend import choose_backend, set_backend, use_backend
from vitfast.info import info
from vitfast.ops.layer_norm import layer_norm
from vitfast import nn

__version__ = "0.1.0"
__all__ = ["choose_backend", "info", "layer_norm", "nn", "set_backend", "use_backend"]
