// CPU registration of sgd_sr_: the C kernel in ops/cpu/sgd_sr.c on torch's intra-op thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "xmc.h"

namespace torch_xmc {

using SgdSrKernel = int (*)(int64_t, xmc_dtype, void *, void *, const void *, xmc_sgd_sr_args, xmc_exec);
void sgd_sr_run(const at::Tensor &param, const std::optional<at::Tensor> &momentum_buf, const at::Tensor &grad,
                double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool first_step,
                int64_t key, SgdSrKernel kernel, xmc_exec ex);  // bindings/sgd_sr.cpp

namespace {

void sgd_sr_cpu(const at::Tensor &param, const std::optional<at::Tensor> &momentum_buf, const at::Tensor &grad,
                double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool first_step,
                int64_t key) {
  sgd_sr_run(param, momentum_buf, grad, lr, momentum, dampening, weight_decay, nesterov, first_step, key,
             xmc_sgd_sr_cpu, xmc_exec{at::get_num_threads(), nullptr, 0});
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_xmc, CPU, m) { m.impl("sgd_sr_", &sgd_sr_cpu); }

}  // namespace torch_xmc
