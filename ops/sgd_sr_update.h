/* One element of the SGD-with-stochastic-rounding update (the maths of xmc_sgd_sr_args in xmc.h), shared by the
 * C kernels (ops/cpu) and the CUDA kernels (ops/cuda) so that both draw the same bits and round the same way:
 * a parameter updated on the CPU, on the GPU, whole or one chunk at a time, is bitwise the same.
 *
 * Every product and sum is rounded on its own, in the order of torch_xmc/optim.py's torch-ops reference: nvcc
 * would otherwise fuse them into FMAs (the C build has no FMA in its target, so C never contracts). */
#ifndef TORCH_XMC_OPS_SGD_SR_UPDATE_H
#define TORCH_XMC_OPS_SGD_SR_UPDATE_H

#include <stdint.h>

#include "xmc.h"

#ifdef __CUDACC__
#define XMC_SR_FN static __device__ __forceinline__
#define XMC_SR_MUL(a, b) __fmul_rn(a, b)
#define XMC_SR_ADD(a, b) __fadd_rn(a, b)
#else
#include <string.h>
#define XMC_SR_FN static inline
#define XMC_SR_MUL(a, b) ((a) * (b))
#define XMC_SR_ADD(a, b) ((a) + (b))
#endif

XMC_SR_FN uint32_t xmc_sr_float_bits(float f) {
#ifdef __CUDACC__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

XMC_SR_FN float xmc_sr_bits_float(uint32_t u) {
#ifdef __CUDACC__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

/* lowbias32 (Chris Wellons' hash-prospector): a cheap 32-bit mixer with good avalanche. */
XMC_SR_FN uint32_t xmc_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

/* 32 random bits of element i under key (torch_xmc/optim.py sr_bits computes the same in torch ops). */
XMC_SR_FN uint32_t xmc_sr_bits(uint32_t key, int64_t i) {
  return xmc_mix32(key ^ xmc_mix32((uint32_t)i ^ xmc_mix32((uint32_t)((uint64_t)i >> 32))));
}

XMC_SR_FN float xmc_sr_bf16_to_f32(uint16_t v) { return xmc_sr_bits_float((uint32_t)v << 16); }

/* float32 -> bfloat16 rounded up with probability equal to the distance from the truncated value (in units of
 * the bf16 spacing): add 16 random bits below the kept 16, then truncate. Unbiased: E[result] = value.
 * Inf and NaN round to nearest instead (adding bits could turn an infinity into a NaN): NaN stays a NaN. */
XMC_SR_FN uint16_t xmc_round_stochastic(float f, uint32_t bits16) {
  const uint32_t u = xmc_sr_float_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return (uint16_t)((u & 0x7fffffu) ? (u >> 16) | 0x40u : u >> 16);
  return (uint16_t)((u + bits16) >> 16);
}

/* The update of element i of a float32 (bf16 = 0) or bfloat16 tensor, in place: param[i] and momentum_buf[i]
 * (NULL, or unused when a.momentum = 0) from the gradient g. Its random bits are those of element a.offset + i. */
XMC_SR_FN void xmc_sgd_sr_element(int bf16, void *param, void *momentum_buf, int64_t i, float g,
                                  const xmc_sgd_sr_args *a) {
  const float p = bf16 ? xmc_sr_bf16_to_f32(((const uint16_t *)param)[i]) : ((const float *)param)[i];
  float d = XMC_SR_ADD(g, XMC_SR_MUL(a->weight_decay, p));
  const uint32_t bits = bf16 ? xmc_sr_bits(a->key, a->offset + i) : 0u;
  if (momentum_buf && a->momentum != 0.0f) {
    float m = d;
    if (!a->first_step) {
      const float old =
          bf16 ? xmc_sr_bf16_to_f32(((const uint16_t *)momentum_buf)[i]) : ((const float *)momentum_buf)[i];
      m = XMC_SR_ADD(XMC_SR_MUL(a->momentum, old), XMC_SR_MUL(1.0f - a->dampening, d));
    }
    d = a->nesterov ? XMC_SR_ADD(d, XMC_SR_MUL(a->momentum, m)) : m;
    if (bf16) ((uint16_t *)momentum_buf)[i] = xmc_round_stochastic(m, bits >> 16);
    else ((float *)momentum_buf)[i] = m;
  }
  const float q = XMC_SR_ADD(p, -XMC_SR_MUL(a->lr, d));
  if (bf16) ((uint16_t *)param)[i] = xmc_round_stochastic(q, bits & 0xffffu);
  else ((float *)param)[i] = q;
}

#endif
