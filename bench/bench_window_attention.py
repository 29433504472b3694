"""Swin (shifted) window attention core: vitfast (each backend) vs the eager textbook path, SDPA with the
relative position bias and shift mask folded into one float attn_mask (forced onto each of its backends that takes
a float mask), and compiled FlexAttention (bias and shift mask as a score_mod on the partitioned windows), forward and forward+backward, at Swin-T's four stages
(window 7, shift 3, B = 64 and 128; 56x56x96 with 3 heads down to 7x7x768 with 24 heads, where the shift is
dropped because the window covers the map).

Every implementation starts from the qkv projection in image layout (B, H, W, 3, heads, D) and the
(num_rel, heads) bias table, and ends with the (B, H, W, heads*D) output in image layout, so the roll,
partition, bias gather, mask, reverse and crop of the non-fused paths are timed. The gradient covers qkv and
the table. TFLOP/s counts the two (N, N, D) matmuls per window and head (2.5x that for the backward); peak
memory is in extra_info on the GPU.
"""
import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast.ops.window_attention import _shift_mask, relative_position_index, window_attention_ref

from conftest import DEVICE, ON_GPU, SDPA, headline, run_benchmark, sdpa, skip_unless_it_runs, vitfast_backends

WINDOW, SHIFT = 7, 3
# name: (B, H, W, heads, D); on the CPU, small versions so that CI runs them in seconds.
if ON_GPU:
    SHAPES = {f"swin_t_stage{i + 1}_b{b}": (b, 56 >> i, 56 >> i, 3 << i, 32) for b in (64, 128) for i in range(4)}
else:
    SHAPES = {"swin_t_stage1_small": (1, 14, 14, 2, 32), "swin_t_stage4_small": (2, 7, 7, 4, 32)}
HEADLINE = {"swin_t_stage1_b128", "swin_t_stage1_small"}  # the shapes bench/gpu_run.sh runs (pytest -m headline)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
IMPLS = ["eager"] + list(SDPA) + ["flex"] + vitfast_backends("window_attention")


def _geometry(H, W):
    pad_h, pad_w = -H % WINDOW, -W % WINDOW
    shift = [0 if WINDOW >= H + pad_h else SHIFT, 0 if WINDOW >= W + pad_w else SHIFT]
    return H + pad_h, W + pad_w, shift


def _windows(qkv, shift):
    """Pad, roll, partition: (B, H, W, 3, heads, D) -> q, k, v of shape (B*nW, heads, N, D)."""
    B, H, W, _, heads, D = qkv.shape
    x = F.pad(qkv.reshape(B, H, W, -1), (0, 0, 0, -W % WINDOW, 0, -H % WINDOW))
    Hp, Wp = x.shape[1:3]
    if sum(shift):
        x = torch.roll(x, (-shift[0], -shift[1]), (1, 2))
    x = x.view(B, Hp // WINDOW, WINDOW, Wp // WINDOW, WINDOW, 3, heads, D).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = x.reshape(3, -1, heads, WINDOW * WINDOW, D).unbind(0)
    return q, k, v


def _unwindows(o, B, H, W, shift):
    """(B*nW, heads, N, D) -> reverse partition, roll back, crop -> (B, H, W, heads*D)."""
    _, heads, N, D = o.shape
    Hp, Wp, _ = _geometry(H, W)
    x = o.view(B, Hp // WINDOW, Wp // WINDOW, heads, WINDOW, WINDOW, D).permute(0, 1, 4, 2, 5, 3, 6)
    x = x.reshape(B, Hp, Wp, heads * D)
    if sum(shift):
        x = torch.roll(x, (shift[0], shift[1]), (1, 2))
    return x[:, :H, :W].contiguous()


def _dense_bias(table):
    N = WINDOW * WINDOW
    index = relative_position_index(WINDOW).to(table.device)
    return table[index].view(N, N, -1).permute(2, 0, 1)


def _sdpa(attend, qkv, table):
    B, H, W, _, heads, D = qkv.shape
    Hp, Wp, shift = _geometry(H, W)
    q, k, v = _windows(qkv, shift)
    nW, N = (Hp // WINDOW) * (Wp // WINDOW), WINDOW * WINDOW
    mask = _dense_bias(table).to(q.dtype).unsqueeze(0)  # (1, heads, N, N)
    if sum(shift):
        shift_mask = _shift_mask(Hp, Wp, [WINDOW, WINDOW], shift, q).view(1, nW, 1, N, N)
        mask = (mask.unsqueeze(0) + shift_mask).expand(B, -1, -1, -1, -1).reshape(B * nW, heads, N, N)
    return _unwindows(attend(q, k, v, mask), B, H, W, shift)


_flex_compiled = None


def _flex(qkv, table):
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention)
    B, H, W, _, heads, D = qkv.shape
    Hp, Wp, shift = _geometry(H, W)
    q, k, v = _windows(qkv, shift)
    nW, N = (Hp // WINDOW) * (Wp // WINDOW), WINDOW * WINDOW
    bias = _dense_bias(table).to(q.dtype)
    shift_mask = _shift_mask(Hp, Wp, [WINDOW, WINDOW], shift, q) if sum(shift) else torch.zeros(
        nW, N, N, dtype=q.dtype, device=q.device)

    def score_mod(score, b, h, i, j):
        return score + bias[h, i, j] + shift_mask[b % nW, i, j]

    return _unwindows(_flex_compiled(q, k, v, score_mod=score_mod), B, H, W, shift)


def _forward(impl):
    if impl == "eager":
        return lambda qkv, table: window_attention_ref(qkv, table, WINDOW, _geometry(*qkv.shape[1:3])[2]), None
    if impl in SDPA:
        attend, reason = sdpa(impl)
        return (lambda qkv, table: _sdpa(attend, qkv, table)) if attend else None, reason
    if impl == "flex":
        if not ON_GPU:
            return None, "FlexAttention compiles for tens of seconds on the CPU, beyond the CI smoke budget"
        return _flex, None
    return lambda qkv, table: vitfast.window_attention(qkv, table, WINDOW, SHIFT, clamp_window=False), None


def _bench(benchmark, impl, name, backward):
    B, H, W, heads, D = SHAPES[name]
    fwd, reason = _forward(impl)
    if fwd is None:
        pytest.skip(reason)

    def make():
        qkv = torch.randn(B, H, W, 3, heads, D, device=DEVICE, dtype=DTYPE, requires_grad=backward)
        table = torch.randn((2 * WINDOW - 1) ** 2, heads, device=DEVICE, dtype=DTYPE, requires_grad=backward)
        return qkv, table, torch.randn(B, H, W, heads * D, device=DEVICE, dtype=DTYPE)

    fn = _run(fwd, backward)
    if impl in SDPA:
        skip_unless_it_runs(impl, fn, make(), name)
    Hp, Wp, shift = _geometry(H, W)
    mode = "fwd+bwd" if backward else "fwd"
    benchmark.group = (f"window_attention {mode} {name} (B={B}, {H}x{W}, heads={heads}, D={D}, window={WINDOW}, "
                       f"shift={shift[0]}) {DTYPE}")
    flops = 4 * B * heads * Hp * Wp * WINDOW * WINDOW * D * (3.5 if backward else 1.0)
    run_benchmark(benchmark, fn, make, impl=impl, flops=int(flops), reference=_run(_forward("eager")[0], backward))


def _run(fwd, backward):
    """fn(qkv, table, dout): fwd's output, or with `backward` the gradients of qkv and table for dout."""
    if backward:
        return lambda qkv, table, dout: torch.autograd.grad(fwd(qkv, table), (qkv, table), dout)
    return lambda qkv, table, dout: fwd(qkv, table)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", headline(SHAPES, HEADLINE))
def test_forward(benchmark, impl, name):
    _bench(benchmark, impl, name, backward=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", headline(SHAPES, HEADLINE))
def test_forward_backward(benchmark, impl, name):
    _bench(benchmark, impl, name, backward=True)
