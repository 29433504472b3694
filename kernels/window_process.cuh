// Host launchers for the fused Swin window partition / reverse (kernels/window_process.cu): raw pointers and a
// stream, no torch, so that csrc/window_process_cuda.cpp (compiled by the host compiler) and any other caller
// can use them.
//
// window_partition: x (B, H, W, C) -> out (B * nW, N, C): pad to multiples of the window (zeros), cyclic roll by
// (-sh, -sw), partition into nW = (Hp / wh)(Wp / ww) windows of N = wh * ww tokens (window w = wy * (Wp / ww) +
// wx, token t = ty * ww + tx). window_reverse: windows (B * nW, N, C) -> out (B, H, W, C), the inverse (reverse
// partition, roll back by (sh, sw), crop). Both tensors contiguous. Pure data movement: elements of any size
// (`elem_size` bytes: 4 for fp32, 2 for fp16/bf16) are moved bit-exactly, 16, 8, 4, 2 or 1 bytes per thread,
// the widest that the row size and both pointers allow. Offsets are int64.
//
// Each launcher validates its arguments, launches on `stream`, and returns cudaGetLastError() (or
// cudaErrorInvalidValue for arguments it cannot take). Empty problems launch nothing and return cudaSuccess.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace vitfast {

// Requires 1 <= wh, ww; 0 <= sh < wh; 0 <= sw < ww; B, H, W, C >= 0; elem_size >= 1.
cudaError_t window_partition(const void* x, void* out, int64_t B, int64_t H, int64_t W, int64_t C,
                             int64_t elem_size, int64_t wh, int64_t ww, int64_t sh, int64_t sw, cudaStream_t stream);

// `windows` holds B * nW windows of N tokens of C elements; `out` is (B, H, W, C). Same requirements.
cudaError_t window_reverse(const void* windows, void* out, int64_t B, int64_t H, int64_t W, int64_t C,
                           int64_t elem_size, int64_t wh, int64_t ww, int64_t sh, int64_t sw, cudaStream_t stream);

}  // namespace vitfast
