// Device-independent glue of sgd_sr_: argument checks and the call into a device's C kernel.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "xmc.h"

namespace torch_xmc {

using SgdSrKernel = int (*)(int64_t, xmc_dtype, void *, void *, const void *, xmc_sgd_sr_args, xmc_exec);

namespace {

void check_like(const char *name, const at::Tensor &t, const at::Tensor &param) {
  const char *op = "torch_xmc::sgd_sr_";
  TORCH_CHECK(t.device() == param.device(), op, ": ", name, " must be on ", param.device(), " like param, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, ": ", name, " must have dtype ", param.scalar_type(),
              " like param, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", name, " must have shape ", param.sizes(), " like param, got ",
              t.sizes());
  // the kernel writes through raw pointers: a non-contiguous view would be updated in the wrong places
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace

void sgd_sr_run(const at::Tensor &param, const std::optional<at::Tensor> &momentum_buf, const at::Tensor &grad,
                double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool first_step,
                int64_t key, SgdSrKernel kernel, xmc_exec ex) {
  const char *op = "torch_xmc::sgd_sr_";
  auto dt = param.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, op, ": param must be float32 or bfloat16, got ", dt);
  check_like("param", param, param);
  check_like("grad", grad, param);
  if (momentum_buf.has_value()) check_like("momentum_buf", *momentum_buf, param);
  TORCH_CHECK(momentum == 0.0 || momentum_buf.has_value(), op, ": momentum = ", momentum,
              " needs a momentum_buf, got None");
  TORCH_CHECK(key >= 0 && key < (int64_t{1} << 32), op, ": key must be in [0, 2^32), got ", key);
  xmc_sgd_sr_args a{static_cast<float>(lr),           static_cast<float>(momentum), static_cast<float>(dampening),
                    static_cast<float>(weight_decay), nesterov ? 1 : 0,             first_step ? 1 : 0,
                    static_cast<uint32_t>(key)};
  void *buf = momentum_buf.has_value() ? momentum_buf->mutable_data_ptr() : nullptr;
  int rc = kernel(param.numel(), dt == at::kBFloat16 ? XMC_BF16 : XMC_F32, param.mutable_data_ptr(), buf,
                  grad.const_data_ptr(), a, ex);
  TORCH_CHECK(rc == 0, op, ": kernel failed with code ", rc);
}

}  // namespace torch_xmc
