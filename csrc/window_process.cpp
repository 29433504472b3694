// Swin window partition and reverse (Liu et al. 2021, arXiv:2103.14030) on the CPU, fused.
//
// window_partition: (B, H, W, C) -> (B * nW, N, C), i.e. pad to multiples of the window (zeros), cyclic roll
// by -shift, partition into nW = (Hp / wh)(Wp / ww) windows of N = wh * ww tokens (window w = wy * (Wp / ww)
// + wx, token t = ty * ww + tx). window_reverse: the inverse, (B * nW, N, C) -> (B, H, W, C): reverse the
// partition, roll back by +shift, crop to (H, W). Each is one pass over the output rows: every output row
// of C elements is one copy from its source row, found by index arithmetic, or zeros for padding. Pure
// data movement, so any dtype is moved bit-exactly (rows are copied as bytes). The CUDA version is
// kernels/window_process.cu with its glue in csrc/window_process_cuda.cpp.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace vitfast {
namespace {

struct WindowGrid {
  int64_t B, H, W, C, wh, ww, sh, sw, Hp, Wp, nWw, nW, N;
};

WindowGrid make_grid(const char* op, int64_t B, int64_t H, int64_t W, int64_t C, at::IntArrayRef window_size,
                     at::IntArrayRef shift_size) {
  TORCH_CHECK(window_size.size() == 2 && shift_size.size() == 2, "vitfast ", op,
              ": window_size and shift_size must be pairs, got ", window_size, " and ", shift_size);
  TORCH_CHECK(window_size[0] > 0 && window_size[1] > 0, "vitfast ", op, ": window_size must be positive, got ",
              window_size);
  TORCH_CHECK(0 <= shift_size[0] && shift_size[0] < window_size[0] && 0 <= shift_size[1] &&
                  shift_size[1] < window_size[1],
              "vitfast ", op, ": shift_size ", shift_size, " must be in [0, window) for window_size ", window_size);
  TORCH_CHECK(H >= 0 && W >= 0, "vitfast ", op, ": H and W must be non-negative, got ", H, ", ", W);
  WindowGrid g{B, H, W, C, window_size[0], window_size[1], shift_size[0], shift_size[1]};
  g.Hp = (H + g.wh - 1) / g.wh * g.wh;
  g.Wp = (W + g.ww - 1) / g.ww * g.ww;
  g.nWw = g.Wp / g.ww;
  g.nW = (g.Hp / g.wh) * g.nWw;
  g.N = g.wh * g.ww;
  return g;
}

at::Tensor window_partition_cpu(const at::Tensor& x_in, at::IntArrayRef window_size, at::IntArrayRef shift_size) {
  constexpr const char* op = "window_partition";
  TORCH_CHECK(x_in.dim() == 4, "vitfast ", op, ": x must be (B, H, W, C), got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "vitfast ", op, " (cpu): x must be a CPU tensor, got ", x_in.device());
  const WindowGrid g = make_grid(op, x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3), window_size, shift_size);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({g.B * g.nW, g.N, g.C}, x.options());
  const int64_t rows = g.B * g.nW * g.N;
  if (rows == 0 || g.C == 0) return out;
  const int64_t row_bytes = g.C * static_cast<int64_t>(x.element_size());
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / row_bytes);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r % g.N, w = (r / g.N) % g.nW, b = r / (g.N * g.nW);
      const int64_t py = (w / g.nWw) * g.wh + t / g.ww, px = (w % g.nWw) * g.ww + t % g.ww;
      const int64_t sy = (py + g.sh) % g.Hp, sx = (px + g.sw) % g.Wp;
      if (sy < g.H && sx < g.W) {
        std::memcpy(dst + r * row_bytes, src + ((b * g.H + sy) * g.W + sx) * row_bytes, row_bytes);
      } else {
        std::memset(dst + r * row_bytes, 0, row_bytes);
      }
    }
  });
  return out;
}

at::Tensor window_reverse_cpu(const at::Tensor& windows_in, int64_t H, int64_t W, at::IntArrayRef window_size,
                              at::IntArrayRef shift_size) {
  constexpr const char* op = "window_reverse";
  TORCH_CHECK(windows_in.dim() == 3, "vitfast ", op, ": windows must be (B * nW, N, C), got ", windows_in.sizes());
  TORCH_CHECK(windows_in.device().is_cpu(), "vitfast ", op, " (cpu): windows must be a CPU tensor, got ",
              windows_in.device());
  WindowGrid g = make_grid(op, 0, H, W, windows_in.size(2), window_size, shift_size);
  TORCH_CHECK(windows_in.size(1) == g.N && g.nW > 0 && windows_in.size(0) % g.nW == 0, "vitfast ", op,
              ": windows ", windows_in.sizes(), " must be (B * nW, N, C) with N = ", g.N, " and nW = ", g.nW,
              " for H, W = ", H, ", ", W, " and window_size ", window_size);
  g.B = windows_in.size(0) / g.nW;
  const at::Tensor windows = windows_in.contiguous();
  at::Tensor out = at::empty({g.B, H, W, g.C}, windows.options());
  const int64_t rows = g.B * H * W;
  if (rows == 0 || g.C == 0) return out;
  const int64_t row_bytes = g.C * static_cast<int64_t>(windows.element_size());
  const char* src = static_cast<const char*>(windows.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / row_bytes);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t x = r % W, y = (r / W) % H, b = r / (W * H);
      // Pixel (y, x) sits at (py, px) of the rolled map, in window (py / wh, px / ww).
      const int64_t py = (y - g.sh + g.Hp) % g.Hp, px = (x - g.sw + g.Wp) % g.Wp;
      const int64_t w = (py / g.wh) * g.nWw + px / g.ww, t = (py % g.wh) * g.ww + px % g.ww;
      std::memcpy(dst + r * row_bytes, src + ((b * g.nW + w) * g.N + t) * row_bytes, row_bytes);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("window_partition", &window_partition_cpu);
  m.impl("window_reverse", &window_reverse_cpu);
}

}  // namespace vitfast
