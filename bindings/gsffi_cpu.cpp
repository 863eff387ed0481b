// CPU registration of the GSFFI ops: the C kernels in ops/cpu/, on torch's intra-op thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gsffi.h"

namespace torch_xmc {
namespace {

xmc_exec cpu_exec(const at::Tensor &) { return xmc_exec{at::get_num_threads(), nullptr, 0}; }

const char *cpu_error(int code) {
  return code == XMC_ERR_NOMEM ? "out of memory for scratch buffers" : "unsupported dtype";
}

}  // namespace

const GsffiKernels kGsffiCpu{"CPU",
                             xmc_gsffi_forward_cpu,
                             xmc_gsffi_grad_input_cpu,
                             xmc_gsffi_grad_weight_cpu,
                             xmc_gsffi_backward_cpu,
                             /*grad_weight_bias=*/nullptr,
                             cpu_exec,
                             cpu_error,
                             /*check_index_range=*/true,
                             /*half=*/false};

namespace {

at::Tensor forward(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                   const std::optional<at::Tensor> &bias, int64_t group_size) {
  return gsffi_forward(x, weight, indices, bias, group_size, kGsffiCpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor &grad_y, const at::Tensor &x,
                                                        const at::Tensor &weight, const at::Tensor &indices,
                                                        int64_t group_size, std::array<bool, 3> output_mask) {
  return gsffi_backward(grad_y, x, weight, indices, group_size, output_mask, kGsffiCpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_xmc, CPU, m) {
  m.impl("gsffi_forward", &forward);
  m.impl("gsffi_backward", &backward);
}

}  // namespace torch_xmc
