/* Helpers shared by the CPU kernels: element loads/stores across dtypes and the small dense matrix product
 * every GSFFI kernel reduces to (one label group is a dense (B x F) @ (F x G) product). Internal to ops/cpu. */
#ifndef TORCH_XMC_OPS_CPU_COMMON_H
#define TORCH_XMC_OPS_CPU_COMMON_H

#include <stdint.h>
#include <string.h>

#include "xmc.h"

static inline float xmc_bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* Round to nearest even, as torch does; NaN stays NaN. */
static inline uint16_t xmc_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* Element i of a tensor of dtype dt as the compute type. Branches on dt are loop-invariant: the compiler
 * unswitches them out of the loops that use these. */
#define XMC_LOAD(CT, dt, p, i)                                                         \
  ((dt) == XMC_F32    ? (CT)((const float *)(p))[i]                                   \
   : (dt) == XMC_BF16 ? (CT)xmc_bf16_to_f32(((const uint16_t *)(p))[i])               \
                      : (CT)((const double *)(p))[i])

#define XMC_STORE(dt, p, i, v)                                                         \
  do {                                                                                 \
    if ((dt) == XMC_F32) ((float *)(p))[i] = (float)(v);                               \
    else if ((dt) == XMC_BF16) ((uint16_t *)(p))[i] = xmc_f32_to_bf16((float)(v));     \
    else ((double *)(p))[i] = (double)(v);                                             \
  } while (0)

/* C[M, N] (+)= A[M, K] @ B[K, N], row-major with leading dimensions; C is overwritten unless accumulate.
 * sgemm runs an AVX2/FMA kernel when the CPU has it (checked at run time), else portable C. */
void xmc_sgemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb, float *C,
               int64_t ldc, int accumulate);
void xmc_dgemm(int64_t M, int64_t N, int64_t K, const double *A, int64_t lda, const double *B, int64_t ldb,
               double *C, int64_t ldc, int accumulate);

static inline int64_t xmc_min64(int64_t a, int64_t b) { return a < b ? a : b; }

#endif
