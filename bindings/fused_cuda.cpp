// CUDA registration of the fused loss and top-k: the kernels in ops/cuda/fused_*.cu, on the current stream.
#include <torch/library.h>

#include "fused.h"
#include "gsffi_cuda.h"

namespace torch_xmc {
namespace {

const FusedKernels kCuda{&kGsffiCuda, xmc_gsffi_fused_loss_cuda, xmc_gsffi_topk_cuda, xmc_sgd_sr_cuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_loss(
    const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices, const std::optional<at::Tensor> &bias,
    int64_t group_size, const at::Tensor &indptr, const at::Tensor &labels, std::array<bool, 3> output_mask,
    std::string_view loss, std::string_view reduction) {
  CudaGuardFor guard(x);
  return gsffi_fused_loss(x, weight, indices, bias, group_size, indptr, labels, output_mask, loss, reduction, kCuda);
}

std::tuple<at::Tensor, at::Tensor> fused_loss_sgd(
    const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices, const std::optional<at::Tensor> &bias,
    int64_t group_size, const at::Tensor &indptr, const at::Tensor &labels,
    const std::optional<at::Tensor> &weight_momentum, const std::optional<at::Tensor> &bias_momentum, double lr,
    double momentum, double dampening, double weight_decay, bool nesterov, bool first_step, int64_t weight_key,
    int64_t bias_key, bool input_grad, std::string_view loss, std::string_view reduction) {
  CudaGuardFor guard(x);
  return gsffi_fused_loss_sgd_(x, weight, indices, bias, group_size, indptr, labels, weight_momentum, bias_momentum,
                               lr, momentum, dampening, weight_decay, nesterov, first_step, weight_key, bias_key,
                               input_grad, loss, reduction, kCuda);
}

std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                                        const std::optional<at::Tensor> &bias, int64_t group_size, int64_t k) {
  CudaGuardFor guard(x);
  return gsffi_topk(x, weight, indices, bias, group_size, k, kCuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_xmc, CUDA, m) {
  m.impl("gsffi_fused_loss", &fused_loss);
  m.impl("gsffi_fused_loss_sgd_", &fused_loss_sgd);
  m.impl("gsffi_topk", &topk);
}

}  // namespace torch_xmc
