// Attention-dropout keep masks on the CPU: the draw of every vitfast backend with dropout (the Triton kernels'
// tl.philox, vitfast.ops.attention.dropout_keep_ref in PyTorch). Score number `offset` of an op's flattened scores
// (e.g. (B, H, Nq, Nk), or (B, heads, nW, N, N) for window attention) is kept where the first word of
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) of the counter
// (offset low, offset high, 0, 0) under the key (seed low, seed high), shifted right by 8 (its top 24 bits), is at
// least dropout_threshold(dropout_p) = round(dropout_p * 2^24).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace vitfast {

uint32_t dropout_threshold(double dropout_p);

// keep[e] = 1 if score base + e is kept, else 0, for e in [0, count): vectorized (AVX2 or AVX-512 where the CPU
// has it and ATEN_CPU_CAPABILITY allows it; every copy draws the same bits).
void dropout_keep_mask(uint64_t seed, uint64_t base, int64_t count, uint32_t threshold, uint8_t* keep);

// The keep mask of scores offset .. offset + numel - 1 as a (numel,) bool CPU tensor, drawn in parallel
// (vitfast._C.dropout_keep: the torch backends' mask on CPU tensors).
at::Tensor dropout_keep(int64_t seed, int64_t offset, int64_t numel, double dropout_p);

}  // namespace vitfast
