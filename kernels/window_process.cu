/*
 * Fused Swin window partition and reverse (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer
 * using Shifted Windows", arXiv:2103.14030): pad + cyclic roll + window partition of a (B, H, W, C) map into
 * (B * nW, N, C) windows in one pass, and window reverse + roll back + crop in one pass, where the eager
 * sequence (F.pad, torch.roll, view/permute/reshape) makes three copies.
 *
 * Thread mapping: a block of (TX, TY) threads walks output rows (one token's C elements) in a grid-stride loop,
 * TY rows at a time; the TX threads of a row copy its vectors (16, 8, 4, 2 or 1 bytes each, the widest the row
 * size and the pointers allow) with coalesced loads and stores. The source row of each output row is found by
 * index arithmetic (int64), once per row: for the partition, token t of window w of image b reads pixel
 * ((py + sh) mod Hp, (px + sw) mod Wp) of the padded map, zeros where that is padding; for the reverse, pixel
 * (y, x) reads the token at ((y - sh) mod Hp, (x - sw) mod Wp) of the rolled map.
 */
#include "window_process.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>

namespace vitfast {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops: more blocks than this only add scheduling work.
constexpr int64_t kMaxBlocks = 65535;

struct WindowGrid {
  int64_t B, H, W, wh, ww, sh, sw, Hp, Wp, nWw, nW, N;
};

// Partition: the source row (b, y, x) in x of output row (b, w, t), or -1 for a padding pixel.
__device__ __forceinline__ int64_t partition_source(const WindowGrid& g, int64_t row) {
  const int64_t t = row % g.N;
  const int64_t w = (row / g.N) % g.nW;
  const int64_t b = row / (g.N * g.nW);
  const int64_t py = (w / g.nWw) * g.wh + t / g.ww;
  const int64_t px = (w % g.nWw) * g.ww + t % g.ww;
  const int64_t sy = (py + g.sh) % g.Hp;
  const int64_t sx = (px + g.sw) % g.Wp;
  return sy < g.H && sx < g.W ? (b * g.H + sy) * g.W + sx : -1;
}

// Reverse: the source row (b, w, t) in windows of output pixel row (b, y, x).
__device__ __forceinline__ int64_t reverse_source(const WindowGrid& g, int64_t row) {
  const int64_t x = row % g.W;
  const int64_t y = (row / g.W) % g.H;
  const int64_t b = row / (g.W * g.H);
  const int64_t py = (y - g.sh + g.Hp) % g.Hp;
  const int64_t px = (x - g.sw + g.Wp) % g.Wp;
  return (b * g.nW + (py / g.wh) * g.nWw + px / g.ww) * g.N + (py % g.wh) * g.ww + px % g.ww;
}

template <typename V, bool REVERSE>
__global__ void __launch_bounds__(kThreads) _window_process_kernel(
    const V* __restrict__ src,  // (B, H, W, C) or (B * nW, N, C), as vectors: (src rows, vecs_per_row)
    V* __restrict__ dst,        // (B * nW, N, C) or (B, H, W, C), as vectors: (rows, vecs_per_row)
    int64_t rows,               // output rows (tokens)
    int64_t vecs_per_row,       // C * elem_size / sizeof(V)
    WindowGrid g) {
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += row_step) {
    const int64_t src_row = REVERSE ? reverse_source(g, row) : partition_source(g, row);
    V* out = dst + row * vecs_per_row;
    if (src_row < 0) {
      for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) out[c] = V{};
    } else {
      const V* in = src + src_row * vecs_per_row;
      for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) out[c] = in[c];
    }
  }
}

bool valid(int64_t B, int64_t H, int64_t W, int64_t C, int64_t elem_size, int64_t wh, int64_t ww, int64_t sh,
           int64_t sw) {
  return B >= 0 && H >= 0 && W >= 0 && C >= 0 && elem_size >= 1 && wh >= 1 && ww >= 1 && 0 <= sh && sh < wh &&
         0 <= sw && sw < ww;
}

WindowGrid make_grid(int64_t B, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sh, int64_t sw) {
  WindowGrid g{B, H, W, wh, ww, sh, sw};
  g.Hp = (H + wh - 1) / wh * wh;
  g.Wp = (W + ww - 1) / ww * ww;
  g.nWw = g.Wp / ww;
  g.nW = (g.Hp / wh) * g.nWw;
  g.N = wh * ww;
  return g;
}

template <typename V, bool REVERSE>
cudaError_t launch_vec(const void* src, void* dst, int64_t rows, int64_t row_bytes, const WindowGrid& g,
                       cudaStream_t stream) {
  const int64_t vecs_per_row = row_bytes / static_cast<int64_t>(sizeof(V));
  // Threads across a row: enough for its vectors, at most a block; the rest of the block takes more rows.
  int tx = 32;
  while (tx < kThreads && tx < vecs_per_row) tx *= 2;
  const dim3 block(tx, kThreads / tx);
  const int64_t blocks = std::min<int64_t>((rows + block.y - 1) / block.y, kMaxBlocks);
  _window_process_kernel<V, REVERSE><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      static_cast<const V*>(src), static_cast<V*>(dst), rows, vecs_per_row, g);
  return cudaGetLastError();
}

template <bool REVERSE>
cudaError_t launch(const void* src, void* dst, int64_t rows, int64_t row_bytes, const WindowGrid& g,
                   cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  const auto fits = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && reinterpret_cast<uintptr_t>(src) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(dst) % bytes == 0;
  };
  if (fits(16)) return launch_vec<uint4, REVERSE>(src, dst, rows, row_bytes, g, stream);
  if (fits(8)) return launch_vec<uint2, REVERSE>(src, dst, rows, row_bytes, g, stream);
  if (fits(4)) return launch_vec<uint32_t, REVERSE>(src, dst, rows, row_bytes, g, stream);
  if (fits(2)) return launch_vec<uint16_t, REVERSE>(src, dst, rows, row_bytes, g, stream);
  return launch_vec<uint8_t, REVERSE>(src, dst, rows, row_bytes, g, stream);
}

}  // namespace

cudaError_t window_partition(const void* x, void* out, int64_t B, int64_t H, int64_t W, int64_t C,
                             int64_t elem_size, int64_t wh, int64_t ww, int64_t sh, int64_t sw, cudaStream_t stream) {
  if (!valid(B, H, W, C, elem_size, wh, ww, sh, sw)) return cudaErrorInvalidValue;
  const WindowGrid g = make_grid(B, H, W, wh, ww, sh, sw);
  return launch<false>(x, out, B * g.nW * g.N, C * elem_size, g, stream);
}

cudaError_t window_reverse(const void* windows, void* out, int64_t B, int64_t H, int64_t W, int64_t C,
                           int64_t elem_size, int64_t wh, int64_t ww, int64_t sh, int64_t sw, cudaStream_t stream) {
  if (!valid(B, H, W, C, elem_size, wh, ww, sh, sw)) return cudaErrorInvalidValue;
  const WindowGrid g = make_grid(B, H, W, wh, ww, sh, sw);
  return launch<true>(windows, out, B * H * W, C * elem_size, g, stream);
}

}  // namespace vitfast
