"""Optional model libraries (torchvision, timm, open_clip) for the integration tests: import or skip with the reason.

On CPU machines the only torchvision wheel for the pinned torch is a CUDA build whose compiled ops do not load;
its `_meta_registrations` then fails with "operator torchvision::nms does not exist", and timm and open_clip fail
with it (timm imports torchvision unconditionally). Defining the schemas of the two ops it registers fakes for
unconditionally (`nms`, `qnms`) lets all three import and build models; the compiled torchvision ops stay
unavailable, which no test here uses.

Where they are not installed beside torch, they are looked for in a separate folder, `VITFAST_OPTIONAL_LIBS`
(default `.venv/optional-libs`, filled by `pip install --no-deps --target`): installed into the venv itself,
torchvision would break `import transformers` (which imports torchvision when it finds it) for every process that
does not apply this shim first.
"""
import glob
import importlib
import importlib.util
import os
import sys

import pytest
import torch

_SHIM_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                 "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_shim_lib = None  # kept alive: the schemas live as long as the Library object


def _torchvision_ops_load() -> bool:
    """Whether torchvision's compiled ops load with this torch (they define the real schemas)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return False
    for folder in spec.submodule_search_locations or ():
        for lib in glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd")):
            try:
                torch.ops.load_library(lib)
                return True
            except (OSError, RuntimeError):  # e.g. a CUDA build against a CPU torch: undefined symbols
                return False
    return False


def apply_torchvision_shim() -> None:
    """Defines the torchvision::nms/qnms schemas when torchvision's compiled ops do not load (idempotent)."""
    global _shim_lib
    if _shim_lib is not None or _torchvision_ops_load():
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SHIM_SCHEMAS:
        lib.define(schema)
    _shim_lib = lib


_LIBS_DIR = os.environ.get("VITFAST_OPTIONAL_LIBS") or os.path.join(  # (set but empty: the default)
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "optional-libs")


def _add_libs_dir() -> None:
    if os.path.isdir(_LIBS_DIR) and _LIBS_DIR not in sys.path:
        sys.path.append(_LIBS_DIR)
        importlib.invalidate_caches()
        apply_torchvision_shim()  # at once: transformers imports torchvision whenever it can find it


def import_or_skip(name: str):
    """Imports `name` ("torchvision", "timm", "open_clip"; or any module) after the torchvision shim, or skips the
    calling test module with the import error as the reason."""
    if importlib.util.find_spec(name) is None:
        _add_libs_dir()
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (nor in {_LIBS_DIR})", allow_module_level=True)
    if name in ("torchvision", "timm", "open_clip") and importlib.util.find_spec("torchvision") is not None:
        apply_torchvision_shim()
    try:
        return importlib.import_module(name)
    except Exception as e:  # an installed but broken library: skip with its error, never fail collection
        pytest.skip(f"{name} is installed but does not import here: {type(e).__name__}: {e}", allow_module_level=True)
