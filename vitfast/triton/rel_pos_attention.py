"""Attention with decomposed relative positions (SAM, ViTDet, MViTv2), forward and backward, in Triton.

FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
arXiv:2307.08691) with the bias of MViTv2's decomposed relative positions (Li et al. 2022, arXiv:2112.01526):
score[i, j] = scale * q_i . k_j + rel_h[i, j // kw] + rel_w[i, j % kw] for key j of a kh x kw key grid.

Key tiles are whole rows of the key grid: BLOCK_KROWS rows of BLOCK_KW columns (kw rounded up to a power of two; the
padding columns are masked), so the bias of a tile is rel_h[i, its rows] (BLOCK_M, BLOCK_KROWS) broadcast against
rel_w[i, :] (BLOCK_M, BLOCK_KW), which a query block loads once. No (Nq, Nk) bias exists anywhere.

Forward: one program per (query block, batch*head) streams over the key tiles with an online softmax (running max
and sum in fp32; scores in natural units, exp2 of (s - m) * log2(e), so that s - m is exact next to a huge finite
bias and no bias is scaled past the fp32 range) and stores O and each row's statistics: max score m and log l, the
log of its sum of exp(s - m), kept apart (m + log l would lose log l next to a huge m), the attention op's format.
Backward, with no atomics (so deterministic): delta = rowsum(dO * O) (the attention op's preprocess kernel); a
program per (key tile, batch*head) recomputes P over all query blocks and accumulates dK and dV; a program per
(query block, batch*head) accumulates dQ and reduces dS in registers into the gradients of the terms: viewed as
(BLOCK_M, BLOCK_KROWS, BLOCK_KW), dS summed over columns gives drel_h of the tile's rows (stored at once: each key row
lies in one tile) and summed over rows adds into drel_w (stored after the last tile).

Dropout is the attention op's: a Philox draw keyed on (seed, batch*head*Nq*Nk + i*Nk + j) (see
vitfast.ops.attention.dropout_keep_ref). Grids are 1-D (batch*head folded into dimension 0, which has no 65535
limit) and offsets are int64. Autotune keys bucket the sequence lengths to powers of two.
"""
import functools

import torch
import triton
import triton.language as tl

from vitfast.triton.attention import (_attention_bwd_preprocess_kernel, _block_d, _bnhd_empty, _dropout_args,
                                      _dropout_keep)
from vitfast.triton.common import (autotune, compiled, dot, dot_precision, int32_head_offsets, launch, tune_bucket,
                                   upcast_bf16)

# Hopper (H100/H200) forward configurations per padded head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages), where
# BLOCK_N is a target: a tile is BLOCK_KROWS = max(1, BLOCK_N // BLOCK_KW) whole key rows.
# Chosen from scripts/compile_triton.py's sm_90 register and spill counts (no GPU has timed them yet): 4 warps over
# 128 queries spill at D=64, where the query block's rel_w row (BLOCK_M x BLOCK_KW fp32) stays in registers.
_FWD_CONFIGS = {
    16: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    32: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (64, 64, 4, 3)],
    256: [(64, 64, 8, 2), (64, 32, 8, 2)],
}
# Backward configurations per padded head dim, (BLOCK_M, BLOCK_N target, num_warps, num_stages) of the dK/dV kernel
# (fp32 dK and dV of the key tile in registers) and of the dQ kernel (fp32 dQ and drel_w of the query block); fixed,
# to keep the number of compiled specializations small.
_BWD_CONFIGS = {
    16: ((32, 64, 4, 2), (64, 64, 4, 2)),
    32: ((32, 64, 4, 2), (64, 64, 4, 2)),
    64: ((32, 64, 4, 2), (64, 64, 4, 2)),
    128: ((32, 64, 8, 2), (64, 64, 8, 2)),
    256: ((32, 32, 8, 1), (32, 32, 8, 1)),
}
# fp32 up to head dim 64 (IEEE fp32 products run on FMA units with their operands in registers: the tiles above spill
# KBs there): these compile without spills on sm_90 at SAM's global and windowed layers (scripts/compile_triton.py).
_FWD_CONFIGS_FP32 = {d: [(32, 64, 8, 2), (16, 64, 4, 2)] for d in (16, 32, 64)}
_BWD_CONFIGS_FP32 = {d: ((16, 64, 8, 1), (32, 32, 8, 1)) for d in (16, 32, 64)}
# From this padded key-row width a forward tile (at least one whole key row) of fp32 at head dim 65..128 or 16-bit at
# 129..256 needs more shared memory than an H100 has at 2-3 pipeline stages (fp32 D=80: 328-394 KB of 227 KB; bf16
# D=256: 288 KB): each config also gets a one-stage variant, which the autotuner's pruning keeps where nothing else
# fits (scripts/compile_triton.py's kw=128 edge cases).
_ONE_STAGE_KW = 128
# Under the interpreter each program costs a fixed overhead, so fewer, larger tiles are faster: at SAM's 14 x 14
# windows, 64 (4 key rows of 16 per tile) took 1.3 s forward and 3.2 s backward where 32 took 5.1 s and 9.6 s.
_INTERPRET_BLOCK = 64


@triton.jit
def _key_tile(
    row0,  # first key row of the tile
    kh,
    kw,
    BLOCK_KROWS: tl.constexpr,
    BLOCK_KW: tl.constexpr,
):
    """(BLOCK_KROWS * BLOCK_KW,) int64 key indices of the key rows [row0, row0 + BLOCK_KROWS), and which are keys."""
    idx = tl.arange(0, BLOCK_KROWS * BLOCK_KW)
    rows = row0 + idx // BLOCK_KW
    cols = idx % BLOCK_KW
    return (rows * kw + cols).to(tl.int64), (rows < kh) & (cols < kw)


@triton.jit
def _rel_rows(
    RelH,  # pointer to rel_h[b, h]
    offs_m,  # (BLOCK_M,) int64 query indices
    row0,
    Nq,
    kh,
    stride_hm,
    stride_hr,
    BLOCK_KROWS: tl.constexpr,
):
    """(BLOCK_M, BLOCK_KROWS) fp32: rel_h of the tile's key rows."""
    rows = row0 + tl.arange(0, BLOCK_KROWS)
    rh = tl.load(RelH + offs_m[:, None] * stride_hm + rows[None, :] * stride_hr,
                 mask=(offs_m < Nq)[:, None] & (rows < kh)[None, :], other=0.0)
    return rh.to(tl.float32)


@triton.jit
def _rel_cols(
    RelW,  # pointer to rel_w[b, h]
    offs_m,  # (BLOCK_M,) int64 query indices
    Nq,
    kw,
    stride_wm,
    stride_wc,
    BLOCK_KW: tl.constexpr,
):
    """(BLOCK_M, BLOCK_KW) fp32: rel_w of every key column (zero on padding columns)."""
    cols = tl.arange(0, BLOCK_KW)
    rw = tl.load(RelW + offs_m[:, None] * stride_wm + cols[None, :] * stride_wc,
                 mask=(offs_m < Nq)[:, None] & (cols < kw)[None, :], other=0.0)
    return rw.to(tl.float32)


@triton.jit
def _scores(
    q,  # (BLOCK_M, BLOCK_D)
    k,  # (BLOCK_KROWS * BLOCK_KW, BLOCK_D)
    rh,  # (BLOCK_M, BLOCK_KROWS) fp32
    rw,  # (BLOCK_M, BLOCK_KW) fp32
    key_valid,  # (BLOCK_KROWS * BLOCK_KW,) bool
    sm_scale,  # softmax scale
    PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KROWS: tl.constexpr,
    BLOCK_KW: tl.constexpr,
):
    """Scores, (BLOCK_M, BLOCK_KROWS * BLOCK_KW) fp32, -inf outside the key grid."""
    s = dot(q, tl.trans(k), PRECISION, DOT_UPCAST) * sm_scale
    s += tl.reshape(rh[:, :, None] + rw[:, None, :], (BLOCK_M, BLOCK_KROWS * BLOCK_KW))
    return tl.where(key_valid[None, :], s, float("-inf"))


@triton.jit(do_not_specialize=["q_bucket", "k_bucket"])
def _rel_pos_attention_fwd_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    RelH,  # (B|1, H|1, Nq, kh), stride 0 on broadcast dims
    RelW,  # (B|1, H|1, Nq, kw), stride 0 on broadcast dims
    O,  # (B, H, Nq, D) out
    LSE,  # (2, B * H, Nq) fp32 out: row max m (-inf: the row sees no key), log(sum exp(s - m)) (0 then)
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
    stride_hb,
    stride_hh,
    stride_hm,
    stride_hr,
    stride_wb,
    stride_wh,
    stride_wm,
    stride_wc,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_lse,  # B * H * Nq: offset of the log(l) plane
    H,
    Nq,
    kh,
    kw,
    D,
    sm_scale,
    seed,
    dropout_thresh,
    dropout_scale,  # 1 / (1 - p)
    q_bucket,  # tune_bucket(Nq), tune_bucket(Nk): the autotuning key, unused by the kernel
    k_bucket,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KROWS: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    Nk = kh * kw
    num_m_blocks = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // num_m_blocks
    start_m = (pid % num_m_blocks) * BLOCK_M
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m < Nq)[:, None] & d_mask[None, :], other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    RelH += b * stride_hb + h * stride_hh
    rw = _rel_cols(RelW + b * stride_wb + h * stride_wh, offs_m, Nq, kw, stride_wm, stride_wc, BLOCK_KW)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for row0 in range(0, kh, BLOCK_KROWS):
        offs_n, key_valid = _key_tile(row0, kh, kw, BLOCK_KROWS, BLOCK_KW)
        kv_mask = key_valid[:, None] & d_mask[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        rh = _rel_rows(RelH, offs_m, row0, Nq, kh, stride_hm, stride_hr, BLOCK_KROWS)
        s = _scores(q, k, rh, rw, key_valid, sm_scale, PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_KROWS, BLOCK_KW)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose bias is -inf everywhere keeps max -inf: subtracting 0 instead keeps exp2 at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2((m_i - m_safe) * 1.4426950408889634)
        p = tl.math.exp2((s - m_safe[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Nq, Nk, dropout_thresh)
            p = tl.where(keep, p * dropout_scale, 0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, DOT_UPCAST)
        m_i = m_new
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    log_l = tl.math.log(tl.where(empty, 1.0, l_i))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=(offs_m < Nq)[:, None] & d_mask[None, :])
    tl.store(LSE + bh * Nq + offs_m, m_i, mask=offs_m < Nq)
    tl.store(LSE + stride_lse + bh * Nq + offs_m, log_l, mask=offs_m < Nq)


@triton.jit
def _load_query_block(
    Q,  # pointer to q[b, h]
    DO,  # pointer to dout[b, h]
    LSE,  # pointer to lse[0, b, h]
    Delta,  # pointer to delta[b, h]
    offs_m,  # (BLOCK_M,) int64 query indices
    offs_d,  # (BLOCK_D,) head-dim indices
    Nq,
    D,
    stride_qm,
    stride_qd,
    stride_dom,
    stride_dod,
    stride_lse,
):
    """q and dO rows, the row statistics as m and log2(l), P = exp2((s - m) * log2(e) - log2(l)) (m = +inf for a
    row with no visible key, so that its P is 0, not NaN), and delta."""
    mask = (offs_m < Nq)[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    m = tl.load(LSE + offs_m, mask=offs_m < Nq, other=0.0)
    m = tl.where(m == float("-inf"), float("inf"), m)
    log2_l = tl.load(LSE + stride_lse + offs_m, mask=offs_m < Nq, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + offs_m, mask=offs_m < Nq, other=0.0)
    return q, do, m, log2_l, delta


@triton.jit
def _rel_pos_attention_bwd_dkdv_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    RelH,  # (B|1, H|1, Nq, kh), stride 0 on broadcast dims
    RelW,  # (B|1, H|1, Nq, kw), stride 0 on broadcast dims
    DO,  # (B, H, Nq, D)
    LSE,  # (2, B * H, Nq) fp32: the forward's row max and log(l)
    Delta,  # (B * H, Nq) fp32
    DK,  # (B, H, Nk, D) out
    DV,  # (B, H, Nk, D) out
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
    stride_hb,
    stride_hh,
    stride_hm,
    stride_hr,
    stride_wb,
    stride_wh,
    stride_wm,
    stride_wc,
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
    stride_lse,  # B * H * Nq: offset of the log(l) plane
    H,
    Nq,
    kh,
    kw,
    D,
    sm_scale,
    seed,
    dropout_thresh,
    dropout_scale,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KROWS: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    Nk = kh * kw
    num_tiles = tl.cdiv(kh, BLOCK_KROWS)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // num_tiles
    row0 = (pid % num_tiles) * BLOCK_KROWS
    b = bh // H
    h = bh % H
    offs_n, key_valid = _key_tile(row0, kh, kw, BLOCK_KROWS, BLOCK_KW)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = key_valid[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    RelH += b * stride_hb + h * stride_hh
    RelW += b * stride_wb + h * stride_wh
    LSE += bh * Nq
    Delta += bh * Nq

    dk = tl.zeros((BLOCK_KROWS * BLOCK_KW, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_KROWS * BLOCK_KW, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        q, do, m, log2_l, delta = _load_query_block(Q, DO, LSE, Delta, offs_m, offs_d, Nq, D, stride_qm,
                                                    stride_qd, stride_dom, stride_dod, stride_lse)
        rh = _rel_rows(RelH, offs_m, row0, Nq, kh, stride_hm, stride_hr, BLOCK_KROWS)
        rw = _rel_cols(RelW, offs_m, Nq, kw, stride_wm, stride_wc, BLOCK_KW)
        s = _scores(q, k, rh, rw, key_valid, sm_scale, PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_KROWS, BLOCK_KW)
        # Rows past Nq have q = dO = delta = 0, so they add nothing below.
        p = tl.math.exp2((s - m[:, None]) * 1.4426950408889634 - log2_l[:, None])
        dp = dot(do, tl.trans(v), PRECISION, DOT_UPCAST)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Nq, Nk, dropout_thresh)
            p_drop = tl.where(keep, p * dropout_scale, 0.0)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        else:
            p_drop = p
        dv += dot(tl.trans(p_drop.to(do.dtype)), do, PRECISION, DOT_UPCAST)
        ds = p * (dp - delta[:, None])
        dk += dot(tl.trans(ds.to(q.dtype)), q, PRECISION, DOT_UPCAST)
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _rel_pos_attention_bwd_dq_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    RelH,  # (B|1, H|1, Nq, kh), stride 0 on broadcast dims
    RelW,  # (B|1, H|1, Nq, kw), stride 0 on broadcast dims
    DO,  # (B, H, Nq, D)
    LSE,  # (2, B * H, Nq) fp32: the forward's row max and log(l)
    Delta,  # (B * H, Nq) fp32
    DQ,  # (B, H, Nq, D) out
    DRelH,  # (B * H, Nq, kh) fp32 out, contiguous
    DRelW,  # (B * H, Nq, kw) fp32 out, contiguous
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
    stride_hb,
    stride_hh,
    stride_hm,
    stride_hr,
    stride_wb,
    stride_wh,
    stride_wm,
    stride_wc,
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
    kh,
    kw,
    D,
    sm_scale,
    seed,
    dropout_thresh,
    dropout_scale,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KROWS: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    Nk = kh * kw
    num_m_blocks = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // num_m_blocks
    start_m = (pid % num_m_blocks) * BLOCK_M
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m_mask = offs_m < Nq
    q, do, m, log2_l, delta = _load_query_block(Q + b * stride_qb + h * stride_qh,
                                                DO + b * stride_dob + h * stride_doh, LSE + bh * Nq,
                                                Delta + bh * Nq, offs_m, offs_d, Nq, D, stride_qm, stride_qd,
                                                stride_dom, stride_dod, stride_lse)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    RelH += b * stride_hb + h * stride_hh
    rw = _rel_cols(RelW + b * stride_wb + h * stride_wh, offs_m, Nq, kw, stride_wm, stride_wc, BLOCK_KW)
    DRelH += bh * Nq * kh

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    drw = tl.zeros((BLOCK_M, BLOCK_KW), dtype=tl.float32)
    for row0 in range(0, kh, BLOCK_KROWS):
        offs_n, key_valid = _key_tile(row0, kh, kw, BLOCK_KROWS, BLOCK_KW)
        kv_mask = key_valid[:, None] & d_mask[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        rh = _rel_rows(RelH, offs_m, row0, Nq, kh, stride_hm, stride_hr, BLOCK_KROWS)
        s = _scores(q, k, rh, rw, key_valid, sm_scale, PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_KROWS, BLOCK_KW)
        p = tl.math.exp2((s - m[:, None]) * 1.4426950408889634 - log2_l[:, None])
        dp = dot(do, tl.trans(v), PRECISION, DOT_UPCAST)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Nq, Nk, dropout_thresh)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])  # 0 outside the key grid, where p is
        dq += dot(ds.to(k.dtype), k, PRECISION, DOT_UPCAST)
        ds_grid = tl.reshape(ds, (BLOCK_M, BLOCK_KROWS, BLOCK_KW))
        rows = row0 + tl.arange(0, BLOCK_KROWS)
        tl.store(DRelH + offs_m[:, None] * kh + rows[None, :], tl.sum(ds_grid, 2),
                 mask=m_mask[:, None] & (rows < kh)[None, :])
        drw += tl.sum(ds_grid, 1)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    cols = tl.arange(0, BLOCK_KW)
    tl.store(DRelW + bh * Nq * kw + offs_m[:, None] * kw + cols[None, :], drw,
             mask=m_mask[:, None] & (cols < kw)[None, :])


def _krows(block_n: int, kw_pad: int) -> int:
    """Key rows per tile for a target tile of block_n keys."""
    return max(1, block_n // kw_pad)


@functools.lru_cache(None)
def _fwd_autotuned(block_d: int, kw_pad: int, fp32: bool):
    shapes = _FWD_CONFIGS_FP32.get(block_d, _FWD_CONFIGS[block_d]) if fp32 else _FWD_CONFIGS[block_d]
    if kw_pad >= _ONE_STAGE_KW:
        shapes = shapes + [(m, n, w, 1) for m, n, w, _ in shapes]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_KROWS": _krows(n, kw_pad)}, num_warps=w, num_stages=s)
               for m, n, w, s in shapes]
    # Configs that give the same tile (kw_pad >= the target BLOCK_N) are compiled and timed once.
    unique = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_KROWS"], c.num_warps, c.num_stages): c for c in configs}
    return autotune(list(unique.values()), ["q_bucket", "k_bucket", "HAS_DROPOUT", "PRECISION"])(
        _rel_pos_attention_fwd_kernel)


def _strides4(t: torch.Tensor, B: int, H: int) -> tuple:
    """The four strides of a (B|1, H|1, N, n) tensor read as (B, H, N, n): 0 on broadcast dims."""
    return tuple(t.expand(B, H, t.shape[2], t.shape[3]).stride())


def rel_pos_attention_fwd(q, k, v, rel_h, rel_w, dropout_p, seed, scale):
    """Launches the forward kernel.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D), Nk = kh * kw; any strides, one dtype (fp16, bf16, fp32).
        rel_h: (B|1, H|1, Nq, kh); rel_w: (B|1, H|1, Nq, kw), kw <= 128; any float dtype and strides.
        dropout_p: probability of dropping an attention weight; seed: Philox seed (int).
        scale: softmax scale.
    Returns:
        out (B, H, Nq, D) in a (B, Nq, H, D) buffer; lse (2, B, H, Nq) fp32: each row's max score m (-inf for a
        row with no visible key) and log(sum(exp(s - m))) (0 then).
    """
    q, k, v = int32_head_offsets(q, k, v)
    B, H, Nq, D = q.shape
    kh, kw = rel_h.shape[3], rel_w.shape[3]
    out = _bnhd_empty(B, H, Nq, D, q)
    lse = torch.empty((2, B, H, Nq), dtype=torch.float32, device=q.device)
    seed, thresh, dscale = _dropout_args(dropout_p, seed)
    block_d, kw_pad = _block_d(D), triton.next_power_of_2(kw)
    args = (q, k, v, rel_h, rel_w, out, lse, *q.stride(), *k.stride(), *v.stride(), *_strides4(rel_h, B, H),
            *_strides4(rel_w, B, H), *out.stride(), lse.stride(0), H, Nq, kh, kw, D, scale, seed, thresh, dscale,
            tune_bucket(Nq), tune_bucket(kh * kw))
    consts = dict(HAS_DROPOUT=dropout_p > 0, PRECISION=dot_precision(q), DOT_UPCAST=upcast_bf16(q),
                  BLOCK_KW=kw_pad, BLOCK_D=block_d)
    if not compiled(q):
        grid = (triton.cdiv(Nq, _INTERPRET_BLOCK) * B * H,)
        launch(_rel_pos_attention_fwd_kernel, grid, *args, **consts, BLOCK_M=_INTERPRET_BLOCK,
               BLOCK_KROWS=_krows(_INTERPRET_BLOCK, kw_pad))
    else:
        grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
        launch(_fwd_autotuned(block_d, kw_pad, q.dtype == torch.float32), grid, *args, **consts)
    return out, lse


def rel_pos_attention_bwd(dout, q, k, v, rel_h, rel_w, out, lse, dropout_p, seed, scale):
    """Launches the backward kernels.

    Args:
        dout, out: (B, H, Nq, D); q, k, v, rel_h, rel_w, dropout_p, seed, scale: as in `rel_pos_attention_fwd`;
            lse: its (2, B, H, Nq) output.
    Returns:
        dq, dk, dv like q, k, v (in (B, N, H, D) buffers); drel_h, drel_w in the shapes and dtypes of rel_h and
        rel_w (summed over their broadcast dims).
    """
    dout, q, k, v, out = int32_head_offsets(dout, q, k, v, out)
    B, H, Nq, D = q.shape
    kh, kw = rel_h.shape[3], rel_w.shape[3]
    Nk = kh * kw
    lse = lse.contiguous()
    block_d, kw_pad = _block_d(D), triton.next_power_of_2(kw)
    if not compiled(q):
        dkdv_config = dq_config = dict(BLOCK_M=_INTERPRET_BLOCK, BLOCK_KROWS=_krows(_INTERPRET_BLOCK, kw_pad))
    else:
        dkdv_config, dq_config = ({"BLOCK_M": m, "BLOCK_KROWS": _krows(n, kw_pad), "num_warps": w, "num_stages": s}
                                  for m, n, w, s in (_BWD_CONFIGS_FP32 if q.dtype == torch.float32 else {}).get(
                                      block_d, _BWD_CONFIGS[block_d]))
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    launch(_attention_bwd_preprocess_kernel, (triton.cdiv(Nq, dq_config["BLOCK_M"]) * B * H,), out, dout, delta,
           *out.stride(), *dout.stride(), H, Nq, D, BLOCK_M=dq_config["BLOCK_M"], BLOCK_D=block_d)

    seed, thresh, dscale = _dropout_args(dropout_p, seed)
    dq, dk, dv = _bnhd_empty(B, H, Nq, D, q), _bnhd_empty(B, H, Nk, D, k), _bnhd_empty(B, H, Nk, D, v)
    drel_h = torch.empty((B, H, Nq, kh), dtype=torch.float32, device=q.device)
    drel_w = torch.empty((B, H, Nq, kw), dtype=torch.float32, device=q.device)
    rel_strides = (*_strides4(rel_h, B, H), *_strides4(rel_w, B, H))
    common = dict(HAS_DROPOUT=dropout_p > 0, PRECISION=dot_precision(q), DOT_UPCAST=upcast_bf16(q),
                  BLOCK_KW=kw_pad, BLOCK_D=block_d)
    launch(
        _rel_pos_attention_bwd_dkdv_kernel, (triton.cdiv(kh, dkdv_config["BLOCK_KROWS"]) * B * H,),
        q, k, v, rel_h, rel_w, dout, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *rel_strides, *dout.stride(), *dk.stride(), *dv.stride(), lse.stride(0),
        H, Nq, kh, kw, D, scale, seed, thresh, dscale, **common, **dkdv_config)
    launch(
        _rel_pos_attention_bwd_dq_kernel, (triton.cdiv(Nq, dq_config["BLOCK_M"]) * B * H,),
        q, k, v, rel_h, rel_w, dout, lse, delta, dq, drel_h, drel_w,
        *q.stride(), *k.stride(), *v.stride(), *rel_strides, *dout.stride(), *dq.stride(), lse.stride(0),
        H, Nq, kh, kw, D, scale, seed, thresh, dscale, **common, **dq_config)
    return (dq, dk, dv, drel_h.sum_to_size(rel_h.shape).to(rel_h.dtype),
            drel_w.sum_to_size(rel_w.shape).to(rel_w.dtype))
