"""The C++ CPU kernels of window attention (csrc/window_attention.cpp) and window partition/reverse
(csrc/window_process.cpp), called through their torch.ops schemas, against the PyTorch references of
vitfast/ops/window_attention.py (`_fwd_torch`, `_bwd_torch`) and plain pad/roll/view."""
import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast.ops.window_attention import _bwd_torch, _fwd_torch

from conftest import assert_close_to_ref


def _missing(*names) -> str:
    if not vitfast._ext.HAS_EXT:
        return vitfast._ext.EXT_ERROR
    for name in names:
        try:
            getattr(torch.ops.vitfast, name)
        except (AttributeError, RuntimeError):
            return f"vitfast._C has no {name} (stale build: reinstall with `pip install --no-build-isolation -e .`)"
    return ""


_WA_MISSING = _missing("window_attention_fwd", "window_attention_bwd")
_WP_MISSING = _missing("window_partition", "window_reverse")
needs_wa = pytest.mark.skipif(bool(_WA_MISSING), reason=_WA_MISSING or "-")
needs_wp = pytest.mark.skipif(bool(_WP_MISSING), reason=_WP_MISSING or "-")

# (B, H, W, heads, D, window, shift): no padding, padding on one or both axes, shift, N = 49 and 144.
GEOMETRIES = [
    (2, 7, 7, 2, 8, 7, 0),
    (1, 14, 15, 2, 16, 7, 3),
    (2, 15, 9, 1, 8, 7, 3),
    (1, 14, 14, 2, 8, 12, 6),
    (1, 15, 13, 1, 16, 12, 0),
]
# (dense bias, pad_qkv, cosine)
VARIANTS = [(False, False, False), (False, True, False), (True, True, False), (False, True, True), (True, False, True)]


def _inputs(B, H, W, heads, D, ws, dtype, dense, pad, cosine):
    qkv = torch.randn(B, H, W, 3, heads, D + 3, dtype=dtype)[..., :D]  # strided, unit inner stride
    N = ws * ws
    bias = torch.randn(heads, N, N, dtype=dtype) if dense else torch.randn((2 * ws - 1) ** 2, heads, dtype=dtype)
    pad_qkv = torch.randn(3, heads, D, dtype=dtype) if pad else None
    logit_scale = torch.rand(heads) * 3 + 1 if cosine else None
    return qkv, bias, pad_qkv, logit_scale


def _check(name, got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{name}: {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}")
    if name == "lse":  # fp32 in every backend
        tol = dict(atol=1e-5, rtol=1e-5)
    else:
        tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


@needs_wa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "dense{}-pad{}-cos{}".format(*map(int, v)))
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_fwd_bwd_match_torch(geometry, variant, dtype):
    B, H, W, heads, D, ws, shift = geometry
    qkv, bias, pad_qkv, logit_scale = _inputs(B, H, W, heads, D, ws, dtype, *variant)
    args = ([ws, ws], [shift, shift], D ** -0.5, 0.0, 0)
    out, lse = torch.ops.vitfast.window_attention_fwd(qkv, bias, pad_qkv, logit_scale, *args)
    out_ref, lse_ref = _fwd_torch(qkv, bias, pad_qkv, logit_scale, *args)
    _check("out", out, out_ref, dtype)
    _check("lse", lse, lse_ref, dtype)
    dout = torch.randn_like(out)
    grads = torch.ops.vitfast.window_attention_bwd(dout, qkv, bias, pad_qkv, logit_scale, out, lse, *args)
    refs = _bwd_torch(dout, qkv, bias, pad_qkv, logit_scale, *args)
    for name, got, want in zip(("dqkv", "dbias", "dpad_qkv", "dlogit_scale"), grads, refs):
        _check(name, got, want, dtype)


@needs_wa
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    B, H, W, heads, D, ws, shift = 2, 15, 9, 2, 16, 7, 3
    qkv, bias, pad_qkv, _ = _inputs(B, H, W, heads, D, ws, torch.float32, False, True, False)
    args = ([ws, ws], [shift, shift], D ** -0.5, 0.0, 0)
    low = [t.to(dtype) for t in (qkv, bias, pad_qkv)]
    out, lse = torch.ops.vitfast.window_attention_fwd(*low, None, *args)
    ref64 = _fwd_torch(*[t.double() for t in (qkv, bias, pad_qkv)], None, *args)[0]
    assert_close_to_ref(out, ref64, _fwd_torch(*low, None, *args)[0], "out")
    dout = torch.randn(B, H, W, heads * D)
    grads = torch.ops.vitfast.window_attention_bwd(dout.to(dtype), *low, None, out, lse, *args)
    refs64 = _bwd_torch(dout.double(), *[t.double() for t in (qkv, bias, pad_qkv)], None, *args)
    plain = _bwd_torch(dout.to(dtype), *low, None, *args)
    for name, got, ref, p in zip(("dqkv", "dbias", "dpad_qkv"), grads, refs64, plain):
        assert_close_to_ref(got, ref, p, name)


class _CppWindowAttention(torch.autograd.Function):
    """The two C++ ops as one autograd function, so that gradcheck compares the backward with the forward."""

    @staticmethod
    def forward(ctx, qkv, bias, pad_qkv, logit_scale, args):
        out, lse = torch.ops.vitfast.window_attention_fwd(qkv, bias, pad_qkv, logit_scale, *args)
        ctx.save_for_backward(qkv, bias, pad_qkv, logit_scale, out, lse)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, bias, pad_qkv, logit_scale, out, lse = ctx.saved_tensors
        dqkv, dbias, dpad, dscale = torch.ops.vitfast.window_attention_bwd(
            dout.contiguous(), qkv, bias, pad_qkv, logit_scale, out, lse, *ctx.args)
        return dqkv, dbias, dpad, dscale.to(logit_scale.dtype) if logit_scale is not None else None, None


@needs_wa
@pytest.mark.parametrize("cosine", [False, True])
def test_dropout_backward_matches_forward(cosine):
    """With dropout: the backward against the forward itself (gradcheck, float64)."""
    heads, D = 2, 4
    qkv = torch.randn(1, 5, 6, 3, heads, D, dtype=torch.float64, requires_grad=True)
    table = torch.randn(25, heads, dtype=torch.float64, requires_grad=True)
    pad_qkv = torch.randn(3, heads, D, dtype=torch.float64, requires_grad=True)
    logit_scale = (torch.rand(heads, dtype=torch.float64) + 1).requires_grad_() if cosine else None
    args = ([3, 3], [1, 1], 0.5, 0.3, 7)
    inputs = (qkv, table, pad_qkv) + ((logit_scale,) if cosine else ())

    def fn(q, b, p, *scale):
        return _CppWindowAttention.apply(q, b, p, scale[0] if scale else None, args)

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6)


@needs_wa
def test_dropout_mask_is_a_function_of_the_seed():
    qkv = torch.randn(2, 14, 14, 3, 1, 8)
    table = torch.randn(169, 1)
    fwd = torch.ops.vitfast.window_attention_fwd

    def run(p, seed):
        return fwd(qkv, table, None, None, [7, 7], [3, 3], 0.35, p, seed)[0]

    assert torch.equal(run(0.0, 1), run(0.0, 2)), "dropout_p = 0 must not depend on the seed"
    torch.testing.assert_close(run(0.0, 1), _fwd_torch(qkv, table, None, None, [7, 7], [3, 3], 0.35, 0.0, 0)[0])
    assert torch.equal(run(0.25, 5), run(0.25, 5))
    assert not torch.equal(run(0.25, 5), run(0.25, 6))
    # With q = k = 0 the probabilities are uniform; with v = 1 each output is (kept / N) / (1 - p), mean ~1.
    ones = torch.zeros(2, 14, 14, 3, 1, 49)
    ones[..., 2, :, :] = 1.0
    mean = fwd(ones, torch.zeros(169, 1), None, None, [7, 7], [0, 0], 1.0, 0.25, 3)[0].mean().item()
    assert abs(mean - 1.0) < 0.02, mean


@needs_wa
def test_bad_inputs_are_named():
    qkv = torch.randn(1, 7, 7, 3, 2, 8)
    with pytest.raises(RuntimeError, match=r"bias must be the \(num_rel, heads\)"):
        torch.ops.vitfast.window_attention_fwd(qkv, torch.randn(169, 3), None, None, [7, 7], [0, 0], 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="shift_size"):
        torch.ops.vitfast.window_attention_fwd(qkv, torch.randn(169, 2), None, None, [7, 7], [7, 0], 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="qkv must be"):
        torch.ops.vitfast.window_attention_fwd(qkv[..., 0, :, :], torch.randn(169, 2), None, None, [7, 7], [0, 0],
                                               1.0, 0.0, 0)


# ------------------------------------------------------------------------------ window partition / reverse

def _partition_ref(x, ws, shift):
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, (ws[1] - W % ws[1]) % ws[1], 0, (ws[0] - H % ws[0]) % ws[0]))
    Hp, Wp = x.shape[1:3]
    x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(B, Hp // ws[0], ws[0], Wp // ws[1], ws[1], C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws[0] * ws[1], C)


def _reverse_ref(windows, H, W, ws, shift):
    Hp, Wp = -(-H // ws[0]) * ws[0], -(-W // ws[1]) * ws[1]
    C = windows.shape[-1]
    x = windows.view(-1, Hp // ws[0], Wp // ws[1], ws[0], ws[1], C).permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, C)
    x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W].contiguous()


@needs_wp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,ws,shift", [
    ((2, 7, 7, 8), (7, 7), (0, 0)),
    ((1, 14, 15, 3), (7, 7), (3, 3)),
    ((2, 15, 9, 5), (7, 7), (3, 2)),
    ((1, 13, 14, 4), (12, 6), (6, 0)),
    ((1, 5, 6, 1), (2, 3), (1, 1)),
], ids=str)
def test_window_partition_and_reverse(shape, ws, shift, dtype):
    x = torch.randn(shape).to(dtype)
    windows = torch.ops.vitfast.window_partition(x, list(ws), list(shift))
    assert torch.equal(windows, _partition_ref(x, ws, shift))
    y = torch.randn(windows.shape).to(dtype)
    H, W = shape[1:3]
    back = torch.ops.vitfast.window_reverse(y, H, W, list(ws), list(shift))
    assert torch.equal(back, _reverse_ref(y, H, W, ws, shift))
    assert torch.equal(torch.ops.vitfast.window_reverse(windows, H, W, list(ws), list(shift)), x)
    # A strided (non-contiguous) input moves the same way.
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(torch.ops.vitfast.window_partition(xt, list(ws), list(shift)), windows)


@needs_wp
def test_window_partition_and_reverse_gradients_and_fakes():
    """Each is the other's adjoint (zero padding, cropped back): gradients in float64, opcheck (fakes for
    torch.compile) and a compiled round trip. They had no autograd: backward() left x.grad None."""
    x = torch.randn(2, 9, 11, 6, dtype=torch.float64, requires_grad=True)
    args = ([4, 4], [2, 1])
    windows = torch.ops.vitfast.window_partition(x, *args)
    assert torch.autograd.gradcheck(lambda t: torch.ops.vitfast.window_partition(t, *args), (x,))
    w = windows.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: torch.ops.vitfast.window_reverse(t, 9, 11, *args), (w,))
    torch.library.opcheck(torch.ops.vitfast.window_partition.default, (x, *args))
    torch.library.opcheck(torch.ops.vitfast.window_reverse.default, (w, 9, 11, *args))
    round_trip = torch.compile(lambda t: torch.ops.vitfast.window_reverse(
        torch.ops.vitfast.window_partition(t, *args) * 2, 9, 11, *args), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(round_trip(x), 2 * x)


@needs_wp
def test_window_reverse_map_size_stays_symbolic_and_fakes_check_sizes():
    """window_reverse's H and W were ints in its schema: torch.export with a dynamic map size failed ("specialized
    it to be a constant") and compile(dynamic=True) compiled a graph per size. The fakes checked neither window nor
    shift (meta tensors: a ZeroDivisionError, an out-of-range shift accepted)."""
    class Reverse(torch.nn.Module):
        def forward(self, windows, z):
            return torch.ops.vitfast.window_reverse(windows, z.shape[1], z.shape[2], [2, 2], [1, 1])

    def inputs(H, W):
        z = torch.randn(2, H, W, 4)
        return torch.ops.vitfast.window_partition(z, [2, 2], [1, 1]), z

    h, w, n = (torch.export.Dim(name, min=2, max=64) for name in "hwn")
    program = torch.export.export(Reverse(), inputs(8, 12), dynamic_shapes={"windows": {0: n}, "z": {1: h, 2: w}})
    for H, W in ((6, 10), (9, 5)):
        windows, z = inputs(H, W)
        assert torch.equal(program.module()(windows, z), z)
    graphs = []
    compiled = torch.compile(Reverse(), fullgraph=True, dynamic=True,
                             backend=lambda gm, example: graphs.append(gm) or gm)
    for H, W in ((8, 12), (6, 10), (10, 14)):
        windows, z = inputs(H, W)
        assert torch.equal(compiled(windows, z), z)
    assert len(graphs) == 1
    x = torch.empty(1, 5, 5, 2, device="meta")
    for ws, shift, message in (([0, 4], [0, 0], r"window_size must be positive, got \[0, 4\]"),
                               ([4, 4], [4, 1], r"shift_size \[4, 1\] must be in \[0, window\)"),
                               ([4, 4], [-1, 0], r"shift_size \[-1, 0\] must be in \[0, window\)")):
        with pytest.raises(RuntimeError, match=f"vitfast window_partition: {message}"):
            torch.ops.vitfast.window_partition(x, ws, shift)
        with pytest.raises(RuntimeError, match=f"vitfast window_reverse: {message}"):
            torch.ops.vitfast.window_reverse(torch.empty(4, 16, 2, device="meta"), 5, 5, ws, shift)
    for device in ("cpu", "meta"):  # windows of another size (the fake gave a shape), a negative map size
        with pytest.raises(RuntimeError, match=r"windows \[4, 9, 2\] must be \(B \* nW, N, C\) with N = 16"):
            torch.ops.vitfast.window_reverse(torch.empty(4, 9, 2, device=device), 5, 5, [4, 4], [0, 0])
        with pytest.raises(RuntimeError, match="H and W must be non-negative, got -5, 5"):
            torch.ops.vitfast.window_reverse(torch.empty(4, 16, 2, device=device), -5, 5, [4, 4], [0, 0])


@needs_wp
@pytest.mark.parametrize("shape", [(2, 0, 7, 4), (2, 7, 0, 4)], ids=["H0", "W0"])
def test_window_partition_backward_of_an_empty_map(shape):
    """An empty map has no windows: the backward (window_reverse of the gradient) could not infer B and raised."""
    x = torch.randn(*shape, requires_grad=True)
    windows = torch.ops.vitfast.window_partition(x, [7, 7], [3, 3])
    assert windows.shape == (0, 49, 4)
    windows.sum().backward()
    assert x.grad.shape == x.shape
