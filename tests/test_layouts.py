"""One layout matrix for every op on every available backend.

Each case runs with all of its tensors (inputs, parameters, masks, and the gradient fed to backward) in one
layout: contiguous; transposed (the last two dims swapped in memory); strided (stride(-1) == 2); expanded
(stride 0 along one dim: the leaf has size 1 there, and autograd reduces the gradient onto it); a storage
offset; channels_last (images). The output and the gradient of every leaf that requires grad are compared with
the float64 reference under the rule of DESIGN.md, and every gradient must have its leaf's shape. Every
layout of a case sees the same values, so a layout that fails where "contiguous" passes points at the layout.

The dims the expanded layout broadcasts are chosen so that the problem stays well conditioned: a LayerNorm
input or a softmax bias made constant along the normalized dim would have an exactly-zero true gradient that
the float32 reference happens to hit and the kernels miss by a rounding.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import zlib

import pytest
import torch

import vitfast
from vitfast.ops.attention import attention_ref
from vitfast.ops.layer_norm import layer_norm_ref
from vitfast.ops.patch_embed import patch_embed_ref
from vitfast.ops.patch_merging import patch_merging_ref
from vitfast.ops.rel_pos_attention import rel_pos_attention_ref
from vitfast.ops.window_attention import shifted_window_attention_ref, window_attention_ref

from conftest import assert_close_to_ref, backend_cases

LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "offset", "channels_last")


@dataclass(frozen=True)
class Input:
    shape: Tuple[int, ...]
    grad: bool = True
    expand_dim: Optional[int] = 0  # the dim the "expanded" layout reads with stride 0; None: left whole
    kind: str = "float"  # "float", "bool" (a mask), "image" (NCHW: also takes channels_last)
    scale: float = 1.0


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # the backend registry's op name
    inputs: Dict[str, Input]
    fn: Callable  # vitfast: fn(**tensors) -> output or tuple of outputs
    ref: Callable  # plain PyTorch, same signature


def _sample(inp: Input, device) -> torch.Tensor:
    if inp.kind == "bool":
        m = torch.rand(inp.shape, device=device) > 0.3
        m[..., 0] = True  # every row sees a key
        return m
    return torch.randn(inp.shape, device=device) * inp.scale


def _in_layout(t: torch.Tensor, layout: str, inp: Input) -> torch.Tensor:
    """The values of t (full shape, contiguous) in `layout`; "expanded" gives the size-1 leaf along inp.expand_dim.
    Every result is a fresh tensor (a view of a fresh buffer), so it can be made a leaf."""
    if layout == "expanded":
        return t.narrow(inp.expand_dim, 0, 1).clone() if inp.expand_dim is not None else t.clone()
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout in ("transposed", "strided"):
        buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        return buf[..., ::2].copy_(t)
    if layout == "offset":
        buf = torch.empty(t.numel() + 3, dtype=t.dtype, device=t.device)
        return buf[3:].view(t.shape).copy_(t)
    if layout == "channels_last" and inp.kind == "image":
        return t.contiguous(memory_format=torch.channels_last)
    return t.clone()


def _leaves(values, case, layout, dtype):
    """Leaves in `layout` (requires_grad as the case says) and the op inputs built from them."""
    leaves, built = {}, {}
    for name, inp in case.inputs.items():
        t = values[name]
        leaf = _in_layout(t if t.dtype == torch.bool else t.to(dtype), layout, inp)
        if inp.grad:
            leaf.requires_grad_()
        leaves[name] = leaf
        built[name] = leaf.expand(inp.shape)
    return leaves, built


def _run(fn, values, case, layout, dtype, douts):
    leaves, built = _leaves(values, case, layout, dtype)
    out = fn(**built)
    outs = out if isinstance(out, tuple) else (out,)
    names = [n for n, inp in case.inputs.items() if inp.grad]
    grads = torch.autograd.grad(outs, [leaves[n] for n in names], [d.to(dtype) for d in douts])
    for n, g in zip(names, grads):
        assert g.shape == leaves[n].shape, f"d{n}: gradient shape {tuple(g.shape)} != leaf {tuple(leaves[n].shape)}"
    return list(outs), dict(zip(names, grads))


# ----------------------------------------------------------------------------------------------- the cases

def _layer_norm(x, weight, bias, residual=None):
    return vitfast.layer_norm(x, 24, weight, bias, eps=1e-5, residual=residual)


def _layer_norm_ref(x, weight, bias, residual=None):
    return layer_norm_ref(x, (24,), weight, bias, 1e-5, residual)


def _window_ref(qkv, table, qkv_pad):
    B, H, W = qkv.shape[:3]
    return window_attention_ref(qkv, table, 3, 1, qkv_pad).reshape(B, H, W, -1)


def _swin(fn):
    def run(x, qkv_w, proj_w, bias, qkv_b, proj_b):
        return fn(x, qkv_w, proj_w, bias, [3, 3], 2, [1, 1], qkv_bias=qkv_b, proj_bias=proj_b, training=False)
    return run


def _patch_embed(fn):
    def run(images, weight, bias=None, pos_embed=None, prefix_tokens=None, norm_weight=None, norm_bias=None):
        return fn(images, weight, bias, 4, pos_embed=pos_embed, prefix_tokens=prefix_tokens,
                  norm_weight=norm_weight, norm_bias=norm_bias, eps=1e-6)
    return run


def _flash_ref(q, k, v):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return attention_ref(q, k, v, None, True, None, causal_offset=k.shape[2] - q.shape[2]).transpose(1, 2)


B, H, NQ, NK, D = 2, 2, 13, 11, 16
CASES = [
    Case("layer_norm", "layer_norm",  # expanded: rows read with row stride 0, the gradient fed back too
         dict(x=Input((15, 24)), weight=Input((24,)), bias=Input((24,))),
         _layer_norm, _layer_norm_ref),
    Case("layer_norm_residual", "layer_norm",
         dict(x=Input((3, 5, 24)), weight=Input((24,)), bias=Input((24,)), residual=Input((3, 5, 24), expand_dim=1)),
         _layer_norm, _layer_norm_ref),
    Case("attention_float_mask", "attention",
         dict(q=Input((B, H, NQ, D)), k=Input((B, H, NK, D), expand_dim=1), v=Input((B, H, NK, D), expand_dim=2),
              attn_mask=Input((B, H, NQ, NK), expand_dim=2)),
         lambda q, k, v, attn_mask: vitfast.attention(q, k, v, attn_mask),
         lambda q, k, v, attn_mask: attention_ref(q, k, v, attn_mask)),
    Case("attention_bool_mask_causal", "attention",
         dict(q=Input((B, H, NQ, D), expand_dim=2), k=Input((B, H, NK, D)), v=Input((B, H, NK, D)),
              attn_mask=Input((B, 1, NQ, NK), grad=False, kind="bool", expand_dim=2)),
         lambda q, k, v, attn_mask: vitfast.attention(q, k, v, attn_mask, is_causal=True, scale=0.3),
         lambda q, k, v, attn_mask: attention_ref(q, k, v, attn_mask, True, 0.3)),
    Case("flash_attn_func", "attention",
         dict(q=Input((B, NQ, H, D)), k=Input((B, NK, H, D), expand_dim=1), v=Input((B, NK, H, D), expand_dim=2)),
         lambda q, k, v: vitfast.flash_attn_func(q, k, v, causal=True), _flash_ref),
    Case("window_attention", "window_attention",
         dict(qkv=Input((1, 5, 7, 3, 2, 8), expand_dim=2), table=Input((25, 2), expand_dim=1), qkv_pad=Input((48,))),
         lambda qkv, table, qkv_pad: vitfast.window_attention(qkv, table, 3, 1, qkv_pad=qkv_pad), _window_ref),
    # torchvision's gathered (1, heads, N, N) bias. The projections only meet F.linear; a constant qkv bias would
    # sum the gradient of the k part, zero by shift invariance, into an ill-conditioned total (the window case
    # expands its qkv_pad).
    Case("shifted_window_attention", "window_attention",
         dict(x=Input((1, 5, 7, 16), expand_dim=1), qkv_w=Input((48, 16), scale=0.25, expand_dim=None),
              proj_w=Input((16, 16), scale=0.25, expand_dim=None), bias=Input((1, 2, 9, 9), expand_dim=2),
              qkv_b=Input((48,), expand_dim=None), proj_b=Input((16,))),
         _swin(vitfast.shifted_window_attention), _swin(shifted_window_attention_ref)),
    Case("patch_embed", "patch_embed",
         dict(images=Input((B, 3, 16, 16), kind="image"), weight=Input((24, 3, 4, 4), scale=0.15, expand_dim=1),
              bias=Input((24,)), pos_embed=Input((1, 17, 24), expand_dim=1), prefix_tokens=Input((1, 1, 24))),
         _patch_embed(vitfast.patch_embed), _patch_embed(patch_embed_ref)),
    Case("patch_embed_norm", "patch_embed",
         dict(images=Input((B, 3, 8, 12), kind="image"), weight=Input((24, 3, 4, 4), scale=0.15, expand_dim=1),
              pos_embed=Input((6, 24)), norm_weight=Input((24,)), norm_bias=Input((24,))),
         _patch_embed(vitfast.patch_embed), _patch_embed(patch_embed_ref)),
    Case("rel_pos_attention", "rel_pos_attention",  # a 3 x 4 key grid; the terms broadcast over heads when expanded
         dict(q=Input((B, H, NQ, D), expand_dim=2), k=Input((B, H, 12, D), expand_dim=1), v=Input((B, H, 12, D)),
              rel_h=Input((B, H, NQ, 3), expand_dim=1), rel_w=Input((B, H, NQ, 4), expand_dim=0)),
         vitfast.rel_pos_attention, rel_pos_attention_ref),
    Case("patch_merging", "patch_merging",
         dict(x=Input((B, 7, 6, 8), expand_dim=1), norm_weight=Input((32,)), norm_bias=Input((32,)),
              reduction_weight=Input((16, 32), scale=0.2)),
         lambda x, norm_weight, norm_bias, reduction_weight: vitfast.patch_merging(
             x, norm_weight, norm_bias, reduction_weight),
         lambda x, norm_weight, norm_bias, reduction_weight: patch_merging_ref(
             x, norm_weight, norm_bias, reduction_weight)),
]


def _params():
    for case in CASES:
        has_image = any(inp.kind == "image" for inp in case.inputs.values())
        for bk in backend_cases(case.op):
            for layout in LAYOUTS:
                if layout == "channels_last" and not has_image:
                    continue
                yield pytest.param(case, *bk.values, layout, id=f"{case.name}-{bk.id}-{layout}")


@pytest.mark.parametrize("case,backend,device,layout", list(_params()))
def test_layouts_match_fp64(case, backend, device, layout):
    torch.manual_seed(zlib.crc32(case.name.encode()))
    values = {name: _sample(inp, device) for name, inp in case.inputs.items()}
    with torch.no_grad():
        shapes = [o.shape for o in (lambda o: o if isinstance(o, tuple) else (o,))(case.ref(**values))]
    # The gradient fed to backward is in the layout too; "expanded" broadcasts it along dim 0.
    douts = []
    for shape in shapes:
        d = torch.randn(shape, device=device)
        douts.append(_in_layout(d, layout, Input(shape)).expand(shape) if layout == "expanded"
                     else _in_layout(d, layout, Input(shape)))
    with vitfast.use_backend(backend):
        outs, grads = _run(case.fn, values, case, layout, torch.float32, douts)
    ref_outs, ref_grads = _run(case.ref, values, case, layout, torch.float64, douts)
    plain_outs, plain_grads = _run(case.ref, values, case, layout, torch.float32, douts)
    for i, (o, r, p) in enumerate(zip(outs, ref_outs, plain_outs)):
        assert_close_to_ref(o, r, p, f"{case.name} {backend} {layout} output {i}")
    for name in grads:
        assert_close_to_ref(grads[name], ref_grads[name], plain_grads[name], f"{case.name} {backend} {layout} d{name}")


@pytest.mark.parametrize("case,backend,device", [pytest.param(c, *bk.values, id=f"{c.name}-{bk.id}")
                                                 for c in CASES for bk in backend_cases(c.op)])
def test_inputs_made_under_inference_mode(case, backend, device):
    """Inputs made under torch.inference_mode (a frozen backbone's features, a mask built there) beside a parameter
    that needs grad: the ops saved them for backward, which autograd refuses ("Inference tensors cannot be saved for
    backward"; torchvision's PatchMerging, whose slicing makes new tensors, trains). Same output and gradient as with
    normal tensors."""
    torch.manual_seed(0)
    values = {name: _sample(inp, device) for name, inp in case.inputs.items()}
    trained = [n for n, inp in case.inputs.items() if inp.grad][-1]
    with torch.inference_mode():
        frozen = {n: v.clone() for n, v in values.items()}
    results = []
    for inputs in (values, frozen):
        leaf = values[trained].clone().requires_grad_()
        with vitfast.use_backend(backend):
            out = case.fn(**{**inputs, trained: leaf})
            out = out if isinstance(out, tuple) else (out,)
            results.append((out, torch.autograd.grad(out, leaf, [torch.ones_like(o) for o in out])))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


@pytest.mark.parametrize("case,backend,device", [pytest.param(c, *bk.values, id=f"{c.name}-{bk.id}")
                                                 for c in CASES for bk in backend_cases(c.op)])
def test_outputs_modified_in_place(case, backend, device):
    """`out.mul_(2)` (as `out += residual`, in-place dropout) on every output, under autograd: the gradients are twice
    the plain ones, or, where the op saved that output for its backward (attention), backward raises PyTorch's
    "modified by an inplace operation", as SDPA's does. Outputs were views of buffers made inside the ops, which
    autograd refuses to modify in place ("a function that returns multiple views"), on some backends only."""
    torch.manual_seed(0)
    values = {name: _sample(inp, device) for name, inp in case.inputs.items()}
    grads = []
    for in_place in (False, True):
        leaves = {n: v.clone().requires_grad_(case.inputs[n].grad) for n, v in values.items()}
        with vitfast.use_backend(backend):
            out = case.fn(**leaves)
        outs = out if isinstance(out, tuple) else (out,)
        if in_place:
            outs = [o.mul_(2) for o in outs]
        trained = [leaves[n] for n, inp in case.inputs.items() if inp.grad]
        try:
            grads.append(torch.autograd.grad(outs, trained, [torch.ones_like(o) for o in outs]))
        except RuntimeError as e:
            assert in_place and "modified by an inplace operation" in str(e), e
            return
    for plain, doubled in zip(*grads):
        torch.testing.assert_close(doubled, 2 * plain)


@pytest.mark.parametrize("backend,device", backend_cases("layer_norm"))
def test_ops_called_directly_take_any_layout(backend, device):
    """torch.ops.vitfast.* called directly with layouts the public functions never pass (a transposed LayerNorm
    input, a transposed pos_embed, qkv whose head dim has stride 2, non-contiguous statistics): the triton launchers
    read them as if contiguous (off by 2.4-3.7) where the cpp backend copied them."""
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    ops = torch.ops.vitfast
    x = rand(16, 8).t()
    imgs, w, pos = rand(1, 3, 8, 8), rand(16, 3, 4, 4), rand(16, 4).t()
    qkv, table = rand(1, 4, 4, 3, 2, 16)[..., ::2], rand(9, 2)
    with vitfast.use_backend("torch"):
        want = [ops.layer_norm(x.contiguous(), None, None, None, 1e-5)[0],
                ops.patch_embed(imgs, w, None, pos.contiguous(), 0, None, None, None, False, 0, 1e-6, False)[0],
                ops.window_attention(qkv.contiguous(), table, None, None, [2, 2], [1, 1], 0.35, 0.0, None)[0]]
    with vitfast.use_backend(backend):
        got = [ops.layer_norm(x, None, None, None, 1e-5)[0],
               ops.patch_embed(imgs, w, None, pos, 0, None, None, None, False, 0, 1e-6, False)[0]]
        if backend != "cpp":  # (the cpp window kernels refuse a strided head dim with their own error)
            out, lse = ops.window_attention(qkv, table, None, None, [2, 2], [1, 1], 0.35, 0.0, None)
            got.append(out)
            dout = rand(*out.shape)
            want_grads = ops.window_attention_backward(dout, qkv.contiguous(), table, None, None, out,
                                                       lse.contiguous(), [2, 2], [1, 1], 0.35, 0.0, None)
            lse_strided = lse.transpose(0, 1).contiguous().transpose(0, 1)
            grads = ops.window_attention_backward(dout, qkv, table, None, None, out, lse_strided, [2, 2], [1, 1],
                                                  0.35, 0.0, None)
            for a, b in zip(grads[:2], want_grads[:2]):
                torch.testing.assert_close(a, b)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
