// Device-independent glue of the fused ops on a GSFFI layer (gsffi_fused_loss, gsffi_topk): argument checks,
// allocation, the calls into the C API. Each device file (fused_cpu.cpp, fused_cuda.cpp) hands in its kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "gsffi.h"

namespace torch_xmc {

struct FusedKernels {
  const GsffiKernels *layer;  // the same device's layer kernels: its name, dtypes, exec and error text
  xmc_gsffi_fused_loss_fn loss;
  xmc_gsffi_topk_fn topk;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gsffi_fused_loss(
    const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices, const std::optional<at::Tensor> &bias,
    int64_t group_size, const at::Tensor &indptr, const at::Tensor &labels, std::array<bool, 3> output_mask,
    std::string_view loss, std::string_view reduction, const FusedKernels &k);

std::tuple<at::Tensor, at::Tensor> gsffi_topk(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                                              const std::optional<at::Tensor> &bias, int64_t group_size, int64_t k,
                                              const FusedKernels &kernels);

}  // namespace torch_xmc
