"""Attention with decomposed relative positions (SAM, ViTDet): vitfast.rel_pos_attention (each backend) vs SDPA with
the dense (B, H, Nq, Nk) bias built from rel_h and rel_w the way Hugging Face's SamVisionSdpaAttention and timm's
samvit build it (each SDPA backend forced with torch.nn.attention.sdpa_kernel where it takes the bias; the time
includes building the bias), FlexAttention (compiled, a score_mod that reads rel_h and rel_w) and eager PyTorch
(segment_anything's way: a materialized score matrix), forward and forward+backward (gradients of q, k, v, rel_h
and rel_w).

Shapes: SAM's image encoders at 1024 px (64 x 64 tokens; windowed layers on 14 x 14 windows): SAM-B's global and
windowed layers (12 heads, D=64) and SAM-H's global layer (16 heads, D=80) on a GPU; on the CPU small versions, so
that CI's smoke run stays quick, or with VITFAST_BENCH_FULL=1 the issue's CPU shape, SAM-B's global layer at B=1
(the README's CPU figures).

`test_sam_encoder`: Hugging Face's SamVisionModel whole (SAM-B: 1024 px, 12 layers, 4 of them global; inference),
its eager and sdpa attention against the sdpa model patched by vitfast.patch_model (the automatic backend), with
images/s and, on a GPU, peak memory; on the CPU a tiny encoder (one windowed, one global layer) unless
VITFAST_BENCH_FULL=1 (SAM-B at B=1).

TFLOP/s counts the two (Nq, Nk, D) matmuls of the forward and 2.5x that for the backward. vitfast rows also get
`vs_best_sdpa`: the best SDPA backend's mean time over vitfast's (>1 means vitfast is faster), from the SDPA rows
of the same group run earlier in the session; the GPU rows record peak memory.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

import vitfast
from vitfast.ops.rel_pos_attention import rel_pos_attention_ref

from conftest import (DEVICE, ON_GPU, SDPA, env_flag, headline, mean_seconds, record_vs_best_sdpa, run_benchmark,
                      skip_unless_it_runs, vitfast_backends)

# name: (B, H, (kh, kw) = the query and key grid, D).
if ON_GPU:
    SHAPES = {
        "sam_b_global": (8, 12, (64, 64), 64),
        "sam_b_window": (8 * 25, 12, (14, 14), 64),
        "sam_h_global": (4, 16, (64, 64), 80),
    }
elif env_flag("VITFAST_BENCH_FULL"):
    SHAPES = {
        "sam_b_global": (1, 12, (64, 64), 64),
        "sam_b_window": (25, 12, (14, 14), 64),
    }
else:
    SHAPES = {
        "sam_b_global": (1, 2, (24, 24), 64),
        "sam_b_window": (4, 2, (14, 14), 64),
    }
# SamVisionConfig overrides (its defaults are SAM-B's) and the batch.
if ON_GPU:
    SAM_ENCODER = ({}, 4)
elif env_flag("VITFAST_BENCH_FULL"):
    SAM_ENCODER = ({}, 1)
else:
    SAM_ENCODER = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, global_attn_indexes=[1],
                        image_size=128, window_size=3, output_channels=32), 1)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
IMPLS = list(SDPA) + ["flex", "eager"] + vitfast_backends("rel_pos_attention")
HEADLINE = {"sam_b_global"}  # the shapes bench/gpu_run.sh runs (pytest -m headline)


def _inputs(shape, grad):
    B, H, (kh, kw), D = shape
    N = kh * kw

    def make():
        def t(*s):
            return torch.randn(*s, device=DEVICE, dtype=DTYPE, requires_grad=grad)
        return t(B, H, N, D), t(B, H, N, D), t(B, H, N, D), t(B, H, N, kh), t(B, H, N, kw), \
            torch.randn(B, H, N, D, device=DEVICE, dtype=DTYPE)
    return make


def _dense_bias(rel_h, rel_w):
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)


def _flex(kw):
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention)

    def fn(q, k, v, rel_h, rel_w):
        def score_mod(score, b, h, i, j):
            return score + rel_h[b, h, i, j // kw] + rel_w[b, h, i, j % kw]
        return compiled(q, k, v, score_mod=score_mod)
    return fn


def _forward(impl, kw):
    """fn(q, k, v, rel_h, rel_w) for `impl`, or a reason to skip it here."""
    if impl in SDPA:
        if not ON_GPU and impl in ("sdpa-efficient", "sdpa-cudnn"):
            return None, f"{impl} has no CPU kernel"

        def fn(q, k, v, rel_h, rel_w):
            with sdpa_kernel(SDPA[impl]):
                return F.scaled_dot_product_attention(q, k, v, _dense_bias(rel_h, rel_w))
        return fn, None
    if impl == "flex":
        if not ON_GPU:
            return None, ("FlexAttention compiles for about 90 s on this 2-core CPU (forward only: it has no CPU "
                          "backward), beyond the CI smoke budget")
        return _flex(kw), None
    if impl == "eager":
        return rel_pos_attention_ref, None
    return vitfast.rel_pos_attention, None


def _bench(benchmark, impl, name, backward):
    shape = SHAPES[name]
    B, H, (kh, kw), D = shape
    fwd, reason = _forward(impl, kw)
    if fwd is None:
        pytest.skip(reason)
    fn = _run(fwd, backward)
    make = _inputs(shape, backward)
    if impl in SDPA or impl == "flex":  # an SDPA backend that does not take a float bias (or its gradient), this
        # head dim or dtype; a FlexAttention that cannot differentiate through the captured rel_h and rel_w
        skip_unless_it_runs(impl, fn, make(), name)
    mode = "fwd+bwd" if backward else "fwd"
    N = kh * kw
    benchmark.group = f"rel_pos_attention {mode} {name} (B={B}, H={H}, N={kh}x{kw}, D={D}) {DTYPE}"
    run_benchmark(benchmark, fn, make, impl=impl, flops=int(4 * B * H * N * N * D * (3.5 if backward else 1.0)),
                  reference=_run(rel_pos_attention_ref, backward))
    record_vs_best_sdpa(benchmark, impl)


def _run(fwd, backward):
    """fn(q, k, v, rel_h, rel_w, dout): fwd's output, or with `backward` the gradients of every input for dout."""
    if backward:
        return lambda q, k, v, rel_h, rel_w, dout: torch.autograd.grad(fwd(q, k, v, rel_h, rel_w),
                                                                      (q, k, v, rel_h, rel_w), dout)
    return lambda q, k, v, rel_h, rel_w, dout: fwd(q, k, v, rel_h, rel_w)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", headline(SHAPES, HEADLINE))
def test_forward(benchmark, impl, name):
    _bench(benchmark, impl, name, backward=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", headline(SHAPES, HEADLINE))
def test_forward_backward(benchmark, impl, name):
    _bench(benchmark, impl, name, backward=True)


@pytest.mark.parametrize("impl", ["eager", "sdpa", "vitfast"])
def test_sam_encoder(benchmark, impl):
    transformers = pytest.importorskip("transformers")
    overrides, batch = SAM_ENCODER
    # SAM's default initializer_range (1e-10) drives activations toward denormals, which CPUs run slowly
    config = transformers.SamVisionConfig(initializer_range=0.02, **overrides)
    torch.manual_seed(0)
    model = transformers.SamVisionModel._from_config(config, attn_implementation="sdpa" if impl == "vitfast" else impl)
    model = model.to(DEVICE, DTYPE).eval()
    eager = transformers.SamVisionModel._from_config(copy.deepcopy(config), attn_implementation="eager")
    eager = eager.to(DEVICE, DTYPE).eval()
    eager.load_state_dict(model.state_dict())
    double = copy.deepcopy(eager).double()
    if impl == "vitfast":
        vitfast.patch_model(model)
    size = config.image_size

    def runner(m):
        def run(x):
            with torch.no_grad():
                return m(x).last_hidden_state
        return run

    benchmark.group = (f"SAM image encoder inference ({config.hidden_size} wide, {config.num_hidden_layers} layers, "
                       f"{size} px) B={batch} {DTYPE}")
    run_benchmark(benchmark, runner(model), lambda: (torch.randn(batch, 3, size, size, device=DEVICE, dtype=DTYPE),),
                  impl=impl, reference=runner(double), baseline=runner(eager))
    benchmark.extra_info["images/s"] = batch / mean_seconds(benchmark)
