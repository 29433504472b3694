"""Triton helpers shared by every kernel: the one launch path, the fp32 precision rule, autotuning, and the
compile-only mode that builds the kernels for a GPU on any machine.

Every kernel of vitfast is launched by `launch(kernel, grid, *args, **kwargs)`, which
- runs it on the device of its tensor arguments (a device guard: Triton launches on the *current* CUDA device
  and its current stream, so a model on cuda:1 with the current device 0 would otherwise read another GPU's
  memory, unordered with the kernels that produced its inputs);
- checks the grid against CUDA's limits (x < 2**31, y and z < 65536), raising a ValueError that names the
  kernel and the tensor shapes instead of failing the launch with an opaque CUDA error;
- runs an autotuned kernel's launches one thread at a time: Triton's Autotuner keeps each call's arguments on the
  shared object and clears them on exit (triton-lang/triton#11494), so two threads launching it at once
  (nn.DataParallel's replicas on several GPUs) failed with "'NoneType' object is not a mapping" or benchmarked one
  replica's tensors in the other's call. A launch is asynchronous: the lock is held for the launch's Python only,
  and for the benchmarks of a first call.

fp32 precision rule, for every op: fp32 tensor-core products use TF32 exactly when
`torch.backends.cuda.matmul.allow_tf32` is True (also set by `torch.set_float32_matmul_precision("high")`),
as PyTorch's own fp32 matmul does; by default it is False and fp32 products are IEEE fp32. `dot_precision(t)`
is that rule; every kernel with a tl.dot takes it as its PRECISION constexpr. fp16/bf16 products are exact
into an fp32 accumulator either way.

Autotuned kernels (`autotune`) key on size buckets (`tune_bucket`: the next power of two), not on exact sizes,
so a new sequence length or a last partial batch reuses the tuned choice instead of re-benchmarking. Before
benchmarking, their configurations that would spill registers or not fit in shared memory are pruned whenever
another one needs neither (`usable_configs`), so the autotuner never picks a spilling configuration when a
non-spilling one exists.

Each launcher asks `compiled(t)` whether its kernels are compiled for a GPU (tuned configurations, native bf16
dots, grids sized by `num_sms`) or run by Triton's CPU interpreter (TRITON_INTERPRET=1: small fixed blocks, bf16
dots upcast). Under `compile_only(...)` CPU tensors take the GPU's code paths and every launch compiles the
kernel for that GPU (every configuration of an autotuned kernel) without running it: Triton's compiler and ptxas
need no GPU and no driver, so a CPU machine finds what would fail to compile, exceed shared memory, spill
registers, exceed the grid limits or bypass `launch` on the GPU.
"""
import contextlib
import dataclasses
import functools
import io
import re
import shutil
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from vitfast import backend as _backend

# CUDA's grid limits (CUDA C Programming Guide, "Features and Technical Specifications"), every compute capability
# from 3.0: gridDim.x <= 2**31 - 1, gridDim.y and gridDim.z <= 65535.
MAX_GRID = (2**31 - 1, 65535, 65535)


def _backport_interpreter_index() -> None:
    """triton < 3.9's interpreter turns a loop bound into a Python int with int() of a shape-(1,) numpy array,
    which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel
    with a runtime loop bound fails under TRITON_INTERPRET=1 with triton 3.6. triton 3.9 converts the squeezed
    array; this gives the older interpreter that same conversion."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


if _backend.triton_interpret() and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
    _backport_interpreter_index()


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32 with tl.dot's input_precision PRECISION. UPCAST: bf16 operands as fp32 (exact
    products), for the interpreter, whose bf16 tl.dot returns garbage on triton 3.9 with numpy 2."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in fp32 with tl.dot's input_precision PRECISION. UPCAST: bf16 operands as fp32 (exact), for the
    interpreter, whose bf16 tl.dot multiplies the raw bit patterns (triton 3.9)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@dataclasses.dataclass(frozen=True)
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


def unit_inner_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t with unit inner stride (kernels that index their last dim by 1), copied only when it has another; None
    stays None."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def dot_precision(t: torch.Tensor) -> str:
    """tl.dot's input_precision for operands of t's dtype: the fp32 rule of the module docstring ("tf32" for fp32
    exactly when torch.backends.cuda.matmul.allow_tf32 is set, else "ieee"; "ieee" for fp16/bf16, where it does
    not change the product)."""
    return "tf32" if t.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def int32_head_offsets(*tensors: torch.Tensor) -> tuple:
    """The tensors, each one whose head-dim offsets (offs_d * stride(-1), int32 in the attention kernels) could
    pass 2**31 replaced by a contiguous copy: a head dim outermost in memory (a permuted view of a huge tensor)."""
    return tuple(t.contiguous() if t.stride(-1) * max(t.shape[-1] - 1, 0) > 2**31 - 1 else t for t in tensors)


def num_sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of t's GPU (of the target under compile_only)."""
    if _target is not None:
        return _target.sms
    return torch.cuda.get_device_properties(t.device).multi_processor_count


def num_splits(t: torch.Tensor, tiles: int, M: int) -> int:
    """Splits of an M-long reduction for a GEMM with `tiles` output tiles, each writing an fp32 partial: enough
    programs for two waves on the GPU, but at least 256 rows per split so the partials stay cheap to sum. At most
    2 * num_sms, so a grid dimension of splits stays far below CUDA's 65535."""
    if not compiled(t):
        return max(1, min(2, triton.cdiv(M, 64)))
    return max(1, min(triton.cdiv(2 * num_sms(t), tiles), triton.cdiv(M, 256)))


def tune_bucket(n: int) -> int:
    """The autotuning key of a size that varies between calls (sequence length, rows): its next power of two."""
    return triton.next_power_of_2(max(1, n))


def grid_problem(grid: Sequence[int]) -> Optional[str]:
    """Why CUDA would refuse to launch `grid` (1 to 3 dims), or None when it is within the limits."""
    dims = tuple(int(g) for g in grid)
    if not 1 <= len(dims) <= 3:
        return f"grid {dims} must have 1 to 3 dimensions"
    over = [f"dim {i} = {g} > {MAX_GRID[i]}" for i, g in enumerate(dims) if g > MAX_GRID[i]]
    if over:
        return f"grid {dims} beyond CUDA's limits ({', '.join(over)})"
    return None


def _shapes(args) -> str:
    return ", ".join(f"{tuple(a.shape)} {a.dtype}" for a in args if isinstance(a, torch.Tensor))


# Depth of `launch` calls in progress: compile_only flags a kernel launched any other way.
_launch_depth = 0
# Held around each launch of an autotuned kernel (module docstring).
_autotune_lock = threading.RLock()


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs): the one way vitfast launches a Triton kernel (see the module docstring).

    Args:
        kernel: a triton.jit function or an autotuned one.
        grid: a tuple of 1 to 3 ints, or a function of the launch's meta-parameters returning one.
        args, kwargs: the kernel's arguments; the device of the first tensor among args is the launch's device.
    Raises:
        ValueError: the grid exceeds CUDA's limits (checked here except under compile_only, which records it).
    """
    global _launch_depth
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if _target is None:
        def checked(dims):
            problem = grid_problem(dims)
            if problem is not None:
                name = (getattr(kernel, "base_fn", None) or kernel.fn).__name__
                raise ValueError(f"vitfast: {name} cannot launch for inputs [{_shapes(args)}]: {problem}")
            return dims

        grid = (lambda meta, g=grid: checked(g(meta))) if callable(grid) else checked(grid)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    serial = _autotune_lock if isinstance(kernel, Autotuner) else contextlib.nullcontext()
    _launch_depth += 1
    try:
        with serial, guard:
            return kernel[grid](*args, **kwargs)
    finally:
        _launch_depth -= 1


def usable_configs(configs: list, spills: List[Optional[int]]) -> list:
    """The configurations the autotuner may choose among, given each one's register spills (None: it cannot run,
    e.g. more shared memory than the GPU has): those without spills if any, else those that run, else all (the
    launch then fails with Triton's own error)."""
    for keep in (lambda s: s == 0, lambda s: s is not None):
        chosen = [c for c, s in zip(configs, spills) if keep(s)]
        if chosen:
            return chosen
    return list(configs)


def _prune_configs(kernel, configs, named_args, **kwargs):
    """Autotuner early_config_prune hook: compiles every configuration for the current GPU (the compilations the
    benchmark then reuses) and keeps `usable_configs` of them, from the spill count the driver reports.

    Triton calls it with the launch's positional arguments by name and its keyword arguments, which include the
    launch's grid and warmup flag."""
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError

    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    spills = []
    for config in configs:
        try:
            binary = kernel.warmup(*named_args.values(), grid=(1,), **kwargs, **config.all_kwargs())
            binary._init_handles()  # loads it: raises OutOfResources where shared memory or threads do not fit
            spills.append(binary.n_spills)
        except (OutOfResources, CompileTimeAssertionFailure, PTXASError):
            spills.append(None)
    return usable_configs(configs, spills)


def autotune(configs: list, key: List[str]):
    """triton.autotune(configs, key=key) with `_prune_configs` as its early_config_prune hook. Key on
    `tune_bucket` arguments rather than exact sizes (see the module docstring). A kernel with the fp32 precision
    rule's PRECISION argument must key on it: a config tuned under TF32 would be reused for IEEE fp32, whose FMA
    products spill where tensor-core ones do not.

    Raises:
        ValueError: a kernel with a PRECISION argument that `key` leaves out.
    """
    def decorate(kernel):
        if "PRECISION" in kernel.arg_names and "PRECISION" not in key:
            raise ValueError(f"vitfast: autotuned {kernel.__name__} must key on PRECISION (keys {key})")
        prune = functools.partial(_prune_configs, kernel)
        return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)
    return decorate


@dataclasses.dataclass
class Compilation:
    """One kernel specialization compiled under compile_only."""
    kernel: str
    config: Dict[str, object]  # the constexprs and launch options that select this specialization
    seconds: float
    shared_bytes: int = 0
    registers: int = 0
    spill_bytes: int = 0  # spill stores + loads reported by ptxas
    error: str = ""
    # compiled, but would not load on the target: shared memory beyond it
    problems: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Launch:
    """One kernel launch under compile_only (each config of an autotuned launch counts as one)."""
    compilation: Compilation  # the specialization it compiled, or reused
    # what no config can fix: a grid beyond CUDA's limits, a launch that bypassed `launch` (no device guard)
    problems: List[str]
    # a config of an autotuned launch that the autotuner never picks: it cannot load or it spills while another
    # config does neither (`usable_configs`; Triton's autotuner also skips configs that run out of resources)
    autotuner_skips: bool = False


class CompileLog(list):
    """What compile_only yields: one Compilation per distinct specialization, in order of first compile, and in
    `launches` one Launch per launch, repeats of a specialization included."""

    def __init__(self):
        super().__init__()
        self.launches: List[Launch] = []


class _CompileOnlyDriver:
    """The part of Triton's driver interface that compiling needs: the target, a device key, a stream."""

    sessions = 0

    def __init__(self, gpu: GPU):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", gpu.capability, 32)
        # never a real device index, and new for every session: its in-memory kernel cache starts empty
        _CompileOnlyDriver.sessions += 1
        self.key = f"compile-only-sm{gpu.capability}-{_CompileOnlyDriver.sessions}"

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
    tensors; yields a CompileLog: the Compilation records (one per distinct specialization; an autotuned launch
    compiles all its configs) and the launches.

    Every launch's grid is checked against CUDA's limits, and a launch that does not go through `launch` is
    flagged (Launch.problems). An autotuned launch marks the configs that `usable_configs` leaves out, from the
    ptxas spill counts and the target's shared memory.

    Outputs of the launchers stay uninitialised. A compile error is recorded, not raised, so that one run reports
    every failure.
    """
    global _target
    from triton import knobs

    if _backend.triton_interpret():
        raise RuntimeError("compile_only needs Triton's compiler, but TRITON_INTERPRET=1 made every kernel "
                           "interpreted when it was decorated: run with TRITON_INTERPRET unset")
    from triton.runtime import driver as driver_config
    from triton.runtime.jit import JITFunction

    records = CompileLog()
    by_hash: Dict[str, Compilation] = {}
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def launch_problems(fn, args, grid, kwargs) -> List[str]:
        problems = []
        if _launch_depth == 0:
            problems.append("launched without vitfast.triton.common.launch (no device guard, no grid check)")
        if callable(grid):
            grid = grid(dict(zip(fn.arg_names, args), **kwargs))
        problem = grid_problem(grid)
        if problem is not None:
            problems.append(problem)
        return problems

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
            rec = Compilation(fn.__name__, options, time.perf_counter() - start, error=f"{type(e).__name__}: {where}")
            records.append(rec)
            records.launches.append(Launch(rec, []))
            return None
        rec = by_hash.get(kernel.hash)
        if rec is None:
            ptxas = log.getvalue()
            regs = _PTXAS_USAGE.search(ptxas)
            spills = _PTXAS_SPILLS.search(ptxas)
            meta = kernel.metadata
            rec = Compilation(fn.__name__, dict(options, num_warps=meta.num_warps, num_stages=meta.num_stages),
                              time.perf_counter() - start, meta.shared, int(regs.group(1)) if regs else 0,
                              sum(map(int, spills.groups())) if spills else 0)
            if meta.shared > gpu.max_shared_bytes:
                rec.problems.append(f"shared memory {meta.shared} B > {gpu.max_shared_bytes} B")
            by_hash[kernel.hash] = rec
            records.append(rec)
        if not warmup:
            records.launches.append(Launch(rec, launch_problems(fn, args, grid, kwargs)))
        return kernel

    def compile_every_config(tuner, *args, **kwargs):
        launches = []
        for config in tuner.configs:
            tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            launches.append(records.launches[-1])
        compiled = [launch.compilation for launch in launches]
        chosen = usable_configs(launches, [None if c.error or c.problems else c.spill_bytes for c in compiled])
        for launch in launches:
            launch.autotuner_skips = all(launch is not c for c in chosen)

    saved = driver_config._active, knobs.nvidia.dump_ptxas_log, knobs.cache.dir
    driver_config.set_active(_CompileOnlyDriver(gpu))
    # ptxas prints the register and spill counts only when it runs: an empty on-disk cache for this session, so
    # that each specialization compiles once (later launches of it hit the session's in-memory cache)
    cache_dir = tempfile.mkdtemp(prefix="vitfast-compile-only-")
    knobs.nvidia.dump_ptxas_log, knobs.cache.dir = True, cache_dir
    JITFunction.run, Autotuner.run = compile_launch, compile_every_config
    _target, _backend._triton_compile_only = gpu, True
    try:
        yield records
    finally:
        _target, _backend._triton_compile_only = None, False
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        driver_config._active, knobs.nvidia.dump_ptxas_log, knobs.cache.dir = saved
        shutil.rmtree(cache_dir, ignore_errors=True)
