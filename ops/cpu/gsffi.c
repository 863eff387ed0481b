/* GSFFI layer, CPU: forward, input gradient, weight gradient (C API in ops/xmc.h). The kernels themselves are
 * in gsffi_impl.inc, instantiated here for float and double compute; these entry points pick one by dtype. */
#include <omp.h>
#include <stdlib.h>

#include "cpu_common.h"

enum {
  MBLOCK = 256, /* batch rows per tile of the forward */
  LBLOCK = 128, /* labels per block of one group */
  PREFETCH_LABELS = 64 /* how far ahead along a row the gradient kernels prefetch */
};

#define XMC_IMPL "gsffi_impl.inc"
#include "instantiate.h"

int xmc_gsffi_forward_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight, const int32_t *indices,
                          const void *bias, void *y, xmc_exec ex) {
  if (dt == XMC_F32 || dt == XMC_BF16) return forward_f32(s, dt, x, weight, indices, bias, y, ex.num_threads);
  if (dt == XMC_F64) return forward_f64(s, dt, x, weight, indices, bias, y, ex.num_threads);
  return XMC_ERR_DTYPE;
}

int xmc_gsffi_backward_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x, const void *weight,
                           const int32_t *indices, void *grad_x, void *grad_weight, xmc_exec ex) {
  if (dt == XMC_F32 || dt == XMC_BF16)
    return backward_f32(s, dt, grad_y, x, weight, indices, grad_x, grad_weight, ex.num_threads);
  if (dt == XMC_F64) return backward_f64(s, dt, grad_y, x, weight, indices, grad_x, grad_weight, ex.num_threads);
  return XMC_ERR_DTYPE;
}

int xmc_gsffi_grad_input_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *weight,
                             const int32_t *indices, void *grad_x, xmc_exec ex) {
  return xmc_gsffi_backward_cpu(s, dt, grad_y, NULL, weight, indices, grad_x, NULL, ex);
}

int xmc_gsffi_grad_weight_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x,
                              const int32_t *indices, void *grad_weight, xmc_exec ex) {
  return xmc_gsffi_backward_cpu(s, dt, grad_y, x, NULL, indices, NULL, grad_weight, ex);
}

int64_t xmc_find_out_of_range_cpu(const int32_t *indices, int64_t n, int64_t bound) {
  for (int64_t p = 0; p < n; ++p)
    if (indices[p] < 0 || indices[p] >= bound) return p;
  return -1;
}
