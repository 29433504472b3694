"""Linear + bias + GELU in Triton: the GEMM and bias by torch.addmm (cuBLAS / cuBLASLt's bias epilogue), then GELU.

GELU(h) = h * Phi(h) (Hendrycks & Gimpel 2016, arXiv:1606.08415), exact (erf) or with the tanh approximation,
computed as h * sigmoid(2u), u = sqrt(2 / pi) (h + 0.044715 h^3), as F.gelu. The kernel
reads h = x W^T + b once and writes GELU(h) in place; with SAVE_PREACT (autograd keeps h) to a second buffer.
Semantics: vitfast/ops/linear_gelu.py.
"""
import torch
import triton
import triton.language as tl

from vitfast.triton.common import launch

_BLOCK_M, _BLOCK_N = 16, 256


@triton.jit
def _gelu_kernel(
    H,  # (M, N) contiguous: h = x @ weight^T + bias
    Y,  # (M, N) contiguous out: GELU(h) (H itself, in place, without autograd)
    M,
    N,
    TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(N, BLOCK_N)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    if TANH:
        # sigmoid(2u) from e = exp(-2|u|), which cannot overflow: y is -0 for h -> -inf's side, h for +inf's
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        e = tl.exp(-2.0 * tl.abs(u))
        y = h * tl.where(u >= 0, 1.0, e) / (1.0 + e)
    else:
        y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def linear_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias, approximate: str, save_preact: bool):
    """x (M, K), weight (N, K), bias (N,) or None, one dtype -> (y (M, N), h (M, N) with save_preact else empty)."""
    h = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    y = torch.empty_like(h) if save_preact else h
    M, N = h.shape
    if h.numel() > 0:
        grid = (triton.cdiv(M, _BLOCK_M) * triton.cdiv(N, _BLOCK_N),)
        launch(_gelu_kernel, grid, h, y, M, N, TANH=approximate == "tanh", BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
               num_warps=4)
    return y, (h if save_preact else h.new_empty(0))
