// Device-independent glue of the GSFFI ops: argument checks, allocation, and the calls into the C API.
// Each device file (gsffi_cpu.cpp, gsffi_cuda.cpp) hands in its kernels and registers the result.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "xmc.h"

namespace torch_xmc {

struct GsffiKernels {
  const char *device;  // for messages
  xmc_gsffi_forward_fn forward;
  xmc_gsffi_grad_input_fn grad_input;
  xmc_gsffi_grad_weight_fn grad_weight;
  xmc_gsffi_backward_fn backward;  // both gradients in one pass, or nullptr: then the two above, one by one
  xmc_exec (*exec)(const at::Tensor &like);  // thread count, or the current stream of like's device
  const char *(*error_string)(int code);
  bool check_index_range;  // scan indices on every call: cheap on CPU; on CUDA it would need a host sync
  bool half;               // float16 supported
};

at::Tensor gsffi_forward(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                         const std::optional<at::Tensor> &bias, int64_t group_size, const GsffiKernels &k);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gsffi_backward(const at::Tensor &grad_y, const at::Tensor &x,
                                                              const at::Tensor &weight, const at::Tensor &indices,
                                                              int64_t group_size, std::array<bool, 3> output_mask,
                                                              const GsffiKernels &k);

}  // namespace torch_xmc
