"""Prints the pip requirements that this interpreter lacks (torch is installed separately, by the Makefile).

Packages already importable are left alone, so a machine without registry access (the GPU box) that has
them preinstalled needs nothing, and the CPU torch is never replaced.
"""
import importlib.util

REQUIREMENTS = {  # module -> pip requirement
    "triton": "triton",
    "numpy": "numpy",
    "pytest": "pytest",
    "pytest_benchmark": "pytest-benchmark",
    "xdist": "pytest-xdist",  # make test and bench/gpu_run.sh run the tests across the CPU cores
    "hypothesis": "hypothesis",
    "ninja": "ninja",
    "pybind11": "pybind11",
    "transformers": "transformers",
    "matplotlib": "matplotlib",
}

missing = [req for mod, req in REQUIREMENTS.items() if importlib.util.find_spec(mod) is None]
print(" ".join(missing) if missing else "--version")
