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
  // grad_weight with the bias gradient from the same pass over grad_y, or nullptr: then the bias gradient is
  // a separate reduction of grad_y
  xmc_gsffi_grad_weight_bias_fn grad_weight_bias;
  xmc_exec (*exec)(const at::Tensor &like);  // thread count, or the current stream of like's device
  const char *(*error_string)(int code);
  bool check_index_range;  // scan indices on every call: cheap on CPU; on CUDA it would need a host sync
  bool half;               // float16 supported
};

// Argument checks shared by every op on a GSFFI layer (gsffi.cpp, fused.cpp). Messages start with op.
xmc_dtype to_xmc(at::ScalarType t);
void check_same_device_dtype(const char *op, const char *name, const at::Tensor &t, const at::Tensor &x);
// Checks the layer's x, weight, indices, group_size as the C kernels assume them (not the index values) and
// returns their shape record; `batch` is filled in by the caller.
xmc_gsffi_shape check_args(const char *op, const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                           int64_t group_size, const GsffiKernels &k);
// indices (contiguous int32 on the CPU) must lie in [0, H).
void check_index_range(const char *op, const at::Tensor &indices, int64_t H);
void check_rc(const char *op, int rc, const GsffiKernels &k);

// The layer's kernels on the CPU (gsffi_cpu.cpp).
extern const GsffiKernels kGsffiCpu;

at::Tensor gsffi_forward(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                         const std::optional<at::Tensor> &bias, int64_t group_size, const GsffiKernels &k);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gsffi_backward(const at::Tensor &grad_y, const at::Tensor &x,
                                                              const at::Tensor &weight, const at::Tensor &indices,
                                                              int64_t group_size, std::array<bool, 3> output_mask,
                                                              const GsffiKernels &k);

}  // namespace torch_xmc
