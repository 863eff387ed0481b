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

/* C[M, N] (+)= A[M, K] @ B[K, N]; C is overwritten unless accumulate. B and C are row-major with leading
 * dimensions ldb, ldc; A[i, k] is at A[i * lda + k * ak], so A may be stored either way round.
 * sgemm runs an AVX2/FMA kernel when the CPU has it (checked at run time), else portable C. */
void xmc_sgemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, int64_t ak, const float *B, int64_t ldb,
               float *C, int64_t ldc, int accumulate);
void xmc_dgemm(int64_t M, int64_t N, int64_t K, const double *A, int64_t lda, int64_t ak, const double *B,
               int64_t ldb, double *C, int64_t ldc, int accumulate);

/* dst[0 .. n) = src[0 .. n) with streaming (cache-bypassing) stores where possible; xmc_store_fence() orders
 * them before anything another thread does next. */
void xmc_store_f32_streaming(float *dst, const float *src, int64_t n);
void xmc_store_fence(void);

static inline int64_t xmc_min64(int64_t a, int64_t b) { return a < b ? a : b; }

#endif
