// CPU registration of sgd_sr_: the C kernel in ops/cpu/sgd_sr.c on torch's intra-op thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "sgd_sr.h"

namespace torch_xmc {
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
