"""Patch embedding and Swin patch merging: vitfast (each backend) vs the eager sequence and torch.compile of it,
forward and forward+backward.

Shapes on a GPU: ViT-B/16 at 224 px (B=256, class token + pos_embed), ViT-L/14 at 336 px (B=64), Swin-T's
patch embed (patch 4, E=96, LayerNorm, B=128) and its three patch mergings (B=128). On a CPU one tiny shape
per kind, so the suite proves it runs. TFLOP/s counts the GEMM: 2 * tokens * (C*ph*pw or 4C) * E.
"""
import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast.ops.patch_merging import patch_merging_ref

from conftest import DEVICE, ON_GPU, headline, run_benchmark, vitfast_backends

DTYPE = torch.bfloat16 if ON_GPU else torch.float32

# name: (B, C, H, W, patch, E, prefix tokens, norm)
EMBED = {
    "vit_b16_224": (256, 3, 224, 224, 16, 768, 1, False),
    "vit_l14_336": (64, 3, 336, 336, 14, 1024, 1, False),
    "swin_t_embed": (128, 3, 224, 224, 4, 96, 0, True),
} if ON_GPU else {
    "vit_tiny": (4, 3, 64, 64, 16, 64, 1, False),
    "swin_tiny_embed": (4, 3, 32, 32, 4, 32, 0, True),
}
# name: (B, H, W, C); out dim 2C
MERGE = {
    "swin_t_merge1": (128, 56, 56, 96),
    "swin_t_merge2": (128, 28, 28, 192),
    "swin_t_merge3": (128, 14, 14, 384),
} if ON_GPU else {"swin_tiny_merge": (4, 16, 16, 32)}


def _embed_eager(x, w, b, cls, pos, nw, nb):
    p = w.shape[-1]
    y = F.conv2d(x, w, b, stride=p)
    if nw is not None:  # Swin / timm output_fmt="NHWC" with norm
        return F.layer_norm(y.permute(0, 2, 3, 1), (w.shape[0],), nw, nb)
    y = y.flatten(2).transpose(1, 2)
    return torch.cat([cls.expand(y.shape[0], -1, -1), y], 1) + pos


def _embed_vitfast(x, w, b, cls, pos, nw, nb):
    out = vitfast.patch_embed(x, w, b, w.shape[-1], pos_embed=pos, prefix_tokens=cls, norm_weight=nw, norm_bias=nb)
    if nw is not None:
        B, _, H, W = x.shape
        return out.view(B, H // w.shape[-2], W // w.shape[-1], -1)
    return out


EMBED_HEADLINE = {"vit_b16_224", "vit_tiny"}  # the shapes bench/gpu_run.sh runs (pytest -m headline)
_embed_compiled = torch.compile(_embed_eager)
_merge_compiled = torch.compile(patch_merging_ref)
IMPLS = ["torch", "torch.compile"]


def _embed_fn(impl):
    return {"torch": _embed_eager, "torch.compile": _embed_compiled}.get(impl, _embed_vitfast)


def _merge_fn(impl):
    return {"torch": patch_merging_ref, "torch.compile": _merge_compiled}.get(impl, vitfast.patch_merging)


def _param_maker(grad):
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, dtype=DTYPE) * scale).requires_grad_(grad)
    return t


def _embed_inputs(cfg, grad):
    B, C, H, W, p, E, P, norm = cfg
    L = (H // p) * (W // p)

    def make():
        t = _param_maker(grad)
        x = torch.randn(B, C, H, W, device=DEVICE, dtype=DTYPE)  # images never need grad in training
        w, b = t(E, C, p, p, scale=(C * p * p) ** -0.5), t(E)
        cls = t(1, P, E) if P else None
        pos = t(1, P + L, E) if not norm else None
        nw, nb = (t(E), t(E)) if norm else (None, None)
        return x, w, b, cls, pos, nw, nb
    return make


def _merge_inputs(cfg, grad):
    B, H, W, C = cfg

    def make():
        t = _param_maker(grad)
        return t(B, H, W, C), t(4 * C), t(4 * C), t(2 * C, 4 * C, scale=(4 * C) ** -0.5)
    return make


def _embed_flops(cfg):
    B, C, H, W, p, E, _, _ = cfg
    return 2 * B * (H // p) * (W // p) * C * p * p * E


def _merge_flops(cfg):
    B, H, W, C = cfg
    return 2 * B * ((H + 1) // 2) * ((W + 1) // 2) * 4 * C * 2 * C


def _fwd_bwd(fn):
    def step(*inputs):
        out = fn(*inputs)
        leaves = [t for t in inputs if t is not None and t.requires_grad]
        return torch.autograd.grad(out, leaves, torch.ones_like(out))
    return step


@pytest.mark.parametrize("impl", vitfast_backends("patch_embed") + IMPLS)
@pytest.mark.parametrize("name", headline(EMBED, EMBED_HEADLINE))
def test_patch_embed_forward(benchmark, impl, name):
    cfg = EMBED[name]
    benchmark.group = f"patch_embed fwd {name} {DTYPE}"
    with torch.no_grad():
        run_benchmark(benchmark, _embed_fn(impl), _embed_inputs(cfg, False), impl=impl, flops=_embed_flops(cfg),
                      reference=_embed_eager)


@pytest.mark.parametrize("impl", vitfast_backends("patch_embed") + IMPLS)
@pytest.mark.parametrize("name", headline(EMBED, EMBED_HEADLINE))
def test_patch_embed_forward_backward(benchmark, impl, name):
    cfg = EMBED[name]
    benchmark.group = f"patch_embed fwd+bwd {name} {DTYPE}"
    run_benchmark(benchmark, _fwd_bwd(_embed_fn(impl)), _embed_inputs(cfg, True), impl=impl,
                  flops=2 * _embed_flops(cfg), reference=_fwd_bwd(_embed_eager))  # backward: one GEMM, dweight


@pytest.mark.parametrize("impl", vitfast_backends("patch_merging") + IMPLS)
@pytest.mark.parametrize("name", list(MERGE))
def test_patch_merging_forward(benchmark, impl, name):
    cfg = MERGE[name]
    benchmark.group = f"patch_merging fwd {name} {DTYPE}"
    with torch.no_grad():
        run_benchmark(benchmark, _merge_fn(impl), _merge_inputs(cfg, False), impl=impl, flops=_merge_flops(cfg),
                      reference=patch_merging_ref)


@pytest.mark.parametrize("impl", vitfast_backends("patch_merging") + IMPLS)
@pytest.mark.parametrize("name", list(MERGE))
def test_patch_merging_forward_backward(benchmark, impl, name):
    cfg = MERGE[name]
    benchmark.group = f"patch_merging fwd+bwd {name} {DTYPE}"
    run_benchmark(benchmark, _fwd_bwd(_merge_fn(impl)), _merge_inputs(cfg, True), impl=impl,
                  flops=3 * _merge_flops(cfg), reference=_fwd_bwd(patch_merging_ref))
