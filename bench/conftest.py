"""Shared benchmark helpers: device, input rotation, synchronized timing and the extra_info fields.

On a GPU the real model shapes run; on a CPU only the smallest shapes run, so CI proves the suite works.
"""
import itertools

import pytest
import torch

import vitfast
from vitfast import backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def vitfast_backends(op: str) -> list:
    """The non-reference vitfast backends that can run `op` here, as benchmark implementation ids."""
    dev = torch.device(DEVICE)
    return [f"vitfast-{b}" for b in backend.BACKENDS if b != "torch" and backend._unavailable(op, b, dev) is None]


def run_benchmark(benchmark, fn, make_inputs, *, impl: str, bytes_moved: int = 0, flops: int = 0, rotate: int = 3):
    """Times `fn(*inputs)` with a pool of `rotate` input sets used in turn, so that caches do not flatter.

    A "vitfast-<backend>" impl forces that backend. GB/s and TFLOP/s go into extra_info.
    """
    pool = [make_inputs() for _ in range(rotate)]
    cycle = itertools.cycle(pool)
    forced = impl.split("-", 1)[1] if impl.startswith("vitfast-") else None

    def call():
        out = fn(*next(cycle))
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    with vitfast.use_backend(forced or "auto"):
        call()  # warm-up: compilation and autotuning stay out of the timing
        if ON_GPU:
            torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(call, rounds=20 if ON_GPU else 3, iterations=1, warmup_rounds=2 if ON_GPU else 0)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if ON_GPU else "cpu", impl=impl,
                                torch=torch.__version__)
    if bytes_moved:
        benchmark.extra_info["GB/s"] = bytes_moved / mean / 1e9
    if flops:
        benchmark.extra_info["TFLOP/s"] = flops / mean / 1e12
    if ON_GPU:
        benchmark.extra_info["peak_mem_MiB"] = torch.cuda.max_memory_allocated() / 2**20


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
