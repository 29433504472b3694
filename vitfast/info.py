"""What this vitfast installation can run: versions, devices, the extension, the backends."""
import os
import platform
import subprocess
from typing import Optional

import torch

import vitfast
from vitfast import _ext, backend


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _source_commit() -> Optional[str]:
    """The commit of the git checkout vitfast is imported from (an editable install), as `git describe` gives it
    (with "-dirty" for uncommitted changes); None for an installed copy, or where git is missing."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        run = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12", "--exclude=*"],
                             capture_output=True, text=True, timeout=10, cwd=root)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 and run.stdout.strip() else None


def info() -> dict:
    """Returns the environment as a dict (printed by `python -m vitfast info`): vitfast (version), commit (`git
    describe` of a source checkout, else None), python, torch, torch_cuda (the CUDA torch was built for, None on a
    CPU build), triton (version or None), triton_interpret (TRITON_INTERPRET=1 set), device (the GPU's name, else
    "cpu (model)"), cpu (model, torch threads, ATen's CPU capability), extension_cpu / extension_cuda (whether
    vitfast._C loaded with its CPU / CUDA kernels), extension_error (why it did not load, or None), forced_backend
    (the backend VITFAST_BACKEND or use_backend forces, None, or "error: ..." for an invalid VITFAST_BACKEND)."""
    cpu = _cpu_model()
    triton_version = None
    if backend.has_triton():
        import triton

        triton_version = triton.__version__
    return {
        "vitfast": vitfast.__version__,
        "commit": _source_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": backend.triton_interpret(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({cpu})",
        "cpu": f"{cpu}, {torch.get_num_threads()} torch threads, {torch.backends.cpu.get_cpu_capability()}",
        "extension_cpu": _ext.HAS_EXT,
        "extension_cuda": _ext.EXT_CUDA,
        "extension_error": _ext.EXT_ERROR or None,
        "forced_backend": _forced_backend(),
    }


def _forced_backend() -> Optional[str]:
    """The forced backend, or what is wrong with VITFAST_BACKEND (info reports the environment; it does not fail)."""
    try:
        return backend.forced_backend()
    except ValueError as e:
        return f"error: {e}"
