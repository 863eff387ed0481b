/* Fused loss and fused top-k over a GSFFI layer, CPU (C API in ops/xmc.h). The kernels are in
 * gsffi_fused_impl.inc, instantiated here for float and double compute; this file holds what does not depend
 * on the compute type: the targets' per-group positive lists, the elementwise losses, the entry points. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#include "cpu_common.h"
#include "sgd_sr_update.h"

enum {
  MBLOCK = 256, /* batch rows per tile */
  LBLOCK = 64   /* labels per block of one group: the logits tile is at most [LBLOCK, MBLOCK] */
};

/* The positives of the targets by label group, built once per call: entries ptr[g] .. ptr[g + 1] are group
 * g's (row, label) pairs in row order, duplicates within a row dropped. max_per_group bounds the scratch. */
typedef struct {
  int64_t *ptr, *row, *label;
  int64_t max_per_group;
} pos_map;

static void free_pos_map(pos_map *pm) {
  free(pm->ptr);
  free(pm->row);
  free(pm->label);
}

static int build_pos_map(int64_t B, int64_t L, int64_t G, const int64_t *indptr, const int64_t *labels, pos_map *pm) {
  const int64_t n_groups = (L + G - 1) / G, nnz = indptr[B];
  uint64_t *seen = calloc((size_t)((L + 63) / 64), sizeof(uint64_t));
  unsigned char *keep = malloc((size_t)nnz + 1);
  int64_t *fill = malloc(sizeof(int64_t) * n_groups);
  pm->ptr = calloc((size_t)(n_groups + 1), sizeof(int64_t));
  pm->row = malloc(sizeof(int64_t) * (nnz + 1));
  pm->label = malloc(sizeof(int64_t) * (nnz + 1));
  int err = seen && keep && fill && pm->ptr && pm->row && pm->label ? XMC_OK : XMC_ERR_NOMEM;
  if (err == XMC_OK) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t p = indptr[b]; p < indptr[b + 1]; ++p) {
        const int64_t l = labels[p];
        const uint64_t bit = (uint64_t)1 << (l & 63);
        keep[p] = !(seen[l >> 6] & bit);
        seen[l >> 6] |= bit;
        pm->ptr[l / G + 1] += keep[p];
      }
      for (int64_t p = indptr[b]; p < indptr[b + 1]; ++p) seen[labels[p] >> 6] = 0;
    }
    pm->max_per_group = 0;
    for (int64_t g = 0; g < n_groups; ++g) {
      if (pm->ptr[g + 1] > pm->max_per_group) pm->max_per_group = pm->ptr[g + 1];
      pm->ptr[g + 1] += pm->ptr[g];
      fill[g] = pm->ptr[g];
    }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t p = indptr[b]; p < indptr[b + 1]; ++p) {
        if (!keep[p]) continue;
        const int64_t q = fill[labels[p] / G]++;
        pm->row[q] = b;
        pm->label[q] = labels[p];
      }
  }
  free(seen);
  free(keep);
  free(fill);
  if (err != XMC_OK) free_pos_map(pm);
  return err;
}

/* A positive's loss minus the negative's loss at the same logit z, and a positive's gradient, in double:
 * positives are few, so these stay exact where the vectorised negatives would round. */
static double pos_delta(xmc_loss kind, double z) {
  if (kind == XMC_LOSS_BCE) return -z; /* log(1 + e^-z) - log(1 + e^z) */
  const double up = z < 1 ? 1 - z : 0, un = z > -1 ? 1 + z : 0;
  return up * up - un * un;
}

static double pos_grad(xmc_loss kind, double z) {
  if (kind == XMC_LOSS_BCE) return -1 / (1 + exp(z)); /* sigmoid(z) - 1 */
  return z < 1 ? -2 * (1 - z) : 0;
}

/* The elementwise losses of n logits whose targets are all 0 (neg_terms_*): return the sum of the losses and
 * replace each logit by its gradient. BCE: log(1 + e^z) = max(z, 0) + log1p(e^-|z|), gradient sigmoid(z).
 * Squared hinge: max(0, 1 + z)^2, gradient 2 max(0, 1 + z). This one is the portable float BCE. */
static double scalar_neg_terms(float *z, int64_t n) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = z[i], e = expf(-fabsf(v)), r = 1 / (1 + e);
    sum += (v > 0 ? v : 0) + log1pf(e);
    z[i] = v >= 0 ? r : e * r;
  }
  return sum;
}

/* exp(x) for x in [-87, 0] (Cephes' expf: range reduction by ln 2, degree-5 polynomial, ~1 ulp). */
__attribute__((target("avx2,fma"))) static inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

/* log1p(e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, odd series to s^15 (relative error
 * below 2^-24, also for tiny e where log(1 + e) would round away). */
__attribute__((target("avx2,fma"))) static inline __m256 log1p_unit(__m256 e) {
  const __m256 s = _mm256_div_ps(e, _mm256_add_ps(_mm256_set1_ps(2.0f), e)), s2 = _mm256_mul_ps(s, s);
  __m256 p = _mm256_set1_ps(1.0f / 15);
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 13));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 11));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 9));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 7));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 5));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 3));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(_mm256_add_ps(s, s), p);
}

__attribute__((target("avx2,fma"))) static double avx2_bce_neg_terms(float *z, int64_t n) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  __m256 acc = zero;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(z + i);
    const __m256 e = exp_nonpositive(_mm256_or_ps(v, sign)); /* e^-|v| */
    acc = _mm256_add_ps(acc, _mm256_add_ps(_mm256_max_ps(v, zero), log1p_unit(e)));
    const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
    _mm256_storeu_ps(z + i, _mm256_blendv_ps(_mm256_mul_ps(e, r), r, _mm256_cmp_ps(v, zero, _CMP_GE_OQ)));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  double sum = 0;
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  return sum + scalar_neg_terms(z + i, n - i);
}

/* Squared hinge needs no transcendentals: one SIMD loop (a float sum over at most one tile row). */
static double hinge_neg_terms_f32(float *z, int64_t n) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float m = z[i] > -1 ? 1 + z[i] : 0;
    sum += m * m;
    z[i] = 2 * m;
  }
  return sum;
}

static double neg_terms_f32(xmc_loss kind, float *z, int64_t n) {
  if (kind == XMC_LOSS_SQUARED_HINGE) return hinge_neg_terms_f32(z, n);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2_bce_neg_terms(z, n);
  return scalar_neg_terms(z, n);
}

static double neg_terms_f64(xmc_loss kind, double *z, int64_t n) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = z[i];
    if (kind == XMC_LOSS_BCE) {
      const double e = exp(-fabs(v)), r = 1 / (1 + e);
      sum += (v > 0 ? v : 0) + log1p(e);
      z[i] = v >= 0 ? r : e * r;
    } else {
      const double m = v > -1 ? 1 + v : 0;
      sum += m * m;
      z[i] = 2 * m;
    }
  }
  return sum;
}

#define XMC_IMPL "gsffi_fused_impl.inc"
#include "instantiate.h"

int xmc_gsffi_fused_loss_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                             const int32_t *indices, const void *bias, const int64_t *indptr, const int64_t *labels,
                             xmc_loss loss, double scale, double *loss_out, void *grad_x, void *grad_weight,
                             void *grad_bias, const xmc_weight_update *update, xmc_exec ex) {
  if (dt != XMC_F32 && dt != XMC_BF16 && dt != XMC_F64) return XMC_ERR_DTYPE;
  if (update && (dt == XMC_F64 || grad_weight)) return XMC_ERR_DTYPE; /* SGD-SR updates float32 / bfloat16 */
  const int64_t n_groups = (s.out_features + s.group_size - 1) / s.group_size;
  pos_map pm;
  int err = build_pos_map(s.batch, s.out_features, s.group_size, indptr, labels, &pm);
  if (err != XMC_OK) return err;
  double *group_loss = malloc(sizeof(double) * n_groups);
  if (!group_loss) err = XMC_ERR_NOMEM;
  else if (dt == XMC_F64)
    err = fused_loss_f64(s, dt, x, weight, indices, bias, &pm, loss, scale, group_loss, grad_x, grad_weight,
                         grad_bias, update, ex.num_threads);
  else
    err = fused_loss_f32(s, dt, x, weight, indices, bias, &pm, loss, scale, group_loss, grad_x, grad_weight,
                         grad_bias, update, ex.num_threads);
  if (err == XMC_OK) {
    double total = 0;
    for (int64_t g = 0; g < n_groups; ++g) total += group_loss[g];
    *loss_out = total * scale;
  }
  free(group_loss);
  free_pos_map(&pm);
  return err;
}

int xmc_gsffi_topk_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight, const int32_t *indices,
                       const void *bias, int64_t k, void *scores, int64_t *label_ids, xmc_exec ex) {
  if (dt == XMC_F32 || dt == XMC_BF16)
    return topk_f32(s, dt, x, weight, indices, bias, k, scores, label_ids, ex.num_threads);
  if (dt == XMC_F64) return topk_f64(s, dt, x, weight, indices, bias, k, scores, label_ids, ex.num_threads);
  return XMC_ERR_DTYPE;
}

int xmc_check_csr_targets_cpu(const int64_t *indptr, int64_t rows, const int64_t *labels, int64_t nnz,
                              int64_t n_labels, int64_t *where) {
  *where = 0;
  if (indptr[0] != 0) return XMC_CSR_FIRST_NOT_ZERO;
  for (int64_t b = 0; b < rows; ++b)
    if (indptr[b + 1] < indptr[b]) {
      *where = b;
      return XMC_CSR_DECREASING;
    }
  if (indptr[rows] != nnz) return XMC_CSR_LAST_NOT_NNZ;
  for (int64_t p = 0; p < nnz; ++p)
    if (labels[p] < 0 || labels[p] >= n_labels) {
      *where = p;
      return XMC_CSR_LABEL_OUT_OF_RANGE;
    }
  return XMC_CSR_OK;
}
