// Swin (shifted) window attention, forward and backward, fused on the CPU.
//
// Swin Transformer (Liu et al. 2021, arXiv:2103.14030) and Swin-V2 cosine attention (Liu et al. 2022,
// arXiv:2111.09883). Schemas, semantics and the saved state (out, lse) are those of
// vitfast/ops/window_attention.py (module docstring). Nothing is materialized in window layout: each
// (batch, window, head) work item of an at::parallel_for gathers its window's q, k, v rows straight from
// the strided (B, H, W, 3, heads, D) qkv by index arithmetic (cyclic shift, padding pixels taking
// pad_qkv), forms the N x N scores in a local buffer (N = 49 or 144 in Swin) with the relative-position
// bias and the shift-region mask computed from coordinates, takes the softmax in op-math precision, and
// scatters P @ V un-shifted into the (B, H, W, heads * D) output. The backward recomputes P from q, k
// and lse (as FlashAttention does, Dao et al. 2022, arXiv:2205.14135), writes dq, dk, dv to the source
// pixels, and reduces dbias, dpad_qkv and dlogit_scale through per-chunk op-math partials summed in a
// fixed order (deterministic for a given thread count).
//
// The small GEMMs (c = a @ bT, all row-major: K is transposed once per item) accumulate 4-row x 64-byte
// register tiles over the whole reduction, so they vectorize and keep their sums in registers; exp is
// Cephes' expf polynomial, 8 lanes at a time with AVX. The work-item loops are force-inlined templates
// instantiated twice: a baseline x86-64 copy and an AVX + FMA copy (a GCC/Clang target attribute),
// chosen at run time. fp32/fp16/bf16 compute in fp32, fp64 in fp64 (op-math).
//
// Dropout: the keep mask is a splitmix64 hash of (seed, b, head, window, i, j), so forward and backward
// agree; it is this backend's own draw (each backend draws its own bits), and dropout_p = 0 is exact.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VITFAST_WA_AVX 1
#include <immintrin.h>
#else
#define VITFAST_WA_AVX 0
#endif

namespace vitfast {
namespace {

constexpr double kMaskValue = -100.0;
constexpr double kNormEps = 1e-12;  // F.normalize's eps

bool use_avx() {
#if VITFAST_WA_AVX
  static const bool avx = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma");
  return avx;
#else
  return false;
#endif
}

struct Geometry {
  int64_t B, H, W, heads, D;
  int64_t wh, ww, sh, sw;
  int64_t Hp, Wp, nWw, nW, N;
  bool shifted;
};

// Where token t of window w comes from: source pixel (y, x) of the unpadded map, or padding.
struct Token {
  int64_t y, x;
  bool real;
};

// Window w in the rolled, padded map: token t = (ty, tx) sits at (py, px) = (wy*wh + ty, wx*ww + tx),
// which holds pixel ((py + sh) mod Hp, (px + sw) mod Wp) of the padded map (roll by -shift). Its shift
// region per axis is 0 if p < P - w, 1 if p < P - s, else 2.
template <typename A>
C10_ALWAYS_INLINE void window_tokens(const Geometry& g, int64_t w, Token* tok, A* region) {
  const int64_t wy = w / g.nWw, wx = w % g.nWw;
  for (int64_t ty = 0; ty < g.wh; ++ty) {
    const int64_t py = wy * g.wh + ty;
    const int64_t sy = (py + g.sh) % g.Hp;
    const int32_t ry = py < g.Hp - g.wh ? 0 : (py < g.Hp - g.sh ? 1 : 2);
    for (int64_t tx = 0; tx < g.ww; ++tx) {
      const int64_t px = wx * g.ww + tx;
      const int64_t sx = (px + g.sw) % g.Wp;
      const int32_t rx = px < g.Wp - g.ww ? 0 : (px < g.Wp - g.sw ? 1 : 2);
      const int64_t t = ty * g.ww + tx;
      tok[t] = Token{sy, sx, sy < g.H && sx < g.W};
      region[t] = static_cast<A>(g.shifted ? ry * 3 + rx : 0);
    }
  }
}

// Attention-dropout keep decision for element (i, j) of the score matrix `item` = (b, head, w).
C10_ALWAYS_INLINE bool keep_element(uint64_t seed, uint64_t item_base, int64_t i, int64_t j, int64_t N,
                                    double dropout_p) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + item_base + static_cast<uint64_t>(i * N + j);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53 >= dropout_p;
}

// exp(x) for float: Cephes expf (relative error ~2 ulp), branch-free so that loops over it vectorize;
// 0 below the smallest normal result.
C10_ALWAYS_INLINE float exp_op(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float fx = xc * 1.44269504088896341f + 0.5f;
  // floor(fx) and 2^n in float arithmetic plus conversions only: AVX without AVX2 has no 256-bit
  // integer shifts or adds, which would keep the loop scalar.
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
  return x < -87.0f ? 0.0f : y * pow2;
}

C10_ALWAYS_INLINE double exp_op(double x) { return std::exp(x); }

#if VITFAST_WA_AVX
// x[0:n] = exp(x[0:n] - m), exp_op's algorithm 8 lanes at a time (GCC does not vectorize its selects
// under strict IEEE semantics).
__attribute__((target("avx,fma"))) void exp_sub_avx(float* C10_RESTRICT x, float m, int64_t n) {
  const __m256 vm = _mm256_set1_ps(m), lo = _mm256_set1_ps(-87.0f), hi = _mm256_set1_ps(88.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + j), vm);
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    const __m256 nf = _mm256_floor_ps(
        _mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_sub_ps(xc, _mm256_mul_ps(nf, _mm256_set1_ps(0.693359375f)));
    r = _mm256_add_ps(r, _mm256_mul_ps(nf, _mm256_set1_ps(2.12194440e-4f)));
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(y, r), r, r), _mm256_set1_ps(1.0f));
    const __m256 pow2 = _mm256_castsi256_ps(
        _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_add_ps(nf, _mm256_set1_ps(127.0f)), _mm256_set1_ps(8388608.0f))));
    const __m256 underflow = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
    _mm256_storeu_ps(x + j, _mm256_andnot_ps(underflow, _mm256_mul_ps(y, pow2)));
  }
  for (; j < n; ++j) x[j] = exp_op(x[j] - m);
}
#endif

// x[0:n] = exp(x[0:n] - m).
template <bool kAvx, typename A>
C10_ALWAYS_INLINE void exp_sub(A* C10_RESTRICT x, A m, int64_t n) {
#if VITFAST_WA_AVX
  if constexpr (kAvx && std::is_same_v<A, float>) {
    exp_sub_avx(x, m, n);
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) x[j] = exp_op(x[j] - m);
}

// Row reductions keep kLanes partial results (64 bytes) that the compiler maps to vector registers:
// strict IEEE code does not reassociate a single accumulator, which would leave the loop scalar. The
// lane count does not depend on the instruction set, so both copies of the kernels agree bit for bit.
template <typename A>
constexpr int64_t kLanes = 64 / sizeof(A);

template <typename A>
C10_ALWAYS_INLINE A lanes_sum(A* acc) {
  for (int64_t width = kLanes<A> / 2; width >= 1; width /= 2) {
    for (int64_t k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  return acc[0];
}

// sum_j a[j] * b[j] (b == nullptr: sum_j a[j]).
template <typename A>
C10_ALWAYS_INLINE A row_dot(const A* C10_RESTRICT a, const A* C10_RESTRICT b, int64_t n) {
  A acc[kLanes<A>] = {};
  int64_t j = 0;
  if (b == nullptr) {
    for (; j + kLanes<A> <= n; j += kLanes<A>) {
#pragma omp simd
      for (int64_t k = 0; k < kLanes<A>; ++k) acc[k] += a[j + k];
    }
    for (int64_t k = 0; j + k < n; ++k) acc[k] += a[j + k];
  } else {
    for (; j + kLanes<A> <= n; j += kLanes<A>) {
#pragma omp simd
      for (int64_t k = 0; k < kLanes<A>; ++k) acc[k] += a[j + k] * b[j + k];
    }
    for (int64_t k = 0; j + k < n; ++k) acc[k] += a[j + k] * b[j + k];
  }
  return lanes_sum(acc);
}

template <typename A>
C10_ALWAYS_INLINE A row_max(const A* C10_RESTRICT a, int64_t n) {
  A acc[kLanes<A>];
  for (int64_t k = 0; k < kLanes<A>; ++k) acc[k] = a[0];
  int64_t j = 0;
  for (; j + kLanes<A> <= n; j += kLanes<A>) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes<A>; ++k) acc[k] = acc[k] > a[j + k] ? acc[k] : a[j + k];
  }
  for (int64_t k = 0; j + k < n; ++k) acc[k] = acc[k] > a[j + k] ? acc[k] : a[j + k];
  for (int64_t width = kLanes<A> / 2; width >= 1; width /= 2) {
    for (int64_t k = 0; k < width; ++k) acc[k] = acc[k] > acc[k + width] ? acc[k] : acc[k + width];
  }
  return acc[0];
}

// One register tile of c = a @ bT: R rows by kLanes columns, accumulated over all of K in registers.
template <int R, typename A>
C10_ALWAYS_INLINE void matmul_tile(const A* C10_RESTRICT a, const A* C10_RESTRICT bT, A* C10_RESTRICT c, int64_t K,
                                   int64_t Nc) {
  A acc[R][kLanes<A>] = {};
  for (int64_t k = 0; k < K; ++k) {
    const A* C10_RESTRICT bk = bT + k * Nc;
    for (int r = 0; r < R; ++r) {
      const A ark = a[r * K + k];
#pragma omp simd
      for (int64_t j = 0; j < kLanes<A>; ++j) acc[r][j] += ark * bk[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t j = 0; j < kLanes<A>; ++j) c[r * Nc + j] = acc[r][j];
  }
}

// c[M, Nc] = a[M, K] @ bT[K, Nc], all row-major: 4 x kLanes register tiles, then the leftover rows
// and columns.
template <typename A>
C10_ALWAYS_INLINE void matmul_rows(const A* C10_RESTRICT a, const A* C10_RESTRICT bT, A* C10_RESTRICT c, int64_t M,
                                   int64_t K, int64_t Nc) {
  constexpr int kRows = 4;
  const int64_t Nt = Nc / kLanes<A> * kLanes<A>;
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) {
    for (int64_t j = 0; j < Nt; j += kLanes<A>) matmul_tile<kRows>(a + i * K, bT + j, c + i * Nc + j, K, Nc);
  }
  for (; i < M; ++i) {
    for (int64_t j = 0; j < Nt; j += kLanes<A>) matmul_tile<1>(a + i * K, bT + j, c + i * Nc + j, K, Nc);
  }
  // Leftover columns (N = 49: one) as dot products over kLanes independent partial sums: a single
  // accumulator through memory would serialize on its load-add-store latency.
  for (int64_t j = Nt; j < Nc; ++j) {
    for (i = 0; i < M; ++i) {
      A acc[kLanes<A>] = {};
      int64_t k = 0;
      for (; k + kLanes<A> <= K; k += kLanes<A>) {
        for (int64_t l = 0; l < kLanes<A>; ++l) acc[l] += a[i * K + k + l] * bT[(k + l) * Nc + j];
      }
      for (int64_t l = 0; k + l < K; ++l) acc[l] += a[i * K + k + l] * bT[(k + l) * Nc + j];
      c[i * Nc + j] = lanes_sum(acc);
    }
  }
}

// dst[N, D] = rows of q, k or v (`which` = 0, 1, 2) of the window's tokens, head h, in op-math; padding
// tokens take pad[which, h] (or zeros).
template <typename scalar_t, typename A>
C10_ALWAYS_INLINE void gather_rows(const scalar_t* qkv, const int64_t* qs, const A* pad, const Geometry& g, int64_t b,
                                   int64_t h, int which, const Token* tok, A* C10_RESTRICT dst) {
  for (int64_t t = 0; t < g.N; ++t) {
    A* C10_RESTRICT row = dst + t * g.D;
    if (tok[t].real) {
      const scalar_t* src = qkv + b * qs[0] + tok[t].y * qs[1] + tok[t].x * qs[2] + which * qs[3] + h * qs[4];
      for (int64_t d = 0; d < g.D; ++d) row[d] = static_cast<A>(src[d]);
    } else if (pad != nullptr) {
      const A* src = pad + (which * g.heads + h) * g.D;
      for (int64_t d = 0; d < g.D; ++d) row[d] = src[d];
    } else {
      for (int64_t d = 0; d < g.D; ++d) row[d] = A(0);
    }
  }
}

// dst[K, N] = src[N, K]^T.
template <typename A>
C10_ALWAYS_INLINE void transpose(const A* C10_RESTRICT src, A* C10_RESTRICT dst, int64_t N, int64_t K) {
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t d = 0; d < K; ++d) dst[d * N + t] = src[t * K + d];
  }
}

// Rows of x[N, D] scaled to unit L2 norm (F.normalize): y = x / max(|x|, eps); norms kept in `norm`.
template <typename A>
C10_ALWAYS_INLINE void normalize_rows(const A* C10_RESTRICT x, A* C10_RESTRICT y, A* C10_RESTRICT norm, int64_t N,
                                      int64_t D) {
  for (int64_t t = 0; t < N; ++t) {
    norm[t] = std::sqrt(row_dot(x + t * D, x + t * D, D));
    const A inv = A(1) / std::max(norm[t], A(kNormEps));
    for (int64_t d = 0; d < D; ++d) y[t * D + d] = x[t * D + d] * inv;
  }
}

// In place: dy (gradient w.r.t. y = normalize(x)) becomes the gradient w.r.t. x.
template <typename A>
C10_ALWAYS_INLINE void normalize_rows_bwd(A* C10_RESTRICT dy, const A* C10_RESTRICT y, const A* C10_RESTRICT norm,
                                          int64_t N, int64_t D) {
  for (int64_t t = 0; t < N; ++t) {
    const A proj = norm[t] > A(kNormEps) ? row_dot(y + t * D, dy + t * D, D) : A(0);
    const A inv = A(1) / std::max(norm[t], A(kNormEps));
    for (int64_t d = 0; d < D; ++d) dy[t * D + d] = (dy[t * D + d] - y[t * D + d] * proj) * inv;
  }
}

template <typename scalar_t, typename A>
struct Args {
  Geometry g;
  const scalar_t* qkv;
  int64_t qs[5];           // qkv strides of (B, H, W, 3, heads); the head dim is contiguous
  const A* bias;           // (heads, N, N) dense bias in op-math
  const A* pad;            // (3, heads, D) or nullptr
  const A* logit_scale;    // (heads,) or nullptr
  A scale;                 // softmax_scale (dot-product attention)
  double dropout_p;
  uint64_t seed;
  float* lse;              // (B, heads, nW, N)
  // Forward only.
  scalar_t* out;           // (B, H, W, heads * D) contiguous
  // Backward only.
  const scalar_t* dout;    // (B, H, W, heads * D), strides ds
  int64_t ds[3];
  scalar_t* dqkv;          // (B, H, W, 3, heads, D) contiguous
};

// Per-thread scratch of one work item.
template <typename A>
struct Scratch {
  std::vector<Token> tok;
  std::vector<A> region;  // shift region of each token, as a number
  std::vector<A> q, k, v, qq, kk, kT, vT, s, dp, cos, tr, o, dq, dk, dv, qnorm, knorm;
  Scratch(int64_t N, int64_t D, bool bwd)
      : tok(N), region(N), q(N * D), k(N * D), v(N * D), qq(N * D), kk(N * D), kT(N * D), vT(bwd ? N * D : 0),
        s(N * N), dp(bwd ? N * N : 0), cos(bwd ? N * N : 0), tr(bwd ? N * N : 0), o(N * D),
        dq(bwd ? N * D : 0), dk(bwd ? N * D : 0), dv(bwd ? N * D : 0), qnorm(N), knorm(N) {}
};

// Scores of item (b, w, h) into sc.s: scale * q.k (or logit_scale * cos(q, k)) + bias + shift mask.
// Leaves the (normalized) q, k in sc.qq / sc.kk, and the raw q.k (cosine) products in sc.cos if `keep_cos`.
template <typename scalar_t, typename A>
C10_ALWAYS_INLINE A scores(const Args<scalar_t, A>& a, Scratch<A>& sc, int64_t b, int64_t w, int64_t h,
                           bool keep_cos) {
  const Geometry& g = a.g;
  const int64_t N = g.N, D = g.D;
  window_tokens(g, w, sc.tok.data(), sc.region.data());
  gather_rows(a.qkv, a.qs, a.pad, g, b, h, 0, sc.tok.data(), sc.q.data());
  gather_rows(a.qkv, a.qs, a.pad, g, b, h, 1, sc.tok.data(), sc.k.data());
  A mult = a.scale;
  const A* qq = sc.q.data();
  const A* kk = sc.k.data();
  if (a.logit_scale != nullptr) {
    normalize_rows(sc.q.data(), sc.qq.data(), sc.qnorm.data(), N, D);
    normalize_rows(sc.k.data(), sc.kk.data(), sc.knorm.data(), N, D);
    qq = sc.qq.data();
    kk = sc.kk.data();
    mult = a.logit_scale[h];
  }
  transpose(kk, sc.kT.data(), N, D);
  A* C10_RESTRICT s = sc.s.data();
  matmul_rows(qq, sc.kT.data(), s, N, D, N);
  if (keep_cos) std::copy(s, s + N * N, sc.cos.data());
  const A* C10_RESTRICT bias = a.bias + h * N * N;
  const A* C10_RESTRICT region = sc.region.data();
  for (int64_t i = 0; i < N; ++i) {
    const A ri = region[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      s[i * N + j] = s[i * N + j] * mult + bias[i * N + j] + (region[j] != ri ? A(kMaskValue) : A(0));
    }
  }
  return mult;
}

template <bool kAvx, typename scalar_t, typename A>
C10_ALWAYS_INLINE void fwd_items(const Args<scalar_t, A>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t N = g.N, D = g.D, C = g.heads * g.D;
  Scratch<A> sc(N, D, false);
  const A keep_scale = A(1) / A(1 - a.dropout_p);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t h = item % g.heads, w = (item / g.heads) % g.nW, b = item / (g.heads * g.nW);
    scores(a, sc, b, w, h, false);
    gather_rows(a.qkv, a.qs, a.pad, g, b, h, 2, sc.tok.data(), sc.v.data());
    A* C10_RESTRICT s = sc.s.data();
    float* lse = a.lse + ((b * g.heads + h) * g.nW + w) * N;
    const uint64_t item_base = static_cast<uint64_t>((b * g.heads + h) * g.nW + w) * static_cast<uint64_t>(N * N);
    for (int64_t i = 0; i < N; ++i) {
      A* C10_RESTRICT si = s + i * N;
      const A m = row_max(si, N);
      exp_sub<kAvx>(si, m, N);
      const A sum = row_dot<A>(si, nullptr, N);
      lse[i] = static_cast<float>(m + std::log(sum));
      const A inv = A(1) / sum;
      for (int64_t j = 0; j < N; ++j) si[j] *= inv;
      if (a.dropout_p > 0) {
        for (int64_t j = 0; j < N; ++j) {
          si[j] = keep_element(a.seed, item_base, i, j, N, a.dropout_p) ? si[j] * keep_scale : A(0);
        }
      }
    }
    A* C10_RESTRICT o = sc.o.data();
    matmul_rows(s, sc.v.data(), o, N, N, D);
    for (int64_t i = 0; i < N; ++i) {
      if (!sc.tok[i].real) continue;
      scalar_t* dst = a.out + ((b * g.H + sc.tok[i].y) * g.W + sc.tok[i].x) * C + h * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[i * D + d]);
    }
  }
}

template <bool kAvx, typename scalar_t, typename A>
C10_ALWAYS_INLINE void bwd_items(const Args<scalar_t, A>& a, int64_t begin, int64_t end, A* C10_RESTRICT partial) {
  const Geometry& g = a.g;
  const int64_t N = g.N, D = g.D, heads = g.heads;
  Scratch<A> sc(N, D, true);
  const bool cosine = a.logit_scale != nullptr;
  const A keep_scale = A(1) / A(1 - a.dropout_p);
  A* C10_RESTRICT dbias = partial;                         // (heads, N, N)
  A* C10_RESTRICT dpad = partial + heads * N * N;          // (3, heads, D)
  A* C10_RESTRICT dlogit = dpad + 3 * heads * D;           // (heads,)
  for (int64_t item = begin; item < end; ++item) {
    const int64_t h = item % heads, w = (item / heads) % g.nW, b = item / (heads * g.nW);
    const A mult = scores(a, sc, b, w, h, cosine);
    const A* qq = cosine ? sc.qq.data() : sc.q.data();
    const A* kk = cosine ? sc.kk.data() : sc.k.data();
    gather_rows(a.qkv, a.qs, a.pad, g, b, h, 2, sc.tok.data(), sc.v.data());
    // dO rows of the window (zero for padding tokens, whose outputs are cropped).
    A* C10_RESTRICT dO = sc.o.data();
    for (int64_t t = 0; t < N; ++t) {
      if (sc.tok[t].real) {
        const scalar_t* src = a.dout + b * a.ds[0] + sc.tok[t].y * a.ds[1] + sc.tok[t].x * a.ds[2] + h * D;
        for (int64_t d = 0; d < D; ++d) dO[t * D + d] = static_cast<A>(src[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) dO[t * D + d] = A(0);
      }
    }
    // P = exp(S - lse). In fp64 the normalizer is recomputed: the saved lse is only fp32.
    A* C10_RESTRICT p = sc.s.data();
    const float* lse = a.lse + ((b * heads + h) * g.nW + w) * N;
    for (int64_t i = 0; i < N; ++i) {
      A* C10_RESTRICT pi = p + i * N;
      if constexpr (std::is_same_v<A, double>) {
        const A m = row_max(pi, N);
        exp_sub<kAvx>(pi, m, N);
        const A inv = A(1) / row_dot<A>(pi, nullptr, N);
        for (int64_t j = 0; j < N; ++j) pi[j] *= inv;
      } else {
        const A l = static_cast<A>(lse[i]);
        exp_sub<kAvx>(pi, l, N);
      }
    }
    // dPd = dO @ V^T (gradient w.r.t. the dropped-out probabilities).
    transpose(sc.v.data(), sc.vT.data(), N, D);
    A* C10_RESTRICT dp = sc.dp.data();
    matmul_rows(dO, sc.vT.data(), dp, N, D, N);
    const uint64_t item_base = static_cast<uint64_t>((b * heads + h) * g.nW + w) * static_cast<uint64_t>(N * N);
    // dv = Pd^T @ dO with Pd the dropped-out probabilities; dP -> dS = P * (dP - rowsum(P * dP)) in place.
    A* C10_RESTRICT tr = sc.tr.data();
    for (int64_t i = 0; i < N; ++i) {
      A* C10_RESTRICT pi = p + i * N;
      A* C10_RESTRICT dpi = dp + i * N;
      if (a.dropout_p > 0) {
        for (int64_t j = 0; j < N; ++j) {
          const bool kept = keep_element(a.seed, item_base, i, j, N, a.dropout_p);
          dpi[j] = kept ? dpi[j] * keep_scale : A(0);
          tr[j * N + i] = kept ? pi[j] * keep_scale : A(0);
        }
      } else {
        for (int64_t j = 0; j < N; ++j) tr[j * N + i] = pi[j];
      }
      const A delta = row_dot(pi, dpi, N);
      for (int64_t j = 0; j < N; ++j) dpi[j] = pi[j] * (dpi[j] - delta);
    }
    A* C10_RESTRICT dv = sc.dv.data();
    matmul_rows(tr, dO, dv, N, N, D);
    A* C10_RESTRICT db = dbias + h * N * N;
    for (int64_t e = 0; e < N * N; ++e) db[e] += dp[e];
    if (cosine) dlogit[h] += row_dot(dp, sc.cos.data(), N * N);
    // dq = mult * dS @ kk, dk = mult * dS^T @ qq.
    for (int64_t e = 0; e < N * N; ++e) dp[e] *= mult;
    A* C10_RESTRICT dq = sc.dq.data();
    A* C10_RESTRICT dk = sc.dk.data();
    matmul_rows(dp, kk, dq, N, N, D);
    transpose(dp, tr, N, N);
    matmul_rows(tr, qq, dk, N, N, D);
    if (cosine) {
      normalize_rows_bwd(dq, sc.qq.data(), sc.qnorm.data(), N, D);
      normalize_rows_bwd(dk, sc.kk.data(), sc.knorm.data(), N, D);
    }
    const A* grads[3] = {dq, dk, dv};
    for (int64_t t = 0; t < N; ++t) {
      if (sc.tok[t].real) {
        scalar_t* dst = a.dqkv + (((b * g.H + sc.tok[t].y) * g.W + sc.tok[t].x) * 3 * heads + h) * D;
        for (int which = 0; which < 3; ++which) {
          const A* src = grads[which] + t * D;
          scalar_t* dw = dst + which * heads * D;
          for (int64_t d = 0; d < D; ++d) dw[d] = static_cast<scalar_t>(src[d]);
        }
      } else if (a.pad != nullptr) {
        for (int which = 0; which < 3; ++which) {
          const A* src = grads[which] + t * D;
          A* dw = dpad + (which * heads + h) * D;
          for (int64_t d = 0; d < D; ++d) dw[d] += src[d];
        }
      }
    }
  }
}

template <typename scalar_t, typename A>
void fwd_items_base(const Args<scalar_t, A>& a, int64_t begin, int64_t end) {
  fwd_items<false>(a, begin, end);
}

template <typename scalar_t, typename A>
void bwd_items_base(const Args<scalar_t, A>& a, int64_t begin, int64_t end, A* partial) {
  bwd_items<false>(a, begin, end, partial);
}

#if VITFAST_WA_AVX
template <typename scalar_t, typename A>
__attribute__((target("avx,fma"))) void fwd_items_avx(const Args<scalar_t, A>& a, int64_t begin, int64_t end) {
  fwd_items<true>(a, begin, end);
}

template <typename scalar_t, typename A>
__attribute__((target("avx,fma"))) void bwd_items_avx(const Args<scalar_t, A>& a, int64_t begin, int64_t end,
                                                      A* partial) {
  bwd_items<true>(a, begin, end, partial);
}
#endif

// ------------------------------------------------------------------------------------------ boundary

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

Geometry make_geometry(const char* op, const at::Tensor& qkv, at::IntArrayRef window_size,
                       at::IntArrayRef shift_size) {
  TORCH_CHECK(qkv.dim() == 6 && qkv.size(3) == 3, "vitfast ", op, ": qkv must be (B, H, W, 3, heads, D), got ",
              qkv.sizes());
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "vitfast ", op,
              ": qkv dtype must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(qkv.device().is_cpu(), "vitfast ", op, " (cpu): qkv must be a CPU tensor, got ", qkv.device());
  TORCH_CHECK(qkv.stride(5) == 1 || qkv.size(5) <= 1, "vitfast ", op,
              ": qkv must have unit inner stride, got strides ", qkv.strides());
  TORCH_CHECK(window_size.size() == 2 && shift_size.size() == 2, "vitfast ", op,
              ": window_size and shift_size must be pairs, got ", window_size, " and ", shift_size);
  Geometry g;
  g.B = qkv.size(0);
  g.H = qkv.size(1);
  g.W = qkv.size(2);
  g.heads = qkv.size(4);
  g.D = qkv.size(5);
  g.wh = window_size[0];
  g.ww = window_size[1];
  g.sh = shift_size[0];
  g.sw = shift_size[1];
  TORCH_CHECK(g.wh > 0 && g.ww > 0, "vitfast ", op, ": window_size must be positive, got ", window_size);
  TORCH_CHECK(0 <= g.sh && g.sh < g.wh && 0 <= g.sw && g.sw < g.ww, "vitfast ", op, ": shift_size ", shift_size,
              " must be in [0, window) for window_size ", window_size);
  g.Hp = (g.H + g.wh - 1) / g.wh * g.wh;
  g.Wp = (g.W + g.ww - 1) / g.ww * g.ww;
  g.nWw = g.Wp / g.ww;
  g.nW = (g.Hp / g.wh) * g.nWw;
  g.N = g.wh * g.ww;
  g.shifted = g.sh + g.sw > 0;
  return g;
}

struct Extras {
  at::Tensor bias;         // (heads, N, N) op-math, contiguous
  at::Tensor pad;          // (3, heads, D) op-math, contiguous, or undefined
  at::Tensor logit_scale;  // (heads,) op-math, or undefined
};

Extras prepare_extras(const char* op, const Geometry& g, const at::Tensor& qkv, const at::Tensor& bias,
                      const std::optional<at::Tensor>& pad_qkv, const std::optional<at::Tensor>& logit_scale) {
  const auto acc = at::toOpMathType(qkv.scalar_type());
  const int64_t num_rel = (2 * g.wh - 1) * (2 * g.ww - 1);
  TORCH_CHECK(at::isFloatingType(bias.scalar_type()) && bias.device() == qkv.device(), "vitfast ", op,
              ": bias must be a floating point tensor on ", qkv.device(), ", got ", bias.scalar_type(), " on ",
              bias.device());
  const bool table = bias.dim() == 2;
  TORCH_CHECK((table && bias.size(0) == num_rel && bias.size(1) == g.heads) ||
                  (bias.dim() == 3 && bias.size(0) == g.heads && bias.size(1) == g.N && bias.size(2) == g.N),
              "vitfast ", op, ": bias must be the (num_rel, heads) = (", num_rel, ", ", g.heads,
              ") table or a dense (heads, N, N) = (", g.heads, ", ", g.N, ", ", g.N, ") tensor, got ", bias.sizes());
  Extras e;
  if (table) {
    // Gather table[(ty_i - ty_j + wh - 1) * (2ww - 1) + (tx_i - tx_j + ww - 1), head] once per call.
    const at::Tensor t = bias.to(acc).contiguous();
    e.bias = at::empty({g.heads, g.N, g.N}, t.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "vitfast_window_attention_bias", [&] {
      const scalar_t* src = t.const_data_ptr<scalar_t>();
      scalar_t* dst = e.bias.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < g.N; ++i) {
        for (int64_t j = 0; j < g.N; ++j) {
          const int64_t r = (i / g.ww - j / g.ww + g.wh - 1) * (2 * g.ww - 1) + (i % g.ww - j % g.ww + g.ww - 1);
          for (int64_t h = 0; h < g.heads; ++h) dst[(h * g.N + i) * g.N + j] = src[r * g.heads + h];
        }
      }
    });
  } else {
    e.bias = bias.to(acc).contiguous();
  }
  if (present(pad_qkv)) {
    TORCH_CHECK(pad_qkv->numel() == 3 * g.heads * g.D && at::isFloatingType(pad_qkv->scalar_type()) &&
                    pad_qkv->device() == qkv.device(),
                "vitfast ", op, ": pad_qkv must be a floating point (3, heads, D) = (3, ", g.heads, ", ", g.D,
                ") tensor on ", qkv.device(), ", got ", pad_qkv->sizes(), " ", pad_qkv->scalar_type(), " on ",
                pad_qkv->device());
    e.pad = pad_qkv->to(acc).contiguous();
  }
  if (present(logit_scale)) {
    TORCH_CHECK(logit_scale->numel() == g.heads && logit_scale->device() == qkv.device() &&
                    at::isFloatingType(logit_scale->scalar_type()),
                "vitfast ", op, ": logit_scale must be a floating point tensor of heads = ", g.heads,
                " elements on ", qkv.device(), ", got ", logit_scale->sizes(), " ", logit_scale->scalar_type(),
                " on ", logit_scale->device());
    e.logit_scale = logit_scale->to(acc).contiguous();
  }
  return e;
}

void check_dropout(const char* op, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "vitfast ", op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

template <typename scalar_t, typename A>
Args<scalar_t, A> make_args(const Geometry& g, const at::Tensor& qkv, const Extras& e, double softmax_scale,
                            double dropout_p, int64_t seed) {
  Args<scalar_t, A> a{};
  a.g = g;
  a.qkv = qkv.const_data_ptr<scalar_t>();
  for (int d = 0; d < 5; ++d) a.qs[d] = qkv.stride(d);
  a.bias = e.bias.const_data_ptr<A>();
  a.pad = e.pad.defined() ? e.pad.const_data_ptr<A>() : nullptr;
  a.logit_scale = e.logit_scale.defined() ? e.logit_scale.const_data_ptr<A>() : nullptr;
  a.scale = static_cast<A>(softmax_scale);
  a.dropout_p = dropout_p;
  a.seed = static_cast<uint64_t>(seed);
  return a;
}

std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cpu(
    const at::Tensor& qkv, const at::Tensor& bias, const std::optional<at::Tensor>& pad_qkv,
    const std::optional<at::Tensor>& logit_scale, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    double softmax_scale, double dropout_p, int64_t seed) {
  constexpr const char* op = "window_attention_fwd";
  const Geometry g = make_geometry(op, qkv, window_size, shift_size);
  check_dropout(op, dropout_p);
  const Extras e = prepare_extras(op, g, qkv, bias, pad_qkv, logit_scale);
  at::Tensor out = at::empty({g.B, g.H, g.W, g.heads * g.D}, qkv.options());
  at::Tensor lse = at::empty({g.B, g.heads, g.nW, g.N}, qkv.options().dtype(at::kFloat));
  const int64_t items = g.B * g.nW * g.heads;
  if (items == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "vitfast_window_attention_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    Args<scalar_t, A> a = make_args<scalar_t, A>(g, qkv, e, softmax_scale, dropout_p, seed);
    a.lse = lse.mutable_data_ptr<float>();
    a.out = out.mutable_data_ptr<scalar_t>();
    const bool avx = use_avx();
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
#if VITFAST_WA_AVX
      if (avx) return fwd_items_avx(a, begin, end);
#endif
      fwd_items_base(a, begin, end);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& qkv, const at::Tensor& bias, const std::optional<at::Tensor>& pad_qkv,
    const std::optional<at::Tensor>& logit_scale, const at::Tensor& out, const at::Tensor& lse_in,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, double softmax_scale, double dropout_p, int64_t seed) {
  constexpr const char* op = "window_attention_bwd";
  const Geometry g = make_geometry(op, qkv, window_size, shift_size);
  check_dropout(op, dropout_p);
  const Extras e = prepare_extras(op, g, qkv, bias, pad_qkv, logit_scale);
  const std::vector<int64_t> out_shape = {g.B, g.H, g.W, g.heads * g.D};
  TORCH_CHECK(dout_in.sizes() == at::IntArrayRef(out_shape) && dout_in.scalar_type() == qkv.scalar_type() &&
                  dout_in.device() == qkv.device(),
              "vitfast ", op, ": dout must be ", at::IntArrayRef(out_shape), " ", qkv.scalar_type(), " on ",
              qkv.device(), " (B, H, W, heads * D of qkv ", qkv.sizes(), "), got ", dout_in.sizes(), " ",
              dout_in.scalar_type(), " on ", dout_in.device());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), "vitfast ", op, ": out must be ", at::IntArrayRef(out_shape),
              ", got ", out.sizes());
  TORCH_CHECK(lse_in.dim() == 4 && lse_in.size(0) == g.B && lse_in.size(1) == g.heads && lse_in.size(2) == g.nW &&
                  lse_in.size(3) == g.N && lse_in.scalar_type() == at::kFloat,
              "vitfast ", op, ": lse must be float32 (B, heads, nW, N) = (", g.B, ", ", g.heads, ", ", g.nW, ", ",
              g.N, "), got ", lse_in.sizes(), " ", lse_in.scalar_type());
  const at::Tensor dout = dout_in.stride(3) == 1 || dout_in.size(3) <= 1 ? dout_in : dout_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const auto acc = at::toOpMathType(qkv.scalar_type());

  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t items = g.B * g.nW * g.heads;
  const int64_t partial_stride = g.heads * g.N * g.N + 3 * g.heads * g.D + g.heads;
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::Tensor partials = at::zeros({num_chunks, partial_stride}, qkv.options().dtype(acc));
  if (items > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "vitfast_window_attention_bwd",
                                    [&] {
      using A = at::opmath_type<scalar_t>;
      Args<scalar_t, A> a = make_args<scalar_t, A>(g, qkv, e, softmax_scale, dropout_p, seed);
      a.lse = const_cast<float*>(lse.const_data_ptr<float>());
      a.dout = dout.const_data_ptr<scalar_t>();
      for (int d = 0; d < 3; ++d) a.ds[d] = dout.stride(d);
      a.dqkv = dqkv.mutable_data_ptr<scalar_t>();
      A* part = partials.mutable_data_ptr<A>();
      const bool avx = use_avx();
      at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        for (int64_t c = chunk_begin; c < chunk_end; ++c) {
          const int64_t begin = items * c / num_chunks, end = items * (c + 1) / num_chunks;
#if VITFAST_WA_AVX
          if (avx) {
            bwd_items_avx(a, begin, end, part + c * partial_stride);
            continue;
          }
#endif
          bwd_items_base(a, begin, end, part + c * partial_stride);
        }
      });
    });
  } else {
    dqkv.zero_();
  }
  // Chunk partials summed in chunk order, then the dense dbias folded onto the table in (i, j) order. The
  // gradients that are slices of `total` are copied out (copy=true): returns must not share storage.
  const at::Tensor total = partials.sum(0);
  const at::Tensor dense = total.narrow(0, 0, g.heads * g.N * g.N).view({g.heads, g.N, g.N});
  at::Tensor dbias;
  if (bias.dim() == 2) {
    at::Tensor dtable = at::zeros(bias.sizes(), qkv.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "vitfast_window_attention_dbias", [&] {
      const scalar_t* src = dense.const_data_ptr<scalar_t>();
      scalar_t* dst = dtable.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < g.N; ++i) {
        for (int64_t j = 0; j < g.N; ++j) {
          const int64_t r = (i / g.ww - j / g.ww + g.wh - 1) * (2 * g.ww - 1) + (i % g.ww - j % g.ww + g.ww - 1);
          for (int64_t h = 0; h < g.heads; ++h) dst[r * g.heads + h] += src[(h * g.N + i) * g.N + j];
        }
      }
    });
    dbias = dtable.to(bias.scalar_type());
  } else {
    dbias = dense.to(bias.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  }
  at::Tensor dpad = present(pad_qkv) ? total.narrow(0, g.heads * g.N * g.N, 3 * g.heads * g.D)
                                           .view(pad_qkv->sizes())
                                           .to(pad_qkv->scalar_type(), /*non_blocking=*/false, /*copy=*/true)
                                     : qkv.new_empty({0});
  const int64_t logit_offset = g.heads * g.N * g.N + 3 * g.heads * g.D;
  at::Tensor dlogit = present(logit_scale) ? total.narrow(0, logit_offset, g.heads).to(at::kFloat, false, true)
                                           : qkv.new_empty({0}, qkv.options().dtype(at::kFloat));
  return {dqkv, dbias, dpad, dlogit};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("window_attention_fwd", &window_attention_fwd_cpu);
  m.impl("window_attention_bwd", &window_attention_bwd_cpu);
}

}  // namespace vitfast
