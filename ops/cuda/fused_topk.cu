// Fused top-k of a GSFFI layer's logits on CUDA (C API in ops/xmc.h), without a [B, L] buffer.
//   scan   one block per (row tile, chunk of label blocks): logits tiles in shared memory; one thread per row
//          keeps that row's heap of the chunk's best k in global scratch [C, B, k].
//   merge  one thread per row: offers the other chunks' entries to chunk 0's heap, then sorts it best first.
// The ranking (score, then lower label id; NaN above every number) is a total order, so the result does not
// depend on the chunking.
#include <math.h>

#include "fused_common.cuh"

namespace xmc_cuda {
namespace fused {
namespace {

template <class A>
__device__ __forceinline__ bool ranks_above(A a, int64_t ia, A b, int64_t ib) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return an && (!bn || ia < ib);
  if (a != b) return a > b;
  return ia < ib;
}

// A heap of n <= k entries whose root is the lowest-ranked; offer keeps the k best.
template <class A>
__device__ void heap_offer(A *hs, int64_t *hi, int64_t &n, int64_t k, A v, int64_t id) {
  int64_t i;
  if (n < k) {
    i = n++;
    while (i > 0) {
      const int64_t p = (i - 1) / 2;
      if (!ranks_above(hs[p], hi[p], v, id)) break;
      hs[i] = hs[p];
      hi[i] = hi[p];
      i = p;
    }
  } else {
    if (!ranks_above(v, id, hs[0], hi[0])) return;
    i = 0;
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= k) break;
      if (c + 1 < k && ranks_above(hs[c], hi[c], hs[c + 1], hi[c + 1])) ++c;
      if (!ranks_above(v, id, hs[c], hi[c])) break;
      hs[i] = hs[c];
      hi[i] = hi[c];
      i = c;
    }
  }
  hs[i] = v;
  hi[i] = id;
}

// Removes the root (lowest-ranked) of a heap of n entries, n >= 1.
template <class A>
__device__ void heap_pop(A *hs, int64_t *hi, int64_t n) {
  const A v = hs[n - 1];
  const int64_t id = hi[n - 1];
  --n;
  int64_t i = 0;
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && ranks_above(hs[c], hi[c], hs[c + 1], hi[c + 1])) ++c;
    if (!ranks_above(v, id, hs[c], hi[c])) break;
    hs[i] = hs[c];
    hi[i] = hi[c];
    i = c;
  }
  if (n > 0) {
    hs[i] = v;
    hi[i] = id;
  }
}

template <class T>
__global__ void __launch_bounds__(THREADS) scan_kernel(xmc_gsffi_shape s, const T *x, const T *w,
                                                       const int32_t *indices, const T *bias, int64_t k,
                                                       int64_t n_blocks, Acc<T> *hs, int64_t *hi, int64_t *hn) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  A *xs = reinterpret_cast<A *>(smem), *ws = xs + XS, *zs = ws + WS;
  const int64_t B = s.batch, H = s.in_features, F = s.fan_in, C = gridDim.y, c = blockIdx.y;
  const int64_t b0 = (int64_t)blockIdx.x * RT;
  const int rt = (int)xmin<int64_t>(RT, B - b0), r = threadIdx.x;
  const int64_t row = (c * B + b0 + r) * k;
  int64_t n = 0;
  A thr = -INFINITY;
  for (int64_t id = c * n_blocks / C; id < (c + 1) * n_blocks / C; ++id) {
    const LabelBlock lb = label_block(id, s.out_features, s.group_size);
    if (lb.nl <= 0) continue;
    A z[2][4];
    logits_tile(x, H, w, F, indices + lb.g * F, bias, lb.l0, lb.nl, b0, rt, xs, ws, z);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) zs[tile_label(i) * (RT + 1) + tile_row(j)] = z[i][j];
    __syncthreads();
    if (r < rt)
      for (int l = 0; l < lb.nl; ++l) {
        const A v = zs[l * (RT + 1) + r];
        if (v < thr) continue;
        heap_offer(hs + row, hi + row, n, k, v, lb.l0 + l);
        if (n == k) thr = hs[row];
      }
  }
  if (r < rt) hn[c * B + b0 + r] = n;
}

template <class T>
__global__ void merge_kernel(int64_t B, int64_t k, int64_t C, Acc<T> *hs, int64_t *hi, const int64_t *hn, T *scores,
                             int64_t *ids) {
  const int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  Acc<T> *h0 = hs + b * k;
  int64_t *i0 = hi + b * k, n = hn[b];
  for (int64_t c = 1; c < C; ++c)
    for (int64_t e = 0; e < hn[c * B + b]; ++e)
      heap_offer(h0, i0, n, k, hs[(c * B + b) * k + e], hi[(c * B + b) * k + e]);
  // n == k (k <= L): pop the lowest-ranked into the last free place until the heap is empty
  for (int64_t m = n; m > 0; --m) {
    put(scores + b * k + m - 1, h0[0]);
    ids[b * k + m - 1] = i0[0];
    heap_pop(h0, i0, m);
  }
}

template <class T>
int launch(xmc_gsffi_shape s, const void *x, const void *w, const int32_t *indices, const void *bias, int64_t k,
           void *scores, int64_t *ids, cudaStream_t stream) {
  using A = Acc<T>;
  const int64_t B = s.batch, L = s.out_features, G = s.group_size;
  const int64_t n_blocks = (L + G - 1) / G * ((G + LB - 1) / LB), row_tiles = (B + RT - 1) / RT;
  // chunks of label blocks: enough blocks to fill the GPU twice, heaps within 256 MB
  int64_t C = xmax<int64_t>(1, (2 * num_sms() + row_tiles - 1) / row_tiles);
  C = xmin<int64_t>(C, xmax<int64_t>(1, (int64_t(256) << 20) / (int64_t)((sizeof(A) + 8) * B * k)));
  C = xmin<int64_t>(C, n_blocks);
  A *hs = nullptr;
  int64_t *hi = nullptr, *hn = nullptr;
  int err = (int)scratch_alloc(reinterpret_cast<void **>(&hs), sizeof(A) * C * B * k, stream);
  if (!err) err = (int)scratch_alloc(reinterpret_cast<void **>(&hi), sizeof(int64_t) * C * B * k, stream);
  if (!err) err = (int)scratch_alloc(reinterpret_cast<void **>(&hn), sizeof(int64_t) * C * B, stream);
  if (!err) {
    const size_t smem = sizeof(A) * (XS + WS + ZS);
    prepare(scan_kernel<T>, THREADS, smem);
    scan_kernel<T><<<dim3((unsigned)row_tiles, (unsigned)C), THREADS, smem, stream>>>(
        s, static_cast<const T *>(x), static_cast<const T *>(w), indices, static_cast<const T *>(bias), k, n_blocks,
        hs, hi, hn);
    err = last_error();
  }
  if (!err) {
    merge_kernel<T><<<(unsigned)((B + 127) / 128), 128, 0, stream>>>(B, k, C, hs, hi, hn, static_cast<T *>(scores),
                                                                     ids);
    err = last_error();
  }
  cudaFreeAsync(hs, stream);
  cudaFreeAsync(hi, stream);
  cudaFreeAsync(hn, stream);
  return err;
}

}  // namespace
}  // namespace fused
}  // namespace xmc_cuda

extern "C" int xmc_gsffi_topk_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                                   const int32_t *indices, const void *bias, int64_t k, void *scores,
                                   int64_t *label_ids, xmc_exec ex) {
  using namespace xmc_cuda::fused;
  switch (dt) {
    case XMC_F32: return launch<float>(s, x, weight, indices, bias, k, scores, label_ids, ex.stream);
    case XMC_F64: return launch<double>(s, x, weight, indices, bias, k, scores, label_ids, ex.stream);
    case XMC_BF16: return launch<__nv_bfloat16>(s, x, weight, indices, bias, k, scores, label_ids, ex.stream);
    case XMC_F16: return launch<__half>(s, x, weight, indices, bias, k, scores, label_ids, ex.stream);
  }
  return (int)cudaErrorInvalidValue;
}
