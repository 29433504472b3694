"""Patch embedding (ViT, Dosovitskiy et al. 2021, arXiv:2010.11929) as one implicit GEMM, forward and backward.

The stride = kernel convolution is a GEMM of the (B*Hp*Wp, C*ph*pw) patch matrix with the (E, C*ph*pw)
flattened kernel. The patch matrix is never built: each program computes the address of patch element
(c, i, j) of token (b, hp, wp) in the NCHW image in its loads (implicit im2col, as in cuDNN's implicit-GEMM
convolution). Pixels past the last whole patch (H % ph rows, W % pw columns) are never read, as the
convolution drops them, and get a zero gradient. Forward epilogue: bias, optionally LayerNorm over the
embedding (Swin's patch_norm; the program then holds whole rows, BLOCK_N >= E, and takes their statistics
with vitfast.triton.layer_norm.row_stats), then the positional embedding, stored straight into the
patch slots of a (B, num_prefix + L, E) token tensor. Backward: dimages = dZ @ W (stride = kernel, so
patches do not overlap and the result is scattered to the image without atomics) and dweight = dZ^T @ patches
(reading the patches from the image again) with a split over the B*L reduction into fp32 partials, which
also yields dbias. fp32 products follow vitfast's fp32 rule (vitfast.triton.common: IEEE unless
torch.backends.cuda.matmul.allow_tf32). Grids are 1-D over output tiles (the weight gradient adds a dimension of
at most 2 * SMs splits), and the autotuning key buckets the token count B*L.
"""
import functools

import torch
import triton
import triton.language as tl

from vitfast.triton.common import autotune, compiled, dot_precision, launch, mma, num_splits, tune_bucket, upcast_bf16
from vitfast.triton.layer_norm import row_stats

MAX_NORM_E = 1024  # the LayerNorm epilogue keeps BLOCK_M x next_pow2(E) fp32 values per program


def _configs(with_n: bool) -> list:
    shapes = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
              (128, 256, 32, 8, 3), (64, 64, 32, 4, 4)]
    configs, seen = [], set()
    for bm, bn, bk, warps, stages in shapes:
        key = (bm, bn if with_n else None, bk)
        if key in seen:
            continue
        seen.add(key)
        kwargs = dict(BLOCK_M=bm, BLOCK_K=bk, **({"BLOCK_N": bn} if with_n else {}))
        configs.append(triton.Config(kwargs, num_warps=warps, num_stages=stages))
    return configs


@triton.jit
def _col_offsets(rk, PH: tl.constexpr, PW: tl.constexpr, sxc, sxh, sxw):
    """Offsets of patch elements rk (in (c, i, j) order) from a patch's corner: int64, since a channel-major view
    of a large batch (or one huge image) puts (C - 1) * sxc past 2**31."""
    return ((rk // (PH * PW)).to(tl.int64) * sxc + ((rk // PW) % PH).to(tl.int64) * sxh
            + (rk % PW).to(tl.int64) * sxw)


@triton.jit(do_not_specialize=["m_bucket"])
def _patch_embed_fwd_kernel(
    X,  # (B, C, H, W) images, strides sxb, sxc, sxh, sxw
    Wt,  # (E, K) flattened kernel, contiguous, K = C * PH * PW in (c, i, j) order
    Bias,  # (E,)
    Pos,  # (rows, E) contiguous; patch token l adds row pos_offset + l
    NW,  # (E,) LayerNorm weight
    NB,  # (E,) LayerNorm bias
    Out,  # (B, T, E) contiguous, T = num_prefix + L; token l of image b goes to row b * T + num_prefix + l
    Z,  # (M, E) out: the pre-norm tokens (only STORE_Z)
    Mean,  # (M,) fp32 out (only HAS_NORM)
    Rstd,  # (M,) fp32 out (only HAS_NORM)
    sxb,
    sxc,
    sxh,
    sxw,
    M,  # B * L
    E,
    K,
    L,  # Hp * Wp
    Wp,
    T,
    num_prefix,
    pos_offset,
    eps,
    m_bucket,  # tune_bucket(M): the autotuning key, unused by the kernel
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_NW: tl.constexpr,
    HAS_NB: tl.constexpr,
    STORE_Z: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(E, BLOCK_N)
    rm = (pid // n_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < E
    b = rm // L
    tok = rm % L
    row_base = b * sxb + (tok // Wp) * PH * sxh + (tok % Wp) * PW * sxw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        col_off = _col_offsets(rk, PH, PW, sxc, sxh, sxw)
        a = tl.load(X + row_base[:, None] + col_off[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(Wt + rn[None, :] * K + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(a, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_NORM:
        # Round to the token dtype first, as the convolution's output would be: backward reads z back.
        z = acc.to(Out.dtype.element_ty)
        if STORE_Z:
            tl.store(Z + rm[:, None] * E + rn[None, :], z, mask=mask)
        zf = tl.where(mask, z.to(tl.float32), 0.0)
        mean, rstd = row_stats(zf, mask, E, eps)
        acc = (zf - mean[:, None]) * rstd[:, None]
        if HAS_NW:
            acc = acc * tl.load(NW + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_NB:
            acc = acc + tl.load(NB + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Mean + rm, mean, mask=m_mask)
        tl.store(Rstd + rm, rstd, mask=m_mask)
    if HAS_POS:
        acc += tl.load(Pos + (pos_offset + tok)[:, None] * E + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    out_row = b * T + num_prefix + tok
    tl.store(Out + out_row[:, None] * E + rn[None, :], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["m_bucket"])
def _patch_embed_bwd_dx_kernel(
    DZ,  # (B, L, E), strides sdb, sdl, 1: gradient of the pre-pos (post-norm-backward) tokens
    Wt,  # (E, K) flattened kernel, contiguous
    DX,  # (B, C, H, W) out, strides sxb, sxc, sxh, sxw; every element is one patch element
    sdb,
    sdl,
    sxb,
    sxc,
    sxh,
    sxw,
    M,
    E,
    K,
    L,
    Wp,
    m_bucket,  # tune_bucket(M): the autotuning key, unused by the kernel
    PH: tl.constexpr,
    PW: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(K, BLOCK_N)
    rm = (pid // n_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)  # over K (patch elements)
    m_mask = rm < M
    n_mask = rn < K
    b = rm // L
    tok = rm % L
    dz_row = b * sdb + tok * sdl
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_K):
        re = e0 + tl.arange(0, BLOCK_K)
        e_mask = re < E
        dz = tl.load(DZ + dz_row[:, None] + re[None, :], mask=m_mask[:, None] & e_mask[None, :], other=0.0)
        w = tl.load(Wt + re[:, None] * K + rn[None, :], mask=e_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(dz, w, acc, PRECISION, UPCAST)
    row_base = b * sxb + (tok // Wp) * PH * sxh + (tok % Wp) * PW * sxw
    col_off = _col_offsets(rn, PH, PW, sxc, sxh, sxw)
    tl.store(DX + row_base[:, None] + col_off[None, :], acc.to(DX.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["m_bucket"])
def _patch_embed_bwd_dw_kernel(
    DZ,  # (B, L, E), strides sdb, sdl, 1
    X,  # (B, C, H, W) images, strides sxb, sxc, sxh, sxw
    DW_partial,  # (splits, E, K) fp32 out
    DB_partial,  # (splits, E) fp32 out (only HAS_BIAS; written by the programs with pid_k == 0)
    sdb,
    sdl,
    sxb,
    sxc,
    sxh,
    sxw,
    M,
    E,
    K,
    L,
    Wp,
    num_splits,
    m_bucket,  # tune_bucket(M): the autotuning key, unused by the kernel
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # over E
    BLOCK_N: tl.constexpr,  # over K
    BLOCK_K: tl.constexpr,  # over the B * L tokens
):
    pid = tl.program_id(0)
    k_blocks = tl.cdiv(K, BLOCK_N)
    pid_k = pid % k_blocks
    split = tl.program_id(1).to(tl.int64)
    re = (pid // k_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    e_mask = re < E
    k_mask = rk < K
    col_off = _col_offsets(rk, PH, PW, sxc, sxh, sxw)
    rows_per_split = tl.cdiv(tl.cdiv(M, num_splits), BLOCK_K) * BLOCK_K
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_K):
        rm = m0 + tl.arange(0, BLOCK_K)
        m_mask = rm < m_end
        b = rm // L
        tok = rm % L
        dzt = tl.load(DZ + (b * sdb + tok * sdl)[None, :] + re[:, None], mask=e_mask[:, None] & m_mask[None, :],
                      other=0.0)
        row_base = b * sxb + (tok // Wp) * PH * sxh + (tok % Wp) * PW * sxw
        a = tl.load(X + row_base[:, None] + col_off[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = mma(dzt, a, acc, PRECISION, UPCAST)
        if HAS_BIAS:
            db += tl.sum(dzt.to(tl.float32), axis=1)
    tl.store(DW_partial + split * E * K + re[:, None] * K + rk[None, :], acc,
             mask=e_mask[:, None] & k_mask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(DB_partial + split * E + re, db, mask=e_mask)


_KEY = ["m_bucket", "E", "K", "PRECISION"]  # (a config tuned under TF32 is not reused for IEEE fp32, nor back)
_fwd_tuned = autotune(_configs(True), _KEY)(_patch_embed_fwd_kernel)
_dx_tuned = autotune(_configs(True), _KEY)(_patch_embed_bwd_dx_kernel)
_dw_tuned = autotune(_configs(True), _KEY)(_patch_embed_bwd_dw_kernel)


@functools.lru_cache(None)
def _fwd_norm_tuned(block_n: int, itemsize: int):
    """The forward with the LayerNorm epilogue, whose programs hold whole rows (BLOCK_N = next_pow2(E) <= 1024),
    autotuned over the configs whose (BLOCK_K, BLOCK_N) weight tile stays within 32 KiB per pipeline stage (BLOCK_K
    at least 16, tl.dot's least): for fp32 or 16 bits at E = 1024 only BLOCK_K = 16 fits in shared memory without
    register spills on sm_90 (scripts/compile_triton.py: the others need 266-811 KB or spill)."""
    shapes = [(32, 32, 4, 3), (64, 32, 8, 3), (16, 64, 4, 3), (32, 64, 8, 4), (16, 16, 4, 2), (32, 16, 8, 2)]
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=w, num_stages=s) for bm, bk, w, s in shapes
               if bk == 16 or bk * block_n * itemsize <= 32768]
    return autotune(configs, _KEY)(_patch_embed_fwd_kernel)


# Under the interpreter (CPU tensors) every program runs one after another in numpy: small fixed blocks.
_INTERPRET_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)


def _tiles(rows: int, cols: int, meta: dict) -> int:
    """Programs of a 1-D grid over the (rows, cols) output in (BLOCK_M, BLOCK_N) tiles."""
    return triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"])


def patch_embed_fwd(images, weight, bias, pos_embed, pos_offset, prefix_rows, norm_weight, norm_bias, has_norm,
                    num_prefix, eps, store_z):
    """Launches the forward kernel.

    Args:
        images: (B, C, H, W), any strides (channels_last too); pixels past the last whole patch are dropped.
        weight: (E, C, ph, pw), any strides. bias: (E,) or None, any stride.
        pos_embed: (rows, E), any strides (copied when not contiguous), or None; patch token l adds row
            pos_offset + l.
        prefix_rows: (num_prefix, E) tensor (class/distillation tokens with their positional rows already
            added) written to the prefix slots, or None (the slots are then zero).
        norm_weight, norm_bias: (E,) or None, any stride; has_norm: apply LayerNorm after the bias.
        store_z: also return the pre-norm tokens (needed by backward).
    Returns:
        out (B, num_prefix + L, E); z (B*L, E) or empty; mean, rstd (B*L,) fp32 or empty.
    """
    B, C, H, W = images.shape
    E, _, ph, pw = weight.shape
    Hp, Wp = H // ph, W // pw
    L = Hp * Wp
    M, K = B * L, C * ph * pw
    T = num_prefix + L
    dev, dt = images.device, images.dtype
    out = torch.empty((B, T, E), device=dev, dtype=dt)
    if num_prefix:
        out[:, :num_prefix] = prefix_rows if prefix_rows is not None else 0
    z = torch.empty((M, E) if (has_norm and store_z) else (0,), device=dev, dtype=dt)
    mean = torch.empty(M if has_norm else 0, device=dev, dtype=torch.float32)
    rstd = torch.empty(M if has_norm else 0, device=dev, dtype=torch.float32)
    if M == 0:
        return out, z, mean, rstd
    w2 = weight.reshape(E, K).contiguous()
    bias, norm_weight, norm_bias, pos_embed = (t.contiguous() if t is not None else None
                                               for t in (bias, norm_weight, norm_bias, pos_embed))
    args = (images, w2, bias if bias is not None else w2, pos_embed if pos_embed is not None else w2,
            norm_weight if norm_weight is not None else w2, norm_bias if norm_bias is not None else w2,
            out, z, mean, rstd, *images.stride(), M, E, K, L, Wp, T, num_prefix, pos_offset, eps, tune_bucket(M))
    flags = dict(PH=ph, PW=pw, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None, HAS_NORM=has_norm,
                 HAS_NW=norm_weight is not None, HAS_NB=norm_bias is not None, STORE_Z=has_norm and store_z,
                 PRECISION=dot_precision(images), UPCAST=upcast_bf16(images))
    block_n_norm = max(16, triton.next_power_of_2(E))
    if not compiled(images):
        blocks = dict(_INTERPRET_BLOCKS, BLOCK_N=block_n_norm) if has_norm else _INTERPRET_BLOCKS
        launch(_patch_embed_fwd_kernel, (_tiles(M, E, blocks),), *args, **flags, **blocks)
    elif has_norm:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
        launch(_fwd_norm_tuned(block_n_norm, images.element_size()), grid, *args, **flags, BLOCK_N=block_n_norm)
    else:
        launch(_fwd_tuned, lambda meta: (_tiles(M, E, meta),), *args, **flags)
    return out, z, mean, rstd


def patch_embed_bwd(dz, images, weight, has_bias, need_dimages, need_dweight):
    """Launches the backward kernels.

    Args:
        dz: (B, L, E) with unit inner stride: gradient w.r.t. the tokens before the positional embedding
            (after LayerNorm backward when there is a norm). images: (B, C, H, W), any strides.
            weight: (E, C, ph, pw), any strides.
    Returns:
        dimages (B, C, H, W), contiguous, zero on the pixels past the last whole patch, or empty (not
        need_dimages); dweight (E, C, ph, pw) and dbias (E,), or empty (not need_dweight; not has_bias: dbias).
    """
    B, C, H, W = images.shape
    E, _, ph, pw = weight.shape
    Wp = W // pw
    L = (H // ph) * Wp
    M, K = B * L, C * ph * pw
    dev, dt = images.device, images.dtype
    # The kernel writes every pixel of a whole patch; the others (none when H, W are multiples) stay zero.
    whole = M > 0 and H % ph == 0 and W % pw == 0
    dimages = (torch.empty if whole else torch.zeros)(images.shape if need_dimages else (0,), device=dev, dtype=dt)
    def empty():  # (a new one for each output: an op's outputs may not alias one another)
        return torch.empty(0, device=dev, dtype=weight.dtype)
    if M == 0:
        return (dimages, torch.zeros_like(weight) if need_dweight else empty(),
                torch.zeros(E if has_bias and need_dweight else 0, device=dev, dtype=weight.dtype))
    w2 = weight.reshape(E, K).contiguous()
    common = dict(PH=ph, PW=pw, PRECISION=dot_precision(images), UPCAST=upcast_bf16(images))
    if need_dimages:
        args = (dz, w2, dimages, dz.stride(0), dz.stride(1), *dimages.stride(), M, E, K, L, Wp, tune_bucket(M))
        if compiled(images):
            launch(_dx_tuned, lambda meta: (_tiles(M, K, meta),), *args, **common)
        else:
            launch(_patch_embed_bwd_dx_kernel, (_tiles(M, K, _INTERPRET_BLOCKS),), *args, **common,
                   **_INTERPRET_BLOCKS)
    if not need_dweight:
        return dimages, empty(), empty()
    tiles = triton.cdiv(E, 64) * triton.cdiv(K, 64)
    splits = num_splits(images, tiles, M)
    dw_part = torch.empty((splits, E, K), device=dev, dtype=torch.float32)
    db_part = torch.empty((splits, E) if has_bias else (0,), device=dev, dtype=torch.float32)
    args = (dz, images, dw_part, db_part, dz.stride(0), dz.stride(1), *images.stride(), M, E, K, L, Wp, splits,
            tune_bucket(M))
    if compiled(images):
        launch(_dw_tuned, lambda meta: (_tiles(E, K, meta), splits), *args, **common, HAS_BIAS=has_bias)
    else:
        launch(_patch_embed_bwd_dw_kernel, (_tiles(E, K, _INTERPRET_BLOCKS), splits), *args, **common,
               HAS_BIAS=has_bias, **_INTERPRET_BLOCKS)
    dweight = dw_part.sum(0).to(weight.dtype).view(weight.shape)
    dbias = db_part.sum(0).to(weight.dtype) if has_bias else empty()
    return dimages, dweight, dbias
