import logging
import unittest.mock

import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast.ops.layer_norm import layer_norm_ref

from conftest import DEVICE, assert_close_to_ref, assert_compiles_like_eager, backend_cases, rounding_noise

CASES = backend_cases("layer_norm")
LOW = (torch.float16, torch.bfloat16)


def _inputs(shape, n, dtype, device, weight=True, bias=True, residual=False):
    x = torch.randn(*shape, n, dtype=dtype, device=device) * 2 + 0.5
    w = torch.randn(n, dtype=dtype, device=device) if weight else None
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    r = torch.randn(*shape, n, dtype=dtype, device=device) if residual else None
    return x, w, b, r


def _run(fn, x, w, b, r, eps, dy, ds):
    """Forward and every gradient of `fn` (vitfast.layer_norm or the reference)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    out = fn(leaves[0], (x.shape[-1],), leaves[1], leaves[2], eps, leaves[3])
    y, s = out if r is not None else (out, None)
    loss = (y * dy).sum() + ((s * ds).sum() if s is not None else 0)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [y] + ([s] if s is not None else []) + list(grads)


def _check(backend, device, shape, n, dtype, eps=1e-5, **kw):
    x, w, b, r = _inputs(shape, n, dtype, device, **kw)
    dy = torch.randn_like(x)
    ds = torch.randn_like(x)
    with vitfast.use_backend(backend):
        got = _run(vitfast.layer_norm, x, w, b, r, eps, dy, ds)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    ref = _run(layer_norm_ref, d(x), d(w), d(b), d(r), eps, d(dy), d(ds))
    noise = rounding_noise(lambda t: _run(layer_norm_ref, *t[:4], eps, *t[4:]),
                           [d(x), d(w), d(b), d(r), d(dy), d(ds)], dtype)
    plain = _run(layer_norm_ref, x, w, b, r, eps, dy, ds)
    names = ["y"] + (["s"] if r is not None else []) + ["dx", "dweight", "dbias", "dresidual"]
    names = [nm for nm in names if not ((nm == "dweight" and w is None) or (nm == "dbias" and b is None)
                                        or (nm == "dresidual" and r is None))]
    assert len(got) == len(ref) == len(names)
    for nm, g, rf, p, n in zip(names, got, ref, plain, noise):
        assert_close_to_ref(g, rf, p, f"{backend} {nm}", noise=n)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,n", [((1,), 1), ((3,), 7), ((2, 49), 96), ((197,), 768), ((5,), 1000), ((3,), 1280)])
def test_matches_fp64(backend, device, dtype, shape, n):
    _check(backend, device, shape, n, dtype)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("weight,bias,residual", [(True, True, True), (False, False, True), (True, False, False),
                                                  (False, True, False), (False, False, False)])
def test_affine_and_residual_variants(backend, device, weight, bias, residual):
    _check(backend, device, (2, 33), 192, torch.float32, weight=weight, bias=bias, residual=residual)
    _check(backend, device, (17,), 384, torch.bfloat16, weight=weight, bias=bias, residual=residual)


@pytest.mark.parametrize("backend,device", CASES)
def test_large_hidden_and_eps(backend, device):
    _check(backend, device, (4,), 8192, torch.float32, eps=1e-6, residual=True)
    _check(backend, device, (3,), 4097, torch.float16, eps=1e-3)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constant_rows_give_exactly_the_bias(backend, device, dtype):
    """Rows of 768 x -3.7 (eps 1e-6), alone and as x + residual: the statistics make x - mean exactly 0, so y is
    exactly the bias and the weight's gradient exactly 0 (a one-pass or plain two-pass mean is off by an ulp,
    which rstd = 1000 turns into an error of ~1e-3)."""
    x = torch.full((5, 768), -3.7, dtype=dtype, device=device)
    r = torch.full((5, 768), 1.25, dtype=dtype, device=device)
    w = torch.randn(768, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(768, dtype=dtype, device=device, requires_grad=True)
    with vitfast.use_backend(backend):
        for residual in (None, r):
            out = vitfast.layer_norm(x, 768, w, b, eps=1e-6, residual=residual)
            y = out if residual is None else out[0]
            dw, db = torch.autograd.grad(y, (w, b), torch.randn_like(y))
            assert torch.equal(y, b.detach().expand_as(y))
            assert torch.equal(dw, torch.zeros_like(dw)) and db.abs().max() > 0


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_whose_squares_overflow_match_fp64(backend, device, dtype):
    """Rows whose squared deviations overflow (fp32 values of 1e19 to 4e35; fp64 1e160 to 1e300): their second pass
    is redone on the deviations times 2^-100 (2^-600), so y and every gradient match the float64 LayerNorm of the
    rows scaled down by 2^-600 (LayerNorm is scale-invariant where eps is negligible). Before, var was inf and such
    rows gave the bias, as ATen's LayerNorm gives the bias or NaN. The rows take both sides of the rescaled
    variance (var = var' * 2^200 finite, or overflowing), a constant row of 1e30 (its first-pass mean is one ulp
    off, whose square overflows) still gives exactly the bias, and a normal row in the same call is unaffected."""
    if dtype == torch.float64 and backend in ("triton", "cuda"):
        pytest.skip("float64 is refused there (test_float64)")
    x = torch.tensor([[1e30, -1e30, 2e30, 0.5e30, -3e30, 1e30, 0.0, 1e29, -2e30],
                      [2e19, -2e19, 1e19, 0.0, -1e19, 3e19, 0.5e19, -3e19, 1e19],  # var finite, sq not
                      [3e35, -4e35, 1.0, 2e20, -1e19, 0.0, 0.0, 0.0, 1e35],
                      [5e30 + k * 1e29 for k in range(9)],
                      [0.3, -1.2, 2.0, 0.7, -0.1, 1.5, -2.2, 0.9, 0.05]], dtype=torch.float64)
    if dtype == torch.float64:  # the same two sides of the fp64 range
        x *= torch.tensor([1e135, 3e134, 1e130, 1e260, 1.0], dtype=torch.float64)[:, None]
    x = x.to(dtype).to(device)
    const = torch.full((1, 9), x[0, 0].item(), dtype=dtype, device=device)
    w, b = torch.randn(9, dtype=dtype, device=device), torch.randn(9, dtype=dtype, device=device)
    dy = torch.randn(5, 9, dtype=dtype, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with vitfast.use_backend(backend):
        y = vitfast.layer_norm(leaves[0], 9, leaves[1], leaves[2])
        got = [y, *torch.autograd.grad(y, leaves, dy)]
        assert torch.equal(vitfast.layer_norm(const, 9, w, b), b[None].expand(1, 9)), "a constant row"
    # float64 reference on each row scaled by a power of two near its largest value (exact), eps scaled with it
    down = torch.exp2(-torch.floor(torch.log2(x.double().abs().amax(-1, keepdim=True))))
    ref = [t.double().requires_grad_() for t in (x * down, w, b)]
    xc = ref[0] - ref[0].mean(-1, keepdim=True)
    y = xc / torch.sqrt(xc.square().mean(-1, keepdim=True) + 1e-5 * down * down) * ref[1] + ref[2]
    dx, dw, db = torch.autograd.grad(y, ref, dy.double())
    for name, g, r in zip(["y", "dx", "dweight", "dbias"], got, [y, dx * down, dw, db]):
        scale = r.abs().amax(-1, keepdim=True) if name in ("y", "dx") else r.abs().max()
        err = ((g.double() - r).abs() / scale).max().item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-13), f"{backend} {name}: relative error {err:.3g}"


@pytest.mark.parametrize("backend,device", CASES)
def test_rows_of_a_large_mean_whose_deviation_sum_squared_overflows(backend, device):
    """fp32 rows of mean 1e23 and a spread of a few ulps (4096 values): their squared deviations stay finite, but the
    sum of the deviations from the first-pass mean (~1e19) squared does not; the C++ kernels formed dev^2 before
    dividing by N, clamped the variance to 0 and scaled each row by 1 / sqrt(eps): errors of 1e20. A row this narrow
    carries a few bits, so the float64 LayerNorm of its fp32 values is matched to ~0.03 (the torch backend's error)."""
    x = (1e23 * (1 + 1e-6 * torch.randn(3, 4096, dtype=torch.float64))).float().to(device)
    with vitfast.use_backend(backend):
        y = vitfast.layer_norm(x, 4096)
    err = (y.double() - F.layer_norm(x.double(), (4096,))).abs().max().item()
    assert err < 0.25, f"{backend}: max error {err:.3g}"


@pytest.mark.parametrize("backend,device", CASES)
def test_float64(backend, device):
    if backend in ("triton", "cuda"):
        with vitfast.use_backend(backend), pytest.raises(ValueError, match="float64"):
            vitfast.layer_norm(torch.randn(3, 8, dtype=torch.float64, device=device), 8)
        return
    x = torch.randn(5, 64, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(64, dtype=torch.float64, device=device, requires_grad=True)
    with vitfast.use_backend(backend):
        y = vitfast.layer_norm(x, 64, w, None, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, (64,), w, None, 1e-5), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: vitfast.layer_norm(a, 64, b, None, 1e-5), (x, w))


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_inputs_are_read_in_place_or_copied_correctly(backend, device):
    base = torch.randn(40, 200, device=device)
    cases = [base[:, :96], base.t()[:96, :40].t().contiguous().t().t(), base[::2, 100:196], base.t()[:, :37]]
    for x in cases:
        n = x.shape[-1]
        w = torch.randn(n, device=device)
        with vitfast.use_backend(backend):
            y = vitfast.layer_norm(x, n, w, None, 1e-5)
        ref = layer_norm_ref(x.double(), (n,), w.double(), None, 1e-5)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", CASES)
def test_multi_dim_normalized_shape(backend, device):
    x = torch.randn(3, 4, 5, 6, device=device)
    w = torch.randn(5, 6, device=device)
    b = torch.randn(5, 6, device=device)
    with vitfast.use_backend(backend):
        y = vitfast.layer_norm(x, (5, 6), w, b)
    torch.testing.assert_close(y, F.layer_norm(x, (5, 6), w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_input(backend, device):
    x = torch.randn(0, 96, device=device, requires_grad=True)
    r = torch.randn(0, 96, device=device, requires_grad=True)
    w = torch.randn(96, device=device, requires_grad=True)
    with vitfast.use_backend(backend):
        y, s = vitfast.layer_norm(x, 96, w, None, residual=r)
        (y.sum() + s.sum()).backward()
    assert y.shape == s.shape == (0, 96)
    assert x.grad.shape == (0, 96) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_normalized_shape(backend, device):
    """A normalized size of 0 gives the empty output and empty gradients, as F.layer_norm (it raised a reshape
    error)."""
    x = torch.randn(3, 2, 0, device=device, requires_grad=True)
    r = torch.randn(3, 2, 0, device=device, requires_grad=True)
    w = torch.randn(0, device=device, requires_grad=True)
    with vitfast.use_backend(backend):
        y, s = vitfast.layer_norm(x, 0, w, w, residual=r)
        grads = torch.autograd.grad(y.sum() + s.sum(), (x, r, w))
    assert y.shape == s.shape == (3, 2, 0)
    assert [g.shape for g in grads] == [x.shape, r.shape, w.shape]


@pytest.mark.parametrize("backend,device", CASES)
def test_many_rows(backend, device):
    """More rows than a grid dimension's 65535 blocks."""
    x = torch.randn(70_000, 2, device=device, requires_grad=True)
    with vitfast.use_backend(backend):
        y = vitfast.layer_norm(x, 2)
        y.backward(torch.ones_like(y))
    torch.testing.assert_close(y, F.layer_norm(x.detach(), (2,)), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2**31 elements need a GPU (tens of GiB on CPU)")
def test_over_2_pow_31_elements():
    n = 1024
    x = torch.randn(2**31 // n + 3, n, device="cuda", dtype=torch.float16)
    w = torch.randn(n, device="cuda", dtype=torch.float16)
    for name in ("triton", "cuda"):
        if name == "cuda" and not vitfast._ext.EXT_CUDA:
            continue
        with vitfast.use_backend(name):
            y = vitfast.layer_norm(x, n, w)
        tail = slice(-5, None)
        torch.testing.assert_close(y[tail].float(), F.layer_norm(x[tail].float(), (n,), w.float()),
                                   rtol=2e-2, atol=2e-2)
        del y


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"normalized_shape \(7,\).*\(4, 8\)"):
        vitfast.layer_norm(x, 7)
    with pytest.raises(ValueError, match="weight must have shape \\(8,\\), dtype torch.float32.*torch.float16"):
        vitfast.layer_norm(x, 8, torch.randn(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="bias must have shape.*meta"):
        vitfast.layer_norm(x, 8, None, torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="residual"):
        vitfast.layer_norm(x, 8, residual=torch.randn(4, 9))
    with pytest.raises(ValueError, match="floating point"):
        vitfast.layer_norm(torch.ones(4, 8, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="normalized_shape"):
        vitfast.layer_norm(x, (2, 4, 8))


def test_use_backend_blocks_of_several_threads():
    """use_backend is process-wide: blocks open in two threads, the one entered last rules; each exit removes its own
    choice only (a block's exit restored the value it had seen on entry: B's block then saw the automatic choice,
    and after both exits the process stayed on A's backend)."""
    import threading

    a_in, b_in, a_out, b_checked = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with vitfast.use_backend("torch"):
            a_in.set()
            b_in.wait()
        a_out.set()

    def thread_b():
        a_in.wait()
        with vitfast.use_backend("cpp"):
            b_in.set()
            a_out.wait()
            seen["b"] = vitfast.backend.forced_backend()
        b_checked.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert b_checked.is_set() and seen["b"] == "cpp"
    assert vitfast.backend.forced_backend() is None


def test_use_backend_inside_a_compiled_function():
    """A use_backend block inside a function that torch.compile traces raises (it compiled, but the ops, which choose
    their backend when the graph runs, kept the automatic choice); around the compiled call it reaches them."""
    x = torch.randn(4, 8, device=DEVICE)

    def f(t):
        with vitfast.use_backend("torch"):
            return vitfast.layer_norm(t, 8)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"use_backend\('torch'\) inside a function that torch.compile traces"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert vitfast.backend.forced_backend() is None

    def g(t):
        vitfast.set_backend("torch")
        return vitfast.layer_norm(t, 8)
    with pytest.raises(Exception, match=r"set_backend\('torch'\) inside a function that torch.compile traces"):
        torch.compile(g, fullgraph=True, backend="aot_eager")(x)
    assert vitfast.backend.forced_backend() is None
    chosen = []
    real = vitfast.backend.choose_backend

    def spy(*args, **kwargs):
        chosen.append(real(*args, **kwargs))
        return chosen[-1]
    g = torch.compile(lambda t: vitfast.layer_norm(t, 8), fullgraph=True, backend="aot_eager")
    with unittest.mock.patch.object(vitfast.backend, "choose_backend", spy), vitfast.use_backend("torch"):
        torch.testing.assert_close(g(x), F.layer_norm(x, (8,)))
    assert chosen and set(chosen) == {"torch"}


def test_backend_choice_env_context_and_errors(monkeypatch, caplog):
    x = torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    x32 = x.float()  # (float32: a kernel of vitfast's takes it on CPU and GPU, float64 has none on a GPU)
    auto = vitfast.choose_backend("layer_norm", x32)
    assert auto != "torch"
    monkeypatch.setenv("VITFAST_BACKEND", "torch")
    assert vitfast.choose_backend("layer_norm", x32) == "torch"
    with vitfast.use_backend("auto"):  # the automatic choice, whatever the variable says
        assert vitfast.choose_backend("layer_norm", x32) == auto
        with vitfast.use_backend(None):  # back to the variable's
            assert vitfast.choose_backend("layer_norm", x32) == "torch"
    vitfast.set_backend("auto")
    assert vitfast.choose_backend("layer_norm", x32) == auto
    vitfast.set_backend(None)
    monkeypatch.setenv("VITFAST_BACKEND", "tpu")
    with pytest.raises(ValueError, match="VITFAST_BACKEND='tpu' is not a vitfast backend"):
        vitfast.choose_backend("layer_norm", x32)
    with vitfast.use_backend("auto"):  # (overrides the variable: not read)
        assert vitfast.choose_backend("layer_norm", x32) == auto
    monkeypatch.setenv("VITFAST_BACKEND", "")  # set but empty (`VITFAST_BACKEND= python ...`): auto
    assert vitfast.backend.forced_backend() is None
    monkeypatch.delenv("VITFAST_BACKEND")
    with pytest.raises(ValueError, match="unknown vitfast backend"):
        vitfast.use_backend("fast").__enter__()
    with caplog.at_level(logging.DEBUG, logger="vitfast.backend"), vitfast.use_backend("triton"):
        with pytest.raises(ValueError,
                           match=rf"no backend can take inputs \[\(4, 8\) torch.float64 {x.device}\].*float64"):
            vitfast.layer_norm(x, 8)
    assert "triton backend skipped" in caplog.text


def test_module_is_a_drop_in_for_torch_layer_norm():
    ref = torch.nn.LayerNorm(96, eps=1e-6)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    mine = vitfast.nn.LayerNorm(96, eps=1e-6)
    mine.load_state_dict(ref.state_dict())
    assert mine.eps == 1e-6 and set(mine.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(mine.state_dict())
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(mine(x), ref(x))
    r = torch.randn_like(x)
    y, s = mine(x, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, ref(x + r))
    # a bfloat16 input to float32 parameters (a bf16 model keeping its norms in fp32), which nn.LayerNorm takes
    xb, rb = x.bfloat16(), r.bfloat16()
    torch.testing.assert_close(mine(xb), ref(xb))
    y, s = mine(xb, residual=rb)
    torch.testing.assert_close(s, xb + rb)
    torch.testing.assert_close(y, ref(xb + rb))


def test_opcheck():
    x = torch.randn(6, 32, requires_grad=True)
    args = [(x, torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True),
             torch.randn(6, 32, requires_grad=True), 1e-5), (x, None, None, None, 1e-6)]
    for a in args:
        torch.library.opcheck(torch.ops.vitfast.layer_norm.default, a)
    s = torch.randn(6, 32)
    y, _, mean, rstd = torch.ops.vitfast.layer_norm(s, None, None, None, 1e-5)
    torch.library.opcheck(torch.ops.vitfast.layer_norm_backward.default,
                          (torch.randn(6, 32), torch.randn(6, 32), s, torch.randn(32), mean, rstd, True))


def test_torch_backend_outputs_are_contiguous_as_the_fakes_say():
    """The torch backend's results kept the layout of a permuted x (strides (1, 6)), where the fakes say rows."""
    x = torch.randn(8, 6).t().requires_grad_()
    w, b, r = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True), torch.randn(8, 6).t()
    with vitfast.use_backend("torch"):
        torch.library.opcheck(torch.ops.vitfast.layer_norm.default, (x, w, b, r, 1e-5),
                              test_utils=("test_faketensor", "test_autograd_registration"))
        y, s, mean, rstd = torch.ops.vitfast.layer_norm(x.detach(), w, b, r, 1e-5)
        assert y.is_contiguous() and s.is_contiguous()
        dx = torch.ops.vitfast.layer_norm_backward(torch.randn(8, 6).t(), None, x.detach(), w, mean, rstd, True)[0]
        assert dx.is_contiguous()


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = vitfast.nn.LayerNorm(48)
            self.fc = torch.nn.Linear(48, 48)

        def forward(self, x, r):
            y, s = self.norm(x, residual=r)
            return self.fc(y) + s

    assert_compiles_like_eager(Block(), torch.randn(3, 7, 48, requires_grad=True), torch.randn(3, 7, 48))


def test_choose_backend_names_unknown_ops_and_wants_tensors():
    """An unknown op gave KeyError('layernorm'), no tensor an IndexError."""
    with pytest.raises(ValueError, match=r"unknown op 'layernorm'; expected one of \[.*'layer_norm'"):
        vitfast.choose_backend("layernorm", torch.randn(2, 4))
    with pytest.raises(ValueError, match="give the op's input tensors"):
        vitfast.choose_backend("layer_norm")


@pytest.mark.parametrize("backend,device", CASES)
def test_the_ops_check_shapes_when_called_directly(backend, device):
    """torch.ops.vitfast.layer_norm called directly: a weight or residual of another width reached the kernels."""
    x, w = torch.randn(4, 8, device=device), torch.randn(8, device=device)
    with vitfast.use_backend(backend):
        with pytest.raises(ValueError, match=r"shapes do not agree: weight \(6,\) \(expected \(8,\)\)"):
            torch.ops.vitfast.layer_norm(x, w[:6], None, None, 1e-5)
        with pytest.raises(ValueError, match=r"residual \(4, 6\) \(expected \(4, 8\)\)"):
            torch.ops.vitfast.layer_norm(x, w, None, x[:, :6], 1e-5)
        y, _, mean, rstd = torch.ops.vitfast.layer_norm(x, w, None, None, 1e-5)
        with pytest.raises(ValueError, match=r"mean \(3,\) \(expected \(4,\)\)"):
            torch.ops.vitfast.layer_norm_backward(y, None, x, w, mean[:3], rstd, False)
