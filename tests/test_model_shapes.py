"""Every Triton kernel at the shapes of the models in scope, forward and backward, against a float64 reference:
the focused correctness stage of bench/gpu_run.sh.

On a GPU the real shapes run natively in bf16 and fp32 (ViT-B/16, ViT-H/14, DETR encoder with key padding and
decoder cross-attention, CLIP text, Swin-T stages 1 and 4, window 12, Swin-T patch embedding and merging, LayerNorm
at (128*197, 768)), with the edges of what each op admits (head dim 256, LayerNorm width 8192, fused-norm width
1024, batch * heads past 65535). On a CPU, tiny stand-ins of the same cases run in fp32 under Triton's interpreter,
so that CI proves the suite itself. Each compares the output and every gradient by DESIGN.md's rule
(tests/conftest.py: assert_close_to_ref).
"""
import pytest
import torch

import vitfast
from vitfast.ops.attention import attention_ref
from vitfast.ops.layer_norm import layer_norm_ref
from vitfast.ops.patch_embed import patch_embed_ref
from vitfast.ops.patch_merging import patch_merging_ref
from vitfast.ops.window_attention import window_attention_ref

from conftest import DEVICE, assert_close_to_ref

ON_GPU = DEVICE == "cuda"
DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32]


def _shapes(gpu: dict, cpu: dict) -> list:
    """The real shapes on a GPU, the tiny stand-ins (same names) on a CPU, as pytest params."""
    chosen = gpu if ON_GPU else cpu
    assert chosen.keys() == gpu.keys()
    return [pytest.param(shape, id=name) for name, shape in chosen.items()]


def _compare(fn, ref, inputs: list, what: str, rows=slice(None)) -> None:
    """fn(*inputs) on the triton backend against ref in float64 and ref in the inputs' dtype (plain PyTorch): the
    output and the gradient of every input that requires grad, for one random output gradient. `rows` selects the
    batch rows compared (the reference then runs on those rows only)."""
    def run(f, args, dout=None):
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                  for a in args]
        out = f(*leaves)
        if dout is None:
            return out, leaves
        wrt = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad(out, wrt, dout, allow_unused=True)  # e.g. the padding qkv of a map with no padding
        return [out, *(torch.zeros_like(a) if g is None else g for g, a in zip(grads, wrt))]

    def batch_rows(a):
        batched = isinstance(a, torch.Tensor) and a.dim() > 1 and a.shape[0] == inputs[0].shape[0]
        return a[rows] if batched else a

    with vitfast.use_backend("triton"):
        out, _ = run(fn, inputs)
    dout64 = torch.zeros(out.shape, dtype=torch.float64, device=out.device)
    dout64[rows] = torch.randn_like(dout64[rows])
    with vitfast.use_backend("triton"):
        got = run(fn, inputs, dout64.to(out.dtype))
    small = [batch_rows(a) for a in inputs]
    ref64 = run(ref, [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in small],
                dout64[rows])
    plain = run(ref, small, dout64[rows].to(out.dtype))
    names = ["out"] + [f"grad {i}" for i, a in enumerate(inputs) if isinstance(a, torch.Tensor) and a.requires_grad]
    for name, g, r, p in zip(names, got, ref64, plain):
        g = g[rows] if g.dim() > 1 and g.shape[0] == out.shape[0] and rows != slice(None) else g
        assert_close_to_ref(g, r, p, f"{what} {name}")


def _rand(*shape, dtype, grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=dtype, device=DEVICE) * scale).requires_grad_(grad)


# ------------------------------------------------------------------------------------------------ attention

ATTENTION = _shapes(
    gpu={"vit_b16": (8, 12, 197, 197, 64, False, False), "vit_h14": (4, 16, 257, 257, 80, False, False),
         "detr_encoder_key_padding": (2, 8, 850, 850, 32, True, False),
         "detr_decoder_cross": (2, 8, 100, 850, 32, True, False), "clip_text_causal": (8, 8, 77, 77, 64, False, True),
         "edge_head_dim_256": (2, 2, 197, 197, 256, False, False)},
    cpu={"vit_b16": (1, 1, 33, 33, 64, False, False), "vit_h14": (1, 1, 17, 17, 80, False, False),
         "detr_encoder_key_padding": (1, 2, 40, 40, 32, True, False),
         "detr_decoder_cross": (1, 2, 10, 40, 32, True, False), "clip_text_causal": (1, 2, 20, 20, 64, False, True),
         "edge_head_dim_256": (1, 1, 17, 17, 256, False, False)})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTENTION)
def test_attention(shape, dtype):
    B, H, Nq, Nk, D, padded, causal = shape
    q, k, v = _rand(B, H, Nq, D, dtype=dtype), _rand(B, H, Nk, D, dtype=dtype), _rand(B, H, Nk, D, dtype=dtype)
    mask = None
    if padded:  # DETR: images padded to the batch's largest, the last keys of some are padding
        valid = torch.tensor([Nk, int(0.7 * Nk)] * B, device=DEVICE)[:B]
        mask = (torch.arange(Nk, device=DEVICE)[None, :] < valid[:, None])[:, None, None, :]
    _compare(lambda q, k, v, m: vitfast.attention(q, k, v, m, is_causal=causal),
             lambda q, k, v, m: attention_ref(q, k, v, m, causal), [q, k, v, mask], f"attention {shape} {dtype}")


def test_attention_batch_times_heads_past_65535():
    """66,560 (batch, head) pairs: one grid dimension of 65535 would not hold them; rows 0-1 compared."""
    B, H = (520, 128) if ON_GPU else (3, 2)
    q, k, v = (_rand(B, H, 16, 16, dtype=torch.bfloat16 if ON_GPU else torch.float32) for _ in range(3))
    _compare(vitfast.attention, attention_ref, [q, k, v], "attention B*H edge", rows=slice(0, 2))


# ------------------------------------------------------------------------------------------------ window attention

WINDOWS = _shapes(
    gpu={"swin_t_stage1": (4, 56, 56, 3, 32, 7, 3), "swin_t_stage4": (4, 7, 7, 24, 32, 7, 0),
         "window12_padded": (2, 27, 26, 4, 32, 12, 6), "edge_head_dim_256": (1, 14, 14, 2, 256, 7, 3)},
    cpu={"swin_t_stage1": (1, 14, 14, 1, 32, 7, 3), "swin_t_stage4": (1, 7, 7, 2, 32, 7, 0),
         "window12_padded": (1, 13, 12, 1, 16, 12, 6), "edge_head_dim_256": (1, 7, 7, 1, 256, 7, 0)})


def _window_inputs(B, H, W, heads, D, window, dtype):
    qkv = _rand(B, H, W, 3, heads, D, dtype=dtype)
    table = _rand((2 * window - 1) ** 2, heads, dtype=torch.float32)
    pad = _rand(3 * heads * D, dtype=dtype)
    return qkv, table, pad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WINDOWS)
def test_window_attention(shape, dtype):
    B, H, W, heads, D, window, shift = shape
    qkv, table, pad = _window_inputs(B, H, W, heads, D, window, dtype)
    # the op drops the shift along an axis the window covers (torchvision's rule; Swin's clamp_window is off here);
    # the reference takes it as given
    used_shift = [0 if window >= -(-size // window) * window else shift for size in (H, W)]

    def ref(qkv, table, pad):
        return window_attention_ref(qkv, table.to(qkv.dtype), window, used_shift, pad)

    _compare(lambda qkv, table, pad: vitfast.window_attention(qkv, table, window, shift, qkv_pad=pad,
                                                              clamp_window=False), ref,
             [qkv, table, pad], f"window_attention {shape} {dtype}")


def test_window_attention_batch_times_heads_past_65535():
    """Swin-B stage 4 (7x7, 32 heads) at batch 2048: 65,536 (image, head) pairs; images 0-1 compared."""
    B, heads = (2048, 32) if ON_GPU else (3, 2)
    qkv, table, _ = _window_inputs(B, 7, 7, heads, 32, 7, torch.bfloat16 if ON_GPU else torch.float32)
    table.requires_grad_(False)  # its gradient sums over every image, beyond the compared rows
    _compare(lambda qkv, table: vitfast.window_attention(qkv, table, 7),
             lambda qkv, table: window_attention_ref(qkv, table.to(qkv.dtype), 7, 0), [qkv, table],
             "window_attention B*heads edge", rows=slice(0, 2))


# ------------------------------------------------------------------------------------------------ LayerNorm

NORMS = _shapes(gpu={"vit_b16_b128": (128 * 197, 768), "edge_width_8192": (64, 8192)},
                cpu={"vit_b16_b128": (64, 768), "edge_width_8192": (4, 8192)})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORMS)
def test_layer_norm_with_residual(shape, dtype):
    M, C = shape
    x, r = _rand(M, C, dtype=dtype, scale=2.0), _rand(M, C, dtype=dtype)
    w, b = _rand(C, dtype=dtype), _rand(C, dtype=dtype)
    # y + 2 s weighs both outputs into one: the gradient then flows through the fused residual sum too
    _compare(lambda x, w, b, r: (lambda y, s: y + 2 * s)(*vitfast.layer_norm(x, C, w, b, 1e-6, r)),
             lambda x, w, b, r: (lambda y, s: y + 2 * s)(*layer_norm_ref(x, (C,), w, b, 1e-6, r)),
             [x, w, b, r], f"layer_norm {shape} {dtype}")


# ------------------------------------------------------------------------------------------------ patch embedding

EMBEDS = _shapes(
    gpu={"vit_b16": (8, 224, 16, 768, 1, False), "swin_t_norm": (8, 224, 4, 96, 0, True),
         "edge_norm_width_1024": (2, 224, 16, 1024, 0, True)},
    cpu={"vit_b16": (1, 32, 16, 64, 1, False), "swin_t_norm": (1, 16, 4, 96, 0, True),
         "edge_norm_width_1024": (1, 8, 4, 1024, 0, True)})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", EMBEDS)
def test_patch_embed(shape, dtype):
    B, S, p, E, prefix, norm = shape
    images = _rand(B, 3, S, S, dtype=dtype)
    weight, bias = _rand(E, 3, p, p, dtype=dtype, scale=(3 * p * p) ** -0.5), _rand(E, dtype=dtype)
    extra = [_rand(E, dtype=dtype), _rand(E, dtype=dtype)] if norm else \
        [_rand(1, prefix + (S // p) ** 2, E, dtype=dtype), _rand(1, prefix, E, dtype=dtype)]

    def call(fn):
        def run(images, weight, bias, a, b):
            kwargs = dict(norm_weight=a, norm_bias=b) if norm else dict(pos_embed=a, prefix_tokens=b)
            return fn(images, weight, bias, p, **kwargs, **({"num_prefix_tokens": prefix} if prefix else {}))
        return run

    _compare(call(vitfast.patch_embed), call(patch_embed_ref), [images, weight, bias, *extra],
             f"patch_embed {shape} {dtype}")


# ------------------------------------------------------------------------------------------------ patch merging

MERGES = _shapes(gpu={"swin_t_merge1": (8, 56, 56, 96), "swin_t_merge3": (8, 14, 14, 384), "odd": (2, 15, 15, 96)},
                 cpu={"swin_t_merge1": (1, 8, 8, 32), "swin_t_merge3": (1, 4, 4, 64), "odd": (1, 7, 7, 16)})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MERGES)
def test_patch_merging(shape, dtype):
    B, H, W, C = shape
    x, nw, nb = _rand(B, H, W, C, dtype=dtype), _rand(4 * C, dtype=dtype), _rand(4 * C, dtype=dtype)
    reduction = _rand(2 * C, 4 * C, dtype=dtype, scale=(4 * C) ** -0.5)
    _compare(vitfast.patch_merging, patch_merging_ref, [x, nw, nb, reduction], f"patch_merging {shape} {dtype}")
