// CUDA registration of the GSFFI ops: the kernels in ops/cuda/, on the current stream of the tensors' device.
#include <ATen/Context.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "gsffi_cuda.h"

namespace torch_xmc {
namespace {

xmc_exec cuda_exec(const at::Tensor &like) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
  return xmc_exec{1, stream, at::globalContext().allowTF32CuBLAS() ? 1 : 0};
}

}  // namespace

// Index range is not scanned on CUDA: it would need a device-to-host copy and a sync on every call.
const GsffiKernels kGsffiCuda{"CUDA",
                              xmc_gsffi_forward_cuda,
                              xmc_gsffi_grad_input_cuda,
                              xmc_gsffi_grad_weight_cuda,
                              /*backward=*/nullptr,
                              xmc_gsffi_grad_weight_bias_cuda,
                              cuda_exec,
                              xmc_cuda_error_string,
                              /*check_index_range=*/false,
                              /*half=*/true};

namespace {

at::Tensor forward(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                   const std::optional<at::Tensor> &bias, int64_t group_size) {
  CudaGuardFor guard(x);
  return gsffi_forward(x, weight, indices, bias, group_size, kGsffiCuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor &grad_y, const at::Tensor &x,
                                                        const at::Tensor &weight, const at::Tensor &indices,
                                                        int64_t group_size, std::array<bool, 3> output_mask) {
  CudaGuardFor guard(x);
  return gsffi_backward(grad_y, x, weight, indices, group_size, output_mask, kGsffiCuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_xmc, CUDA, m) {
  m.impl("gsffi_forward", &forward);
  m.impl("gsffi_backward", &backward);
}

}  // namespace torch_xmc
