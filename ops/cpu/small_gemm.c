/* The small dense products inside each label group: M, N, K are tens to hundreds, so there is no cache
 * blocking here, only a register-tiled AVX2/FMA kernel (6 rows x 16 columns of C held in 12 registers)
 * behind a run-time CPU check, and a portable loop for the edges and for CPUs without AVX2. */
#include <immintrin.h>

#include "cpu_common.h"

#define MR 6
#define NR 16

#define DEFINE_PLAIN_GEMM(NAME, T)                                                                          \
  static void NAME(int64_t M, int64_t N, int64_t K, const T *restrict A, int64_t lda, int64_t ak,             \
                   const T *restrict B, int64_t ldb, T *restrict C, int64_t ldc, int accumulate) {          \
    for (int64_t i = 0; i < M; ++i) {                                                                       \
      T *restrict c = C + i * ldc;                                                                          \
      if (!accumulate)                                                                                      \
        for (int64_t j = 0; j < N; ++j) c[j] = 0;                                                           \
      for (int64_t k = 0; k < K; ++k) {                                                                     \
        const T a = A[i * lda + k * ak];                                                                         \
        const T *restrict b = B + k * ldb;                                                                  \
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];                                                   \
      }                                                                                                     \
    }                                                                                                       \
  }

DEFINE_PLAIN_GEMM(plain_sgemm, float)
DEFINE_PLAIN_GEMM(plain_dgemm, double)

/* C[0:mr, 0:16] (+)= A[0:mr, :] @ B[:, 0:16] with the tile in registers; mr <= MR is a constant at each call
 * site below, so every loop over rows unrolls and the unused accumulators vanish. */
__attribute__((target("avx2,fma"), always_inline)) static inline void kernel_16(int mr, int64_t K, const float *restrict A,
                                                                              int64_t lda, int64_t ak, const float *restrict B,
                                                                              int64_t ldb, float *restrict C,
                                                                              int64_t ldc, int accumulate) {
  __m256 c[MR][2];
  for (int i = 0; i < mr; ++i) {
    c[i][0] = accumulate ? _mm256_loadu_ps(C + i * ldc) : _mm256_setzero_ps();
    c[i][1] = accumulate ? _mm256_loadu_ps(C + i * ldc + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
    for (int i = 0; i < mr; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + k * ak);
      c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
    }
  }
  for (int i = 0; i < mr; ++i) {
    _mm256_storeu_ps(C + i * ldc, c[i][0]);
    _mm256_storeu_ps(C + i * ldc + 8, c[i][1]);
  }
}

__attribute__((target("avx2,fma"))) static void avx2_sgemm(int64_t M, int64_t N, int64_t K, const float *A,
                                                           int64_t lda, int64_t ak, const float *B, int64_t ldb, float *C,
                                                           int64_t ldc, int accumulate) {
  const int64_t N_full = N - N % NR;
  for (int64_t i = 0; i < M; i += MR) {
    const int mr = (int)(M - i < MR ? M - i : MR);
    for (int64_t j = 0; j < N_full; j += NR) {
      const float *a = A + i * lda, *b = B + j;
      float *c = C + i * ldc + j;
      switch (mr) {
        case 6: kernel_16(6, K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
        case 5: kernel_16(5, K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
        case 4: kernel_16(4, K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
        case 3: kernel_16(3, K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
        case 2: kernel_16(2, K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
        default: kernel_16(1, K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
      }
    }
  }
  /* the last N % NR columns */
  if (N_full < N) plain_sgemm(M, N - N_full, K, A, lda, ak, B + N_full, ldb, C + N_full, ldc, accumulate);
}

void xmc_sgemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, int64_t ak, const float *B, int64_t ldb,
               float *C, int64_t ldc, int accumulate) {
  /* libgcc reads the CPU's features once at load time; these are two memory reads */
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    avx2_sgemm(M, N, K, A, lda, ak, B, ldb, C, ldc, accumulate);
  else
    plain_sgemm(M, N, K, A, lda, ak, B, ldb, C, ldc, accumulate);
}

void xmc_dgemm(int64_t M, int64_t N, int64_t K, const double *A, int64_t lda, int64_t ak, const double *B,
               int64_t ldb, double *C, int64_t ldc, int accumulate) {
  plain_dgemm(M, N, K, A, lda, ak, B, ldb, C, ldc, accumulate);
}

/* Large outputs (the [B, L] logits) are written once and not read back soon: streaming stores skip reading
 * each destination line into the cache first. Falls back to plain stores when unaligned or without AVX. */
__attribute__((target("avx"))) static void stream_f32_avx(float *dst, const float *src, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
}

void xmc_store_f32_streaming(float *dst, const float *src, int64_t n) {
  if (n % 8 == 0 && (uintptr_t)dst % 32 == 0 && __builtin_cpu_supports("avx"))
    stream_f32_avx(dst, src, n);
  else
    memcpy(dst, src, sizeof(float) * n);
}

void xmc_store_fence(void) { _mm_sfence(); }
