// Host launchers for the CUDA LayerNorm (kernels/layer_norm.cu): raw pointers and a stream, no torch,
// so that csrc/layer_norm_cuda.cpp (compiled by the host compiler) and any other caller can use them.
//
// All matrices are (M, N) with unit inner stride; inputs take a row stride, outputs are contiguous.
// Each launcher validates its sizes, launches on `stream`, and returns cudaGetLastError() (or
// cudaErrorInvalidValue for arguments it cannot take; empty problems are the caller's to handle).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace vitfast {

// Widest row the kernels take: a row is held in registers, at most 32 (forward) or 16 (backward)
// elements per thread over up to 256 (forward) or 512 (backward) threads.
constexpr int64_t kLayerNormMaxN = 8192;

// Forward: s = x + residual (rounded to T) when residual is given, else s is x; then
// y = (s - mean) * rstd * weight + bias, with the biased variance and rstd = rsqrt(var + eps).
//
// x: (M, N), row stride x_row_stride. residual: like x with its own row stride, or nullptr.
// weight, bias: (N,) contiguous, or nullptr. y: (M, N) contiguous out. s_out: (M, N) contiguous out,
// written only with a residual (may be nullptr without). mean, rstd: (M,) fp32 out.
// Requires M >= 1 and 1 <= N <= kLayerNormMaxN.
template <typename T>
cudaError_t layer_norm_fwd(const T* x, int64_t x_row_stride, const T* residual, int64_t residual_row_stride,
                           const T* weight, const T* bias, T* y, T* s_out, float* mean, float* rstd, int64_t M,
                           int64_t N, float eps, cudaStream_t stream);

// Blocks the backward kernel should be launched with for an (M, N) problem on a device with `num_sms`
// multiprocessors: as many as can be resident at once (each walks rows in a grid-stride loop), and no
// more than there are rows to give them. It is also the number of rows of the fp32 partial buffers.
int64_t layer_norm_bwd_num_blocks(int64_t M, int64_t N, int num_sms);

// Backward: xhat = (s - mean) * rstd, g = dy * weight (dy without weight),
// dx = rstd * (g - mean_row(g * xhat) * xhat - mean_row(g)) (+ ds),
// dweight = sum_rows(dy * xhat), dbias = sum_rows(dy), each cast to T.
//
// dy, ds (or nullptr), s: (M, N), each with its own row stride. weight: (N,) contiguous, or nullptr.
// mean, rstd: (M,) fp32. dx: (M, N) contiguous out.
// dweight_partial, dbias_partial: (num_blocks, N) fp32 scratch, and dweight, dbias: (N,) out; pass a
// partial buffer and its output together, or both as nullptr to skip that gradient.
// num_blocks: from layer_norm_bwd_num_blocks (any value in [1, 2^31 - 1] is correct).
// Requires M >= 1 and 1 <= N <= kLayerNormMaxN.
template <typename T>
cudaError_t layer_norm_bwd(const T* dy, int64_t dy_row_stride, const T* ds, int64_t ds_row_stride, const T* s,
                           int64_t s_row_stride, const T* weight, const float* mean, const float* rstd, T* dx,
                           float* dweight_partial, float* dbias_partial, T* dweight, T* dbias, int64_t M,
                           int64_t N, int64_t num_blocks, cudaStream_t stream);

extern template cudaError_t layer_norm_fwd<float>(const float*, int64_t, const float*, int64_t, const float*,
                                                  const float*, float*, float*, float*, float*, int64_t,
                                                  int64_t, float, cudaStream_t);
extern template cudaError_t layer_norm_fwd<__half>(const __half*, int64_t, const __half*, int64_t, const __half*,
                                                   const __half*, __half*, __half*, float*, float*, int64_t,
                                                   int64_t, float, cudaStream_t);
extern template cudaError_t layer_norm_fwd<__nv_bfloat16>(const __nv_bfloat16*, int64_t, const __nv_bfloat16*,
                                                          int64_t, const __nv_bfloat16*, const __nv_bfloat16*,
                                                          __nv_bfloat16*, __nv_bfloat16*, float*, float*,
                                                          int64_t, int64_t, float, cudaStream_t);

extern template cudaError_t layer_norm_bwd<float>(const float*, int64_t, const float*, int64_t, const float*,
                                                  int64_t, const float*, const float*, const float*, float*,
                                                  float*, float*, float*, float*, int64_t, int64_t, int64_t,
                                                  cudaStream_t);
extern template cudaError_t layer_norm_bwd<__half>(const __half*, int64_t, const __half*, int64_t, const __half*,
                                                   int64_t, const __half*, const float*, const float*, __half*,
                                                   float*, float*, __half*, __half*, int64_t, int64_t, int64_t,
                                                   cudaStream_t);
extern template cudaError_t layer_norm_bwd<__nv_bfloat16>(const __nv_bfloat16*, int64_t, const __nv_bfloat16*,
                                                          int64_t, const __nv_bfloat16*, int64_t,
                                                          const __nv_bfloat16*, const float*, const float*,
                                                          __nv_bfloat16*, float*, float*, __nv_bfloat16*,
                                                          __nv_bfloat16*, int64_t, int64_t, int64_t,
                                                          cudaStream_t);

}  // namespace vitfast
