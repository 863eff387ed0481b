// CUDA registration of the fused loss and top-k: the kernels in ops/cuda/fused_*.cu, on the current stream.
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fused.h"

namespace torch_xmc {
namespace {

xmc_exec cuda_exec(const at::Tensor &like) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
  return xmc_exec{1, stream, at::globalContext().allowTF32CuBLAS() ? 1 : 0};
}

// The layer table the shared checks read (device name, dtypes, exec, error text). Index values are not scanned
// on CUDA: it would need a device-to-host copy and a sync on every call.
const GsffiKernels kLayer{"CUDA",    xmc_gsffi_forward_cuda, xmc_gsffi_grad_input_cuda, xmc_gsffi_grad_weight_cuda,
                          nullptr,   cuda_exec,              xmc_cuda_error_string,     /*check_index_range=*/false,
                          /*half=*/true};
const FusedKernels kCuda{&kLayer, xmc_gsffi_fused_loss_cuda, xmc_gsffi_topk_cuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_loss(
    const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices, const std::optional<at::Tensor> &bias,
    int64_t group_size, const at::Tensor &indptr, const at::Tensor &labels, std::array<bool, 3> output_mask,
    std::string_view loss, std::string_view reduction) {
  c10::cuda::CUDAGuard guard(x.device());
  return gsffi_fused_loss(x, weight, indices, bias, group_size, indptr, labels, output_mask, loss, reduction, kCuda);
}

std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                                        const std::optional<at::Tensor> &bias, int64_t group_size, int64_t k) {
  c10::cuda::CUDAGuard guard(x.device());
  return gsffi_topk(x, weight, indices, bias, group_size, k, kCuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_xmc, CUDA, m) {
  m.impl("gsffi_fused_loss", &fused_loss);
  m.impl("gsffi_topk", &topk);
}

}  // namespace torch_xmc
