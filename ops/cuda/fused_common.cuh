// Pieces shared by the fused loss and top-k CUDA kernels (fused_loss.cu, fused_topk.cu): the logits tile of one
// label block for one row tile, computed in shared memory and registers, never written to global memory.
//
// A block of THREADS threads works on LB labels of one group (l0 .. l0 + nl) and RT rows (b0 .. b0 + rt). The
// group's F inputs are gathered TC at a time into xs [TC][RT + 1], the weights into ws [LB][TC + 1]; each thread
// holds 2 labels x 4 rows of the tile in registers: labels 2 * (tid / 16) + i, rows tid % 16 + 16 * j.
// Plain FMA in the accumulation type (float, or double for float64): simple and deterministic; these kernels do
// not use tensor cores.
#pragma once

#include <stdlib.h>

#include "gsffi_common.cuh"

namespace xmc_cuda {
namespace fused {

constexpr int THREADS = 256;
constexpr int LB = 32;  // labels per block
constexpr int TC = 64;  // input features per chunk
constexpr int RT = 64;  // rows per tile
constexpr int XS = TC * (RT + 1), WS = LB * (TC + 1), ZS = LB * (RT + 1);

template <class T> using Acc = typename AccT<T>::type;

__device__ __forceinline__ int tile_label(int i) { return 2 * (threadIdx.x / 16) + i; }
__device__ __forceinline__ int tile_row(int j) { return threadIdx.x % 16 + 16 * j; }

// xs[t][r] = x[b0 + r, ix[t0 + t]] for t < tc, r < rt, zero elsewhere. Starts and ends with a barrier.
template <class T>
__device__ void load_x_chunk(const T *x, int64_t H, const int32_t *ix, int64_t F, int64_t t0, int64_t b0, int rt,
                             Acc<T> *xs) {
  const int tc = (int)xmin<int64_t>(TC, F - t0);
  __syncthreads();
  for (int e = threadIdx.x; e < TC * RT; e += THREADS) {
    const int t = e % TC, r = e / TC;
    xs[t * (RT + 1) + r] = t < tc && r < rt ? to_acc(x[(b0 + r) * H + ix[t0 + t]]) : Acc<T>(0);
  }
  __syncthreads();
}

// ws[l][t] = w[l0 + l, t0 + t] for l < nl, t < tc, zero elsewhere. Ends with a barrier.
template <class T>
__device__ void load_w_chunk(const T *w, int64_t F, int64_t l0, int nl, int64_t t0, Acc<T> *ws) {
  const int tc = (int)xmin<int64_t>(TC, F - t0);
  for (int e = threadIdx.x; e < LB * TC; e += THREADS) {
    const int l = e / TC, t = e % TC;
    ws[l * (TC + 1) + t] = t < tc && l < nl ? to_acc(w[(l0 + l) * F + t0 + t]) : Acc<T>(0);
  }
  __syncthreads();
}

// z[i][j] = logit of (tile_label(i), tile_row(j)); zero outside nl x rt. xs ends holding the last F chunk.
template <class T>
__device__ void logits_tile(const T *x, int64_t H, const T *w, int64_t F, const int32_t *ix, const T *bias,
                            int64_t l0, int nl, int64_t b0, int rt, Acc<T> *xs, Acc<T> *ws, Acc<T> z[2][4]) {
  using A = Acc<T>;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const A b = bias && tile_label(i) < nl ? to_acc(bias[l0 + tile_label(i)]) : A(0);
#pragma unroll
    for (int j = 0; j < 4; ++j) z[i][j] = b;
  }
  for (int64_t t0 = 0; t0 < F; t0 += TC) {
    load_x_chunk(x, H, ix, F, t0, b0, rt, xs);
    load_w_chunk(w, F, l0, nl, t0, ws);
    const int tc = (int)xmin<int64_t>(TC, F - t0);
    for (int t = 0; t < tc; ++t) {
      const A a0 = ws[tile_label(0) * (TC + 1) + t], a1 = ws[tile_label(1) * (TC + 1) + t];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const A v = xs[t * (RT + 1) + tile_row(j)];
        z[0][j] += a0 * v;
        z[1][j] += a1 * v;
      }
    }
  }
}

// The label block's first label and size; nl <= 0 for the empty trailing blocks of a group narrower than LB.
struct LabelBlock {
  int64_t g, l0;
  int nl;
};
__device__ __forceinline__ LabelBlock label_block(int64_t id, int64_t L, int64_t G) {
  const int64_t per_group = (G + LB - 1) / LB, g = id / per_group, l0 = g * G + (id % per_group) * LB;
  return {g, l0, (int)(xmin<int64_t>(xmin<int64_t>(l0 + LB, (g + 1) * G), L) - l0)};
}

// Labels per chunk of the tensor-core paths (bf16/fp16), which run the layer's forward kernel into a [B, nl]
// scratch buffer one chunk at a time: whole groups, a multiple of 8 labels where G allows, about
// XMC_FUSED_CHUNK_MB (for tuning) of 16-bit logits. Default 128 MB: on the H100 at (256, 3M, 64, 32), 32 MB
// chunks (which stay in L2) took 10.5 ms per step, 64 MB 9.0, 128 MB 7.5, 256 MB 7.5 (each chunk has a fixed
// cost: the grad_input blocks fill and write back their [64, H] fp32 accumulators per launch).
inline int64_t chunk_bytes() {
  const char *v = getenv("XMC_FUSED_CHUNK_MB");
  const int64_t mb = v ? atoll(v) : 0;
  return (mb > 0 ? mb : 128) << 20;
}
inline int64_t chunk_labels(xmc_gsffi_shape s) {
  const int64_t bytes = chunk_bytes();
  const int64_t G = s.group_size, unit = G % 8 == 0 ? G : G * 8;
  int64_t nl = xmax<int64_t>(1, bytes / (2 * xmax<int64_t>(s.batch, 1)) / unit) * unit;
  // Up to whole waves of groups (SMs x 8: the weight gradient's warps, and the forward's at two batch tiles),
  // where that adds at most an eighth: each chunk's kernels then end without a part-empty last wave (at
  // (256, 3M, 64, 32), 8448 groups per chunk instead of 7812: step -2%).
  const int64_t wave = (int64_t)num_sms() * 8 * G, up = (nl + wave - 1) / wave * wave;
  if (G % 8 == 0 && up <= nl + nl / 8) nl = up;
  return xmin<int64_t>(nl, (s.out_features + G - 1) / G * G);
}

}  // namespace fused
}  // namespace xmc_cuda
