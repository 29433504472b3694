"""Autocast: vitfast's ops, reference models and patched library models inside `torch.autocast` behave like the
unfused code they replace inside the same region (each op's rule: vitfast/autocast.py and the op docstrings).

Every op on every available backend, every reference model (ViT, Swin V1/V2, CLIP, DETR) against its sdpa
backend (the unfused code), and every patched timm / torchvision / open_clip / transformers model against the
unpatched one: the output has the unfused code's dtype, it is about as close to a float64 reference as the unfused
code's output, and every gradient is present and as close. CPU autocast runs bfloat16 (and float16 on the default
CPU backend, to show the rules follow the region's dtype); on a GPU the same tests run CUDA autocast in float16 and
bfloat16.

Tolerance: bfloat16 keeps 8 significant bits (eps 2**-7), float16 11 (eps 2**-10). vitfast and the unfused code
round at different points (a fused kernel keeps in fp32 what the unfused code rounds between ops, and the
reverse), so their errors against float64 are of one size but not equal. vitfast's max error may be twice the
unfused code's plus two eps of the autocast dtype at the reference's magnitude, counted as at least 1: a gradient
that cancels to ~0 (the k bias, which softmax ignores) keeps the rounding noise of its O(1) terms. A wrong rule
fails on the dtype, raises, or errs far beyond this: the LayerNorm inputs carry a mean of 100, so a float32
LayerNorm input rounded to bfloat16 (step 0.5 there) would put the unit-variance output off by up to 0.25 x weight.
"""
import copy
import types

import pytest
import torch
import torch.nn.functional as F

import vitfast
import vitfast.models.detr
from vitfast.models import CLIP, DETR, SwinTransformer, VisionTransformer
from vitfast.models.common import set_backend
from vitfast.ops.patch_embed import patch_embed_ref, resample_pos_embed
from vitfast.ops.patch_merging import patch_merging_ref
from vitfast.ops.rel_pos_attention import decomposed_rel_pos
from vitfast.ops.window_attention import relative_position_index, shifted_window_attention_ref, window_attention_ref

from _optional_libs import import_or_skip
from conftest import DEVICE, backend_cases
from test_model_clip import TINY_TEXT, TINY_VISION, _text_batch
from test_model_detr import TINY as DETR_TINY, _flat as _detr_outputs, _padded_batch
from test_model_swin import TINY as SWIN_TINY
from test_model_vit import TINY as VIT_TINY

REGION_DTYPES = {"cpu": (torch.bfloat16,), "cuda": (torch.float16, torch.bfloat16)}


def _cases(op: str) -> list:
    """(backend, device, autocast dtype) for every backend that runs `op` and every autocast dtype of its device;
    CPU float16 on the default CPU backend only."""
    cases = []
    for param in backend_cases(op):
        backend, device = param.values
        dtypes = REGION_DTYPES[device] + ((torch.float16,) if device == "cpu" and backend == "cpp" else ())
        cases += [pytest.param(backend, device, dt, id=f"{backend}-{device}-{str(dt)[6:]}") for dt in dtypes]
    return cases


def _model_cases() -> list:
    """Model tests: the automatic backend choice and triton, on DEVICE, in each autocast dtype of DEVICE."""
    backends = ["auto"] + (["triton"] if any(p.values[0] == "triton" for p in backend_cases("attention")) else [])
    return [pytest.param(b, dt, id=f"{b}-{DEVICE}-{str(dt)[6:]}") for b in backends for dt in REGION_DTYPES[DEVICE]]


MODEL_CASES = _model_cases()


def _assert_like_unfused(out, ref64, unfused, dtype, what):
    """The module docstring's rule: `out` (vitfast under autocast) has the dtype of `unfused` (the unfused code under
    the same autocast), and its error against `ref64` is at most 2x unfused's + 2 eps(dtype) x max(1, |ref64|)."""
    assert out.dtype == unfused.dtype, f"{what}: dtype {out.dtype}, the unfused code gives {unfused.dtype}"
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref64).abs().max().item()
    err_unfused = (unfused.double() - ref64).abs().max().item()
    floor = 2 * torch.finfo(dtype).eps * max(1.0, ref64.abs().max().item())
    assert err <= 2 * err_unfused + floor, (
        f"{what}: max error {err:.3g} > 2 x the unfused code's {err_unfused:.3g} + {floor:.3g} (autocast {dtype})")


def _as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _backprop(outs, weights):
    """A random projection of the outputs (a plain sum of LayerNorm outputs has ~no gradient), in float64."""
    sum((o.double() * w).sum() for o, w in zip(outs, weights)).backward()


def _check_op(backend, device, dtype, op, unfused, *inputs):
    """`op(*inputs)` on vitfast's `backend` inside autocast against `unfused(*inputs)` inside the same autocast:
    outputs and the gradients of the inputs that require grad (backward outside the region, as PyTorch
    recommends), each against `unfused` run in float64."""
    def leaves(dt=None):
        return [t.detach().to(dt or t.dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t
                for t in inputs]

    x64 = leaves(torch.float64)
    ref = _as_list(unfused(*x64))
    weights = [torch.randn_like(r) for r in ref]
    _backprop(ref, weights)
    runs = {}
    for name, fn in (("unfused", unfused), ("vitfast", op)):
        xs = leaves()
        with vitfast.use_backend(backend):
            with torch.autocast(device, dtype=dtype):
                outs = _as_list(fn(*xs))
            _backprop(outs, weights)
        runs[name] = outs, xs
    (outs, xs), (outs_u, xs_u) = runs["vitfast"], runs["unfused"]
    for i, (o, o_u, r) in enumerate(zip(outs, outs_u, ref)):
        _assert_like_unfused(o, r, o_u, dtype, f"output {i}")
    for i, (x, x_u, x64_i) in enumerate(zip(xs, xs_u, x64)):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            assert (x.grad is None) == (x64_i.grad is None), f"input {i}: gradient present in one run only"
            if x.grad is not None:
                _assert_like_unfused(x.grad, x64_i.grad, x_u.grad, dtype, f"gradient of input {i}")


def _randn(device, *shape, scale=1.0, offset=0.0):
    return (torch.randn(*shape, device=device) * scale + offset).requires_grad_()


# ----------------------------------------------------------------------------------------------- ops
# Each case: (op for the backend choice, vitfast(*inputs), the unfused code(*inputs), inputs(device)). Inputs are
# float32 leaves; the cases feed each op what models feed it under autocast (float32 activations and parameters,
# outputs of a Linear, which are in the region's dtype) and cover each op's rule.

def _layer_norm():
    """A float32 input with a large mean (F.layer_norm's rule: float32 on CUDA, the input's dtype on the CPU)."""
    return ("layer_norm", lambda x, w, b: vitfast.layer_norm(x, 48, w, b, eps=1e-6),
            lambda x, w, b: F.layer_norm(x, (48,), w, b, eps=1e-6),
            lambda d: (_randn(d, 2, 5, 48, offset=100.0), _randn(d, 48), _randn(d, 48)))


def _layer_norm_residual():
    """y, s = LN(linear(x) + residual): a low-precision branch plus a float32 residual stream promotes to float32 (the
    reference models' fused residual); and LN of the low-precision branch alone."""
    def fused(x, w_lin, r, w, b):
        branch = F.linear(x, w_lin)
        return vitfast.layer_norm(branch, 48, w, b, residual=r) + (vitfast.layer_norm(branch, 48, w, b),)

    def unfused(x, w_lin, r, w, b):
        branch = F.linear(x, w_lin)
        s = branch + r
        return F.layer_norm(s, (48,), w, b), s, F.layer_norm(branch, (48,), w, b)

    return "layer_norm", fused, unfused, lambda d: (_randn(d, 2, 5, 32), _randn(d, 48, 32),
                                                    _randn(d, 2, 5, 48, offset=100.0), _randn(d, 48), _randn(d, 48))


def _attention():
    """SDPA's rule, with mixed inputs: q float32, k and v from a Linear (low precision), a float mask."""
    B, H, N, D = 2, 2, 9, 16

    def kv(x, w):
        return F.linear(x, w).view(B, N, 2, H, D).permute(2, 0, 3, 1, 4)

    return ("attention", lambda q, x, w, mask: vitfast.attention(q, *kv(x, w), mask),
            lambda q, x, w, mask: F.scaled_dot_product_attention(q, *kv(x, w), mask),
            lambda d: (_randn(d, B, H, N, D), _randn(d, B, N, 24), _randn(d, 2 * H * D, 24), _randn(d, B, 1, N, N)))


def _flash_attn_func():
    def unfused(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)

    return ("attention", lambda q, k, v: vitfast.flash_attn_func(q, k, v, causal=True), unfused,
            lambda d: tuple(_randn(d, 1, 7, 2, 16) for _ in range(3)))


def _shifted_window_attention():
    """torchvision's function: a 6 x 6 map padded to windows of 4 (qkv bias at padding pixels), shifted by 2. The
    bias table is large, so rounding it to the region's dtype, which the unfused code does not (its float32 bias
    promotes the scores), would show."""
    heads, C = 2, 16

    def fused(x, qkv_w, qkv_b, proj_w, table):
        return vitfast.shifted_window_attention(x, qkv_w, proj_w, table, [4, 4], heads, [2, 2], qkv_bias=qkv_b)

    def unfused(x, qkv_w, qkv_b, proj_w, table):
        bias = table[relative_position_index([4, 4]).to(table.device)].view(16, 16, heads).permute(2, 0, 1)
        return shifted_window_attention_ref(x, qkv_w, proj_w, bias[None], [4, 4], heads, [2, 2], qkv_bias=qkv_b)

    return ("window_attention", fused, unfused,
            lambda d: (_randn(d, 1, 6, 6, C), _randn(d, 3 * C, C, scale=0.3), _randn(d, 3 * C), _randn(d, C, C),
                       _randn(d, 49, heads, scale=8.0)))


def _window_attention_cosine():
    """The qkv-layout op with Swin-V2's cosine attention: qkv from a Linear, logit scale and bias in float32."""
    heads, D = 2, 8

    def qkv(x, w):
        return F.linear(x, w).view(1, 4, 4, 3, heads, D)

    def unfused(x, w, table, logit_scale):
        return window_attention_ref(qkv(x, w), table, 4, 0, logit_scale=torch.clamp(logit_scale, max=4.6052).exp())

    return ("window_attention", lambda x, w, table, logit_scale: vitfast.window_attention(
                qkv(x, w), table, 4, 0, logit_scale=logit_scale), unfused,
            lambda d: (_randn(d, 1, 4, 4, 16), _randn(d, 3 * heads * D, 16), _randn(d, 49, heads),
                       _randn(d, heads, offset=2.0)))


def _patch_embed_vit():
    """Class token and pos_embed: float32 tokens, as the unfused cat and add give."""
    return ("patch_embed", lambda x, w, b, cls, pos: vitfast.patch_embed(x, w, b, 8, pos_embed=pos, prefix_tokens=cls),
            lambda x, w, b, cls, pos: patch_embed_ref(x, w, b, 8, pos_embed=pos, prefix_tokens=cls),
            lambda d: (_randn(d, 2, 3, 16, 24), _randn(d, 16, 3, 8, 8, scale=0.2), _randn(d, 16),
                       _randn(d, 1, 1, 16), _randn(d, 1, 7, 16)))


def _patch_embed_swin():
    """The fused norm, no prefix or pos_embed: the LayerNorm's rule decides the dtype."""
    return ("patch_embed", lambda x, w, b, nw, nb: vitfast.patch_embed(x, w, b, 8, norm_weight=nw, norm_bias=nb),
            lambda x, w, b, nw, nb: patch_embed_ref(x, w, b, 8, norm_weight=nw, norm_bias=nb),
            lambda d: (_randn(d, 2, 3, 16, 24), _randn(d, 16, 3, 8, 8, scale=0.2), _randn(d, 16), _randn(d, 16),
                       _randn(d, 16)))


def _patch_merging():
    return ("patch_merging", vitfast.patch_merging, patch_merging_ref,
            lambda d: (_randn(d, 2, 5, 6, 8), _randn(d, 32), _randn(d, 32), _randn(d, 16, 32)))


def _rel_pos_attention():
    """SAM's attention: q, k, v from a Linear, the decomposed terms from float32 tables (an einsum in the region's
    dtype); the unfused code, Hugging Face's, passes the dense bias to SDPA."""
    B, H, hw, D = 1, 2, (3, 4), 16
    N = hw[0] * hw[1]

    def qkv(x, w):
        return F.linear(x, w).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)

    def fused(x, w, table_h, table_w):
        q, k, v = qkv(x, w)
        return vitfast.rel_pos_attention(q, k, v, *decomposed_rel_pos(q, table_h, table_w, hw, hw))

    def unfused(x, w, table_h, table_w):
        q, k, v = qkv(x, w)
        rel_h, rel_w = decomposed_rel_pos(q, table_h, table_w, hw, hw)
        return F.scaled_dot_product_attention(q, k, v, (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2))

    return ("rel_pos_attention", fused, unfused,
            lambda d: (_randn(d, B, N, 24), _randn(d, 3 * H * D, 24, scale=0.3), _randn(d, 2 * hw[0] - 1, D),
                       _randn(d, 2 * hw[1] - 1, D)))


OP_CASES = {"layer_norm": _layer_norm, "layer_norm_residual": _layer_norm_residual, "attention": _attention,
            "flash_attn_func": _flash_attn_func, "shifted_window_attention": _shifted_window_attention,
            "window_attention_cosine": _window_attention_cosine, "patch_embed_vit": _patch_embed_vit,
            "patch_embed_swin": _patch_embed_swin, "patch_merging": _patch_merging,
            "rel_pos_attention": _rel_pos_attention}


# Known limitation (issue 14's closing note): in bfloat16 the triton rel_pos_attention rounds P to bfloat16 before
# P @ V (tensor-core operands, as FlashAttention-2 does), one more bf16 rounding of O than CPU SDPA's (the unfused code
# here), and the backward's delta = rowsum(dO * O) carries it into every dS of the row: the rel-pos table gradient
# misses by ~2.8x the unfused error (out by ~3x the torch backend's). Strict: the test fails once that changes. Under
# the interpreter only: on CUDA the unfused code is CUDA SDPA, which rounds P alike (passed on an H200, 2026-11-30).
_KNOWN = {("rel_pos_attention", "triton", "cpu", torch.bfloat16): "triton rel_pos_attention in bf16: P rounded to "
          "bf16 before P @ V; ~2.8x the unfused error on the rel-pos table gradient"}


def _op_cases(names=OP_CASES) -> list:
    cases = []
    for name in names:
        for p in _cases(OP_CASES[name]()[0]):
            known = _KNOWN.get((name, *p.values))
            marks = [pytest.mark.xfail(reason=known, strict=True)] if known else []
            cases.append(pytest.param(name, *p.values, id=f"{name}-{p.id}", marks=marks))
    return cases


@pytest.mark.parametrize("case,backend,device,dtype", _op_cases())
def test_op(case, backend, device, dtype):
    _, fused, unfused, inputs = OP_CASES[case]()
    _check_op(backend, device, dtype, fused, unfused, *inputs(device))


def _bare_op(op, d):
    """`op` alone, and float32 leaves for it (no PyTorch op around it whose own backward autocast would change)."""
    if op == "layer_norm":
        return (lambda x, r, w, b: vitfast.layer_norm(x, 48, w, b, residual=r)[0],
                (_randn(d, 2, 5, 48), _randn(d, 2, 5, 48), _randn(d, 48), _randn(d, 48)))
    if op == "attention":
        return vitfast.attention, (*(_randn(d, 2, 2, 9, 16) for _ in range(3)), _randn(d, 2, 1, 9, 9))
    if op == "window_attention":
        return (lambda qkv, table, pad: vitfast.window_attention(qkv, table, 4, 2, qkv_pad=pad),
                (_randn(d, 1, 6, 6, 3, 2, 8), _randn(d, 49, 2), _randn(d, 48)))
    if op == "patch_embed":
        return (lambda x, w, b, nw, nb, pos: vitfast.patch_embed(x, w, b, 8, norm_weight=nw, norm_bias=nb,
                                                                 pos_embed=pos, num_prefix_tokens=1),
                (_randn(d, 2, 3, 16, 24), _randn(d, 16, 3, 8, 8), _randn(d, 16), _randn(d, 16), _randn(d, 16),
                 _randn(d, 7, 16)))
    if op == "rel_pos_attention":
        return vitfast.rel_pos_attention, (*(_randn(d, 2, 2, 12, 16) for _ in range(3)), _randn(d, 2, 2, 12, 3),
                                           _randn(d, 2, 2, 12, 4))
    return vitfast.patch_merging, (_randn(d, 2, 5, 6, 8), _randn(d, 32), _randn(d, 32), _randn(d, 16, 32))


@pytest.mark.parametrize("op,backend,device,dtype", [
    pytest.param(op, *p.values, id=f"{op}-{p.id}")
    for op in ("layer_norm", "attention", "window_attention", "patch_embed", "patch_merging", "rel_pos_attention")
    for p in _cases(op)])
def test_backward_inside_the_region_ignores_it(op, backend, device, dtype):
    """A float32 forward outside autocast, then backward() inside a region (autograd keeps autocast on there):
    the backward ops run in the dtypes the forward saved, so the gradients are those of a backward outside."""
    fn, xs = _bare_op(op, device)
    with vitfast.use_backend(backend):
        out = fn(*xs)
        weights = torch.randn_like(out)
        expected = torch.autograd.grad(out, xs, weights, retain_graph=True)
        with torch.autocast(device, dtype=dtype):
            grads = torch.autograd.grad(out, xs, weights)
    for g, e in zip(grads, expected):
        assert g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()))


def test_resampled_pos_embed_stays_float32_under_autocast():
    """F.interpolate, which timm's resampling calls, is not autocast: vitfast's cached-matrix product must not be."""
    pos = torch.randn(1, 1 + 9, 32, device=DEVICE)
    expected = resample_pos_embed(pos, (5, 4), num_prefix_tokens=1)
    for dtype in REGION_DTYPES[DEVICE]:
        with torch.autocast(DEVICE, dtype=dtype):
            assert torch.equal(resample_pos_embed(pos, (5, 4), num_prefix_tokens=1), expected)


def test_every_op_has_an_autocast_kernel():
    """Each vitfast op, Python or C++ (a direct call of a C++ kernel op too), has an AutocastCPU and AutocastCUDA
    kernel, so autocast never reaches a kernel unruled."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("vitfast::")]
    assert "vitfast::layer_norm" in names
    for name in names:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name} has no {key} kernel"


@pytest.mark.skipif(not vitfast._ext.HAS_EXT, reason="vitfast._C is not built")
def test_cpp_kernel_op_called_directly_under_autocast():
    """The issue's failure: at::addmm inside the C++ patch embedding reached autocast and raised."""
    images, w, b = torch.randn(2, 3, 32, 32), torch.randn(8, 3, 8, 8), torch.randn(8)
    args = (images, w, b, None, 0, None, None, None, False, 0, 1e-5, False)
    expected = torch.ops.vitfast.patch_embed_fwd(*args)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(torch.ops.vitfast.patch_embed_fwd(*args)[0], expected)


def test_mixed_dtypes_outside_autocast_and_float64_under_it_raise():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), dtype torch.bfloat16"):
        vitfast.layer_norm(x.bfloat16(), 8, torch.randn(8))
    with pytest.raises(ValueError, match="one dtype.*torch.float32, torch.bfloat16"):
        vitfast.attention(x.view(1, 1, 4, 8), x.view(1, 1, 4, 8).bfloat16(), x.view(1, 1, 4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            ValueError, match="layer_norm under autocast: x torch.float64, weight torch.float32"):
        vitfast.layer_norm(x.double(), 8, torch.randn(8))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(  # (a float32 x was named float64)
            ValueError, match=r"x \(promoted with residual\) torch.float64, weight torch.float32"):
        vitfast.layer_norm(x, 8, torch.randn(8), residual=x.double())
    # float64 norm parameters of a fused patch embedding (F.layer_norm refuses them too): the error named
    # vitfast.layer_norm and a float32 "x" the caller never passed
    images, w, nw = torch.randn(2, 3, 16, 16), torch.randn(16, 3, 8, 8), torch.ones(16, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            ValueError, match=r"vitfast.patch_embed: norm_weight must have shape \(16,\).*float64 only with float64 "):
        vitfast.patch_embed(images, w, None, 8, norm_weight=nw, norm_bias=nw)


def test_fused_residual_follows_type_promotion_outside_autocast():
    """x + residual promotes as PyTorch's add does, with or without autocast."""
    x, r = torch.randn(3, 16).bfloat16(), torch.randn(3, 16)
    w, b = torch.randn(16), torch.randn(16)
    y, s = vitfast.layer_norm(x, 16, w, b, residual=r)
    s_ref = x + r
    assert s.dtype == y.dtype == torch.float32
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, F.layer_norm(s_ref, (16,), w, b))


# ----------------------------------------------------------------------------------------------- models

def _check_model(backend, dtype, model, mine, call, inputs):
    """`mine` (vitfast) against `model` (the unfused code; same weights), each inside autocast on DEVICE, with
    `model` in float64 as the reference: the outputs `call(model, inputs)` (a list of tensors) and every parameter
    gradient (backward outside the region, as PyTorch recommends)."""
    model, mine = model.to(DEVICE).eval(), mine.to(DEVICE).eval()
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    model64 = copy.deepcopy(model).double()
    ref = call(model64, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    weights = [torch.randn_like(r) for r in ref]
    _backprop(ref, weights)
    outs = {}
    for name, m in (("unfused", model), ("vitfast", mine)):
        with vitfast.use_backend(backend), torch.autocast(DEVICE, dtype=dtype):
            outs[name] = call(m, inputs)
        with vitfast.use_backend(backend):
            _backprop(outs[name], weights)
    for i, (o, o_u, r) in enumerate(zip(outs["vitfast"], outs["unfused"], ref)):
        _assert_like_unfused(o, r, o_u, dtype, f"output {i}")
    for (name, p64), p_u, p in zip(model64.named_parameters(), model.parameters(), mine.parameters()):
        assert (p.grad is None) == (p_u.grad is None), f"{name}: gradient present in one model only"
        if p.grad is not None:
            _assert_like_unfused(p.grad, p64.grad, p_u.grad, dtype, f"gradient of {name}")


def _swin(v2):
    """test_model_swin.py's TINY on 8 x 8 images: a 4 x 4 patch map (one window), then 2 x 2."""
    model = SwinTransformer(backend="sdpa", v2=v2, **SWIN_TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)  # a trained-looking bias table and norms, not the zero/one init
    return model, lambda m, x: list(m.forward_features(x["images"])), {"images": torch.randn(1, 3, 8, 8)}


def _reference_model(name):
    """(model on its sdpa backend, call(model, inputs) -> list of outputs, inputs): test_model_*.py's tiny configs."""
    if name == "vit":
        return (VisionTransformer(backend="sdpa", **VIT_TINY), lambda m, x: [m.forward_features(x["images"])],
                {"images": torch.randn(2, 3, 32, 32)})
    if name in ("swin", "swin_v2"):
        return _swin(name == "swin_v2")
    if name == "clip":
        ids, mask = _text_batch()
        return (CLIP(24, TINY_VISION, TINY_TEXT, backend="sdpa"),
                lambda m, x: list(m(x["ids"], x["images"], x["mask"])),
                {"ids": ids, "images": torch.randn(2, 3, 16, 16), "mask": mask})
    images, pixel_mask = _padded_batch()
    return (DETR(backend="sdpa", **DETR_TINY), lambda m, x: _detr_outputs(m(x["images"], x["pixel_mask"])),
            {"images": images, "pixel_mask": pixel_mask})


# DETR's ReLUs (FFN, backbone) have a kink: a pre-activation within one rounding of 0 passes its gradient in one
# low-precision pipeline and not in another, an O(1) gradient difference that no rounding tolerance covers (seen:
# the decoder's linear1 gradient off by 0.8 on every vitfast backend at one seed, the unfused code exact). The DETR
# tests swap ReLU for GELU; the ops under test are the same.
_GELU_FOR_RELU = types.SimpleNamespace(**{**vars(F), "relu": F.gelu})


@pytest.mark.parametrize("backend,dtype", MODEL_CASES)
@pytest.mark.parametrize("name", ["vit", "swin", "swin_v2", "clip", "detr"])
def test_reference_model(name, backend, dtype, monkeypatch):
    """The vitfast backend against the sdpa backend (the unfused code). Before the rules, every one raised in the
    fused residual LayerNorm (a low-precision branch plus a float32 residual)."""
    if name == "detr":
        monkeypatch.setattr(vitfast.models.detr, "F", _GELU_FOR_RELU)
    model, call, inputs = _reference_model(name)
    _check_model(backend, dtype, model, set_backend(copy.deepcopy(model), "vitfast"), call, inputs)


def _library_model(name):
    """(unpatched model, call(model, inputs) -> list of outputs, inputs): test_patch_model.py's and
    test_integrations.py's tiny configs; Swin maps of 4 x 4 patches, one window (the interpreter is slow; padding
    and shifts under autocast are test_shifted_window_attention's)."""
    images = lambda m, x: [m(x["images"])]  # noqa: E731
    last_hidden = lambda m, x: [m(**x).last_hidden_state]  # noqa: E731
    if name.startswith("timm"):
        timm = import_or_skip("timm")
        if name == "timm_vit":
            return (timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                                      embed_dim=32, depth=1, num_heads=2, num_classes=5), images,
                    {"images": torch.randn(2, 3, 16, 16)})
        return (timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=8, patch_size=2,
                                  embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, num_classes=5), images,
                {"images": torch.randn(1, 3, 8, 8)})
    if name.startswith("torchvision"):
        import_or_skip("torchvision")
        from torchvision.models import VisionTransformer as TorchvisionViT, swin_transformer as tvs
        if name == "torchvision_vit":
            return (TorchvisionViT(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=48,
                                   num_classes=5), images, {"images": torch.randn(2, 3, 16, 16)})
        v2 = dict(block=tvs.SwinTransformerBlockV2, downsample_layer=tvs.PatchMergingV2) if name.endswith("v2") else {}
        return (tvs.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                                    num_classes=5, **v2), images, {"images": torch.randn(1, 3, 8, 8)})
    if name == "open_clip":
        open_clip = import_or_skip("open_clip")
        model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1,
                                                             head_width=16),
                               text_cfg=dict(context_length=6, vocab_size=50, width=32, heads=2, layers=1))
        return (model, lambda m, x: list(m(x["image"], x["text"])[:2]),
                {"image": torch.randn(2, 3, 16, 16), "text": torch.randint(0, 50, (2, 6))})
    transformers = pytest.importorskip("transformers")
    if name == "transformers_vit":
        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=48, image_size=16, patch_size=8)
        model = transformers.ViTModel(config, add_pooling_layer=False)
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16)}
    elif name == "transformers_swin":
        config = transformers.SwinConfig(image_size=8, patch_size=2, embed_dim=16, depths=[2], num_heads=[2],
                                         window_size=4)
        model = transformers.SwinModel(config, add_pooling_layer=False)
        inputs = {"pixel_values": torch.randn(1, 3, 8, 8)}
    elif name == "transformers_clip":
        text = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=16)
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                      patch_size=8)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                               projection_dim=16))
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 5:] = 0
        model.set_attn_implementation("eager")
        return model, _clip_outputs, {"input_ids": torch.randint(1, 98, (2, 9)), "attention_mask": mask,
                                      "pixel_values": torch.randn(2, 3, 16, 16)}
    else:
        config = transformers.DetrConfig(
            use_timm_backbone=False, use_pretrained_backbone=False,
            backbone_config=dict(model_type="resnet", depths=[1] * 4, hidden_sizes=[16] * 4, embedding_size=16,
                                 out_features=["stage4"], hidden_act="gelu"),
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=48, decoder_ffn_dim=48, num_queries=5, dropout=0.0, attention_dropout=0.0,
            activation_function="gelu")  # GELU for ReLU: see _GELU_FOR_RELU
        pixel_mask = torch.ones(2, 64, 64, dtype=torch.long)
        pixel_mask[1, :, 40:] = 0
        model, inputs = transformers.DetrModel(config), {"pixel_values": torch.randn(2, 3, 64, 64),
                                                         "pixel_mask": pixel_mask}
        for name, p in model.named_parameters():
            # trained-looking biases: with HF's zero init, the decoder's first self-attention LayerNorm sees zero
            # rows (zero queries, zero values, zero o_proj bias), whose gradient 1 / sqrt(eps) x dy overflows float16
            # in the unfused code too (NaN weight gradients on an H200 and on the CPU)
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    model.set_attn_implementation("eager")
    return model, last_hidden, inputs


def _clip_outputs(model, inputs):
    out = model(**inputs)
    return [out.text_model_output.last_hidden_state, out.image_embeds]


LIBRARY_MODELS = ["timm_vit", "timm_swin", "torchvision_vit", "torchvision_swin_v1", "torchvision_swin_v2", "open_clip",
                  "transformers_vit", "transformers_swin", "transformers_clip", "transformers_detr"]


@pytest.mark.parametrize("backend,dtype", MODEL_CASES)
@pytest.mark.parametrize("name", LIBRARY_MODELS)
def test_patched_library_model(name, backend, dtype):
    """vitfast.patch_model(model) against the unpatched model. Before the rules, every patched ViT (timm,
    transformers) raised in the C++ patch embedding on the CPU."""
    model, call, inputs = _library_model(name)
    mine = copy.deepcopy(model)
    assert vitfast.patch_model(mine).patched
    _check_model(backend, dtype, model, mine, call, inputs)


# ----------------------------------------------------------------------------------------------- torch.compile

class _ResidualNormBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = vitfast.nn.LayerNorm(48)
        self.fc = torch.nn.Linear(48, 48)

    def forward(self, x):
        y, s = self.norm(self.fc(x), residual=x)
        return self.fc(y) + s


class _AttentionBlock(torch.nn.Module):
    def __init__(self, dim=48, heads=3):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.mask = torch.nn.Parameter(torch.randn(11, 11))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return vitfast.attention(q, k, v, self.mask).transpose(1, 2).reshape(B, N, C)


class _ViTStem(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = vitfast.nn.PatchEmbed(16, 8, 3, 16)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 5, 16))

    def forward(self, x):
        return self.patch_embed(x, pos_embed=self.pos_embed, prefix_tokens=self.cls_token)


def _compile_case(name):
    """(module, input): the modules the op and patch_model tests compile, here under autocast."""
    if name == "layer_norm":
        return _ResidualNormBlock(), torch.randn(3, 7, 48)
    if name == "attention":
        return _AttentionBlock(), torch.randn(2, 11, 48)
    if name == "patch_embed":
        return _ViTStem(), torch.randn(2, 3, 16, 16)
    if name == "patch_merging":
        return vitfast.nn.PatchMerging(8), torch.randn(2, 5, 6, 8)
    if name == "shifted_window_attention":
        return vitfast.nn.ShiftedWindowAttention(16, [3, 3], [1, 1], 2), torch.randn(1, 5, 7, 16)
    model, _, inputs = _library_model(name)
    assert vitfast.patch_model(model).patched
    return model, inputs["images"]


@pytest.mark.parametrize("dtype", REGION_DTYPES[DEVICE], ids=lambda dt: str(dt)[6:])
@pytest.mark.parametrize("name", ["layer_norm", "attention", "patch_embed", "patch_merging", "shifted_window_attention",
                                  "timm_vit", "torchvision_swin_v1"])
def test_compile_fullgraph_under_autocast(name, dtype):
    """torch.compile(fullgraph=True) traces each op's autocast rule (no graph break) and gives eager's dtype, values
    and gradients under the same autocast. aot_eager runs the graph AOTAutograd traced, the rules included, with
    eager kernels; Inductor's own rounding of low-precision intermediates is not what this checks."""
    model, x = _compile_case(name)
    model, x = model.to(DEVICE).eval(), x.to(DEVICE).requires_grad_()
    torch._dynamo.reset()
    results, weights = [], None
    for fn in (torch.compile(model, fullgraph=True, backend="aot_eager"), model):
        with torch.autocast(DEVICE, dtype=dtype):
            out = fn(x)
        weights = torch.randn_like(out, dtype=torch.float64) if weights is None else weights
        _backprop([out], [weights])
        results.append([out] + [t.grad.clone() for t in [x, *model.parameters()] if t.grad is not None])
        x.grad = None
        model.zero_grad()
    compiled, eager = results
    assert len(compiled) == len(eager) == 2 + sum(p.requires_grad for p in model.parameters())
    assert compiled[0].dtype == eager[0].dtype
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=2 * torch.finfo(dtype).eps,
                                   atol=2 * torch.finfo(dtype).eps * max(1.0, e.abs().max().item()))
