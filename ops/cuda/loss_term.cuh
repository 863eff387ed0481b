// The per-logit loss terms and their gradients, shared by the fused loss's kernels (fused_loss.cu) and the
// forward's loss-gradient mode (gsffi_forward_tile.cuh), so that both compute the same values.
#pragma once

#include "gsffi_common.cuh"

namespace xmc_cuda {

// Loss of one logit z with target pos, and its gradient in *grad (BCE with logits or squared hinge).
template <class A>
__device__ __forceinline__ A loss_term(xmc_loss kind, A z, bool pos, A *grad) {
  if (kind == XMC_LOSS_BCE) {
    const A e = exp(-fabs(z)), r = A(1) / (A(1) + e);
    const A sig = z >= 0 ? r : e * r, one_minus_sig = z >= 0 ? e * r : r;
    *grad = pos ? -one_minus_sig : sig;
    return xmax(pos ? -z : z, A(0)) + log1p(e);
  }
  const A s = pos ? A(1) : A(-1), m = xmax(A(1) - s * z, A(0));
  *grad = A(-2) * s * m;
  return m * m;
}

// 2^x with the fast unit, flushing results below 2^-126 to zero (no range fix-ups around the MUFU op).
__device__ __forceinline__ float ex2_ftz(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

// log2(x) with the fast unit, subnormal x taken as 0 (no range fix-ups around the MUFU op; __logf has them).
__device__ __forceinline__ float lg2_ftz(float x) {
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

// loss_term in float from 16-bit logits, with the fast exp / reciprocal / log units (their relative error,
// ~1e-6, is far below the logits' own bf16 / fp16 rounding); log(1 + e) takes e itself where 1 + e rounds.
// Selects only, no branches, so that the callers' independent logits overlap.
template <xmc_loss KIND>
__device__ __forceinline__ float loss_term_fast(float z, bool pos, float *grad) {
  if constexpr (KIND == XMC_LOSS_BCE) {
    const float e = ex2_ftz(fabsf(z) * -1.4426950408889634f), d = 1.f + e, r = __fdividef(1.f, d);
    const float er = e * r, sig = z >= 0 ? r : er, one_minus_sig = z >= 0 ? er : r;
    *grad = pos ? -one_minus_sig : sig;
    return fmaxf(pos ? -z : z, 0.f) + (e < 1e-4f ? e : __logf(d));
  } else {
    return loss_term(KIND, z, pos, grad);
  }
}

// The loss terms log(1 + e_i) of 8 logits summed as one log: log(1 + p) with 1 + p = prod (1 + e_i), p built in
// pairs as a + b + ab, so that tiny e_i keep their relative precision (p < 1e-4 takes log(1 + p) = p).
__device__ __forceinline__ float sum_log1p8(float e[8]) {
#pragma unroll
  for (int s = 1; s < 8; s *= 2)
#pragma unroll
    for (int i = 0; i < 8; i += 2 * s) e[i] = fmaf(e[i], e[i + s], e[i] + e[i + s]);
  const float p = e[0];
  return p < 1e-4f ? p : lg2_ftz(1.f + p) * 0.6931471805599453f;
}

// Eight negatives of BCE, by far the most common case in XMC: the 8 16-bit logits in v (T: the dtype) replaced by
// zscale * their loss gradients, sigmoid(z), and their loss terms added to loss, without target selects
// (~12 instructions per logit): max(z, 0) + log(1 + e^-|z|), the 8 logs as one (sum_log1p8). Branch-free, so that
// a caller's calls overlap.
template <class T>
__device__ __forceinline__ uint4 bce_negatives8(const uint4 &v, float zscale, float &loss) {
  uint32_t out[4];
  float lin = 0.f, e[8];  // lin: the sum of max(z, 0)
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 z = unpack2(T(), word(v, k));
    float g[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float zh = h ? z.y : z.x;
      const float eh = ex2_ftz(fabsf(zh) * -1.4426950408889634f), r = __fdividef(zscale, 1.f + eh);
      g[h] = zh >= 0 ? r : eh * r;
      lin += fmaxf(zh, 0.f);
      e[2 * k + h] = eh;
    }
    out[k] = pack2(T(), g[0], g[1]);
  }
  loss += lin + sum_log1p8(e);
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// The largest logit bce_negatives8_small takes: with every z <= 8, 1 + p = prod (1 + e^z) < 2^93 stays far from
// fp32's overflow and from __fdividef's 2^126 limit.
constexpr float kSmallLogit = 8.f;

// The halves' maxima of two words of bf16 values (the one-pass kernel, bf16 only, is the one caller).
__device__ __forceinline__ uint32_t max2(__nv_bfloat16, uint32_t a, uint32_t b) {
  const __nv_bfloat162 m = __hmax2(*reinterpret_cast<const __nv_bfloat162 *>(&a), *reinterpret_cast<const __nv_bfloat162 *>(&b));
  return *reinterpret_cast<const uint32_t *>(&m);
}
// Whether the 8 16-bit logits in v are all <= kSmallLogit. Packed maxima, under 1 instruction per logit. NaN
// logits may pass or not: both paths give NaN for them.
template <class T>
__device__ __forceinline__ bool small_logits8(const uint4 &v) {
  const float2 m = unpack2(T(), max2(T(), max2(T(), v.x, v.y), max2(T(), v.z, v.w)));
  return fmaxf(m.x, m.y) <= kSmallLogit;
}

// bce_negatives8 for logits that small_logits8 passed: from e = e^z itself, sigmoid(z) = e / (1 + e) and the loss
// log(1 + e), with no |z|, sign selects or max(z, 0) (~9 instructions per logit).
template <class T>
__device__ __forceinline__ uint4 bce_negatives8_small(const uint4 &v, float zscale, float &loss) {
  uint32_t out[4];
  float e[8];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 z = unpack2(T(), word(v, k));
    const float e0 = ex2_ftz(z.x * 1.4426950408889634f), e1 = ex2_ftz(z.y * 1.4426950408889634f);
    out[k] = pack2(T(), e0 * __fdividef(zscale, 1.f + e0), e1 * __fdividef(zscale, 1.f + e1));
    e[2 * k] = e0, e[2 * k + 1] = e1;
  }
  loss += sum_log1p8(e);
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// The first n of the 8 16-bit logits in v (T: the dtype) replaced by zscale * their loss gradients (the rest
// by values that are not to be stored), their loss terms added to loss; bit j of pos: logit j is a positive.
// The 8 are computed side by side, whatever n, and only the sum is masked: the MUFU latencies overlap. Eight
// negatives of BCE take bce_negatives8 (~16 instructions per logit instead of ~28).
template <class T, xmc_loss KIND>
__device__ __forceinline__ uint4 loss_grad8(const uint4 &v, uint32_t pos, int n, float zscale, float &loss) {
  if (KIND == XMC_LOSS_BCE && n == 8 && (pos & 0xffu) == 0) return bce_negatives8<T>(v, zscale, loss);
  uint32_t out[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 z = unpack2(T(), word(v, k));
    float g0, g1;
    const float t0 = loss_term_fast<KIND>(z.x, (pos >> (2 * k)) & 1u, &g0);
    const float t1 = loss_term_fast<KIND>(z.y, (pos >> (2 * k + 1)) & 1u, &g1);
    loss += (2 * k < n ? t0 : 0.f) + (2 * k + 1 < n ? t1 : 0.f);
    out[k] = pack2(T(), g0 * zscale, g1 * zscale);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

}  // namespace xmc_cuda
