// Swin (shifted) window attention, forward and backward, fused on the CPU.
//
// Swin Transformer (Liu et al. 2021, arXiv:2103.14030) and Swin-V2 cosine attention (Liu et al. 2022,
// arXiv:2111.09883). Schemas, semantics and the saved state (out, lse) are those of
// vitfast/ops/window_attention.py (module docstring). Nothing is materialized in window layout: each
// (batch, window, head) work item of an at::parallel_for reads its window's q, k, v rows straight from the
// strided (B, H, W, 3, heads, D) qkv by index arithmetic (cyclic shift, padding pixels taking pad_qkv),
// forms the N x N scores in a local buffer (N = 49 or 144 in Swin) with the relative-position bias and
// the shift-region mask computed from coordinates, takes the softmax in op-math precision, and scatters
// P @ V un-shifted into the (B, H, W, heads * D) output. The backward recomputes P from q and k (as
// FlashAttention does, Dao et al. 2022, arXiv:2205.14135, but with its own normalizer: the saved lse is only
// checked, see bwd_items), writes dq, dk, dv to the source pixels, and
// reduces dbias, dpad_qkv and dlogit_scale through per-chunk op-math partials summed in a fixed order
// (deterministic for a given thread count).
//
// Memory: a thread gathers a window's rows once for all the heads it processes there, pixel by pixel, and
// meanwhile prefetches the pixels of its next window (gather_window). Compute: the score-shaped matrices
// are kept transposed (key by query), so the softmax runs down columns with element-wise vector operations
// only; the small GEMMs (c = a @ b, a read through strides, so P^T and dS^T serve as P and dS without a
// copy) accumulate 6-row x 64-byte register tiles over the whole reduction, on rows padded to 32 bytes so
// that no column is left to scalar code; exp is exp_op.h's (Cephes' expf), 8 lanes at a time with AVX. The
// work-item loops are force-inlined templates instantiated twice: a baseline x86-64 copy and an AVX + FMA
// copy (a GCC/Clang target attribute), chosen at run time. fp32/fp16/bf16 compute in fp32, fp64 in fp64
// (op-math).
//
// Dropout: the keep mask is the attention kernels' Philox draw (vitfast.ops.attention.dropout_keep_ref) on each
// score's offset in (B, heads, nW, N, N), so every backend (torch, cpp, triton) drops the same entries for a seed,
// forward and backward; dropout_p = 0 is exact.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "dropout.h"
#include "exp_op.h"

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

#if VITFAST_WA_AVX
// x[0:n] = exp(x[0:n] - m[0:n]) by exp8 (GCC does not vectorize exp_op's min and max under strict IEEE
// semantics).
__attribute__((target("avx,fma"))) void exp_sub_avx(float* C10_RESTRICT x, const float* C10_RESTRICT m, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(x + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(m + j))));
  }
  for (; j < n; ++j) x[j] = exp_op(x[j] - m[j]);
}
#endif

// x[0:n] = exp(x[0:n] - m[0:n]).
template <bool kAvx, typename A>
C10_ALWAYS_INLINE void exp_sub(A* C10_RESTRICT x, const A* C10_RESTRICT m, int64_t n) {
#if VITFAST_WA_AVX
  if constexpr (kAvx && std::is_same_v<A, float>) {
    exp_sub_avx(x, m, n);
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) x[j] = exp_op(x[j] - m[j]);
}

// Row reductions keep kLanes partial results (64 bytes) that the compiler maps to vector registers:
// strict IEEE code does not reassociate a single accumulator, which would leave the loop scalar. The
// lane count does not depend on the instruction set, so both copies of the kernels sum in the same order
// (they can still differ in the last bit where the AVX + FMA copy fuses a multiply and an add).
template <typename A>
constexpr int64_t kLanes = 64 / sizeof(A);

// sum_j a[j] * b[j].
template <typename A>
C10_ALWAYS_INLINE A row_dot(const A* C10_RESTRICT a, const A* C10_RESTRICT b, int64_t n) {
  A acc[kLanes<A>] = {};
  int64_t j = 0;
  for (; j + kLanes<A> <= n; j += kLanes<A>) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes<A>; ++k) acc[k] += a[j + k] * b[j + k];
  }
  for (int64_t k = 0; j + k < n; ++k) acc[k] += a[j + k] * b[j + k];
  for (int64_t width = kLanes<A> / 2; width >= 1; width /= 2) {
    for (int64_t k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  return acc[0];
}

// Matrix buffers of a work item pad their rows to a multiple of kHalf elements (32 bytes), so that matmul
// covers every column with full kLanes or kHalf wide tiles and leaves none to a scalar loop (N = 49 is 3
// tiles of 16 and one of 8 in fp32), and column-wise loops run over whole vectors. Padding columns of an
// operand hold finite values (zeros where they enter a reduction); those of a result are never read.
template <typename A>
constexpr int64_t kHalf = kLanes<A> / 2;

template <typename A>
constexpr int64_t padded(int64_t n) {
  return (n + kHalf<A> - 1) / kHalf<A> * kHalf<A>;
}

// One register tile of c = a @ b: R rows by L columns, accumulated over all of K in registers. a[r, k] is
// a[r * as + k * ak], so a transposed operand is read in place instead of copied.
template <int R, int64_t L, typename A>
C10_ALWAYS_INLINE void matmul_tile(const A* C10_RESTRICT a, int64_t as, int64_t ak, const A* C10_RESTRICT b,
                                   int64_t ldb, A* C10_RESTRICT c, int64_t ldc, int64_t K) {
  A acc[R][L] = {};
  for (int64_t k = 0; k < K; ++k) {
    const A* C10_RESTRICT bk = b + k * ldb;
    for (int r = 0; r < R; ++r) {
      const A ark = a[r * as + k * ak];
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) acc[r][j] += ark * bk[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t j = 0; j < L; ++j) c[r * ldc + j] = acc[r][j];
  }
}

// R rows of c: kLanes wide tiles, then one kLanes or kHalf wide tile for the rest of padded(Nc).
template <int R, typename A>
C10_ALWAYS_INLINE void matmul_rows(const A* a, int64_t as, int64_t ak, const A* b, int64_t ldb, A* c, int64_t ldc,
                                   int64_t K, int64_t Nc) {
  int64_t j = 0;
  for (; j + kLanes<A> <= Nc; j += kLanes<A>) matmul_tile<R, kLanes<A>>(a, as, ak, b + j, ldb, c + j, ldc, K);
  if (Nc - j > kHalf<A>) {
    matmul_tile<R, kLanes<A>>(a, as, ak, b + j, ldb, c + j, ldc, K);
  } else if (j < Nc) {
    matmul_tile<R, kHalf<A>>(a, as, ak, b + j, ldb, c + j, ldc, K);
  }
}

// c[M, Nc] = a[M, K] @ b[K, Nc] with a[i, k] at a[i * as + k * ak], b and c row-major with leading
// dimensions ldb and ldc of at least padded(Nc): 6-row register tiles (with AVX, 12 accumulators, a row of
// b and a broadcast a[i, k]: 15 of the 16 vector registers), then the leftover rows.
template <typename A>
C10_ALWAYS_INLINE void matmul_impl(const A* a, int64_t as, int64_t ak, const A* b, int64_t ldb, A* c, int64_t ldc,
                                   int64_t M, int64_t K, int64_t Nc) {
  constexpr int kRows = 6;
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) matmul_rows<kRows>(a + i * as, as, ak, b, ldb, c + i * ldc, ldc, K, Nc);
  for (; i < M; ++i) matmul_rows<1>(a + i * as, as, ak, b, ldb, c + i * ldc, ldc, K, Nc);
}

// matmul_impl as a function of its own in each instruction-set copy: inlined into the work-item loops, its
// accumulators compete with their many live values for registers and some spill to the stack.
template <typename A>
C10_NOINLINE void matmul_base(const A* a, int64_t as, int64_t ak, const A* b, int64_t ldb, A* c, int64_t ldc,
                              int64_t M, int64_t K, int64_t Nc) {
  matmul_impl(a, as, ak, b, ldb, c, ldc, M, K, Nc);
}

#if VITFAST_WA_AVX
template <typename A>
__attribute__((target("avx,fma"))) C10_NOINLINE void matmul_avx(const A* a, int64_t as, int64_t ak, const A* b,
                                                               int64_t ldb, A* c, int64_t ldc, int64_t M, int64_t K,
                                                               int64_t Nc) {
  matmul_impl(a, as, ak, b, ldb, c, ldc, M, K, Nc);
}
#endif

template <bool kAvx, typename A>
C10_ALWAYS_INLINE void matmul(const A* a, int64_t as, int64_t ak, const A* b, int64_t ldb, A* c, int64_t ldc, int64_t M,
                              int64_t K, int64_t Nc) {
#if VITFAST_WA_AVX
  if constexpr (kAvx) {
    matmul_avx(a, as, ak, b, ldb, c, ldc, M, K, Nc);
    return;
  }
#endif
  matmul_base(a, as, ak, b, ldb, c, ldc, M, K, Nc);
}

#if VITFAST_WA_AVX
// dst[K, N] (leading dimension ldd) = src[N, K]^T (leading dimension lds) in 8 x 8 blocks held in registers:
// one element at a time, the strided stores are the cost.
__attribute__((target("avx"))) void transpose_avx(const float* C10_RESTRICT src, int64_t lds, float* C10_RESTRICT dst,
                                                  int64_t ldd, int64_t N, int64_t K) {
  int64_t t = 0;
  for (; t + 8 <= N; t += 8) {
    int64_t d = 0;
    for (; d + 8 <= K; d += 8) {
      __m256 r[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (t + i) * lds + d);
      for (int i = 0; i < 8; i += 2) {
        u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + (d + i) * ldd + t, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (d + i + 4) * ldd + t, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
      }
    }
    for (; d < K; ++d) {
      for (int64_t i = 0; i < 8; ++i) dst[d * ldd + t + i] = src[(t + i) * lds + d];
    }
  }
  for (; t < N; ++t) {
    for (int64_t d = 0; d < K; ++d) dst[d * ldd + t] = src[t * lds + d];
  }
}
#endif

// dst[K, N] (leading dimension ldd) = src[N, K]^T (leading dimension lds).
template <bool kAvx, typename A>
C10_ALWAYS_INLINE void transpose(const A* C10_RESTRICT src, int64_t lds, A* C10_RESTRICT dst, int64_t ldd, int64_t N,
                                 int64_t K) {
#if VITFAST_WA_AVX
  if constexpr (kAvx && std::is_same_v<A, float>) {
    transpose_avx(src, lds, dst, ldd, N, K);
    return;
  }
#endif
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t d = 0; d < K; ++d) dst[d * ldd + t] = src[t * lds + d];
  }
}

// Rows of x[N, D] (leading dimension ld) scaled to unit L2 norm (F.normalize): y = x / max(|x|, eps);
// norms kept in `norm`.
template <typename A>
C10_ALWAYS_INLINE void normalize_rows(const A* C10_RESTRICT x, A* C10_RESTRICT y, A* C10_RESTRICT norm, int64_t N,
                                      int64_t D, int64_t ld) {
  for (int64_t t = 0; t < N; ++t) {
    norm[t] = std::sqrt(row_dot(x + t * ld, x + t * ld, D));
    const A inv = A(1) / std::max(norm[t], A(kNormEps));
    for (int64_t d = 0; d < D; ++d) y[t * ld + d] = x[t * ld + d] * inv;
  }
}

// In place: dy (gradient w.r.t. y = normalize(x)) becomes the gradient w.r.t. x.
template <typename A>
C10_ALWAYS_INLINE void normalize_rows_bwd(A* C10_RESTRICT dy, const A* C10_RESTRICT y, const A* C10_RESTRICT norm,
                                          int64_t N, int64_t D, int64_t ld) {
  for (int64_t t = 0; t < N; ++t) {
    const A proj = norm[t] > A(kNormEps) ? row_dot(y + t * ld, dy + t * ld, D) : A(0);
    const A inv = A(1) / std::max(norm[t], A(kNormEps));
    for (int64_t d = 0; d < D; ++d) dy[t * ld + d] = (dy[t * ld + d] - y[t * ld + d] * proj) * inv;
  }
}

// Softmax over each column of sT[N, Np] (a column holds one query's scores) in place; leaves each column's
// log-sum-exp in lse. Column-wise, every step is an element-wise vector operation over a row of sT, with no
// horizontal reduction. `sum` is scratch of Np elements.
template <bool kAvx, typename A>
C10_ALWAYS_INLINE void column_softmax(A* C10_RESTRICT s, int64_t N, int64_t Np, A* C10_RESTRICT lse,
                                      A* C10_RESTRICT sum) {
  A* C10_RESTRICT m = lse;
  std::copy(s, s + Np, m);
  for (int64_t j = 1; j < N; ++j) {
#pragma omp simd
    for (int64_t i = 0; i < Np; ++i) m[i] = m[i] > s[j * Np + i] ? m[i] : s[j * Np + i];
  }
  std::fill(sum, sum + Np, A(0));
  for (int64_t j = 0; j < N; ++j) {
    exp_sub<kAvx>(s + j * Np, m, Np);
#pragma omp simd
    for (int64_t i = 0; i < Np; ++i) sum[i] += s[j * Np + i];
  }
  for (int64_t i = 0; i < Np; ++i) {
    lse[i] = m[i] + std::log(sum[i]);
    sum[i] = A(1) / sum[i];
  }
  for (int64_t j = 0; j < N; ++j) {
#pragma omp simd
    for (int64_t i = 0; i < Np; ++i) s[j * Np + i] *= sum[i];
  }
}

template <typename scalar_t, typename A>
struct Args {
  Geometry g;
  const scalar_t* qkv;
  int64_t qs[5];           // qkv strides of (B, H, W, 3, heads); the head dim is contiguous
  const A* biasT;          // (heads, N, N) dense bias in op-math, transposed: biasT[h, j, i] = bias[h, i, j]
  const A* pad;            // (3, heads, D) or nullptr
  const A* logit_scale;    // (heads,) or nullptr
  A scale;                 // softmax_scale (dot-product attention)
  double dropout_p;
  uint32_t keep_threshold;  // dropout_threshold(dropout_p): see dropout.h
  uint64_t seed;
  float* lse;              // (B, heads, nW, N), written by the forward
  // Forward only.
  scalar_t* out;           // (B, H, W, heads * D) contiguous
  // Backward only.
  const scalar_t* dout;    // (B, H, W, heads * D), strides ds
  int64_t ds[3];
  scalar_t* dqkv;          // (B, H, W, 3, heads, D) contiguous
};

// Per-thread scratch of the work items of one window: its tokens, and the rows of its heads, gathered
// once for all of them (see gather_window). The score-shaped matrices are transposed, key j by query i,
// so that the softmax runs down columns; they have rows of Np = padded(N) elements, the N x D ones rows
// of Dp = padded(D), and qT, dOT (D x N) rows of Np.
template <typename A>
struct Scratch {
  int64_t N, heads, Np, Dp;
  int64_t b = -1, w = -1;              // the window (batch b, window w) whose tokens and rows it holds
  std::vector<Token> tok, next_tok;    // its tokens, and those of the next window (prefetched)
  std::vector<A> region, next_region;  // shift region of each token, as a number
  std::vector<A> qkv;                  // (3, heads, N, Dp) q, k, v rows of the window
  std::vector<A> dO;                   // (heads, N, Dp) dout rows of the window (backward)
  // Per item: normalized q, k (cosine attention), q^T, S^T (then P^T), out rows; dO^T, dP^T (then dS^T),
  // cosines, dropped-out P^T, dq, dk, dv (backward); row norms; two column vectors.
  std::vector<A> qq, kk, qT, sT, o, dOT, dpT, cosT, pdT, dq, dk, dv, qnorm, knorm, col0, col1;
  std::vector<uint8_t> keep;  // (N, N) dropout keep mask of the item (with dropout)
  Scratch(int64_t N, int64_t D, int64_t heads, bool bwd)
      : N(N), heads(heads), Np(padded<A>(N)), Dp(padded<A>(D)), tok(N), next_tok(N), region(N), next_region(N),
        qkv(3 * heads * N * Dp), dO(bwd ? heads * N * Dp : 0), qq(N * Dp), kk(N * Dp), qT(D * Np), sT(N * Np),
        o(bwd ? 0 : N * Dp), dOT(bwd ? D * Np : 0), dpT(bwd ? N * Np : 0), cosT(bwd ? N * Np : 0),
        pdT(bwd ? N * Np : 0), dq(bwd ? N * Dp : 0), dk(bwd ? N * Dp : 0), dv(bwd ? N * Dp : 0), qnorm(N), knorm(N),
        col0(Np), col1(Np) {}
  // The (N, Dp) rows of q, k or v (`which` = 0, 1, 2) of head h.
  const A* rows(int which, int64_t h) const { return qkv.data() + (which * heads + h) * N * Dp; }
};

// The dropout keep mask of item (batch b, head h, window w), row-major (N, N), in sc.keep.
template <typename scalar_t, typename A>
const uint8_t* item_keep_mask(const Args<scalar_t, A>& a, Scratch<A>& sc, int64_t b, int64_t h, int64_t w) {
  const int64_t N = a.g.N;
  sc.keep.resize(N * N);
  const uint64_t base = static_cast<uint64_t>((b * a.g.heads + h) * a.g.nW + w) * static_cast<uint64_t>(N * N);
  dropout_keep_mask(a.seed, base, N * N, a.keep_threshold, sc.keep.data());
  return sc.keep.data();
}

// Cache prefetch of the `bytes` bytes at p, for reading or writing (a no-op where the compiler has no hint).
template <bool kWrite>
C10_ALWAYS_INLINE void prefetch(const void* p, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off, kWrite, 2);
#endif
}

// Points sc at window w of batch b and gathers, in op-math, the q, k, v rows (and in the backward the dout
// rows) of its heads [h, h_end): the items of a chunk are consecutive, so these are all the heads it will
// process in this window. Padding tokens take pad_qkv (or zeros) and a zero dout.
//
// Gathering a window's pixels whole (rather than one head's D elements of each pixel per item) lets the
// q, k, v of all its heads stream in; and each token prefetches the pixel of the same token of the next
// window in item order (its qkv, and dout and dqkv or out rows), so that the next window's gather and
// scatters find them in cache: the hardware prefetchers do not anticipate runs of only ww pixels.
template <typename scalar_t, typename A>
C10_ALWAYS_INLINE void gather_window(const Args<scalar_t, A>& a, Scratch<A>& sc, int64_t b, int64_t w, int64_t h,
                                     int64_t h_end, bool bwd) {
  const Geometry& g = a.g;
  const int64_t N = g.N, D = g.D, Dp = sc.Dp, row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  window_tokens(g, w, sc.tok.data(), sc.region.data());
  sc.b = b;
  sc.w = w;
  const int64_t next = b * g.nW + w + 1, nb = next / g.nW;
  if (nb < g.B) window_tokens(g, next % g.nW, sc.next_tok.data(), sc.next_region.data());
  for (int64_t t = 0; t < N; ++t) {
    const Token nt = sc.next_tok[t];
    if (nb < g.B && nt.real) {
      const int64_t pixel = (nb * g.H + nt.y) * g.W + nt.x;
      for (int which = 0; which < 3; ++which) {
        for (int64_t hh = 0; hh < g.heads; ++hh) {
          prefetch<false>(a.qkv + nb * a.qs[0] + nt.y * a.qs[1] + nt.x * a.qs[2] + which * a.qs[3] + hh * a.qs[4],
                          row_bytes);
        }
      }
      if (bwd) {
        prefetch<false>(a.dout + nb * a.ds[0] + nt.y * a.ds[1] + nt.x * a.ds[2], g.heads * row_bytes);
        prefetch<true>(a.dqkv + pixel * 3 * g.heads * D, 3 * g.heads * row_bytes);
      } else {
        prefetch<true>(a.out + pixel * g.heads * D, g.heads * row_bytes);
      }
    }
    const Token tk = sc.tok[t];
    const scalar_t* src = a.qkv + b * a.qs[0] + tk.y * a.qs[1] + tk.x * a.qs[2];
    for (int which = 0; which < 3; ++which) {
      for (int64_t hh = h; hh < h_end; ++hh) {
        A* C10_RESTRICT row = sc.qkv.data() + ((which * g.heads + hh) * N + t) * Dp;
        if (tk.real) {
          const scalar_t* s = src + which * a.qs[3] + hh * a.qs[4];
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<A>(s[d]);
        } else if (a.pad != nullptr) {
          const A* s = a.pad + (which * g.heads + hh) * D;
          for (int64_t d = 0; d < D; ++d) row[d] = s[d];
        } else {
          for (int64_t d = 0; d < D; ++d) row[d] = A(0);
        }
      }
    }
    const scalar_t* dsrc = bwd ? a.dout + b * a.ds[0] + tk.y * a.ds[1] + tk.x * a.ds[2] : nullptr;
    for (int64_t hh = h; bwd && hh < h_end; ++hh) {
      A* C10_RESTRICT row = sc.dO.data() + (hh * N + t) * Dp;
      if (tk.real) {
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<A>(dsrc[hh * D + d]);
      } else {
        for (int64_t d = 0; d < D; ++d) row[d] = A(0);
      }
    }
  }
}

// The q and k rows the scores of an item are made of (normalized in cosine attention), and their scale.
template <typename A>
struct ScoreInputs {
  const A* q;
  const A* k;
  A mult;
};

// Transposed scores of item (b, w, h) of the window in sc into sc.sT: sT[j, i] = scale * q_i.k_j (or
// logit_scale * cos(q_i, k_j)) + bias[i, j] + shift mask; the raw products (cosines) also into sc.cosT if
// `keep_cos`.
template <bool kAvx, typename scalar_t, typename A>
C10_ALWAYS_INLINE ScoreInputs<A> scores(const Args<scalar_t, A>& a, Scratch<A>& sc, int64_t h, bool keep_cos) {
  const Geometry& g = a.g;
  const int64_t N = g.N, D = g.D, Np = sc.Np, Dp = sc.Dp;
  ScoreInputs<A> in{sc.rows(0, h), sc.rows(1, h), a.scale};
  if (a.logit_scale != nullptr) {
    normalize_rows(in.q, sc.qq.data(), sc.qnorm.data(), N, D, Dp);
    normalize_rows(in.k, sc.kk.data(), sc.knorm.data(), N, D, Dp);
    in = {sc.qq.data(), sc.kk.data(), a.logit_scale[h]};
  }
  transpose<kAvx>(in.q, Dp, sc.qT.data(), Np, N, D);
  A* C10_RESTRICT s = sc.sT.data();
  matmul<kAvx>(in.k, Dp, 1, sc.qT.data(), Np, s, Np, N, D, N);
  if (keep_cos) std::copy(s, s + N * Np, sc.cosT.data());
  const A* C10_RESTRICT biasT = a.biasT + h * N * N;
  const A* C10_RESTRICT region = sc.region.data();
  for (int64_t j = 0; j < N; ++j) {
    const A rj = region[j];
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) {
      s[j * Np + i] = s[j * Np + i] * in.mult + biasT[j * N + i] + (region[i] != rj ? A(kMaskValue) : A(0));
    }
  }
  return in;
}

template <bool kAvx, typename scalar_t, typename A>
C10_ALWAYS_INLINE void fwd_items(const Args<scalar_t, A>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t N = g.N, D = g.D, C = g.heads * g.D;
  Scratch<A> sc(N, D, g.heads, false);
  const int64_t Np = sc.Np, Dp = sc.Dp;
  const A keep_scale = A(1) / A(1 - a.dropout_p);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t h = item % g.heads, w = (item / g.heads) % g.nW, b = item / (g.heads * g.nW);
    if (b != sc.b || w != sc.w) gather_window(a, sc, b, w, h, std::min(g.heads, h + end - item), false);
    scores<kAvx>(a, sc, h, false);
    // P^T in place of S^T.
    A* C10_RESTRICT p = sc.sT.data();
    column_softmax<kAvx>(p, N, Np, sc.col0.data(), sc.col1.data());
    float* lse = a.lse + ((b * g.heads + h) * g.nW + w) * N;
    for (int64_t i = 0; i < N; ++i) lse[i] = static_cast<float>(sc.col0[i]);
    if (a.dropout_p > 0) {
      const uint8_t* keep = item_keep_mask(a, sc, b, h, w);
      for (int64_t j = 0; j < N; ++j) {
        for (int64_t i = 0; i < N; ++i) p[j * Np + i] = keep[i * N + j] ? p[j * Np + i] * keep_scale : A(0);
      }
    }
    // o = P @ v, P read through P^T.
    A* C10_RESTRICT o = sc.o.data();
    matmul<kAvx>(p, 1, Np, sc.rows(2, h), Dp, o, Dp, N, N, D);
    for (int64_t i = 0; i < N; ++i) {
      if (!sc.tok[i].real) continue;
      scalar_t* dst = a.out + ((b * g.H + sc.tok[i].y) * g.W + sc.tok[i].x) * C + h * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[i * Dp + d]);
    }
  }
}

template <bool kAvx, typename scalar_t, typename A>
C10_ALWAYS_INLINE void bwd_items(const Args<scalar_t, A>& a, int64_t begin, int64_t end, A* C10_RESTRICT partial) {
  const Geometry& g = a.g;
  const int64_t N = g.N, D = g.D, heads = g.heads;
  Scratch<A> sc(N, D, heads, true);
  const int64_t Np = sc.Np, Dp = sc.Dp;
  const bool cosine = a.logit_scale != nullptr;
  const A keep_scale = A(1) / A(1 - a.dropout_p);
  A* C10_RESTRICT dbiasT = partial;                        // (heads, N, N), transposed as biasT
  A* C10_RESTRICT dpad = partial + heads * N * N;          // (3, heads, D)
  A* C10_RESTRICT dlogit = dpad + 3 * heads * D;           // (heads,)
  for (int64_t item = begin; item < end; ++item) {
    const int64_t h = item % heads, w = (item / heads) % g.nW, b = item / (heads * g.nW);
    if (b != sc.b || w != sc.w) gather_window(a, sc, b, w, h, std::min(heads, h + end - item), true);
    const ScoreInputs<A> in = scores<kAvx>(a, sc, h, cosine);
    const A* dO = sc.dO.data() + h * N * Dp;
    transpose<kAvx>(dO, Dp, sc.dOT.data(), Np, N, D);
    // P^T in place of S^T, with the normalizer recomputed rather than read from the saved lse: delta below is
    // rowsum(P * dP) of this P, and the saved lse's rounding (relative eps * |lse|, large for V2's scaled
    // cosines) would scale a whole row of P, leaving each row of dS a non-zero sum that dlogit_scale and
    // dbias accumulate over every window. A softmax costs O(N^2), the four GEMMs below O(N^2 D).
    A* C10_RESTRICT p = sc.sT.data();
    column_softmax<kAvx>(p, N, Np, sc.col0.data(), sc.col1.data());
    // dPd^T = v @ dO^T: the gradient w.r.t. the dropped-out probabilities Pd (Pd = P without dropout).
    A* C10_RESTRICT dp = sc.dpT.data();
    matmul<kAvx>(sc.rows(2, h), Dp, 1, sc.dOT.data(), Np, dp, Np, N, D, N);
    const A* pd = p;
    if (a.dropout_p > 0) {
      const uint8_t* keep = item_keep_mask(a, sc, b, h, w);
      A* C10_RESTRICT pdT = sc.pdT.data();
      for (int64_t j = 0; j < N; ++j) {
        for (int64_t i = 0; i < N; ++i) {
          const bool kept = keep[i * N + j];
          dp[j * Np + i] = kept ? dp[j * Np + i] * keep_scale : A(0);
          pdT[j * Np + i] = kept ? p[j * Np + i] * keep_scale : A(0);
        }
      }
      pd = pdT;
    }
    // dP -> dS = P * (dP - rowsum(P * dP)) in place (the row sums of P are column sums of P^T), summed into
    // dbias (and, times the cosines, into dlogit_scale), then scaled by mult: dS becomes the gradient
    // w.r.t. q.k. Padding columns stay zero, as dP's are.
    A* C10_RESTRICT delta = sc.col1.data();
    std::fill(delta, delta + Np, A(0));
    for (int64_t j = 0; j < N; ++j) {
#pragma omp simd
      for (int64_t i = 0; i < Np; ++i) delta[i] += p[j * Np + i] * dp[j * Np + i];
    }
    A* C10_RESTRICT dcos = sc.col0.data();
    std::fill(dcos, dcos + Np, A(0));
    for (int64_t j = 0; j < N; ++j) {
      A* C10_RESTRICT dsj = dp + j * Np;
      const A* C10_RESTRICT pj = p + j * Np;
      const A* C10_RESTRICT cosj = sc.cosT.data() + j * Np;
      A* C10_RESTRICT dbj = dbiasT + (h * N + j) * N;
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) {
        const A ds = pj[i] * (dsj[i] - delta[i]);
        dbj[i] += ds;
        if (cosine) dcos[i] += ds * cosj[i];
        dsj[i] = ds * in.mult;
      }
    }
    if (cosine) {
      double item_dlogit = 0;
      for (int64_t i = 0; i < N; ++i) item_dlogit += dcos[i];
      dlogit[h] += static_cast<A>(item_dlogit);
    }
    // dv = Pd^T @ dO, dq = dS @ k (dS read through dS^T), dk = dS^T @ q.
    A* C10_RESTRICT dv = sc.dv.data();
    A* C10_RESTRICT dq = sc.dq.data();
    A* C10_RESTRICT dk = sc.dk.data();
    matmul<kAvx>(pd, Np, 1, dO, Dp, dv, Dp, N, N, D);
    matmul<kAvx>(dp, 1, Np, in.k, Dp, dq, Dp, N, N, D);
    matmul<kAvx>(dp, Np, 1, in.q, Dp, dk, Dp, N, N, D);
    if (cosine) {
      normalize_rows_bwd(dq, sc.qq.data(), sc.qnorm.data(), N, D, Dp);
      normalize_rows_bwd(dk, sc.kk.data(), sc.knorm.data(), N, D, Dp);
    }
    const A* grads[3] = {dq, dk, dv};
    for (int64_t t = 0; t < N; ++t) {
      if (sc.tok[t].real) {
        scalar_t* dst = a.dqkv + (((b * g.H + sc.tok[t].y) * g.W + sc.tok[t].x) * 3 * heads + h) * D;
        for (int which = 0; which < 3; ++which) {
          const A* src = grads[which] + t * Dp;
          scalar_t* dw = dst + which * heads * D;
          for (int64_t d = 0; d < D; ++d) dw[d] = static_cast<scalar_t>(src[d]);
        }
      } else if (a.pad != nullptr) {
        for (int which = 0; which < 3; ++which) {
          const A* src = grads[which] + t * Dp;
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
  at::Tensor biasT;        // (heads, N, N) op-math, contiguous, transposed: biasT[h, j, i] = bias[h, i, j]
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
    e.biasT = at::empty({g.heads, g.N, g.N}, t.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "vitfast_window_attention_bias", [&] {
      const scalar_t* src = t.const_data_ptr<scalar_t>();
      scalar_t* dst = e.biasT.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < g.N; ++i) {
        for (int64_t j = 0; j < g.N; ++j) {
          const int64_t r = (i / g.ww - j / g.ww + g.wh - 1) * (2 * g.ww - 1) + (i % g.ww - j % g.ww + g.ww - 1);
          for (int64_t h = 0; h < g.heads; ++h) dst[(h * g.N + j) * g.N + i] = src[r * g.heads + h];
        }
      }
    });
  } else {
    e.biasT = bias.to(acc).transpose(1, 2).contiguous();
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
  a.biasT = e.biasT.const_data_ptr<A>();
  a.pad = e.pad.defined() ? e.pad.const_data_ptr<A>() : nullptr;
  a.logit_scale = e.logit_scale.defined() ? e.logit_scale.const_data_ptr<A>() : nullptr;
  a.scale = static_cast<A>(softmax_scale);
  a.dropout_p = dropout_p;
  a.keep_threshold = dropout_threshold(dropout_p);
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
    const bool avx = use_avx_fma();
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
    const std::optional<at::Tensor>& logit_scale, const at::Tensor& out, const at::Tensor& lse,
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
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == g.B && lse.size(1) == g.heads && lse.size(2) == g.nW &&
                  lse.size(3) == g.N && lse.scalar_type() == at::kFloat,
              "vitfast ", op, ": lse must be float32 (B, heads, nW, N) = (", g.B, ", ", g.heads, ", ", g.nW, ", ",
              g.N, "), got ", lse.sizes(), " ", lse.scalar_type());
  const at::Tensor dout = dout_in.stride(3) == 1 || dout_in.size(3) <= 1 ? dout_in : dout_in.contiguous();
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
      a.dout = dout.const_data_ptr<scalar_t>();
      for (int d = 0; d < 3; ++d) a.ds[d] = dout.stride(d);
      a.dqkv = dqkv.mutable_data_ptr<scalar_t>();
      A* part = partials.mutable_data_ptr<A>();
      const bool avx = use_avx_fma();
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
  // Chunk partials summed in chunk order, then the dense dbias (transposed, as biasT) folded onto the table
  // in (i, j) order. The gradients that are slices of `total` are copied out: returns must not share storage.
  const at::Tensor total = partials.sum(0);
  const at::Tensor denseT = total.narrow(0, 0, g.heads * g.N * g.N).view({g.heads, g.N, g.N});
  at::Tensor dbias;
  if (bias.dim() == 2) {
    at::Tensor dtable = at::zeros(bias.sizes(), qkv.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "vitfast_window_attention_dbias", [&] {
      const scalar_t* src = denseT.const_data_ptr<scalar_t>();
      scalar_t* dst = dtable.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < g.N; ++i) {
        for (int64_t j = 0; j < g.N; ++j) {
          const int64_t r = (i / g.ww - j / g.ww + g.wh - 1) * (2 * g.ww - 1) + (i % g.ww - j % g.ww + g.ww - 1);
          for (int64_t h = 0; h < g.heads; ++h) dst[r * g.heads + h] += src[(h * g.N + j) * g.N + i];
        }
      }
    });
    dbias = dtable.to(bias.scalar_type());
  } else {
    dbias = denseT.transpose(1, 2).clone(at::MemoryFormat::Contiguous).to(bias.scalar_type());
  }
  at::Tensor dpad = present(pad_qkv) ? total.narrow(0, g.heads * g.N * g.N, 3 * g.heads * g.D)
                                           .view(pad_qkv->sizes())
                                           .to(pad_qkv->scalar_type(), /*non_blocking=*/false, /*copy=*/true)
                                     : qkv.new_empty({0});
  const int64_t logit_offset = g.heads * g.N * g.N + 3 * g.heads * g.D;
  at::Tensor dlogit = present(logit_scale) ? total.narrow(0, logit_offset, g.heads)
                                                 .to(logit_scale->scalar_type(), /*non_blocking=*/false, /*copy=*/true)
                                           : qkv.new_empty({0}, qkv.options().dtype(at::kFloat));
  return {dqkv, dbias, dpad, dlogit};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("window_attention_fwd", &window_attention_fwd_cpu);
  m.impl("window_attention_bwd", &window_attention_bwd_cpu);
}

}  // namespace vitfast
