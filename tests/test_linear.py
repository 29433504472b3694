"""vitfast.linear: outputs and every gradient against float64 on each backend (onednn: float32 CPU; torch: every
dtype and device), odd shapes and strides, the backend rule, autocast, opcheck and torch.compile."""
import weakref

import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast import backend as vf_backend
from vitfast.ops.linear import linear_ref

from conftest import (DEVICE, assert_autocast_follows_linear, assert_backward_keeps_forward_dtypes, assert_close_to_ref,
                      assert_compiles_like_eager, backend_cases, rounding_noise)

# (a forced triton backend, which the interpreter offers every op on CPU tensors, leaves linear's choice automatic)
CASES = [case for case in backend_cases("linear") if case.values[0] in ("onednn", "torch")]
ONEDNN = vf_backend._unavailable("linear", "onednn", torch.device("cpu")) is None
AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")  # (ATen's, ATEN_CPU_CAPABILITY included)


def _run(fn, x, w, b, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    grads = torch.autograd.grad((y * dy).sum(), [t for t in leaves if t is not None])
    return [y] + list(grads)


def _check(backend, device, x, w, b, dtype):
    dy = torch.randn(*x.shape[:-1], w.shape[0], dtype=dtype, device=device)
    with vitfast.use_backend(backend):
        got = _run(vitfast.linear, x, w, b, dy)
        with torch.inference_mode():
            got_inference = vitfast.linear(x, w, b)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    ref = _run(linear_ref, d(x), d(w), d(b), d(dy))
    noise = rounding_noise(lambda t: _run(linear_ref, *t), [d(x), d(w), d(b), d(dy)], dtype)
    plain = _run(linear_ref, x, w, b, dy)
    names = ["y", "dx", "dweight"] + (["dbias"] if b is not None else [])
    assert len(got) == len(ref) == len(names)
    for nm, g, rf, p, n in zip(names, got, ref, plain, noise):
        assert_close_to_ref(g, rf, p, f"{backend} {nm}", noise=n)
    assert torch.equal(got_inference, got[0].detach())
    assert got[0].is_contiguous()


def _skip_dtype(backend, dtype):
    if backend == "onednn" and dtype != torch.float32:
        pytest.skip("the onednn backend takes float32 (other dtypes go to the torch backend)")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,K,N,bias", [((1,), 1, 1, True), ((3,), 7, 5, False), ((2, 49), 96, 288, True),
                                            ((197,), 768, 131, True), ((2, 3, 5), 40, 24, False)])
def test_matches_fp64(backend, device, dtype, shape, K, N, bias):
    _skip_dtype(backend, dtype)
    x = torch.randn(*shape, K, dtype=dtype, device=device)
    w = torch.randn(N, K, dtype=dtype, device=device) * K ** -0.5
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    _check(backend, device, x, w, b, dtype)


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_inputs(backend, device):
    """A transposed x, a weight that is a column slice of a wider one, a bias read with a stride: the results of
    contiguous copies."""
    x = torch.randn(33, 2, 24, device=device).transpose(0, 1)  # (2, 33, 24), not contiguous
    w = torch.randn(40, 48, device=device)[:, ::2] * 0.2  # (40, 24), strides (48, 2)
    b = torch.randn(80, device=device)[::2]
    _check(backend, device, x, w, b, torch.float32)


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_and_degenerate_shapes(backend, device):
    """No rows gives (0, N) and zero gradients; an empty inner dim K = 0 gives the bias (the onednn backend, which
    has no primitive for it, hands it to F.linear when not forced); N = 0 gives (M, 0)."""
    w, b = torch.randn(6, 8, device=device), torch.randn(6, device=device)
    with vitfast.use_backend("torch" if backend == "onednn" else backend):
        y = vitfast.linear(torch.randn(3, 0, device=device), torch.randn(6, 0, device=device), b)
    torch.testing.assert_close(y, b.expand(3, 6))
    with vitfast.use_backend(backend):
        x0 = torch.randn(0, 4, 8, device=device, requires_grad=True)
        y0 = vitfast.linear(x0, w.requires_grad_(), b)
        assert y0.shape == (0, 4, 6)
        y0.sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w)) and x0.grad.shape == x0.shape
        x5 = torch.randn(5, 8, device=device, requires_grad=True)
        y5 = vitfast.linear(x5, torch.randn(0, 8, device=device))
        assert y5.shape == (5, 0)
        y5.sum().backward()  # (dx: a product of an empty inner dim, which forced onednn refused)
        assert torch.equal(x5.grad, torch.zeros_like(x5))
    assert vitfast.linear(torch.randn(3, 0, device=device), torch.randn(6, 0, device=device)).shape == (3, 6)


@pytest.mark.skipif(not ONEDNN, reason="PyTorch without oneDNN")
def test_backend_rule():
    """float32 CPU tensors take onednn; float64 and (under autocast) bfloat16 take torch; forcing onednn on what it
    cannot take raises naming the dtype; forcing one of vitfast's kernel backends (which a GEMM has none of) leaves
    the automatic choice; switching oneDNN off in PyTorch is obeyed."""
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert vf_backend.why_not("linear", "onednn", x, w) is None
    assert "float64" in vf_backend.why_not("linear", "onednn", x.double(), w.double())
    assert "K = 0" in vf_backend.why_not("linear", "onednn", torch.randn(4, 0), torch.randn(6, 0))
    with vitfast.use_backend("onednn"):
        with pytest.raises(ValueError, match=r"linear: no backend can take inputs.*float64.*onednn: dtype"):
            vitfast.linear(x.double(), w.double())
    with torch.backends.mkldnn.flags(enabled=False):
        assert "torch.backends.mkldnn.enabled" in vf_backend.why_not("linear", "onednn", x, w)
        with vitfast.use_backend("onednn"), pytest.raises(ValueError, match="mkldnn.enabled is False"):
            vitfast.linear(x, w)
    auto = [vitfast.choose_backend("linear", *t) for t in ((x, w), (x.double(), w.double()))]
    for forced in ("cpp", "triton", "cuda"):  # (choose_backend said no backend could take them)
        with vitfast.use_backend(forced):
            torch.testing.assert_close(vitfast.linear(x, w), F.linear(x, w))
            assert [vitfast.choose_backend("linear", *t) for t in ((x, w), (x.double(), w.double()))] == auto


@pytest.mark.skipif(not ONEDNN, reason="PyTorch without oneDNN")
@pytest.mark.parametrize("M,K,N,without_grad,with_grad", [
    (256, 384, 384, True, False), (100, 768, 3072, True, True), (64, 768, 768, True, True),
    (227, 384, 384, False, False), (4096, 256, 1024, AVX512, False), (4096, 1024, 128, AVX512, False),
    (3136, 96, 288, AVX512, False), (3136, 96, 96, False, False)])
def test_automatic_choice_takes_onednn_where_it_pays(monkeypatch, M, K, N, without_grad, with_grad):
    """The automatic choice runs oneDNN for float32 products of M K N >= 2**25 (without grad any K and N on an
    AVX-512 CPU, K, N >= 384 below it; K, N >= 768 where autograd records the call), F.linear for the others
    (ops/linear.py's measurements); with grad the backward's dx = dy W (K and N swapped) takes the same path."""
    from vitfast.ops import linear as vl

    calls = []
    real = vl.onednn_linear
    monkeypatch.setattr(vl, "onednn_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(M, K, requires_grad=True)
    w = (torch.randn(N, K) * K ** -0.5).requires_grad_()
    with torch.no_grad():
        torch.testing.assert_close(vitfast.linear(x, w), F.linear(x, w))
    assert calls == ([(M, K)] if without_grad else [])
    calls.clear()
    y = vitfast.linear(x, w)
    y.backward(torch.ones_like(y))
    assert calls == ([(M, K), (M, N)] if with_grad else [])
    assert (vl.onednn_pays(M, K, N), vl.onednn_pays(M, K, N, "grad")) == (without_grad, with_grad)
    torch.testing.assert_close(y, F.linear(x, w))
    torch.testing.assert_close(x.grad, torch.ones(M, N) @ w.detach(), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not ONEDNN, reason="PyTorch without oneDNN")
@pytest.mark.parametrize("M,K,N,expected", [(3136, 96, 288, True), (25088, 96, 96, True), (197, 384, 384, False)])
def test_automatic_choice_with_a_prepacked_parameter(monkeypatch, M, K, N, expected):
    """Without grad and with prepack=True, an nn.Parameter weight takes oneDNN for every product of M K N >= 2**25,
    small K or N included."""
    from vitfast.ops import linear as vl

    calls = []
    real = vl.onednn_linear
    monkeypatch.setattr(vl, "onednn_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    lin = torch.nn.Linear(K, N)
    x = torch.randn(M, K)
    with torch.no_grad():
        torch.testing.assert_close(vitfast.linear(x, lin.weight, lin.bias, prepack=True), lin(x), rtol=1e-5,
                                   atol=1e-4)
    assert calls == ([(M, K)] if expected else []) and vl.onednn_pays(M, K, N, "prepacked") == expected


def test_bad_inputs_raise_clear_errors():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"linear: weight must be \(N, 8\) for x of shape \(4, 8\), got \(6, 7\)"):
        vitfast.linear(x, torch.randn(6, 7))
    with pytest.raises(ValueError, match=r"bias must be \(6,\) for weight \(6, 8\), got \(5,\)"):
        vitfast.linear(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="floating-point"):
        vitfast.linear(torch.ones(4, 8, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="one device.*x torch.float32 cpu, weight torch.float16 cpu"):
        vitfast.linear(x, w.half())
    with pytest.raises(ValueError, match="one device.*meta"):
        vitfast.linear(x, w, torch.randn(6, device="meta"))


def test_jagged_nested_tensors_run_f_linear():
    """A jagged nested tensor (nn.Linear takes one) runs F.linear: the rule's product of its ragged size raised
    "ge: relation is indeterminate", also in a patched nn.Linear."""
    layer = torch.nn.Linear(384, 1536)
    nt = torch.nested.nested_tensor([torch.randn(60, 384), torch.randn(76, 384)], layout=torch.jagged)
    with torch.no_grad():
        want = torch.cat(layer(nt).unbind())
        got = torch.cat(vitfast.linear(nt, layer.weight, layer.bias).unbind())
        vitfast.patch_model(layer)
        patched = torch.cat(layer(nt).unbind())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(patched, want, rtol=0, atol=0)


def test_autocast_follows_linear():
    assert_autocast_follows_linear(vitfast.linear, lambda lin, x: lin(x))


@pytest.mark.parametrize("backend,device", CASES)
def test_backward_inside_autocast_keeps_the_forward_dtypes(backend, device):
    assert_backward_keeps_forward_dtypes(vitfast.linear, backend, device)


def test_opcheck():
    x = torch.randn(6, 32, requires_grad=True)
    w = torch.randn(20, 32, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    frozen = torch.nn.Parameter(torch.randn(20, 32), requires_grad=False)
    for args in [(x, w, b, False), (x, w, None, False), (torch.randn(0, 32, requires_grad=True), w, b, False),
                 (x.double(), w.double(), None, False), (x, frozen, b, True)]:
        torch.library.opcheck(torch.ops.vitfast.linear.default, args)


def test_torch_compile_fullgraph():
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(24, 64)
            self.fc2 = torch.nn.Linear(64, 24)

        def forward(self, x):
            return vitfast.linear(F.gelu(vitfast.linear(x, self.fc1.weight, self.fc1.bias)), self.fc2.weight,
                                  self.fc2.bias)

    assert_compiles_like_eager(Mlp().to(DEVICE), torch.randn(2, 5, 24, device=DEVICE, requires_grad=True))


@pytest.mark.skipif(not ONEDNN, reason="PyTorch without oneDNN")
def test_prepacked_weight_follows_new_storage_at_the_old_address():
    """`w.data = new` where the allocator gives the new storage the old one's address (small weights: glibc reuses
    the freed block): the cache holds the storage it packed, so no new one can take that address; with the version
    and data pointer alone as its key, the old copy went on being used (errors of 33 against F.linear)."""
    M, K, N = 8192, 64, 64  # M K N = 2**25: oneDNN with the prepacked weight; a 16 KiB weight
    lin = torch.nn.Linear(K, N)
    x = torch.randn(M, K)
    for i in range(8):
        lin.weight.data = torch.zeros(1)
        lin.weight.data = torch.full((N, K), float(i + 2))
        with torch.no_grad():
            torch.testing.assert_close(vitfast.linear(x, lin.weight, lin.bias, prepack=True),
                                       F.linear(x, lin.weight, lin.bias), msg=f"round {i}")
    # and the cache does not keep a replaced storage alive (module.to(dtype) replaces weights this way)
    old = weakref.ref(lin.weight.untyped_storage())
    lin.weight.data = torch.zeros(N, K)
    assert old() is None


@pytest.mark.skipif(not ONEDNN, reason="PyTorch without oneDNN")
def test_prepacked_weight_follows_another_view_of_its_storage():
    """`w.data = w.data.t()` keeps the storage, the data pointer and the version: the cache's key also holds the
    strides and shape (the transposed weight's product ran on the old copy: errors of 3.3 against F.linear)."""
    lin = torch.nn.Linear(1024, 1024)
    x = torch.randn(64, 1024)  # 64 x 1024 x 1024 = 2**26 multiply-adds: oneDNN with the prepacked weight
    with torch.no_grad():
        vitfast.linear(x, lin.weight, lin.bias, prepack=True)
        lin.weight.data = lin.weight.data.t()
        torch.testing.assert_close(vitfast.linear(x, lin.weight, lin.bias, prepack=True),
                                   F.linear(x, lin.weight, lin.bias))


def test_prepacked_weight_follows_the_parameter(monkeypatch):
    """With prepack=True and without grad a Parameter's weight is prepacked once and reused; an in-place update
    (optimizer step, init, load_state_dict), new storage (.data = ...) or a new Parameter is seen at the next call;
    by default, with grad, for a plain tensor and for an inference tensor nothing is packed. Each result equals
    F.linear's."""
    from vitfast.ops import linear as vl

    packs = []
    real = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(vl.torch.ops.mkldnn, "_reorder_linear_weight",
                        lambda w, b: packs.append(tuple(w.shape)) or real(w, b), raising=False)
    lin = torch.nn.Linear(384, 512)
    x = torch.randn(200, 384)

    def check():
        with torch.no_grad():
            y = vitfast.linear(x, lin.weight, lin.bias, prepack=True)
            torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-4)

    check()
    check()
    assert len(packs) == 1
    with torch.no_grad():
        lin.weight.mul_(-2.0)
    check()
    lin.load_state_dict({"weight": torch.randn(512, 384), "bias": lin.bias.detach()})
    check()
    lin.weight.data = torch.randn(512, 384)
    check()
    assert len(packs) == 4
    with torch.inference_mode():
        vitfast.linear(x, lin.weight, lin.bias, prepack=True)
        vitfast.linear(x, torch.nn.Parameter(torch.randn(512, 384)), lin.bias)  # (prepack=False: the default)
    assert len(packs) == 4
    vitfast.linear(x, lin.weight, lin.bias, prepack=True).sum().backward()  # with grad: the plain weight
    with torch.no_grad():
        vitfast.linear(x, lin.weight.detach().clone(), lin.bias, prepack=True)  # not a Parameter
        with torch.inference_mode():
            frozen = torch.nn.Parameter(torch.randn(512, 384), requires_grad=False)  # an inference tensor
        vitfast.linear(x, frozen, lin.bias, prepack=True)
    assert len(packs) == 4
    ident = id(lin.weight)
    assert ident in vl._PACKED
    vl.drop_prepacked(lin.weight)
    assert ident not in vl._PACKED
    check()
    assert len(packs) == 5 and ident in vl._PACKED
    del lin
    assert ident not in vl._PACKED  # (an entry leaves with its Parameter)


def test_export_with_a_bounded_dynamic_batch():
    """A patched model under torch.export with Dim("batch", max=...): vitfast.linear's size rule (and the patched
    MLP's) tested the symbolic row count while tracing, which export refused (a guard on the batch); they now leave
    symbolic sizes to the op, which applies the rule to each call's sizes."""
    from _optional_libs import import_or_skip

    timm = import_or_skip("timm")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(768, 768), timm.layers.Mlp(768, 768)).eval()
    vitfast.patch_model(model)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        for strict in (False, True):
            program = torch.export.export(model, (torch.randn(64, 768),), dynamic_shapes=({0: batch},), strict=strict)
            for M in (4, 1000):  # the product below and above the rule's 2**25 multiply-adds
                x = torch.randn(M, 768)
                torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)
