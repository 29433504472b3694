"""Attention: vitfast (each backend) vs SDPA's backends (flash, efficient, cudnn, math, each forced with
torch.nn.attention.sdpa_kernel where it applies), FlexAttention (compiled) and eager PyTorch, forward and
forward+backward, at the attention shapes of ViT-B/16, ViT-L/14 at 336px, ViT-H/14, the DETR encoder (with a
key padding mask) and decoder cross-attention, and the CLIP text encoder (causal).

TFLOP/s counts the two (Nq, Nk, D) matmuls of the forward (halved when causal) and 2.5x that for the
backward. vitfast rows also get `vs_best_sdpa`: the best SDPA backend's mean time over vitfast's (>1 means
vitfast is faster), from the SDPA rows of the same group run earlier in the session.
"""

import pytest
import torch

import vitfast
from vitfast.ops.attention import attention_ref

from conftest import (DEVICE, ON_GPU, SDPA, headline, record_vs_best_sdpa, run_benchmark, sdpa, skip_unless_it_runs,
                      vitfast_backends)

# name: (B, H, Nq, Nk, D, key padding mask, causal); on the CPU, small versions so that CI runs them quickly.
if ON_GPU:
    SHAPES = {
        "vit_b16": (128, 12, 197, 197, 64, False, False),
        "vit_l14_336": (32, 16, 577, 577, 64, False, False),
        "vit_h14": (64, 16, 257, 257, 80, False, False),
        "detr_encoder": (8, 8, 850, 850, 32, True, False),
        "detr_decoder_cross": (8, 8, 100, 850, 32, True, False),
        "clip_text": (128, 8, 77, 77, 64, False, True),
    }
else:
    SHAPES = {
        "vit_b16": (1, 2, 197, 197, 64, False, False),
        "vit_h14": (1, 2, 65, 65, 80, False, False),
        "detr_encoder": (1, 2, 120, 120, 32, True, False),
        "detr_decoder_cross": (1, 2, 25, 120, 32, True, False),
        "clip_text": (2, 2, 77, 77, 64, False, True),
    }
HEADLINE = {"vit_b16", "detr_encoder"}  # the shapes bench/gpu_run.sh runs (pytest -m headline)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
IMPLS = list(SDPA) + ["flex", "eager"] + vitfast_backends("attention")
# The Triton backward with torch.use_deterministic_algorithms(True): dQ from its own kernel (which recomputes the
# scores) instead of atomic adds from the dK/dV kernel; timed next to the default to tell which is faster.
DETERMINISTIC = [f"{impl}-deterministic" for impl in vitfast_backends("attention") if impl == "vitfast-triton"]


def _inputs(shape, grad):
    B, H, Nq, Nk, D, padded, _ = shape

    def make():
        q = torch.randn(B, H, Nq, D, device=DEVICE, dtype=DTYPE, requires_grad=grad)
        k = torch.randn(B, H, Nk, D, device=DEVICE, dtype=DTYPE, requires_grad=grad)
        v = torch.randn(B, H, Nk, D, device=DEVICE, dtype=DTYPE, requires_grad=grad)
        mask = None
        if padded:  # DETR: images padded to the batch's largest, about a fifth of the keys are padding
            valid = torch.randint(int(0.7 * Nk), Nk + 1, (B,), device=DEVICE)
            mask = (torch.arange(Nk, device=DEVICE)[None, :] < valid[:, None])[:, None, None, :]
        return q, k, v, mask, torch.randn(B, H, Nq, D, device=DEVICE, dtype=DTYPE)
    return make


def _flex(causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention)
    block_masks = {}  # built once per input set, outside the timing, as a model would per batch

    def block_mask_for(q, k, mask):
        key = (q.shape, k.shape, mask.data_ptr() if mask is not None else None)
        if key not in block_masks:
            B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
            if causal:
                block_masks[key] = create_block_mask(lambda b, h, i, j: j <= i, None, None, Nq, Nk, device=q.device)
            elif mask is not None:
                pad = mask[:, 0, 0, :]
                block_masks[key] = create_block_mask(lambda b, h, i, j: pad[b, j], B, None, Nq, Nk, device=q.device)
            else:
                block_masks[key] = None
        return block_masks[key]

    def fn(q, k, v, mask):
        return compiled(q, k, v, block_mask=block_mask_for(q, k, mask))
    return fn


def _forward(impl, causal):
    """fn(q, k, v, mask) for `impl`, or a reason to skip it here."""
    if impl in SDPA:
        fn, reason = sdpa(impl)
        return (lambda q, k, v, mask: fn(q, k, v, mask, causal)) if fn else None, reason
    if impl == "flex":
        if not ON_GPU:
            return None, "FlexAttention compiles for tens of seconds on the CPU, beyond the CI smoke budget"
        return _flex(causal), None
    if impl == "eager":
        return lambda q, k, v, mask: attention_ref(q, k, v, mask, causal), None
    return lambda q, k, v, mask: vitfast.attention(q, k, v, mask, is_causal=causal), None


def _bench(benchmark, impl, name, backward):
    shape = SHAPES[name]
    B, H, Nq, Nk, D, padded, causal = shape
    fwd, reason = _forward(impl, causal)
    if fwd is None:
        pytest.skip(reason)
    if backward and impl.endswith("-deterministic"):
        def fn(q, k, v, mask, dout):
            # (deterministic mode also fills every torch.empty with NaN, a cost the comparison is not about)
            before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
            torch.use_deterministic_algorithms(True)
            torch.utils.deterministic.fill_uninitialized_memory = False
            try:
                return torch.autograd.grad(fwd(q, k, v, mask), (q, k, v), dout)
            finally:
                torch.use_deterministic_algorithms(before[0])
                torch.utils.deterministic.fill_uninitialized_memory = before[1]
    else:
        fn = _run(fwd, backward)
    make = _inputs(shape, backward)
    if impl in SDPA:
        skip_unless_it_runs(impl, fn, make(), name)
    mode = "fwd+bwd" if backward else "fwd"
    benchmark.group = f"attention {mode} {name} (B={B}, H={H}, Nq={Nq}, Nk={Nk}, D={D}) {DTYPE}"
    flops = 4 * B * H * Nq * Nk * D * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)
    run_benchmark(benchmark, fn, make, impl=impl, flops=int(flops),
                  reference=_run(_forward("eager", causal)[0], backward))
    record_vs_best_sdpa(benchmark, impl)


def _run(fwd, backward):
    """fn(q, k, v, mask, dout): fwd's output, or with `backward` the gradients of q, k and v for dout."""
    if backward:
        return lambda q, k, v, mask, dout: torch.autograd.grad(fwd(q, k, v, mask), (q, k, v), dout)
    return lambda q, k, v, mask, dout: fwd(q, k, v, mask)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", headline(SHAPES, HEADLINE))
def test_forward(benchmark, impl, name):
    _bench(benchmark, impl, name, backward=False)


@pytest.mark.parametrize("impl", IMPLS + DETERMINISTIC)
@pytest.mark.parametrize("name", headline(SHAPES, HEADLINE))
def test_forward_backward(benchmark, impl, name):
    _bench(benchmark, impl, name, backward=True)
