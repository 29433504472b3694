"""Triton helpers shared by several kernels."""
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: bf16 operands as fp32 (exact products), for the interpreter, whose bf16
    tl.dot returns garbage on triton 3.9 with numpy 2."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in fp32 with tl.dot's input_precision PRECISION. UPCAST: bf16 operands as fp32 (exact), for the
    interpreter, whose bf16 tl.dot multiplies the raw bit patterns (triton 3.9)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)
