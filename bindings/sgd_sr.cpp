// Device-independent glue of sgd_sr_: argument checks and the call into a device's C kernel.
#include "sgd_sr.h"

#include <c10/util/Exception.h>

namespace torch_xmc {

void check_like_param(const char *op, const char *name, const at::Tensor &t, const at::Tensor &param) {
  TORCH_CHECK(t.device() == param.device(), op, ": ", name, " must be on ", param.device(), " like param, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, ": ", name, " must have dtype ", param.scalar_type(),
              " like param, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", name, " must have shape ", param.sizes(), " like param, got ",
              t.sizes());
  // the kernel writes through raw pointers: a non-contiguous view would be updated in the wrong places
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

xmc_sgd_sr_args sgd_sr_args(const char *op, double lr, double momentum, double dampening, double weight_decay,
                            bool nesterov, bool first_step, int64_t key) {
  TORCH_CHECK(key >= 0 && key < (int64_t{1} << 32), op, ": key must be in [0, 2^32), got ", key);
  return xmc_sgd_sr_args{static_cast<float>(lr),
                         static_cast<float>(momentum),
                         static_cast<float>(dampening),
                         static_cast<float>(weight_decay),
                         nesterov ? 1 : 0,
                         first_step ? 1 : 0,
                         static_cast<uint32_t>(key),
                         /*offset=*/0};
}

void sgd_sr_run(const at::Tensor &param, const std::optional<at::Tensor> &momentum_buf, const at::Tensor &grad,
                double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool first_step,
                int64_t key, SgdSrKernel kernel, xmc_exec ex) {
  const char *op = "torch_xmc::sgd_sr_";
  auto dt = param.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, op, ": param must be float32 or bfloat16, got ", dt);
  check_like_param(op, "param", param, param);
  check_like_param(op, "grad", grad, param);
  if (momentum_buf.has_value()) check_like_param(op, "momentum_buf", *momentum_buf, param);
  TORCH_CHECK(momentum == 0.0 || momentum_buf.has_value(), op, ": momentum = ", momentum,
              " needs a momentum_buf, got None");
  const xmc_sgd_sr_args a = sgd_sr_args(op, lr, momentum, dampening, weight_decay, nesterov, first_step, key);
  void *buf = momentum_buf.has_value() ? momentum_buf->mutable_data_ptr() : nullptr;
  int rc = kernel(param.numel(), dt == at::kBFloat16 ? XMC_BF16 : XMC_F32, param.mutable_data_ptr(), buf,
                  grad.const_data_ptr(), a, ex);
  TORCH_CHECK(rc == 0, op, ": kernel failed with code ", rc);
}

}  // namespace torch_xmc
