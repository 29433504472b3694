"""Shared benchmark helpers: device, input rotation, synchronized timing and the extra_info fields, SDPA forced onto
one of its backends, and the `headline` marker.

On a GPU the real model shapes run; on a CPU only the smallest shapes run, so CI proves the suite works. The
benchmarks marked `headline` (`pytest bench -m headline`) are the ones bench/gpu_run.sh runs in its short GPU
window; on a CPU their tiny stand-ins carry the mark, so that `bash bench/gpu_run.sh --dry-run` selects the same
tests.
"""
import functools
import importlib
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import vitfast
from vitfast import backend
from vitfast.report import interleaved

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
_TRITON_VERSION = importlib.import_module("triton").__version__ if backend.has_triton() else None  # (with each result)


def env_flag(name: str, default: bool = False) -> bool:
    """An on/off environment variable of the benchmarks: "1" on, "0" off, unset or "" the default; anything else an
    error (a "yes" read as off would time the tiny models while the user thinks the real ones ran)."""
    value = os.environ.get(name) or ("1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 1 (on) or 0 (off)")
    return value == "1"


def env_count(name: str, default: int) -> int:
    """A positive whole-number environment variable of the benchmarks (default where unset or empty)."""
    value = os.environ.get(name) or str(default)
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise ValueError(f"{name}={value!r}: expected a whole number of at least 1")
    return int(value)


SDPA = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}


def headline(names, chosen) -> list:
    """`names` as pytest params, those in `chosen` marked `headline`."""
    return [pytest.param(n, marks=pytest.mark.headline, id=str(n)) if n in chosen else n for n in names]


def linear_cases(shapes: dict, batches: tuple, chosen: str) -> list:
    """"<name> B=<batch>" for each Linear shape (name -> (tokens per image, K, N)) and batch, as pytest params, the
    `chosen` one marked `headline` (bench_linear.py, bench_linear_gelu.py)."""
    return headline([f"{name} B={b}" for name in shapes for b in batches], {chosen})


def run_linear_benchmark(benchmark, op: str, fn, impl: str, case: str, shapes: dict, dtype: torch.dtype, grad: bool,
                         reference, outputs: int = 1) -> None:
    """Times fn(x, weight, bias), a Linear-shaped op (bench_linear.py, bench_linear_gelu.py), on a linear_cases
    case (M = tokens per image x batch): x (M, K), weight (N, K) scaled by K**-0.5, bias (N,), on DEVICE in `dtype`.
    Without grad the forward under torch.no_grad (2 M K N flops; bytes: x, weight and `outputs` (M, N) tensors),
    with grad forward + backward to x, weight and bias (6 M K N flops). `reference(x, weight, bias)`: the eager code
    its output and gradients are checked against (`check_accuracy`)."""
    name, batch = case.split(" B=")
    tokens, K, N = shapes[name]
    M = tokens * int(batch)

    def make():
        x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=grad)
        w = (torch.randn(N, K, device=DEVICE, dtype=dtype) * K ** -0.5).requires_grad_(grad)
        b = torch.randn(N, device=DEVICE, dtype=dtype, requires_grad=grad)
        return x, w, b

    def step(f):
        def run(x, w, b):
            y = f(x, w, b)
            return torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
        return run

    def fwd(f):
        def run(x, w, b):
            with torch.no_grad():
                return f(x, w, b)
        return run

    benchmark.group = f"{op} {'fwd+bwd' if grad else 'fwd'} {case} ({M}x{K} -> {N}) {dtype}"
    if grad:
        run_benchmark(benchmark, step(fn), make, impl=impl, flops=6 * M * K * N, reference=step(reference))
    else:
        run_benchmark(benchmark, fwd(fn), make, impl=impl, flops=2 * M * K * N,
                      bytes_moved=(M * K + N * K + outputs * M * N) * dtype.itemsize, reference=fwd(reference))


def sdpa(impl: str):
    """F.scaled_dot_product_attention(q, k, v, mask, is_causal) forced onto the backend `impl` names, or None and
    the reason it cannot run here."""
    if not ON_GPU and impl in ("sdpa-efficient", "sdpa-cudnn"):
        return None, f"{impl} has no CPU kernel"

    def fn(q, k, v, mask=None, is_causal=False):
        with sdpa_kernel(SDPA[impl]):
            return F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal)
    return fn, None


def skip_unless_it_runs(impl: str, fn, inputs: tuple, what: str) -> None:
    """Skips the benchmark when `fn(*inputs)` raises (an SDPA backend that does not take the mask, head dim, dtype)."""
    try:
        fn(*inputs)
    except RuntimeError as e:
        pytest.skip(f"{impl} does not take {what}: {str(e).splitlines()[0][:200]}")


_best_sdpa: dict = {}  # benchmark group -> best SDPA mean time (s) so far in the session


def mean_seconds(benchmark) -> float:
    """The mean time of the benchmark just run; skips the test where pytest-benchmark timed nothing (it is disabled by
    --benchmark-disable and under pytest-xdist: the function then ran once, untimed)."""
    if benchmark.stats is None:
        pytest.skip("pytest-benchmark is disabled (--benchmark-disable or pytest-xdist): ran once, not timed")
    return benchmark.stats.stats.mean


def record_vs_best_sdpa(benchmark, impl: str) -> None:
    """After a run: an SDPA row updates its group's best SDPA time; a vitfast row of a group whose SDPA rows ran
    earlier in the session gets extra_info["vs_best_sdpa"] = best SDPA mean / its mean (> 1: vitfast faster)."""
    group, mean = benchmark.group, mean_seconds(benchmark)
    if impl in SDPA:
        _best_sdpa[group] = min(_best_sdpa.get(group, math.inf), mean)
    elif impl.startswith("vitfast") and group in _best_sdpa:
        benchmark.extra_info["vs_best_sdpa"] = _best_sdpa[group] / mean


def vitfast_backends(op: str) -> list:
    """The non-reference vitfast backends that can run `op` here, as benchmark implementation ids; not triton on a
    CPU, which only Triton's interpreter runs (TRITON_INTERPRET=1: minutes a call at these sizes, and no measure of
    the kernels), as the main job leaves it out."""
    dev = torch.device(DEVICE)
    return [f"vitfast-{b}" for b in backend.BACKENDS if b != "torch" and not (b == "triton" and dev.type == "cpu")
            and backend._unavailable(op, b, dev) is None]


def _best_seconds(fn, reps: int = 5) -> float:
    return min(interleaved([fn], reps, DEVICE)[0])


@functools.lru_cache(None)
def machine_peaks() -> dict:
    """This device's measured ceilings, once per session: copy bandwidth (read + write bytes of a large
    tensor copy) and matmul throughput (bf16 on a GPU, fp32 on a CPU). They set each benchmark's floor."""
    n = 2**28 if ON_GPU else 2**26  # bytes per copy buffer: 256 MiB on a GPU, 64 MiB on a CPU
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    bandwidth = 2 * n / _best_seconds(lambda: dst.copy_(src))
    m, dtype = (8192, torch.bfloat16) if ON_GPU else (1024, torch.float32)
    a = torch.randn(m, m, device=DEVICE, dtype=dtype)
    b = torch.randn(m, m, device=DEVICE, dtype=dtype)
    flops = 2 * m**3 / _best_seconds(lambda: a @ b)
    return {"peak_GB/s": bandwidth / 1e9, "peak_TFLOP/s": flops / 1e12}


def floating_tensors(out) -> list:
    """The floating-point tensors of an output (a tensor, or tuples, lists, dicts, named tuples and ModelOutputs of
    them), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):  # (transformers' ModelOutput is an OrderedDict)
        out = list(out.values())
    return [t for o in out for t in floating_tensors(o)] if isinstance(out, (list, tuple)) else []


def as_float64(inputs: tuple) -> tuple:
    """The inputs with each floating-point tensor as a float64 leaf (requires_grad kept); the others as they are."""
    return tuple(t.detach().double().requires_grad_(t.requires_grad)
                 if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


def check_accuracy(benchmark, impl: str, out, inputs: tuple, reference, baseline=None, prefix: str = "") -> None:
    """Checks the output of the benchmark's function, `out` (output or gradients) for `inputs`, against
    `reference(*as_float64(inputs))`, float64: each tensor's max abs error may be at most 2x
    that of `baseline(*inputs)` (default: `reference`, i.e. the eager code in the benchmark's dtype) plus 8 units of
    its dtype's epsilon times the reference's largest magnitude (at least 1), the main job's rule. extra_info gets
    `max_err` and `baseline_max_err` (worst over the tensors) and `err_over_bound` (the largest error / bound: at most
    1 where the rule holds, NaN for a NaN error), each key after `prefix`; a vitfast row that breaks the rule fails,
    another library's row records it."""
    outs = floating_tensors(out)
    refs = [r.detach().double() for r in floating_tensors(reference(*as_float64(inputs)))]
    bases = floating_tensors((baseline or reference)(*inputs))
    if not (len(outs) == len(refs) == len(bases)) or any(o.shape != r.shape for o, r in zip(outs, refs)):
        raise AssertionError(f"{impl}: outputs {[tuple(o.shape) for o in outs]}, reference "
                             f"{[tuple(r.shape) for r in refs]}, baseline {[tuple(b.shape) for b in bases]}")
    errs = [(o.detach().double() - r).abs().max().item() if r.numel() else 0.0 for o, r in zip(outs, refs)]
    base_errs = [(b.detach().double() - r).abs().max().item() if r.numel() else 0.0 for b, r in zip(bases, refs)]
    bounds = [2 * b + 8 * torch.finfo(o.dtype).eps * max(1.0, r.abs().max().item() if r.numel() else 0.0)
              for o, b, r in zip(outs, base_errs, refs)]
    ratios = [e / bound for e, bound in zip(errs, bounds)]
    worst = math.nan if any(math.isnan(r) for r in ratios) else max(ratios, default=0.0)
    benchmark.extra_info.update({f"{prefix}max_err": max(errs, default=0.0), f"{prefix}err_over_bound": worst,
                                 f"{prefix}baseline_max_err": max(base_errs, default=0.0)})
    if not worst <= 1.0 and impl.startswith("vitfast"):
        pytest.fail(f"{impl}: max abs errors {errs} against float64 exceed 2x the baseline's {base_errs} plus 8 "
                    f"eps x scale (bounds {bounds})")


def run_benchmark(benchmark, fn, make_inputs, *, impl: str, bytes_moved: int = 0, flops: int = 0, rotate: int = 3,
                  reference=None, baseline=None):
    """Times `fn(*inputs)` with a pool of `rotate` input sets used in turn, so that caches do not flatter.

    A "vitfast-<backend>[-<variant>]" impl forces that backend. GB/s and TFLOP/s go into extra_info, and the
    roofline floor: max(bytes / measured bandwidth, FLOPs / measured matmul peak), the least time the work can take.
    With `reference` (the eager code, run on the inputs in float64; `baseline`, if given, in the benchmark's dtype in
    its place) the warm-up call's output is checked after the timing (`check_accuracy`: a wrong vitfast row fails,
    its time recorded with its error).
    """
    pool = [make_inputs() for _ in range(rotate)]
    cycle = itertools.cycle(pool)
    forced = impl.split("-")[1] if impl.startswith("vitfast-") else None

    def call():
        out = fn(*next(cycle))
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    with vitfast.use_backend(forced or "auto"):
        out = call()  # warm-up: compilation and autotuning stay out of the timing (pool[0]'s output)
        if ON_GPU:
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()  # the input pool (three input sets) and what the warm-up cached
        benchmark.pedantic(call, rounds=20 if ON_GPU else 3, iterations=1, warmup_rounds=2 if ON_GPU else 0)
    mean = mean_seconds(benchmark)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if ON_GPU else "cpu", impl=impl,
                                torch=torch.__version__, cuda=torch.version.cuda, triton=_TRITON_VERSION)
    if bytes_moved:
        benchmark.extra_info["GB/s"] = bytes_moved / mean / 1e9
    if flops:
        benchmark.extra_info["TFLOP/s"] = flops / mean / 1e12
    if bytes_moved or flops:
        peaks = machine_peaks()
        benchmark.extra_info.update(peaks)
        benchmark.extra_info["floor_ms"] = 1e3 * max(bytes_moved / (peaks["peak_GB/s"] * 1e9),
                                                     flops / (peaks["peak_TFLOP/s"] * 1e12))
    if ON_GPU:  # the implementation's own peak: allocated memory above what was held before the timed calls
        benchmark.extra_info["peak_MiB_above_inputs"] = (torch.cuda.max_memory_allocated() - held) / 2**20
    if reference is not None:
        check_accuracy(benchmark, impl, out, pool[0], reference, baseline)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
