// CUDA registration of sgd_sr_: the kernel in ops/cuda/sgd_sr.cu, on the current stream of param's device.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "gsffi_cuda.h"
#include "sgd_sr.h"

namespace torch_xmc {
namespace {

void sgd_sr_cuda(const at::Tensor &param, const std::optional<at::Tensor> &momentum_buf, const at::Tensor &grad,
                 double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool first_step,
                 int64_t key) {
  CudaGuardFor guard(param);
  sgd_sr_run(param, momentum_buf, grad, lr, momentum, dampening, weight_decay, nesterov, first_step, key,
             xmc_sgd_sr_cuda, kGsffiCuda.exec(param));
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_xmc, CUDA, m) { m.impl("sgd_sr_", &sgd_sr_cuda); }

}  // namespace torch_xmc
