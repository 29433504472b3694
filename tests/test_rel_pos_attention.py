"""rel_pos_attention and decomposed_rel_pos: every backend against float64 references (the output and all five
gradients), segment_anything's own functions and Attention module as the reference of the semantics, broadcast
terms, dtypes, dropout, opcheck, torch.compile and the memory the fused op needs."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import vitfast
from vitfast.ops.attention import dropout_keep_ref
from vitfast.ops.rel_pos_attention import TRITON_MAX_KW, decomposed_rel_pos, get_rel_pos, rel_pos_attention_ref

from _optional_libs import import_or_skip
from conftest import DEVICE, assert_compiles_like_eager, backend_cases, rounding_noise
from test_attention import _assert_all_close, _lse_max, _poisoned_empty

CASES = backend_cases("rel_pos_attention")
NAMES = ("out", "dq", "dk", "dv", "drel_h", "drel_w")


def _inputs(B, H, q_hw, k_hw, D, dtype, rel_dtype=None, rel_b=None, rel_h=None, device=DEVICE):
    """q (B, H, qh*qw, D), k, v (B, H, kh*kw, D), rel_h (rel_b|B, rel_h|H, Nq, kh), rel_w (..., kw)."""
    Nq, (kh, kw) = q_hw[0] * q_hw[1], k_hw
    q = torch.randn(B, H, Nq, D, dtype=dtype, device=device)
    k = torch.randn(B, H, kh * kw, D, dtype=dtype, device=device)
    v = torch.randn(B, H, kh * kw, D, dtype=dtype, device=device)
    rel = dict(dtype=rel_dtype or dtype, device=device)
    rel_shape = (rel_b or B, rel_h or H, Nq)
    return q, k, v, torch.randn(*rel_shape, kh, **rel), torch.randn(*rel_shape, kw, **rel)


def _run(fn, inputs, dout):
    """fn's output and the gradients of all five inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out] + list(torch.autograd.grad(out, leaves, dout))


def _assert_like_ref(got, fn, inputs, dout, scale, what):
    """test_attention's accuracy rule (conftest's, with its rounding-noise and lse-aware floors) for the output and
    the five gradients: `got` against `fn` in float64 and plain PyTorch (`fn` in the inputs' dtypes)."""
    x64 = [t.double() for t in inputs] + [dout.double()]
    ref = _run(fn, x64[:5], x64[5])
    noise = rounding_noise(lambda t: _run(fn, t[:5], t[5]), x64, dout.dtype)
    plain = _run(fn, inputs, dout)
    q, k, rel_h, rel_w = x64[0], x64[1], x64[3], x64[4]
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    _assert_all_close(NAMES, got, ref, plain, noise, what, _lse_max(q, k, bias, scale))


def _check(backend, device, B, H, q_hw, k_hw, D, dtype, scale=None, dropout_p=0.0, **rel):
    """vitfast.rel_pos_attention on `backend` against the fp64 reference and plain PyTorch in `dtype` (the dense
    bias), output and every gradient. With dropout, the reference applies the keep-mask of the seed vitfast draws."""
    inputs = _inputs(B, H, q_hw, k_hw, D, dtype, device=device, **rel)
    Nq, Nk = inputs[0].shape[2], inputs[1].shape[2]
    dout = torch.randn(B, H, Nq, D, dtype=dtype, device=device)
    keep = None
    if dropout_p > 0:
        state = torch.get_rng_state()
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())  # the draw vitfast makes
        torch.set_rng_state(state)
        keep = dropout_keep_ref(seed, B, H, Nq, Nk, dropout_p, device)
    with vitfast.use_backend(backend), _poisoned_empty():
        got = _run(lambda *a: vitfast.rel_pos_attention(*a, scale=scale, dropout_p=dropout_p), inputs, dout)

    def ref_fn(*a):
        return rel_pos_attention_ref(*a, scale=scale, dropout_keep=keep, dropout_p=dropout_p)
    _assert_like_ref(got, ref_fn, inputs, dout, scale, backend)
    return keep


# (B, H, (qh, qw), (kh, kw), D): qh != qw, Nq != Nk (both ways), a key grid of one row and one of one column,
# SAM-B's windowed layer (14 x 14 windows, two of them) and a global layer on a 16 x 16 grid.
SHAPES = {
    "q5x7-k5x7-d40": (1, 2, (5, 7), (5, 7), 40),
    "q6x4-k3x5-d64": (1, 1, (6, 4), (3, 5), 64),
    "q3x3-k4x6-d80": (2, 1, (3, 3), (4, 6), 80),
    "q4x4-k1x9-d32": (1, 2, (4, 4), (1, 9), 32),
    "q3x5-k7x1-d16": (1, 1, (3, 5), (7, 1), 16),
    "sam-window-14x14-d64": (2, 2, (14, 14), (14, 14), 64),
    "sam-global-16x16-d64": (1, 2, (16, 16), (16, 16), 64),
}


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_fp64(backend, device, shape):
    _check(backend, device, *shape, torch.float32)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype,rel_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
                         ids=["bf16", "fp16-fp32-terms"])
def test_low_precision(backend, device, dtype, rel_dtype):
    _check(backend, device, 1, 2, (14, 14), (14, 14), 64, dtype, rel_dtype=rel_dtype)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("rel", [dict(rel_b=1), dict(rel_h=1), dict(rel_b=1, rel_h=1)], ids=["1H", "B1", "11"])
def test_broadcast_terms(backend, device, rel):
    _check(backend, device, 2, 3, (5, 6), (6, 5), 24, torch.float32, scale=0.3, **rel)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("value", [-1e9, torch.finfo(torch.float32).min], ids=["-1e9", "finfo.min"])
def test_huge_finite_bias_is_plain_arithmetic(backend, device, value):
    """Queries whose every key has a huge finite bias (the mask values people use: -1e9, finfo(float32).min; here
    through rel_h for one query and rel_w for another): as in plain fp32 arithmetic, where the bias absorbs the
    scores, they weigh their keys equally, in the output and in every gradient. The saved statistics keep the row
    max apart from log(sum), which m + log(l) would lose there (a backward that rebuilt P from it got P = 1 per key)."""
    q, k, v, rel_h, rel_w = _inputs(1, 2, (3, 4), (3, 5), 16, torch.float32, device=device)
    rel_h[0, 0, 2] = value
    rel_w[0, 1, 5] = value
    dout = torch.randn_like(q)
    with vitfast.use_backend(backend):
        got = _run(vitfast.rel_pos_attention, (q, k, v, rel_h, rel_w), dout)
    plain = _run(rel_pos_attention_ref, (q, k, v, rel_h, rel_w), dout)
    assert torch.allclose(plain[0][0, 0, 2], v[0, 0].mean(0), atol=1e-6), "the reference must weigh keys equally"
    for name, g, p in zip(NAMES, got, plain):
        torch.testing.assert_close(g, p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend} {name}: {m}")


@pytest.mark.parametrize("fwd,bwd,device", [(a.values[0], b.values[0], a.values[1]) for a in CASES for b in CASES
                                            if a.values != b.values and a.values[1] == b.values[1]])
def test_backends_share_the_saved_state(fwd, bwd, device):
    """The saved (out, lse) of one backend's forward serve another's backward on the same device: the gradients
    equal that backend's own (a row whose every key is at finfo.min included, where the saved statistics matter)."""
    q, k, v, rh, rw = _inputs(2, 2, (3, 4), (3, 5), 16, torch.float32, device=device)
    rh[1, 0, 4] = torch.finfo(torch.float32).min
    dout = torch.randn_like(q)
    with vitfast.use_backend(fwd):
        out, lse = torch.ops.vitfast.rel_pos_attention(q, k, v, rh, rw, None, 0.0, 0.25)
    with vitfast.use_backend(bwd):
        own_out, own_lse = torch.ops.vitfast.rel_pos_attention(q, k, v, rh, rw, None, 0.0, 0.25)
        got = torch.ops.vitfast.rel_pos_attention_backward(dout, q, k, v, rh, rw, out, lse, None, 0.0, 0.25)
        own = torch.ops.vitfast.rel_pos_attention_backward(dout, q, k, v, rh, rw, own_out, own_lse, None, 0.0, 0.25)
    torch.testing.assert_close(lse, own_lse)
    for name, g, o in zip(NAMES[1:], got, own):
        torch.testing.assert_close(g, o, rtol=1e-4, atol=1e-5, msg=lambda m: f"{fwd} -> {bwd} {name}: {m}")


@pytest.mark.parametrize("backend,device", CASES)
def test_expanded_terms_are_read_with_stride_zero(backend, device):
    """rel_h/rel_w expanded from (1, H, ...) and (1, 1, ...) leaves: stride 0, full shapes; gradients reach the
    leaves through the expand."""
    q, k, v, rh, rw = _inputs(2, 2, (4, 5), (3, 4), 32, torch.float32, device=device, rel_b=1)
    rw = rw[:, :1].clone()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, rh, rw)]
    dout = torch.randn_like(q)
    with vitfast.use_backend(backend):
        out = vitfast.rel_pos_attention(*leaves[:3], leaves[3].expand(2, 2, -1, -1), leaves[4].expand(2, 2, -1, -1))
        got = [out] + list(torch.autograd.grad(out, leaves, dout))
    _assert_like_ref(got, rel_pos_attention_ref, (q, k, v, rh, rw), dout, None, backend)


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] != "cpp"])
def test_dropout_regenerates_the_seeded_mask(backend, device):
    keep = _check(backend, device, 2, 2, (5, 5), (4, 6), 24, torch.float32, dropout_p=0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.03


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] == "cpp"])
def test_cpp_backend_rejects_dropout_when_forced(backend, device):
    q, k, v, rh, rw = _inputs(1, 1, (2, 2), (2, 2), 16, torch.float32, device=device)
    with vitfast.use_backend("cpp"), pytest.raises(ValueError, match="dropout") as err:
        vitfast.rel_pos_attention(q, k, v, rh, rw, dropout_p=0.5)
    assert "int64" not in str(err.value)  # the inputs listed are the caller's, not the seed vitfast drew
    assert vitfast.choose_backend("rel_pos_attention", q, k, v, rh, rw, torch.zeros(1, dtype=torch.int64)) == "torch"


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] != "triton"])
def test_float64_gradcheck(backend, device):
    inputs = [t.requires_grad_() for t in _inputs(1, 2, (2, 3), (3, 2), 8, torch.float64, device=device, rel_b=1)]
    with vitfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: vitfast.rel_pos_attention(*a, scale=0.7), inputs, fast_mode=True)


@pytest.mark.skipif(not any(c.values[0] == "triton" for c in CASES), reason="no triton backend on this machine")
def test_triton_refuses_what_it_does_not_take():
    with vitfast.use_backend("triton"), pytest.raises(ValueError, match="float64"):
        vitfast.rel_pos_attention(*_inputs(1, 1, (2, 2), (2, 2), 16, torch.float64))
    wide = _inputs(1, 1, (1, 2), (1, TRITON_MAX_KW + 1), 16, torch.float32)
    with vitfast.use_backend("triton"), pytest.raises(ValueError, match=f"kw = {TRITON_MAX_KW + 1}"):
        vitfast.rel_pos_attention(*wide)
    with vitfast.use_backend("torch"):
        torch.testing.assert_close(vitfast.rel_pos_attention(*wide), rel_pos_attention_ref(*wide))


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_queries_and_key_grids(backend, device):
    for q_hw, k_hw in (((0, 3), (2, 2)), ((2, 2), (0, 3)), ((2, 2), (3, 0))):
        inputs = [t.requires_grad_() for t in _inputs(2, 1, q_hw, k_hw, 16, torch.float32, device=device)]
        with vitfast.use_backend(backend):
            out = vitfast.rel_pos_attention(*inputs)
            grads = torch.autograd.grad(out.sum(), inputs)
        assert out.shape == inputs[0].shape and torch.equal(out, torch.zeros_like(out))
        for t, g in zip(inputs, grads):
            assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] == "cpp"])
def test_cpp_results_do_not_depend_on_the_thread_count(backend, device, threads):
    """The cpp kernels hand their work items out to the threads in turns (whichever thread is free takes the next):
    every item has outputs of its own, so any thread count gives the same bits as 2 (and, run at 2, every item
    is done once: test_matches_fp64 holds each element to the reference)."""
    torch.manual_seed(0)
    inputs = _inputs(2, 3, (9, 10), (6, 5), 40, torch.float32, device=device)  # 2 x 3 x 2 query blocks: 12 items
    dout = torch.randn_like(inputs[0])
    saved = torch.get_num_threads()
    try:
        with vitfast.use_backend(backend):
            torch.set_num_threads(2)
            two = _run(vitfast.rel_pos_attention, inputs, dout)
            torch.set_num_threads(threads)
            other = _run(vitfast.rel_pos_attention, inputs, dout)
    finally:
        torch.set_num_threads(saved)
    for name, a, b in zip(NAMES, two, other):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend,device", CASES)
def test_packed_qkv_views_are_read_in_place(backend, device, monkeypatch):
    """SAM's layout: q, k, v are (B, H, N, D) views of one (B, N, 3, H, D) projection; the output's (B, N, H, D)
    buffer reshapes to (B, N, H*D) for free."""
    B, qh, qw, H, D = 2, 5, 4, 3, 40
    x = torch.randn(B, qh * qw, 3, H, D, device=device)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    rh, rw = torch.randn(B, H, qh * qw, qh, device=device), torch.randn(B, H, qh * qw, qw, device=device)
    seen = []
    if backend == "triton":
        import vitfast.triton.rel_pos_attention as tri
        launch = tri.rel_pos_attention_fwd

        def spy(q_, k_, v_, *args):
            seen.append((q_.data_ptr(), k_.data_ptr(), v_.data_ptr()))
            return launch(q_, k_, v_, *args)
        monkeypatch.setattr(tri, "rel_pos_attention_fwd", spy)
    with vitfast.use_backend(backend):
        out = vitfast.rel_pos_attention(q, k, v, rh, rw)
    if backend == "triton":
        assert seen == [(q.data_ptr(), k.data_ptr(), v.data_ptr())]
    ref = rel_pos_attention_ref(*(t.double() for t in (q, k, v, rh, rw)))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert out.transpose(1, 2).is_contiguous()


# -------------------------------------------------------------------------- segment_anything's semantics

# (q_size, k_size, table rows along h, table rows along w): tables of the exact length, tables resized by linear
# interpolation, and query and key grids of different sizes (coordinates scaled).
SAM_SIZES = [((5, 7), (5, 7), 9, 13), ((5, 7), (5, 7), 27, 7), ((6, 4), (3, 5), 11, 9), ((2, 9), (7, 3), 5, 17)]


@pytest.mark.parametrize("q_size,k_size,len_h,len_w", SAM_SIZES, ids=lambda x: str(x))
def test_decomposed_rel_pos_matches_segment_anything(q_size, k_size, len_h, len_w):
    import_or_skip("segment_anything")
    from segment_anything.modeling import image_encoder as sam
    B, D = 3, 16
    q = torch.randn(B, q_size[0] * q_size[1], D, dtype=torch.float64, requires_grad=True)
    tables = [torch.randn(n, D, dtype=torch.float64, requires_grad=True) for n in (len_h, len_w)]
    for axis in range(2):
        assert torch.equal(get_rel_pos(q_size[axis], k_size[axis], tables[axis]),
                           sam.get_rel_pos(q_size[axis], k_size[axis], tables[axis]))
    zeros = torch.zeros(B, q_size[0] * q_size[1], k_size[0] * k_size[1], dtype=torch.float64)
    theirs = sam.add_decomposed_rel_pos(zeros, q, *tables, q_size, k_size)
    rel_h, rel_w = decomposed_rel_pos(q, *tables, q_size, k_size)
    assert rel_h.shape == (B, q.shape[1], k_size[0]) and rel_w.shape == (B, q.shape[1], k_size[1])
    mine = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    weight = torch.randn_like(theirs)
    for g, r in zip(torch.autograd.grad(mine, [q] + tables, weight), torch.autograd.grad(theirs, [q] + tables, weight)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("input_size", [(5, 7), (8, 8)], ids=["tables-5x7", "tables-8x8-interpolated"])
def test_segment_anything_attention_block(backend, device, input_size):
    """segment_anything's Attention (use_rel_pos=True, its tables made non-zero) against the same module run
    through decomposed_rel_pos + rel_pos_attention: output and the gradients of x, qkv and both tables."""
    import_or_skip("segment_anything")
    from segment_anything.modeling import image_encoder as sam
    torch.manual_seed(0)
    dim, heads, (Hs, Ws) = 64, 2, (5, 7)
    block = sam.Attention(dim, heads, use_rel_pos=True, input_size=input_size).to(device)
    with torch.no_grad():
        block.rel_pos_h.normal_()
        block.rel_pos_w.normal_()
    x = torch.randn(2, Hs, Ws, dim, device=device, requires_grad=True)

    def fused(x):
        B = x.shape[0]
        qkv = block.qkv(x).reshape(B, Hs * Ws, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        rel_h, rel_w = decomposed_rel_pos(q, block.rel_pos_h, block.rel_pos_w, (Hs, Ws), (Hs, Ws))
        with vitfast.use_backend(backend):
            o = vitfast.rel_pos_attention(q, k, v, rel_h, rel_w, scale=block.scale)
        return block.proj(o.transpose(1, 2).reshape(B, Hs, Ws, dim))

    params = [x, block.qkv.weight, block.rel_pos_h, block.rel_pos_w]
    out = fused(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    ref = block(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- torch.library

@pytest.mark.parametrize("backend,device", CASES)
def test_opcheck(backend, device):
    q, k, v, rh, rw = (t.requires_grad_() for t in _inputs(2, 2, (3, 2), (2, 3), 16, torch.float32, rel_b=1,
                                                           device=device))
    seed = torch.tensor([7], dtype=torch.int64)
    cases = [(q, k, v, rh, rw, None, 0.0, 0.25)]
    if backend == "torch":  # the seed argument's handling is the op's, not a backend's (and cpp has no dropout)
        cases.append((q, k, v, rh, rw, seed, 0.2, 0.25))
    with vitfast.use_backend(backend):
        for args in cases:
            torch.library.opcheck(torch.ops.vitfast.rel_pos_attention.default, args)
        plain = [t.detach() for t in (q, k, v, rh, rw)]
        out, lse = torch.ops.vitfast.rel_pos_attention(*plain, None, 0.0, 0.25)
        torch.library.opcheck(torch.ops.vitfast.rel_pos_attention_backward.default,
                              (torch.randn_like(out), *plain, out, lse, None, 0.0, 0.25))


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        """SAM's attention with decomposed relative positions, on a 4 x 5 grid."""

        def __init__(self, dim=48, heads=3, hw=(4, 5)):
            super().__init__()
            self.heads, self.hw = heads, hw
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.proj = torch.nn.Linear(dim, dim)
            self.rel_pos_h = torch.nn.Parameter(torch.randn(2 * hw[0] - 1, dim // heads))
            self.rel_pos_w = torch.nn.Parameter(torch.randn(2 * hw[1] - 1, dim // heads))

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, self.hw, self.hw)
            y = vitfast.rel_pos_attention(q, k, v, rel_h, rel_w)
            return self.proj(y.transpose(1, 2).reshape(B, N, C))

    assert_compiles_like_eager(Block(), torch.randn(2, 20, 48, requires_grad=True))


# ------------------------------------------------------------------------------------------ bad inputs

def test_bad_inputs_raise_clear_errors():
    q, k, v, rh, rw = _inputs(2, 3, (4, 5), (3, 4), 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, H, N, D\), got rank 3"):
        vitfast.rel_pos_attention(q[0], k, v, rh, rw)
    with pytest.raises(ValueError, match=r"k has Nk = 12 keys but rel_h and rel_w give a kh x kw = 3 x 5 = 15"):
        vitfast.rel_pos_attention(q, k, v, rh, torch.randn(2, 3, 20, 5))
    with pytest.raises(ValueError, match=r"rel_h must be \(B\|1, H\|1, Nq, n\) = \(2\|1, 3\|1, 20, n\).*\(2, 3, 19, 3"):
        vitfast.rel_pos_attention(q, k, v, rh[:, :, :19], rw)
    with pytest.raises(ValueError, match=r"rel_w must be \(B\|1, H\|1, Nq, n\).*\(2, 2, 20, 4\)"):
        vitfast.rel_pos_attention(q, k, v, rh, rw[:, :2])
    with pytest.raises(ValueError, match="rel_h must be floating point on q's device cpu.*torch.int64"):
        vitfast.rel_pos_attention(q, k, v, rh.long(), rw)
    with pytest.raises(ValueError, match="one dtype, got torch.float32, torch.float16"):
        vitfast.rel_pos_attention(q, k.half(), v, rh, rw)
    with pytest.raises(ValueError, match="batch and heads of q, k, v must agree"):
        vitfast.rel_pos_attention(q, k[:1], v[:1], rh, rw)
    with pytest.raises(ValueError, match="head dim 320 is not supported"):
        big = torch.randn(1, 1, 4, 320)
        vitfast.rel_pos_attention(big, big, big, torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        vitfast.rel_pos_attention(q, k, v, rh, rw, dropout_p=1.0)
    qs = q.reshape(6, 20, 16)
    with pytest.raises(ValueError, match=r"Nq = q_h \* q_w = 21 for q_size \(3, 7\)"):
        decomposed_rel_pos(qs, torch.randn(5, 16), torch.randn(13, 16), (3, 7), (3, 7))
    with pytest.raises(ValueError, match=r"rel_pos_w must be \(L, D\) with L >= 1 and D = 16.*\(13, 8\)"):
        decomposed_rel_pos(qs, torch.randn(7, 16), torch.randn(13, 8), (4, 5), (4, 5))
    with pytest.raises(ValueError, match=r"rel_pos_h must be \(L, D\) with L >= 1.*\(0, 16\)"):
        decomposed_rel_pos(qs, torch.randn(0, 16), torch.randn(9, 16), (4, 5), (4, 5))
    for q_size, k_size, bad in [((4, 5), (0, 5), "k_size"), ((-2, -10), (4, 5), "q_size"),
                                ((4, 5, 1), (4, 5), "q_size"), ((4.5, 5), (4, 5), "q_size"),  # (4.5 was read as 4)
                                ((4, 5), 5, "k_size"),  # (an int: TypeError "has no len()")
                                ((float("inf"), 5), (4, 5), "q_size"), ((float("nan"), 5), (4, 5), "q_size"),
                                ((True, 5), (4, 5), "q_size")]:  # (OverflowError, int()'s ValueError, read as 1)
        size = q_size if bad == "q_size" else k_size
        with pytest.raises(ValueError,
                           match=rf"{bad} must be two positive whole sizes \(h, w\), got {re.escape(str(size))}"):
            decomposed_rel_pos(qs, torch.randn(7, 16), torch.randn(9, 16), q_size, k_size)
    with pytest.raises(ValueError, match="rel_pos_h must have q's dtype and device"):
        decomposed_rel_pos(qs, torch.randn(7, 16, dtype=torch.float64), torch.randn(9, 16), (4, 5), (4, 5))


@pytest.mark.parametrize("backend,device", CASES)
def test_the_ops_check_shapes_when_called_directly(backend, device):
    """torch.ops.vitfast.rel_pos_attention called directly (as a compiled graph or opcheck does) took rel terms of
    fewer queries, or a key grid smaller than Nk, to the triton kernel: it read past rel_h or skipped keys."""
    q, k, v, rh, rw = _inputs(1, 1, (2, 3), (2, 3), 16, torch.float32, device=device)
    op, backward = torch.ops.vitfast.rel_pos_attention, torch.ops.vitfast.rel_pos_attention_backward
    with vitfast.use_backend(backend):
        with pytest.raises(ValueError, match=r"rel_h must be \(B\|1, H\|1, Nq, n\)"):
            op(q, k, v, rh[:, :, :4], rw, None, 0.0, 0.25)
        with pytest.raises(ValueError, match="k has Nk = 6 keys but rel_h and rel_w give a kh x kw = 2 x 2 = 4"):
            op(q, k, v, rh, rw[..., :2], None, 0.0, 0.25)
        out, lse = op(q, k, v, rh, rw, None, 0.0, 0.25)
        with pytest.raises(ValueError, match="kh x kw = 1 x 3"):
            backward(torch.ones_like(out), q, k, v, rh[..., :1], rw, out, lse, None, 0.0, 0.25)
        with pytest.raises(ValueError, match=r"shapes do not agree: dout \(.*; out "):
            backward(out[:, :, :2], q, k, v, rh, rw, out[:, :, :2], lse, None, 0.0, 0.25)
        with pytest.raises(ValueError, match=r"shapes do not agree: lse "):
            backward(torch.ones_like(out), q, k, v, rh, rw, out, lse[..., :1], None, 0.0, 0.25)


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] != "triton"])
def test_saturated_rows_give_exact_zero_key_and_bias_gradients(backend, device):
    """A bias of +60 on one key makes every softmax row one-hot in fp32: the exact dK, drel_h and drel_w are 0 (dS is
    0). delta = rowsum(dO * O) left |dS| ~ 1 ulp of dP per row, summed over the queries (dK 2e-5 at 16384 queries);
    rowsum(P * dP) cancels it, as vitfast.attention's reference paths do."""
    g = torch.Generator().manual_seed(0)
    Nq, D = 4096, 16
    q, k, v = (torch.randn(1, 2, n, D, generator=g).to(device) for n in (Nq, 4, 4))
    rel_h, rel_w = (torch.randn(1, 2, Nq, 2, generator=g).to(device) for _ in range(2))
    rel_h[..., 0] += 60.0
    rel_w[..., 0] += 60.0
    leaves = [t.requires_grad_() for t in (q, k, rel_h, rel_w)]
    with vitfast.use_backend(backend):
        out = vitfast.rel_pos_attention(q, k, v, rel_h, rel_w)
        grads = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=g).to(device))
    for name, grad in zip(("dk", "drel_h", "drel_w"), grads[1:]):
        assert grad.abs().max().item() < 1e-20, (name, grad.abs().max().item())


# ---------------------------------------------------------------------------------------------- memory

_PEAK_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, vitfast
    torch.set_num_threads(2)
    B, H, N, D = 1, 4, 4096, 32
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    rel_h, rel_w = torch.randn(B, H, N, 64), torch.randn(B, H, N, 64)
    with vitfast.use_backend(sys.argv[1]):
        vitfast.rel_pos_attention(q[:, :, :64], k, v, rel_h[:, :, :64], rel_w[:, :, :64])  # warm-up: pools, threads
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = vitfast.rel_pos_attention(q, k, v, rel_h, rel_w)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"grown_mib": grown / 1024, "finite": bool(torch.isfinite(out).all())}))
""")


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] == "cpp"])
def test_cpu_forward_never_allocates_the_dense_bias(backend, device):
    """The issue's memory target: B=1, 4 heads, 4096 tokens, D=32 (a dense fp32 bias alone is 256 MiB) grows the
    peak resident memory by well under 100 MB. A fresh process, so that the peak is this call's."""
    run = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, backend], capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["finite"] and result["grown_mib"] < 64, result


def test_a_backend_an_op_lacks_is_named_so():
    """Forcing onednn or cuda, which rel_pos_attention has on no device, said "no cuda implementation for cpu
    tensors", as if CUDA tensors had one; layer_norm's cuda kernel is for CUDA tensors, and says so."""
    q, k, v, rh, rw = _inputs(1, 1, (2, 2), (2, 2), 8, torch.float32, device="cpu")
    for forced in ("cuda", "onednn"):
        with vitfast.use_backend(forced), pytest.raises(
                ValueError, match=rf"{forced}: rel_pos_attention has no {forced} implementation$"):
            vitfast.rel_pos_attention(q, k, v, rh, rw)
    with vitfast.use_backend("cuda"), pytest.raises(ValueError, match="layer_norm has no cuda implementation for cpu"):
        vitfast.layer_norm(q, 8)
