// Fused top-k of a GSFFI layer's logits on CUDA (C API in ops/xmc.h), without a [B, L] buffer.
// bf16 / fp16 take the tensor-core paths: where L is large, launch_filtered (a threshold from a sample of labels,
// then one forward pass that keeps only the logits at or above it), else, and for rows where the filter could not
// decide, launch_tc (the layer's forward kernel, one label chunk at a time);
// float32 / float64 plain FMA kernels:
//   scan   one block per (row tile, chunk of label blocks): logits tiles in shared memory; one thread per row
//          keeps that row's heap of the chunk's best k in global scratch [C, B, k].
//   merge  one thread per row: offers the other chunks' entries to chunk 0's heap, then sorts it best first.
// The ranking (score, then lower label id; NaN above every number) is a total order, so the result does not
// depend on the chunking.
#include <math.h>

#include <cooperative_groups.h>

#include "fused_common.cuh"
#include "gsffi_forward_tile.cuh"

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
  void *block = nullptr;
  int err = (int)scratch_parts(&block,
                               {{reinterpret_cast<void **>(&hs), sizeof(A) * C * B * k},
                                {reinterpret_cast<void **>(&hi), sizeof(int64_t) * C * B * k},
                                {reinterpret_cast<void **>(&hn), sizeof(int64_t) * C * B}},
                               stream);
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
  if (block) cudaFreeAsync(block, stream);
  return err;
}

// ---- Tensor-core path (bf16, fp16): the layer's forward kernel, one label chunk at a time ----
// Per chunk of nl labels (chunk_labels), the forward kernel writes the logits into a [B, nl] scratch buffer
// and scan_chunk offers them to the heaps: warp (segment sg, row b) owns the heap [sg, b] of the best k among
// its slice of every chunk, kept in global scratch across chunks. merge_sorted then merges the segments.

// Warp w = (segment sg, row b) owns heap [sg, b]; segment sg takes columns [lo, hi) of the chunk (8-aligned).
// The lanes read 8 logits each (16-byte loads where aligned) and test them against the heap's root; lane 0
// offers the few that pass, in label order, and broadcasts the new root.
// With shared memory (k <= kScanSmemK), each warp works on a copy of its heap there: a heap offer walks
// log2(k) levels, and from global memory each level is an L2 round trip.
constexpr int kScanWarps = 8;
constexpr int64_t kScanSmemK = 512;

// scan_chunk's work for warp wid (one heap).
template <class T>
__device__ __forceinline__ void scan_heap(const T *z, int64_t B, int64_t nl, int64_t c0, int64_t S, int64_t k,
                                          bool vec, float *hs_g, int64_t *hi_g, int64_t *hn, unsigned char *smem,
                                          int64_t wid, int lane, int wib) {
  const int64_t sg = wid / B, b = wid - sg * B, n8 = (nl + 7) / 8;
  const int64_t lo = n8 * sg / S * 8, hi_ = xmin<int64_t>(n8 * (sg + 1) / S * 8, nl);
  int64_t n = hn[wid];
  const bool in_smem = k <= kScanSmemK;
  float *hs = hs_g + wid * k;
  int64_t *hi = hi_g + wid * k;
  if (in_smem) {
    hi = reinterpret_cast<int64_t *>(smem) + wib * k;
    hs = reinterpret_cast<float *>(reinterpret_cast<int64_t *>(smem) + (blockDim.x / 32) * k) + wib * k;
    for (int64_t j = lane; j < n; j += 32) {
      hs[j] = hs_g[wid * k + j];
      hi[j] = hi_g[wid * k + j];
    }
    __syncwarp();
  }
  float thr = n == k ? hs[0] : -INFINITY;
  const T *zr = z + b * nl;
  for (int64_t base = lo; base < hi_; base += 256) {
    const int64_t l = base + 8 * lane;
    const int64_t nv = xmax<int64_t>(0, xmin<int64_t>(8, hi_ - l));
    uint4 raw = load_elems<8>(zr + l, nv, vec);
    const T *e = reinterpret_cast<const T *>(&raw);
    float v[8];
    unsigned pass = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[j] = to_acc(e[j]);
      if (j < nv && !(v[j] < thr)) pass |= 1u << j;
    }
    unsigned lanes = __ballot_sync(0xffffffffu, pass != 0);
    while (lanes) {
      const int src = __ffs(lanes) - 1;
      lanes &= lanes - 1;
      const unsigned m = __shfl_sync(0xffffffffu, pass, src);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if ((m >> j) & 1u) {  // the same for every lane
          const float val = __shfl_sync(0xffffffffu, v[j], src);
          if (lane == 0 && !(val < thr)) {
            heap_offer(hs, hi, n, k, val, c0 + base + 8 * src + j);
            if (n == k) thr = hs[0];
          }
          thr = __shfl_sync(0xffffffffu, thr, 0);
        }
      }
    }
  }
  if (lane == 0) hn[wid] = n;
  if (in_smem) {
    n = __shfl_sync(0xffffffffu, n, 0);
    __syncwarp();
    for (int64_t j = lane; j < n; j += 32) {
      hs_g[wid * k + j] = hs[j];
      hi_g[wid * k + j] = hi[j];
    }
  }
}

template <class T>
__global__ void scan_chunk(const T *z, int64_t B, int64_t nl, int64_t c0, int64_t S, int64_t k, bool vec,
                           float *hs_g, int64_t *hi_g, int64_t *hn, const int *run_if) {
  if (run_if != nullptr && *run_if == 0) return;
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32, wib = threadIdx.x / 32;
  for (int64_t wid = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; wid < S * B;
       wid += (int64_t)gridDim.x * blockDim.x / 32)  // whole warps
    scan_heap<T>(z, B, nl, c0, S, k, vec, hs_g, hi_g, hn, smem, wid, lane, wib);
}

// The want-th largest (1 <= want <= n) of n 16-bit keys get(0 .. n - 1): the high byte, then the low byte within
// it, each by a 256-bin histogram. Every thread of the block calls it and gets the answer.
template <class Get>
__device__ uint32_t block_kth_key(Get get, int64_t n, uint32_t want) {
  __shared__ unsigned hist[256];
  __shared__ uint32_t pick[2];  // the byte, then the rank still to find within it
  uint32_t hi = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (int e = threadIdx.x; e < 256; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
      const uint32_t key = get(e);
      if (pass == 0) atomicAdd(&hist[key >> 8], 1u);
      else if ((key >> 8) == hi) atomicAdd(&hist[key & 0xff], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // the bin, from the top, in which the count reaches `want`
      uint32_t above = 0;
      int bin = 255;
      for (; bin > 0 && above + hist[bin] < want; --bin) above += hist[bin];
      pick[0] = (uint32_t)bin;
      pick[1] = want - above;
    }
    __syncthreads();
    if (pass == 0) hi = pick[0];
    want = pick[1];
    __syncthreads();
  }
  return hi << 8 | pick[0];
}

constexpr int kMergeCap = 8192;  // entries one merge_sorted block sorts in shared memory (96 KB)

// One block per row: the S lists' entries (list [c, b] holds hn[c B + b] <= m entries at [(c B + b) m], S m <= n,
// n a power of two <= kMergeCap; a single list only up to its count) sorted best first in shared memory
// (bitonic; the free places hold -inf with an id above every label, which ranks below every entry), and the
// first k written out. A single list (the filter's) is not sorted: only its entries whose value reaches the
// list's k-th best value can place, and those few rank themselves (see below). merge_kernel does the same with
// one thread per row, S m heap offers each.
template <class T>
__device__ __forceinline__ void merge_row(int64_t b, int64_t B, int64_t k, int64_t m, int64_t S, int n,
                                          const float *hs, const int64_t *hi, const int64_t *hn, T *scores,
                                          int64_t *ids, unsigned char *smem) {
  int64_t *si = reinterpret_cast<int64_t *>(smem);
  float *sv = reinterpret_cast<float *>(si + n);
  if (S == 1) {  // one list (the filter's)
    const int64_t cnt = xmin<int64_t>(hn[b], m);
    // Only entries whose value is at least the list's k-th best value can place: a radix select finds that
    // value, and the ~k candidates (more where values tie) each count the candidates above them; an entry's
    // place is that count, the ranking being a total order, as one 64-bit key per entry (the value's 16-bit key
    // over the complement of the label id in 48 bits: any L whose weights fit in memory).
    uint64_t *key = reinterpret_cast<uint64_t *>(smem);        // cnt keys, then cnt candidate positions:
    int *cand = reinterpret_cast<int *>(key + cnt);            // 12 cnt <= 12 n bytes
    __shared__ int n_cand;
    for (int64_t e = threadIdx.x; e < cnt; e += blockDim.x) {
      const uint64_t vkey = rank_key<T>(bits16(T(), hs[b * m + e]));
      key[e] = vkey << 48 | ((1ull << 48) - 1 - (uint64_t)hi[b * m + e]);
    }
    if (threadIdx.x == 0) n_cand = 0;
    __syncthreads();
    if (cnt == 0) return;  // (a list of fewer than k entries leaves places unwritten: lists_undecided flags it)
    const uint64_t vk = block_kth_key([&](int64_t e) { return (uint32_t)(key[e] >> 48); }, cnt,
                                      (uint32_t)xmin<int64_t>(k, cnt));
    for (int64_t e = threadIdx.x; e < cnt; e += blockDim.x)
      if ((key[e] >> 48) >= vk) cand[atomicAdd(&n_cand, 1)] = (int)e;
    __syncthreads();
    const int nc = n_cand;
    if (nc <= 2048) {  // else (values tied across thousands of entries) the sort below
      for (int c = threadIdx.x; c < nc; c += blockDim.x) {
        const uint64_t mine = key[cand[c]];
        int r = 0;
        for (int j = 0; j < nc; ++j) r += key[cand[j]] > mine;
        if (r < k) {
          put(scores + b * k + r, hs[b * m + cand[c]]);
          ids[b * k + r] = hi[b * m + cand[c]];
        }
      }
      return;
    }
    __syncthreads();
    // else sort only the power of two that holds its entries and k
    while (n / 2 >= xmax<int64_t>(cnt, k) && n > 2) n /= 2;
  }
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int64_t c = e / m, j = e - c * m;
    const bool ok = c < S && j < xmin<int64_t>(hn[c * B + b], m);
    sv[e] = ok ? hs[(c * B + b) * m + j] : -INFINITY;
    si[e] = ok ? hi[(c * B + b) * m + j] : INT64_MAX;
  }
  for (int size = 2; size <= n; size <<= 1)
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1)), hi_ = lo + stride;
        const bool best_first = (lo & size) == 0;
        const bool swap = best_first ? ranks_above(sv[hi_], si[hi_], sv[lo], si[lo])
                                     : ranks_above(sv[lo], si[lo], sv[hi_], si[hi_]);
        if (swap) {
          const float v = sv[lo];
          sv[lo] = sv[hi_];
          sv[hi_] = v;
          const int64_t t = si[lo];
          si[lo] = si[hi_];
          si[hi_] = t;
        }
      }
    }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    put(scores + b * k + j, sv[j]);
    ids[b * k + j] = si[j];
  }
}

template <class T>
__global__ void merge_sorted(int64_t B, int64_t k, int64_t m, int64_t S, int n, const float *hs, const int64_t *hi,
                             const int64_t *hn, T *scores, int64_t *ids, const int *run_if) {
  if (run_if != nullptr && *run_if == 0) return;
  extern __shared__ __align__(16) unsigned char smem[];
  merge_row<T>(blockIdx.x, B, k, m, S, n, hs, hi, hn, scores, ids, smem);
}

// Merges S lists of at most m entries per row (heaps of m = k, or the filter's candidate lists) into the best k.
template <class T>
int merge(int64_t B, int64_t k, int64_t m, int64_t S, const float *hs, const int64_t *hi, const int64_t *hn,
          void *scores, int64_t *ids, const int *run_if, cudaStream_t st) {
  int n = 2;
  while (n < S * m && n < kMergeCap) n *= 2;
  if (S * m <= n) {
    const size_t smem = (size_t)n * (sizeof(float) + sizeof(int64_t));
    prepare(merge_sorted<T>, 512, smem);
    merge_sorted<T><<<(unsigned)B, 512, smem, st>>>(B, k, m, S, n, hs, hi, hn, static_cast<T *>(scores), ids,
                                                    run_if);
  } else {  // heaps only (m = k): launch_filtered keeps its lists within kMergeCap
    merge_kernel<T><<<(unsigned)((B + 127) / 128), 128, 0, st>>>(B, k, S, const_cast<float *>(hs),
                                                                   const_cast<int64_t *>(hi), hn,
                                                                   static_cast<T *>(scores), ids);
  }
  return last_error();
}

// launch_tc's work gated on *run_if in ONE cooperative launch (a grid of whole waves of the forward's blocks,
// phases separated by grid-wide barriers): per label chunk the forward tile into buf, then the heaps' scan; then
// the merge. launch_filtered's fallback runs rarely, and as ~25 gated launches it cost ~60 us on every call
// (2.4 us apart on an H100, even returning at once); as one it costs one.
template <class T, int NW, int KC>
__global__ void __launch_bounds__(kFwdThreads, 1)
    exact_topk_coop(FwdArgs<T> all, int64_t nl, int64_t S, int64_t k, int merge_n, float *hs, int64_t *hi,
                    int64_t *hn, T *scores, int64_t *ids, const int *run_if) {
  if (*run_if == 0) return;
  extern __shared__ __align__(16) unsigned char smem[];
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const int64_t B = all.B, L = all.L, G = all.G, F = all.F;
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, nthreads = (int64_t)gridDim.x * blockDim.x;
  const int lane = threadIdx.x % 32, wib = threadIdx.x / 32;
  for (int64_t i = tid; i < S * B; i += nthreads) hn[i] = 0;
  for (int64_t c0 = 0; c0 < L; c0 += nl) {
    const int64_t n = xmin<int64_t>(nl, L - c0);
    FwdArgs<T> a = all;
    a.w = all.w + c0 * F;
    a.idx = all.idx + c0 / G * F;
    a.bias = all.bias != nullptr ? all.bias + c0 : nullptr;
    a.L = n;
    a.n_items = (n + G - 1) / G * a.nj;
    a.y_vec = all.y_vec && n % 8 == 0;
    fwd_mma_tile<T, NW, KC, kLogits>(a, blockIdx.x, gridDim.x, smem);
    grid.sync();
    for (int64_t wid = tid / 32; wid < S * B; wid += nthreads / 32)
      scan_heap<T>(a.y, B, n, c0, S, k, n % 8 == 0, hs, hi, hn, smem, wid, lane, wib);
    grid.sync();
  }
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    merge_row<T>(b, B, k, k, S, merge_n, hs, hi, hn, scores, ids, smem);
    __syncthreads();
  }
}

// Launches exact_topk_coop for launch_tc's buffers; returns false (nothing launched) where the shape does not
// fit one wave of co-resident blocks, or the device has no cooperative launch.
template <class T, int NW, int KC>
bool coop_launch(xmc_gsffi_shape s, int BT, const void *x, const void *w, const int32_t *indices, const void *bias,
                 void *buf, int64_t nl, int64_t S, int64_t k, float *hs, int64_t *hi, int64_t *hn, void *scores,
                 int64_t *ids, const int *run_if, cudaStream_t st, int *err) {
  int merge_n = 2;
  while (merge_n < S * k) merge_n *= 2;
  const size_t smem = xmax<size_t>(xmax<size_t>(fwd_smem(s.in_features, BT), (size_t)merge_n * 12),
                                   k <= kScanSmemK ? (size_t)(kFwdThreads / 32) * k * 12 : 0);
  if (merge_n > kMergeCap || smem > (size_t)smem_optin()) return false;
  if (!device_attr<cudaDevAttrCooperativeLaunch>()) return false;
  auto kernel = exact_topk_coop<T, NW, KC>;
  const int per_sm = prepare(kernel, kFwdThreads, smem);
  if (per_sm == 0) {  // does not fit (static shared memory included): leave no error behind
    cudaGetLastError();
    return false;
  }
  FwdArgs<T> a = fwd_args<T>({s.batch, s.in_features, nl, s.fan_in, s.group_size}, NW, BT, x, w, indices, bias,
                             buf);
  a.L = s.out_features;
  const int64_t grid = (int64_t)num_sms() * per_sm / a.nbt * a.nbt;  // whole batch tiles, all co-resident
  if (grid < a.nbt) return false;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeCooperative;
  attr.val.cooperative = 1;
  *err = (int)launch_ex(attr, true, kernel, dim3((unsigned)grid), dim3(kFwdThreads), smem, st, a, nl, S, k, merge_n,
                        hs, hi, hn, static_cast<T *>(scores), ids, run_if);
  return true;
}

template <class T>
bool exact_coop(xmc_gsffi_shape s, const void *x, const void *w, const int32_t *indices, const void *bias,
                void *buf, int64_t nl, int64_t S, int64_t k, float *hs, int64_t *hi, int64_t *hn, void *scores,
                int64_t *ids, const int *run_if, cudaStream_t st, int *err) {
  const int BT = tensor_core_tile(s, w);
  if (BT == 0) return false;
  int nw, kc;
  mma_sizes(s, &nw, &kc);
#define XMC_COOP(NW_, KC_)                                                                                     \
  if (nw == NW_ && kc == KC_)                                                                                  \
    return coop_launch<T, NW_, KC_>(s, BT, x, w, indices, bias, buf, nl, S, k, hs, hi, hn, scores, ids, run_if, \
                                    st, err);
  XMC_FWD_SIZES(XMC_COOP)
#undef XMC_COOP
  return false;
}

// run_if: every kernel returns at once unless *run_if != 0 (launch_filtered's fallback).
int launch_tc(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *w, const int32_t *indices,
              const void *bias, int64_t k, void *scores, int64_t *ids, xmc_exec ex, const int *run_if) {
  cudaStream_t st = ex.stream;
  const int64_t B = s.batch, H = s.in_features, L = s.out_features, F = s.fan_in, G = s.group_size;
  const int64_t nl = chunk_labels(s);
  // segments per row: ~8K scanning warps in all, each with >= 256 labels of a chunk, and S k <= 1024: a heap of
  // k takes ~k ln(labels / k) offers, one lane at a time, so many heaps of a large k cost more than the scan
  const int64_t S = xmax<int64_t>(1, xmin<int64_t>(xmin<int64_t>(8192 / B, 1024 / k), nl / 256));
  void *block = nullptr, *buf = nullptr, *hs = nullptr, *hi = nullptr, *hn = nullptr;
  int err = (int)scratch_parts(&block,
                               {{&buf, (size_t)(B * nl) * 2},
                                {&hs, sizeof(float) * S * B * k},
                                {&hi, sizeof(int64_t) * S * B * k},
                                {&hn, sizeof(int64_t) * S * B}},
                               st);
  if (!err && run_if != nullptr) {
    float *h = static_cast<float *>(hs);
    int64_t *i = static_cast<int64_t *>(hi), *c = static_cast<int64_t *>(hn);
    const bool launched = dt == XMC_BF16
                              ? exact_coop<__nv_bfloat16>(s, x, w, indices, bias, buf, nl, S, k, h, i, c, scores,
                                                          ids, run_if, st, &err)
                              : exact_coop<__half>(s, x, w, indices, bias, buf, nl, S, k, h, i, c, scores, ids,
                                                   run_if, st, &err);
    if (launched) {
      cudaFreeAsync(block, st);
      return err;
    }
  }
  if (!err) err = (int)cudaMemsetAsync(hn, 0, sizeof(int64_t) * S * B, st);
  for (int64_t c0 = 0; !err && c0 < L; c0 += nl) {
    const int64_t n = xmin<int64_t>(nl, L - c0);
    const xmc_gsffi_shape sc = {B, H, n, F, G};
    const void *wc = static_cast<const unsigned char *>(w) + c0 * F * 2;
    const void *bc = bias ? static_cast<const unsigned char *>(bias) + c0 * 2 : nullptr;
    err = run_if != nullptr ? forward_gated(sc, dt, x, wc, indices + c0 / G * F, bc, buf, run_if, st)
                            : xmc_gsffi_forward_cuda(sc, dt, x, wc, indices + c0 / G * F, bc, buf, ex);
    if (!err) {
      // gated: one wave of blocks, which loop over the warps' heaps (a block that returns at once still costs
      // its launch)
      const unsigned blocks = (unsigned)xmin<int64_t>((S * B + kScanWarps - 1) / kScanWarps,
                                                      (int64_t)num_sms() * (run_if != nullptr ? 1 : 4));
      const size_t smem = k <= kScanSmemK ? (size_t)kScanWarps * k * (sizeof(float) + sizeof(int64_t)) : 0;
      const bool vec = n % 8 == 0;
      float *h = static_cast<float *>(hs);
      int64_t *i = static_cast<int64_t *>(hi), *c = static_cast<int64_t *>(hn);
      if (dt == XMC_BF16) {
        prepare(scan_chunk<__nv_bfloat16>, 32 * kScanWarps, smem);
        scan_chunk<__nv_bfloat16><<<blocks, 32 * kScanWarps, smem, st>>>(static_cast<const __nv_bfloat16 *>(buf), B,
                                                                          n, c0, S, k, vec, h, i, c, run_if);
      } else {
        prepare(scan_chunk<__half>, 32 * kScanWarps, smem);
        scan_chunk<__half><<<blocks, 32 * kScanWarps, smem, st>>>(static_cast<const __half *>(buf), B, n, c0, S, k,
                                                                   vec, h, i, c, run_if);
      }
      err = last_error();
    }
  }
  if (!err) {
    const float *h = static_cast<const float *>(hs);
    const int64_t *i = static_cast<const int64_t *>(hi), *c = static_cast<const int64_t *>(hn);
    err = dt == XMC_BF16 ? merge<__nv_bfloat16>(B, k, k, S, h, i, c, scores, ids, run_if, st)
                         : merge<__half>(B, k, k, S, h, i, c, scores, ids, run_if, st);
  }
  if (block) cudaFreeAsync(block, st);
  return err;
}

// ---- Filtered tensor-core path (bf16, fp16, large L) ----
// 1. The forward kernel on a sample, the first S labels, in chunk-maximum mode: for each row, the largest logit
//    of each work item (<= 32 labels of a group) as a 16-bit key, [B, M]; sample_kth finds tau[b], the k-th best
//    of row b's maxima (a radix select: two histogram passes, no heaps). The k-th best logit over all labels is
//    at least tau[b], so the top k are among the logits not below it.
// 2. One forward pass over all labels in filter mode (gsffi_forward.cu): those logits, ~k L / S per row, go to
//    per-row lists of at most cap entries. No [B, L] buffer, and no chunk to write and read back.
// 3. merge_sorted sorts each row's list and writes its best k. The ranking is a total order, so the lists'
//    arbitrary order (atomic appends) does not show.
// 4. A row whose list overflowed (or, defensively, holds fewer than k) raises a flag, and launch_tc runs again
//    over all labels gated on it: on typical inputs its kernels return at once; on adversarial ones (e.g. a
//    layer whose logits all tie) the answer is still exact. The host never waits on the flag.
constexpr int64_t kFilterSample = 65536;  // sample labels at least, and 2048 per k

// One block per row: tau[b] = the k-th best of the row's M chunk maxima (keys [B, M] from forward_chunk_max),
// a lower bound of the k-th best logit of the sample: the k best chunks hold k logits not below it. It is the
// sample's k-th best unless two of the sample's best k share a chunk, ~k^2 / (2 M) ranks lower on average, which
// launch_filtered's list size allows for (block_kth_key; M >= k).
template <class T>
__global__ void sample_kth(const uint16_t *keys, int64_t M, int64_t k, float *tau) {
  const uint16_t *kr = keys + blockIdx.x * M;
  const uint32_t key = block_kth_key([&](int64_t e) { return (uint32_t)__ldg(kr + e); }, M, (uint32_t)k);
  if (threadIdx.x == 0) tau[blockIdx.x] = key_value<T>(key);
}

__global__ void lists_undecided(const unsigned long long *count, int64_t B, int64_t k, int64_t cap, int *flag) {
  __shared__ int any;
  if (threadIdx.x == 0) any = 0;
  __syncthreads();
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x)
    if (count[b] > (unsigned long long)cap || count[b] < (unsigned long long)k) any = 1;
  __syncthreads();
  if (threadIdx.x == 0) *flag = any;
}

// The filtered path for the rows of s (all its steps), with sample S (M chunks) and lists of cap entries.
int filtered_rows(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *w, const int32_t *indices,
                  const void *bias, int64_t k, int64_t S, int64_t M, int64_t cap, void *scores, int64_t *ids,
                  xmc_exec ex) {
  cudaStream_t st = ex.stream;
  const int64_t B = s.batch, H = s.in_features, F = s.fan_in, G = s.group_size;
  void *block = nullptr, *keys = nullptr, *tau = nullptr, *count = nullptr, *cs = nullptr, *ci = nullptr,
       *flag = nullptr;
  int err = (int)scratch_parts(&block,
                               {{&keys, (size_t)(B * M) * 2},
                                {&tau, sizeof(float) * B},
                                {&count, sizeof(unsigned long long) * B},
                                {&cs, sizeof(float) * B * cap},
                                {&ci, sizeof(int64_t) * B * cap},
                                {&flag, sizeof(int)}},
                               st);
  if (!err) err = forward_chunk_max({B, H, S, F, G}, dt, x, w, indices, bias, static_cast<uint16_t *>(keys), st);
  if (!err) {
    const uint16_t *kp = static_cast<const uint16_t *>(keys);
    float *tp = static_cast<float *>(tau);
    if (dt == XMC_BF16)
      sample_kth<__nv_bfloat16><<<(unsigned)B, 256, 0, st>>>(kp, M, k, tp);
    else
      sample_kth<__half><<<(unsigned)B, 256, 0, st>>>(kp, M, k, tp);
    err = last_error();
  }
  if (!err) err = (int)cudaMemsetAsync(count, 0, sizeof(unsigned long long) * B, st);
  if (!err) {
    const FwdFilter flt{static_cast<const float *>(tau), static_cast<unsigned long long *>(count),
                        static_cast<float *>(cs), static_cast<int64_t *>(ci), cap};
    err = forward_filter(s, dt, x, w, indices, bias, flt, st);
  }
  if (!err) {
    lists_undecided<<<1, 256, 0, st>>>(static_cast<const unsigned long long *>(count), B, k, cap,
                                       static_cast<int *>(flag));
    err = last_error();
  }
  if (!err) {
    const float *h = static_cast<const float *>(cs);
    const int64_t *i = static_cast<const int64_t *>(ci), *c = static_cast<const int64_t *>(count);
    err = dt == XMC_BF16 ? merge<__nv_bfloat16>(B, k, cap, 1, h, i, c, scores, ids, nullptr, st)
                         : merge<__half>(B, k, cap, 1, h, i, c, scores, ids, nullptr, st);
  }
  if (!err) err = launch_tc(s, dt, x, w, indices, bias, k, scores, ids, ex, static_cast<const int *>(flag));
  if (block) cudaFreeAsync(block, st);
  return err;
}

// The filtered path where L is large enough for a sample (and the shape takes the tensor-core forward), in row
// chunks whose sample keys and lists fit the chunk budget (XMC_FUSED_CHUNK_MB, 128 MB), so its scratch does
// not grow with the batch either; else launch_tc.
int launch_filtered(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *w, const int32_t *indices,
                    const void *bias, int64_t k, void *scores, int64_t *ids, xmc_exec ex) {
  const int64_t B = s.batch, H = s.in_features, L = s.out_features, G = s.group_size;
  const int64_t S = (xmax<int64_t>(kFilterSample, 2048 * k) + G - 1) / G * G;  // whole groups
  if (2 * S > L || !filter_applies(s, w)) return launch_tc(s, dt, x, w, indices, bias, k, scores, ids, ex, nullptr);
  const int64_t M = forward_chunks({B, H, S, s.fan_in, G});
  // List size: for a sample like the rest, a row's count is about (L / S) Gamma(k + d), where d ~ k^2 / (2 M) is
  // how far the chunk maxima's k-th best falls below the sample's (~0.01 for k = 5, ~0.8 for k = 100);
  // (L / S) (k + d + 4 sqrt(k + d) + 8) is exceeded by one row in ~10^5 to 10^6 for k = 1 .. 100 (then the exact
  // pass runs).
  const double kd = k + (double)k * k / (2.0 * M);
  int64_t cap = 256;
  while ((double)cap < (double)L / S * (kd + 4 * sqrt(kd) + 8)) cap *= 2;
  if (cap > kMergeCap) return launch_tc(s, dt, x, w, indices, bias, k, scores, ids, ex, nullptr);
  const int64_t per_row = 2 * M + (int64_t)(sizeof(float) + sizeof(int64_t)) * cap;
  const int64_t rows = xmax<int64_t>(1, xmin<int64_t>(B, chunk_bytes() / per_row));
  int err = 0;
  for (int64_t b0 = 0; !err && b0 < B; b0 += rows) {
    const int64_t n = xmin<int64_t>(rows, B - b0);
    err = filtered_rows({n, H, L, s.fan_in, G}, dt, static_cast<const unsigned char *>(x) + b0 * H * 2, w, indices,
                        bias, k, S, M, cap, static_cast<unsigned char *>(scores) + b0 * k * 2, ids + b0 * k, ex);
  }
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
    case XMC_BF16:
    case XMC_F16:
      if (s.batch == 0) return 0;
      return launch_filtered(s, dt, x, weight, indices, bias, k, scores, label_ids, ex);
  }
  return (int)cudaErrorInvalidValue;
}
