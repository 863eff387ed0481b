// Device-independent glue of the fused ops on a GSFFI layer (gsffi_fused_loss, gsffi_fused_loss_sgd_, gsffi_topk):
// argument checks,
// allocation, the calls into the C API. Each device file (fused_cpu.cpp, fused_cuda.cpp) hands in its kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "gsffi.h"
#include "sgd_sr.h"

namespace torch_xmc {

struct FusedKernels {
  const GsffiKernels *layer;  // the same device's layer kernels: its name, dtypes, exec and error text
  xmc_gsffi_fused_loss_fn loss;
  xmc_gsffi_topk_fn topk;
  SgdSrKernel sgd;  // the same device's SGD-SR step, for the parameters gsffi_fused_loss_sgd_ updates
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gsffi_fused_loss(
    const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices, const std::optional<at::Tensor> &bias,
    int64_t group_size, const at::Tensor &indptr, const at::Tensor &labels, std::array<bool, 3> output_mask,
    std::string_view loss, std::string_view reduction, const FusedKernels &k);

// gsffi_fused_loss that applies an SGD-SR step to weight and bias in place instead of returning their gradients
// (the weight's chunk by chunk); returns the loss and, if input_grad, the input gradient.
std::tuple<at::Tensor, at::Tensor> gsffi_fused_loss_sgd_(
    const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices, const std::optional<at::Tensor> &bias,
    int64_t group_size, const at::Tensor &indptr, const at::Tensor &labels,
    const std::optional<at::Tensor> &weight_momentum, const std::optional<at::Tensor> &bias_momentum, double lr,
    double momentum, double dampening, double weight_decay, bool nesterov, bool first_step, int64_t weight_key,
    int64_t bias_key, bool input_grad, std::string_view loss, std::string_view reduction, const FusedKernels &k);

std::tuple<at::Tensor, at::Tensor> gsffi_topk(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                                              const std::optional<at::Tensor> &bias, int64_t group_size, int64_t k,
                                              const FusedKernels &kernels);

}  // namespace torch_xmc
