"""Fused residual-add + LayerNorm, forward and backward, in Triton.

LayerNorm (Ba, Kiros, Hinton 2016, arXiv:1607.06450) over the last dim of a (M, N) view. Forward: a
program normalizes BLOCK_M rows held whole in registers, optionally adding the residual first and storing
the sum (the pre-norm block pattern). The row statistics (`row_stats`, also used by the LayerNorm fused into
patch_embed and patch_merging) are the corrected two-pass algorithm (Chan, Golub, LeVeque 1983) in fp32, as
in csrc/layer_norm_stats.h: accurate for rows with a large mean, and exact for constant rows (y is then
exactly the bias). Their divisions by the row length are IEEE (`tl.math.div_rn`): Triton's `/` on fp32 is
PTX's approximate div.full.f32 (2 ulp), the likely cause of a one-element row's dx of 2e-6 instead of 0 on an
H200. Backward: dx per row, and
dweight/dbias by a two-stage reduction: each program accumulates fp32 column partials over a contiguous
range of rows and writes one row of a (programs, N) buffer, which a second pass sums. This keeps the
column reduction parallel at ViT hidden sizes (96..1280), where one program per column block would leave
the GPU idle and atomics would make the result order-dependent.
"""
import torch
import triton
import triton.language as tl

from vitfast.triton.common import compiled, launch, num_sms, unit_inner_stride

MAX_N = 8192


@triton.jit
def row_stats_from_sums(
    mu0,  # (BLOCK_M,) first-pass mean: sum(x) / N
    dev,  # (BLOCK_M,) sum((x - mu0) / up)
    sq,  # (BLOCK_M,) sum(((x - mu0) / up)^2)
    up,  # (BLOCK_M,) 1, or 2^100 for a row whose squared deviations overflow (`overflow_up`)
    N,
    eps,
):
    """Mean and 1 / sqrt(var + eps) from the two passes of the corrected two-pass algorithm: the deviations from
    the first-pass mean sum to (almost) zero, and adding their sum back corrects the mean and the variance:
    mean = mu0 + dev / N, var = (sq - dev^2 / N) / N, here of the deviations divided by `up`, as in
    csrc/layer_norm_stats.h: var = var' * up^2, and rstd = 1 / (sqrt(var') * up) where that overflows."""
    dmean = tl.math.div_rn(dev, N * 1.0)
    var_down = tl.maximum(tl.math.div_rn(sq - dev * dmean, N * 1.0), 0.0)
    var = var_down * up * up
    return mu0 + dmean * up, 1.0 / tl.where(var == float("inf"), tl.sqrt(var_down) * up, tl.sqrt(var + eps))


@triton.jit
def overflow_up(sq):
    """Per row, the power of two that divides the deviations: 2^100 where their squares `sq` overflowed fp32
    (|x| around 1e19 and up), else 1; exact, and the scaled squares and sums stay finite (csrc/layer_norm_stats.h)."""
    return tl.where(sq == float("inf"), 1.2676506002282294e30, 1.0)


@triton.jit
def row_stats(
    x,  # (BLOCK_M, BLOCK_N) fp32, 0 outside `mask`
    mask,  # (BLOCK_M, BLOCK_N): the entries that belong to the rows
    N,
    eps,
):
    """LayerNorm statistics (mean, 1 / sqrt(var + eps)) of rows held whole in registers."""
    mu0 = tl.math.div_rn(tl.sum(x, axis=1), N * 1.0)
    d = tl.where(mask, x - mu0[:, None], 0.0)
    dev = tl.sum(d, axis=1)
    sq = tl.sum(d * d, axis=1)
    up = tl.full(sq.shape, 1.0, tl.float32)
    if tl.sum((sq == float("inf")).to(tl.int32), axis=0) > 0:
        up = overflow_up(sq)
        d = tl.math.div_rn(d, up[:, None])
        dev = tl.sum(d, axis=1)
        sq = tl.sum(d * d, axis=1)
    return row_stats_from_sums(mu0, dev, sq, up, N, eps)


def _block_sizes(n: int) -> tuple:
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = min(max(block_n * block_m // 1024, 1), 16)
    return block_m, block_n, num_warps


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N), row stride stride_x
    R,  # (M, N) residual, row stride stride_r (unused without HAS_RESIDUAL)
    S,  # (M, N) out: x + residual (unused without HAS_RESIDUAL)
    Y,  # (M, N) out
    W,  # (N,)
    B,  # (N,)
    Mean,  # (M,) fp32 out
    Rstd,  # (M,) fp32 out
    stride_x,
    stride_r,
    M,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the input dtype, as `x + residual` in PyTorch does: backward reads it back.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + rows[:, None] * N + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    mean, rstd = row_stats(x, mask, N, eps)
    y = (x - mean[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rows < M)
    tl.store(Rstd + rows, rstd, mask=rows < M)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N), row stride stride_dy
    DS,  # (M, N) gradient into the residual sum, row stride stride_ds (unused without HAS_DS)
    S,  # (M, N) normalized input, row stride stride_s
    W,  # (N,)
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    DX,  # (M, N) out, contiguous
    DW_partial,  # (programs, N) fp32 out
    DB_partial,  # (programs, N) fp32 out
    stride_dy,
    stride_ds,
    stride_s,
    M,
    N,
    rows_per_program,
    HAS_DS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :] if HAS_WEIGHT else dy
        c1 = tl.math.div_rn(tl.sum(g * xhat, axis=1), N * 1.0)
        c2 = tl.math.div_rn(tl.sum(g, axis=1), N * 1.0)
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
    if HAS_WEIGHT:
        tl.store(DW_partial + pid * N + cols, dw, mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * N + cols, db, mask=col_mask)


def layer_norm_fwd(x, weight, bias, residual, eps):
    """Launches the forward kernel.

    Args:
        x: (M, N), any strides (copied unless the inner stride is 1). weight, bias: (N,) or None, any stride
            (copied when not contiguous). residual: like x, or None.
    Returns:
        y (M, N); s = x + residual (M, N), or an empty tensor without residual; mean, rstd (M,) fp32.
    """
    x, residual = unit_inner_stride(x), unit_inner_stride(residual)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    s = torch.empty((M, N) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block_m, block_n, num_warps = _block_sizes(N)
    launch(
        _layer_norm_fwd_kernel, (triton.cdiv(M, block_m),),
        x, residual if residual is not None else x, s, y,
        weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, M, N, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, s, mean, rstd


def _num_programs(x: torch.Tensor, row_blocks: int) -> int:
    if compiled(x):
        return max(1, min(row_blocks, 4 * num_sms(x)))
    return max(1, min(row_blocks, 4))  # the interpreter runs programs one after another


def layer_norm_bwd(dy, ds, s, weight, mean, rstd, has_bias):
    """Launches the backward kernel and the second stage of the dweight/dbias reduction.

    Args:
        dy, ds (or None), s: (M, N), any strides (copied unless the inner stride is 1). weight: (N,) or None, any
        stride. mean, rstd: (M,) fp32, any stride.
    Returns:
        dx (M, N); dweight (N,) or empty; dbias (N,) or empty.
    """
    dy, ds, s = unit_inner_stride(dy), unit_inner_stride(ds), unit_inner_stride(s)
    weight, mean, rstd = (t.contiguous() if t is not None else None for t in (weight, mean, rstd))
    M, N = s.shape
    block_m, block_n, num_warps = _block_sizes(N)
    programs = _num_programs(s, triton.cdiv(M, block_m))
    rows_per_program = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    programs = triton.cdiv(M, rows_per_program)
    dx = torch.empty((M, N), dtype=s.dtype, device=s.device)
    partial = torch.empty((2, programs, N), dtype=torch.float32, device=s.device)
    launch(
        _layer_norm_bwd_kernel, (programs,),
        dy, ds if ds is not None else dy, s, weight if weight is not None else s, mean, rstd,
        dx, partial[0], partial[1],
        dy.stride(0), ds.stride(0) if ds is not None else 0, s.stride(0), M, N, rows_per_program,
        HAS_DS=ds is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    param_dtype = weight.dtype if weight is not None else s.dtype
    dweight = partial[0].sum(0).to(param_dtype) if weight is not None else s.new_empty(0, dtype=param_dtype)
    dbias = partial[1].sum(0).to(param_dtype) if has_bias else s.new_empty(0, dtype=param_dtype)
    return dx, dweight, dbias
