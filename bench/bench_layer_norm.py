"""LayerNorm: vitfast (each backend) vs F.layer_norm and torch.compile(F.layer_norm), forward and
forward+backward, at ViT hidden sizes (128 images x 197 tokens on a GPU, 64 on a CPU). GB/s counts the minimum
traffic."""
import pytest
import torch
import torch.nn.functional as F

import vitfast

from conftest import DEVICE, ON_GPU, headline, run_benchmark, vitfast_backends

HIDDEN = [192, 384, 768, 1024, 1280] if ON_GPU else [768]
ROWS = (128 if ON_GPU else 64) * 197
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
_compiled = torch.compile(F.layer_norm)
IMPLS = vitfast_backends("layer_norm") + ["torch", "torch.compile"]


def _fn(impl):
    if impl.startswith("vitfast"):
        return lambda x, w, b, dy: vitfast.layer_norm(x, x.shape[-1], w, b, 1e-6)
    ln = _compiled if impl == "torch.compile" else F.layer_norm
    return lambda x, w, b, dy: ln(x, (x.shape[-1],), w, b, 1e-6)


def _inputs(n, grad):
    def make():
        x = torch.randn(ROWS, n, device=DEVICE, dtype=DTYPE, requires_grad=grad)
        w = torch.randn(n, device=DEVICE, dtype=DTYPE, requires_grad=grad)
        b = torch.randn(n, device=DEVICE, dtype=DTYPE, requires_grad=grad)
        return x, w, b, torch.randn_like(x)
    return make


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", headline(HIDDEN, {768}))
def test_forward(benchmark, impl, n):
    fwd = _fn(impl)
    benchmark.group = f"layer_norm fwd ({ROWS}, {n}) {DTYPE}"
    run_benchmark(benchmark, fwd, _inputs(n, False), impl=impl, bytes_moved=2 * ROWS * n * DTYPE.itemsize,
                  reference=_fn("torch"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", headline(HIDDEN, {768}))
def test_forward_backward(benchmark, impl, n):
    benchmark.group = f"layer_norm fwd+bwd ({ROWS}, {n}) {DTYPE}"
    # forward reads x, writes y; backward reads x, dy and writes dx (stats and params are negligible)
    run_benchmark(benchmark, _step(_fn(impl)), _inputs(n, True), impl=impl, bytes_moved=5 * ROWS * n * DTYPE.itemsize,
                  reference=_step(_fn("torch")))


def _step(fwd):
    """fn(x, w, b, dy): the gradients of x, w and b for dy."""
    return lambda x, w, b, dy: torch.autograd.grad(fwd(x, w, b, dy), (x, w, b), dy)
