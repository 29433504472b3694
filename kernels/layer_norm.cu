/*
 * LayerNorm (Ba, Kiros, Hinton 2016, "Layer Normalization", arXiv:1607.06450) over the rows of an (M, N)
 * matrix with unit inner stride, with an optional fused residual add, forward and backward, in float32,
 * float16 and bfloat16 with fp32 accumulation, for 1 <= N <= 8192.
 *
 * Thread mapping: a row is held whole in registers by a row group of TPR threads, TPR a power of two
 * chosen from N alone: 4..32 lanes of a warp (several rows per 128-thread block) while the row fits in a
 * warp, else a block of 64..512 threads per row. Thread `lane` of the group owns the columns
 * (it * TPR + lane) * VEC + [0, VEC) for it < ITERS, so every load of the group is coalesced. VEC is the
 * widest of 16-, 8-, 4-byte vectors that every pointer, row stride and N allow, else 1 element.
 *
 * Forward: mean and variance by the corrected two-pass algorithm over the registers (Chan, Golub, LeVeque
 * 1983; the one every vitfast kernel that normalizes rows uses, csrc/layer_norm_stats.h): mu0 = sum(x) / N,
 * then dev = sum(x - mu0) and sq = sum((x - mu0)^2), mean = mu0 + dev / N, var = (sq - dev^2 / N) / N. No
 * E[x^2] - E[x]^2 cancellation, and a constant row gets its value as the mean exactly (y = bias exactly).
 * Each sum is over the group by warp shuffles and, for a block per row, across warps through shared memory.
 * Backward: dx per row from two row sums (of g * xhat and of g). dweight and dbias by a two-stage
 * reduction: each block accumulates fp32 column partials in registers over the rows it visits (grid-
 * stride loop over a grid that is fully resident), sums them over its row groups, and writes one row of
 * a (num_blocks, N) buffer; a second, column-parallel kernel sums that buffer and casts once. The order
 * of every sum is fixed, so results are deterministic (no atomics).
 */
#include "layer_norm.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace vitfast {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Block size while a row takes at most a warp: several rows per block.
constexpr int kGroupBlockThreads = 128;
// Lanes per row at least, so that even for tiny N a row group's 16-byte accesses cover whole 32-byte
// sectors instead of each lane touching a different row.
constexpr int kMinRowThreads = 4;
// Row elements per thread. The backward keeps xhat, g and the dweight/dbias column accumulators in
// registers, four times as many values, hence half the elements.
constexpr int kFwdElemsPerThread = 32;
constexpr int kBwdElemsPerThread = 16;
// Threads per SM the backward grid asks for. Each block writes a partial row, so the grid is sized to
// be resident all at once (a second wave would double the time), and __launch_bounds__ holds the
// registers to what this many threads can have: 128, which the backward fits without spilling.
constexpr int kBwdThreadsPerSm = 512;
// Tile of the second-stage kernel: columns per block, and the partial rows its threads stride over.
constexpr int kFinalizeCols = 32;
constexpr int kFinalizeRows = 32;

static_assert(kLayerNormMaxN <= 256 * kFwdElemsPerThread, "forward rows must fit a 256-thread block");
static_assert(kLayerNormMaxN <= 512 * kBwdElemsPerThread, "backward rows must fit a 512-thread block");

template <int TPR>
struct RowMapping {
  static_assert(TPR >= kMinRowThreads && (TPR & (TPR - 1)) == 0, "threads per row: a power of two >= 4");
  static constexpr int kBlockThreads = TPR <= kWarpSize ? kGroupBlockThreads : TPR;
  static constexpr int kRowsPerBlock = kBlockThreads / TPR;
  static constexpr int kWarpsPerRow = TPR <= kWarpSize ? 1 : TPR / kWarpSize;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC elements moved as one aligned 4/8/16-byte access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_float(pack.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pack.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// Butterfly sum over aligned groups of WIDTH lanes; every lane of a group ends with the same bits.
// All 32 lanes must call it together.
template <int WIDTH>
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sums each of the K values over the TPR threads of a row; every thread of the row gets the same totals.
// Rows wider than a warp go through `buf` (K * kWarpsPerRow floats of shared memory) with a single
// __syncthreads: the caller must not hand the same buf to the next call (alternate two), since a fast
// warp may write it for that call before a slow one has read it for this one.
template <int TPR, int K>
__device__ __forceinline__ void row_sum(float (&v)[K], float* buf) {
  if constexpr (TPR <= kWarpSize) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum<TPR>(v[k]);
  } else {
    constexpr int kWarps = TPR / kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      v[k] = warp_sum<kWarpSize>(v[k]);
      if (threadIdx.x % kWarpSize == 0) buf[k * kWarps + warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      v[k] = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v[k] += buf[k * kWarps + w];
    }
  }
}

// A lane's part of a row's sums of the deviations d = (v - mu0) * down and of their squares (`down`: 1, or
// 2^-100 where the squares overflow; exact), over the columns the lane holds.
template <int TPR, int ITERS, int VEC>
__device__ __forceinline__ void deviation_sums(const float (&v)[ITERS][VEC], int lane, int N, float mu0, float down,
                                               float (&sums)[2]) {
  sums[0] = sums[1] = 0.f;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * TPR + lane) * VEC;
    if (col < N) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = (v[it][j] - mu0) * down;
        sums[0] += d;
        sums[1] += d * d;
      }
    }
  }
}

template <typename T, int VEC, int TPR>
__global__ void __launch_bounds__(RowMapping<TPR>::kBlockThreads) _layer_norm_fwd_kernel(
    const T* __restrict__ x,             // (M, N), row stride x_row_stride
    const T* __restrict__ residual,      // (M, N), row stride residual_row_stride; nullptr for none
    const T* __restrict__ weight,        // (N,); nullptr for none
    const T* __restrict__ bias,          // (N,); nullptr for none
    T* __restrict__ y,                   // (M, N) out, contiguous
    T* __restrict__ s_out,               // (M, N) out, contiguous, x + residual; unused without residual
    float* __restrict__ mean,            // (M,) out
    float* __restrict__ rstd,            // (M,) out
    const int64_t x_row_stride,          // elements
    const int64_t residual_row_stride,   // elements
    const int64_t M,
    const int N,
    const float eps) {
  using Map = RowMapping<TPR>;
  constexpr int ITERS = kFwdElemsPerThread / VEC;
  __shared__ float red[3][2 * Map::kWarpsPerRow];
  const int lane = threadIdx.x % TPR;
  const int group = threadIdx.x / TPR;
  const float inv_n = 1.f / static_cast<float>(N);

  // The loop bound is uniform over the block, so every lane reaches every shuffle and __syncthreads;
  // groups past the last row compute on zeros and store nothing.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * Map::kRowsPerBlock; first < M;
       first += static_cast<int64_t>(gridDim.x) * Map::kRowsPerBlock) {
    const int64_t row = first + group;
    const bool row_ok = row < M;
    const int64_t r = row_ok ? row : first;  // keeps the addresses formed below inside the tensors

    float v[ITERS][VEC];
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * TPR + lane) * VEC;
      if (row_ok && col < N) {
        load_pack<T, VEC>(x + r * x_row_stride + col, v[it]);
        if (residual != nullptr) {
          float rv[VEC];
          load_pack<T, VEC>(residual + r * residual_row_stride + col, rv);
          // The statistics are those of the stored sum, rounded to T.
#pragma unroll
          for (int j = 0; j < VEC; ++j) v[it][j] = to_float(from_float<T>(v[it][j] + rv[j]));
          store_pack<T, VEC>(s_out + r * N + col, v[it]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[it][j] = 0.f;
      }
    }

    float sum[1] = {0.f};
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum[0] += v[it][j];
    }
    row_sum<TPR>(sum, red[0]);
    const float mu0 = sum[0] * inv_n;

    float dev_sq[2];
    deviation_sums<TPR>(v, lane, N, mu0, 1.f, dev_sq);
    row_sum<TPR>(dev_sq, red[1]);
    float mu = mu0 + dev_sq[0] * inv_n;
    float rs = rsqrtf(fmaxf((dev_sq[1] - dev_sq[0] * (dev_sq[0] * inv_n)) * inv_n, 0.f) + eps);
    // Squared deviations that overflow (sq = inf): the second pass again on the deviations times 2^-100, as
    // csrc/layer_norm_stats.h. The test is uniform over the warp (and over the block, for a block per row),
    // so every lane reaches the shuffles and the __syncthreads of row_sum; its buffer is the third, since
    // the next row's first sum writes red[0].
    if (__any_sync(kFullMask, dev_sq[1] == INFINITY)) {
      float scaled[2];
      deviation_sums<TPR>(v, lane, N, mu0, dev_sq[1] == INFINITY ? 0x1p-100f : 1.f, scaled);
      row_sum<TPR>(scaled, red[2]);
      if (dev_sq[1] == INFINITY) {
        mu = mu0 + scaled[0] * inv_n * 0x1p100f;
        const float var_down = fmaxf((scaled[1] - scaled[0] * (scaled[0] * inv_n)) * inv_n, 0.f);
        const float var = var_down * 0x1p100f * 0x1p100f;
        rs = var == INFINITY ? rsqrtf(var_down) * 0x1p-100f : rsqrtf(var + eps);
      }
    }

#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * TPR + lane) * VEC;
      if (row_ok && col < N) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = (v[it][j] - mu) * rs;
        if (weight != nullptr) {
          float w[VEC];
          load_pack<T, VEC>(weight + col, w);
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] *= w[j];
        }
        if (bias != nullptr) {
          float b[VEC];
          load_pack<T, VEC>(bias + col, b);
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] += b[j];
        }
        store_pack<T, VEC>(y + r * N + col, out);
      }
    }
    if (row_ok && lane == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
  }
}

// First stage of the dweight/dbias reduction: sums a thread block's per-thread column accumulators
// over its row groups and writes them as row blockIdx.x of `partial`. Called by the whole block.
template <int TPR, int ITERS, int VEC>
__device__ __forceinline__ void write_column_partial(
    const float (&acc)[ITERS][VEC],
    float* __restrict__ partial,  // (gridDim.x, N) out
    float* __restrict__ scratch,  // (kRowsPerBlock, TPR * ITERS * VEC) shared memory, unused for 1 row
    const int N) {
  using Map = RowMapping<TPR>;
  constexpr int kRowCap = TPR * ITERS * VEC;
  float* out = partial + static_cast<int64_t>(blockIdx.x) * N;
  const int lane = threadIdx.x % TPR;
  if constexpr (Map::kRowsPerBlock == 1) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * TPR + lane) * VEC;
      if (col < N) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[col + j] = acc[it][j];
      }
    }
  } else {
    float* mine = scratch + (threadIdx.x / TPR) * kRowCap;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * TPR + lane) * VEC;
      if (col < N) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) mine[col + j] = acc[it][j];
      }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < N; c += Map::kBlockThreads) {
      float total = 0.f;
#pragma unroll
      for (int g = 0; g < Map::kRowsPerBlock; ++g) total += scratch[g * kRowCap + c];
      out[c] = total;
    }
    __syncthreads();  // the caller reuses scratch
  }
}

template <typename T, int VEC, int TPR>
__global__ void __launch_bounds__(RowMapping<TPR>::kBlockThreads, kBwdThreadsPerSm / RowMapping<TPR>::kBlockThreads)
_layer_norm_bwd_kernel(
    const T* __restrict__ dy,                // (M, N), row stride dy_row_stride
    const T* __restrict__ ds,                // (M, N), row stride ds_row_stride; nullptr for none
    const T* __restrict__ s,                 // (M, N), row stride s_row_stride: the normalized input
    const T* __restrict__ weight,            // (N,); nullptr for none
    const float* __restrict__ mean,          // (M,)
    const float* __restrict__ rstd,          // (M,)
    T* __restrict__ dx,                      // (M, N) out, contiguous
    float* __restrict__ dweight_partial,     // (gridDim.x, N) out; nullptr to skip
    float* __restrict__ dbias_partial,       // (gridDim.x, N) out; nullptr to skip
    const int64_t dy_row_stride,             // elements
    const int64_t ds_row_stride,             // elements
    const int64_t s_row_stride,              // elements
    const int64_t M,
    const int N) {
  using Map = RowMapping<TPR>;
  constexpr int ITERS = kBwdElemsPerThread / VEC;
  constexpr int kScratch = Map::kRowsPerBlock > 1 ? Map::kBlockThreads * kBwdElemsPerThread : 1;
  __shared__ float red[2][2 * Map::kWarpsPerRow];
  __shared__ float scratch[kScratch];
  const int lane = threadIdx.x % TPR;
  const int group = threadIdx.x / TPR;
  const float inv_n = 1.f / static_cast<float>(N);

  float dw[ITERS][VEC];
  float db[ITERS][VEC];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      dw[it][j] = 0.f;
      db[it][j] = 0.f;
    }
  }

  int parity = 0;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * Map::kRowsPerBlock; first < M;
       first += static_cast<int64_t>(gridDim.x) * Map::kRowsPerBlock) {
    const int64_t row = first + group;
    const bool row_ok = row < M;
    const int64_t r = row_ok ? row : first;
    const float mu = row_ok ? mean[r] : 0.f;
    const float rs = row_ok ? rstd[r] : 0.f;

    float xhat[ITERS][VEC];
    float g[ITERS][VEC];
    float sums[2] = {0.f, 0.f};  // of g * xhat and of g
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * TPR + lane) * VEC;
      if (row_ok && col < N) {
        float sv[VEC];
        load_pack<T, VEC>(s + r * s_row_stride + col, sv);
        load_pack<T, VEC>(dy + r * dy_row_stride + col, g[it]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xhat[it][j] = (sv[j] - mu) * rs;
          dw[it][j] += g[it][j] * xhat[it][j];
          db[it][j] += g[it][j];
        }
        if (weight != nullptr) {
          float w[VEC];
          load_pack<T, VEC>(weight + col, w);
#pragma unroll
          for (int j = 0; j < VEC; ++j) g[it][j] *= w[j];
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          sums[0] += g[it][j] * xhat[it][j];
          sums[1] += g[it][j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xhat[it][j] = 0.f;
          g[it][j] = 0.f;
        }
      }
    }
    row_sum<TPR>(sums, red[parity]);
    parity ^= 1;
    const float c1 = sums[0] * inv_n;
    const float c2 = sums[1] * inv_n;

#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * TPR + lane) * VEC;
      if (row_ok && col < N) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = rs * (g[it][j] - c1 * xhat[it][j] - c2);
        if (ds != nullptr) {
          float dsv[VEC];
          load_pack<T, VEC>(ds + r * ds_row_stride + col, dsv);
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] += dsv[j];
        }
        store_pack<T, VEC>(dx + r * N + col, out);
      }
    }
  }

  // Both pointers are kernel arguments, so these branches are uniform over the block.
  if (dweight_partial != nullptr) write_column_partial<TPR, ITERS, VEC>(dw, dweight_partial, scratch, N);
  if (dbias_partial != nullptr) write_column_partial<TPR, ITERS, VEC>(db, dbias_partial, scratch, N);
}

// Second stage of the dweight/dbias reduction: out[c] = sum_p partial[p, c], cast to T. blockIdx.y
// picks dweight (0) or dbias (1); a block of kFinalizeCols x kFinalizeRows threads owns kFinalizeCols
// columns, its rows of threads stride over the partial rows, and a shared-memory tree sums them.
template <typename T>
__global__ void __launch_bounds__(kFinalizeCols * kFinalizeRows) _layer_norm_bwd_finalize_kernel(
    const float* __restrict__ dweight_partial,  // (num_partials, N); nullptr to skip
    const float* __restrict__ dbias_partial,    // (num_partials, N); nullptr to skip
    T* __restrict__ dweight,                    // (N,) out
    T* __restrict__ dbias,                      // (N,) out
    const int64_t num_partials,
    const int N) {
  const float* partial = blockIdx.y == 0 ? dweight_partial : dbias_partial;
  T* out = blockIdx.y == 0 ? dweight : dbias;
  if (partial == nullptr) return;  // uniform over the block
  __shared__ float buf[kFinalizeRows][kFinalizeCols];
  const int col = blockIdx.x * kFinalizeCols + threadIdx.x;
  float acc = 0.f;
  if (col < N) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < num_partials; p += kFinalizeRows) acc += partial[p * N + col];
  }
  buf[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int half = kFinalizeRows / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) buf[threadIdx.y][threadIdx.x] += buf[threadIdx.y + half][threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && col < N) out[col] = from_float<T>(buf[0][threadIdx.x]);
}

// ------------------------------------------------------------------------------------------------
// Host side: pick VEC and TPR, launch.

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest power of two >= ceil(N / elems_per_thread), at least kMinRowThreads.
int threads_per_row(int64_t N, int elems_per_thread) {
  int tpr = kMinRowThreads;
  while (static_cast<int64_t>(tpr) * elems_per_thread < N) tpr *= 2;
  return tpr;
}

int block_threads(int tpr) { return tpr <= kWarpSize ? kGroupBlockThreads : tpr; }

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Widest vector (in elements) that N, every pointer and every row stride allow. nullptr passes.
template <typename T>
int pick_vec(int64_t N, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> row_strides) {
  for (int vec = 16 / static_cast<int>(sizeof(T)); vec > 1; vec /= 2) {
    bool ok = N % vec == 0;
    for (const void* p : ptrs) ok = ok && aligned(p, vec * static_cast<int64_t>(sizeof(T)));
    for (int64_t stride : row_strides) ok = ok && stride % vec == 0;
    if (ok) return vec;
  }
  return 1;
}

template <typename T>
struct FwdArgs {
  const T* x;
  int64_t x_row_stride;
  const T* residual;
  int64_t residual_row_stride;
  const T* weight;
  const T* bias;
  T* y;
  T* s_out;
  float* mean;
  float* rstd;
  int64_t M;
  int N;
  float eps;
  cudaStream_t stream;
};

template <typename T>
struct BwdArgs {
  const T* dy;
  int64_t dy_row_stride;
  const T* ds;
  int64_t ds_row_stride;
  const T* s;
  int64_t s_row_stride;
  const T* weight;
  const float* mean;
  const float* rstd;
  T* dx;
  float* dweight_partial;
  float* dbias_partial;
  int64_t M;
  int N;
  int64_t num_blocks;
  cudaStream_t stream;
};

template <typename T, int VEC, int TPR>
cudaError_t launch_fwd(const FwdArgs<T>& a) {
  using Map = RowMapping<TPR>;
  const int64_t blocks = std::min<int64_t>(ceil_div(a.M, Map::kRowsPerBlock), INT_MAX);
  _layer_norm_fwd_kernel<T, VEC, TPR><<<static_cast<unsigned>(blocks), Map::kBlockThreads, 0, a.stream>>>(
      a.x, a.residual, a.weight, a.bias, a.y, a.s_out, a.mean, a.rstd, a.x_row_stride, a.residual_row_stride,
      a.M, a.N, a.eps);
  return cudaGetLastError();
}

template <typename T, int VEC, int TPR>
cudaError_t launch_bwd(const BwdArgs<T>& a) {
  using Map = RowMapping<TPR>;
  _layer_norm_bwd_kernel<T, VEC, TPR>
      <<<static_cast<unsigned>(a.num_blocks), Map::kBlockThreads, 0, a.stream>>>(
          a.dy, a.ds, a.s, a.weight, a.mean, a.rstd, a.dx, a.dweight_partial, a.dbias_partial, a.dy_row_stride,
          a.ds_row_stride, a.s_row_stride, a.M, a.N);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t dispatch_fwd_tpr(const FwdArgs<T>& a, int tpr) {
  switch (tpr) {
    case 4: return launch_fwd<T, VEC, 4>(a);
    case 8: return launch_fwd<T, VEC, 8>(a);
    case 16: return launch_fwd<T, VEC, 16>(a);
    case 32: return launch_fwd<T, VEC, 32>(a);
    case 64: return launch_fwd<T, VEC, 64>(a);
    case 128: return launch_fwd<T, VEC, 128>(a);
    case 256: return launch_fwd<T, VEC, 256>(a);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int VEC>
cudaError_t dispatch_bwd_tpr(const BwdArgs<T>& a, int tpr) {
  switch (tpr) {
    case 4: return launch_bwd<T, VEC, 4>(a);
    case 8: return launch_bwd<T, VEC, 8>(a);
    case 16: return launch_bwd<T, VEC, 16>(a);
    case 32: return launch_bwd<T, VEC, 32>(a);
    case 64: return launch_bwd<T, VEC, 64>(a);
    case 128: return launch_bwd<T, VEC, 128>(a);
    case 256: return launch_bwd<T, VEC, 256>(a);
    case 512: return launch_bwd<T, VEC, 512>(a);
    default: return cudaErrorInvalidValue;
  }
}

// VEC of 8 elements exists only for 2-byte types (16 bytes); 4 is 16 bytes for float, 8 for 2-byte.
template <typename T, typename Args, typename Dispatch>
cudaError_t dispatch_vec(int vec, const Args& a, int tpr, Dispatch dispatch) {
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) * 8 <= 16) return dispatch(std::integral_constant<int, 8>{}, a, tpr);
      return cudaErrorInvalidValue;
    case 4: return dispatch(std::integral_constant<int, 4>{}, a, tpr);
    case 2: return dispatch(std::integral_constant<int, 2>{}, a, tpr);
    case 1: return dispatch(std::integral_constant<int, 1>{}, a, tpr);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

template <typename T>
cudaError_t layer_norm_fwd(const T* x, int64_t x_row_stride, const T* residual, int64_t residual_row_stride,
                           const T* weight, const T* bias, T* y, T* s_out, float* mean, float* rstd, int64_t M,
                           int64_t N, float eps, cudaStream_t stream) {
  if (M < 1 || N < 1 || N > kLayerNormMaxN || x == nullptr || y == nullptr || mean == nullptr ||
      rstd == nullptr || (residual != nullptr && s_out == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const FwdArgs<T> a{x, x_row_stride, residual, residual_row_stride, weight, bias, y, s_out,
                     mean, rstd, M, static_cast<int>(N), eps, stream};
  const int vec = pick_vec<T>(N, {x, residual, weight, bias, y, s_out}, {x_row_stride, residual_row_stride});
  const int tpr = threads_per_row(N, kFwdElemsPerThread);
  return dispatch_vec<T>(vec, a, tpr, [](auto v, const FwdArgs<T>& args, int t) {
    return dispatch_fwd_tpr<T, decltype(v)::value>(args, t);
  });
}

int64_t layer_norm_bwd_num_blocks(int64_t M, int64_t N, int num_sms) {
  const int tpr = threads_per_row(std::max<int64_t>(N, 1), kBwdElemsPerThread);
  const int threads = block_threads(tpr);
  const int64_t row_blocks = ceil_div(std::max<int64_t>(M, 1), threads / tpr);
  const int64_t resident = static_cast<int64_t>(std::max(num_sms, 1)) * (kBwdThreadsPerSm / threads);
  return std::min(row_blocks, resident);
}

template <typename T>
cudaError_t layer_norm_bwd(const T* dy, int64_t dy_row_stride, const T* ds, int64_t ds_row_stride, const T* s,
                           int64_t s_row_stride, const T* weight, const float* mean, const float* rstd, T* dx,
                           float* dweight_partial, float* dbias_partial, T* dweight, T* dbias, int64_t M,
                           int64_t N, int64_t num_blocks, cudaStream_t stream) {
  if (M < 1 || N < 1 || N > kLayerNormMaxN || num_blocks < 1 || num_blocks > INT_MAX || dy == nullptr ||
      s == nullptr || mean == nullptr || rstd == nullptr || dx == nullptr ||
      (dweight_partial == nullptr) != (dweight == nullptr) || (dbias_partial == nullptr) != (dbias == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const BwdArgs<T> a{dy, dy_row_stride, ds, ds_row_stride, s, s_row_stride, weight, mean,
                     rstd, dx, dweight_partial, dbias_partial, M, static_cast<int>(N), num_blocks, stream};
  const int vec = pick_vec<T>(N, {dy, ds, s, weight, dx}, {dy_row_stride, ds_row_stride, s_row_stride});
  const int tpr = threads_per_row(N, kBwdElemsPerThread);
  cudaError_t err = dispatch_vec<T>(vec, a, tpr, [](auto v, const BwdArgs<T>& args, int t) {
    return dispatch_bwd_tpr<T, decltype(v)::value>(args, t);
  });
  if (err != cudaSuccess || (dweight_partial == nullptr && dbias_partial == nullptr)) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kFinalizeCols)), 2);
  const dim3 block(kFinalizeCols, kFinalizeRows);
  _layer_norm_bwd_finalize_kernel<T><<<grid, block, 0, stream>>>(dweight_partial, dbias_partial, dweight, dbias,
                                                                   num_blocks, static_cast<int>(N));
  return cudaGetLastError();
}

template cudaError_t layer_norm_fwd<float>(const float*, int64_t, const float*, int64_t, const float*, const float*,
                                           float*, float*, float*, float*, int64_t, int64_t, float, cudaStream_t);
template cudaError_t layer_norm_fwd<__half>(const __half*, int64_t, const __half*, int64_t, const __half*,
                                            const __half*, __half*, __half*, float*, float*, int64_t, int64_t,
                                            float, cudaStream_t);
template cudaError_t layer_norm_fwd<__nv_bfloat16>(const __nv_bfloat16*, int64_t, const __nv_bfloat16*, int64_t,
                                                   const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*,
                                                   __nv_bfloat16*, float*, float*, int64_t, int64_t, float,
                                                   cudaStream_t);

template cudaError_t layer_norm_bwd<float>(const float*, int64_t, const float*, int64_t, const float*, int64_t,
                                           const float*, const float*, const float*, float*, float*, float*,
                                           float*, float*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t layer_norm_bwd<__half>(const __half*, int64_t, const __half*, int64_t, const __half*, int64_t,
                                            const __half*, const float*, const float*, __half*, float*, float*,
                                            __half*, __half*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t layer_norm_bwd<__nv_bfloat16>(const __nv_bfloat16*, int64_t, const __nv_bfloat16*, int64_t,
                                                   const __nv_bfloat16*, int64_t, const __nv_bfloat16*,
                                                   const float*, const float*, __nv_bfloat16*, float*, float*,
                                                   __nv_bfloat16*, __nv_bfloat16*, int64_t, int64_t, int64_t,
                                                   cudaStream_t);

}  // namespace vitfast
