// LayerNorm row statistics on the CPU, shared by every C++ kernel that normalizes rows (layer_norm.cpp and the
// LayerNorm fused into patch_embed.cpp and patch_merging.cpp), so that they all compute them one way.
//
// The algorithm is the corrected two-pass one (Chan, Golub, LeVeque 1983, "Algorithms for computing the sample
// variance"): mu0 = sum(v) / N; dev = sum(v - mu0), sq = sum((v - mu0)^2); mean = mu0 + dev / N,
// var = (sq - dev^2 / N) / N. The deviations from the first-pass mean sum to (almost) zero, and their rounding
// error is relative to the spread of the row, not to its mean, so adding them back corrects both statistics.
// A constant row gets its own value as the mean exactly (v - mu0 is exact, and so are its sum and the
// correction), hence v - mean = 0 exactly: LayerNorm returns exactly the bias and a zero weight gradient.
// A finite row whose squared deviations overflow (|v| around 1e19 and up in fp32) gets var = inf, so rstd = 0 and
// LayerNorm returns the bias (ATen's returns the bias or NaN, depending on the row; the exact result would need
// the deviations rescaled), where sq - dev^2 / N would be inf - inf (NaN, and the clamp at 0 would make rstd
// 1 / sqrt(eps), outputs of 1e32).
// The same formula is written for Triton in vitfast/triton/layer_norm.py (`row_stats`), for CUDA in
// kernels/layer_norm.cu and for PyTorch in vitfast/ops/layer_norm.py (`_row_stats`).
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

namespace vitfast {

// Row reductions keep kLanes<T> partial sums (128 bytes, four AVX2 registers), which the compiler maps
// to independent vector accumulators: the add chains overlap (speed) and no partial sum takes more
// than N / kLanes terms (fp32 accuracy at N = 8192). The count does not depend on the instruction set.
// `omp simd` on the lane loops keeps GCC from fully unrolling them before it vectorizes (which leaves
// the double version shuffling and spilling).
template <typename T>
constexpr int64_t kLanes = 128 / sizeof(T);

template <typename T>
C10_ALWAYS_INLINE T tree_sum(T* acc) {
  for (int64_t width = kLanes<T> / 2; width >= 1; width /= 2) {
    for (int64_t k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  return acc[0];
}

// Sum of v[0:N].
template <typename T>
C10_ALWAYS_INLINE T row_sum(const T* C10_RESTRICT v, int64_t N) {
  T acc[kLanes<T>] = {};
  int64_t j = 0;
  for (; j + kLanes<T> <= N; j += kLanes<T>) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes<T>; ++k) acc[k] += v[j + k];
  }
  for (int64_t k = 0; j + k < N; ++k) acc[k] += v[j + k];
  return tree_sum(acc);
}

// Sums of (v - c) and of (v - c)^2 over v[0:N].
template <typename T>
C10_ALWAYS_INLINE std::pair<T, T> row_dev_sq(const T* C10_RESTRICT v, T c, int64_t N) {
  T dev[kLanes<T>] = {};
  T sq[kLanes<T>] = {};
  int64_t j = 0;
  for (; j + kLanes<T> <= N; j += kLanes<T>) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes<T>; ++k) {
      const T d = v[j + k] - c;
      dev[k] += d;
      sq[k] += d * d;
    }
  }
  for (int64_t k = 0; j + k < N; ++k) {
    const T d = v[j + k] - c;
    dev[k] += d;
    sq[k] += d * d;
  }
  return {tree_sum(dev), tree_sum(sq)};
}

template <typename T>
struct RowStats {
  T mean;
  T rstd;  // 1 / sqrt(var + eps)
};

// Mean and 1 / sqrt(variance + eps) of v[0:N] (op-math values), by the corrected two-pass algorithm above.
template <typename T>
C10_ALWAYS_INLINE RowStats<T> row_stats(const T* C10_RESTRICT v, int64_t N, T eps) {
  const T inv_n = N > 0 ? T(1) / static_cast<T>(N) : T(0);
  const T mu0 = row_sum(v, N) * inv_n;
  const auto [dev, sq] = row_dev_sq(v, mu0, N);
  const T var = sq == std::numeric_limits<T>::infinity() ? sq : std::max(T(0), (sq - dev * dev * inv_n) * inv_n);
  return {mu0 + dev * inv_n, T(1) / std::sqrt(var + eps)};
}

}  // namespace vitfast
