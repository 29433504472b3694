"""Shared test set-up: Triton runs under its interpreter on machines without a GPU, fixed seeds per test,
the backend cases of each op, and the accuracy rule (README, "Accuracy rule")."""
import atexit
import os
import shutil
import tempfile
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels, i.e. before vitfast.triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile's on-disk caches key a graph on torch and its traced code, not on vitfast's fake implementations: a
# cache left by an older checkout replays the output shapes of the old ones. Each test session gets its own.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="vitfast-test-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import vitfast  # noqa: E402
from vitfast import backend  # noqa: E402

from _optional_libs import apply_torchvision_shim  # noqa: E402

# transformers imports torchvision wherever it is installed (Swin, DETR), so the shim must precede any test.
apply_torchvision_shim()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# vitfast's fp32 products are IEEE fp32 unless torch.backends.cuda.matmul.allow_tf32 (False by default), but PyTorch's
# convolutions follow torch.backends.cudnn.allow_tf32, True by default (README): on a GPU the F.conv2d that the tests
# hold vitfast.patch_embed and patched models to would be TF32 (~1e-3 relative). The tests compare IEEE with IEEE.
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
    vitfast.set_backend(None)


def backend_cases(op: str) -> list:
    """Every (backend, device) that can run `op` on this machine, as pytest params."""
    cases = []
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        for name in backend.BACKENDS:
            if backend._unavailable(op, name, torch.device(device)) is None:
                cases.append(pytest.param(name, device, id=f"{name}-{device}"))
    return cases


# The error floor has two parts, and the larger one applies:
# - a few roundings of the result: _FLOOR_ULPS units of the dtype's epsilon times the result's magnitude (or a
#   magnitude the test gives, e.g. the largest value of the whole case), so that a kernel is not failed for a last-bit
#   difference where plain PyTorch happens to be exact;
# - the rounding of the terms that were summed: _NOISE_FACTOR times `rounding_noise`, how far the float64 result moves
#   when every input is perturbed by one rounding of the accumulation dtype. A gradient that is a sum of large terms
#   that cancel (attention's dS = P * (dP - delta), a bias gradient summed over every window) has a rounding error
#   relative to those terms, not to the small result, and its size depends on the summation order: ATen's CPU
#   kernels sum in another order on AVX2, AVX-512 and the default capability, so plain PyTorch's error alone (the
#   yardstick of the 2x rule) moves with the machine. Perturbing each input by one rounding moves every term by its
#   own magnitude, which is what a blocked, vectorised or split summation costs; 16x leaves room for the rounding of
#   the intermediates (P, dS, partial sums) while staying many orders of magnitude below a real bug.
_FLOOR_ULPS = 8
_NOISE_FACTOR = 16


def _acc_eps(dtype: torch.dtype) -> float:
    """Epsilon of the dtype the kernels accumulate in: float64 for float64, float32 for everything else."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def rounding_noise(fn, inputs, dtype: torch.dtype, draws: int = 8) -> list:
    """How much rounding alone moves each result of `fn`: for each tensor `fn(inputs)` returns, the largest (over its
    elements) root-mean-square change of its float64 value when every floating input is multiplied elementwise by
    (1 + u * eps), u ~ U(-1, 1), with eps that of `dtype`'s accumulation dtype (float32, or float64 for float64),
    over `draws` draws. For one element that is eps / sqrt(3) times the 2-norm of its first-order terms
    (d result / d input_i * input_i): the random-walk size of their rounding errors.

    Args:
        fn: takes the list `inputs` (float64 tensors, None or non-float tensors) and returns a list of tensors.
        inputs: float64 inputs; non-floating tensors and None are passed unchanged.
    """
    eps = _acc_eps(dtype)
    base = fn(inputs)
    gen = torch.Generator().manual_seed(0)
    squares = [torch.zeros_like(b) for b in base]
    for _ in range(draws):
        perturbed = [t * (1 + eps * (2 * torch.rand(t.shape, generator=gen, dtype=t.dtype) - 1)).to(t.device)
                     if t is not None and t.is_floating_point() else t for t in inputs]
        for sq, a, b in zip(squares, fn(perturbed), base):
            sq += (a - b).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).square()  # inf - inf where masked: no rounding
    return [(sq / draws).sqrt().max().item() if sq.numel() else 0.0 for sq in squares]


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, what: str = "output",
                        noise: float = 0.0, scale: float = None):
    """The accuracy rule (README): |kernel - fp64 ref| <= 2 |plain PyTorch in the same dtype - fp64 ref| + a floor: the
    larger of _FLOOR_ULPS ulps of `scale` (default: the reference's largest magnitude, at least 1) and _NOISE_FACTOR x `noise`
    (this result's `rounding_noise`)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == plain.dtype, f"{what}: dtype {out.dtype} != {plain.dtype}"
    if ref64.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref64).abs().max().item()
    plain_err = (plain.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item()) if scale is None else scale
    floor = max(_FLOOR_ULPS * torch.finfo(out.dtype).eps * scale, _NOISE_FACTOR * noise)
    assert err <= 2 * plain_err + floor, (
        f"{what}: max error {err:.3g} > 2 x plain PyTorch's {plain_err:.3g} + {floor:.3g} ({out.dtype})")


def assert_backward_keeps_forward_dtypes(fn, backend: str, device: str):
    """README: backward ops run in the dtypes their forward saved, also when backward() is called inside an autocast
    region (autograd hands the region's state to the backward, whose matmuls would otherwise run in bfloat16). fn(x,
    weight, bias) is a Linear-shaped op (x (6, 32), weight (48, 32), bias (48,), float32)."""
    x = torch.randn(6, 32, device=device, requires_grad=True)
    w = torch.randn(48, 32, device=device, requires_grad=True)
    b = torch.randn(48, device=device, requires_grad=True)
    dy = torch.randn(6, 48, device=device)
    with vitfast.use_backend(backend):
        outside = torch.autograd.grad(fn(x, w, b), (x, w, b), dy)
        y = fn(x, w, b)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            inside = torch.autograd.grad(y, (x, w, b), dy)
    for name, a, c in zip(("dx", "dweight", "dbias"), outside, inside):
        assert c.dtype == torch.float32 and torch.equal(a, c), name


def assert_autocast_follows_linear(fn, reference, **tolerance):
    """Under CPU autocast (bfloat16) fn(x, weight, bias), a Linear-shaped op, casts x, weight and bias as F.linear
    does: it returns bfloat16 and matches reference(nn.Linear module, x) computed in the same region (with
    `tolerance`, assert_close's rtol / atol); gradients reach the float32 leaves."""
    x = torch.randn(3, 10, 32, requires_grad=True)
    lin = torch.nn.Linear(32, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, lin.weight, lin.bias)
        expected = reference(lin, x)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, **tolerance)
    y.float().sum().backward()
    assert x.grad.dtype == lin.weight.grad.dtype == torch.float32 and torch.isfinite(lin.weight.grad).all()


def assert_compiles_like_eager(model: torch.nn.Module, x: torch.Tensor, *args):
    """torch.compile(model, fullgraph=True) runs with no graph break and matches eager: the output of
    model(x, *args) and the gradients of x and of every parameter."""
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True)(x, *args)
    out.sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    torch.testing.assert_close(out, model(x, *args))
    model(x, *args).sum().backward()
    for compiled_grad, eager_grad in zip(grads, [x.grad] + [p.grad for p in model.parameters()]):
        torch.testing.assert_close(compiled_grad, eager_grad)


def assert_trains_like_eager(eager: torch.nn.Module, mine: torch.nn.Module, loss_fn, steps: int, lr: float):
    """A few AdamW steps of each model on the same data (`loss_fn(model)`): the vitfast model's loss falls and
    tracks the eager model's step by step."""
    losses = {}
    for name, model in (("eager", eager), ("vitfast", mine)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        losses[name] = []
        for _ in range(steps):
            loss = loss_fn(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["vitfast"][-1] < losses["vitfast"][0], losses
    torch.testing.assert_close(torch.tensor(losses["vitfast"]), torch.tensor(losses["eager"]), rtol=1e-3, atol=1e-4)
