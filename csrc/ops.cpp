// Every vitfast schema is declared here, once. <op>.cpp registers the CPU kernels,
// <op>_cuda.cpp the CUDA ones (built only where CUDA is available).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(vitfast, m) {
  // x: (M, N) with unit inner stride; weight/bias: (N,); residual: like x.
  // Returns y (M, N), s = x + residual (M, N) or an empty tensor without residual,
  // and the per-row mean and rstd (M,) in float32 (float64 for float64 input).
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps)"
      " -> (Tensor y, Tensor s, Tensor mean, Tensor rstd)");
  // s: the normalized input (x, or x + residual); ds (optional) is added to dx.
  // dweight/dbias are empty tensors where there is no weight / has_bias is false.
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor? ds, Tensor s, Tensor? weight, Tensor mean, Tensor rstd,"
      " bool has_bias) -> (Tensor dx, Tensor dweight, Tensor dbias)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("with_cuda", []() {
#ifdef VITFAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled into this build");
}
