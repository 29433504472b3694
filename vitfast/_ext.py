"""Loads the compiled extension vitfast._C, which registers the C++ (and CUDA) kernels as torch ops.

`import vitfast` works without it: the "cpp" and "cuda" backends are then skipped with a logged reason.
"""
import logging

import torch  # noqa: F401  (loads libtorch/libc10, which vitfast._C links against)

log = logging.getLogger("vitfast")

try:
    from vitfast import _C  # noqa: F401  (importing registers torch.ops.vitfast.*)

    HAS_EXT = True
    EXT_ERROR = ""
    EXT_CUDA = bool(_C.with_cuda())
except ImportError as e:  # not built, or built against another torch
    HAS_EXT = False
    EXT_ERROR = (
        f"vitfast._C could not be imported ({e}); build it with "
        "`pip install --no-build-isolation --no-deps -e .` to enable the cpp/cuda backends"
    )
    EXT_CUDA = False
    log.debug(EXT_ERROR)
