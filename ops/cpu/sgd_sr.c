/* SGD with momentum, in place, with stochastic rounding for bfloat16 (C API in ops/xmc.h).
 *
 * The random bits of element i come from a counter-based hash of (key, i), not from a generator that threads
 * advance: every element's rounding is fixed by the key alone, so the result is the same for any thread count
 * and any split of the loop. */
#include <omp.h>
#include <string.h>

#include "cpu_common.h"

enum { CHUNK = 4096 }; /* elements per scheduled chunk: large enough to amortise the scheduling */

/* lowbias32 (Chris Wellons' hash-prospector): a cheap 32-bit mixer with good avalanche. */
static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

/* 32 random bits of element i under key (torch_xmc/optim.py computes the same in torch ops for CUDA). */
static inline uint32_t xmc_sr_bits(uint32_t key, int64_t i) {
  return mix32(key ^ mix32((uint32_t)i ^ mix32((uint32_t)((uint64_t)i >> 32))));
}

static inline float load(xmc_dtype dt, const void *p, int64_t i) {
  return dt == XMC_BF16 ? xmc_bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* float32 -> bfloat16 rounded up with probability equal to the distance from the truncated value (in units of
 * the bf16 spacing): add 16 random bits below the kept 16, then truncate. Unbiased: E[result] = value.
 * Inf and NaN are rounded to nearest instead (adding bits could turn an infinity into a NaN). */
static inline uint16_t round_stochastic(float f, uint32_t bits16) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u) return xmc_f32_to_bf16(f);
  return (uint16_t)((u + bits16) >> 16);
}

int xmc_sgd_sr_cpu(int64_t n, xmc_dtype dt, void *param, void *momentum_buf, const void *grad, xmc_sgd_sr_args a,
                   xmc_exec ex) {
  if (dt != XMC_F32 && dt != XMC_BF16) return XMC_ERR_DTYPE;
  const int has_buf = momentum_buf != NULL && a.momentum != 0.0f;
#pragma omp parallel for num_threads(ex.num_threads) schedule(static, CHUNK)
  for (int64_t i = 0; i < n; ++i) {
    float p = load(dt, param, i);
    float d = load(dt, grad, i) + a.weight_decay * p;
    if (has_buf) {
      float m = a.first_step ? d : a.momentum * load(dt, momentum_buf, i) + (1.0f - a.dampening) * d;
      d = a.nesterov ? d + a.momentum * m : m;
      if (dt == XMC_BF16)
        ((uint16_t *)momentum_buf)[i] = round_stochastic(m, xmc_sr_bits(a.key, i) >> 16);
      else
        ((float *)momentum_buf)[i] = m;
    }
    p -= a.lr * d;
    if (dt == XMC_BF16)
      ((uint16_t *)param)[i] = round_stochastic(p, xmc_sr_bits(a.key, i) & 0xffffu);
    else
      ((float *)param)[i] = p;
  }
  return XMC_OK;
}
