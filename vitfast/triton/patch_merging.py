"""Swin patch merging (Liu et al. 2021, arXiv:2103.14030): 2x2 gather + LayerNorm + linear reduction, fused.

Forward: one GEMM whose A-operand loads gather the 2x2 neighbourhood straight from the (B, H, W, C) input
(odd H/W read as zero padding, as Swin pads) in timm's/torchvision's order [x(0,0), x(1,0), x(0,1), x(1,1)].
Each program first takes its rows' LayerNorm statistics in two passes over the gathered rows (the corrected
two-pass algorithm of vitfast.triton.layer_norm, `row_stats_from_sums`: exact for constant rows), then
multiplies the normalized rows, LN(x) rounded to the input dtype as the eager sequence rounds them (and as
the backward recomputes them), by R^T. (Folding the norm into the GEMM, rstd * (x @ (R*g)^T - mean * rowsum),
cancels catastrophically for rows of small spread: a constant row came out off by 1e-3 instead of R @ beta.)
Backward: dR = dY^T @ LN(x) with LN recomputed in the loads (split over rows into fp32 partials);
dLN = dY @ R tile by tile, which also yields dgamma/dbeta column partials and the per-row sums that the
LayerNorm backward needs; a last pass forms dx and scatters it back through the gather. fp32 products follow
vitfast's fp32 rule (vitfast.triton.common). Grids are 1-D over output tiles (dR adds a dimension of at most
2 * SMs splits), and the autotuning key buckets the row count M.
"""
import torch
import triton
import triton.language as tl

from vitfast.triton.common import autotune, compiled, dot_precision, launch, mma, num_splits, tune_bucket, upcast_bf16
from vitfast.triton.layer_norm import overflow_up, row_stats_from_sums


@triton.jit
def _gather_offsets(rm, rk, H, W, H2, W2, C, sxb, sxh, sxw, sxc):
    """Addresses and validity of gathered element (row rm, column rk) of the (M, 4C) merged matrix."""
    b = rm // (H2 * W2)
    t = rm % (H2 * W2)
    h = 2 * (t // W2)
    w = 2 * (t % W2)
    q = rk // C
    hh = h[:, None] + (q % 2)[None, :]
    ww = w[:, None] + (q // 2)[None, :]
    offs = b[:, None] * sxb + hh * sxh + ww * sxw + (rk % C).to(tl.int64)[None, :] * sxc
    return offs, (hh < H) & (ww < W)


@triton.jit
def _deviation_sums(
    X, rm, m_mask, mu0, up, H, W, H2, W2, C, sxb, sxh, sxw, sxc, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Per gathered row, the sums of the deviations d = (x - mu0) / up and of their squares (`overflow_up`)."""
    down = tl.math.div_rn(1.0, up)  # exact: up is a power of two
    dev = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        offs, inside = _gather_offsets(rm, rk, H, W, H2, W2, C, sxb, sxh, sxw, sxc)
        valid = m_mask[:, None] & (rk < K)[None, :]
        a = tl.load(X + offs, mask=valid & inside, other=0.0).to(tl.float32)
        d = tl.where(valid, a - mu0[:, None], 0.0) * down[:, None]
        dev += tl.sum(d, axis=1)
        sq += tl.sum(d * d, axis=1)
    return dev, sq


@triton.jit
def _normalized(
    x,  # (BLOCK_M, BLOCK_K) fp32 gathered values (0 at padding)
    valid,  # (BLOCK_M, BLOCK_K): inside the (M, K) matrix
    mean,  # (BLOCK_M,)
    rstd,  # (BLOCK_M,)
    NW,  # (K,) norm weight (unused without HAS_NW)
    NB,  # (K,) norm bias (unused without HAS_NB)
    rk,  # (BLOCK_K,) columns
    K,
    HAS_NW: tl.constexpr,
    HAS_NB: tl.constexpr,
):
    """LN(x) in fp32, 0 outside the matrix: what the forward multiplies and the backward recomputes."""
    k_mask = rk < K
    ln = (x - mean[:, None]) * rstd[:, None]
    if HAS_NW:
        ln = ln * tl.load(NW + rk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_NB:
        ln = ln + tl.load(NB + rk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(valid, ln, 0.0)


@triton.jit(do_not_specialize=["m_bucket"])
def _patch_merging_fwd_kernel(
    X,  # (B, H, W, C), strides sxb, sxh, sxw, sxc
    R,  # (N, K) reduction weight, contiguous, K = 4C
    NW,  # (K,) norm weight (unused without HAS_NW)
    NB,  # (K,) norm bias (unused without HAS_NB)
    Out,  # (M, N) contiguous, M = B * H2 * W2
    Mean,  # (M,) fp32 out
    Rstd,  # (M,) fp32 out
    sxb,
    sxh,
    sxw,
    sxc,
    H,
    W,
    H2,
    W2,
    C,
    M,
    N,
    K,
    eps,
    m_bucket,  # tune_bucket(M): the autotuning key, unused by the kernel
    HAS_NW: tl.constexpr,
    HAS_NB: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % n_blocks
    rm = (pid // n_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        offs, inside = _gather_offsets(rm, rk, H, W, H2, W2, C, sxb, sxh, sxw, sxc)
        valid = m_mask[:, None] & (rk < K)[None, :]
        s1 += tl.sum(tl.load(X + offs, mask=valid & inside, other=0.0).to(tl.float32), axis=1)
    mu0 = tl.math.div_rn(s1, K * 1.0)
    up = tl.full((BLOCK_M,), 1.0, tl.float32)
    dev, sq = _deviation_sums(X, rm, m_mask, mu0, up, H, W, H2, W2, C, sxb, sxh, sxw, sxc, K, BLOCK_M, BLOCK_K)
    if tl.sum((sq == float("inf")).to(tl.int32), axis=0) > 0:  # the sums again, scaled, where squares overflowed
        up = overflow_up(sq)
        dev, sq = _deviation_sums(X, rm, m_mask, mu0, up, H, W, H2, W2, C, sxb, sxh, sxw, sxc, K, BLOCK_M, BLOCK_K)
    mean, rstd = row_stats_from_sums(mu0, dev, sq, up, K, eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        offs, inside = _gather_offsets(rm, rk, H, W, H2, W2, C, sxb, sxh, sxw, sxc)
        valid = m_mask[:, None] & k_mask[None, :]
        a = tl.load(X + offs, mask=valid & inside, other=0.0).to(tl.float32)
        # Rounded to the input dtype, as the eager sequence feeds LN(x) to the linear.
        ln = _normalized(a, valid, mean, rstd, NW, NB, rk, K, HAS_NW, HAS_NB).to(Out.dtype.element_ty)
        w = tl.load(R + rn[None, :] * K + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(ln, w, acc, PRECISION, UPCAST)
    tl.store(Out + rm[:, None] * N + rn[None, :], acc.to(Out.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if pid_n == 0:
        tl.store(Mean + rm, mean, mask=m_mask)
        tl.store(Rstd + rm, rstd, mask=m_mask)


@triton.jit(do_not_specialize=["m_bucket"])
def _patch_merging_bwd_dr_kernel(
    DY,  # (M, N), row stride sdy, unit inner stride
    X,  # (B, H, W, C), strides sxb, sxh, sxw, sxc
    NW,  # (K,) norm weight
    NB,  # (K,) norm bias
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    DR_partial,  # (splits, N, K) fp32 out
    sdy,
    sxb,
    sxh,
    sxw,
    sxc,
    H,
    W,
    H2,
    W2,
    C,
    M,
    N,
    K,
    num_splits,
    m_bucket,  # tune_bucket(M): the autotuning key, unused by the kernel
    HAS_NW: tl.constexpr,
    HAS_NB: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # over N
    BLOCK_N: tl.constexpr,  # over K
    BLOCK_K: tl.constexpr,  # over the M rows
):
    pid = tl.program_id(0)
    k_blocks = tl.cdiv(K, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
    rn = (pid // k_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = (pid % k_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k_mask = rk < K
    rows_per_split = tl.cdiv(tl.cdiv(M, num_splits), BLOCK_K) * BLOCK_K
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_K):
        rm = m0 + tl.arange(0, BLOCK_K)
        m_mask = rm < m_end
        dyt = tl.load(DY + rm[None, :] * sdy + rn[:, None], mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        offs, inside = _gather_offsets(rm, rk, H, W, H2, W2, C, sxb, sxh, sxw, sxc)
        valid = m_mask[:, None] & k_mask[None, :]
        x = tl.load(X + offs, mask=valid & inside, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rm, mask=m_mask, other=0.0)
        rstd = tl.load(Rstd + rm, mask=m_mask, other=0.0)
        # Round as the normalized activations of the eager sequence are, the reduction's input dtype.
        ln = _normalized(x, valid, mean, rstd, NW, NB, rk, K, HAS_NW, HAS_NB).to(DY.dtype.element_ty)
        acc = mma(dyt, ln, acc, PRECISION, UPCAST)
    tl.store(DR_partial + split * N * K + rn[:, None] * K + rk[None, :], acc,
             mask=n_mask[:, None] & k_mask[None, :])


@triton.jit
def _patch_merging_bwd_dln_kernel(
    DY,  # (M, N), row stride sdy
    R,  # (N, K) reduction weight, contiguous
    X,  # (B, H, W, C)
    NW,  # (K,)
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    DLN,  # (M, K) out, input dtype: dY @ R
    ROW_partial,  # (2, K-blocks, M) fp32 out: per-row sums of g*xhat and g over this program's columns
    COL_partial,  # (2, M-blocks, K) fp32 out: per-column sums of dln*xhat and dln over this program's rows
    sdy,
    sxb,
    sxh,
    sxw,
    sxc,
    H,
    W,
    H2,
    W2,
    C,
    M,
    N,
    K,
    HAS_NW: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # over K
    BLOCK_K: tl.constexpr,  # over N
):
    num_kb = tl.cdiv(K, BLOCK_N)
    num_mb = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid // num_kb
    pid_k = pid % num_kb
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    k_mask = rk < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        rn = n0 + tl.arange(0, BLOCK_K)
        n_mask = rn < N
        dy = tl.load(DY + rm[:, None] * sdy + rn[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        r = tl.load(R + rn[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = mma(dy, r, acc, PRECISION, UPCAST)
    mask = m_mask[:, None] & k_mask[None, :]
    # dLN in the input dtype, as the eager linear backward produces it: half the traffic of fp32, and the
    # row/column sums below use the same rounded values as the dx pass.
    dln = acc.to(DLN.dtype.element_ty)
    tl.store(DLN + rm[:, None] * K + rk[None, :], dln, mask=mask)
    acc = dln.to(tl.float32)
    offs, inside = _gather_offsets(rm, rk, H, W, H2, W2, C, sxb, sxh, sxw, sxc)
    x = tl.load(X + offs, mask=mask & inside, other=0.0).to(tl.float32)
    mean = tl.load(Mean + rm, mask=m_mask, other=0.0)
    rstd = tl.load(Rstd + rm, mask=m_mask, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = acc
    if HAS_NW:
        g = acc * tl.load(NW + rk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(ROW_partial + pid_k * M + rm, tl.sum(g * xhat, axis=1), mask=m_mask)
    tl.store(ROW_partial + (num_kb + pid_k) * M + rm, tl.sum(g, axis=1), mask=m_mask)
    tl.store(COL_partial + pid_m * K + rk, tl.sum(acc * xhat, axis=0), mask=k_mask)
    tl.store(COL_partial + (num_mb + pid_m) * K + rk, tl.sum(acc, axis=0), mask=k_mask)


@triton.jit
def _patch_merging_bwd_dx_kernel(
    DLN,  # (M, K), input dtype
    X,  # (B, H, W, C)
    NW,  # (K,)
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    ROW_sums,  # (2, M) fp32: sum_k g*xhat, sum_k g
    DX,  # (B, H, W, C) out, strides sdxb, sdxh, sdxw, sdxc
    sxb,
    sxh,
    sxw,
    sxc,
    sdxb,
    sdxh,
    sdxw,
    sdxc,
    H,
    W,
    H2,
    W2,
    C,
    M,
    K,
    HAS_NW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    k_blocks = tl.cdiv(K, BLOCK_N)
    rm = (pid // k_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = (pid % k_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    k_mask = rk < K
    mask = m_mask[:, None] & k_mask[None, :]
    offs, inside = _gather_offsets(rm, rk, H, W, H2, W2, C, sxb, sxh, sxw, sxc)
    x = tl.load(X + offs, mask=mask & inside, other=0.0).to(tl.float32)
    mean = tl.load(Mean + rm, mask=m_mask, other=0.0)
    rstd = tl.load(Rstd + rm, mask=m_mask, other=0.0)
    xhat = (x - mean[:, None]) * rstd[:, None]
    c1 = tl.math.div_rn(tl.load(ROW_sums + rm, mask=m_mask, other=0.0), K * 1.0)
    c2 = tl.math.div_rn(tl.load(ROW_sums + M + rm, mask=m_mask, other=0.0), K * 1.0)
    g = tl.load(DLN + rm[:, None] * K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NW:
        g = g * tl.load(NW + rk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    doffs, _ = _gather_offsets(rm, rk, H, W, H2, W2, C, sdxb, sdxh, sdxw, sdxc)
    tl.store(DX + doffs, dx.to(DX.dtype.element_ty), mask=mask & inside)


def _configs() -> list:
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
                                     (64, 64, 64, 4, 3), (64, 64, 32, 4, 4)]]


_fwd_tuned = autotune(_configs(), ["m_bucket", "N", "K", "PRECISION"])(_patch_merging_fwd_kernel)
_dr_tuned = autotune(_configs(), ["m_bucket", "N", "K", "PRECISION"])(_patch_merging_bwd_dr_kernel)

_INTERPRET_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
# dln / dx keep fixed blocks on the GPU too: their partial-buffer shapes depend on the block sizes.
_DLN_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)


def _tiles(rows: int, cols: int, meta: dict) -> int:
    """Programs of a 1-D grid over the (rows, cols) output in (BLOCK_M, BLOCK_N) tiles."""
    return triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"])


def _geometry(x):
    B, H, W, C = x.shape
    H2, W2 = (H + 1) // 2, (W + 1) // 2
    return B, H, W, C, H2, W2, B * H2 * W2, 4 * C


def patch_merging_fwd(x, norm_weight, norm_bias, reduction_weight, eps):
    """Launches the forward kernel.

    Args:
        x: (B, H, W, C), any strides. norm_weight, norm_bias: (4C,) or None, any stride.
        reduction_weight: (N, 4C), any strides (non-contiguous ones are copied).
    Returns:
        out (B, ceil(H/2), ceil(W/2), N); mean, rstd (M,) fp32, M = B * ceil(H/2) * ceil(W/2).
    """
    B, H, W, C, H2, W2, M, K = _geometry(x)
    N = reduction_weight.shape[0]
    out = torch.empty((B, H2, W2, N), device=x.device, dtype=x.dtype)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return out, mean, rstd
    r = reduction_weight.contiguous()
    nw = norm_weight.contiguous() if norm_weight is not None else r
    nb = norm_bias.contiguous() if norm_bias is not None else r
    args = (x, r, nw, nb, out, mean, rstd, *x.stride(), H, W, H2, W2, C, M, N, K, eps, tune_bucket(M))
    flags = dict(HAS_NW=norm_weight is not None, HAS_NB=norm_bias is not None, PRECISION=dot_precision(x))
    if not compiled(x):
        launch(_patch_merging_fwd_kernel, (_tiles(M, N, _INTERPRET_BLOCKS),), *args, **flags, UPCAST=upcast_bf16(x),
               **_INTERPRET_BLOCKS)
    else:
        launch(_fwd_tuned, lambda meta: (_tiles(M, N, meta),), *args, **flags, UPCAST=False)
    return out, mean, rstd


def patch_merging_bwd(dy, x, norm_weight, norm_bias, reduction_weight, mean, rstd):
    """Launches the backward kernels.

    Args:
        dy: (M, N) with unit inner stride. x: (B, H, W, C), any strides. norm_weight, norm_bias: (4C,) or None,
        any stride. reduction_weight: (N, 4C), any strides. mean, rstd: (M,) fp32 from the forward.
    Returns:
        dx like x (contiguous); dnorm_weight, dnorm_bias (4C,) or empty; dreduction_weight (N, 4C).
    """
    B, H, W, C, H2, W2, M, K = _geometry(x)
    N = reduction_weight.shape[0]
    dev, dt = x.device, x.dtype
    pdt = reduction_weight.dtype
    dx = torch.empty((B, H, W, C), device=dev, dtype=dt)
    def empty():
        return torch.empty(0, device=dev, dtype=pdt)

    if M == 0:
        return (dx, torch.zeros_like(norm_weight) if norm_weight is not None else empty(),
                torch.zeros_like(norm_bias) if norm_bias is not None else empty(), torch.zeros_like(reduction_weight))
    r = reduction_weight.contiguous()
    has_nw, has_nb = norm_weight is not None, norm_bias is not None
    nw = norm_weight.contiguous() if has_nw else r
    nb = norm_bias.contiguous() if has_nb else r
    precision, upcast = dot_precision(x), upcast_bf16(x)
    interp = not compiled(x)

    tiles = triton.cdiv(N, 64) * triton.cdiv(K, 64)
    splits = num_splits(x, tiles, M)
    dr_part = torch.empty((splits, N, K), device=dev, dtype=torch.float32)
    args = (dy, x, nw, nb, mean, rstd, dr_part, dy.stride(0), *x.stride(), H, W, H2, W2, C, M, N, K, splits,
            tune_bucket(M))
    flags = dict(HAS_NW=has_nw, HAS_NB=has_nb, PRECISION=precision, UPCAST=upcast)
    if interp:
        launch(_patch_merging_bwd_dr_kernel, (_tiles(N, K, _INTERPRET_BLOCKS), splits), *args, **flags,
               **_INTERPRET_BLOCKS)
    else:
        launch(_dr_tuned, lambda meta: (_tiles(N, K, meta), splits), *args, **flags)
    dreduction = dr_part.sum(0).to(pdt)

    blocks = _INTERPRET_BLOCKS if interp else _DLN_BLOCKS
    mb, kb = triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(K, blocks["BLOCK_N"])
    dln = torch.empty((M, K), device=dev, dtype=dt)
    row_part = torch.empty((2, kb, M), device=dev, dtype=torch.float32)
    col_part = torch.empty((2, mb, K), device=dev, dtype=torch.float32)
    launch(
        _patch_merging_bwd_dln_kernel, (mb * kb,),
        dy, r, x, nw, mean, rstd, dln, row_part, col_part, dy.stride(0), *x.stride(), H, W, H2, W2, C, M, N, K,
        HAS_NW=has_nw, PRECISION=precision, UPCAST=upcast, **blocks, num_warps=4)
    row_sums = row_part.sum(1)
    launch(
        _patch_merging_bwd_dx_kernel, (mb * kb,),
        dln, x, nw, mean, rstd, row_sums, dx, *x.stride(), *dx.stride(), H, W, H2, W2, C, M, K,
        HAS_NW=has_nw, BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], num_warps=4)
    dnw = col_part[0].sum(0).to(pdt) if has_nw else empty()
    dnb = col_part[1].sum(0).to(pdt) if has_nb else empty()
    return dx, dnw, dnb, dreduction
