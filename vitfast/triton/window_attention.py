"""Fused (shifted) window attention, forward and backward, in Triton.

Window multi-head self-attention with relative position bias (Swin Transformer, Liu et al. 2021,
arXiv:2103.14030; Swin-V2 cosine attention with a learned per-head logit scale, Liu et al. 2022,
arXiv:2111.09883), computed with the tiled online softmax of FlashAttention (Dao et al. 2022,
arXiv:2205.14135) so that no (windows, heads, N, N) tensor is ever stored.

Everything Swin does around the attention product is index arithmetic here:
- the cyclic shift and the window partition: token t = (ty, tx) of window (wy, wx) reads the pixel
  ((wy*wh + ty + shift_h) mod Hp, (wx*ww + tx + shift_w) mod Wp) of the padded grid straight from the
  (B, H, W, 3, heads, D) qkv projection, and the output goes back to the same pixel (un-shifted, un-padded);
- the padding: pixels at or past (H, W) take the qkv value of a zero input token, i.e. the qkv bias
  (PAD, or zero without one), exactly what padding the input before the qkv Linear gives;
- the relative position bias: table[(ty_i - ty_j + wh - 1) * (2 ww - 1) + (tx_i - tx_j + ww - 1), head],
  gathered inside the kernel (or a dense (heads, N, N) bias read as is);
- the shift mask: each token's region id (3 per axis: [0, P - w), [P - w, P - s), [P - s, P) of the
  shifted coordinate) is computed in the kernel, and pairs of different regions get -100, as in Swin.

A program owns whole windows (`windows_per_program` consecutive windows) of one (batch, head); the grid is
1-D over (batch*head, window group), so no grid dimension limit of 65535 applies. The backward needs no
atomics: pass A walks key tiles (dk, dv), pass B query tiles (dq); with a single tile per window
(N <= BLOCK: see `_config`) one pass does all three. Parameter gradients are two-stage
reductions: each program writes fp32 partials (dS summed over its windows as an (N, N) tile, the
padding tokens' dk/dv, the cosine logit-scale gradient), and a second pass in PyTorch sums them over
programs and folds the (N, N) bias gradient onto the table rows (fold_bias_grad: plain sums, deterministic).
"""

import torch
import triton
import triton.language as tl

from vitfast.ops.window_attention import fold_bias_grad
from vitfast.triton.attention import _dropout_args, _dropout_keep
from vitfast.triton.common import compiled, dot, dot_precision, launch, num_sms, unit_inner_stride, upcast_bf16


@triton.jit
def _tokens(w, start, N, nWw, H, W, Hp, Wp, win_h, win_w, shift_h, shift_w, BLOCK: tl.constexpr):
    """Tokens start..start+BLOCK of window w: in-window mask, real-pixel mask, coords, region id, pixel."""
    t = start + tl.arange(0, BLOCK)
    in_win = t < N
    ty = t // win_w
    tx = t % win_w
    py = (w // nWw) * win_h + ty  # coordinate in the shifted, padded grid
    px = (w % nWw) * win_w + tx
    sy = (py + shift_h) % Hp  # source pixel
    sx = (px + shift_w) % Wp
    real = in_win & (sy < H) & (sx < W)
    region = ((py >= Hp - win_h).to(tl.int32) + (py >= Hp - shift_h).to(tl.int32)) * 3 \
        + (px >= Wp - win_w).to(tl.int32) + (px >= Wp - shift_w).to(tl.int32)
    return t, in_win, real, ty, tx, region, sy.to(tl.int64), sx.to(tl.int64)


@triton.jit
def _load_tokens(X, PAD, base, sy, sx, real, in_win, s_h, s_w, pad_off, D, HAS_PAD: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """(BLOCK, BLOCK_D) rows of q, k or v; padding pixels get PAD (the qkv of a zero token) or zero."""
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    x = tl.load(X + base + (sy * s_h + sx * s_w)[:, None] + d[None, :], mask=real[:, None] & dmask[None, :],
                other=0.0)
    if HAS_PAD:
        pad = tl.load(PAD + pad_off + d, mask=dmask, other=0.0).to(x.dtype)
        x = tl.where((in_win & ~real)[:, None], pad[None, :], x)
    return x


@triton.jit
def _l2_normalize(x):
    """F.normalize(x, dim=-1) in fp32: returns x / max(|x|, eps) and max(|x|, eps)."""
    xf = x.to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(xf * xf, axis=1)), 1e-12)
    return xf / norm[:, None], norm


@triton.jit
def _load_key(QKV, PAD, base, sy, sx, real, in_win, s_h, s_w, pad_off, D, HAS_PAD: tl.constexpr,
              COSINE: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (BLOCK, BLOCK_D) key tile as the scores take it: L2-normalized and cast back to the input dtype for cosine
    attention (Swin-V2). (The backward's key-outer pass, which also needs the norms, normalizes itself.)"""
    k = _load_tokens(QKV, PAD, base, sy, sx, real, in_win, s_h, s_w, pad_off, D, HAS_PAD, BLOCK_D)
    if COSINE:
        kn, k_norm = _l2_normalize(k)
        k = kn.to(QKV.dtype.element_ty)
    return k


@triton.jit
def _l2_normalize_bwd(dxn, xn, norm):
    """Gradient through x / max(|x|, eps), given dxn (fp32), xn = the normalized x and norm = max(|x|, eps)."""
    dxn_xn = tl.sum(dxn * xn, axis=1)
    # Where |x| < eps the denominator is the constant eps: no projection term.
    proj = tl.where(norm > 1e-12, dxn_xn, 0.0)
    return (dxn - xn * proj[:, None]) / norm[:, None]


@triton.jit
def _scores(q, k, scale, BIAS, bias_base, s_b0, s_b1, s_b2, t_i, in_i, ty_i, tx_i, reg_i, t_j, in_j, ty_j, tx_j,
            reg_j, win_h, win_w, DENSE_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr,
            UPCAST_DOT: tl.constexpr):
    """Returns (qk, s): the raw q.k^T product (fp32) and the scores scale*qk + bias (+ mask), -inf off-window."""
    qk = dot(q, tl.trans(k), DOT_PREC, UPCAST_DOT)
    valid = in_i[:, None] & in_j[None, :]
    if DENSE_BIAS:
        boff = t_i[:, None] * s_b1 + t_j[None, :] * s_b2
    else:
        rel = (ty_i[:, None] - ty_j[None, :] + win_h - 1) * (2 * win_w - 1) \
            + (tx_i[:, None] - tx_j[None, :] + win_w - 1)
        boff = rel * s_b0
    bias = tl.load(BIAS + bias_base + boff, mask=valid, other=0.0).to(tl.float32)
    s = qk * scale + bias
    if HAS_MASK:
        s = tl.where(reg_i[:, None] != reg_j[None, :], s + -100.0, s)
    s = tl.where(in_j[None, :], s, float("-inf"))
    return qk, s


@triton.jit
def _row_stats(QKV, PAD, BIAS, q, scale, q_base, bias_base, s_qh, s_qw, s_q3, s_b0, s_b1, s_b2, h, heads, D, w, N,
               nWw, H, W, Hp, Wp, win_h, win_w, shift_h, shift_w, t_i, in_i, ty_i, tx_i, reg_i,
               HAS_PAD: tl.constexpr, DENSE_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, COSINE: tl.constexpr,
               DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
               N_TILES: tl.constexpr):
    """Each query row's score max m and 1 / l (l = sum_j exp(s_j - m)) over its whole window, recomputed as the
    forward computes them: the backward's P = exp(s - m) / l where the saved m + log(l) has lost log(l)."""
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK,), dtype=tl.float32)
    for jt in range(N_TILES):
        t_j, in_j, real_j, ty_j, tx_j, reg_j, sy_j, sx_j = _tokens(
            w, jt * BLOCK, N, nWw, H, W, Hp, Wp, win_h, win_w, shift_h, shift_w, BLOCK)
        k = _load_key(QKV, PAD, q_base + s_q3, sy_j, sx_j, real_j, in_j, s_qh, s_qw, (heads + h) * D, D, HAS_PAD,
                      COSINE, BLOCK_D)
        qk, s = _scores(q, k, scale, BIAS, bias_base, s_b0, s_b1, s_b2, t_i, in_i, ty_i, tx_i, reg_i,
                        t_j, in_j, ty_j, tx_j, reg_j, win_h, win_w, DENSE_BIAS, HAS_MASK, DOT_PREC, UPCAST_DOT)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    return m, 1.0 / l


@triton.jit
def _keep(seed, win_base, t_i, t_j, N, dropout_thresh):
    """Attention-dropout keep mask of window pairs (i, j): the attention kernels' Philox draw on the score's offset
    (win_base + i) * N + j in (B, heads, nW, N, N), as the other backends (vitfast.ops.attention.dropout_keep_ref)."""
    return _dropout_keep(seed, 0, win_base + t_i.to(tl.int64), t_j, N, N, dropout_thresh)


@triton.jit
def _program(SCALE, s_qb, s_qn, s_b0, s_b1, heads, nW, sm_scale, windows_per_program, DENSE_BIAS: tl.constexpr,
             COSINE: tl.constexpr):
    """What a forward or statistics program works on: (batch * head bh, b, head h, q's offset, the bias's head
    offset, the score scale, its windows [w_start, w_end)). Programs run over (bh, group of windows_per_program)."""
    groups = tl.cdiv(nW, windows_per_program)
    pid = tl.program_id(0)
    bh = (pid // groups).to(tl.int64)
    g = pid % groups  # int32: the window index arithmetic stays 32-bit
    b = bh // heads
    h = bh % heads
    if DENSE_BIAS:
        bias_base = h * s_b0
    else:
        bias_base = h * s_b1
    if COSINE:
        scale = tl.load(SCALE + h)
    else:
        scale = sm_scale
    w_start = g * windows_per_program
    return bh, b, h, b * s_qb + h * s_qn, bias_base, scale, w_start, tl.minimum(w_start + windows_per_program, nW)


@triton.jit
def _window_attn_fwd_kernel(
    QKV,  # (B, H, W, 3, heads, D), strides (s_qb, s_qh, s_qw, s_q3, s_qn, 1)
    PAD,  # (3, heads, D) contiguous: q, k, v of a padding pixel (unused without HAS_PAD)
    BIAS,  # (num_rel, heads) table, strides (s_b0, s_b1); or (heads, N, N) dense, strides (s_b0, s_b1, s_b2)
    SCALE,  # (heads,) fp32 cosine logit scale (unused without COSINE)
    OUT,  # (B, H, W, heads, D) contiguous out
    LSE,  # (B, heads, nW, N) fp32 out: log-sum-exp of each score row
    s_qb, s_qh, s_qw, s_q3, s_qn,
    s_b0, s_b1, s_b2,
    heads, H, W, Hp, Wp, nWw, nW, N, D,
    win_h, win_w, shift_h, shift_w,
    sm_scale, seed, dropout_thresh, dropout_scale, windows_per_program,
    HAS_PAD: tl.constexpr,
    DENSE_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    COSINE: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    N_TILES: tl.constexpr,
):
    bh, b, h, q_base, bias_base, scale, w_start, w_end = _program(SCALE, s_qb, s_qn, s_b0, s_b1, heads, nW, sm_scale,
                                                                  windows_per_program, DENSE_BIAS, COSINE)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    for w in range(w_start, w_end):
        win_base = (bh * nW + w) * N
        for it in range(N_TILES):
            t_i, in_i, real_i, ty_i, tx_i, reg_i, sy_i, sx_i = _tokens(
                w, it * BLOCK, N, nWw, H, W, Hp, Wp, win_h, win_w, shift_h, shift_w, BLOCK)
            q = _load_tokens(QKV, PAD, q_base, sy_i, sx_i, real_i, in_i, s_qh, s_qw, h * D, D, HAS_PAD, BLOCK_D)
            if COSINE:
                qn, q_norm = _l2_normalize(q)
                q = qn.to(QKV.dtype.element_ty)
            m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
            l = tl.zeros((BLOCK,), dtype=tl.float32)
            acc = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
            for jt in range(N_TILES):
                t_j, in_j, real_j, ty_j, tx_j, reg_j, sy_j, sx_j = _tokens(
                    w, jt * BLOCK, N, nWw, H, W, Hp, Wp, win_h, win_w, shift_h, shift_w, BLOCK)
                k = _load_key(QKV, PAD, q_base + s_q3, sy_j, sx_j, real_j, in_j, s_qh, s_qw, (heads + h) * D, D,
                              HAS_PAD, COSINE, BLOCK_D)
                v = _load_tokens(QKV, PAD, q_base + 2 * s_q3, sy_j, sx_j, real_j, in_j, s_qh, s_qw,
                                 (2 * heads + h) * D, D, HAS_PAD, BLOCK_D)
                qk, s = _scores(q, k, scale, BIAS, bias_base, s_b0, s_b1, s_b2, t_i, in_i, ty_i, tx_i, reg_i,
                               t_j, in_j, ty_j, tx_j, reg_j, win_h, win_w, DENSE_BIAS, HAS_MASK, DOT_PREC, UPCAST_DOT)
                m_new = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                if DROPOUT:
                    p = tl.where(_keep(seed, win_base, t_i, t_j, N, dropout_thresh), p, 0.0)
                acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PREC, UPCAST_DOT)
                m = m_new
            out = acc / l[:, None]
            if DROPOUT:
                out = out * dropout_scale
            o_off = ((b * H + sy_i) * W + sx_i) * (heads * D) + h * D
            tl.store(OUT + o_off[:, None] + d[None, :], out.to(OUT.dtype.element_ty),
                     mask=real_i[:, None] & dmask[None, :])
            tl.store(LSE + win_base + t_i, m + tl.log(l), mask=in_i)


@triton.jit
def _window_attn_stats_kernel(
    QKV, PAD, BIAS, SCALE,  # as in the forward
    LSE,  # (B, heads, nW, N) fp32: the forward's log-sum-exp m + log(l)
    STATS,  # (2, B, heads, nW, N) fp32 out: (m, 1 / l), P = exp(s - m) / l
    s_qb, s_qh, s_qw, s_q3, s_qn,
    s_b0, s_b1, s_b2,
    heads, H, W, Hp, Wp, nWw, nW, N, D,
    win_h, win_w, shift_h, shift_w,
    sm_scale, windows_per_program, stats_plane,
    HAS_PAD: tl.constexpr,
    DENSE_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    COSINE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    N_TILES: tl.constexpr,
):
    """The softmax statistics the backward of a window of several tiles rebuilds P from: (lse, 1) for each row,
    except in a tile where some row's |lse| >= 2^8, whose rounding (|lse| * 2^-24) would exceed 2^-16 of P (a bias
    near torch.finfo.min loses log(l) entirely): there (m, 1 / l) recomputed over the window's keys (_row_stats),
    so finite scores of any magnitude stay plain arithmetic; other tiles only copy."""
    bh, b, h, q_base, bias_base, scale, w_start, w_end = _program(SCALE, s_qb, s_qn, s_b0, s_b1, heads, nW, sm_scale,
                                                                  windows_per_program, DENSE_BIAS, COSINE)
    for w in range(w_start, w_end):
        win_base = (bh * nW + w) * N
        for it in range(N_TILES):
            t_i, in_i, real_i, ty_i, tx_i, reg_i, sy_i, sx_i = _tokens(
                w, it * BLOCK, N, nWw, H, W, Hp, Wp, win_h, win_w, shift_h, shift_w, BLOCK)
            m = tl.load(LSE + win_base + t_i, mask=in_i, other=0.0)
            inv_l = tl.full((BLOCK,), 1.0, dtype=tl.float32)
            if tl.max(tl.abs(m), axis=0) >= 256.0:
                q = _load_tokens(QKV, PAD, q_base, sy_i, sx_i, real_i, in_i, s_qh, s_qw, h * D, D, HAS_PAD, BLOCK_D)
                if COSINE:
                    qn, q_norm = _l2_normalize(q)
                    q = qn.to(QKV.dtype.element_ty)
                m, inv_l = _row_stats(QKV, PAD, BIAS, q, scale, q_base, bias_base, s_qh, s_qw, s_q3, s_b0, s_b1,
                                      s_b2, h, heads, D, w, N, nWw, H, W, Hp, Wp, win_h, win_w, shift_h, shift_w,
                                      t_i, in_i, ty_i, tx_i, reg_i, HAS_PAD, DENSE_BIAS, HAS_MASK, COSINE, DOT_PREC,
                                      UPCAST_DOT, BLOCK, BLOCK_D, N_TILES)
            tl.store(STATS + win_base + t_i, m, mask=in_i)
            tl.store(STATS + stats_plane + win_base + t_i, inv_l, mask=in_i)


@triton.jit
def _window_attn_bwd_kernel(
    QKV,  # (B, H, W, 3, heads, D), strides (s_qb, s_qh, s_qw, s_q3, s_qn, 1)
    PAD,  # (3, heads, D) contiguous (unused without HAS_PAD)
    BIAS,  # (num_rel, heads) table or (heads, N, N) dense, as in the forward
    SCALE,  # (heads,) fp32 (unused without COSINE)
    DO,  # (B, H, W, heads, D) contiguous: gradient of the output
    LSE,  # (B, heads, nW, N) fp32; with N_TILES > 1, (2, B, heads, nW, N): _window_attn_stats_kernel's (m, 1 / l)
    DELTA,  # (B, H, W, heads) fp32: rowsum(dO * O)
    DQKV,  # (B, H, W, 3, heads, D) contiguous out
    DBIAS_P,  # (B * heads * programs_per_bh, N, N) fp32 out: dS summed over each program's windows
    DPAD_P,  # (B * heads * programs_per_bh, 2, BLOCK_D) fp32 out: dk, dv summed over padding tokens
    DSCALE_P,  # (B * heads * programs_per_bh,) fp32 out: sum of dS * cos (unused without COSINE)
    s_qb, s_qh, s_qw, s_q3, s_qn,
    s_b0, s_b1, s_b2,
    heads, H, W, Hp, Wp, nWw, nW, N, D,
    win_h, win_w, shift_h, shift_w,
    sm_scale, seed, dropout_thresh, dropout_scale, windows_per_program, stats_plane,
    HAS_PAD: tl.constexpr,
    DENSE_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    COSINE: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    N_TILES: tl.constexpr,
):
    groups = tl.cdiv(nW, windows_per_program)
    pid = tl.program_id(0)
    prog = pid.to(tl.int64)  # = bh * groups + g: the row of this program's partials
    bh = prog // groups
    g = pid % groups  # int32: the window index arithmetic stays 32-bit
    b = bh // heads
    h = bh % heads
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    dtype = QKV.dtype.element_ty
    q_base = b * s_qb + h * s_qn
    if DENSE_BIAS:
        bias_base = h * s_b0
    else:
        bias_base = h * s_b1
    dq_base = h * D  # DQKV is contiguous; the pixel index below includes the batch
    if COSINE:
        scale = tl.load(SCALE + h)
    else:
        scale = sm_scale
    rows = tl.arange(0, BLOCK)
    dbias_acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # used when N_TILES == 1
    dpad_k = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dpad_v = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dscale = tl.zeros((BLOCK,), dtype=tl.float32)  # per query row, summed at the end
    w_start = g * windows_per_program
    w_end = tl.minimum(w_start + windows_per_program, nW)
    for w in range(w_start, w_end):
        win_base = (bh * nW + w) * N
        # Pass A: key tiles outer -> dk, dv (and dq too when the window is one tile).
        for jt in range(N_TILES):
            t_j, in_j, real_j, ty_j, tx_j, reg_j, sy_j, sx_j = _tokens(
                w, jt * BLOCK, N, nWw, H, W, Hp, Wp, win_h, win_w, shift_h, shift_w, BLOCK)
            k = _load_tokens(QKV, PAD, q_base + s_q3, sy_j, sx_j, real_j, in_j, s_qh, s_qw, (heads + h) * D, D,
                             HAS_PAD, BLOCK_D)
            v = _load_tokens(QKV, PAD, q_base + 2 * s_q3, sy_j, sx_j, real_j, in_j, s_qh, s_qw,
                             (2 * heads + h) * D, D, HAS_PAD, BLOCK_D)
            if COSINE:
                kn, k_norm = _l2_normalize(k)
                k = kn.to(dtype)
            dk = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
            dv = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
            for it in range(N_TILES):
                t_i, in_i, real_i, ty_i, tx_i, reg_i, sy_i, sx_i = _tokens(
                    w, it * BLOCK, N, nWw, H, W, Hp, Wp, win_h, win_w, shift_h, shift_w, BLOCK)
                q = _load_tokens(QKV, PAD, q_base, sy_i, sx_i, real_i, in_i, s_qh, s_qw, h * D, D, HAS_PAD,
                                 BLOCK_D)
                if COSINE:
                    qn, q_norm = _l2_normalize(q)
                    q = qn.to(dtype)
                pix_i = (b * H + sy_i) * W + sx_i
                do = tl.load(DO + (pix_i * (heads * D) + h * D)[:, None] + d[None, :],
                             mask=real_i[:, None] & dmask[None, :], other=0.0).to(dtype)
                if N_TILES > 1:
                    lse = tl.load(LSE + win_base + t_i, mask=in_i, other=0.0)
                    inv_l = tl.load(LSE + stats_plane + win_base + t_i, mask=in_i, other=1.0)
                    delta = tl.load(DELTA + pix_i * heads + h, mask=real_i, other=0.0)
                qk, s = _scores(q, k, scale, BIAS, bias_base, s_b0, s_b1, s_b2, t_i, in_i, ty_i, tx_i, reg_i,
                                t_j, in_j, ty_j, tx_j, reg_j, win_h, win_w, DENSE_BIAS, HAS_MASK, DOT_PREC, UPCAST_DOT)
                if N_TILES == 1:
                    # The whole row is here: normalize as softmax does; exp(s - lse) would carry the rounding of
                    # lse, ~|lse| ulps, which the cancellation in the logit-scale gradient amplifies.
                    p = tl.exp(s - tl.max(s, axis=1)[:, None])
                    p = p / tl.sum(p, axis=1)[:, None]
                else:
                    p = tl.exp(s - lse[:, None]) * inv_l[:, None]
                p = tl.where(in_i[:, None] & in_j[None, :], p, 0.0)
                dp = dot(do, tl.trans(v), DOT_PREC, UPCAST_DOT)
                if DROPOUT:
                    keep = _keep(seed, win_base, t_i, t_j, N, dropout_thresh)
                    pd = tl.where(keep, p * dropout_scale, 0.0)
                    dp = tl.where(keep, dp * dropout_scale, 0.0)
                else:
                    pd = p
                dv += dot(tl.trans(pd.to(dtype)), do, DOT_PREC, UPCAST_DOT)
                if N_TILES == 1:
                    # delta = sum_j P dP, consistent with this P (dO.O would carry the rounding of the stored O).
                    delta = tl.sum(p * dp, axis=1)
                ds = p * (dp - delta[:, None])
                if COSINE:
                    dscale += tl.sum(ds * qk, axis=1)
                dk += dot(tl.trans((ds * scale).to(dtype)), q, DOT_PREC, UPCAST_DOT)
                if N_TILES == 1:
                    dbias_acc += ds
                    dq = dot((ds * scale).to(dtype), k, DOT_PREC, UPCAST_DOT)
                    if COSINE:
                        dq = _l2_normalize_bwd(dq, qn, q_norm)
                    tl.store(DQKV + dq_base + (pix_i * (3 * heads * D))[:, None] + d[None, :], dq.to(dtype),
                             mask=real_i[:, None] & dmask[None, :])
                else:
                    # This program owns the window, so the read-modify-write of its (N, N) partial is race-free.
                    p_ptr = DBIAS_P + prog * N * N + t_i[:, None] * N + t_j[None, :]
                    p_mask = in_i[:, None] & in_j[None, :]
                    tl.store(p_ptr, tl.load(p_ptr, mask=p_mask, other=0.0) + ds, mask=p_mask)
            if COSINE:
                dk = _l2_normalize_bwd(dk, kn, k_norm)
            pix_j = (b * H + sy_j) * W + sx_j
            kv_ptr = DQKV + dq_base + (pix_j * (3 * heads * D))[:, None] + d[None, :]
            kv_mask = real_j[:, None] & dmask[None, :]
            tl.store(kv_ptr + heads * D, dk.to(dtype), mask=kv_mask)
            tl.store(kv_ptr + 2 * heads * D, dv.to(dtype), mask=kv_mask)
            is_pad = (in_j & ~real_j)[:, None]
            dpad_k += tl.sum(tl.where(is_pad, dk, 0.0), axis=0)
            dpad_v += tl.sum(tl.where(is_pad, dv, 0.0), axis=0)
        # Pass B (several tiles per window): query tiles outer -> dq.
        if N_TILES > 1:
            for it in range(N_TILES):
                t_i, in_i, real_i, ty_i, tx_i, reg_i, sy_i, sx_i = _tokens(
                    w, it * BLOCK, N, nWw, H, W, Hp, Wp, win_h, win_w, shift_h, shift_w, BLOCK)
                q = _load_tokens(QKV, PAD, q_base, sy_i, sx_i, real_i, in_i, s_qh, s_qw, h * D, D, HAS_PAD,
                                 BLOCK_D)
                if COSINE:
                    qn, q_norm = _l2_normalize(q)
                    q = qn.to(dtype)
                pix_i = (b * H + sy_i) * W + sx_i
                do = tl.load(DO + (pix_i * (heads * D) + h * D)[:, None] + d[None, :],
                             mask=real_i[:, None] & dmask[None, :], other=0.0).to(dtype)
                lse = tl.load(LSE + win_base + t_i, mask=in_i, other=0.0)
                inv_l = tl.load(LSE + stats_plane + win_base + t_i, mask=in_i, other=1.0)
                delta = tl.load(DELTA + pix_i * heads + h, mask=real_i, other=0.0)
                dq = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
                for jt in range(N_TILES):
                    t_j, in_j, real_j, ty_j, tx_j, reg_j, sy_j, sx_j = _tokens(
                        w, jt * BLOCK, N, nWw, H, W, Hp, Wp, win_h, win_w, shift_h, shift_w, BLOCK)
                    k = _load_key(QKV, PAD, q_base + s_q3, sy_j, sx_j, real_j, in_j, s_qh, s_qw,
                                  (heads + h) * D, D, HAS_PAD, COSINE, BLOCK_D)
                    v = _load_tokens(QKV, PAD, q_base + 2 * s_q3, sy_j, sx_j, real_j, in_j, s_qh, s_qw,
                                     (2 * heads + h) * D, D, HAS_PAD, BLOCK_D)
                    qk, s = _scores(q, k, scale, BIAS, bias_base, s_b0, s_b1, s_b2, t_i, in_i, ty_i, tx_i, reg_i,
                                   t_j, in_j, ty_j, tx_j, reg_j, win_h, win_w, DENSE_BIAS, HAS_MASK, DOT_PREC,
                                   UPCAST_DOT)
                    p = tl.where(in_i[:, None] & in_j[None, :], tl.exp(s - lse[:, None]) * inv_l[:, None], 0.0)
                    dp = dot(do, tl.trans(v), DOT_PREC, UPCAST_DOT)
                    if DROPOUT:
                        keep = _keep(seed, win_base, t_i, t_j, N, dropout_thresh)
                        dp = tl.where(keep, dp * dropout_scale, 0.0)
                    ds = p * (dp - delta[:, None])
                    dq += dot((ds * scale).to(dtype), k, DOT_PREC, UPCAST_DOT)
                if COSINE:
                    dq = _l2_normalize_bwd(dq, qn, q_norm)
                tl.store(DQKV + dq_base + (pix_i * (3 * heads * D))[:, None] + d[None, :], dq.to(dtype),
                         mask=real_i[:, None] & dmask[None, :])
    if N_TILES == 1:
        p_mask = (rows < N)[:, None] & (rows < N)[None, :]
        tl.store(DBIAS_P + prog * N * N + rows[:, None] * N + rows[None, :], dbias_acc, mask=p_mask)
    tl.store(DPAD_P + prog * 2 * BLOCK_D + d, dpad_k)
    tl.store(DPAD_P + prog * 2 * BLOCK_D + BLOCK_D + d, dpad_v)
    if COSINE:
        tl.store(DSCALE_P + prog, tl.sum(dscale, axis=0))


def _config(n: int, d: int, dtype: torch.dtype, backward: bool, cosine: bool) -> tuple:
    """(BLOCK, BLOCK_D, N_TILES, num_warps, num_stages) for windows of n tokens and head dim d.

    Token tiles of BLOCK x BLOCK_D <= 4096 elements, BLOCK <= 64 in the forward and <= 32 in the backward, whose
    one-tile path keeps five (BLOCK, BLOCK) fp32 tiles live and spills at 64 (Swin's N = 49 then takes two tiles);
    except for cosine attention, whose logit-scale gradient needs the one-tile path's exactly normalized softmax
    (exp(s - lse) carries lse's rounding into a sum with heavy cancellation), so windows of up to 64 tokens stay one
    tile there. 8 warps, and loads multi-buffered across windows only in the 16-bit forward. Compiled for sm_90
    (scripts/compile_triton.py), this fits in shared memory for every head dim up to 256 in fp32 and 16 bits (the
    largest, fp32 D=256 backward, 64 KiB of 227) and does not spill at Swin's D=32 in 16 bits without cosine.
    """
    block_d = max(16, triton.next_power_of_2(d))
    block = 32 if backward and not cosine else 64
    block = max(16, min(block, 4096 // block_d, triton.next_power_of_2(n)))
    stages = 1 if backward or dtype == torch.float32 else 3
    return block, block_d, triton.cdiv(n, block), 8, stages


def _windows_per_program(x: torch.Tensor, n_windows: int, batch_heads: int) -> int:
    if not compiled(x):
        return n_windows  # the interpreter runs programs one after another: fewer, longer ones are cheaper
    groups = max(1, min(n_windows, triton.cdiv(8 * num_sms(x), batch_heads)))
    return triton.cdiv(n_windows, triton.cdiv(n_windows, groups))


def _geometry(qkv, window_size, shift_size):
    B, H, W, _, heads, D = qkv.shape
    wh, ww = window_size
    Hp, Wp = triton.cdiv(H, wh) * wh, triton.cdiv(W, ww) * ww
    return B, H, W, heads, D, wh, ww, Hp, Wp, Hp // wh, Wp // ww


def _layouts(qkv, pad_qkv, logit_scale):
    """The layouts the kernels index by: qkv with unit inner stride (any other strides), pad_qkv and logit_scale
    contiguous; each copied only where it differs (the public functions already pass these)."""
    qkv = unit_inner_stride(qkv)
    return qkv, *(t.contiguous() if t is not None else None for t in (pad_qkv, logit_scale))


def _bias_strides(bias):
    return (bias.stride(0), bias.stride(1), bias.stride(2)) if bias.dim() == 3 else (bias.stride(0), bias.stride(1), 0)


def window_attention_fwd(qkv, bias, pad_qkv, logit_scale, window_size, shift_size, softmax_scale, dropout_p, seed):
    """Launches the forward kernel. Arguments and results as the op `vitfast::window_attention` (qkv copied unless
    its inner stride is 1, pad_qkv and logit_scale unless contiguous)."""
    qkv, pad_qkv, logit_scale = _layouts(qkv, pad_qkv, logit_scale)
    B, H, W, heads, D, wh, ww, Hp, Wp, nWh, nWw = _geometry(qkv, window_size, shift_size)
    nW, N = nWh * nWw, wh * ww
    out = torch.empty((B, H, W, heads * D), dtype=qkv.dtype, device=qkv.device)  # (B, H, W, heads, D) in memory
    lse = torch.empty((B, heads, nW, N), dtype=torch.float32, device=qkv.device)
    block, block_d, n_tiles, warps, stages = _config(N, D, qkv.dtype, backward=False, cosine=logit_scale is not None)
    wpp = _windows_per_program(qkv, nW, B * heads)
    launch(
        _window_attn_fwd_kernel, (B * heads * triton.cdiv(nW, wpp),),
        qkv, pad_qkv if pad_qkv is not None else qkv, bias, logit_scale if logit_scale is not None else lse, out, lse,
        *qkv.stride()[:5], *_bias_strides(bias),
        heads, H, W, Hp, Wp, nWw, nW, N, D, wh, ww, shift_size[0], shift_size[1],
        softmax_scale, *_dropout_args(dropout_p, seed), wpp,
        HAS_PAD=pad_qkv is not None, DENSE_BIAS=bias.dim() == 3, HAS_MASK=shift_size[0] + shift_size[1] > 0,
        COSINE=logit_scale is not None, DROPOUT=dropout_p > 0, DOT_PREC=dot_precision(qkv),
        UPCAST_DOT=upcast_bf16(qkv),
        BLOCK=block, BLOCK_D=block_d, N_TILES=n_tiles, num_warps=warps, num_stages=stages,
    )
    return out, lse


def window_attention_bwd(dout, qkv, bias, pad_qkv, logit_scale, out, lse, window_size, shift_size, softmax_scale,
                         dropout_p, seed):
    """Launches the statistics kernel (windows of several tiles), the backward kernel and the reductions. Results as
    `vitfast::window_attention_backward` (layouts as in `window_attention_fwd`; lse copied when not contiguous)."""
    qkv, pad_qkv, logit_scale = _layouts(qkv, pad_qkv, logit_scale)
    lse = lse.contiguous()
    B, H, W, heads, D, wh, ww, Hp, Wp, nWh, nWw = _geometry(qkv, window_size, shift_size)
    nW, N = nWh * nWw, wh * ww
    block, block_d, n_tiles, warps, stages = _config(N, D, qkv.dtype, backward=True, cosine=logit_scale is not None)
    wpp = _windows_per_program(qkv, nW, B * heads)
    groups = triton.cdiv(nW, wpp)
    dout = dout.reshape(B, H, W, heads, D).contiguous()
    delta = (dout.float() * out.reshape(B, H, W, heads, D).float()).sum(-1) if n_tiles > 1 else lse
    dqkv = torch.empty((B, H, W, 3, heads, D), dtype=qkv.dtype, device=qkv.device)
    programs = B * heads * groups
    alloc = torch.zeros if n_tiles > 1 else torch.empty
    dbias_p = alloc((programs, N, N), dtype=torch.float32, device=qkv.device)
    dpad_p = torch.empty((programs, 2, block_d), dtype=torch.float32, device=qkv.device)
    dscale_p = torch.empty((programs,), dtype=torch.float32, device=qkv.device)
    common = (qkv, pad_qkv if pad_qkv is not None else qkv, bias, logit_scale if logit_scale is not None else lse)
    geometry = (*qkv.stride()[:5], *_bias_strides(bias), heads, H, W, Hp, Wp, nWw, nW, N, D, wh, ww, shift_size[0],
                shift_size[1])
    flags = dict(HAS_PAD=pad_qkv is not None, DENSE_BIAS=bias.dim() == 3, HAS_MASK=shift_size[0] + shift_size[1] > 0,
                 COSINE=logit_scale is not None, DOT_PREC=dot_precision(qkv), UPCAST_DOT=upcast_bf16(qkv),
                 BLOCK=block, BLOCK_D=block_d, N_TILES=n_tiles, num_warps=warps, num_stages=stages)
    stats = lse
    if n_tiles > 1:
        stats = torch.empty((2,) + tuple(lse.shape), dtype=torch.float32, device=qkv.device)
        launch(_window_attn_stats_kernel, (B * heads * groups,), *common, lse, stats, *geometry, softmax_scale, wpp,
               lse.numel(), **flags)
    launch(
        _window_attn_bwd_kernel, (B * heads * groups,),
        *common, dout, stats, delta, dqkv, dbias_p, dpad_p, dscale_p, *geometry,
        softmax_scale, *_dropout_args(dropout_p, seed), wpp, lse.numel(),
        DROPOUT=dropout_p > 0, **flags,
    )
    dbias = dbias_p.view(B, heads, groups, N, N).sum((0, 2))
    dbias = (dbias if bias.dim() == 3 else fold_bias_grad(dbias, window_size)).to(bias.dtype)
    if pad_qkv is not None:
        dpad_kv = dpad_p.view(B, heads, groups, 2, block_d)[..., :D].sum((0, 2)).permute(1, 0, 2)
        dpad = torch.cat([torch.zeros_like(dpad_kv[:1]), dpad_kv]).to(pad_qkv.dtype)
    else:
        dpad = qkv.new_empty(0)
    dscale = dscale_p.view(B, heads, groups).sum((0, 2)) if logit_scale is not None else lse.new_empty(0)
    return dqkv, dbias, dpad, dscale
