"""Shared test set-up: Triton runs under its interpreter on machines without a GPU, fixed seeds per test,
the backend cases of each op, and the accuracy rule of DESIGN.md."""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels, i.e. before vitfast.triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vitfast  # noqa: E402
from vitfast import backend  # noqa: E402

from _optional_libs import apply_torchvision_shim  # noqa: E402

# transformers imports torchvision wherever it is installed (Swin, DETR), so the shim must precede any test.
apply_torchvision_shim()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


# Smallest error floor, in units of the dtype's epsilon times the reference's magnitude, so that a kernel is
# not failed for a difference of a few roundings where plain PyTorch happens to be exact.
_FLOOR_ULPS = 8


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, what: str = "output"):
    """DESIGN.md's rule: |kernel - fp64 ref| <= 2 |plain PyTorch in the same dtype - fp64 ref| (+ a floor)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == plain.dtype, f"{what}: dtype {out.dtype} != {plain.dtype}"
    if ref64.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref64).abs().max().item()
    plain_err = (plain.double() - ref64).abs().max().item()
    floor = _FLOOR_ULPS * torch.finfo(out.dtype).eps * max(1.0, ref64.abs().max().item())
    assert err <= 2 * plain_err + floor, (
        f"{what}: max error {err:.3g} > 2 x plain PyTorch's {plain_err:.3g} + {floor:.3g} ({out.dtype})")


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
