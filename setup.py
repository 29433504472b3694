"""Builds vitfast._C: csrc/*.cpp always (CPU); kernels/*.cu and csrc/*_cuda.cpp where CUDA is available.

VITFAST_BUILD_CUDA=1 forces the CUDA sources in (and fails loudly if torch or nvcc cannot build them),
VITFAST_BUILD_CUDA=0 leaves them out. Install with `pip install --no-build-isolation -e .` so that the
build uses the torch that is already installed.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _build_cuda() -> bool:
    flag = os.environ.get("VITFAST_BUILD_CUDA") or None  # (set but empty: unset)
    if flag not in (None, "0", "1"):
        raise RuntimeError(f"VITFAST_BUILD_CUDA must be 0 (no CUDA sources) or 1 (CUDA sources, or fail), got {flag!r}")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not available:
        missing = ([f"torch {torch.__version__} is a CPU build"] if torch.version.cuda is None else []) + (
            ["nvcc was not found (CUDA_HOME unset, no nvcc on PATH)"] if CUDA_HOME is None else [])
        raise RuntimeError(f"VITFAST_BUILD_CUDA=1 but {' and '.join(missing)}; a CUDA build needs a CUDA torch and nvcc")
    return available if flag is None else flag == "1"


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++17"]
    if not _build_cuda():
        sources = [s for s in cpp if not s.endswith("_cuda.cpp")]
        return CppExtension("vitfast._C", sources, extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
                            extra_link_args=["-fopenmp"])
    sources = cpp + sorted(glob.glob(os.path.join(here, "kernels", "*.cu")))
    return CUDAExtension(
        "vitfast._C",
        sources,
        include_dirs=[os.path.join(here, "kernels")],
        define_macros=[("VITFAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags + ["-fopenmp"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="vitfast",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for vision transformers",
    packages=find_packages(include=["vitfast", "vitfast.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
