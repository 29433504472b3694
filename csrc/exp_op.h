// exp(x) for the float softmax loops of the CPU kernels (window_attention.cpp, rel_pos_attention.cpp): Cephes'
// expf (S. L. Moshier, Cephes Math Library; relative error ~2 ulp), branch-free, one scalar and one 8-lane AVX + FMA
// version of the same algorithm (and std::exp for double). x = n ln2 + r with n = floor(x log2(e) + 1/2), exp(r) by
// Cephes' polynomial, 2^n built in float arithmetic (AVX without AVX2 has no 256-bit integer adds or shifts). For
// x <= 88; the result is 0 below about -87.7 (x is clamped at -88, where n = -127 and the bits of 2^n are 0), and
// NaN for NaN. use_avx_fma() says whether the 8-lane versions may run.
#pragma once

#include <ATen/Version.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VITFAST_EXP_AVX 1
#include <immintrin.h>
#else
#define VITFAST_EXP_AVX 0
#endif

namespace vitfast {

// Whether the CPU has AVX and FMA; ATEN_CPU_CAPABILITY=default turns the vector paths off too, so that CI proves
// the scalar ones on any machine.
inline bool use_avx_fma() {
#if VITFAST_EXP_AVX
  static const bool avx = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma") &&
                          at::get_cpu_capability() != "DEFAULT";
  return avx;
#else
  return false;
#endif
}

C10_ALWAYS_INLINE float exp_op(float x) {
  const float xc = std::min(std::max(x, -88.0f), 88.0f);  // NaN stays NaN
  const float fx = xc * 1.44269504088896341f + 0.5f;
  // floor(fx) by conversions, so that loops over exp_op vectorize without SSE4.1's round.
  float nf = static_cast<float>(static_cast<int32_t>(fx));
  nf -= nf > fx ? 1.0f : 0.0f;
  const float r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = static_cast<int32_t>((nf + 127.0f) * 8388608.0f);
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return y * pow2;
}

C10_ALWAYS_INLINE double exp_op(double x) { return std::exp(x); }

#if VITFAST_EXP_AVX
__attribute__((target("avx,fma"))) inline __m256 exp8(__m256 x) {
  // max(lo, x) and min(hi, .) return their second operand for NaN.
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-88.0f), x));
  const __m256 nf = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(y, r), r, r), _mm256_set1_ps(1.0f));
  const __m256 pow2 = _mm256_castsi256_ps(_mm256_cvttps_epi32(
      _mm256_fmadd_ps(nf, _mm256_set1_ps(8388608.0f), _mm256_set1_ps(127.0f * 8388608.0f))));
  return _mm256_mul_ps(y, pow2);
}
#endif

}  // namespace vitfast
