import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast.ops.attention import dropout_keep_ref
from vitfast.ops.window_attention import relative_position_index, shifted_window_attention_ref, window_attention_ref

from _optional_libs import import_or_skip
from conftest import DEVICE, assert_close_to_ref, assert_compiles_like_eager, backend_cases, rounding_noise

CASES = backend_cases("window_attention")
LOW = (torch.float16, torch.bfloat16)

# (B, H, W, heads, D, window, shift): no padding, padding on one or both axes, shift, N = 25 (one tile in the
# Triton backward), 49 and 144.
GEOMETRIES = [
    (1, 7, 7, 1, 16, 7, 0),
    (1, 10, 9, 2, 16, 5, 2),
    (2, 14, 15, 2, 8, 7, 3),
    (1, 15, 14, 1, 32, 7, 3),
    (1, 14, 14, 2, 16, 12, 6),
    (1, 15, 13, 1, 32, 12, 0),
]


def _inputs(B, H, W, heads, D, ws, dtype, device, pad=True, cosine=False, strided=False):
    if strided:  # a view with non-trivial strides and unit inner stride, like a sliced Linear output
        qkv = torch.randn(B, H, W, 3, heads, D + 3, dtype=dtype, device=device)[..., :D]
    else:
        qkv = torch.randn(B, H, W, 3, heads, D, dtype=dtype, device=device)
    table = torch.randn((2 * ws - 1) ** 2, heads, dtype=dtype, device=device)
    qkv_pad = torch.randn(3 * heads * D, dtype=dtype, device=device) if pad else None
    logit_scale = (torch.rand(heads, 1, 1, dtype=dtype, device=device) * 3 + 1) if cosine else None
    return qkv, table, qkv_pad, logit_scale


def _ref(qkv, table, ws, shift, qkv_pad, logit_scale):
    """The textbook reference, with torchvision's treatment of the V2 logit scale."""
    scale = None if logit_scale is None else torch.clamp(logit_scale, max=math.log(100.0)).exp()
    B, H, W = qkv.shape[:3]
    return window_attention_ref(qkv, table, ws, shift, qkv_pad, scale).reshape(B, H, W, -1)


def _run(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((out * dout).sum(), present, allow_unused=True)
    return [out] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, present)]


def _check(backend, device, geometry, dtype, pad=True, cosine=False, strided=False):
    B, H, W, heads, D, ws, shift = geometry
    tensors = _inputs(B, H, W, heads, D, ws, dtype, device, pad, cosine, strided)
    dout = torch.randn(B, H, W, heads * D, dtype=dtype, device=device)

    def fused(qkv, table, qkv_pad, logit_scale):
        return vitfast.window_attention(qkv, table, ws, shift, qkv_pad=qkv_pad, logit_scale=logit_scale)

    def ref(qkv, table, qkv_pad, logit_scale):
        return _ref(qkv, table, ws, shift, qkv_pad, logit_scale)

    with vitfast.use_backend(backend):
        got = _run(fused, tensors, dout)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    ref64 = _run(ref, [d(t) for t in tensors], d(dout))
    noise = rounding_noise(lambda t: _run(ref, t[:-1], t[-1]), [d(t) for t in tensors] + [d(dout)], dtype)
    plain = _run(ref, tensors, dout)
    names = ["out", "dqkv", "dtable"] + (["dqkv_pad"] if pad else []) + (["dlogit_scale"] if cosine else [])
    assert len(got) == len(ref64) == len(names)
    for nm, g, r, p, n in zip(names, got, ref64, plain, noise):
        assert_close_to_ref(g, r, p, f"{backend} {dtype} {geometry} {nm}", noise=n)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "B{}_{}x{}_h{}_d{}_w{}_s{}".format(*g))
def test_matches_textbook_fp32(backend, device, geometry):
    _check(backend, device, geometry, torch.float32)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("geometry", [(1, 14, 15, 2, 16, 7, 3), (1, 13, 14, 1, 16, 12, 6)], ids=["w7", "w12"])
def test_matches_textbook_low_precision(backend, device, dtype, geometry):
    _check(backend, device, geometry, dtype)


@pytest.mark.parametrize("backend,device", CASES)
def test_large_map_56(backend, device):
    """Swin-T stage-1 map size (56 x 56), one head, so the interpreter stays affordable."""
    _check(backend, device, (1, 56, 56, 1, 16, 7, 3), torch.float32, pad=False)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("geometry,dtype", [((1, 14, 15, 2, 16, 7, 3), torch.float32),
                                            ((1, 13, 14, 1, 16, 12, 6), torch.float32),
                                            ((1, 14, 14, 2, 32, 7, 3), torch.bfloat16)])
def test_cosine_attention_v2(backend, device, geometry, dtype):
    _check(backend, device, geometry, dtype, cosine=True)


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] != "triton"])  # (Triton: no fp64)
def test_cosine_attention_v2_float64_is_float64_exact(backend, device):
    """Swin-V2's logit scale in float64 for float64 qkv (it was taken in fp32: agreement ~1e-8, where float64 gives
    ~1e-15): output and every gradient, the logit scale's included, against the float64 reference."""
    qkv, table, qkv_pad, logit_scale = _inputs(1, 9, 10, 2, 8, 4, torch.float64, device, cosine=True)
    dout = torch.randn(1, 9, 10, 16, dtype=torch.float64, device=device)
    tensors = (qkv, table, qkv_pad, logit_scale)
    with vitfast.use_backend(backend):
        got = _run(lambda *t: vitfast.window_attention(t[0], t[1], 4, 2, qkv_pad=t[2], logit_scale=t[3]), tensors,
                   dout)
    ref = _run(lambda *t: _ref(t[0], t[1], 4, 2, t[2], t[3]), tensors, dout)
    for name, g, r in zip(["out", "dqkv", "dtable", "dqkv_pad", "dlogit_scale"], got, ref):
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("ws,shift,cosine", [(3, 0, False), (7, 3, False), (12, 0, False), (12, 6, True)])
def test_huge_finite_bias_is_plain_arithmetic(backend, device, ws, shift, cosine):
    """A dense bias whose row 2 is all torch.finfo(float32).min: as in the textbook softmax, that query weighs its
    keys equally, in the output and in every gradient (the saved fp32 log-sum-exp loses log(l) there, so a
    backward must not rebuild P from it). Windows 7 and 12 span several tiles of the triton backward; with a shift,
    padding and Swin-V2's cosine attention."""
    B, H, W, heads, D = 1, 2 * ws - 1, 2 * ws, 2, 8
    qkv, _, qkv_pad, logit_scale = _inputs(B, H, W, heads, D, ws, torch.float32, device, cosine=cosine)
    bias = torch.randn(heads, ws * ws, ws * ws, device=device)
    bias[:, 2] = torch.finfo(torch.float32).min
    dout = torch.randn(B, H, W, heads * D, device=device)

    def fused(qkv, bias, qkv_pad, logit_scale):
        return vitfast.window_attention(qkv, bias, ws, shift, qkv_pad=qkv_pad, logit_scale=logit_scale)

    def ref(qkv, bias, qkv_pad, logit_scale):
        return _ref(qkv, bias, ws, shift, qkv_pad, logit_scale)
    tensors = (qkv, bias, qkv_pad, logit_scale)
    with vitfast.use_backend(backend):
        got = _run(fused, tensors, dout)
    ref64 = _run(ref, tuple(t.double() if t is not None else None for t in tensors), dout.double())
    plain = _run(ref, tensors, dout)
    names = ["out", "dqkv", "dbias", "dqkv_pad"] + (["dlogit_scale"] if cosine else [])
    for name, g, r, p in zip(names, got, ref64, plain):
        assert_close_to_ref(g, r, p, f"{backend} {name}")


@pytest.mark.parametrize("backend,device", CASES)
def test_no_pad_values_and_strided_qkv(backend, device):
    _check(backend, device, (2, 9, 10, 2, 16, 7, 3), torch.float32, pad=False, strided=True)


def _swin_params(C, heads, ws, dtype, device, v2=False, qkv_bias=True, proj_bias=True):
    p = dict(qkv_weight=torch.randn(3 * C, C, dtype=dtype, device=device) * C ** -0.5,
             proj_weight=torch.randn(C, C, dtype=dtype, device=device) * C ** -0.5,
             qkv_bias=torch.randn(3 * C, dtype=dtype, device=device) if qkv_bias else None,
             proj_bias=torch.randn(C, dtype=dtype, device=device) if proj_bias else None)
    N = ws * ws
    table = torch.randn((2 * ws - 1) ** 2, heads, dtype=dtype, device=device)
    p["relative_position_bias"] = table[relative_position_index(ws).to(device)].view(N, N, heads).permute(
        2, 0, 1).unsqueeze(0).contiguous()
    p["logit_scale"] = torch.log(10 * torch.rand(heads, 1, 1, dtype=dtype, device=device) + 1) if v2 else None
    return p


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("H,W,ws,shift,v2", [(7, 7, 7, 3, False), (14, 15, 7, 3, False), (15, 14, 7, 3, True),
                                             (14, 14, 12, 6, False)])
def test_shifted_window_attention_matches_torchvision(backend, device, H, W, ws, shift, v2):
    """The drop-in against torchvision's function (copied as shifted_window_attention_ref), every gradient."""
    B, heads, C = 1, 2, 32
    params = _swin_params(C, heads, ws, torch.float32, device, v2=v2)
    x = torch.randn(B, H, W, C, device=device)
    names = ["input"] + [k for k, v in params.items() if v is not None]
    shift_arg = [shift, shift]

    def call(fn, tensors):
        kw = dict(zip(names, tensors))
        x = kw.pop("input")
        return fn(x, kw["qkv_weight"], kw["proj_weight"], kw["relative_position_bias"], [ws, ws], heads, shift_arg,
                  qkv_bias=kw.get("qkv_bias"), proj_bias=kw.get("proj_bias"), logit_scale=kw.get("logit_scale"))

    tensors = [x] + [params[k] for k in names[1:]]
    dout = torch.randn(B, H, W, C, device=device)
    with vitfast.use_backend(backend):
        got = _run(lambda *t: call(vitfast.shifted_window_attention, t), tensors, dout)
    ref64 = _run(lambda *t: call(shifted_window_attention_ref, t), [t.double() for t in tensors], dout.double())
    noise = rounding_noise(lambda t: _run(lambda *u: call(shifted_window_attention_ref, u), t[:-1], t[-1]),
                           [t.double() for t in tensors] + [dout.double()], torch.float32)
    plain = _run(lambda *t: call(shifted_window_attention_ref, t), tensors, dout)
    assert shift_arg == [shift, shift], "the caller's shift_size must not be mutated"
    for nm, g, r, p, n in zip(["out"] + ["d" + n for n in names], got, ref64, plain, noise):
        assert_close_to_ref(g, r, p, f"{backend} {nm}", noise=n)


@pytest.mark.parametrize("backend,device", CASES)
def test_every_output_element_is_written_and_backward_is_deterministic(backend, device, monkeypatch):
    """Fresh float buffers are NaN-poisoned; two backward runs must agree bit for bit (no atomics)."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    for geometry in [(2, 14, 15, 2, 8, 7, 3), (1, 13, 14, 1, 16, 12, 6)]:
        B, H, W, heads, D, ws, shift = geometry
        tensors = _inputs(B, H, W, heads, D, ws, torch.float32, device, cosine=True)
        dout = torch.randn(B, H, W, heads * D, device=device)

        def fused(qkv, table, qkv_pad, logit_scale):
            return vitfast.window_attention(qkv, table, ws, shift, qkv_pad=qkv_pad, logit_scale=logit_scale)

        with vitfast.use_backend(backend):
            first = _run(fused, tensors, dout)
            second = _run(fused, tensors, dout)
        for a, b in zip(first, second):
            assert torch.isfinite(a).all()
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", CASES)
def test_dropout_backward_outside_the_forwards_backend_block(backend, device):
    """Every backend draws the same keep mask: a backward run outside the forward's use_backend block (which chooses
    its backend anew), or a compiled graph traced under another backend choice than the one it runs under, gives the
    gradients of the forward's mask. (Each backend drew its own mask before: dqkv was off by 1.4.)"""
    qkv, table, qkv_pad, _ = _inputs(1, 6, 5, 2, 8, 3, torch.float32, device)
    other = "torch" if backend != "torch" else "cpp"

    def fn(qkv, table):
        return vitfast.window_attention(qkv, table, 3, 1, attention_dropout=0.4, training=True)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with vitfast.use_backend(other):  # traced under the other backend
        compiled(*(t.detach().clone().requires_grad_() for t in (qkv, table)))
    grads = []
    for run, inside in ((fn, True), (fn, False), (compiled, False)):
        leaves = [t.detach().clone().requires_grad_() for t in (qkv, table)]
        torch.manual_seed(7)
        with vitfast.use_backend(backend):
            out = run(*leaves)
            if inside:
                grads.append(torch.autograd.grad(out.square().sum(), leaves))
        if not inside:
            with vitfast.use_backend(other):
                grads.append(torch.autograd.grad(out.square().sum(), leaves))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("ws,heads", [(7, 2), (12, 1)], ids=["window7", "window12"])
def test_attention_dropout_uses_one_mask_forward_and_backward(backend, device, ws, heads):
    """Drop in the kernel, then compare against the textbook path given the keep mask every backend draws
    (`dropout_keep_ref` on each score's offset in (B, heads, nW, N, N)); window 12 has several Triton tiles."""
    from vitfast.ops.window_attention import _window_attention_op
    B, H, W, D, shift, p, seed = 1, 14, 15, 16, 3, 0.3, (1 << 40) + 1234  # (a seed with both key words)
    qkv, table, qkv_pad, _ = _inputs(B, H, W, heads, D, ws, torch.float32, device)
    nW, N = math.ceil(H / ws) * math.ceil(W / ws), ws * ws
    keep = dropout_keep_ref(seed, B, heads * nW, N, N, p, device).view(B, heads, nW, N, N)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    dout = torch.randn(B, H, W, heads * D, device=device)
    pad3 = qkv_pad.view(3, heads, D)

    def fused(qkv, table, pad3):
        return _window_attention_op(qkv, table, pad3, None, [ws, ws], [shift, shift], D ** -0.5, p,
                                    torch.tensor([seed]))[0]

    def ref(qkv, table, pad3):
        return window_attention_ref(qkv, table, ws, shift, pad3, None, D ** -0.5, keep, p).view(B, H, W, -1)

    with vitfast.use_backend(backend):
        got = _run(fused, [qkv, table, pad3], dout)
        again = fused(qkv, table, pad3)
    torch.testing.assert_close(again, got[0], rtol=0, atol=0)
    want = _run(ref, [qkv.double(), table.double(), pad3.double()], dout.double())
    for nm, g, r in zip(["out", "dqkv", "dtable", "dpad"], got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=nm)
    # training=False (or p=0) is the plain attention.
    with vitfast.use_backend(backend):
        ev = vitfast.window_attention(qkv, table, ws, shift, qkv_pad=qkv_pad, attention_dropout=p, training=False)
    torch.testing.assert_close(ev, _ref(qkv, table, ws, shift, pad3, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", CASES)
def test_window_larger_than_map_is_clamped_and_unshifted(backend, device):
    """Swin's rule: min(H, W) <= window -> window = min(H, W), shift 0 (table for the full or clamped window)."""
    B, H, W, heads, D = 1, 7, 9, 2, 16
    qkv, table12, qkv_pad, _ = _inputs(B, H, W, heads, D, 12, torch.float32, device)
    cropped = table12.view(23, 23, heads)[12 - 7: 12 + 6, 12 - 7: 12 + 6].reshape(-1, heads)
    want = _ref(qkv, cropped, 7, 0, qkv_pad, None)
    with vitfast.use_backend(backend):
        a = vitfast.window_attention(qkv, table12, 12, 6, qkv_pad=qkv_pad)
        b = vitfast.window_attention(qkv, cropped.clone(), 12, 6, qkv_pad=qkv_pad)
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, want, rtol=1e-5, atol=1e-5)
    # a table for neither window: the table-size error (cropping it failed inside a view)
    with vitfast.use_backend(backend), pytest.raises(ValueError, match="relative position bias table must be"):
        vitfast.window_attention(qkv, table12[:-1], 12, 6, qkv_pad=qkv_pad)
    # a non-square window covering neither axis (2 x 8 on 4 x 16) stays whole and shifted (it shrank to 2 x 4)
    qkv, table, qkv_pad, _ = _inputs(B, 4, 16, heads, D, 8, torch.float32, device)
    table = table[:(2 * 2 - 1) * (2 * 8 - 1)]
    with vitfast.use_backend(backend):
        got = vitfast.window_attention(qkv, table, (2, 8), (1, 4), qkv_pad=qkv_pad)
    torch.testing.assert_close(got, _ref(qkv, table, (2, 8), (1, 4), qkv_pad.view(3, heads, D), None),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("H,W", [(0, 9), (9, 0), (0, 0)])
def test_empty_map(backend, device, H, W):
    """A map with no rows or no columns gives the empty output and zero gradients, with the window clamped or not
    (the clamp made the window 0 and divided by it)."""
    qkv = torch.randn(2, H, W, 3, 2, 4, device=device, requires_grad=True)
    table = torch.randn(49, 2, device=device, requires_grad=True)
    with vitfast.use_backend(backend):
        for clamp in (True, False):
            out = vitfast.window_attention(qkv, table, 4, 2, clamp_window=clamp)
            assert out.shape == (2, H, W, 8)
            dqkv, dtable = torch.autograd.grad(out.sum(), (qkv, table))
            assert dqkv.shape == qkv.shape and torch.equal(dtable, torch.zeros_like(dtable))


@pytest.mark.parametrize("backend,device", CASES)
def test_qkv_pad_is_taken_in_qkv_dtype(backend, device):
    """A qkv_pad wider than qkv (float64 for bfloat16 qkv) gives exactly the result of the pad cast to qkv's dtype,
    the values the qkv Linear gives padding pixels (the Triton interpreter's float64 -> bfloat16 cast was wrong)."""
    qkv, table, _, _ = _inputs(1, 9, 10, 2, 8, 4, torch.bfloat16, device)
    pad = torch.randn(48, dtype=torch.float64, device=device)
    with vitfast.use_backend(backend):
        got = vitfast.window_attention(qkv, table, 4, 2, qkv_pad=pad)
        want = vitfast.window_attention(qkv, table, 4, 2, qkv_pad=pad.to(torch.bfloat16))
    assert torch.equal(got, want)


def test_torchvision_drops_the_shift_but_pads():
    """torchvision does not clamp: a 7 x 7 map with window 7 and shift 3 is one unshifted window."""
    x = torch.randn(1, 7, 7, 32)
    p = _swin_params(32, 2, 7, torch.float32, "cpu")
    args = (x, p["qkv_weight"], p["proj_weight"], p["relative_position_bias"], [7, 7], 2)
    got = vitfast.shifted_window_attention(*args, [3, 3], qkv_bias=p["qkv_bias"])
    torch.testing.assert_close(got, shifted_window_attention_ref(*args, [0, 0], qkv_bias=p["qkv_bias"]))


@pytest.mark.parametrize("backend,device", CASES)
def test_torchvision_shift_of_a_window_or_more(backend, device):
    """torchvision takes a shift in [window, padded map) and computes the same as shift % window (its roll and mask:
    each mask region holds whole windows); vitfast refused it, also in a patched torchvision model. At the padded
    size or more (torchvision then masks nothing of the roll's seam) it stays refused."""
    x = torch.randn(1, 9, 7, 16, device=device)
    p = _swin_params(16, 2, 4, torch.float32, device)
    args = (x, p["qkv_weight"], p["proj_weight"], p["relative_position_bias"], [4, 4], 2)
    for shift in ([4, 4], [5, 6], [11, 2]):
        with vitfast.use_backend(backend):
            got = vitfast.shifted_window_attention(*args, shift, qkv_bias=p["qkv_bias"])
        torch.testing.assert_close(got, shifted_window_attention_ref(*args, shift, qkv_bias=p["qkv_bias"]))
    with pytest.raises(ValueError, match=r"shift_size \(12, 1\) must be in \[0, the padded map\)"):
        vitfast.shifted_window_attention(*args, [12, 1], qkv_bias=p["qkv_bias"])


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 7, 7, 30)
    with pytest.raises(ValueError, match="C=30 must be divisible by num_heads=4"):
        vitfast.shifted_window_attention(x, torch.randn(90, 30), torch.randn(30, 30), torch.randn(169, 4), [7, 7], 4,
                                         [3, 3])
    with pytest.raises(ValueError, match="divisible"):
        vitfast.nn.ShiftedWindowAttention(30, [7, 7], [3, 3], 4)
    for qkv_w, proj_w in [((89, 30), (30, 30)), ((90, 30), (29, 30))]:  # (a view failed; a wrong proj was taken)
        with pytest.raises(ValueError, match=r"qkv_weight must be \(3C, C\) = \(90, 30\) and proj_weight \(C, C\)"):
            vitfast.shifted_window_attention(x, torch.randn(qkv_w), torch.randn(proj_w), torch.randn(169, 3), [7, 7],
                                             3, [3, 3])
    qkv = torch.randn(1, 14, 14, 3, 2, 8)
    with pytest.raises(ValueError, match=r"table must be \(169, 2\).*\(169, 3\)"):
        vitfast.window_attention(qkv, torch.randn(169, 3), 7, 3)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3, heads, D\)"):
        vitfast.window_attention(torch.randn(1, 14, 14, 48), torch.randn(169, 2), 7)
    with pytest.raises(ValueError, match=r"heads=2, N=49, got \(1, 2, 48, 49\)"):  # (the shape given, not squeezed)
        vitfast.window_attention(qkv, torch.randn(1, 2, 48, 49), 7, 3)
    with pytest.raises(ValueError, match="shift_size"):
        vitfast.window_attention(qkv, torch.randn(169, 2), 7, 7)
    with pytest.raises(ValueError, match="logit_scale must have 2"):
        vitfast.window_attention(qkv, torch.randn(169, 2), 7, 3, logit_scale=torch.zeros(3))
    with pytest.raises(ValueError, match="logit_scale must have 2 floating-point elements .* on cpu, got shape .* on "
                                         "meta"):
        vitfast.window_attention(qkv, torch.randn(169, 2), 7, 3, logit_scale=torch.zeros(2, device="meta"))
    for bad in (torch.tensor([1, 2]), torch.tensor([True, False]), torch.randn(2, dtype=torch.complex64)):
        with pytest.raises(ValueError, match=f"got shape \\(2,\\) {bad.dtype}"):  # (ran, or failed inside clamp)
            vitfast.window_attention(qkv, torch.randn(169, 2), 7, 3, logit_scale=bad)
    # a projection on another device or in another dtype was vitfast.linear's error, with x, weight and bias
    x8, w24, w8 = torch.randn(1, 4, 4, 8), torch.randn(24, 8), torch.randn(8, 8)
    for kw, names in ((dict(qkv_bias=torch.randn(24, dtype=torch.float64)), "input, qkv_weight and qkv_bias"),
                      (dict(proj_bias=torch.empty(8, device="meta")), "input, proj_weight and proj_bias")):
        with pytest.raises(ValueError, match=f"shifted_window_attention: {names} must share one device"):
            vitfast.shifted_window_attention(x8, w24, w8, torch.randn(9, 2), [2, 2], 2, [1, 1], **kw)
    with pytest.raises(ValueError, match="shifted_window_attention: input must be floating point"):
        vitfast.shifted_window_attention(torch.ones(1, 4, 4, 8, dtype=torch.long), torch.randn(24, 8),
                                         torch.randn(8, 8), torch.randn(9, 2), [2, 2], 2, [1, 1])
    x9 = torch.randn(1, 9, 9, 30)
    for shift in ([9, 1], [-1, 1], [5, 10]):  # every backend: a ValueError (cpp raised its own, torch ran)
        for backend in ("cpp", "torch"):
            with vitfast.use_backend(backend), pytest.raises(
                    ValueError, match=r"shift_size .* must be in \[0, the padded map\) for window \(3, 3\)"):
                vitfast.shifted_window_attention(x9, torch.randn(90, 30), torch.randn(30, 30), torch.randn(25, 5),
                                                 [3, 3], 5, shift)
    with vitfast.use_backend("triton"), pytest.raises(ValueError, match="float64"):
        vitfast.window_attention(qkv.double().to(DEVICE), torch.randn(169, 2, dtype=torch.float64, device=DEVICE),
                                 7, 3)
    for ws in (0, (7, -1)):
        with pytest.raises(ValueError, match="window_size must be positive"):
            vitfast.window_attention(qkv, torch.randn(169, 2), ws)
    with pytest.raises(ValueError, match="window_size must be positive"):
        vitfast.shifted_window_attention(x, torch.randn(90, 30), torch.randn(30, 30), torch.randn(169, 5), 0, 5, 0)
    # sizes that are not integers (a float window was truncated: 7.9 ran as 7; 0.5 as no shift)
    for ws, shift in ((7.9, 3), ((7, 7), (0.5, 0.5)), (torch.tensor(7), 3), ("77", 3), ((7, 7, 7), 3)):
        with pytest.raises(ValueError, match="must be an int or a pair of ints"):
            vitfast.window_attention(qkv, torch.randn(169, 2), ws, shift)
    with pytest.raises(ValueError, match=r"num_heads must be an int, got 5.0"):
        vitfast.shifted_window_attention(x, torch.randn(90, 30), torch.randn(30, 30), torch.randn(169, 5), 7, 5.0, 3)
    np = pytest.importorskip("numpy")
    table = torch.ones(169, 2)
    want = vitfast.window_attention(qkv, table, 7, 3)
    torch.testing.assert_close(vitfast.window_attention(qkv, table, np.int64(7), np.int64(3)), want)
    # (a pair of NumPy ints under fullgraph compile: Dynamo traces them as tensors)
    ws = tuple(np.array([7, 7]))
    torch.testing.assert_close(torch.compile(lambda q: vitfast.window_attention(q, table, ws, (3, 3)),
                                             fullgraph=True, backend="eager")(qkv), want)
    with pytest.raises(ValueError, match=r"\(1, 14, 14, 3, 2, 0\) needs at least one head and a head dim"):
        vitfast.window_attention(torch.randn(1, 14, 14, 3, 2, 0), torch.randn(169, 2), 7)
    with pytest.raises(ValueError, match=r"\(1, 4, 4, 3, 0, 4\) needs at least one head"):  # (a map under the window:
        vitfast.window_attention(torch.randn(1, 4, 4, 3, 0, 4), torch.randn(169, 0), 7)  # the crop raised first)
    with pytest.raises(ValueError, match="qkv_pad must be 48 .*got \\(47,\\)"):
        vitfast.window_attention(qkv, torch.randn(169, 2), 7, 3, qkv_pad=torch.randn(47))
    for p in (1.0, 1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"attention_dropout must be in \[0, 1\)"):
            vitfast.window_attention(qkv, torch.randn(169, 2), 7, 3, attention_dropout=p)
        with pytest.raises(ValueError, match=r"attention_dropout must be in \[0, 1\)"):
            vitfast.shifted_window_attention(x, torch.randn(90, 30), torch.randn(30, 30), torch.randn(169, 5), 7, 5,
                                             3, attention_dropout=p)


def test_float64_on_torch_backend_gradcheck():
    qkv = torch.randn(1, 4, 5, 3, 1, 2, dtype=torch.float64, requires_grad=True)
    table = torch.randn(25, 1, dtype=torch.float64, requires_grad=True)
    pad = torch.randn(6, dtype=torch.float64, requires_grad=True)
    with vitfast.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda a, b, c: vitfast.window_attention(a, b, 3, 1, qkv_pad=c),
                                        (qkv, table, pad))


TORCHVISION_V1_KEYS = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table",
                       "relative_position_index"}
TORCHVISION_V2_KEYS = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "logit_scale", "cpb_mlp.0.weight",
                       "cpb_mlp.0.bias", "cpb_mlp.2.weight", "relative_coords_table", "relative_position_index"}
TIMM_KEYS = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table"}


def _torchvision_swin():
    try:
        from torchvision.models import swin_transformer
        return swin_transformer
    except Exception:
        return None


@pytest.mark.parametrize("v2", [False, True])
def test_torchvision_module_names_and_outputs(v2):
    cls = vitfast.nn.ShiftedWindowAttentionV2 if v2 else vitfast.nn.ShiftedWindowAttention
    m = cls(32, [7, 7], [3, 3], 2).eval()
    assert set(m.state_dict()) == (TORCHVISION_V2_KEYS if v2 else TORCHVISION_V1_KEYS)
    x = torch.randn(2, 9, 10, 32)
    with torch.no_grad():
        if v2:
            m.qkv.bias.normal_()
        want = shifted_window_attention_ref(
            x, m.qkv.weight, m.proj.weight, m.get_relative_position_bias(), m.window_size, 2, m.shift_size,
            qkv_bias=m.qkv.bias, proj_bias=m.proj.bias, logit_scale=m.logit_scale if v2 else None, training=False)
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    tv = _torchvision_swin()
    if tv is not None:
        ref = (tv.ShiftedWindowAttentionV2 if v2 else tv.ShiftedWindowAttention)(32, [7, 7], [3, 3], 2).eval()
        ref.load_state_dict(m.state_dict())
        m.load_state_dict(ref.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def test_timm_window_attention_module_takes_factory_kwargs():
    """timm's WindowAttention takes device= and dtype= (its SwinTransformerBlock passes them)."""
    m = vitfast.nn.WindowAttention(32, num_heads=2, window_size=4, device="meta", dtype=torch.float64)
    assert {p.device.type for p in m.parameters()} == {"meta"} and {p.dtype for p in m.parameters()} == {torch.float64}
    assert m.relative_position_index.device.type == "meta"


def test_timm_window_attention_module_where_heads_do_not_divide_dim():
    """timm's WindowAttention takes head_dim = dim // num_heads when num_heads does not divide dim (qkv is
    num_heads * head_dim wide); so does vitfast's (it raised), windows and image layout alike."""
    m = vitfast.nn.WindowAttention(10, num_heads=3, window_size=2).double()
    assert m.qkv.out_features == 27 and m.proj.in_features == 9
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    x = torch.randn(2, 4, 10, dtype=torch.float64)
    q, k, v = m.qkv(x).reshape(2, 4, 3, 3, 3).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * m.scale) @ k.transpose(-2, -1) + m._get_rel_pos_bias()
    torch.testing.assert_close(m(x), m.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(2, 4, 9)))
    img = torch.randn(1, 2, 2, 10, dtype=torch.float64)
    torch.testing.assert_close(m(img), m(img.reshape(1, 4, 10)).reshape(1, 2, 2, 10))
    with pytest.raises(ValueError, match="head_dim=0"):
        vitfast.nn.WindowAttention(2, num_heads=3)


def test_timm_window_attention_module_rebuilds_its_index_after_meta_init():
    """Built on the meta device, then to_empty() and load_state_dict: the non-persistent relative_position_index
    held uninitialised memory (the mask path raised IndexError or read garbage) and nothing rebuilt it. timm's
    init_non_persistent_buffers / _init_buffers / reset_parameters now do; the index is (N, N) as timm's."""
    ref = vitfast.nn.WindowAttention(16, 2, window_size=3).eval()
    assert ref.relative_position_index.shape == (9, 9)
    m = vitfast.nn.WindowAttention(16, 2, window_size=3, device="meta").to_empty(device="cpu").eval()
    m.load_state_dict(ref.state_dict())
    m.init_non_persistent_buffers()
    assert torch.equal(m.relative_position_index, ref.relative_position_index)
    x, mask = torch.randn(4, 9, 16), torch.zeros(2, 9, 9)
    mask[1, :, :4] = -100.0
    torch.testing.assert_close(m(x, mask), ref(x, mask))
    m.relative_position_index.fill_(-1)
    m.reset_parameters()
    assert torch.equal(m.relative_position_index, ref.relative_position_index)
    assert not torch.equal(m.relative_position_bias_table, ref.relative_position_bias_table)


def test_timm_window_attention_module_sets_its_window_size_as_timm():
    """timm's Swin set_input_size calls attn.set_window_size, which vitfast's module lacked (AttributeError): the
    table resized by timm's resize_rel_pos_bias_table, index and window_area as timm's."""
    import_or_skip("timm")
    from timm.models.swin_transformer import WindowAttention

    ref = WindowAttention(16, 2, window_size=4).eval()
    mine = vitfast.nn.WindowAttention(16, 2, window_size=4).eval()
    mine.load_state_dict(ref.state_dict())
    with warnings.catch_warnings():  # timm's interpolation warns about its own indexing (torch 2.x deprecations)
        warnings.simplefilter("ignore", UserWarning)
        for m in (ref, mine):
            m.set_window_size((3, 5))
    assert mine.window_size == (3, 5) and mine.window_area == 15
    assert torch.equal(mine.relative_position_index, ref.relative_position_index)
    torch.testing.assert_close(mine.relative_position_bias_table, ref.relative_position_bias_table)
    x = torch.randn(2, 15, 16)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)


def test_timm_window_attention_module_rejects_other_shapes_clearly():
    """A 2-D input gave "not enough values to unpack", a mask of the wrong shape a reshape error."""
    m = vitfast.nn.WindowAttention(16, 2, window_size=3)
    with pytest.raises(ValueError, match=r"windows or a \(B, H, W, C\) map, got shape \(9, 16\)"):
        m(torch.randn(9, 16))
    with pytest.raises(ValueError, match=r"mask must be \(nW, 9, 9\) .* got shape \(3, 9, 9\)"):
        m(torch.randn(4, 9, 16), torch.zeros(3, 9, 9))
    with pytest.raises(ValueError, match=r"mask must be \(nW, 9, 9\) .* got shape \(2, 8, 8\)"):
        m(torch.randn(4, 9, 16), torch.zeros(2, 8, 8))
    for x in (torch.randn(4, 9, 12), torch.randn(1, 6, 6, 20)):  # (a raw matmul error before)
        with pytest.raises(ValueError, match=rf"x has {x.shape[-1]} channels, expected dim=16, got shape"):
            m(x)


@pytest.mark.parametrize("backend,device", CASES)
def test_timm_window_attention_module(backend, device):
    m = vitfast.nn.WindowAttention(32, num_heads=2, window_size=7, shift_size=3).to(device).eval()
    assert set(m.state_dict()) == TIMM_KEYS  # timm's relative_position_index is not persistent
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    wins = torch.randn(4, 49, 32, device=device)
    mask = torch.where(torch.rand(2, 49, 49, device=device) > 0.5, 0.0, -100.0)

    def timm_ref(x, mask):  # timm's WindowAttention.forward, non-fused path
        B_, N, C = x.shape
        q, k, v = m.qkv(x).reshape(B_, N, 3, 2, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * m.scale) @ k.transpose(-2, -1) + m._get_rel_pos_bias()
        if mask is not None:
            attn = attn.view(-1, mask.shape[0], 2, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, 2, N, N)
        return m.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, -1))

    img = torch.randn(1, 14, 15, 32, device=device)
    with torch.no_grad(), vitfast.use_backend(backend):
        torch.testing.assert_close(m(wins), timm_ref(wins, None), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(wins, mask), timm_ref(wins, mask), rtol=1e-5, atol=1e-5)
        got = m(img)
    want = shifted_window_attention_ref(img, m.qkv.weight, m.proj.weight, m._get_rel_pos_bias(), [7, 7], 2, [3, 3],
                                        qkv_bias=m.qkv.bias, proj_bias=m.proj.bias, training=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", CASES)
def test_matches_transformers_swin_layer(backend, device):
    modeling = pytest.importorskip("transformers.models.swin.modeling_swin")
    from transformers import SwinConfig
    config = SwinConfig(window_size=7, embed_dim=32, num_heads=[2], depths=[1], hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    H, W, C, heads = 14, 15, 32, 2
    layer = modeling.SwinLayer(config, dim=C, input_resolution=(H, W), num_heads=heads, shift_size=3).to(device)
    layer.eval()
    attn = layer.attention
    if hasattr(attn, "q_proj"):  # transformers >= 5
        q, k, v, o, table = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                             attn.relative_position_bias.relative_position_bias_table)
    else:
        q, k, v, o = attn.self.query, attn.self.key, attn.self.value, attn.output.dense
        table = attn.self.relative_position_bias_table
    with torch.no_grad():
        table.normal_()
    x = torch.randn(2, H * W, C, device=device)
    with torch.no_grad():
        want = layer(x, (H, W))[0]
        w = torch.cat([q.weight, k.weight, v.weight])
        b = torch.cat([q.bias, k.bias, v.bias])
        h = layer.layernorm_before(x).view(2, H, W, C)
        qkv = F.linear(h, w, b).view(2, H, W, 3, heads, C // heads)
        with vitfast.use_backend(backend):
            a = vitfast.window_attention(qkv, table, 7, 3, qkv_pad=b)
        s = x + o(a).view(2, H * W, C)
        got = s + layer.mlp(layer.layernorm_after(s))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_opcheck():
    from vitfast.ops.window_attention import _window_attention_op
    qkv = torch.randn(1, 5, 6, 3, 2, 4, requires_grad=True)
    table = torch.randn(25, 2, requires_grad=True)
    pad = torch.randn(3, 2, 4, requires_grad=True)
    scale = torch.rand(2, requires_grad=True) + 1
    for args in [(qkv, table, pad, None, [3, 3], [1, 1], 0.5, 0.0, None),
                 (qkv, torch.randn(2, 9, 9, requires_grad=True), None, scale, [3, 3], [0, 0], 0.5, 0.0, None)]:
        torch.library.opcheck(torch.ops.vitfast.window_attention.default, args)
    out, lse = _window_attention_op(qkv.detach(), table.detach(), pad.detach(), None, [3, 3], [1, 1], 0.5, 0.0, None)
    torch.library.opcheck(torch.ops.vitfast.window_attention_backward.default,
                          (torch.randn_like(out), qkv.detach(), table.detach(), pad.detach(), None, out, lse, [3, 3],
                           [1, 1], 0.5, 0.0, None))
    seed = torch.tensor([5])  # with dropout
    torch.library.opcheck(torch.ops.vitfast.window_attention.default,
                          (qkv, table, pad, None, [3, 3], [1, 1], 0.5, 0.3, seed))
    out, lse = _window_attention_op(qkv.detach(), table.detach(), pad.detach(), None, [3, 3], [1, 1], 0.5, 0.3, seed)
    torch.library.opcheck(torch.ops.vitfast.window_attention_backward.default,
                          (torch.randn_like(out), qkv.detach(), table.detach(), pad.detach(), None, out, lse, [3, 3],
                           [1, 1], 0.5, 0.3, seed))


def test_dropout_draws_stay_in_traced_and_exported_programs():
    """The dropout seed was a Python int drawn outside the op: torch.jit.trace kept it as a constant (one dropout mask
    on every call of the traced model) and non-strict torch.export failed on its .item(). It is a tensor now."""
    from vitfast.ops.window_attention import _window_attention_op

    def fn(qkv, table):
        return vitfast.window_attention(qkv, table, 3, 1, attention_dropout=0.5)
    qkv, table = torch.randn(1, 6, 6, 3, 2, 4), torch.randn(25, 2)
    with torch.no_grad(), vitfast.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's warnings, and trace's deprecation)
        traced = torch.jit.trace(fn, (qkv, table), check_trace=False)
        assert not torch.equal(traced(qkv, table), traced(qkv, table))

    class Module(torch.nn.Module):
        def forward(self, qkv, table):
            return fn(qkv, table)
    exported = torch.export.export(Module(), (qkv, table), strict=False).module()
    with torch.no_grad():
        assert not torch.equal(exported(qkv, table), exported(qkv, table))
    with pytest.raises(ValueError, match="needs a seed"):
        _window_attention_op(qkv, table, None, None, [3, 3], [1, 1], 0.5, 0.5, None)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_export_with_dynamic_map_size(strict):
    """shifted_window_attention tested whether the map needs padding (to pass the qkv bias as padding values only
    then), which fixed that answer in a program exported with a dynamic height or width (torch.export's constraint
    error, as torchvision's function gives). Exported at an 8 x 8 map, the program must serve padded and unpadded
    maps of other sizes as eager does; window_attention likewise, from the minimum its docstring gives."""
    torch.manual_seed(0)
    C, heads = 16, 2
    weights = [torch.randn(3 * C, C) * 0.2, torch.randn(C, C) * 0.2, torch.randn(heads, 16, 16)]
    qkv_bias, proj_bias = torch.randn(3 * C), torch.randn(C)

    class Shifted(torch.nn.Module):
        def forward(self, x):
            return vitfast.shifted_window_attention(x, *weights, [4, 4], heads, [2, 2], qkv_bias=qkv_bias,
                                                    proj_bias=proj_bias, training=False)

    class Windows(torch.nn.Module):
        def forward(self, qkv, table):
            return vitfast.window_attention(qkv, table, 4, 2)
    H, W = torch.export.Dim("H", min=5, max=64), torch.export.Dim("W", min=5, max=64)
    shifted = torch.export.export(Shifted(), (torch.randn(2, 8, 8, C),), dynamic_shapes={"x": {1: H, 2: W}},
                                  strict=strict).module()
    windows = torch.export.export(Windows(), (torch.randn(2, 8, 8, 3, heads, 8), torch.randn(49, heads)),
                                  dynamic_shapes={"qkv": {1: H, 2: W}, "table": None}, strict=strict).module()
    with torch.no_grad():
        for size in [(9, 13), (12, 16), (5, 7)]:
            x = torch.randn(2, *size, C)
            torch.testing.assert_close(shifted(x), Shifted()(x), rtol=0, atol=0)
            qkv, table = torch.randn(2, *size, 3, heads, 8), torch.randn(49, heads)
            torch.testing.assert_close(windows(qkv, table), Windows()(qkv, table), rtol=0, atol=0)


def test_torch_compile_fullgraph():
    assert_compiles_like_eager(vitfast.nn.ShiftedWindowAttention(16, [3, 3], [1, 1], 2),
                               torch.randn(1, 5, 7, 16, requires_grad=True))


_COMPILE_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vitfast.triton import window_attention as wa

dt, n_tiles, cosine_dropout, dense = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
consts = dict(HAS_PAD=not dense, DENSE_BIAS=dense, HAS_MASK=True, COSINE=cosine_dropout, DROPOUT=cosine_dropout,
              DOT_PREC="ieee" if dt == "fp32" else "tf32", UPCAST_DOT=False, BLOCK=64, BLOCK_D=32, N_TILES=n_tiles)
for fn in (wa._window_attn_fwd_kernel, wa._window_attn_bwd_kernel):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("QKV", "PAD", "OUT", "DO", "DQKV"):
            sig[name] = "*" + dt
        elif name in ("BIAS", "SCALE", "LSE", "DELTA", "DBIAS_P", "DPAD_P", "DSCALE_P"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name in ("sm_scale", "dropout_scale") else "i64" if name == "seed" else "i32"
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real kernels in the other tests")
@pytest.mark.parametrize("variant", [("bf16", 1, 1, 0), ("fp32", 3, 0, 1)], ids=["bf16-1tile-v2-dropout", "fp32-3tiles"])
def test_kernels_compile_for_hopper(variant):
    """The interpreter does not type-check like the compiler (loop-carried types, dot shapes): compile for sm_90."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, *map(str, variant)], env=env, capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0 and ("ptxas" in res.stderr or "No module named" in res.stderr):
        pytest.skip(f"no CUDA toolchain for Triton here: {res.stderr.strip().splitlines()[-1][:200]}")
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("backend,device", CASES)
def test_the_ops_check_shapes_when_called_directly(backend, device):
    """torch.ops.vitfast.window_attention called directly (as a compiled graph or opcheck does): a table, pad_qkv or
    logit_scale smaller than the window and heads say reached the triton kernel, which would read past them."""
    qkv = torch.randn(1, 6, 6, 3, 2, 4, device=device)
    table, pad = torch.randn(25, 2, device=device), torch.randn(3, 2, 4, device=device)
    op, backward = torch.ops.vitfast.window_attention, torch.ops.vitfast.window_attention_backward
    bad = [((qkv, table[:9], pad, None), r"bias must be a \(25, 2\) table or dense \(2, 9, 9\)"),
           ((qkv, table, pad[:, :1], None), r"pad_qkv must be \(3, 2, 4\)"),
           ((qkv, table, pad, torch.ones(1, device=device)), r"logit_scale must be \(2,\)")]
    with vitfast.use_backend(backend):
        for args, message in bad:
            with pytest.raises(ValueError, match=message):
                op(*args, [3, 3], [1, 1], 0.5, 0.0, None)
        with pytest.raises(ValueError, match=r"shift_size \(3, 1\) in \[0, window\)"):
            op(qkv, table, pad, None, [3, 3], [3, 1], 0.5, 0.0, None)
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):  # (NaN from torch's)
            op(qkv, table, pad, None, [3, 3], [1, 1], 0.5, 1.0, torch.tensor([1]))
        out, lse = op(qkv, table, pad, None, [3, 3], [1, 1], 0.5, 0.0, None)
        with pytest.raises(ValueError, match=r"shapes do not agree: dout \(.*\) \(expected "):
            backward(out[..., :4], qkv, table, pad, None, out, lse, [3, 3], [1, 1], 0.5, 0.0, None)
        with pytest.raises(ValueError, match=r"shapes do not agree: lse "):
            backward(torch.ones_like(out), qkv, table, pad, None, out, lse[:, :1], [3, 3], [1, 1], 0.5, 0.0, None)
