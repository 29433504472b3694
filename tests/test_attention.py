import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast.ops.attention import attention_ref, dropout_keep_ref

from conftest import DEVICE, assert_close_to_ref, assert_compiles_like_eager, backend_cases, rounding_noise

CASES = backend_cases("attention")
LOW = (torch.float16, torch.bfloat16)


def _assert_all_close(names, got, ref, plain, noise, what, lse_max):
    """conftest's accuracy rule for every tensor of a case. The gradients' ulp floor is taken relative to the largest
    reference value of the whole case: gradients of attention are differences of rounded terms
    (dS = P * (dP - rowsum(dO * O))), so one can be near zero while its terms are not (a single key gives dq = 0
    exactly, where plain PyTorch's autograd happens to be exact and any flash backward is not). It also grows with
    `lse_max`, the largest |log-sum-exp| of a row: a flash backward recomputes P = exp(S - lse) from the saved fp32
    lse, whose rounding (half an ulp of |lse|) scales a whole row of P, a relative error of eps * |lse| / 2 in every
    term of that row's gradients."""
    scale = max([1.0] + [r.abs().max().item() for r in ref if r.numel()]) * max(1.0, lse_max / 2)
    for nm, g, rf, p, n in zip(names, got, ref, plain, noise):
        assert_close_to_ref(g, rf, p, f"{what} {nm}", noise=n, scale=None if nm == "out" else scale)


def _lse_max(q, k, mask, scale, is_causal=False, causal_offset=0):
    """The largest |log-sum-exp| over the rows that see a key, in float64."""
    d = q.shape[-1]
    s = (q.double() @ k.double().transpose(-2, -1)) * (d ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(causal_offset + 1),
                           float("-inf"))
    lse = torch.logsumexp(s, -1)
    lse = lse[torch.isfinite(lse)]
    return lse.abs().max().item() if lse.numel() else 0.0


def _qkv(B, H, Nq, Nk, D, dtype, device=DEVICE):
    q = torch.randn(B, H, Nq, D, dtype=dtype, device=device)
    k = torch.randn(B, H, Nk, D, dtype=dtype, device=device)
    v = torch.randn(B, H, Nk, D, dtype=dtype, device=device)
    return q, k, v


def _mask(kind, shape, dtype, device=DEVICE):
    """A mask of `shape`: "bool" (about 1/4 masked, key 0 always visible), "float" (a random bias with
    some -inf), "dead" (bool, every other query row fully masked) or None."""
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(shape, device=device) > 0.25
        m[..., 0] = True
        return m
    if kind == "dead":
        m = torch.rand(shape, device=device) > 0.25
        m[..., ::2, :] = False
        return m
    bias = torch.randn(shape, dtype=dtype, device=device)
    return bias.masked_fill(torch.rand(shape, device=device) < 0.1, float("-inf"))


def _run(fn, q, k, v, mask, dout, bias_grad, **kw):
    """Output and every gradient (q, k, v, and the float mask when bias_grad)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    m = mask
    if mask is not None and bias_grad:
        m = mask.detach().clone().requires_grad_()
        leaves.append(m)
    out = fn(leaves[0], leaves[1], leaves[2], m, **kw)
    return [out] + list(torch.autograd.grad(out, leaves, dout))


@contextlib.contextmanager
def _poisoned_empty():
    """torch.empty returns NaN-filled float tensors, so that an element a kernel fails to write shows."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    with mock.patch.object(torch, "empty", empty):
        yield


def _check(backend, device, B, H, Nq, Nk, D, dtype, mask_kind=None, mask_shape=None, is_causal=False,
           bias_grad=False, scale=None, dropout_p=0.0):
    """vitfast.attention on `backend` vs the fp64 reference (and plain PyTorch in `dtype`): output and every
    gradient. With dropout, the reference applies the keep-mask of the seed vitfast draws."""
    q, k, v = _qkv(B, H, Nq, Nk, D, dtype, device)
    mask = _mask(mask_kind, mask_shape or (B, H, Nq, Nk), dtype, device)
    bias_grad = bias_grad and mask is not None and mask.dtype != torch.bool
    dout = torch.randn(B, H, Nq, D, dtype=dtype, device=device)
    keep = None
    if dropout_p > 0:
        state = torch.get_rng_state()
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())  # the draw vitfast.attention makes
        torch.set_rng_state(state)
        keep = dropout_keep_ref(seed, B, H, Nq, Nk, dropout_p, device)
    with vitfast.use_backend(backend), _poisoned_empty():
        got = _run(lambda *a: vitfast.attention(*a, is_causal=is_causal, scale=scale, dropout_p=dropout_p),
                   q, k, v, mask, dout, bias_grad)

    def ref_fn(*a):
        return attention_ref(*a, is_causal=is_causal, scale=scale, dropout_keep=keep, dropout_p=dropout_p)
    d = lambda t: t.double() if t is not None and t.is_floating_point() else t  # noqa: E731
    ref = _run(ref_fn, d(q), d(k), d(v), d(mask), d(dout), bias_grad)
    noise = rounding_noise(lambda t: _run(ref_fn, *t, bias_grad), [d(q), d(k), d(v), d(mask), d(dout)], dtype)
    plain = _run(ref_fn, q, k, v, mask, dout, bias_grad)
    _assert_all_close(["out", "dq", "dk", "dv", "dbias"], got, ref, plain, noise, backend,
                      _lse_max(q, k, mask, scale, is_causal))
    return keep


# (B, H, Nq, Nk, D): N in {1, 49, 50, 77, 197, 257}, cross-attention, non-power-of-two head dims.
SHAPES = [(1, 1, 1, 1, 16), (1, 2, 49, 49, 40), (2, 1, 50, 77, 72), (1, 1, 77, 50, 80), (1, 1, 33, 17, 88),
          (1, 1, 20, 45, 96), (1, 1, 19, 23, 112), (1, 1, 24, 31, 160), (1, 1, 18, 40, 256), (1, 2, 197, 197, 64)]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64(backend, device, shape):
    _check(backend, device, *shape, torch.float32)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("shape", [(1, 1, 5, 1025, 16), (1, 1, 577, 7, 16), (1, 1, 2, 4096, 16),
                                   (1, 1, 100, 850, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_long_sequences(backend, device, shape):
    _check(backend, device, *shape, torch.float16, mask_kind="bool", mask_shape=(1, 1, 1, shape[3]))


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(1, 2, 49, 49, 64), (2, 1, 30, 77, 40), (1, 1, 257, 33, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_low_precision(backend, device, dtype, shape):
    _check(backend, device, *shape, dtype, mask_kind="float", mask_shape=(1, shape[1], shape[2], shape[3]),
           bias_grad=True)


MASKS = [("bool", "B11K"), ("bool", "QK"), ("bool", "BHQK"), ("float", "1HQK"), ("float", "B11K"),
         ("float", "BHQ1"), ("float", "11QK"), ("dead", "BHQK"), ("dead", "B1Q1")]


def _shape(code, B, H, Nq, Nk):
    dims = {"B": B, "H": H, "Q": Nq, "K": Nk, "1": 1}
    return tuple(dims[c] for c in code)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("kind,code", MASKS, ids=lambda x: x)
@pytest.mark.parametrize("is_causal", [False, True])
def test_masks_and_bias_grad(backend, device, kind, code, is_causal):
    B, H, Nq, Nk = 2, 2, 37, 45
    _check(backend, device, B, H, Nq, Nk, 24, torch.float32, mask_kind=kind,
           mask_shape=_shape(code, B, H, Nq, Nk), is_causal=is_causal, bias_grad=True)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("Nq,Nk", [(70, 70), (40, 70), (70, 40)])
def test_causal(backend, device, Nq, Nk):
    _check(backend, device, 1, 2, Nq, Nk, 32, torch.float32, is_causal=True, scale=0.3)


@pytest.mark.parametrize("backend,device", CASES)
def test_fully_masked_rows_give_zeros_and_zero_grads(backend, device):
    B, H, Nq, Nk, D = 2, 1, 40, 35, 16
    q, k, v = _qkv(B, H, Nq, Nk, D, torch.float32, device)
    pad = torch.ones(B, 1, 1, Nk, dtype=torch.bool, device=device)
    pad[1] = False  # the second sequence is all padding
    bias = torch.zeros(B, 1, 1, Nk, device=device).masked_fill(~pad, float("-inf")).requires_grad_()
    for mask in (pad, bias):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with vitfast.use_backend(backend):
            out = vitfast.attention(*leaves, mask)
            grads = torch.autograd.grad(out.square().sum() + out.sum(), leaves + ([mask] if mask.requires_grad else []))
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))
        assert torch.equal(grads[1][1], torch.zeros_like(grads[1][1]))
        if mask.requires_grad:
            assert torch.equal(grads[3][1], torch.zeros_like(grads[3][1]))
        torch.testing.assert_close(out[0], attention_ref(q[:1], k[:1], v[:1], pad[:1])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", CASES)
def test_non_finite_query_that_sees_no_key_leaves_the_gradients_alone(backend, device):
    """A query row hidden from every key (padding garbage, the top rows of a bottom-right causal mask) holding NaN or
    inf: its output and gradient are zeros and dK is that of the other rows (dK = dS^T @ Q took 0 * NaN)."""
    B, H, Nq, Nk, D = 1, 2, 6, 5, 8
    q, k, v = _qkv(B, H, Nq, Nk, D, torch.float32, device)
    q[:, 0, 0, 1], q[:, 1, 0, 2] = float("nan"), float("inf")
    mask = torch.ones(B, 1, Nq, Nk, dtype=torch.bool, device=device)
    mask[:, :, 0] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with vitfast.use_backend(backend):
        out = vitfast.attention(*leaves, mask)
        dout = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    ref = [t[:, :, 1:].double() if i == 0 else t.double() for i, t in enumerate((q, k, v))]
    ref = [t.requires_grad_() for t in ref]
    want = F.scaled_dot_product_attention(*ref)
    want_dk, want_dv = torch.autograd.grad(want, ref[1:], dout[:, :, 1:].double())
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert torch.equal(dq[:, :, 0], torch.zeros_like(dq[:, :, 0]))
    torch.testing.assert_close(out[:, :, 1:].double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dk.double(), want_dk, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dv.double(), want_dv, rtol=1e-4, atol=1e-5)


def test_full_mask_under_dynamic_shapes():
    """A mask of the full (B, H, Nq, Nk) shape under torch.compile(dynamic=True): the shape check `m not in (1, t)`
    is False under dynamo for a symbolic t equal to m, which refused a valid mask (transformers' Swin on a forced
    backend)."""
    q, k, v = _qkv(1, 2, 16, 16, 8, torch.float32, "cpu")

    def f(q, k, v):  # (a mask of static sizes, q's symbolic)
        return vitfast.attention(q, k, v, torch.arange(256.0).view(1, 1, 16, 16).expand(1, 2, 16, 16) / 256)
    torch._dynamo.reset()
    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_saturated_softmax_gives_exact_zero_gradients_on_the_reference_paths(backend):
    """Scores past 2**20 take the cpp and torch backends' reference code, where the softmax saturates (one key per row
    takes all the weight) and the exact dQ, dK are 0, as plain float32 SDPA gives: delta = rowsum(dO * O) left
    |dS| ~ 1 ulp of dP, times |k| ~ 1e3 in dQ (4e-4); rowsum(P * dP) cancels it."""
    if backend == "cpp" and not vitfast._ext.HAS_EXT:
        pytest.skip(vitfast._ext.EXT_ERROR)
    q, k, v = _qkv(1, 2, 16, 16, 16, torch.float32, "cpu")
    q, k = (q * 1e3).requires_grad_(), (k * 1e3).requires_grad_()
    v = v.requires_grad_()
    with vitfast.use_backend(backend):
        out = vitfast.attention(q, k, v)
        dq, dk, _ = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq.abs().max() < 1e-6 and dk.abs().max() < 1e-6, (dq.abs().max(), dk.abs().max())


@pytest.mark.parametrize("backend,device", CASES)
def test_expanded_mask_leaf_gets_a_gradient_per_element(backend, device):
    """A float mask that is itself an expand()ed leaf (stride 0, requires grad) gets one gradient per element, as
    from SDPA; its expanded dims were read as broadcast dims, which put each row's sum in the first column. An
    expand of a tensor that requires grad keeps its reduced gradient (autograd's expand backward)."""
    B, H, Nq, Nk, D = 1, 2, 4, 5, 8
    q, k, v = _qkv(B, H, Nq, Nk, D, torch.float32, device)
    base = torch.randn(1, 1, Nq, 1, device=device)
    for kind in ("leaf", "expand", "retained"):  # (an expand that retains its grad: per element, like a leaf)
        src = base.clone().requires_grad_(kind != "leaf")
        mask = src.expand(B, H, Nq, Nk)
        if kind == "leaf":
            mask = mask.detach().requires_grad_()
        if kind == "retained":
            mask.retain_grad()
        wanted = mask.detach().double().expand(B, H, Nq, Nk).clone().requires_grad_()
        with vitfast.use_backend(backend):
            out = vitfast.attention(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), wanted)
        dout = torch.randn_like(ref)
        (out.double() * dout).sum().backward()
        (ref * dout).sum().backward()
        got, want = ((src.grad, wanted.grad.sum((0, 1, 3), keepdim=True)) if kind == "expand"
                     else (mask.grad, wanted.grad))
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend,device", CASES)
def test_finite_mask_is_plain_arithmetic(backend, device):
    """Hugging Face's padding value torch.finfo(float32).min on some keys, and on every key of rows 1 and 4: SDPA's
    math (the float64 reference) gives those rows the mean of v; every backend does, and its gradients too."""
    B, H, Nq, Nk, D = 2, 2, 9, 12, 16
    q, k, v = _qkv(B, H, Nq, Nk, D, torch.float32, device)
    lowest = torch.finfo(torch.float32).min
    mask = torch.randn(B, H, Nq, Nk, device=device)
    mask[..., -3:] = lowest
    mask[:, :, [1, 4]] = lowest
    dout = torch.randn(B, H, Nq, D, device=device)
    with vitfast.use_backend(backend):
        got = _run(vitfast.attention, q, k, v, mask, dout, True)
    ref = _run(attention_ref, q.double(), k.double(), v.double(), mask.double(), dout.double(), True)
    plain = _run(attention_ref, q, k, v, mask, dout, True)
    # No rounding-noise or lse floor: perturbing finfo.min by one rounding moves a score by ~1e31, and the saved
    # statistics keep the row max apart from log(l) precisely so that |lse| costs nothing here.
    _assert_all_close(["out", "dq", "dk", "dv", "dmask"], got, ref, plain, [0.0] * 5, backend, 0.0)
    torch.testing.assert_close(got[0][:, :, [1, 4]], v.mean(2, keepdim=True).expand(B, H, 2, D))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch.testing.assert_close(got[0], F.scaled_dot_product_attention(q, k, v, mask))


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("kind", ["bool", "-inf"])
def test_hidden_keys_never_reach_other_rows(backend, device, kind):
    """Keys hidden by the mask hold NaN, inf, or a k whose fp32 score overflows: the output and the gradients are
    those of the same keys holding zeros. A row that sees no key is zero with zero gradients. A key hidden from
    some rows only, with NaN in v, leaves those rows exact and makes the rows that see it NaN."""
    B, H, Nq, Nk, D = 2, 2, 9, 12, 16
    q, k, v = _qkv(B, H, Nq, Nk, D, torch.float32, device)
    visible = torch.ones(B, H, Nq, Nk, dtype=torch.bool, device=device)
    visible[..., [3, 7, 10]] = False  # padding keys
    visible[:, :, 2] = False  # a row that sees no key
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, [3, 7, 10]] = 0.0
    v_bad[:, :, [3, 7, 10]] = 0.0
    k_bad[:, :, 3], v_bad[:, :, 3] = float("nan"), float("nan")
    k_bad[:, :, 7], v_bad[:, :, 7] = 3e38, float("inf")  # q.k overflows to +-inf
    k_bad[:, :, 10], v_bad[:, :, 10, ::2] = float("-inf"), float("-inf")

    def as_mask(vis):
        return vis if kind == "bool" else torch.zeros(vis.shape, device=device).masked_fill(~vis, float("-inf"))
    dout = torch.randn(B, H, Nq, D, device=device)
    clean = [t.masked_fill(~visible[:, :, 0, :, None], 0.0) for t in (k, v)]
    with vitfast.use_backend(backend):
        got = _run(vitfast.attention, q, k_bad, v_bad, as_mask(visible), dout, False)
    ref = _run(attention_ref, q.double(), clean[0].double(), clean[1].double(), as_mask(visible).double()
               if kind != "bool" else visible, dout.double(), False)
    plain = _run(attention_ref, q, clean[0], clean[1], as_mask(visible), dout, False)
    ref_mask = as_mask(visible).double() if kind != "bool" else visible
    noise = rounding_noise(lambda t: _run(attention_ref, *t[:3], ref_mask, t[3], False),
                           [q.double(), clean[0].double(), clean[1].double(), dout.double()], torch.float32)
    _assert_all_close(["out", "dq", "dk", "dv"], got, ref, plain, noise, f"{backend} {kind}",
                      _lse_max(q, clean[0], ref_mask, None))
    assert torch.equal(got[0][:, :, 2], torch.zeros_like(got[0][:, :, 2]))
    assert torch.equal(got[1][:, :, 2], torch.zeros_like(got[1][:, :, 2]))
    for g in got[2:]:
        assert torch.equal(g[:, :, [3, 7, 10]], torch.zeros_like(g[:, :, [3, 7, 10]]))

    partial = visible.clone()
    partial[:, :, :5, 5] = False  # key 5 hidden from rows 0..4 only
    v_nan = v.clone()
    v_nan[:, :, 5, 1] = float("nan")
    with vitfast.use_backend(backend):
        out = vitfast.attention(q, k, v_nan, as_mask(partial))
    expected = attention_ref(q.double(), k.double(), v.double(), as_mask(partial).double() if kind != "bool"
                             else partial)
    torch.testing.assert_close(out[:, :, :5].double(), expected[:, :, :5], rtol=1e-5, atol=1e-5)
    assert partial[:, :, 5:, 5].all()  # rows 5.. see key 5: NaN exactly in v's NaN component
    assert out[:, :, 5:, 1].isnan().all() and torch.isfinite(out[:, :, 5:, 0]).all()
    # a key whose score is NaN (NaN in k) and whose v is +inf: the rows that see it are NaN, as the arithmetic gives
    # (they were +inf: the fill of inf where v's inf reaches a row overwrote the NaN from the score)
    k_nan, v_inf = k.clone(), v.clone()
    k_nan[:, :, 5], v_inf[:, :, 5] = float("nan"), float("inf")
    with vitfast.use_backend(backend):
        out = vitfast.attention(q, k_nan, v_inf, as_mask(partial))
    torch.testing.assert_close(out[:, :, :5].double(), expected[:, :, :5], rtol=1e-5, atol=1e-5)
    assert out[:, :, 5:].isnan().all()


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", LOW)
def test_hidden_non_finite_keys_in_low_precision(backend, device, dtype):
    """A key hidden from every row holds NaN in k and v, in fp16 and bf16: the output and dQ stay finite (under the
    interpreter, which holds bf16 as raw 16-bit integers, the finiteness test saw every bf16 value as finite and the
    NaN reached every row)."""
    q, k, v = _qkv(1, 1, 4, 4, 16, dtype, device)
    visible = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=device)
    visible[..., 0] = False
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[0, 0, 0, 0] = v_bad[0, 0, 0, 0] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k_bad, v_bad)]
    with vitfast.use_backend(backend):
        out = vitfast.attention(*leaves, visible)
        dq = torch.autograd.grad(out.float().sum(), leaves[0])[0]
    assert torch.isfinite(out).all() and torch.isfinite(dq).all(), (out, dq)
    clean = [t.float().masked_fill(~visible[:, :, 0, :, None], 0.0) for t in (k, v)]
    torch.testing.assert_close(out.float(), attention_ref(q.float(), *clean, visible), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] != "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_regenerates_the_seeded_mask(backend, device, dtype):
    keep = _check(backend, device, 2, 2, 33, 41, 24, dtype, mask_kind="float", mask_shape=(2, 1, 1, 41),
                  is_causal=True, bias_grad=True, dropout_p=0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.03


def test_dropout_keep_mask_statistics():
    keep = dropout_keep_ref(2**40 + 7, 2, 3, 64, 96, 0.1)
    assert abs(keep.float().mean().item() - 0.9) < 0.01
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep, dropout_keep_ref(2**40 + 8, 2, 3, 64, 96, 0.1))


@pytest.mark.skipif(not vitfast._ext.HAS_EXT, reason="needs the C++ extension")
def test_cpp_dropout_keep_is_the_reference_philox():
    """The C++ draw (the torch backends' mask on CPU, the C++ window kernel's) is dropout_keep_ref's bit for bit: seeds
    with both key words, offsets past 2**32, chunks drawn in parallel, every vector copy (make
    test-cpu-capabilities runs this again under ATEN_CPU_CAPABILITY=default and avx2)."""
    from vitfast.ops.attention import _philox_keep, dropout_keep
    for seed, offset, n in ((0, 0, 40000), (2**40 + 7, 2**32 - 500, 1500), (2**62 - 1, 2**40 + 3, 777)):
        for p in (0.0, 0.1, 0.5, 0.999):
            want = _philox_keep(seed, torch.arange(offset, offset + n), p)
            assert torch.equal(vitfast._ext._C.dropout_keep(seed, offset, n, p), want), (seed, offset, p)
    assert torch.equal(dropout_keep(5, (2, 3, 7, 9), 0.3, torch.device("cpu")), dropout_keep_ref(5, 2, 3, 7, 9, 0.3))
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        vitfast._ext._C.dropout_keep(0, 0, 10, 1.0)


@pytest.mark.parametrize("backend,device", CASES)
def test_keys_under_2_pow_minus_24_keep_their_gradient(backend, device):
    """A row whose second key has weight e^-17.5 (its sum of exp is exactly 1 in fp32) but v = 1000: that key moves
    the output, so the score gradients are not 0. (Zeroing dS where the sum is exactly 1, tried for saturated rows,
    gave dq = dbias = 0 here.)"""
    D = 16
    q = torch.zeros(1, 1, 1, D, dtype=torch.float64, device=device)
    k = torch.randn(1, 1, 2, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    v = torch.zeros(1, 1, 2, D, dtype=torch.float64, device=device)
    v[..., 1, :] = 1000.0
    bias = torch.tensor([0.0, -17.5], dtype=torch.float64, device=device).view(1, 1, 1, 2)
    leaves = [t.requires_grad_() for t in (q, k, bias)]
    want = torch.autograd.grad(attention_ref(q, k, v, bias), leaves, torch.ones(1, 1, 1, D, dtype=torch.float64,
                                                                                device=device))
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    with vitfast.use_backend(backend):
        out = vitfast.attention(leaves32[0], leaves32[1], v.float(), leaves32[2])
        got = torch.autograd.grad(out, leaves32, torch.ones_like(out))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("op", ["attention", "rel_pos_attention"])
def test_ops_called_directly_check_the_dropout_seed(op):
    """torch.ops.vitfast.attention / rel_pos_attention with dropout_p > 0 need a (1,) int64 CPU seed: without one the
    triton backend ran seed 0 and the torch backend failed on None.item()."""
    q = torch.randn(1, 2, 4, 8)
    extra = (torch.zeros(1, 2, 4, 2), torch.zeros(1, 2, 4, 2)) if op == "rel_pos_attention" else (None,)
    tail = (0.5, 0.125) if op == "rel_pos_attention" else (0.5, False, 0, 0.125)
    fn = getattr(torch.ops.vitfast, op)
    with vitfast.use_backend("torch"):
        with pytest.raises(ValueError, match=f"vitfast::{op}: dropout_p 0.5 > 0 needs a seed"):
            fn(q, q, q, *extra, None, *tail)
        with pytest.raises(ValueError, match=r"seed must be a \(1,\) int64 CPU tensor, got \(2,\) torch.int64"):
            fn(q, q, q, *extra, torch.zeros(2, dtype=torch.int64), *tail)
        seed = torch.tensor([2**40 + 3])
        assert torch.equal(fn(q, q, q, *extra, seed, *tail)[0], fn(q, q, q, *extra, seed, *tail)[0])


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] == "cpp"])
def test_cpp_backend_rejects_dropout_when_forced(backend, device):
    q, k, v = _qkv(1, 1, 4, 4, 16, torch.float32, device)
    with vitfast.use_backend("cpp"), pytest.raises(ValueError, match="dropout") as err:
        vitfast.attention(q, k, v, dropout_p=0.5)
    assert "int64" not in str(err.value)  # the inputs listed are the caller's, not the seed vitfast drew
    with vitfast.use_backend("triton"), pytest.raises(ValueError, match=r"inputs \[\(1, 1, 4, 16\) torch.int64"):
        vitfast.choose_backend("attention", q.long(), k, v)  # (an int64 input that is no seed stays listed)
    assert vitfast.choose_backend("attention", q, k, v, None, torch.zeros(1, dtype=torch.int64)) == "torch"


@pytest.mark.parametrize("backend,device", CASES)
def test_deterministic_backward(backend, device):
    B, H, Nq, Nk, D = 2, 2, 40, 36, 32
    q, k, v = _qkv(B, H, Nq, Nk, D, torch.float32, device)
    bias = torch.randn(1, H, Nq, Nk, device=device)
    dout = torch.randn(B, H, Nq, D, device=device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with vitfast.use_backend(backend):
            first = _run(vitfast.attention, q, k, v, bias, dout, True)
            second = _run(vitfast.attention, q, k, v, bias, dout, True)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    inputs64 = [t.double() for t in (q, k, v, bias, dout)]
    ref = _run(attention_ref, *inputs64, True)
    noise = rounding_noise(lambda t: _run(attention_ref, *t, True), inputs64, torch.float32)
    plain = _run(attention_ref, q, k, v, bias, dout, True)
    _assert_all_close(["out", "dq", "dk", "dv", "dbias"], first, ref, plain, noise, f"{backend} deterministic",
                      _lse_max(q, k, bias, None))


@pytest.mark.parametrize("backend,device", CASES)
def test_packed_qkv_views_are_read_in_place(backend, device, monkeypatch):
    B, N, H, D = 2, 50, 3, 40
    x = torch.randn(B, N, 3, H, D, device=device)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views of one (B, N, 3*H*D) projection
    seen = []
    if backend == "triton":
        import vitfast.triton.attention as tri
        launch = tri.attention_fwd

        def spy(q_, k_, v_, *args):
            seen.append((q_.data_ptr(), k_.data_ptr(), v_.data_ptr()))
            return launch(q_, k_, v_, *args)
        monkeypatch.setattr(tri, "attention_fwd", spy)
    with vitfast.use_backend(backend):
        out = vitfast.attention(q, k, v)
    if backend == "triton":
        assert seen == [(q.data_ptr(), k.data_ptr(), v.data_ptr())]
    torch.testing.assert_close(out.double(), attention_ref(q.double(), k.double(), v.double()), rtol=1e-5, atol=1e-5)
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D) buffer: merging heads is free


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("Nq,Nk,causal", [(30, 30, True), (20, 45, True), (45, 20, True), (20, 45, False)])
def test_flash_attn_func_layout_and_bottom_right_causal(backend, device, Nq, Nk, causal):
    B, H, D = 2, 2, 32
    q = torch.randn(B, Nq, H, D, device=device, requires_grad=True)
    k = torch.randn(B, Nk, H, D, device=device, requires_grad=True)
    v = torch.randn(B, Nk, H, D, device=device, requires_grad=True)
    with vitfast.use_backend(backend):
        out = vitfast.flash_attn_func(q, k, v, softmax_scale=0.2, causal=causal)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert out.shape == (B, Nq, H, D) and out.is_contiguous()
    d = [t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*d, None, causal, 0.2, causal_offset=Nk - Nq).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref.sum(), d)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_flash_attn_func_errors_name_the_callers_shapes():
    """Shape errors give the (B, N, H, D) shapes the caller passed (they gave them transposed: (1, 4, 8, 16) for a q
    of (1, 8, 4, 16), N and H read swapped)."""
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)  # (flash-attn's GQA, which vitfast does not take)
    want = r"\(B, N, H, D\)\); got q \(1, 8, 4, 16\), k \(1, 8, 2, 16\), v \(1, 8, 2, 16\)"
    with pytest.raises(ValueError, match=want):
        vitfast.flash_attn_func(q, k, k)


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] != "triton"])
def test_float64_gradcheck(backend, device):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 5, 6, 8, torch.float64, device))
    bias = torch.randn(1, 2, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    with vitfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, c, m: vitfast.attention(a, b, c, m, is_causal=True),
                                        (q, k, v, bias), fast_mode=True)


@pytest.mark.skipif(not any(c.values[0] == "triton" for c in CASES), reason="no triton backend on this machine")
def test_triton_rejects_float64_clearly():
    q, k, v = _qkv(1, 1, 4, 4, 16, torch.float64)
    with vitfast.use_backend("triton"), pytest.raises(ValueError, match="float64"):
        vitfast.attention(q, k, v)


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_sequences(backend, device):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 1, 0, 5, 16, torch.float32, device))
    with vitfast.use_backend(backend):
        out = vitfast.attention(q, k, v)
        out.sum().backward()
    assert out.shape == (2, 1, 0, 16) and torch.equal(k.grad, torch.zeros_like(k))


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(2, 3, 5, 7, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, H, N, D\), got rank 3.*\(3, 5, 16\)"):
        vitfast.attention(q[0], k, v)
    with pytest.raises(ValueError, match="one head dim, got 16, 8, 16"):
        vitfast.attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="one dtype, got torch.float32, torch.float16"):
        vitfast.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="one device, got cpu, meta"):
        vitfast.attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 3, 5, 6\) does not broadcast.*\(2, 3, 5, 7\)"):
        vitfast.attention(q, k, v, torch.ones(2, 3, 5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 1, 1, 7\) does not broadcast"):
        vitfast.attention(q, k, v, torch.ones(3, 1, 1, 7))
    big = torch.randn(1, 1, 4, 320)
    with pytest.raises(ValueError, match="head dim 320 is not supported"):
        vitfast.attention(big, big, big)
    with pytest.raises(ValueError, match="batch and heads"):
        vitfast.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="dropout_p must be in"):
        vitfast.attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="bool or floating point"):
        vitfast.attention(q, k, v, torch.ones(5, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"flash_attn_func: q must be 4-D \(B, N, H, D\)"):
        vitfast.flash_attn_func(q[0], k, v)
    with pytest.raises(ValueError, match="dtype torch.int32 is not supported"):
        vitfast.attention(*(t.int() for t in (q, k, v)))


def test_cpp_kernel_checks_its_inputs():
    if not vitfast._ext.HAS_EXT:
        pytest.skip(vitfast._ext.EXT_ERROR)
    q, k, v = _qkv(1, 2, 3, 4, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="attn_mask"):
        torch.ops.vitfast.attention_fwd(q, k, v, torch.ones(1, 2, 3, 5), 0.0, False, 0, 1.0)
    with pytest.raises(RuntimeError, match="dropout"):
        torch.ops.vitfast.attention_fwd(q, k, v, None, 0.1, False, 0, 1.0)


def _opcheck_args(requires_grad, device):
    q, k, v = (t.requires_grad_(requires_grad) for t in _qkv(2, 2, 7, 9, 16, torch.float32, device))
    bias = torch.randn(1, 2, 7, 9, device=device, requires_grad=requires_grad)
    pad = torch.rand(2, 1, 1, 9, device=device) > 0.3
    seed = torch.tensor([99], dtype=torch.int64)
    return [(q, k, v, None, None, 0.0, False, 0, 0.25), (q, k, v, bias, None, 0.0, True, 0, 0.25),
            (q, k, v, pad, None, 0.0, True, 2, 0.25), (q, k, v, pad, seed, 0.2, False, 0, 0.25)]


@pytest.mark.parametrize("backend,device", CASES)
def test_opcheck(backend, device):
    with vitfast.use_backend(backend):
        for a in _opcheck_args(True, device):
            if backend == "cpp" and a[4] is not None:
                continue
            torch.library.opcheck(torch.ops.vitfast.attention.default, a)
        q, k, v, bias = _opcheck_args(False, device)[1][:4]
        out, lse = torch.ops.vitfast.attention(q, k, v, bias, None, 0.0, True, 0, 0.25)
        torch.library.opcheck(torch.ops.vitfast.attention_backward.default,
                              (torch.randn_like(out), q, k, v, out, lse, bias, None, 0.0, True, 0, 0.25, True, False))


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self, dim=48, heads=3):
            super().__init__()
            self.heads = heads
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, x, pad):
            B, N, C = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            y = vitfast.attention(q, k, v, pad[:, None, None, :])
            return self.proj(y.transpose(1, 2).reshape(B, N, C))

    assert_compiles_like_eager(Block(), torch.randn(2, 11, 48, requires_grad=True), torch.rand(2, 11) > 0.2)


def test_matches_sdpa_semantics():
    q, k, v = _qkv(2, 3, 9, 9, 16, torch.float32)
    m = torch.rand(2, 1, 9, 9) > 0.3
    m[..., 0] = True
    bias = torch.randn(1, 3, 9, 9)
    for kw in (dict(attn_mask=m), dict(attn_mask=bias), dict(is_causal=True), dict(attn_mask=bias, scale=0.1)):
        torch.testing.assert_close(vitfast.attention(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="65536+ programs and 2**31 elements need a GPU")
def test_large_grid_and_int64_offsets():
    q = torch.randn(70_000, 1, 16, 16, device="cuda", dtype=torch.float16)
    with vitfast.use_backend("triton"):
        out = vitfast.attention(q, q, q)
    torch.testing.assert_close(out[-3:].float(), attention_ref(q[-3:].float(), q[-3:].float(), q[-3:].float()),
                               rtol=2e-2, atol=2e-2)
    del q, out
    B, H, N, D = 2**31 // (8 * 1024 * 64) + 1, 8, 1024, 64
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.float16)
    with vitfast.use_backend("triton"):
        out = vitfast.attention(q, q, q)
    tail = q[-1:, -1:]
    torch.testing.assert_close(out[-1:, -1:].float(), attention_ref(tail.float(), tail.float(), tail.float()),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend,device", CASES)
def test_the_ops_check_shapes_when_called_directly(backend, device):
    """torch.ops.vitfast.attention called directly (as a compiled graph or opcheck does): k, v or a mask smaller
    than q says reached the triton kernel, which would read past them."""
    q, k = torch.randn(1, 2, 5, 8, device=device), torch.randn(1, 2, 6, 8, device=device)
    op, backward = torch.ops.vitfast.attention, torch.ops.vitfast.attention_backward
    with vitfast.use_backend(backend):
        with pytest.raises(ValueError, match=r"q \(B, H, Nq, D\), k and v \(B, H, Nk, D\) do not agree"):
            op(q, k, k[:, :, :4], None, None, 0.0, False, 0, 1.0)
        with pytest.raises(ValueError, match=r"mask must broadcast to \(B, H, Nq, Nk\) = \(1, 2, 5, 6\)"):
            op(q, k, k, torch.zeros(1, 2, 3, 6, device=device), None, 0.0, False, 0, 1.0)
        out, lse = op(q, k, k, None, None, 0.0, False, 0, 1.0)
        with pytest.raises(ValueError, match=r"shapes do not agree: dout \(1, 2, 2, 8\) \(expected \(1, 2, 5, 8\)\)"):
            backward(out[:, :, :2], q, k, k, out, lse, None, None, 0.0, False, 0, 1.0, False, False)
        with pytest.raises(ValueError, match=r"lse \(2, 1, 2, 3\) \(expected \(2, 1, 2, 5\)\)"):
            backward(torch.ones_like(out), q, k, k, out, lse[..., :3], None, None, 0.0, False, 0, 1.0, False, False)
