"""What this vitfast installation can run: versions, devices, the extension, the backends."""
import platform

import torch

from vitfast import _ext, backend


def info() -> dict:
    """Returns the environment as a dict (printed by `python -m vitfast info`)."""
    triton_version = None
    if backend.has_triton():
        import triton

        triton_version = triton.__version__
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": backend.triton_interpret(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "extension_cpu": _ext.HAS_EXT,
        "extension_cuda": _ext.EXT_CUDA,
        "extension_error": _ext.EXT_ERROR or None,
        "forced_backend": backend.forced_backend(),
    }
