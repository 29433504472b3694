import pytest
import torch

import vitfast
from vitfast.ops.patch_merging import patch_merging, patch_merging_ref

from _optional_libs import import_or_skip
from conftest import assert_close_to_ref, assert_compiles_like_eager, backend_cases, rounding_noise

CASES = backend_cases("patch_merging")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _textbook_timm(x, norm, reduction):
    """timm's PatchMerging.forward (pad, reshape/permute/flatten), to pin the channel order."""
    B, H, W, C = x.shape
    x = torch.nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    _, H, W, _ = x.shape
    x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
    return reduction(norm(x))


def _inputs(shape, out_dim, dtype, device, weight=True, bias=True):
    C = shape[-1]
    x = torch.randn(*shape, dtype=dtype, device=device) * 2 + 0.5
    nw = torch.randn(4 * C, dtype=dtype, device=device) if weight else None
    nb = torch.randn(4 * C, dtype=dtype, device=device) if bias else None
    rw = torch.randn(out_dim, 4 * C, dtype=dtype, device=device) / (4 * C) ** 0.5
    return x, nw, nb, rw


def _run(fn, x, nw, nb, rw, dy, cast=None):
    leaves = [(t.to(cast) if cast else t).detach().clone().requires_grad_() if t is not None else None
              for t in (x, nw, nb, rw)]
    out = fn(*leaves, 1e-5)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dy.to(out.dtype))
    return [out] + list(grads)


def _check(backend, device, shape, out_dim, dtype, **kw):
    x, nw, nb, rw = _inputs(shape, out_dim, dtype, device, **kw)
    H, W = shape[-3:-1]
    dy = torch.randn(*shape[:-3], (H + 1) // 2, (W + 1) // 2, out_dim, dtype=dtype, device=device)
    with vitfast.use_backend(backend):
        got = _run(patch_merging, x, nw, nb, rw, dy)
    ref = _run(patch_merging_ref, x, nw, nb, rw, dy, cast=torch.float64)
    noise = rounding_noise(lambda t: _run(patch_merging_ref, *t), [t if t is None else t.double()
                                                                   for t in (x, nw, nb, rw, dy)], dtype)
    plain = _run(patch_merging_ref, x, nw, nb, rw, dy)
    names = ["out", "dx"] + (["dnorm_weight"] if nw is not None else []) + (["dnorm_bias"] if nb is not None
                                                                              else []) + ["dreduction"]
    assert len(got) == len(ref) == len(names)
    for nm, g, r, p, n in zip(names, got, ref, plain, noise):
        assert_close_to_ref(g, r, p, f"{backend} {nm}", noise=n)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,out_dim", [((2, 8, 8, 16), 32), ((1, 7, 5, 12), 24), ((2, 1, 1, 8), 16),
                                           ((1, 6, 3, 24), 40)])
def test_matches_textbook(backend, device, dtype, shape, out_dim):
    _check(backend, device, shape, out_dim, dtype)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_affine_variants(backend, device, weight, bias):
    _check(backend, device, (1, 5, 6, 8), 16, torch.float32, weight=weight, bias=bias)


@pytest.mark.parametrize("backend,device", CASES)
def test_leading_dims_and_strided_input(backend, device):
    base = torch.randn(2, 3, 6, 9, 20, device=device)
    x = base[..., 2:18:2]  # (2, 3, 6, 9, 8), inner stride 2
    nw, nb, rw = torch.randn(32, device=device), torch.randn(32, device=device), torch.randn(16, 32, device=device)
    with vitfast.use_backend(backend):
        out = patch_merging(x, nw, nb, rw)
    ref = patch_merging_ref(x.double(), nw.double(), nb.double(), rw.double())
    assert out.shape == (2, 3, 3, 5, 16)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", CASES)
def test_constant_rows_give_exactly_the_norm_bias(backend, device):
    """A constant input (-3.7, eps 1e-6): every merged row is constant, so the LayerNorm gives exactly its bias and
    the output is exactly R @ beta (integer beta and R in quarters: exact in any summation order); the norm weight
    gets a zero gradient."""
    x = torch.full((2, 6, 4, 48), -3.7, device=device)
    nw = torch.randn(192, device=device, requires_grad=True)
    nb = torch.randint(-4, 5, (192,), device=device).float().requires_grad_()
    rw = torch.randint(-3, 4, (96, 192), device=device).float() / 4
    with vitfast.use_backend(backend):
        out = patch_merging(x, nw, nb, rw, 1e-6)
        dnw, dnb = torch.autograd.grad(out, (nw, nb), torch.randn_like(out))
    assert torch.equal(out, (nb.detach() @ rw.t()).expand_as(out))
    assert torch.equal(dnw, torch.zeros_like(dnw)) and dnb.abs().max() > 0


@pytest.mark.parametrize("backend,device", CASES)
def test_rows_whose_squares_overflow_match_fp64(backend, device):
    """Merged rows of values around 1e25, whose squared deviations overflow float32: their LayerNorm statistics are
    taken again on deviations scaled by 2^-100 (csrc/layer_norm_stats.h), so the output and every gradient match
    the float64 sequence (before, such rows were normalized to the bias)."""
    x, nw, nb, rw = _inputs((2, 4, 6, 8), 16, torch.float32, device)
    dy = torch.randn(2, 2, 3, 16, device=device)
    with vitfast.use_backend(backend):
        got = _run(patch_merging, x * 1e25, nw, nb, rw, dy)
    ref = _run(patch_merging_ref, x * 1e25, nw, nb, rw, dy, cast=torch.float64)
    for name, g, r in zip(["out", "dx", "dnorm_weight", "dnorm_bias", "dreduction"], got, ref):
        err = ((g.double() - r).abs().max() / r.abs().max()).item()
        assert err < 2e-5, f"{backend} {name}: relative error {err:.3g}"


@pytest.mark.parametrize("backend,device", CASES)
def test_float64(backend, device):
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    nw = torch.randn(16, dtype=torch.float64, device=device, requires_grad=True)
    nb = torch.randn(16, dtype=torch.float64, device=device, requires_grad=True)
    rw = torch.randn(6, 16, dtype=torch.float64, device=device, requires_grad=True)
    if backend == "triton":
        with vitfast.use_backend(backend), pytest.raises(ValueError, match="float64"):
            patch_merging(x, nw, nb, rw)
        return
    with vitfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: patch_merging(*a), (x, nw, nb, rw))


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("shape", [(1, 0, 4, 8), (1, 4, 0, 8), (2, 3, 0, 6, 8)], ids=lambda s: "x".join(map(str, s)))
def test_empty_map(backend, device, shape):
    """H or W = 0 gives the empty output of the unfused code and empty gradients (the (-1, H, W, C) reshape raised:
    -1 cannot be inferred from 0 elements)."""
    x = torch.randn(shape, device=device, requires_grad=True)
    nw, nb = (torch.randn(32, device=device, requires_grad=True) for _ in range(2))
    rw = torch.randn(16, 32, device=device, requires_grad=True)
    want = patch_merging_ref(x, nw, nb, rw)
    with vitfast.use_backend(backend):
        got = vitfast.patch_merging(x, nw, nb, rw)
        assert got.shape == want.shape
        grads = torch.autograd.grad(got.sum(), (x, nw, nb, rw))
    assert grads[0].shape == x.shape and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend,device", CASES)
def test_zero_channels(backend, device):
    """C = 0 gives the unfused code's result, zeros (the C++ kernel divided its grain by 4C = 0: SIGFPE)."""
    x = torch.randn(1, 4, 4, 0, device=device, requires_grad=True)
    rw = torch.randn(5, 0, device=device, requires_grad=True)
    with vitfast.use_backend(backend):
        got = vitfast.patch_merging(x, None, None, rw)
        grads = torch.autograd.grad(got.sum(), (x, rw))
    assert torch.equal(got, patch_merging_ref(x, None, None, rw).detach())
    assert all(g.shape == t.shape for g, t in zip(grads, (x, rw)))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(32,\)"):
        patch_merging(x, torch.randn(16), None, torch.randn(16, 32))
    with pytest.raises(ValueError, match=r"reduction_weight must have shape \(16, 32\)"):
        patch_merging(x, None, None, torch.randn(16, 31))
    with pytest.raises(ValueError, match=r"\(..., H, W, C\)"):
        patch_merging(torch.randn(4, 8), None, None, torch.randn(16, 32))


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_module_is_a_drop_in_for_timm_and_torchvision(hw):
    mine = vitfast.nn.PatchMerging(12, out_dim=20)
    torch.nn.init.normal_(mine.norm.weight)
    torch.nn.init.normal_(mine.norm.bias)
    assert set(mine.state_dict()) == {"norm.weight", "norm.bias", "reduction.weight"}
    x = torch.randn(2, *hw, 12)
    ref_timm = _textbook_timm(x, mine.norm, mine.reduction)
    ref_tv = patch_merging_ref(x, mine.norm.weight, mine.norm.bias, mine.reduction.weight)
    out = mine(x)
    torch.testing.assert_close(out, ref_timm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref_tv, rtol=1e-5, atol=1e-5)
    assert vitfast.nn.PatchMerging(12).reduction.weight.shape == (24, 48)
    # torchvision's positional PatchMerging(dim, norm_layer), as its SwinTransformer builds downsample layers
    tv_style = vitfast.nn.PatchMerging(12, torch.nn.LayerNorm)
    assert tv_style.reduction.weight.shape == (24, 48) and isinstance(tv_style.norm, torch.nn.LayerNorm)
    # parameters in the library's order: an optimizer's state, matched by position, resumes (it failed on step)
    assert [n for n, _ in tv_style.named_parameters()] == ["reduction.weight", "norm.weight", "norm.bias"]
    assert [n for n, _ in mine.named_parameters()] == ["norm.weight", "norm.bias", "reduction.weight"]
    rms = vitfast.nn.PatchMerging(12, norm_layer=lambda d: torch.nn.RMSNorm(d))
    torch.testing.assert_close(rms(x), rms.reduction(rms.norm(_textbook_timm(x, torch.nn.Identity(),
                                                                             torch.nn.Identity()))))


def test_module_with_a_float32_norm_in_a_bfloat16_model():
    """bf16 x and reduction with the LayerNorm kept in fp32 (torchvision takes it: nn.LayerNorm on mixed dtypes) run
    unfused, as torchvision computes them, rather than refusing the norm's dtype; an empty map works there too."""
    mine = vitfast.nn.PatchMerging(12, out_dim=20)
    mine.reduction.bfloat16()
    x = torch.randn(2, 7, 9, 12, dtype=torch.bfloat16)
    out = mine(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, mine.reduction(mine.norm(_textbook_timm(x, torch.nn.Identity(),
                                                                            torch.nn.Identity()))))
    assert mine(x[:, :0]).shape == (2, 0, 5, 20)


def test_module_fuses_only_a_layer_norm_over_the_last_dim():
    """timm's LayerNorm2d (an nn.LayerNorm subclass over dim 1) was fused as a LayerNorm over the last dim (1.06
    apart from calling it, as timm's module does)."""
    timm = import_or_skip("timm")
    from vitfast.ops.patch_merging import _gather

    m = vitfast.nn.PatchMerging(1, norm_layer=timm.layers.LayerNorm2d)
    x = torch.randn(2, 8, 8, 1)
    torch.testing.assert_close(m(x), m.reduction(m.norm(_gather(x).view(2, 4, 4, 4))))


def test_module_calls_hooked_norm_and_reduction():
    """Hooks on norm or reduction (or for every module) ran never: the fused op reads their parameters. Where they
    are set, the unfused path calls the submodules, as timm and torchvision do."""
    mine = vitfast.nn.PatchMerging(12, out_dim=20)
    x = torch.randn(2, 7, 9, 12)
    want = mine.reduction(2 * mine.norm(_textbook_timm(x, torch.nn.Identity(), torch.nn.Identity())))
    calls = []
    mine.norm.register_forward_hook(lambda mod, i, o: calls.append("norm") or o * 2)
    mine.reduction.register_forward_pre_hook(lambda mod, i: calls.append("reduction"))
    torch.testing.assert_close(mine(x), want)
    assert calls == ["norm", "reduction"]
    plain = vitfast.nn.PatchMerging(12)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: seen.append(mod))
    try:
        plain(x)
    finally:
        handle.remove()
    assert plain.norm in seen and plain.reduction in seen


def test_module_rejects_other_ranks_and_widths_clearly():
    """A 2-D input gave "not enough values to unpack", a wrong channel count an error about the norm's weight."""
    with pytest.raises(ValueError, match=r"x must be \(..., H, W, 8\), got shape \(4, 8\)"):
        vitfast.nn.PatchMerging(8)(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"x must be \(..., H, W, 8\), got shape \(1, 4, 4, 6\)"):
        vitfast.nn.PatchMerging(8)(torch.randn(1, 4, 4, 6))


def test_opcheck():
    x = torch.randn(2, 5, 4, 8, requires_grad=True)
    nw, nb = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    rw = torch.randn(16, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.vitfast.patch_merging.default, (x, nw, nb, rw, 1e-5))
    torch.library.opcheck(torch.ops.vitfast.patch_merging.default, (x, None, None, rw, 1e-6))
    _, mean, rstd = torch.ops.vitfast.patch_merging(x.detach(), nw.detach(), nb.detach(), rw.detach(), 1e-5)
    torch.library.opcheck(torch.ops.vitfast.patch_merging_backward.default,
                          (torch.randn(12, 16), x.detach(), nw.detach(), nb.detach(), rw.detach(), mean, rstd))


def test_torch_compile_fullgraph():
    assert_compiles_like_eager(vitfast.nn.PatchMerging(8), torch.randn(2, 5, 6, 8, requires_grad=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2**31 elements need a GPU (tens of GiB on CPU)")
def test_channel_offsets_past_2_pow_31():
    """A channel-major (B, H, W, C) view: channel 3 lies 3 * B*H*W > 2**31 elements past channel 0 (int32 offsets
    wrapped there). Only the last image's tokens get a gradient, so that its slice alone is the reference for the
    output and every gradient."""
    B, H, W, C = 2**31 // (3 * 64 * 64) + 1, 64, 64, 4
    x = torch.randn(C, B, H, W, device="cuda", dtype=torch.float16).permute(1, 2, 3, 0).requires_grad_()
    nw, nb = (torch.randn(4 * C, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(2))
    rw = (torch.randn(2 * C, 4 * C, device="cuda", dtype=torch.float16) / 4).requires_grad_()
    with vitfast.use_backend("triton"):
        out = patch_merging(x, nw, nb, rw, 1e-5)
        dout = torch.zeros_like(out)
        dout[-1] = torch.randn_like(out[-1])
        grads = torch.autograd.grad(out, (x, nw, nb, rw), dout)
    leaves = [t.detach().double().requires_grad_() for t in (x[-2:], nw, nb, rw)]
    ref = patch_merging_ref(*leaves, 1e-5)
    refs = torch.autograd.grad(ref, leaves, dout[-2:].double())
    torch.testing.assert_close(out[-2:].double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[0][-2:].double(), refs[0], rtol=1e-2, atol=1e-2)
    for got, want in zip(grads[1:], refs[1:]):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=5e-2)
    assert not grads[0][0].any()


@pytest.mark.parametrize("backend,device", CASES)
def test_the_ops_check_shapes_when_called_directly(backend, device):
    """torch.ops.vitfast.patch_merging called directly: norm or reduction weights of another width reached the
    kernels."""
    x = torch.randn(1, 4, 4, 8, device=device)
    nw, rw = torch.randn(32, device=device), torch.randn(16, 32, device=device)
    with vitfast.use_backend(backend):
        with pytest.raises(ValueError, match=r"norm_weight \(16,\) \(expected \(32,\)\)"):
            torch.ops.vitfast.patch_merging(x, nw[:16], None, rw, 1e-5)
        with pytest.raises(ValueError, match=r"reduction_weight \(16, 24\) \(expected \(16, 32\)\)"):
            torch.ops.vitfast.patch_merging(x, nw, None, rw[:, :24], 1e-5)
        out, mean, rstd = torch.ops.vitfast.patch_merging(x, nw, None, rw, 1e-5)
        with pytest.raises(ValueError, match=r"dy \(3, 16\) \(expected \(4, 16\)\)"):
            torch.ops.vitfast.patch_merging_backward(out.reshape(4, 16)[:3], x, nw, None, rw, mean, rstd)
