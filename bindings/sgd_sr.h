// Device-independent glue of sgd_sr_ (bindings/sgd_sr.cpp): each device file hands in its C kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "xmc.h"

namespace torch_xmc {

using SgdSrKernel = int (*)(int64_t, xmc_dtype, void *, void *, const void *, xmc_sgd_sr_args, xmc_exec);

// The update's arguments after checking them; op names the calling op in error messages.
xmc_sgd_sr_args sgd_sr_args(const char *op, double lr, double momentum, double dampening, double weight_decay,
                            bool nesterov, bool first_step, int64_t key);

// Checks that t is like param (device, dtype, shape, contiguous), naming it in the error.
void check_like_param(const char *op, const char *name, const at::Tensor &t, const at::Tensor &param);

void sgd_sr_run(const at::Tensor &param, const std::optional<at::Tensor> &momentum_buf, const at::Tensor &grad,
                double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool first_step,
                int64_t key, SgdSrKernel kernel, xmc_exec ex);

}  // namespace torch_xmc
