/* SGD with momentum, in place, with stochastic rounding for bfloat16 (C API in ops/xmc.h).
 *
 * The random bits of element i come from a counter-based hash of (key, i), not from a generator that threads
 * advance: every element's rounding is fixed by the key alone, so the result is the same for any thread count
 * and any split of the loop. The element update itself is in ops/sgd_sr_update.h, shared with CUDA. */
#include <omp.h>

#include "cpu_common.h"
#include "sgd_sr_update.h"

enum { CHUNK = 4096 }; /* elements per scheduled chunk: large enough to amortise the scheduling */

int xmc_sgd_sr_cpu(int64_t n, xmc_dtype dt, void *param, void *momentum_buf, const void *grad, xmc_sgd_sr_args a,
                   xmc_exec ex) {
  if (dt != XMC_F32 && dt != XMC_BF16) return XMC_ERR_DTYPE;
  const int bf16 = dt == XMC_BF16;
#pragma omp parallel for num_threads(ex.num_threads) schedule(static, CHUNK)
  for (int64_t i = 0; i < n; ++i) {
    const float g = bf16 ? xmc_bf16_to_f32(((const uint16_t *)grad)[i]) : ((const float *)grad)[i];
    xmc_sgd_sr_element(bf16, param, momentum_buf, i, g, &a);
  }
  return XMC_OK;
}
