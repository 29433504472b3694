"""Scaled dot-product attention, forward and backward, in Triton.

FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", arXiv:2307.08691). Forward: one program per (query block, batch*head) streams over key
blocks with an online softmax (running max and sum in fp32), stores O and the per-row softmax statistics
and never materializes the (Nq, Nk) score matrix. Backward: a preprocess kernel computes
delta = rowsum(dO * O); a kernel per (key block, batch*head) recomputes P from Q, K and the statistics,
accumulates dK and dV (and writes dS as the gradient of a float additive bias); dQ comes either from atomic
adds in that same kernel or, for a deterministic backward, from a separate kernel per (query block,
batch*head) with no atomics.

Mask semantics (vitfast.ops.attention): scores s = scale * q.k + bias stay in natural units, in fp32, until
the running max is subtracted, so that a finite bias near -FLT_MAX (torch.finfo(float32).min, a padding
value) is plain arithmetic (times log2(e) it would overflow to -inf); exp2 then takes (s - max) * log2(e).
Masked scores (bool False, a -inf bias, causal, out of range) are set to -inf by selection, never by
addition, so NaN or inf in a masked key's k never reaches a score. Non-finite values of v reach exactly the
rows that see their key: the first launch of the forward kernel runs the plain P @ V dot (v straight from memory,
no per-block test: on Hopper the dot reads v from shared memory as loaded) and flags the rows whose output is not
finite, which every row that read a block holding a non-finite v has (0 * NaN and 0 * inf are NaN); a second
launch (POISON) recomputes only the flagged rows, with those values entering the dot as zeros and carried
separately (`_poison`) to the rows that see their key, and exits at once elsewhere. Carried in the one launch,
that fp32 dot raised the kernel's registers from ~180 to ~250 at ViT-B/16 shapes (sm_90 compile; the H200
measured the forward at 0.28x cuDNN SDPA with it). The statistics
are kept as two numbers per row, the max m and log(l) (l = sum exp(s - m)), because m + log(l) rounds to m
when |m| is huge (a row at finfo.min), which would make the backward's P wrong. A row that sees no key has
m = -inf: it yields O = 0 and zero gradients, never NaN.

Masks and biases are read through four strides (stride 0 on broadcast dims), so a key padding mask
(B, 1, 1, Nk) is read as a vector per key block and never expanded. Dropout keeps a probability where a
Philox draw keyed on (seed, batch*head*Nq*Nk + i*Nk + j) is at least the threshold, so backward
regenerates the forward's mask (vitfast.ops.attention.dropout_keep_ref computes it in plain PyTorch).
Grids are 1-D (flattened over blocks and batch*head, so no dimension limit of 65535 applies) and
offsets are int64. The forward is autotuned per (next power of two of Nq, of Nk) bucket.
"""
import functools

import torch
import triton
import triton.language as tl

from vitfast.triton.common import (autotune, compiled, dot, dot_precision, int32_head_offsets, launch, tune_bucket,
                                   upcast_bf16)

MAX_HEAD_DIM = 256
LOG2E = tl.constexpr(1.4426950408889634)
# Dropout compares the top 24 bits of a Philox draw with round(p * 2**24).
DROPOUT_BITS = 24

# Hopper (H100/H200) forward configurations per padded head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages). Up to
# D=64 each compiles without register spills in the plain case on sm_90 (scripts/compile_triton.py; the autotuner
# prunes those that spill in a masked or dropout specialization); BLOCK_N=32 pads N=197 keys to 224, not 256.
_FWD_CONFIGS = {
    16: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 32, 4, 3)],
    32: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 32, 4, 3)],
    64: [(128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
    128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
}
# Backward configurations per padded head dim, not autotuned: the dK/dV kernel adds atomically into dQ and
# dbias, which an autotuner would have to re-zero between trials. BLOCK_N (keys) is the dK/dV kernel's outer
# block, whose fp32 dK and dV accumulators live in registers, and the dQ kernel's inner one:
# (BLOCK_M, BLOCK_N, num_warps, num_stages). 32 x 64 tiles keep dK and dV without register spills on sm_90 up to
# D=64 (scripts/compile_triton.py; BLOCK_N=128 spills at D=32 with 4 and 8 warps).
_BWD_CONFIGS = {16: (32, 64, 4, 3), 32: (32, 64, 4, 3), 64: (32, 64, 4, 3), 128: (32, 64, 8, 2),
                256: (16, 64, 8, 1)}
# fp32: IEEE fp32 products run on FMA units with their operands in registers, and the configs above spill tens of KB
# per thread there (and take minutes to compile). Up to head dim 64 these compile without spills on sm_90; at 128 and
# 256 they spill a few KB (scripts/compile_triton.py).
_FWD_CONFIGS_FP32 = {
    16: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    32: [(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 8, 2)],
    64: [(64, 32, 8, 2), (32, 32, 4, 2)],
    128: [(64, 32, 8, 2), (32, 32, 4, 2)],
    256: [(16, 32, 4, 1), (32, 32, 8, 1)],
}
_BWD_CONFIGS_FP32 = {16: (32, 32, 8, 1), 32: (32, 32, 8, 1), 64: (16, 32, 8, 1), 128: (16, 64, 8, 1),
                     256: (16, 32, 8, 1)}


@triton.jit
def _dropout_keep(
    seed,  # scalar int64
    bh,  # scalar int64: batch * H + head
    offs_m,  # (BLOCK_M,) int64 query indices
    offs_n,  # (BLOCK_N,) int64 key indices
    Nq,
    Nk,
    dropout_thresh,  # round(p * 2**24)
):
    """(BLOCK_M, BLOCK_N) bool: True where the attention probability is kept."""
    offs = bh * Nq * Nk + offs_m[:, None] * Nk + offs_n[None, :]
    lo = (offs & 0xFFFFFFFF).to(tl.uint32)
    hi = (offs >> 32).to(tl.uint32)
    zero = lo * 0
    r, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return (r >> (32 - 24)).to(tl.int32) >= dropout_thresh  # 24 = DROPOUT_BITS


@triton.jit
def _scores(
    q,  # (BLOCK_M, BLOCK_D)
    k,  # (BLOCK_N, BLOCK_D)
    Bias,  # pointer to bias[b, h] (unused for BIAS_KIND 0)
    offs_m,  # (BLOCK_M,) int64 query indices
    offs_n,  # (BLOCK_N,) int64 key indices
    Nq,
    Nk,
    stride_bm,
    stride_bn,
    sm_scale,
    causal_offset,  # key j is visible from query i when j <= i + causal_offset
    BIAS_KIND: tl.constexpr,  # 0 none, 1 bool mask (True = attend), 2 float additive bias
    BIAS_ROW_BCAST: tl.constexpr,  # the bias has stride 0 over queries: read one row per key block
    IS_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Scores sm_scale * q.k (+ bias), (BLOCK_M, BLOCK_N) fp32 in natural units, -inf where masked (bool
    False, bias -inf, causal) or out of range, whatever q.k is there."""
    s = dot(q, tl.trans(k), PRECISION, DOT_UPCAST) * sm_scale
    valid = (offs_m < Nq)[:, None] & (offs_n < Nk)[None, :]
    if BIAS_KIND != 0:
        if BIAS_ROW_BCAST:
            bias = tl.load(Bias + offs_n * stride_bn, mask=offs_n < Nk, other=0)[None, :]
        else:
            bias = tl.load(Bias + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=valid, other=0)
        if BIAS_KIND == 1:
            valid = valid & (bias != 0)
        else:
            bias = bias.to(tl.float32)
            valid = valid & (bias != float("-inf"))
            s = s + bias
    if IS_CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _is_finite(x, UPCAST: tl.constexpr):
    """x is neither NaN nor +-inf. UPCAST (bf16 under the interpreter, which holds bf16 as raw 16-bit integers, so
    that the comparisons would see integers and find every value finite): compared in fp32."""
    if UPCAST:
        x = x.to(tl.float32)
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _poison(
    s,  # (BLOCK_M, BLOCK_N) scores, -inf where a row does not see the key
    v,  # (BLOCK_N, BLOCK_D) as loaded, with non-finite values
):
    """(BLOCK_M, BLOCK_D) int32 flags of the non-finite values of v that p @ v carries into each output element
    in exact arithmetic: 1 NaN, 2 +inf, 4 -inf, from the keys each row sees. The three counts come from one fp32
    dot, exact: NaN in the low byte, +inf in the next, -inf in the third (a key block has fewer than 256 keys)."""
    vf = v.to(tl.float32)
    code = tl.where(vf != vf, 1.0, tl.where(vf > 0, 256.0, 65536.0))
    code = tl.where(_is_finite(vf, False), 0.0, code)
    seen = (s != float("-inf")).to(tl.float32)
    hits = tl.dot(seen, code, input_precision="ieee").to(tl.int32)
    return (((hits & 255) != 0).to(tl.int32) | (((hits >> 8) & 255) != 0).to(tl.int32) * 2
            | ((hits >> 16) != 0).to(tl.int32) * 4)


@triton.jit
def _probs(
    s,  # (BLOCK_M, BLOCK_N) scores from _scores
    m,  # (BLOCK_M,) row max from the forward (-inf: the row sees no key)
    log_l,  # (BLOCK_M,) log of the row's sum of exp(s - m)
):
    """Softmax probabilities from the forward's row statistics; 0 on a row that sees no key, never NaN."""
    m = tl.where(m == float("-inf"), float("inf"), m)
    return tl.math.exp2(((s - m[:, None]) - log_l[:, None]) * LOG2E)


@triton.jit(do_not_specialize=["nq_bucket", "nk_bucket"])
def _attention_fwd_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    Bias,  # (B|1, H|1, Nq|1, Nk) bool or float, stride 0 on broadcast dims (unused for BIAS_KIND 0)
    O,  # (B, H, Nq, D) out
    LSE,  # (2, B * H, Nq) fp32 out: row max m (-inf: the row sees no key), log(l) (0 then)
    Flags,  # (B * H * Nq,) int8: 1 where the row's output is not finite (out without POISON, in with it)
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_lse,  # B * H * Nq: offset of the log(l) plane
    H,
    Nq,
    Nk,
    D,
    sm_scale,
    causal_offset,
    seed,
    dropout_thresh,
    dropout_scale,  # 1 / (1 - p)
    nq_bucket,  # tune_bucket(Nq), tune_bucket(Nk): the autotuning key, unused by the kernel
    nk_bucket,
    BIAS_KIND: tl.constexpr,
    BIAS_ROW_BCAST: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    POISON: tl.constexpr,  # the second launch: only the flagged rows, with the non-finite values of v carried
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    num_m_blocks = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // num_m_blocks
    start_m = (pid % num_m_blocks) * BLOCK_M
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if POISON:
        if tl.max(tl.load(Flags + bh * Nq + offs_m, mask=offs_m < Nq, other=0).to(tl.int32)) == 0:
            return
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m < Nq)[:, None] & d_mask[None, :], other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Bias += b * stride_bb + h * stride_bh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if POISON:
        poison = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.int32)
    hi = Nk
    if IS_CAUSAL:
        # Key blocks entirely above the diagonal of this query block are skipped.
        hi = tl.maximum(tl.minimum(Nk, start_m + BLOCK_M + causal_offset), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        kv_mask = (offs_n < Nk)[:, None] & d_mask[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = _scores(q, k, Bias, offs_m, offs_n, Nq, Nk, stride_bm, stride_bn, sm_scale, causal_offset,
                    BIAS_KIND, BIAS_ROW_BCAST, IS_CAUSAL, PRECISION, DOT_UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2((m_i - m_safe) * LOG2E)
        p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Nq, Nk, dropout_thresh)
            p = tl.where(keep, p * dropout_scale, 0.0)
        if POISON:
            v_ok = _is_finite(v, DOT_UPCAST)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), tl.where(v_ok, v, 0.0), PRECISION, DOT_UPCAST)
            if tl.min(v_ok.to(tl.int32)) == 0:
                poison = poison | _poison(s, v)
        else:  # (v straight from memory into the dot)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, DOT_UPCAST)
        m_i = m_new
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if POISON:
        already_nan = o != o  # (from a NaN score: it stays NaN where an infinite v reaches the row)
        o = tl.where((poison & 2) != 0, float("inf"), o)
        o = tl.where((poison & 4) != 0, float("-inf"), o)
        o = tl.where(((poison & 1) != 0) | ((poison & 6) == 6) | already_nan, float("nan"), o)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=(offs_m < Nq)[:, None] & d_mask[None, :])
    if not POISON:  # (the statistics do not depend on v: the first launch's stand)
        tl.store(LSE + bh * Nq + offs_m, m_i, mask=offs_m < Nq)
        tl.store(LSE + stride_lse + bh * Nq + offs_m, tl.math.log(tl.where(empty, 1.0, l_i)), mask=offs_m < Nq)
        # A non-finite v in any key block the row read leaves a non-finite output (0 * NaN and 0 * inf are NaN, and a
        # non-finite accumulator stays non-finite): such rows are flagged for the second launch. So is a row made
        # non-finite by q, k, the bias or an overflow, which the second launch computes again (in its own tiles: finite
        # values may differ by rounding, and an overflow of the unnormalised sum, with |v| near the dtype's max, by
        # where it happens).
        bad = tl.max(1 - _is_finite(o, False).to(tl.int32), 1)
        tl.store(Flags + bh * Nq + offs_m, bad.to(tl.int8), mask=offs_m < Nq)


@triton.jit
def _attention_bwd_preprocess_kernel(
    O,  # (B, H, Nq, D)
    DO,  # (B, H, Nq, D)
    Delta,  # (B * H, Nq) fp32 out
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    H,
    Nq,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    num_m_blocks = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // num_m_blocks
    offs_m = (pid % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Nq)[:, None] & (offs_d < D)[None, :]
    b = bh // H
    h = bh % H
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    Bias,  # (B|1, H|1, Nq|1, Nk) bool or float, stride 0 on broadcast dims (unused for BIAS_KIND 0)
    DO,  # (B, H, Nq, D)
    LSE,  # (2, B * H, Nq) fp32: the forward's row max and log(l)
    Delta,  # (B * H, Nq) fp32
    DK,  # (B, H, Nk, D) out
    DV,  # (B, H, Nk, D) out
    DQ,  # (B, H, Nq, D) fp32, zero-filled, added into atomically (unused without DQ_ATOMIC)
    DBias,  # (B|1, H|1, Nq|1, Nk) fp32, zero-filled, stride 0 on dims reduced atomically (unused without DBIAS)
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    stride_dbb,
    stride_dbh,
    stride_dbm,
    stride_dbn,
    stride_lse,  # B * H * Nq: offset of the log(l) plane
    H,
    Nq,
    Nk,
    D,
    sm_scale,
    causal_offset,
    seed,
    dropout_thresh,
    dropout_scale,
    BIAS_KIND: tl.constexpr,
    BIAS_ROW_BCAST: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
    DBIAS: tl.constexpr,
    DBIAS_ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    num_n_blocks = tl.cdiv(Nk, BLOCK_N)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // num_n_blocks
    start_n = (pid % num_n_blocks) * BLOCK_N
    b = bh // H
    h = bh % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    kv_mask = (offs_n < Nk)[:, None] & d_mask[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    Bias += b * stride_bb + h * stride_bh
    DBias += b * stride_dbb + h * stride_dbh
    LSE += bh * Nq
    Delta += bh * Nq
    # dQ = dS @ K: a key a row does not see has dS = 0 there, but 0 * NaN = NaN, so non-finite k enter as 0
    # (where a row sees such a key, its dS is already NaN).
    k_dq = tl.where(_is_finite(k, DOT_UPCAST), k, 0.0)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    db_row = tl.zeros((BLOCK_N,), dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:
        # Query blocks that see none of these keys are skipped.
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, Nq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        q_mask = (offs_m < Nq)[:, None] & d_mask[None, :]
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
        m = tl.load(LSE + offs_m, mask=offs_m < Nq, other=0.0)
        log_l = tl.load(LSE + stride_lse + offs_m, mask=offs_m < Nq, other=0.0)
        delta = tl.load(Delta + offs_m, mask=offs_m < Nq, other=0.0)
        s = _scores(q, k, Bias, offs_m, offs_n, Nq, Nk, stride_bm, stride_bn, sm_scale, causal_offset,
                    BIAS_KIND, BIAS_ROW_BCAST, IS_CAUSAL, PRECISION, DOT_UPCAST)
        p = _probs(s, m, log_l)
        dp = dot(do, tl.trans(v), PRECISION, DOT_UPCAST)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Nq, Nk, dropout_thresh)
            p_drop = tl.where(keep, p * dropout_scale, 0.0)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        else:
            p_drop = p
        dv += dot(tl.trans(p_drop.to(do.dtype)), do, PRECISION, DOT_UPCAST)
        # Where a row does not see the key, dS is 0 even if dP is NaN (non-finite v of a masked key).
        ds = tl.where(s == float("-inf"), 0.0, p * (dp - delta[:, None]))
        # dK = dS^T @ Q: a row that does not see the key has dS = 0 there, so its non-finite q enter as 0, as k in dQ
        dk += dot(tl.trans(ds.to(q.dtype)), tl.where(_is_finite(q, DOT_UPCAST), q, 0.0), PRECISION, DOT_UPCAST)
        if DBIAS:
            if BIAS_ROW_BCAST:
                db_row += tl.sum(ds, 0)
            else:
                db_ptrs = DBias + offs_m[:, None] * stride_dbm + offs_n[None, :] * stride_dbn
                db_mask = (offs_m < Nq)[:, None] & (offs_n < Nk)[None, :]
                if DBIAS_ATOMIC:
                    tl.atomic_add(db_ptrs, ds, mask=db_mask)
                else:
                    tl.store(db_ptrs, ds, mask=db_mask)
        if DQ_ATOMIC:
            dq = dot(ds.to(k.dtype), k_dq, PRECISION, DOT_UPCAST) * sm_scale
            tl.atomic_add(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq, mask=q_mask)
    if DBIAS:
        if BIAS_ROW_BCAST:
            if DBIAS_ATOMIC:
                tl.atomic_add(DBias + offs_n * stride_dbn, db_row, mask=offs_n < Nk)
            else:
                tl.store(DBias + offs_n * stride_dbn, db_row, mask=offs_n < Nk)
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    Bias,  # (B|1, H|1, Nq|1, Nk) bool or float, stride 0 on broadcast dims (unused for BIAS_KIND 0)
    DO,  # (B, H, Nq, D)
    LSE,  # (2, B * H, Nq) fp32: the forward's row max and log(l)
    Delta,  # (B * H, Nq) fp32
    DQ,  # (B, H, Nq, D) out
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    stride_lse,  # B * H * Nq: offset of the log(l) plane
    H,
    Nq,
    Nk,
    D,
    sm_scale,
    causal_offset,
    seed,
    dropout_thresh,
    dropout_scale,
    BIAS_KIND: tl.constexpr,
    BIAS_ROW_BCAST: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    num_m_blocks = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // num_m_blocks
    start_m = (pid % num_m_blocks) * BLOCK_M
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_mask = (offs_m < Nq)[:, None] & d_mask[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)
    m = tl.load(LSE + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    log_l = tl.load(LSE + stride_lse + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    delta = tl.load(Delta + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Bias += b * stride_bb + h * stride_bh

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = Nk
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(Nk, start_m + BLOCK_M + causal_offset), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        kv_mask = (offs_n < Nk)[:, None] & d_mask[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = _scores(q, k, Bias, offs_m, offs_n, Nq, Nk, stride_bm, stride_bn, sm_scale, causal_offset,
                    BIAS_KIND, BIAS_ROW_BCAST, IS_CAUSAL, PRECISION, DOT_UPCAST)
        p = _probs(s, m, log_l)
        dp = dot(do, tl.trans(v), PRECISION, DOT_UPCAST)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Nq, Nk, dropout_thresh)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        # As in the dK/dV kernel: dS is 0 where the row does not see the key, and non-finite k enter as 0.
        ds = tl.where(s == float("-inf"), 0.0, p * (dp - delta[:, None]))
        dq += dot(ds.to(k.dtype), tl.where(_is_finite(k, DOT_UPCAST), k, 0.0), PRECISION, DOT_UPCAST)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


@functools.lru_cache(None)
def _fwd_autotuned(block_d: int, fp32: bool):
    shapes = _FWD_CONFIGS_FP32.get(block_d, _FWD_CONFIGS[block_d]) if fp32 else _FWD_CONFIGS[block_d]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]
    key = ["nq_bucket", "nk_bucket", "BIAS_KIND", "BIAS_ROW_BCAST", "IS_CAUSAL", "HAS_DROPOUT", "PRECISION"]
    return autotune(configs, key)(_attention_fwd_kernel)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# The interpreter runs programs one after another, with numpy on each tile: few, mid-sized blocks are fastest.
_INTERPRET_BLOCK = 32
# Query rows per program of the forward's second (POISON) launch: the flags are per row, so its tiles need not be
# the autotuned first launch's.
_POISON_BLOCK_M = 16


def _dropout_args(dropout_p: float, seed: int) -> tuple:
    if dropout_p <= 0.0:
        return 0, 0, 1.0
    return int(seed), int(round(dropout_p * 2**DROPOUT_BITS)), 1.0 / (1.0 - dropout_p)


def _bias_args(bias, B, H, Nq, Nk, q):
    """(pointer, 4 strides, BIAS_KIND, BIAS_ROW_BCAST) for a bias of shape (B|1, H|1, Nq|1, Nk|1)."""
    if bias is None:
        return q, (0, 0, 0, 0), 0, False
    view = bias.expand(B, H, Nq, Nk)
    strides = tuple(view.stride())
    kind = 1 if bias.dtype == torch.bool else 2
    return view, strides, kind, bias.shape[2] == 1 and Nq > 1


def _bnhd_empty(B, H, N, D, like: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) tensor laid out as (B, N, H, D): the layout the projections that follow read directly."""
    # (not a view, which autograd would refuse to modify in place as an op's output)
    return torch.empty_strided((B, H, N, D), (N * H * D, D, H * D, 1), dtype=like.dtype, device=like.device)


def attention_fwd(q, k, v, bias, dropout_p, seed, is_causal, causal_offset, scale):
    """Launches the forward kernel.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); any strides, one dtype (fp16, bf16, fp32).
        bias: None, or a bool mask (True = attend) or float additive bias of shape (B|1, H|1, Nq|1, Nk|1).
        dropout_p: probability of dropping an attention weight; seed: Philox seed (int).
        is_causal: key j is visible from query i only when j <= i + causal_offset.
        scale: softmax scale.
    Returns:
        out (B, H, Nq, D) in a (B, Nq, H, D) buffer; lse (2, B, H, Nq) fp32: each row's score max m and
        log(sum exp(s - m)), (-inf, 0) for a row that sees no key.
    """
    q, k, v = int32_head_offsets(q, k, v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = _bnhd_empty(B, H, Nq, D, q)
    lse = torch.empty((2, B, H, Nq), dtype=torch.float32, device=q.device)
    flags = torch.empty((B * H * Nq,), dtype=torch.int8, device=q.device)
    bias_t, bs, bias_kind, row_bcast = _bias_args(bias, B, H, Nq, Nk, q)
    seed, thresh, dscale = _dropout_args(dropout_p, seed)
    block_d = _block_d(D)
    args = (q, k, v, bias_t, out, lse, flags, *q.stride(), *k.stride(), *v.stride(), *bs, *out.stride(), lse.stride(0),
            H, Nq, Nk, D, scale, causal_offset, seed, thresh, dscale, tune_bucket(Nq), tune_bucket(Nk))
    consts = dict(BIAS_KIND=bias_kind, BIAS_ROW_BCAST=row_bcast, IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0,
                  PRECISION=dot_precision(q), DOT_UPCAST=upcast_bf16(q), BLOCK_D=block_d)
    if not compiled(q):
        grid = (triton.cdiv(Nq, _INTERPRET_BLOCK) * B * H,)
        for poison in (False, True):
            launch(_attention_fwd_kernel, grid, *args, **consts, POISON=poison, BLOCK_M=_INTERPRET_BLOCK,
                   BLOCK_N=_INTERPRET_BLOCK)
        return out, lse
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    launch(_fwd_autotuned(block_d, q.dtype == torch.float32), grid, *args, **consts, POISON=False)
    # the flagged rows again, small tiles (rare: a non-finite v); every other program returns at once
    launch(_attention_fwd_kernel, (triton.cdiv(Nq, _POISON_BLOCK_M) * B * H,), *args, **consts, POISON=True,
           BLOCK_M=_POISON_BLOCK_M, BLOCK_N=32, num_warps=4, num_stages=1)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, bias, dropout_p, seed, is_causal, causal_offset, scale,
                  bias_requires_grad, deterministic):
    """Launches the backward kernels.

    Args:
        dout, out: (B, H, Nq, D); q, k, v, bias, dropout_p, seed, is_causal, causal_offset, scale: as in
            `attention_fwd`; lse: its (2, B, H, Nq) output (copied when not contiguous).
        bias_requires_grad: also return the gradient of the float bias, reduced over its broadcast dims.
        deterministic: dQ from a separate kernel and dbias from per-(batch, head) partials, no atomics.
    Returns:
        dq, dk, dv like q, k, v (in (B, N, H, D) buffers); dbias of the bias's shape and dtype, or empty.
    """
    dout, q, k, v, out = int32_head_offsets(dout, q, k, v, out)
    lse = lse.contiguous()
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    block_d = _block_d(D)
    if not compiled(q):
        block_m = block_n = _INTERPRET_BLOCK
        warps = {}
    else:
        configs = _BWD_CONFIGS_FP32 if q.dtype == torch.float32 else {}
        block_m, block_n, num_warps, num_stages = configs.get(block_d, _BWD_CONFIGS[block_d])
        warps = dict(num_warps=num_warps, num_stages=num_stages)
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    launch(
        _attention_bwd_preprocess_kernel, (triton.cdiv(Nq, block_m) * B * H,),
        out, dout, delta, *out.stride(), *dout.stride(), H, Nq, D, BLOCK_M=block_m, BLOCK_D=block_d)

    bias_t, bs, bias_kind, row_bcast = _bias_args(bias, B, H, Nq, Nk, q)
    seed, thresh, dscale = _dropout_args(dropout_p, seed)
    dbias_buf, dbs, dbias_atomic = q, (0, 0, 0, 0), False
    if bias_requires_grad:
        # Atomics reduce over broadcast batch/head dims; deterministic mode writes per-(b, h) partials instead.
        dbias_atomic = not deterministic and (bias.shape[0] < B or bias.shape[1] < H)
        shape = (bias.shape[0], bias.shape[1]) if dbias_atomic else (B, H)
        dbias_buf = torch.zeros(shape + (1 if row_bcast else Nq, Nk), dtype=torch.float32, device=q.device)
        dbs = tuple(dbias_buf.expand(B, H, dbias_buf.shape[2], Nk).stride())
    dq_atomic = not deterministic
    dk = _bnhd_empty(B, H, Nk, D, k)
    dv = _bnhd_empty(B, H, Nk, D, v)
    dq_acc = torch.zeros((B, H, Nq, D), dtype=torch.float32, device=q.device) if dq_atomic else q
    common = dict(BIAS_KIND=bias_kind, BIAS_ROW_BCAST=row_bcast, IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0,
                  PRECISION=dot_precision(q), DOT_UPCAST=upcast_bf16(q), BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_D=block_d, **warps)
    launch(
        _attention_bwd_dkdv_kernel, (triton.cdiv(Nk, block_n) * B * H,),
        q, k, v, bias_t, dout, lse, delta, dk, dv, dq_acc, dbias_buf,
        *q.stride(), *k.stride(), *v.stride(), *bs, *dout.stride(), *dk.stride(), *dv.stride(),
        *(dq_acc.stride() if dq_atomic else (0, 0, 0, 0)), *dbs, lse.stride(0),
        H, Nq, Nk, D, scale, causal_offset, seed, thresh, dscale,
        DQ_ATOMIC=dq_atomic, DBIAS=bias_requires_grad, DBIAS_ATOMIC=dbias_atomic, **common)
    if dq_atomic:
        dq = _bnhd_empty(B, H, Nq, D, q)
        dq.copy_(dq_acc)
    else:
        dq = _bnhd_empty(B, H, Nq, D, q)
        launch(
            _attention_bwd_dq_kernel, (triton.cdiv(Nq, block_m) * B * H,),
            q, k, v, bias_t, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *bs, *dout.stride(), *dq.stride(), lse.stride(0),
            H, Nq, Nk, D, scale, causal_offset, seed, thresh, dscale, **common)
    if not bias_requires_grad:
        return dq, dk, dv, q.new_empty(0)
    reduce = [d for d in range(4) if bias.shape[d] == 1 and dbias_buf.shape[d] > 1]
    dbias = dbias_buf.sum(reduce, keepdim=True) if reduce else dbias_buf
    return dq, dk, dv, dbias.to(bias.dtype)

