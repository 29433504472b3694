"""Triton helpers shared by several kernels, and the compile-only mode that builds them for a GPU on any machine.

Each launcher asks `compiled(t)` whether its kernels are compiled for a GPU (tuned configurations, native bf16
dots, grids sized by `num_sms`) or run by Triton's CPU interpreter (TRITON_INTERPRET=1: small fixed blocks, bf16
dots upcast). Under `compile_only(...)` CPU tensors take the GPU's code paths and every launch compiles the
kernel for that GPU (every configuration of an autotuned kernel) without running it: Triton's compiler and ptxas
need no GPU and no driver, so a CPU machine finds what would fail to compile, exceed shared memory or spill
registers on the GPU.
"""
import contextlib
import io
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: bf16 operands as fp32 (exact products), for the interpreter, whose bf16
    tl.dot returns garbage on triton 3.9 with numpy 2."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in fp32 with tl.dot's input_precision PRECISION. UPCAST: bf16 operands as fp32 (exact), for the
    interpreter, whose bf16 tl.dot multiplies the raw bit patterns (triton 3.9)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@dataclass(frozen=True)
class GPU:
    """What compile-only mode compiles for: a CUDA compute capability and the SM count that sizes grids."""
    name: str
    capability: int
    sms: int
    max_shared_bytes: int  # per block, with the opt-in carve-out


H100 = GPU("H100 SXM (sm_90)", 90, 132, 232448)  # 227 KiB: CUDA C Programming Guide, compute capability 9.0
_target: Optional[GPU] = None


def compiled(t: torch.Tensor) -> bool:
    """Whether t's kernels are compiled for a GPU (True) or interpreted on the CPU (False)."""
    return t.device.type == "cuda" or _target is not None


def upcast_bf16(t: torch.Tensor) -> bool:
    """Whether bf16 dot operands must go through tl.dot as fp32: only under the interpreter (see `dot`)."""
    return not compiled(t) and t.dtype == torch.bfloat16


def num_sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of t's GPU (of the target under compile_only)."""
    if _target is not None:
        return _target.sms
    return torch.cuda.get_device_properties(t.device).multi_processor_count


def num_splits(t: torch.Tensor, tiles: int, M: int) -> int:
    """Splits of an M-long reduction for a GEMM with `tiles` output tiles, each writing an fp32 partial: enough
    programs for two waves on the GPU, but at least 256 rows per split so the partials stay cheap to sum."""
    if not compiled(t):
        return max(1, min(2, triton.cdiv(M, 64)))
    return max(1, min(triton.cdiv(2 * num_sms(t), tiles), triton.cdiv(M, 256)))


@dataclass
class Compilation:
    """One kernel specialization compiled under compile_only."""
    kernel: str
    config: Dict[str, object]  # the constexprs and launch options that select this specialization
    seconds: float
    shared_bytes: int = 0
    registers: int = 0
    spill_bytes: int = 0  # spill stores + loads reported by ptxas
    error: str = ""
    problems: List[str] = field(default_factory=list)  # compiled, but would not launch (shared memory) on target
    # an autotuned launch's config with problems, while another config fits: Triton's autotuner skips it
    # (OutOfResources counts as an infinite time), so the launch works
    autotuner_skips: bool = False


class _CompileOnlyDriver:
    """The part of Triton's driver interface that compiling needs: the target, a device key, a stream."""

    def __init__(self, gpu: GPU):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", gpu.capability, 32)
        self.key = f"compile-only-sm{gpu.capability}"  # never a real device index: its kernel cache stays apart

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.key

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@contextlib.contextmanager
def compile_only(gpu: GPU = H100):
    """Within it, Triton launches compile for `gpu` and return without running, and the triton backend takes CPU
    tensors; yields the list of Compilation records (one per distinct specialization; an autotuned launch compiles
    all its configs).

    Outputs of the launchers stay uninitialised. A compile error is recorded, not raised, so that one run reports
    every failure.
    """
    global _target
    from triton import knobs
    from vitfast import backend

    if backend.triton_interpret():
        raise RuntimeError("compile_only needs Triton's compiler, but TRITON_INTERPRET=1 made every kernel "
                           "interpreted when it was decorated: run with TRITON_INTERPRET unset")
    from triton.runtime import driver as driver_config
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    records: List[Compilation] = []
    seen = set()
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def compile_launch(fn, *args, grid, warmup, **kwargs):
        options = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        start = time.perf_counter()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported per specialization, the run goes on
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # Triton: position ... reason
            where = f"{lines[0]} ... {lines[-1]}" if len(lines) > 1 else "".join(lines)
            records.append(Compilation(fn.__name__, options, time.perf_counter() - start,
                                       error=f"{type(e).__name__}: {where}"))
            return None
        if kernel.hash in seen:
            return kernel
        seen.add(kernel.hash)
        ptxas = log.getvalue()
        regs = _PTXAS_USAGE.search(ptxas)
        spills = _PTXAS_SPILLS.search(ptxas)
        meta = kernel.metadata
        rec = Compilation(fn.__name__, dict(options, num_warps=meta.num_warps, num_stages=meta.num_stages),
                          time.perf_counter() - start, meta.shared, int(regs.group(1)) if regs else 0,
                          sum(map(int, spills.groups())) if spills else 0)
        if meta.shared > gpu.max_shared_bytes:
            rec.problems.append(f"shared memory {meta.shared} B > {gpu.max_shared_bytes} B")
        records.append(rec)
        return kernel

    def compile_every_config(tuner, *args, **kwargs):
        before = len(records)
        for config in tuner.configs:
            tuner.fn.run(*args, **kwargs, **config.all_kwargs())
        launch = records[before:]
        if any(not r.error and not r.problems for r in launch):
            for r in launch:
                r.autotuner_skips = bool(r.problems)

    saved = driver_config._active, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    driver_config.set_active(_CompileOnlyDriver(gpu))
    # ptxas prints the register and spill counts only when it runs: no cache hits
    knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True
    JITFunction.run, Autotuner.run = compile_launch, compile_every_config
    _target, backend._triton_compile_only = gpu, True
    try:
        yield records
    finally:
        _target, backend._triton_compile_only = None, False
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        driver_config._active, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
