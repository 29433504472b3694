import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast import backend as vf_backend
from vitfast.ops.linear_gelu import linear_gelu_ref

from conftest import (assert_autocast_follows_linear, assert_backward_keeps_forward_dtypes, assert_close_to_ref,
                      assert_compiles_like_eager, backend_cases, rounding_noise)

CASES = backend_cases("linear_gelu")


def _run(fn, x, w, b, approximate, dy):
    """Output and every gradient of `fn` (vitfast.linear_gelu or the reference), with autograd."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(leaves[0], leaves[1], leaves[2], approximate)
    grads = torch.autograd.grad((y * dy).sum(), [t for t in leaves if t is not None])
    return [y] + list(grads)


def _check(backend, device, shape, K, N, dtype, approximate="none", bias=True, scale=1.0):
    x = torch.randn(*shape, K, dtype=dtype, device=device) * scale
    w = (torch.randn(N, K, dtype=dtype, device=device) * K ** -0.5)
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    dy = torch.randn(*shape, N, dtype=dtype, device=device)
    with vitfast.use_backend(backend):
        got = _run(vitfast.linear_gelu, x, w, b, approximate, dy)
        with torch.no_grad():  # the in-place path: no pre-activation kept
            got_no_grad = vitfast.linear_gelu(x, w, b, approximate)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    ref = _run(linear_gelu_ref, d(x), d(w), d(b), approximate, d(dy))
    noise = rounding_noise(lambda t: _run(linear_gelu_ref, t[0], t[1], t[2], approximate, t[3]),
                           [d(x), d(w), d(b), d(dy)], dtype)
    plain = _run(linear_gelu_ref, x, w, b, approximate, dy)
    names = ["y", "dx", "dweight"] + (["dbias"] if bias else [])
    assert len(got) == len(ref) == len(names)
    for nm, g, rf, p, n in zip(names, got, ref, plain, noise):
        assert_close_to_ref(g, rf, p, f"{backend} {nm}", noise=n)
    assert_close_to_ref(got_no_grad, ref[0], plain[0], f"{backend} y without grad", noise=noise[0])
    assert got[0].is_contiguous() and got_no_grad.shape == got[0].shape


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape,K,N", [((1,), 1, 1), ((3,), 7, 5), ((2, 49), 96, 384), ((197,), 64, 131),
                                       ((2, 3, 5), 40, 24)])
def test_matches_fp64(backend, device, dtype, approximate, shape, K, N):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32, float16, bfloat16 (float64 goes to another backend)")
    if backend == "onednn" and dtype != torch.float32:
        pytest.skip("the onednn backend takes float32 (other dtypes go to another backend)")
    _check(backend, device, shape, K, N, dtype, approximate)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_no_bias_and_wide_range(backend, device, approximate):
    """No bias, and pre-activations from about -60 to 60: GELU's far negative tail (erfc ~ 1e-300 in float64, 0 or
    a denormal in float32) and its linear positive side, where an exp overflow or 1 - erf cancellation would show."""
    _check(backend, device, (3, 17), 48, 80, torch.float32, approximate, bias=False, scale=8.0)
    _check(backend, device, (33,), 48, 40, torch.float32, approximate, bias=True, scale=8.0)


@pytest.mark.parametrize("backend,device", CASES)
def test_no_grad_output_equals_the_grad_path_and_inputs_are_untouched(backend, device):
    """The no-grad call writes GELU over its own GEMM output, never over an input; it gives what the autograd path
    gives, and NaN stays NaN in its row only."""
    x = torch.randn(5, 24, device=device)
    x[2, 3] = float("nan")
    w, b = torch.randn(16, 24, device=device), torch.randn(16, device=device)
    saved = [t.clone() for t in (x, w, b)]
    with vitfast.use_backend(backend):
        with torch.no_grad():
            y0 = vitfast.linear_gelu(x, w, b)
        y1 = vitfast.linear_gelu(x, w.clone().requires_grad_(), b)
    for t, s in zip((x, w, b), saved):
        assert torch.equal(t.nan_to_num(), s.nan_to_num()) and torch.equal(t.isnan(), s.isnan())
    assert torch.equal(y0.nan_to_num(), y1.detach().nan_to_num())
    rows = torch.arange(5, device=device) != 2
    assert y0[2].isnan().all() and not y0[rows].isnan().any()
    torch.testing.assert_close(y0[rows], F.gelu(F.linear(x[rows], w, b)))


@pytest.mark.parametrize("backend,device", CASES)
def test_bias_changed_in_place_before_backward(backend, device):
    """A bias updated in place between forward and backward (an optimizer step of one part of a model before the
    backward of another): F.gelu(F.linear(...)) does not save the bias, so its backward runs; so does linear_gelu's
    (it saved the bias and failed autograd's version check), with the same gradients."""
    x = torch.randn(5, 8, device=device, requires_grad=True)
    w = torch.randn(6, 8, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    dy = torch.randn(5, 6, device=device)
    grads = []
    for fn in (lambda: F.gelu(F.linear(x, w, b)), lambda: vitfast.linear_gelu(x, w, b)):
        with vitfast.use_backend(backend):
            y = fn()
        with torch.no_grad():
            b.add_(1.0)
        grads.append(torch.autograd.grad(y, (x, w, b), dy))
        with torch.no_grad():
            b.sub_(1.0)
    torch.testing.assert_close(grads[1], grads[0])


def test_bad_inputs_raise_clear_errors():
    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    with pytest.raises(ValueError, match=r"weight must be \(N, 8\) for x of shape \(4, 8\), got \(6, 7\)"):
        vitfast.linear_gelu(x, torch.randn(6, 7))
    with pytest.raises(ValueError, match=r"bias must be \(6,\) for weight \(6, 8\), got \(5,\)"):
        vitfast.linear_gelu(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="approximate must be one of.*'erf'"):
        vitfast.linear_gelu(x, w, b, approximate="erf")
    with pytest.raises(ValueError, match="floating-point"):
        vitfast.linear_gelu(torch.ones(4, 8, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="one device.*x torch.float32 cpu, weight torch.float16 cpu"):
        vitfast.linear_gelu(x, w.half(), b)
    with pytest.raises(ValueError, match="one device.*meta"):
        vitfast.linear_gelu(x, w, torch.randn(6, device="meta"))


def test_autocast_follows_linear():
    assert_autocast_follows_linear(vitfast.linear_gelu, lambda lin, x: F.gelu(lin(x)), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend,device", CASES)
def test_backward_inside_autocast_keeps_the_forward_dtypes(backend, device):
    assert_backward_keeps_forward_dtypes(vitfast.linear_gelu, backend, device)


def test_opcheck():
    x = torch.randn(6, 32, requires_grad=True)
    w = torch.randn(20, 32, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    x0 = torch.randn(0, 32, requires_grad=True)  # no rows: without save_preact h must still be recomputed
    frozen = torch.nn.Parameter(torch.randn(20, 32), requires_grad=False)
    for args in [(x, w, b, "none", True, False), (x, w, None, "tanh", True, False), (x, w, b, "none", False, False),
                 (x0, w, b, "none", False, False), (x0, w, b, "tanh", True, False),
                 (x, frozen, b, "none", False, True)]:
        torch.library.opcheck(torch.ops.vitfast.linear_gelu.default, args)


def test_torch_compile_fullgraph():
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(24, 64)
            self.fc2 = torch.nn.Linear(64, 24)

        def forward(self, x):
            return self.fc2(vitfast.linear_gelu(x, self.fc1.weight, self.fc1.bias))

    assert_compiles_like_eager(Mlp(), torch.randn(2, 5, 24, requires_grad=True))


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_extreme_values_as_aten(backend, device, approximate):
    """Pre-activations from -inf to inf, NaN among them, 16 output columns (the vector path of the C++ kernel): the
    float64 GELU rounded to float32 (-0 far left, h far right, never an overflow to inf), inf at inf, NaN for NaN and
    -inf (-inf * 0). ATen's float32 F.gelu is no reference at inf, where it depends on the CPU: NaN on this project's
    AVX-512 machines whatever ATEN_CPU_CAPABILITY says (inf for a one-element tensor), inf on its AVX2
    ones; the torch backend, which is that F.gelu, is checked everywhere else."""
    h = torch.tensor([-float("inf"), -1e38, -1e30, -1e4, -100.0, -10.0, -3.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 3.0, 10.0,
                      100.0, 1e4, 1e30, 1e38, float("inf"), float("nan")], device=device)
    w = torch.ones(16, 1, device=device)
    with vitfast.use_backend(backend):
        y = vitfast.linear_gelu(h[:, None], w, None, approximate)
    expected = F.gelu(h.double(), approximate=approximate).float()
    expected[h == float("inf")], expected[h == -float("inf")], expected[h.isnan()] = float("inf"), math.nan, math.nan
    expected = expected[:, None].expand(-1, 16)
    if backend in ("torch", "onednn"):  # (oneDNN's GELU, like F.gelu here, gives NaN at +inf)
        y, expected = y[h != float("inf")], expected[h != float("inf")]
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_inner_dim_gives_gelu_of_the_bias(backend, device):
    b = torch.randn(24, device=device)
    with vitfast.use_backend(backend):
        y = vitfast.linear_gelu(torch.randn(4, 0, device=device), torch.randn(24, 0, device=device), b)
        empty = vitfast.linear_gelu(torch.randn(0, 3, 8, device=device), torch.randn(24, 8, device=device), b)
    torch.testing.assert_close(y, F.gelu(b).expand(4, 24))
    assert empty.shape == (0, 3, 24)


@pytest.mark.skipif(vf_backend.why_not("linear_gelu", "onednn", torch.ones(1, 1), torch.ones(1, 1)) is not None,
                    reason="PyTorch without oneDNN")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_automatic_choice_fuses_on_onednn(monkeypatch, approximate):
    """Without grad the automatic choice runs oneDNN with GELU in the product's epilogue where vitfast.linear's rule
    says oneDNN pays, with the plain weight and prepacked, the cpp kernel below it; each within the float32 rule of
    the float64 reference."""
    from vitfast.ops import linear as vl

    calls = []
    real = vl.onednn_linear
    monkeypatch.setattr(vl, "onednn_linear", lambda *a, **k: calls.append((a[0].shape, k.get("gelu"))) or real(*a, **k))
    for (M, fused), prepack in itertools.product(((256, True), (8, False)), (False, True)):  # 50M, 1.6M mul-adds
        fc1 = torch.nn.Linear(384, 512)
        x = torch.randn(M, 384)
        calls.clear()
        with torch.no_grad():
            y = vitfast.linear_gelu(x, fc1.weight, fc1.bias, approximate, prepack=prepack)
            ref = linear_gelu_ref(x.double(), fc1.weight.double(), fc1.bias.double(), approximate)
            assert_close_to_ref(y, ref, linear_gelu_ref(x, fc1.weight, fc1.bias, approximate), f"M={M}")
        assert calls == ([((M, 384), approximate)] if fused else [])
