from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast.ops import patch_embed as pe_ops
from vitfast.ops.patch_embed import patch_embed, patch_embed_ref
from vitfast import resample_pos_embed  # the public name

from _optional_libs import import_or_skip
from conftest import assert_close_to_ref, assert_compiles_like_eager, backend_cases, rounding_noise

CASES = backend_cases("patch_embed")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (name, B, C, H, W, patch, E, P, pos rows: "all" | "patch" | None, prefix given, norm, images need grad)
CONFIGS = [
    ("vit", 2, 3, 32, 32, 8, 32, 1, "all", True, False, True),
    ("deit", 2, 3, 32, 32, 16, 48, 2, "all", True, False, False),
    ("no_embed_class", 1, 3, 16, 32, 8, 32, 1, "patch", True, False, True),
    ("swin", 2, 3, 32, 32, 4, 40, 0, None, False, True, True),
    ("odd", 3, 5, 12, 20, (4, 2), 24, 0, "patch", False, False, True),
    ("empty_slots_and_norm", 1, 1, 8, 8, 4, 16, 1, "all", False, True, True),
    # H, W not multiples of the patch: the convolution drops the last rows and columns (zero gradient there)
    ("not_a_multiple", 2, 3, 30, 21, (8, 4), 32, 1, "all", True, True, True),
]


def _make(cfg, dtype, device):
    _, B, C, H, W, patch, E, P, pos, prefix, norm, img_grad = cfg
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    L = (H // ph) * (W // pw)
    t = dict(images=torch.randn(B, C, H, W, dtype=dtype, device=device),
             weight=torch.randn(E, C, ph, pw, dtype=dtype, device=device) / (C * ph * pw) ** 0.5,
             bias=torch.randn(E, dtype=dtype, device=device))
    if pos is not None:
        t["pos_embed"] = torch.randn(1, L + (P if pos == "all" else 0), E, dtype=dtype, device=device)
    if prefix:
        t["prefix_tokens"] = torch.randn(1, P, E, dtype=dtype, device=device)
    if norm:
        t["norm_weight"] = torch.randn(E, dtype=dtype, device=device)
        t["norm_bias"] = torch.randn(E, dtype=dtype, device=device)
    kw = dict(num_prefix_tokens=P if not prefix else 0)
    return t, patch, kw, img_grad


def _run(fn, tensors, patch, kw, img_grad, dy, cast=None):
    leaves = {k: (v.to(cast) if cast else v).detach().clone().requires_grad_(k != "images" or img_grad)
              for k, v in tensors.items()}
    args = {k: v for k, v in leaves.items() if k not in ("images", "weight", "bias")}
    out = fn(leaves["images"], leaves["weight"], leaves["bias"], patch, **args, **kw)
    names = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(out, [leaves[k] for k in names], dy.to(out.dtype))
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_conv_reference(backend, device, dtype, cfg):
    tensors, patch, kw, img_grad = _make(cfg, dtype, device)
    with torch.no_grad():
        shape = patch_embed_ref(tensors["images"], tensors["weight"], tensors["bias"], patch,
                                **{k: v for k, v in tensors.items() if k not in ("images", "weight", "bias")},
                                **kw).shape
    dy = torch.randn(shape, dtype=dtype, device=device)
    with vitfast.use_backend(backend):
        out, grads = _run(patch_embed, tensors, patch, kw, img_grad, dy)
    ref, ref_grads = _run(patch_embed_ref, tensors, patch, kw, img_grad, dy, cast=torch.float64)
    names = list(tensors)

    def flat(ts):
        out, grads = _run(patch_embed_ref, dict(zip(names, ts[:-1])), patch, kw, img_grad, ts[-1])
        return [out] + [grads[k] for k in sorted(grads)]
    noise = rounding_noise(flat, [t.double() for t in tensors.values()] + [dy.double()], dtype)
    plain, plain_grads = _run(patch_embed_ref, tensors, patch, kw, img_grad, dy)
    assert_close_to_ref(out, ref, plain, f"{backend} out", noise=noise[0])
    assert set(grads) == set(ref_grads)
    for k, n in zip(sorted(grads), noise[1:]):
        assert_close_to_ref(grads[k], ref_grads[k], plain_grads[k], f"{backend} d{k}", noise=n)


@pytest.mark.parametrize("backend,device", CASES)
def test_float64_and_gradcheck(backend, device):
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    pos = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    cls = torch.randn(1, 3, dtype=torch.float64, device=device, requires_grad=True)
    nw = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    if backend == "triton":
        with vitfast.use_backend(backend), pytest.raises(ValueError, match="float64"):
            patch_embed(x, w, b, 2)
        return
    with vitfast.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: patch_embed(a[0], a[1], a[2], 2, pos_embed=a[3], prefix_tokens=a[4], norm_weight=a[5]),
            (x, w, b, pos, cls, nw))


@pytest.mark.parametrize("backend,device", CASES)
def test_frozen_weights_give_the_image_gradient_alone(backend, device):
    """An image that requires grad into frozen weights (saliency maps, adversarial attacks): the backward formed
    dweight and dbias anyway (a product as large as the image's gradient) and dropped them. Only the image's
    gradient, and the norm's where its weight requires grad, is formed, against float64."""
    x = torch.randn(2, 3, 12, 10, device=device, requires_grad=True)  # (W = 10: the last 2 columns dropped)
    w, b = torch.randn(16, 3, 4, 4, device=device), torch.randn(16, device=device)
    nw = torch.randn(16, device=device, requires_grad=True)
    dy = torch.randn(2, 6, 16, device=device)
    calls = []
    real = torch.ops.vitfast.patch_embed_backward

    def spy(*args):
        out = real(*args)
        calls.append(tuple(t.numel() for t in out))
        return out
    with vitfast.use_backend(backend), mock.patch.object(pe_ops, "_patch_embed_backward_op", spy):
        out = patch_embed(x, w, b, 4, norm_weight=nw)
        dx, dnw = torch.autograd.grad(out, (x, nw), dy)
    assert calls == [(x.numel(), 0, 0)]
    xd, nwd = x.detach().double().requires_grad_(), nw.detach().double().requires_grad_()
    ref = patch_embed_ref(xd, w.double(), b.double(), 4, norm_weight=nwd)
    dx_ref, dnw_ref = torch.autograd.grad(ref, (xd, nwd), dy.double())
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dnw.double(), dnw_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_images_and_no_bias(backend, device):
    base = torch.randn(2, 16, 20, 3, device=device)
    x = base.permute(0, 3, 1, 2)[:, :, :, 2:18]  # channels-last and offset: (2, 3, 16, 16)
    w = torch.randn(32, 3, 8, 8, device=device)
    with vitfast.use_backend(backend):
        out = patch_embed(x, w, None, 8)
    ref = patch_embed_ref(x.double(), w.double(), None, 8)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2**31 elements need a GPU (tens of GiB on CPU)")
def test_channel_offsets_past_2_pow_31():
    """A channel-major view of a large batch: channel 2 of each image lies 2 * B*H*W > 2**31 elements past channel 0
    (int32 offsets wrapped there). Only the last image's tokens get a gradient, so that its slice alone is the
    reference for the output, dimages and dweight."""
    B, H, W = 2**30 // (64 * 64) + 1, 64, 64
    images = torch.randn(3, B, H, W, device="cuda", dtype=torch.float16).transpose(0, 1).requires_grad_()
    weight = (torch.randn(8, 3, 16, 16, device="cuda", dtype=torch.float16) * 0.05).requires_grad_()
    with vitfast.use_backend("triton"):
        out = patch_embed(images, weight, None, 16)
        dout = torch.zeros_like(out)
        dout[-1] = torch.randn_like(out[-1])
        dimages, dweight = torch.autograd.grad(out, (images, weight), dout)
    tail = images[-2:].detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = patch_embed_ref(tail, w64, None, 16)
    dtail, dw_ref = torch.autograd.grad(ref, (tail, w64), dout[-2:].double())
    torch.testing.assert_close(out[-2:].double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dimages[-2:].double(), dtail, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dweight.double(), dw_ref, rtol=1e-2, atol=2e-2)
    assert not dimages[0].any()


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("norm", [False, True], ids=["no-norm", "norm"])
def test_empty_batch(backend, device, norm):
    """B = 0, with and without the fused LayerNorm: empty tokens and zero gradients (the cpp forward returned a
    pre-norm buffer of the wrong shape there, which broke the backward)."""
    images = torch.randn(0, 3, 8, 8, device=device)
    weight = torch.randn(5, 3, 4, 4, device=device, requires_grad=True)
    nw, nb = (torch.randn(5, device=device, requires_grad=True) for _ in range(2))
    with vitfast.use_backend(backend):
        y = vitfast.patch_embed(images, weight, None, 4, norm_weight=nw if norm else None,
                                norm_bias=nb if norm else None)
        assert y.shape == (0, 4, 5)
        grads = torch.autograd.grad(y.sum(), (weight, nw, nb) if norm else (weight,))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 3, 30, 32)
    w = torch.randn(8, 3, 8, 8)
    with pytest.raises(ValueError, match=r"image size \(30, 6\) is smaller than the patch size \(8, 8\)"):
        patch_embed(x[..., :6], w, None, 8)
    with pytest.raises(ValueError, match="weight must be"):
        patch_embed(x[..., :24, :], w, None, 4)
    with pytest.raises(ValueError, match="pos_embed has 7 rows"):
        patch_embed(torch.randn(1, 3, 16, 16), w, None, 8, pos_embed=torch.randn(1, 7, 8))
    with pytest.raises(ValueError, match="prefix_tokens has 2 rows"):
        patch_embed(torch.randn(1, 3, 16, 16), w, None, 8, num_prefix_tokens=1, prefix_tokens=torch.randn(2, 8))
    with pytest.raises(ValueError, match="bias must have shape"):
        patch_embed(torch.randn(1, 3, 16, 16), w, torch.randn(9), 8)
    with pytest.raises(ValueError, match=r"patch_size must be positive, got \(0, 0\)"):
        patch_embed(x, torch.randn(8, 3, 0, 0), None, 0)
    for bad in ((4, 4, 4), (4,), 4.0):  # (the extra entries were ignored; (4,) raised IndexError)
        with pytest.raises(ValueError, match=r"patch_size must be an int or a pair of ints \(h, w\), got "):
            patch_embed(x, w, None, bad)
    with pytest.raises(ValueError, match=r"images \(1, 3, 30, 32\) and weight \(0, 3, 8, 8\) must have at least"):
        patch_embed(x, torch.randn(0, 3, 8, 8), None, 8)
    with pytest.raises(ValueError, match=r"images \(1, 0, 30, 32\) and weight \(8, 0, 8, 8\) must have at least"):
        patch_embed(x[:, :0], torch.randn(8, 0, 8, 8), torch.randn(8), 8)
    # a negative prefix count returned a tensor shorter than the patches and wrote before the output
    with pytest.raises(ValueError, match="num_prefix_tokens must be >= 0, got -1"):
        patch_embed(torch.randn(1, 3, 8, 8), torch.randn(8, 3, 4, 4), None, 4, num_prefix_tokens=-1)
    for backend in ("torch", "cpp"):
        with vitfast.use_backend(backend), pytest.raises(ValueError, match="must be >= 0, got -1"):
            torch.ops.vitfast.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(8, 3, 4, 4), None, None, 0, None,
                                          None, None, False, -1, 1e-5, False)
    with pytest.raises(RuntimeError, match="num_prefix_tokens and pos_offset must be >= 0"):
        torch.ops.vitfast.patch_embed_fwd(torch.randn(1, 3, 8, 8), torch.randn(8, 3, 4, 4), None, None, 0, None,
                                          None, None, False, -1, 1e-5, False)


@pytest.mark.parametrize("backend,device", CASES)
def test_fused_norm_of_constant_tokens_is_exactly_its_bias(backend, device):
    """Tokens whose embedding is constant (every output channel has the same kernel; integer pixels and weights,
    so the GEMM sums exactly in any order): the fused LayerNorm gives exactly its bias, and its weight gets a zero
    gradient, as layer_norm does."""
    images = torch.randint(-3, 4, (2, 3, 8, 12), device=device).float()
    weight = torch.randint(-2, 3, (1, 3, 4, 4), device=device).float().expand(96, 3, 4, 4)
    nw = torch.randn(96, device=device, requires_grad=True)
    nb = torch.randn(96, device=device, requires_grad=True)
    with vitfast.use_backend(backend):
        out = patch_embed(images, weight, None, 4, norm_weight=nw, norm_bias=nb, eps=1e-6)
        dnw, dnb = torch.autograd.grad(out, (nw, nb), torch.randn_like(out))
    assert torch.equal(out, nb.detach().expand_as(out))
    assert torch.equal(dnw, torch.zeros_like(dnw)) and dnb.abs().max() > 0


@pytest.mark.parametrize("backend,device", CASES)
def test_fused_norm_of_tokens_whose_squares_overflow_matches_fp64(backend, device):
    """Tokens around 1e25 (pixels of 1e25), whose squared deviations overflow float32: the fused LayerNorm takes
    its statistics again on deviations scaled by 2^-100 (csrc/layer_norm_stats.h), so the output and every
    gradient match the float64 sequence (before, such tokens were normalized to the bias)."""
    tensors = {"images": torch.randn(2, 3, 8, 12, device=device) * 1e25,
               "weight": torch.randn(32, 3, 4, 4, device=device) / 7, "bias": torch.randn(32, device=device),
               "norm_weight": torch.randn(32, device=device), "norm_bias": torch.randn(32, device=device)}
    dy = torch.randn(2, 6, 32, device=device)
    with vitfast.use_backend(backend):
        out, grads = _run(patch_embed, tensors, 4, {}, True, dy)
    ref_out, ref_grads = _run(patch_embed_ref, tensors, 4, {}, True, dy, cast=torch.float64)
    for name, g, r in [("out", out, ref_out)] + [(k, grads[k], ref_grads[k]) for k in ref_grads]:
        err = ((g.double() - r).abs().max() / r.abs().max()).item()
        assert err < 2e-5, f"{backend} {name}: relative error {err:.3g}"


def _timm_resample(posemb, new_size, num_prefix):
    """timm.layers.resample_abs_pos_embed (bicubic, antialias), written out."""
    prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
    side = int(grid.shape[1] ** 0.5)
    g = grid.to(torch.float64 if grid.dtype == torch.float64 else torch.float32)  # (timm's float32, but float64 kept)
    g = g.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=new_size, mode="bicubic", antialias=True)
    g = g.permute(0, 2, 3, 1).reshape(1, -1, posemb.shape[-1]).to(posemb.dtype)
    return torch.cat([prefix, g], 1)


@pytest.mark.parametrize("new_size", [(7, 1), (3, 1), (1, 5), (2, 2), (6, 9)])
def test_pos_embed_resampling_on_thin_grids_and_in_float64(new_size):
    """Grids one patch wide resample as timm does (torch 2.13's CPU antialiased kernel for a channels-first input
    drops the height resize where the new width is 1: every row of vitfast's table was the same, 0.35-0.5 off), and
    a float64 table is resampled in float64 (it was rounded to float32: gradcheck failed)."""
    pos = torch.randn(1, 1 + 16, 8, dtype=torch.float64)
    torch.testing.assert_close(resample_pos_embed(pos, new_size, num_prefix_tokens=1), _timm_resample(pos, new_size, 1),
                               rtol=1e-12, atol=1e-12)
    pos32 = pos.float()
    torch.testing.assert_close(resample_pos_embed(pos32, new_size, num_prefix_tokens=1),
                               _timm_resample(pos32, new_size, 1), rtol=1e-5, atol=1e-6)
    assert torch.autograd.gradcheck(lambda t: resample_pos_embed(t, new_size, num_prefix_tokens=1),
                                    pos[:, :, :2].clone().requires_grad_())


@pytest.mark.parametrize("mode,antialias", [("bilinear", False), ("bicubic", False), ("bilinear", True),
                                            ("bicubic", True), ("nearest", False), ("nearest-exact", False),
                                            ("area", False)])
def test_pos_embed_resampling_modes(mode, antialias):
    """Every 2-D mode of F.interpolate, as timm's `interpolation` takes them ("nearest" raised PyTorch's
    align_corners error)."""
    pos = torch.randn(1, 1 + 12, 8, dtype=torch.float64)
    grid = pos[:, 1:].reshape(1, 3, 4, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(5, 7), mode=mode, antialias=antialias,
                         align_corners=False if mode in ("bilinear", "bicubic") else None)
    want = torch.cat([pos[:, :1], want.permute(0, 2, 3, 1).reshape(1, 35, 8)], 1)
    got = resample_pos_embed(pos, (5, 7), (3, 4), num_prefix_tokens=1, mode=mode, antialias=antialias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # grids given as NumPy arrays, tensors of integers, tuples of 0-d integer tensors
    for new, old in ((torch.tensor([5, 7]), np.array([3, 4])), ((torch.tensor(5), torch.tensor(7)), [3, 4])):
        got = resample_pos_embed(pos, new, old, num_prefix_tokens=1, mode=mode, antialias=antialias)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.zeros(2, 17, 8), (4, 4)), {"num_prefix_tokens": 1}, r"pos_embed must be \(1, rows, E\) .* \(2, 17, 8\)"),
    ((torch.zeros(17, 0), (3, 3)), {"num_prefix_tokens": 1}, r"pos_embed must be \(1, rows, E\) .* \(17, 0\)"),
    ((torch.zeros(17, 8, dtype=torch.long), (3, 3)), {"num_prefix_tokens": 1}, r"pos_embed must be a floating"),
    ((torch.zeros(8, 8), (3, 3)), {"num_prefix_tokens": -1}, r"num_prefix_tokens=-1 is not an integer in \[0, 8\)"),
    ((torch.zeros(1, 8), (3, 3)), {"num_prefix_tokens": 1}, r"num_prefix_tokens=1 is not an integer in \[0, 1\)"),
    ((torch.zeros(17, 8), (3, 3)), {"num_prefix_tokens": 1.5}, r"num_prefix_tokens=1.5 is not an integer"),
    ((torch.zeros(17, 8), torch.tensor([2.0, 3.0])), {"num_prefix_tokens": 1}, r"new_grid must be two positive"),
    ((torch.zeros(17, 8), (0, 3)), {"num_prefix_tokens": 1}, r"new_grid must be two positive integers"),
    ((torch.zeros(17, 8), 4), {"num_prefix_tokens": 1}, r"new_grid must be two positive integers"),
    ((torch.zeros(17, 8), (2.5, 3)), {"num_prefix_tokens": 1}, r"new_grid must be two positive integers"),
    ((torch.zeros(17, 8), (True, 3)), {"num_prefix_tokens": 1}, r"new_grid must be two positive integers"),
    ((torch.zeros(17, 8), torch.tensor([True, True])), {"num_prefix_tokens": 1}, r"new_grid must be two positive"),
    ((torch.zeros(17, 8), (3, 3), (4,)), {"num_prefix_tokens": 1}, r"old_grid must be two positive integers"),
    ((torch.zeros(17, 8), (3, 3)), {"num_prefix_tokens": 1, "mode": "foo"}, r"mode 'foo' is not one of"),
    ((torch.zeros(17, 8), (3, 3)), {"num_prefix_tokens": 1, "mode": "nearest"}, r"antialias=True takes mode"),
    ((torch.zeros(18, 8), (3, 3)), {"num_prefix_tokens": 1}, r"17 patch rows .* are not a square grid"),
    ((torch.zeros(17, 8), (3, 3), (2, 4)), {"num_prefix_tokens": 1}, r"old_grid \(2, 4\) does not match the 16"),
])
def test_pos_embed_resampling_refuses_bad_arguments(args, kwargs, match):
    """Bad arguments get a ValueError naming them (a (2, 8, 8) pair of tables was read as one 4x4 grid: a wrong
    table, no error; others raised PyTorch's errors about align_corners or matmul shapes)."""
    with pytest.raises(ValueError, match=r"vitfast.resample_pos_embed: " + match):
        resample_pos_embed(*args, **kwargs)


@pytest.mark.parametrize("new_size", [(6, 6), (2, 3)])
def test_pos_embed_resampling_matrix_is_cached_and_the_table_read_per_call(new_size, monkeypatch):
    """The interpolation matrix is computed once per sizes; the table itself is read at each call, so an edit of
    it (in place, or through .data, which bumps no version) and another table at a freed one's address are seen."""
    pos = torch.randn(1, 1 + 16, 8, dtype=torch.float64)
    x = torch.randn(2, 3, 4 * new_size[0], 4 * new_size[1], dtype=torch.float64)
    w = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    cls = torch.randn(1, 1, 8, dtype=torch.float64)
    expected = patch_embed_ref(x, w, None, 4, prefix_tokens=cls, pos_embed=_timm_resample(pos, new_size, 1))
    ref_grad = torch.autograd.grad(_timm_resample(pos.requires_grad_(), new_size, 1).sum() * x.shape[0], pos)[0]
    pos.requires_grad_(False)
    calls = []
    real = F.interpolate
    monkeypatch.setattr(pe_ops.F, "interpolate", lambda *a, **k: calls.append(1) or real(*a, **k))
    pe_ops._RESIZE_CACHE.clear()
    with torch.no_grad():
        for _ in range(3):
            out = patch_embed(x, w, None, 4, prefix_tokens=cls, pos_embed=pos)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1
    # training: the matrix stays cached, the gradient reaches the original table
    pos.requires_grad_()
    out = patch_embed(x, w, None, 4, prefix_tokens=cls, pos_embed=pos)
    out.sum().backward()
    assert len(calls) == 1 and pos.grad is not None and pos.grad.shape == pos.shape
    torch.testing.assert_close(pos.grad, ref_grad, rtol=1e-5, atol=1e-6)
    # a bounded cache (it grew with every image size a server saw, 51 MB for 162 sizes of a tiny ViT)
    with torch.no_grad():
        for n in range(2, 2 + 2 * pe_ops._RESIZE_CACHE_SIZE):
            resample_pos_embed(pos, (n, n), num_prefix_tokens=1)
    assert len(pe_ops._RESIZE_CACHE) == pe_ops._RESIZE_CACHE_SIZE
    # the least recently used go first: a size used between new ones stays (first in, first out rebuilt it)
    with torch.no_grad():
        resample_pos_embed(pos, (5, 7), num_prefix_tokens=1)
        built = len(calls)
        for n in range(40, 40 + 2 * pe_ops._RESIZE_CACHE_SIZE):
            resample_pos_embed(pos, (n, 3), num_prefix_tokens=1)
            resample_pos_embed(pos, (5, 7), num_prefix_tokens=1)
    assert len(calls) == built + 2 * pe_ops._RESIZE_CACHE_SIZE
    monkeypatch.undo()

    def check(table):
        with torch.no_grad():
            torch.testing.assert_close(patch_embed(x, w, None, 4, prefix_tokens=cls, pos_embed=table),
                                       patch_embed_ref(x, w, None, 4, prefix_tokens=cls,
                                                       pos_embed=_timm_resample(table, new_size, 1)),
                                       rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        pos.add_(1.0)
    check(pos.detach())
    pos.data.normal_()
    check(pos.detach())
    del pos
    other = torch.randn(1, 1 + 16, 8, dtype=torch.float64)  # often at the freed table's address, version 0
    check(other)
    assert resample_pos_embed(other, (4, 4), num_prefix_tokens=1).shape == (1, 17, 8)


def test_pos_embed_resampling_cache_holds_no_fake_or_inference_tensor():
    """The resampling matrix cached by a first call under torch.export (a fake tensor: every later eager call returned
    a fake output) or under torch.inference_mode (a later training call failed: inference tensors cannot be saved for
    backward); a compiled graph builds its matrix in the graph and caches none."""
    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3, 2, 2))
            self.pos = torch.nn.Parameter(torch.randn(1, 1 + 9, 4))  # a 3 x 3 grid, resampled to the image's 4 x 4
            self.cls = torch.nn.Parameter(torch.randn(1, 4))

        def forward(self, x):
            return patch_embed(x, self.w, None, 2, pos_embed=self.pos, prefix_tokens=self.cls)
    model, img = Embed(), torch.randn(1, 3, 8, 8)
    pe_ops._RESIZE_CACHE.clear()
    with torch.no_grad():
        exported = torch.export.export(model, (img,), strict=False).module()
        want = model(img)
        assert type(want) is torch.Tensor
        torch.testing.assert_close(exported(img), want)
    pe_ops._RESIZE_CACHE.clear()
    with torch.inference_mode():
        model(img)
    model(img).sum().backward()
    assert model.pos.grad is not None and model.pos.grad.abs().sum() > 0
    pe_ops._RESIZE_CACHE.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(img), want)
        assert not pe_ops._RESIZE_CACHE
        torch.testing.assert_close(model(img), want)
        assert [type(m) for m in pe_ops._RESIZE_CACHE.values()] == [torch.Tensor]
    # a graph compiled under inference mode, then an eager training call
    pe_ops._RESIZE_CACHE.clear()
    torch._dynamo.reset()
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(img), want)
    model.zero_grad()
    model(img).sum().backward()
    assert model.pos.grad is not None and model.pos.grad.abs().sum() > 0


def _timm_like(img, patch, C, E, norm, fmt):
    class Ref(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(C, E, patch, patch)
            self.norm = torch.nn.LayerNorm(E) if norm else torch.nn.Identity()

        def forward(self, x):
            x = self.proj(x)
            if fmt == "NCHW":
                return x
            x = x.permute(0, 2, 3, 1) if fmt == "NHWC" else x.flatten(2).transpose(1, 2)
            return self.norm(x)
    return Ref()


@pytest.mark.parametrize("norm,fmt", [(False, None), (True, "NHWC"), (True, None), (False, "NCHW")])
def test_module_is_a_drop_in_for_timm_patch_embed(norm, fmt):
    ref = _timm_like(32, 8, 3, 24, norm, fmt)
    mine = vitfast.nn.PatchEmbed(32, 8, 3, 24, norm_layer=torch.nn.LayerNorm if norm else None, output_fmt=fmt)
    assert set(mine.state_dict()) == set(ref.state_dict())
    if norm:
        torch.nn.init.normal_(ref.norm.weight)
        torch.nn.init.normal_(ref.norm.bias)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)
    assert mine.grid_size == (4, 4) and mine.num_patches == 16
    with pytest.raises(ValueError, match="doesn't match"):
        mine(torch.randn(1, 3, 40, 40))
    mine.strict_img_size = False  # timm then asks for whole patches (unless it pads dynamically)
    with pytest.raises(ValueError, match="should be divisible"):
        mine(torch.randn(1, 3, 36, 32))
    mine.img_size = None  # and without a size, its convolution drops the pixels past the last whole patch
    x = torch.randn(2, 3, 38, 35)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)


def test_module_in_a_timm_vit_sizes_and_resamples_as_timm_does():
    """timm's ViT built with embed_layer=vitfast.nn.PatchEmbed: forward_intermediates and set_input_size (a new
    image size, then a new patch size: the projection resampled by timm's resample_patch_embed) give what the same
    ViT with timm's PatchEmbed gives; feat_ratio and dynamic_feat_size are timm's."""
    timm = import_or_skip("timm")
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    ref = VisionTransformer(**kw).eval()
    mine = VisionTransformer(embed_layer=vitfast.nn.PatchEmbed, **kw).eval()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(mine.forward_intermediates(x)[1], ref.forward_intermediates(x)[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for kwargs, size in ((dict(img_size=(48, 40)), (48, 40)), (dict(patch_size=4), (48, 40))):
        for m in (ref, mine):
            m.set_input_size(**kwargs)
        assert (mine.patch_embed.patch_size, mine.patch_embed.grid_size, mine.patch_embed.num_patches) == (
            ref.patch_embed.patch_size, ref.patch_embed.grid_size, ref.patch_embed.num_patches)
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(mine(x), ref(x), rtol=1e-4, atol=1e-5)
    pe, tpe = vitfast.nn.PatchEmbed(None, (4, 6), dynamic_img_pad=True), timm.layers.PatchEmbed(
        None, (4, 6), dynamic_img_pad=True)
    assert pe.feat_ratio() == tpe.feat_ratio() == 6 and pe.feat_ratio(False) == tpe.feat_ratio(False) == (4, 6)
    assert pe.dynamic_feat_size((9, 13)) == tpe.dynamic_feat_size((9, 13)) == (3, 3)


def test_module_with_a_float32_norm_in_a_bfloat16_model():
    """A bf16 projection with its LayerNorm kept in fp32 (timm takes it: nn.LayerNorm on mixed dtypes) runs the norm
    unfused, as timm does, rather than refusing the norm's dtype."""
    ref = _timm_like(16, 8, 3, 24, True, None)
    mine = vitfast.nn.PatchEmbed(16, 8, 3, 24, norm_layer=torch.nn.LayerNorm)
    mine.load_state_dict(ref.state_dict())
    for m in (ref, mine):
        m.proj.bfloat16()
    x = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)
    out = mine(x)
    assert out.dtype == torch.bfloat16 and mine.norm.weight.dtype == torch.float32
    torch.testing.assert_close(out, ref(x), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="in the projection's dtype, not LayerNorm"):
        mine(x, pos_embed=torch.randn(1, 4, 24, dtype=torch.bfloat16))


@pytest.mark.parametrize("fmt", [dict(flatten=False), dict(output_fmt="NCHW"), dict(output_fmt="NHWC")],
                         ids=["flatten_false", "NCHW", "NHWC"])
@pytest.mark.parametrize("norm", ["BatchNorm2d", "RMSNorm", "LayerNorm", "LayerNorm2d"])
def test_module_norm_runs_where_timms_does(norm, fmt):
    """timm normalizes the NCHW map where the output is NCHW; vitfast normalized the (B, L, E) tokens (BatchNorm2d
    raised, RMSNorm gave other values) or fused the LayerNorm over E (timm's runs over W, here equal to E). timm's
    LayerNorm2d, an nn.LayerNorm subclass over dim 1, was fused as a LayerNorm over E (4.9 apart at NHWC)."""
    timm = import_or_skip("timm")
    cfg = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=8,
               norm_layer=getattr(torch.nn, norm, None) or getattr(timm.layers, norm), **fmt)
    ref = timm.layers.PatchEmbed(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    mine = vitfast.nn.PatchEmbed(**cfg).eval()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)


def test_module_calls_hooked_proj_and_norm():
    """Hooks on proj or norm (or for every module) ran never: the fused op reads their parameters. Where they are
    set, the submodules are called, as timm calls them, with and without fused ViT tokens."""
    timm = import_or_skip("timm")
    cfg = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=8, norm_layer=torch.nn.LayerNorm)
    ref, mine = timm.layers.PatchEmbed(**cfg), vitfast.nn.PatchEmbed(**cfg)
    torch.nn.init.normal_(ref.norm.weight)
    torch.nn.init.normal_(ref.norm.bias)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, 16)
    calls = []
    for m in (ref, mine):
        m.proj.register_forward_hook(lambda mod, i, o: calls.append("proj") or o + 1)
        m.norm.register_forward_hook(lambda mod, i, o: calls.append("norm") or o * 2)
    want = ref(x)
    calls.clear()
    torch.testing.assert_close(mine(x), want, rtol=1e-5, atol=1e-5)
    assert calls == ["proj", "norm"]
    cls, pos = torch.randn(1, 1, 8), torch.randn(1, 17, 8)
    n = mine.norm
    tokens = 2 * F.layer_norm(ref.proj(x).flatten(2).transpose(1, 2), (8,), n.weight, n.bias, n.eps)
    torch.testing.assert_close(mine(x, pos_embed=pos, prefix_tokens=cls),
                               torch.cat([(cls + pos[:, :1]).expand(2, 1, 8), tokens + pos[:, 1:]], 1),
                               rtol=1e-5, atol=1e-5)
    plain = vitfast.nn.PatchEmbed(**cfg)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, i: seen.append(mod))
    try:
        plain(x)
    finally:
        handle.remove()
    assert plain.proj in seen and plain.norm in seen


def test_module_rejects_other_ranks_clearly():
    """A 3-D input gave "not enough values to unpack"."""
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\) images, got shape \(3, 16, 16\)"):
        vitfast.nn.PatchEmbed(16, 4, 3, 8)(torch.randn(3, 16, 16))


def test_module_refuses_non_integer_sizes():
    """A float size was truncated (patch 8.5 ran as 8); NumPy integers are ints."""
    import numpy as np
    for kw in (dict(patch_size=8.5), dict(img_size=(16.0, 16)), dict(img_size=True)):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=rf"{name} must be an int or a pair of ints \(h, w\), got "):
            vitfast.nn.PatchEmbed(**{"img_size": 16, "patch_size": 8, "in_chans": 3, "embed_dim": 8, **kw})
    with pytest.raises(ValueError, match=r"patch_size must be an int or a pair of ints \(h, w\), got 4.0"):
        vitfast.nn.PatchEmbed(16, 8, 3, 8).set_input_size(patch_size=4.0)
    m = vitfast.nn.PatchEmbed(np.int64(16), (np.int32(8), 8), 3, 8)
    assert m.patch_size == (8, 8) and m.grid_size == (2, 2) and type(m.patch_size[0]) is int
    m = vitfast.nn.PatchEmbed(np.array([32, 48]), torch.Size([8, 8]), 3, 8)  # (timm's to_2tuple takes them)
    assert m.img_size == (32, 48) and m.grid_size == (4, 6) and type(m.img_size[1]) is int
    for bad in (np.array(16), np.array([16.0, 16.0]), (torch.tensor(16), 16)):
        with pytest.raises(ValueError, match=r"vitfast.nn.PatchEmbed: img_size must be an int or a pair of ints"):
            vitfast.nn.PatchEmbed(bad, 8, 3, 8)


def test_numpy_patch_sizes_compile():
    """A NumPy array patch size ran eagerly and was refused under torch.compile (Dynamo wraps the array); a NumPy
    scalar compiles too (Dynamo traces it as a 0-d array; its value is data, so fullgraph=True cannot hold it)."""
    import numpy as np
    x, w = torch.randn(1, 3, 16, 16), torch.randn(8, 3, 8, 8)
    want = patch_embed_ref(x, w, None, 8)
    for size in (np.array([8, 8]), np.int64(8), torch.Size([8, 8])):
        got = torch.compile(lambda x: vitfast.patch_embed(x, w, None, size), backend="eager")(x)
        torch.testing.assert_close(got, want, msg=repr(size))


def test_module_fuses_vit_tokens_and_pads_dynamically():
    m = vitfast.nn.PatchEmbed(None, 8, 3, 16, dynamic_img_pad=True)
    x = torch.randn(2, 3, 20, 13)
    cls = torch.randn(1, 1, 16)
    pos = torch.randn(1, 1 + 6, 16)
    out = m(x, pos_embed=pos, prefix_tokens=cls)
    ref = patch_embed_ref(F.pad(x, (0, 3, 0, 4)), m.proj.weight, m.proj.bias, 8, prefix_tokens=cls, pos_embed=pos)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert m(x).shape == (2, 6, 16)


def test_opcheck():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(16, 3, 4, 4, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    pos = torch.randn(5, 16, requires_grad=True)
    cls = torch.randn(1, 16, requires_grad=True)
    nw, nb = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    op = torch.ops.vitfast.patch_embed.default
    torch.library.opcheck(op, (x, w, b, pos, 1, cls, None, None, False, 1, 1e-5, True))
    torch.library.opcheck(op, (x, w, None, None, 0, None, nw, nb, True, 0, 1e-6, True))
    torch.library.opcheck(op, (x.detach(), w, b, pos[1:], 0, None, None, None, False, 2, 1e-5, False))
    dz = torch.randn(2, 4, 16)
    for need_dimages, need_dweight in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.vitfast.patch_embed_backward.default,
                              (dz, x.detach(), w.detach(), True, need_dimages, need_dweight))


@pytest.mark.parametrize("backend,device", CASES)
def test_batch_of_one_gives_rows_as_the_fake_says(backend, device):
    """One image without prefix rows or pos_embed: the torch backend returned the conv's output transposed (strides
    (4, 1, 4)), not the contiguous rows the fake promises, and torch.compile failed on it."""
    x = torch.randn(1, 3, 8, 8, device=device)
    w, b = torch.randn(8, 3, 4, 4, device=device), torch.randn(8, device=device)
    nw, nb = torch.randn(8, device=device), torch.randn(8, device=device)
    op = torch.ops.vitfast.patch_embed.default
    with vitfast.use_backend(backend):
        for norm in (False, True):
            args = (x, w, b, None, 0, None, nw if norm else None, nb if norm else None, norm, 0, 1e-5, True)
            out, z = op(*args)[:2]
            assert out.is_contiguous() and (z.numel() == 0 or z.is_contiguous())
            torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def test_torch_compile_fullgraph():
    class ViTStem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = vitfast.nn.PatchEmbed(16, 8, 3, 16)
            self.cls_token = torch.nn.Parameter(torch.randn(1, 1, 16))
            self.pos_embed = torch.nn.Parameter(torch.randn(1, 5, 16))

        def forward(self, x):
            return self.patch_embed(x, pos_embed=self.pos_embed, prefix_tokens=self.cls_token).relu()

    assert_compiles_like_eager(ViTStem(), torch.randn(2, 3, 16, 16, requires_grad=True))


@pytest.mark.parametrize("backend,device", CASES)
def test_a_graph_traced_without_grad_trains(backend, device):
    """torch.export under no_grad records the forward that stores no pre-norm tokens; its backward raised where the
    unfused conv + LayerNorm trains. It recomputes them now (same gradients as eager)."""
    module = vitfast.nn.PatchEmbed(img_size=8, patch_size=2, in_chans=3, embed_dim=16,
                                   norm_layer=torch.nn.LayerNorm).to(device)
    images = torch.randn(2, 3, 8, 8, device=device)
    with vitfast.use_backend(backend):
        with torch.no_grad():
            exported = torch.export.export(module, (images,)).module()
        exported(images).pow(2).sum().backward()
        grads = [p.grad for p in exported.parameters()]
        module(images).pow(2).sum().backward()
    assert len(grads) == 4 and all(g is not None for g in grads)
    for got, want in zip(grads, [p.grad for p in module.parameters()]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("norm", [False, True], ids=["no-norm", "norm"])
def test_batched_gradients_without_prefix_tokens(norm):
    """is_grads_batched (jacobian(vectorize=True), gradcheck's batched check) failed in PyTorch's vmap
    ("Batching rule not implemented for aten::alias") with no prefix tokens (dout[:, 0:] was an alias)."""
    images = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w, b, nw, nb = (torch.randn(s, dtype=torch.float64) for s in ((6, 3, 2, 2), 6, 6, 6))
    kw = dict(norm_weight=nw, norm_bias=nb) if norm else {}
    cotangents = torch.randn(3, 1, 4, 6, dtype=torch.float64)
    with vitfast.use_backend("cpp"):
        got, = torch.autograd.grad(vitfast.patch_embed(images, w, b, 2, **kw), images, cotangents,
                                   is_grads_batched=True)
    want, = torch.autograd.grad(patch_embed_ref(images, w, b, 2, norm=norm, **kw), images, cotangents,
                                is_grads_batched=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend,device", CASES)
def test_the_ops_check_shapes_when_called_directly(backend, device):
    """torch.ops.vitfast.patch_embed called directly: a bias, pos_embed or prefix of another size reached the
    kernels (a pos_embed with fewer rows than pos_offset + L read past its end)."""
    images, w = torch.randn(2, 3, 8, 8, device=device), torch.randn(16, 3, 4, 4, device=device)
    b, pos, cls = torch.randn(16, device=device), torch.randn(5, 16, device=device), torch.randn(1, 16, device=device)
    op = torch.ops.vitfast.patch_embed
    with vitfast.use_backend(backend):
        with pytest.raises(ValueError, match=r"bias \(8,\) \(expected \(16,\)\)"):
            op(images, w, b[:8], None, 0, None, None, None, False, 0, 1e-5, False)
        with pytest.raises(ValueError, match=r"pos_embed \(4, 16\) \(expected \(5, 16\)\)"):
            op(images, w, b, pos[:4], 1, cls, None, None, False, 1, 1e-5, False)
        with pytest.raises(ValueError, match=r"prefix_tokens \(1, 16\) \(expected \(2, 16\)\)"):
            op(images, w, b, pos, 0, cls, None, None, False, 2, 1e-5, False)
        for bad_images, bad_w in ((images[:, :2], w), (images, w[..., :0])):  # (a 0-wide patch: no ZeroDivisionError)
            with pytest.raises(ValueError, match="images .* and weight .* do not agree"):
                op(bad_images, bad_w, b, None, 0, None, None, None, False, 0, 1e-5, False)
        with pytest.raises(ValueError, match=r"dz \(2, 3, 16\) \(expected \(2, 4, 16\)\)"):
            torch.ops.vitfast.patch_embed_backward(torch.randn(2, 3, 16, device=device), images, w, True, True, True)
