"""The Triton kernel of the autotuner's spill-pruning tests (tests/test_launch.py on a GPU, tests/test_triton_compile.py
compile-only): a running prefix sum whose BLOCK=1024 config under maxnreg=32 spills on sm_90."""
import triton
import triton.language as tl


@triton.jit
def prefix_sum_kernel(X, Y, N, BLOCK: tl.constexpr):
    carry = 0.0
    for start in range(0, N, BLOCK):
        r = start + tl.arange(0, BLOCK)
        x = tl.load(X + r, mask=r < N, other=0.0)
        tl.store(Y + r, tl.cumsum(x, 0) + carry, mask=r < N)
        carry = tl.sum(x, 0) + carry
