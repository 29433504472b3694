// exp(x) for the float softmax loops of the CPU kernels (window_attention.cpp, rel_pos_attention.cpp) and GELU
// (linear_gelu.cpp): branch-free, one scalar and one 8-lane AVX + FMA version of the same algorithm (and std::exp
// for double). Cody and Waite's reduction as in Cephes' expf (S. L. Moshier, Cephes Math Library): x = n ln2 + r,
// n = x log2(e) rounded to nearest by adding and subtracting 1.5 * 2^23, ln2 in two parts; then
// exp(r) = 1 + r (1 + r P(r)), |r| <= ln2 / 2, P of degree 4 fitted to the relative error of exp (least squares
// iterated toward minimax: 3e-9 in exact arithmetic; Cephes' degree-5 P is more than fp32 needs); 2^n is built in
// float arithmetic (AVX without AVX2 has no 256-bit integer adds or shifts). Relative error on [-87, 88] against
// the double exp, on a grid of 3e-5: at most 1.3 ulp for the 8-lane version and 1.6 ulp for the scalar one
// without FMA (with Cephes' P: 1.4 ulp both); the 8-lane version is about 15% faster than with Cephes' P (0.36 vs
// 0.42 ns per element in a loop, one core of this project's AMD EPYC). For x <= 88; the result is 0 below about
// -87.7 (x is clamped at -88, where n = -127 and the bits of 2^n are 0), and NaN for NaN. use_avx_fma() says
// whether the 8-lane versions may run.
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

// 1.5 * 2^23: adding it to a float of magnitude below 2^22 rounds it to an integer (round to nearest even; IEEE
// arithmetic needed: -ffast-math would fold (x + magic) - magic into x).
constexpr float kRoundMagic = 12582912.0f;
// P's coefficients, constant term first.
constexpr float kExpP0 = 4.999999404e-1f, kExpP1 = 1.666652113e-1f, kExpP2 = 4.166838899e-2f,
                kExpP3 = 8.368710056e-3f, kExpP4 = 1.381460810e-3f;

C10_ALWAYS_INLINE float exp_op(float x) {
  const float xc = std::min(std::max(x, -88.0f), 88.0f);  // NaN stays NaN
  const float nf = (xc * 1.44269504088896341f + kRoundMagic) - kRoundMagic;
  const float r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
  float y = kExpP4;
  y = y * r + kExpP3;
  y = y * r + kExpP2;
  y = y * r + kExpP1;
  y = y * r + kExpP0;
  y = y * r + 1.0f;
  y = y * r + 1.0f;
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
  const __m256 magic = _mm256_set1_ps(kRoundMagic);
  const __m256 nf = _mm256_sub_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic), magic);
  __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(kExpP4), r, _mm256_set1_ps(kExpP3));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP2));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP1));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP0));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  const __m256 pow2 = _mm256_castsi256_ps(_mm256_cvttps_epi32(
      _mm256_fmadd_ps(nf, _mm256_set1_ps(8388608.0f), _mm256_set1_ps(127.0f * 8388608.0f))));
  return _mm256_mul_ps(y, pow2);
}
#endif

}  // namespace vitfast
