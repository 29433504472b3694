// Attention with decomposed relative positions (SAM, ViTDet, MViTv2), forward and backward, fused on the CPU.
//
// score[i, j] = scale * q_i . k_j + rel_h[i, j / kw] + rel_w[i, j % kw] for key j of a kh x kw key grid (MViTv2,
// Li et al. 2022, arXiv:2112.01526; segment_anything's add_decomposed_rel_pos). Schemas, semantics and the saved
// state (out in a (B, Nq, H, D) buffer; the softmax statistics lse (2, B, H, Nq) in op-math precision, the
// attention op's: each row's max score m and the log of its sum of exp(s - m), kept apart so that a huge finite
// score does not absorb the log, as m + log(l) would) are those of vitfast/ops/rel_pos_attention.py. No (Nq, Nk)
// buffer is ever allocated: this is FlashAttention (Dao et al. 2022, arXiv:2205.14135; FlashAttention-2,
// arXiv:2307.08691) blocked for CPU caches.
//
// Forward: (batch * head, query block) items, handed out in turns to the threads (parallel_items). K^T (in panels of
// 16 keys) and V (in panels of 16 head dims) are packed once per head in op-math. An item streams over key blocks of
// 512 keys: S = (scale * Q) @ K^T, then row by row the bias, segment by segment (a segment is a run of keys of one
// key-grid row: rel_h[i, row] + the contiguous rel_w[i, columns] vector), with the row max, the online softmax
// (running max and sum) on whole rows, and O += P @ V. Backward: an item per batch * head, so that its dK and dV
// accumulate without races: for each query block and key block it recomputes P = exp((S - m) - log l) from the saved
// statistics, forms dP = dO @ V^T and dS = P * (dP - rowsum(dO * O)), and reduces dS row by row into drel_h (sums
// over each key-grid row) and drel_w (over each column) while it is in cache; dQ += dS @ K, dK += dS^T @ Q,
// dV += P^T @ dO, with dS^T and P^T read in place through strides.
//
// The GEMMs are register-tiled here (see "GEMMs" below) rather than calls to ATen's CPU GEMM, which repacks its
// operands on every call of a block-sized product.
//
// fp32, fp16 and bf16 compute in fp32 (operands converted when packed), fp64 in fp64. The inner loops have AVX2 +
// FMA versions for fp32 (exp8 of exp_op.h), chosen at run time where the CPU has them and
// ATen's CPU capability (ATEN_CPU_CAPABILITY) is not "default"; elsewhere plain loops (which the compiler
// vectorizes for the baseline instruction set). No dropout: the op's backend choice sends dropout elsewhere.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/macros/Macros.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "exp_op.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VITFAST_RPA_AVX2 1
#include <immintrin.h>
#else
#define VITFAST_RPA_AVX2 0
#endif

namespace vitfast {
namespace {

template <typename A>
constexpr A kNegInf = -std::numeric_limits<A>::infinity();

bool use_avx2() {
#if VITFAST_RPA_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           (at::get_cpu_capability() == "AVX2" || at::get_cpu_capability() == "AVX512");
  return avx2;
#else
  return false;
#endif
}

// A run of keys of one key-grid row inside a key block: keys off .. off + len of the block are columns
// col .. col + len of row `row`.
struct Segment {
  int64_t row, col, len, off;
};

void key_segments(int64_t j0, int64_t j1, int64_t kw, std::vector<Segment>& segs) {
  segs.clear();
  for (int64_t j = j0; j < j1;) {
    const int64_t col = j % kw, len = std::min(kw - col, j1 - j);
    segs.push_back({j / kw, col, len, j - j0});
    j += len;
  }
}

// ---------------------------------------------------------------------------------------------- row loops

// s[0:n] += rh[row] + rw[col:col + len], segment by segment; returns max(s[0:n]).
template <typename A>
A add_bias_max_plain(A* C10_RESTRICT s, const Segment* segs, int64_t nseg, const A* C10_RESTRICT rh,
                     const A* C10_RESTRICT rw) {
  A mx = kNegInf<A>;
  for (int64_t g = 0; g < nseg; ++g) {
    const Segment sg = segs[g];
    const A h = rh[sg.row];
    A* x = s + sg.off;
    const A* w = rw + sg.col;
    for (int64_t t = 0; t < sg.len; ++t) {
      x[t] += h + w[t];
      mx = std::max(mx, x[t]);
    }
  }
  return mx;
}

// s[0:n] = exp((s[0:n] - m) - c); returns their sum.
template <typename A>
A exp_sub_sum_plain(A* C10_RESTRICT s, int64_t n, A m, A c) {
  A sum = 0;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp((s[t] - m) - c);
    sum += s[t];
  }
  return sum;
}

// dp[0:n] becomes dS = p * (dp - delta); drh[row] += its sum over each segment, drw[col + t] += each element.
template <typename A>
void grad_scores_plain(A* C10_RESTRICT dp, const A* C10_RESTRICT p, A delta, const Segment* segs, int64_t nseg,
                       A* C10_RESTRICT drh, A* C10_RESTRICT drw) {
  for (int64_t g = 0; g < nseg; ++g) {
    const Segment sg = segs[g];
    A* x = dp + sg.off;
    const A* pp = p + sg.off;
    A* w = drw + sg.col;
    A acc = 0;
    for (int64_t t = 0; t < sg.len; ++t) {
      x[t] = pp[t] * (x[t] - delta);
      acc += x[t];
      w[t] += x[t];
    }
    drh[sg.row] += acc;
  }
}

#if VITFAST_RPA_AVX2
// Lanes [0, n) of 8, n in [0, 8].
__attribute__((target("avx2"))) inline __m256i lane_mask(int64_t n) {
  static const int32_t bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + 8 - n));
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

__attribute__((target("avx2,fma"))) inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

__attribute__((target("avx2,fma"))) float add_bias_max_avx2(float* C10_RESTRICT s, const Segment* segs, int64_t nseg,
                                                          const float* C10_RESTRICT rh, const float* C10_RESTRICT rw) {
  const __m256 neg_inf = _mm256_set1_ps(kNegInf<float>);
  __m256 vmax = neg_inf;
  for (int64_t g = 0; g < nseg; ++g) {
    const Segment sg = segs[g];
    const __m256 h = _mm256_set1_ps(rh[sg.row]);
    float* x = s + sg.off;
    const float* w = rw + sg.col;
    int64_t t = 0;
    for (; t + 8 <= sg.len; t += 8) {
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + t), _mm256_add_ps(h, _mm256_loadu_ps(w + t)));
      _mm256_storeu_ps(x + t, v);
      vmax = _mm256_max_ps(vmax, v);
    }
    if (t < sg.len) {
      const __m256i m = lane_mask(sg.len - t);
      const __m256 v = _mm256_add_ps(_mm256_maskload_ps(x + t, m), _mm256_add_ps(h, _mm256_maskload_ps(w + t, m)));
      _mm256_maskstore_ps(x + t, m, v);
      vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(neg_inf, v, _mm256_castsi256_ps(m)));
    }
  }
  return hmax(vmax);
}

__attribute__((target("avx2,fma"))) float exp_sub_sum_avx2(float* C10_RESTRICT s, int64_t n, float m, float c) {
  const __m256 vm = _mm256_set1_ps(m), vc = _mm256_set1_ps(c);
  __m256 sum = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm), vc));
    _mm256_storeu_ps(s + t, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (t < n) {
    const __m256i mk = lane_mask(n - t);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_sub_ps(_mm256_maskload_ps(s + t, mk), vm), vc));
    _mm256_maskstore_ps(s + t, mk, e);
    sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(mk)));
  }
  return hsum(sum);
}

__attribute__((target("avx2,fma"))) void grad_scores_avx2(float* C10_RESTRICT dp, const float* C10_RESTRICT p,
                                                        float delta, const Segment* segs, int64_t nseg,
                                                        float* C10_RESTRICT drh, float* C10_RESTRICT drw) {
  const __m256 vd = _mm256_set1_ps(delta);
  for (int64_t g = 0; g < nseg; ++g) {
    const Segment sg = segs[g];
    float* x = dp + sg.off;
    const float* pp = p + sg.off;
    float* w = drw + sg.col;
    __m256 acc = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= sg.len; t += 8) {
      const __m256 ds = _mm256_mul_ps(_mm256_loadu_ps(pp + t), _mm256_sub_ps(_mm256_loadu_ps(x + t), vd));
      _mm256_storeu_ps(x + t, ds);
      _mm256_storeu_ps(w + t, _mm256_add_ps(_mm256_loadu_ps(w + t), ds));
      acc = _mm256_add_ps(acc, ds);
    }
    if (t < sg.len) {
      const __m256i m = lane_mask(sg.len - t);
      const __m256 ds = _mm256_mul_ps(_mm256_maskload_ps(pp + t, m), _mm256_sub_ps(_mm256_maskload_ps(x + t, m), vd));
      _mm256_maskstore_ps(x + t, m, ds);
      _mm256_maskstore_ps(w + t, m, _mm256_add_ps(_mm256_maskload_ps(w + t, m), ds));
      acc = _mm256_add_ps(acc, _mm256_and_ps(ds, _mm256_castsi256_ps(m)));
    }
    drh[sg.row] += hsum(acc);
  }
}
#endif

// ------------------------------------------------------------------------------------------------- GEMMs

// Every GEMM of both passes is c[M, Nc] (+)= a[M, K] @ b[K, Nc] with a read through two strides (a(i, k) at
// a[i * as + k * ak], so dS^T and P^T are read in place from dS and P) and b in column panels of kCols (b(k, j) at
// b[(j / kCols) * pb + k * ldb + j % kCols]: K^T and V^T pre-packed into contiguous panels, ldb = kCols, or plain
// rows, pb = kCols); Nc is a multiple of kCols (operands padded with zeros). A tile of R <= kRows rows and kCols
// columns accumulates over all of K in registers: with AVX2, 12 accumulators, two b vectors and a broadcast a(i, k),
// 15 of the 16 vector registers. In a microbenchmark on this project's 2-core AMD EPYC (AVX2, thread CPU time, other
// jobs running), S = Q @ K^T (64 x 512 x 64) ran at 93-95 GFLOP/s per core against pre-packed panels where
// at::native::cpublas::brgemm (MKL) gave 74-80, and O += P @ V (64 x 64 x 512) at 90-96 against V in panels.
constexpr int64_t kCols = 16;
constexpr int kRows = 6;

template <int R, typename A>
C10_ALWAYS_INLINE void tile_plain(const A* C10_RESTRICT a, int64_t as, int64_t ak, const A* C10_RESTRICT b,
                                  int64_t ldb, A* C10_RESTRICT c, int64_t ldc, int64_t K, bool add) {
  A acc[R][kCols] = {};
  for (int64_t k = 0; k < K; ++k) {
    const A* bk = b + k * ldb;
    for (int r = 0; r < R; ++r) {
      const A x = a[r * as + k * ak];
#pragma omp simd
      for (int64_t j = 0; j < kCols; ++j) acc[r][j] += x * bk[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t j = 0; j < kCols; ++j) c[r * ldc + j] = add ? c[r * ldc + j] + acc[r][j] : acc[r][j];
  }
}

template <typename A>
void gemm_plain(int64_t M, int64_t Nc, int64_t K, const A* a, int64_t as, int64_t ak, const A* b, int64_t ldb,
                int64_t pb, A* c, int64_t ldc, bool add) {
  for (int64_t j = 0; j < Nc; j += kCols) {
    const A* bj = b + j / kCols * pb;
    int64_t i = 0;
    for (; i + kRows <= M; i += kRows) tile_plain<kRows>(a + i * as, as, ak, bj, ldb, c + i * ldc + j, ldc, K, add);
    const A* ai = a + i * as;
    A* ci = c + i * ldc + j;
    switch (M - i) {
      case 1: tile_plain<1>(ai, as, ak, bj, ldb, ci, ldc, K, add); break;
      case 2: tile_plain<2>(ai, as, ak, bj, ldb, ci, ldc, K, add); break;
      case 3: tile_plain<3>(ai, as, ak, bj, ldb, ci, ldc, K, add); break;
      case 4: tile_plain<4>(ai, as, ak, bj, ldb, ci, ldc, K, add); break;
      case 5: tile_plain<5>(ai, as, ak, bj, ldb, ci, ldc, K, add); break;
      default: break;
    }
  }
}

#if VITFAST_RPA_AVX2
// Accumulators in named variables: GCC keeps an array of them on the stack, storing every one each iteration.
#define VITFAST_RPA_FMA_ROW(r)                                             \
  if constexpr (R > r) {                                                   \
    const __m256 x = _mm256_broadcast_ss(a##r + off);                      \
    c##r##0 = _mm256_fmadd_ps(x, b0, c##r##0);                             \
    c##r##1 = _mm256_fmadd_ps(x, b1, c##r##1);                             \
  }
#define VITFAST_RPA_STORE_ROW(r)                                           \
  if constexpr (R > r) {                                                   \
    float* cr = c + r * ldc;                                               \
    if (add) {                                                             \
      c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(cr));               \
      c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(cr + 8));           \
    }                                                                      \
    _mm256_storeu_ps(cr, c##r##0);                                         \
    _mm256_storeu_ps(cr + 8, c##r##1);                                     \
  }

template <int R>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const float* C10_RESTRICT a, int64_t as, int64_t ak,
                                                         const float* C10_RESTRICT b, int64_t ldb,
                                                         float* C10_RESTRICT c, int64_t ldc, int64_t K, bool add) {
  static_assert(R >= 1 && R <= kRows, "tile_avx2 takes 1 to 6 rows");
  // Rows past R alias row 0 (never read), so that no pointer leaves the operand.
  const float *a0 = a, *a1 = a + (R > 1) * as, *a2 = a + (R > 2) * 2 * as, *a3 = a + (R > 3) * 3 * as,
              *a4 = a + (R > 4) * 4 * as, *a5 = a + (R > 5) * 5 * as;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
    const int64_t off = k * ak;
    VITFAST_RPA_FMA_ROW(0)
    VITFAST_RPA_FMA_ROW(1)
    VITFAST_RPA_FMA_ROW(2)
    VITFAST_RPA_FMA_ROW(3)
    VITFAST_RPA_FMA_ROW(4)
    VITFAST_RPA_FMA_ROW(5)
  }
  VITFAST_RPA_STORE_ROW(0)
  VITFAST_RPA_STORE_ROW(1)
  VITFAST_RPA_STORE_ROW(2)
  VITFAST_RPA_STORE_ROW(3)
  VITFAST_RPA_STORE_ROW(4)
  VITFAST_RPA_STORE_ROW(5)
}
#undef VITFAST_RPA_FMA_ROW
#undef VITFAST_RPA_STORE_ROW

__attribute__((target("avx2,fma"))) void gemm_avx2(int64_t M, int64_t Nc, int64_t K, const float* a, int64_t as,
                                                 int64_t ak, const float* b, int64_t ldb, int64_t pb, float* c,
                                                 int64_t ldc, bool add) {
  for (int64_t j = 0; j < Nc; j += kCols) {
    const float* bj = b + j / kCols * pb;
    int64_t i = 0;
    for (; i + kRows <= M; i += kRows) tile_avx2<kRows>(a + i * as, as, ak, bj, ldb, c + i * ldc + j, ldc, K, add);
    const float* ai = a + i * as;
    float* ci = c + i * ldc + j;
    switch (M - i) {
      case 1: tile_avx2<1>(ai, as, ak, bj, ldb, ci, ldc, K, add); break;
      case 2: tile_avx2<2>(ai, as, ak, bj, ldb, ci, ldc, K, add); break;
      case 3: tile_avx2<3>(ai, as, ak, bj, ldb, ci, ldc, K, add); break;
      case 4: tile_avx2<4>(ai, as, ak, bj, ldb, ci, ldc, K, add); break;
      case 5: tile_avx2<5>(ai, as, ak, bj, ldb, ci, ldc, K, add); break;
      default: break;
    }
  }
}
#endif

// The inner loops, AVX2 + FMA for fp32 where use_avx2(), else plain loops.
template <typename A>
struct Kernels {
  bool avx2 = std::is_same_v<A, float> && use_avx2();

  void gemm(int64_t M, int64_t Nc, int64_t K, const A* a, int64_t as, int64_t ak, const A* b, int64_t ldb, int64_t pb,
            A* c, int64_t ldc, bool add) const {
#if VITFAST_RPA_AVX2
    if constexpr (std::is_same_v<A, float>) {
      if (avx2) return gemm_avx2(M, Nc, K, a, as, ak, b, ldb, pb, c, ldc, add);
    }
#endif
    gemm_plain(M, Nc, K, a, as, ak, b, ldb, pb, c, ldc, add);
  }

  A add_bias_max(A* s, const Segment* segs, int64_t nseg, const A* rh, const A* rw) const {
#if VITFAST_RPA_AVX2
    if constexpr (std::is_same_v<A, float>) {
      if (avx2) return add_bias_max_avx2(s, segs, nseg, rh, rw);
    }
#endif
    return add_bias_max_plain(s, segs, nseg, rh, rw);
  }

  A exp_sub_sum(A* s, int64_t n, A m, A c) const {
#if VITFAST_RPA_AVX2
    if constexpr (std::is_same_v<A, float>) {
      if (avx2) return exp_sub_sum_avx2(s, n, m, c);
    }
#endif
    return exp_sub_sum_plain(s, n, m, c);
  }

  void grad_scores(A* dp, const A* p, A delta, const Segment* segs, int64_t nseg, A* drh, A* drw) const {
#if VITFAST_RPA_AVX2
    if constexpr (std::is_same_v<A, float>) {
      if (avx2) return grad_scores_avx2(dp, p, delta, segs, nseg, drh, drw);
    }
#endif
    grad_scores_plain(dp, p, delta, segs, nseg, drh, drw);
  }
};

// --------------------------------------------------------------------------------------------- packing

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// dst(j, d) = mult * src(j, d) for j < n, d < D, converted to T; src(j, d) at src[j * sj + d * sd], dst(j, d) at
// dst[j * tj + d * td]. Row by row where both rows are contiguous, else in tiles of 16 j's, so that a transpose
// walks neither side with one large stride alone.
template <typename S, typename T, typename A>
void copy_2d(const S* C10_RESTRICT src, int64_t sj, int64_t sd, T* C10_RESTRICT dst, int64_t tj, int64_t td, int64_t n,
             int64_t D, A mult) {
  if (sd == 1 && td == 1) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t d = 0; d < D; ++d) dst[j * tj + d] = static_cast<T>(static_cast<A>(src[j * sj + d]) * mult);
    }
    return;
  }
  constexpr int64_t kTile = 16;
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    const int64_t j1 = std::min(n, j0 + kTile);
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t j = j0; j < j1; ++j) {
        dst[j * tj + d * td] = static_cast<T>(static_cast<A>(src[j * sj + d * sd]) * mult);
      }
    }
  }
}

// src (n x D, strides sj, sd) transposed into panels of kCols rows: dst[p, d, t] = src(p * kCols + t, d), zero for
// p * kCols + t >= n; panel stride D * kCols. The b operand of S = Q @ K^T and dP = dO @ V^T.
template <typename S, typename A>
void pack_key_panels(const S* src, int64_t sj, int64_t sd, int64_t n, int64_t D, A* dst) {
  for (int64_t j0 = 0; j0 < n; j0 += kCols) {
    A* panel = dst + j0 * D;
    const int64_t len = std::min(kCols, n - j0);
    copy_2d(src + j0 * sj, sj, sd, panel, int64_t{1}, kCols, len, D, A(1));
    for (int64_t d = 0; d < D && len < kCols; ++d) std::fill(panel + d * kCols + len, panel + (d + 1) * kCols, A(0));
  }
}

// src (n x D, strides sj, sd) times mult in panels of kCols columns: dst[p, j, t] = mult * src(j, p * kCols + t),
// zero for p * kCols + t >= D; panel stride rows * kCols (rows >= n). The b operand of O += P @ V, dQ += dS @ K,
// dK += dS^T @ Q and dV += P^T @ dO: each step of a tile then reads one contiguous 64-byte row.
template <typename S, typename A>
void pack_dim_panels(const S* src, int64_t sj, int64_t sd, int64_t n, int64_t D, int64_t rows, A* dst, A mult) {
  for (int64_t d0 = 0; d0 < D; d0 += kCols) {
    A* panel = dst + d0 / kCols * rows * kCols;
    const int64_t width = std::min(kCols, D - d0);
    copy_2d(src + d0 * sd, sj, sd, panel, kCols, int64_t{1}, n, width, mult);
    for (int64_t j = 0; j < n && width < kCols; ++j) {
      std::fill(panel + j * kCols + width, panel + (j + 1) * kCols, A(0));
    }
  }
}

// ------------------------------------------------------------------------------------------------ kernels

// run(next) on each of at::parallel_for's threads, where next() returns the next of the items [0, n) not yet taken
// (-1 when none is left): the items are handed out in turns from an atomic counter rather than split into equal
// ranges up front, so that a core that runs slower (other jobs, a shared VM's neighbours) takes fewer items instead
// of holding up the call. On this project's 2-core VM the SAM-B global layer's forward ran 10% faster so (interleaved
// medians of 11: 426 vs 477 ms and 407 vs 455 ms). Each item writes outputs of its own, so results do not depend on
// which thread ran it.
template <typename F>
void parallel_items(int64_t n, const F& run) {
  std::atomic<int64_t> counter{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    run([&] {
      const int64_t i = counter.fetch_add(1, std::memory_order_relaxed);
      return i < n ? i : int64_t{-1};
    });
  });
}

constexpr int64_t kQueryBlock = 64;  // rows of a query block, about (see make_args)
constexpr int64_t kKeyBlock = 512;   // keys of a key block (a multiple of kCols: blocks start at a panel)

template <typename scalar_t, typename A>
struct Args {
  int64_t B, H, Nq, Nk, D, kh, kw;
  int64_t Dp;   // D rounded up to kCols: the width of padded rows
  int64_t nqb;  // query blocks per (batch, head)
  int64_t qS;   // rows of a query block (the last may have fewer)
  int64_t kS;   // keys per key block
  int64_t nkb;  // key blocks per (batch, head)
  int64_t kSp;  // leading dimension of score rows: kS + kCols, off the multiples of 4 KiB at which rows would share
                // cache sets (ATen's GEMM ran S = Q @ K^T at half speed with rows 16 KiB apart)
  int64_t np;   // elements of one head's packed panels: round_up(Nk, kCols) * D
  A scale;
  const scalar_t* q;
  int64_t qs[4];
  const scalar_t* k;
  int64_t ks[4];
  const scalar_t* v;
  int64_t vs[4];
  const A* rh;  // rel_h (B|1, H|1, Nq, kh) in op-math, unit inner stride, strides rhs (0 on broadcast dims)
  int64_t rhs[3];
  const A* rw;
  int64_t rws[3];
  // Forward.
  const A* kp;    // (B * H, np): K^T of each head in key panels (pack_key_panels)
  const A* vp;    // (B * H, Dp * Nk): V of each head in dim panels (pack_dim_panels)
  scalar_t* out;  // (B, Nq, H, D) contiguous
  A* lse;         // (2, B, H, Nq) contiguous: row max m (-inf: no visible key) and log(sum exp(s - m)) (0 then)
  // Backward.
  const scalar_t* o;  // the forward's out, strides os
  int64_t os[4];
  const scalar_t* dout;
  int64_t dos[4];
  scalar_t* dq;  // (B, Nq, H, D) contiguous; dk, dv (B, Nk, H, D)
  scalar_t* dk;
  scalar_t* dv;
  A* drh;  // (B, H, Nq, kh) contiguous
  A* drw;  // (B, H, Nq, kw) contiguous

  int64_t q_begin(int64_t qb) const { return std::min(Nq, qb * qS); }
  int64_t k_block_size(int64_t jb) const { return std::min(kS, Nk - jb * kS); }
  const A* rel_h_row(int64_t b, int64_t h, int64_t i) const { return rh + b * rhs[0] + h * rhs[1] + i * rhs[2]; }
  const A* rel_w_row(int64_t b, int64_t h, int64_t i) const { return rw + b * rws[0] + h * rws[1] + i * rws[2]; }
};

// Forward items of (batch * head, query block), as next() hands them out.
template <typename scalar_t, typename A, typename Next>
void fwd_items(const Args<scalar_t, A>& a, const Next& next) {
  const Kernels<A> ker;
  const int64_t D = a.D, Dp = a.Dp, qS = a.qS, kSp = a.kSp;
  std::vector<A> qbuf(qS * D), s(qS * kSp), o(qS * Dp), m(qS), l(qS);
  std::vector<Segment> segs;
  for (int64_t item = next(); item >= 0; item = next()) {
    const int64_t bh = item / a.nqb, qb = item % a.nqb, b = bh / a.H, h = bh % a.H;
    const int64_t i0 = a.q_begin(qb), M = a.q_begin(qb + 1) - i0;
    copy_2d(a.q + b * a.qs[0] + h * a.qs[1] + i0 * a.qs[2], a.qs[2], a.qs[3], qbuf.data(), D, int64_t{1}, M, D,
            a.scale);
    std::fill(o.begin(), o.end(), A(0));
    std::fill(m.begin(), m.end(), kNegInf<A>);
    std::fill(l.begin(), l.end(), A(0));
    for (int64_t jb = 0; jb < a.nkb; ++jb) {
      const int64_t j0 = jb * a.kS, N = a.k_block_size(jb);
      key_segments(j0, j0 + N, a.kw, segs);
      ker.gemm(M, round_up(N, kCols), D, qbuf.data(), D, 1, a.kp + bh * a.np + j0 * D, kCols, D * kCols, s.data(),
               kSp, false);
      for (int64_t i = 0; i < M; ++i) {
        A* si = s.data() + i * kSp;
        const A mx = ker.add_bias_max(si, segs.data(), static_cast<int64_t>(segs.size()), a.rel_h_row(b, h, i0 + i),
                                      a.rel_w_row(b, h, i0 + i));
        const A m_new = std::max(m[i], mx);
        // A row whose bias is -inf everywhere so far keeps max -inf: subtracting 0 keeps its exps at 0, not NaN.
        const A m_safe = m_new == kNegInf<A> ? A(0) : m_new;
        const A alpha = std::exp(m[i] - m_safe);
        l[i] = l[i] * alpha + ker.exp_sub_sum(si, N, m_safe, A(0));
        m[i] = m_new;
        if (alpha != A(1)) {
          for (int64_t d = 0; d < Dp; ++d) o[i * Dp + d] *= alpha;
        }
      }
      ker.gemm(M, Dp, N, s.data(), kSp, 1, a.vp + bh * a.Nk * Dp + j0 * kCols, kCols, a.Nk * kCols, o.data(), Dp,
               true);
    }
    for (int64_t i = 0; i < M; ++i) {
      const bool empty = l[i] == A(0);
      const A inv = empty ? A(0) : A(1) / l[i];
      scalar_t* dst = a.out + ((b * a.Nq + i0 + i) * a.H + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[i * Dp + d] * inv);
      a.lse[bh * a.Nq + i0 + i] = m[i];
      a.lse[(a.B * a.H + bh) * a.Nq + i0 + i] = empty ? A(0) : std::log(l[i]);
    }
  }
}

// Backward of the (batch * head) items that next() hands out, every query block of each.
template <typename scalar_t, typename A, typename Next>
void bwd_items(const Args<scalar_t, A>& a, const Next& next) {
  const Kernels<A> ker;
  const int64_t D = a.D, Dp = a.Dp, Nk = a.Nk, qS = a.qS, kSp = a.kSp, kh = a.kh, kw = a.kw;
  // K^T and V^T in key panels (b of S and dP), K in dim panels (b of dQ), and the dK, dV accumulators; per query
  // block, scale * q rows (a of S), q and dO in dim panels (b of dK and dV), dO rows (a of dP).
  std::vector<A> kp(a.np), vp(a.np), kd(Nk * Dp), dk(Nk * Dp), dv(Nk * Dp);
  std::vector<A> qbuf(qS * D), qd(qS * Dp), dob(qS * D), dod(qS * Dp), s(qS * kSp), dp(qS * kSp), dq(qS * Dp);
  std::vector<A> row_max(qS), log_sum(qS), delta(qS);
  std::vector<A> drh(qS * kh), drw(qS * kw);
  std::vector<Segment> segs;
  const A one(1);
  for (int64_t bh = next(); bh >= 0; bh = next()) {
    const int64_t b = bh / a.H, h = bh % a.H;
    const scalar_t* k = a.k + b * a.ks[0] + h * a.ks[1];
    const scalar_t* v = a.v + b * a.vs[0] + h * a.vs[1];
    pack_key_panels(k, a.ks[2], a.ks[3], Nk, D, kp.data());
    pack_key_panels(v, a.vs[2], a.vs[3], Nk, D, vp.data());
    pack_dim_panels(k, a.ks[2], a.ks[3], Nk, D, Nk, kd.data(), one);
    std::fill(dk.begin(), dk.end(), A(0));
    std::fill(dv.begin(), dv.end(), A(0));
    for (int64_t qb = 0; qb < a.nqb; ++qb) {
      const int64_t i0 = a.q_begin(qb), M = a.q_begin(qb + 1) - i0;
      const scalar_t* q = a.q + b * a.qs[0] + h * a.qs[1] + i0 * a.qs[2];
      const scalar_t* o = a.o + b * a.os[0] + h * a.os[1] + i0 * a.os[2];
      const scalar_t* dout = a.dout + b * a.dos[0] + h * a.dos[1] + i0 * a.dos[2];
      copy_2d(q, a.qs[2], a.qs[3], qbuf.data(), D, int64_t{1}, M, D, a.scale);
      pack_dim_panels(q, a.qs[2], a.qs[3], M, D, qS, qd.data(), one);
      copy_2d(dout, a.dos[2], a.dos[3], dob.data(), D, int64_t{1}, M, D, one);
      pack_dim_panels(dout, a.dos[2], a.dos[3], M, D, qS, dod.data(), one);
      for (int64_t i = 0; i < M; ++i) {
        if (a.nkb > 1) {  // (one key block: delta is rowsum(P * dP), formed with the scores below)
          A sum = 0;
          for (int64_t d = 0; d < D; ++d) sum += dob[i * D + d] * static_cast<A>(o[i * a.os[2] + d * a.os[3]]);
          delta[i] = sum;
        }
        // A row with no visible key (m = -inf) has all scores -inf: subtracting +inf keeps its P at 0, not NaN.
        const A mx = a.lse[bh * a.Nq + i0 + i];
        row_max[i] = mx == kNegInf<A> ? std::numeric_limits<A>::infinity() : mx;
        log_sum[i] = a.lse[(a.B * a.H + bh) * a.Nq + i0 + i];
      }
      std::fill(dq.begin(), dq.end(), A(0));
      std::fill(drh.begin(), drh.end(), A(0));
      std::fill(drw.begin(), drw.end(), A(0));
      for (int64_t jb = 0; jb < a.nkb; ++jb) {
        const int64_t j0 = jb * a.kS, N = a.k_block_size(jb), Nc = round_up(N, kCols);
        key_segments(j0, j0 + N, kw, segs);
        const int64_t nseg = static_cast<int64_t>(segs.size());
        ker.gemm(M, Nc, D, qbuf.data(), D, 1, kp.data() + j0 * D, kCols, D * kCols, s.data(), kSp, false);
        ker.gemm(M, Nc, D, dob.data(), D, 1, vp.data() + j0 * D, kCols, D * kCols, dp.data(), kSp, false);
        for (int64_t i = 0; i < M; ++i) {
          A* si = s.data() + i * kSp;
          ker.add_bias_max(si, segs.data(), nseg, a.rel_h_row(b, h, i0 + i), a.rel_w_row(b, h, i0 + i));
          ker.exp_sub_sum(si, N, row_max[i], log_sum[i]);
          if (a.nkb == 1) {
            // The whole row is in this block: delta = rowsum(P * dP) (as the torch backend), which cancels dP's own
            // rounding where the softmax saturates (exact dS 0; rowsum(dO * O) left ~1 ulp of dP, summed over the
            // queries into dK and the rel terms' gradients). Rows over several blocks keep FlashAttention-2's.
            const A* dpi = dp.data() + i * kSp;
            A sum = 0;
            for (int64_t j = 0; j < N; ++j) sum += si[j] == A(0) ? A(0) : si[j] * dpi[j];
            delta[i] = sum;
          }
          ker.grad_scores(dp.data() + i * kSp, si, delta[i], segs.data(), nseg, drh.data() + i * kh,
                          drw.data() + i * kw);
        }
        // dQ += dS @ K; dK += dS^T @ Q and dV += P^T @ dO, dS^T and P^T read in place.
        ker.gemm(M, Dp, N, dp.data(), kSp, 1, kd.data() + j0 * kCols, kCols, Nk * kCols, dq.data(), Dp, true);
        ker.gemm(N, Dp, M, dp.data(), 1, kSp, qd.data(), kCols, qS * kCols, dk.data() + j0 * Dp, Dp, true);
        ker.gemm(N, Dp, M, s.data(), 1, kSp, dod.data(), kCols, qS * kCols, dv.data() + j0 * Dp, Dp, true);
      }
      copy_2d(dq.data(), Dp, int64_t{1}, a.dq + ((b * a.Nq + i0) * a.H + h) * D, a.H * D, int64_t{1}, M, D, a.scale);
      std::copy(drh.begin(), drh.begin() + M * kh, a.drh + (bh * a.Nq + i0) * kh);
      std::copy(drw.begin(), drw.begin() + M * kw, a.drw + (bh * a.Nq + i0) * kw);
    }
    copy_2d(dk.data(), Dp, int64_t{1}, a.dk + (b * Nk * a.H + h) * D, a.H * D, int64_t{1}, Nk, D, a.scale);
    copy_2d(dv.data(), Dp, int64_t{1}, a.dv + (b * Nk * a.H + h) * D, a.H * D, int64_t{1}, Nk, D, one);
  }
}

// ----------------------------------------------------------------------------------------------- boundary

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& rel_h, const at::Tensor& rel_w) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "vitfast ", op, ": q, k, v must be 4-D (B, H, N, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "vitfast ", op, ": q, k, v must have one dtype, got ",
              dt, ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "vitfast ", op,
              ": dtype must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "vitfast ", op,
              " (cpu): q, k, v must be CPU tensors, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && k.sizes() == v.sizes() && q.size(3) == k.size(3),
              "vitfast ", op, ": q (B, H, Nq, D) and k, v (B, H, Nk, D) do not agree: ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  for (const at::Tensor* rel : {&rel_h, &rel_w}) {
    TORCH_CHECK(rel->dim() == 4 && (rel->size(0) == 1 || rel->size(0) == q.size(0)) &&
                    (rel->size(1) == 1 || rel->size(1) == q.size(1)) && rel->size(2) == q.size(2) &&
                    at::isFloatingType(rel->scalar_type()) && rel->device() == q.device(),
                "vitfast ", op, ": rel_h and rel_w must be floating point (B|1, H|1, Nq, n) tensors on ", q.device(),
                " for q ", q.sizes(), ", got ", rel_h.sizes(), " ", rel_h.scalar_type(), " and ", rel_w.sizes(), " ",
                rel_w.scalar_type());
  }
  TORCH_CHECK(rel_h.size(3) * rel_w.size(3) == k.size(2), "vitfast ", op, ": k has Nk = ", k.size(2),
              " keys but rel_h and rel_w give a kh x kw = ", rel_h.size(3), " x ", rel_w.size(3), " key grid");
}

// (B, H, N, D) laid out as (B, N, H, D), the layout every backend returns; not a transposed view, which autograd
// would refuse to modify in place as an op's output.
at::Tensor bnhd_empty(int64_t B, int64_t H, int64_t N, int64_t D, const at::TensorOptions& options) {
  return at::empty_strided({B, H, N, D}, {N * H * D, D, H * D, 1}, options);
}

// The term in op-math with unit inner stride (a copy only where needed), and its strides over (B, H, Nq) with 0 on
// broadcast dims.
at::Tensor rel_term(const at::Tensor& rel, at::ScalarType acc, int64_t* strides) {
  at::Tensor t = rel.to(acc);
  if (t.stride(3) != 1 && t.size(3) > 1) t = t.contiguous();
  for (int d = 0; d < 3; ++d) strides[d] = t.size(d) == 1 ? 0 : t.stride(d);
  return t;
}

// Arguments of a call with B * H * Nq > 0 and Nk > 0.
template <typename scalar_t, typename A>
Args<scalar_t, A> make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rh,
                            const at::Tensor& rw, const int64_t* hs, const int64_t* ws, double scale) {
  Args<scalar_t, A> a{};
  a.B = q.size(0);
  a.H = q.size(1);
  a.Nq = q.size(2);
  a.D = q.size(3);
  a.Nk = k.size(2);
  a.kh = rh.size(3);
  a.kw = rw.size(3);
  a.Dp = round_up(a.D, kCols);
  // Query blocks of about kQueryBlock rows, rounded up to whole GEMM tiles (kRows) but for the last: a remainder
  // tile costs nearly a full one (SAM's windows of 196 tokens as 4 balanced blocks of 49 = 8 x 6 + 1 would pay a
  // 1-row tile per block; blocks of 54 leave one 34-row block).
  const int64_t nqb = (a.Nq + kQueryBlock - 1) / kQueryBlock;
  a.qS = round_up((a.Nq + nqb - 1) / nqb, kRows);
  a.nqb = (a.Nq + a.qS - 1) / a.qS;
  a.kS = kKeyBlock;
  a.nkb = (a.Nk + a.kS - 1) / a.kS;
  a.kSp = a.kS + kCols;
  a.np = round_up(a.Nk, kCols) * a.D;
  a.scale = static_cast<A>(scale);
  a.q = q.const_data_ptr<scalar_t>();
  a.k = k.const_data_ptr<scalar_t>();
  a.v = v.const_data_ptr<scalar_t>();
  for (int d = 0; d < 4; ++d) {
    a.qs[d] = q.stride(d);
    a.ks[d] = k.stride(d);
    a.vs[d] = v.stride(d);
  }
  a.rh = rh.const_data_ptr<A>();
  a.rw = rw.const_data_ptr<A>();
  std::copy(hs, hs + 3, a.rhs);
  std::copy(ws, ws + 3, a.rws);
  return a;
}

std::tuple<at::Tensor, at::Tensor> rel_pos_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& rel_h,
                                                             const at::Tensor& rel_w, double scale) {
  check_inputs("rel_pos_attention_fwd", q, k, v, rel_h, rel_w);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  const auto acc = at::toOpMathType(q.scalar_type());
  at::Tensor out = bnhd_empty(B, H, Nq, D, q.options());
  at::Tensor lse = at::empty({2, B, H, Nq}, q.options().dtype(acc));
  if (B * H * Nq == 0 || Nk == 0) {
    out.zero_();
    lse[0].fill_(-std::numeric_limits<double>::infinity());
    lse[1].zero_();
    return {out, lse};
  }
  int64_t hs[3], ws[3];
  const at::Tensor rh = rel_term(rel_h, acc, hs), rw = rel_term(rel_w, acc, ws);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vitfast_rel_pos_attention_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    Args<scalar_t, A> a = make_args<scalar_t, A>(q, k, v, rh, rw, hs, ws, scale);
    // K^T and V in panels, once per head for all its query blocks.
    at::Tensor kp = at::empty({B * H, a.np}, q.options().dtype(acc));
    at::Tensor vp = at::empty({B * H, a.Dp * Nk}, q.options().dtype(acc));
    A* kpp = kp.mutable_data_ptr<A>();
    A* vpp = vp.mutable_data_ptr<A>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        pack_key_panels(a.k + b * a.ks[0] + h * a.ks[1], a.ks[2], a.ks[3], Nk, D, kpp + bh * a.np);
        pack_dim_panels(a.v + b * a.vs[0] + h * a.vs[1], a.vs[2], a.vs[3], Nk, D, Nk, vpp + bh * a.Dp * Nk, A(1));
      }
    });
    a.kp = kpp;
    a.vp = vpp;
    a.out = out.mutable_data_ptr<scalar_t>();
    a.lse = lse.mutable_data_ptr<A>();
    parallel_items(B * H * a.nqb, [&](const auto& next) { fwd_items(a, next); });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rel_pos_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel_h,
    const at::Tensor& rel_w, const at::Tensor& out, const at::Tensor& lse_in, double scale) {
  constexpr const char* op = "rel_pos_attention_bwd";
  check_inputs(op, q, k, v, rel_h, rel_w);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "vitfast ", op, ": dout ", dout.sizes(), " ", dout.scalar_type(), " and out ", out.sizes(), " ",
              out.scalar_type(), " must have the shape and dtype of q ", q.sizes(), " ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  const auto acc = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(lse_in.dim() == 4 && lse_in.size(0) == 2 && lse_in.size(1) == B && lse_in.size(2) == H &&
                  lse_in.size(3) == Nq,
              "vitfast ", op, ": lse must be (2, B, H, Nq) for q ", q.sizes(), ", got ", lse_in.sizes());
  const at::Tensor lse = lse_in.to(acc).contiguous();
  at::Tensor dq = bnhd_empty(B, H, Nq, D, q.options());
  at::Tensor dk = bnhd_empty(B, H, Nk, D, q.options());
  at::Tensor dv = bnhd_empty(B, H, Nk, D, q.options());
  at::Tensor drh = at::empty({B, H, Nq, rel_h.size(3)}, q.options().dtype(acc));
  at::Tensor drw = at::empty({B, H, Nq, rel_w.size(3)}, q.options().dtype(acc));
  if (B * H * Nq == 0 || Nk == 0) {
    for (at::Tensor* t : {&dq, &dk, &dv, &drh, &drw}) t->zero_();
  } else {
    int64_t hs[3], ws[3];
    const at::Tensor rh = rel_term(rel_h, acc, hs), rw = rel_term(rel_w, acc, ws);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vitfast_rel_pos_attention_bwd", [&] {
      using A = at::opmath_type<scalar_t>;
      Args<scalar_t, A> a = make_args<scalar_t, A>(q, k, v, rh, rw, hs, ws, scale);
      a.lse = const_cast<A*>(lse.const_data_ptr<A>());
      a.o = out.const_data_ptr<scalar_t>();
      a.dout = dout.const_data_ptr<scalar_t>();
      for (int d = 0; d < 4; ++d) {
        a.os[d] = out.stride(d);
        a.dos[d] = dout.stride(d);
      }
      a.dq = dq.mutable_data_ptr<scalar_t>();
      a.dk = dk.mutable_data_ptr<scalar_t>();
      a.dv = dv.mutable_data_ptr<scalar_t>();
      a.drh = drh.mutable_data_ptr<A>();
      a.drw = drw.mutable_data_ptr<A>();
      parallel_items(B * H, [&](const auto& next) { bwd_items(a, next); });
    });
  }
  // Gradients of broadcast terms summed over their broadcast dims, in the terms' dtypes (copies: returns must not
  // share storage).
  return {dq, dk, dv,
          drh.sum_to_size(rel_h.sizes()).to(rel_h.scalar_type(), false, true),
          drw.sum_to_size(rel_w.sizes()).to(rel_w.scalar_type(), false, true)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("rel_pos_attention_fwd", &rel_pos_attention_fwd_cpu);
  m.impl("rel_pos_attention_bwd", &rel_pos_attention_bwd_cpu);
}

}  // namespace vitfast
