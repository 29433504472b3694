// CUDA implementations of vitfast::window_partition and vitfast::window_reverse (schemas in csrc/ops.cpp):
// checks at the boundary, device guard and current stream, allocation of the output, and the launchers of
// kernels/window_process.cu. Pure data movement, so every dtype goes through the same byte-moving kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "window_process.cuh"

namespace {

constexpr const char* kPartitionName = "vitfast::window_partition (CUDA)";
constexpr const char* kReverseName = "vitfast::window_reverse (CUDA)";

struct Window {
  int64_t wh, ww, sh, sw, Hp, Wp, nW, N;
};

Window check_window(const char* op, int64_t H, int64_t W, at::IntArrayRef window_size, at::IntArrayRef shift_size) {
  TORCH_CHECK(window_size.size() == 2 && shift_size.size() == 2, op, ": window_size and shift_size must be pairs, got ",
              window_size, " and ", shift_size);
  TORCH_CHECK(window_size[0] > 0 && window_size[1] > 0, op, ": window_size must be positive, got ", window_size);
  TORCH_CHECK(0 <= shift_size[0] && shift_size[0] < window_size[0] && 0 <= shift_size[1] &&
                  shift_size[1] < window_size[1],
              op, ": shift_size ", shift_size, " must be in [0, window) for window_size ", window_size);
  TORCH_CHECK(H >= 0 && W >= 0, op, ": H and W must be non-negative, got ", H, ", ", W);
  Window w{window_size[0], window_size[1], shift_size[0], shift_size[1]};
  w.Hp = (H + w.wh - 1) / w.wh * w.wh;
  w.Wp = (W + w.ww - 1) / w.ww * w.ww;
  w.nW = (w.Hp / w.wh) * (w.Wp / w.ww);
  w.N = w.wh * w.ww;
  return w;
}

at::Tensor window_partition_cuda(const at::Tensor& x_in, at::IntArrayRef window_size, at::IntArrayRef shift_size) {
  TORCH_CHECK(x_in.is_cuda(), kPartitionName, ": x must be a CUDA tensor, got device ", x_in.device());
  TORCH_CHECK(x_in.dim() == 4, kPartitionName, ": x must be (B, H, W, C), got shape ", x_in.sizes());
  const int64_t B = x_in.size(0), H = x_in.size(1), W = x_in.size(2), C = x_in.size(3);
  const Window w = check_window(kPartitionName, H, W, window_size, shift_size);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({B * w.nW, w.N, C}, x.options());
  C10_CUDA_CHECK(vitfast::window_partition(x.const_data_ptr(), out.mutable_data_ptr(), B, H, W, C, x.element_size(),
                                           w.wh, w.ww, w.sh, w.sw, at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor window_reverse_cuda(const at::Tensor& windows_in, int64_t H, int64_t W, at::IntArrayRef window_size,
                               at::IntArrayRef shift_size) {
  TORCH_CHECK(windows_in.is_cuda(), kReverseName, ": windows must be a CUDA tensor, got device ", windows_in.device());
  TORCH_CHECK(windows_in.dim() == 3, kReverseName, ": windows must be (B * nW, N, C), got shape ", windows_in.sizes());
  const Window w = check_window(kReverseName, H, W, window_size, shift_size);
  TORCH_CHECK(windows_in.size(1) == w.N && w.nW > 0 && windows_in.size(0) % w.nW == 0, kReverseName, ": windows ",
              windows_in.sizes(), " must be (B * nW, N, C) with N = ", w.N, " and nW = ", w.nW, " for H, W = ", H,
              ", ", W, " and window_size ", window_size);
  const int64_t B = windows_in.size(0) / w.nW, C = windows_in.size(2);
  const c10::cuda::CUDAGuard guard(windows_in.device());
  const at::Tensor windows = windows_in.contiguous();
  at::Tensor out = at::empty({B, H, W, C}, windows.options());
  C10_CUDA_CHECK(vitfast::window_reverse(windows.const_data_ptr(), out.mutable_data_ptr(), B, H, W, C,
                                         windows.element_size(), w.wh, w.ww, w.sh, w.sw,
                                         at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) {
  m.impl("window_partition", &window_partition_cuda);
  m.impl("window_reverse", &window_reverse_cuda);
}
