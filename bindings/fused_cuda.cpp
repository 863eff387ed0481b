// CUDA registration of the fused loss and top-k: the kernels in ops/cuda/fused_*.cu, on the current stream.
#include <torch/library.h>

#include "fused.h"
#include "gsffi_cuda.h"

namespace torch_xmc {
namespace {

const FusedKernels kCuda{&kGsffiCuda, xmc_gsffi_fused_loss_cuda, xmc_gsffi_topk_cuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_loss(
    const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices, const std::optional<at::Tensor> &bias,
    int64_t group_size, const at::Tensor &indptr, const at::Tensor &labels, std::array<bool, 3> output_mask,
    std::string_view loss, std::string_view reduction) {
  CudaGuardFor guard(x);
  return gsffi_fused_loss(x, weight, indices, bias, group_size, indptr, labels, output_mask, loss, reduction, kCuda);
}

std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                                        const std::optional<at::Tensor> &bias, int64_t group_size, int64_t k) {
  CudaGuardFor guard(x);
  return gsffi_topk(x, weight, indices, bias, group_size, k, kCuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_xmc, CUDA, m) {
  m.impl("gsffi_fused_loss", &fused_loss);
  m.impl("gsffi_topk", &topk);
}

}  // namespace torch_xmc
