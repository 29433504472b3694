// LayerNorm row statistics on the CPU, shared by every C++ kernel that normalizes rows (layer_norm.cpp and the
// LayerNorm fused into patch_embed.cpp and patch_merging.cpp), so that they all compute them one way.
//
// The algorithm is the corrected two-pass one (Chan, Golub, LeVeque 1983, "Algorithms for computing the sample
// variance"): mu0 = sum(v) / N; dev = sum(v - mu0), sq = sum((v - mu0)^2); mean = mu0 + dev / N,
// var = (sq - dev^2 / N) / N. The deviations from the first-pass mean sum to (almost) zero, and their rounding
// error is relative to the spread of the row, not to its mean, so adding them back corrects both statistics.
// A constant row gets its own value as the mean exactly (v - mu0 is exact, and so are its sum and the
// correction), hence v - mean = 0 exactly: LayerNorm returns exactly the bias and a zero weight gradient.
// A finite row whose squared deviations overflow (sq = inf: |v| around 1e19 and up in fp32, 1e154 in fp64) has its
// second pass redone on the deviations times 2^-100 (fp32; 2^-600 fp64), an exact power of two whose squares and
// sums stay finite: mean = mu0 + dev' * 2^100 / N and var = var' * 2^200, so rstd = 1 / sqrt(var + eps), or
// 2^-100 / sqrt(var') where var overflows (ATen's LayerNorm returns the bias or NaN for such rows, depending on
// the row). The deviations whose scaled squares underflow are below 2^-100 of the largest: nothing at this
// precision. (A constant row of 1e30 lands here too: its first-pass mean is one ulp off, whose square overflows;
// var' is 0, and the row gives the bias exactly.) A row whose sum, or whose deviations v - mu0 themselves, overflow
// (values within about 2x of the dtype's largest) gives inf or NaN, as ATen's LayerNorm gives NaN.
// The same formula is written for Triton in vitfast/triton/layer_norm.py (`row_stats`), for CUDA in
// kernels/layer_norm.cu and for PyTorch in vitfast/ops/layer_norm.py (`_row_stats`).
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
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

// Sums of (v - c) * scale and of ((v - c) * scale)^2 over v[0:N].
template <typename T>
C10_ALWAYS_INLINE std::pair<T, T> row_dev_sq(const T* C10_RESTRICT v, T c, T scale, int64_t N) {
  T dev[kLanes<T>] = {};
  T sq[kLanes<T>] = {};
  int64_t j = 0;
  for (; j + kLanes<T> <= N; j += kLanes<T>) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes<T>; ++k) {
      const T d = (v[j + k] - c) * scale;
      dev[k] += d;
      sq[k] += d * d;
    }
  }
  for (int64_t k = 0; j + k < N; ++k) {
    const T d = (v[j + k] - c) * scale;
    dev[k] += d;
    sq[k] += d * d;
  }
  return {tree_sum(dev), tree_sum(sq)};
}

// The power of two that scales the deviations of a row whose squared deviations overflow (above).
template <typename T>
constexpr int kOverflowExponent = sizeof(T) == 4 ? 100 : 600;

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
  auto [dev, sq] = row_dev_sq(v, mu0, T(1), N);
  if (C10_LIKELY(sq != std::numeric_limits<T>::infinity())) {
    // (dev * (dev / N): dev^2 itself overflows for rows of a large mean and a spread of a few ulps, where sq does not)
    const T var = std::max(T(0), (sq - dev * (dev * inv_n)) * inv_n);
    return {mu0 + dev * inv_n, T(1) / std::sqrt(var + eps)};
  }
  std::tie(dev, sq) = row_dev_sq(v, mu0, std::ldexp(T(1), -kOverflowExponent<T>), N);
  const T var_down = std::max(T(0), (sq - dev * (dev * inv_n)) * inv_n);
  const T var = std::ldexp(var_down, 2 * kOverflowExponent<T>);
  const T rstd = var == std::numeric_limits<T>::infinity()
                     ? std::ldexp(T(1) / std::sqrt(var_down), -kOverflowExponent<T>)
                     : T(1) / std::sqrt(var + eps);
  return {mu0 + std::ldexp(dev * inv_n, kOverflowExponent<T>), rstd};
}

}  // namespace vitfast
