// What the CUDA registrations share: the GSFFI kernel table and the device guard.
#pragma once

#include <c10/cuda/CUDAGuard.h>

#include "gsffi.h"

namespace torch_xmc {

extern const GsffiKernels kGsffiCuda;

// Sets the device of x while the op runs; for an x that is not on CUDA it does nothing, so the argument checks
// report the device mismatch instead of the guard failing first.
struct CudaGuardFor : c10::cuda::OptionalCUDAGuard {
  explicit CudaGuardFor(const at::Tensor &x)
      : c10::cuda::OptionalCUDAGuard(x.is_cuda() ? std::optional<c10::Device>(x.device()) : std::nullopt) {}
};

}  // namespace torch_xmc
