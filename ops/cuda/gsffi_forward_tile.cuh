// The tensor-core forward's work per block (fwd_mma_tile) and its pieces, shared by the forward kernel
// (gsffi_forward.cu, where the layout and the modes are described) and the fused top-k's exact pass
// (fused_topk.cu).
#pragma once

#include "gsffi_common.cuh"
#include "loss_term.cuh"

namespace xmc_cuda {

constexpr int kFwdThreads = 512;
// A warp's 8 x NW output staging tile (NW <= 32): rows of 64 bytes, the 16-byte chunk c of row r at chunk
// c ^ out_swz(r). The 4-byte writes (8 rows x 4 lanes per instruction) and the 16-byte reads (two rows per
// quarter-warp for NW = 32, four half rows for NW = 16) then each fall on distinct banks; the earlier 80-byte
// rows made every 16-byte read take two wavefronts (ncu: 12 M for 6 M ideal per read instruction).
constexpr int kStageRow = 32 * 2;
constexpr size_t stage_bytes(int threads) { return (size_t)threads / 32 * 8 * kStageRow; }

__device__ __forceinline__ int out_swz(int r) { return ((r >> 1) & 1) << 1 | (r >> 2); }  // bits of r >> 1 reversed

__device__ __forceinline__ float max_nan(float a, float b) {  // NaN if either is
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// The value that a logit has once stored in T.
__device__ __forceinline__ float rounded(__nv_bfloat16, float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float rounded(__half, float v) { return __half2float(__float2half_rn(v)); }

// A warp item's operands: its labels' weights as mma B fragments (lane: label nt * 8 + r4, physical k from
// 8 q), the ldmatrix row addresses of its group's features (fan-in slots past F read the zero row H), and the
// biases of the thread's output columns 2 q, 2 q + 1 of each 8-label tile. An item with all NW labels and
// F = 32 KC takes one base address per operand and compile-time offsets (~50 instructions instead of ~290 with
// the bounds checks); the rest go element by element.
template <class T, int NW, int KC>
__device__ __forceinline__ void load_item(const T *__restrict__ w, const int32_t *__restrict__ idx,
                                          const T *__restrict__ bias, int64_t g, int64_t l0, int64_t lend, int F,
                                          int H, int stride, uint32_t xs_base, int q, int r4, int kperm,
                                          bool bias_pairs, uint4 (&wf)[NW / 8][KC], uint32_t (&aoff)[KC][2],
                                          float (&bia)[NW / 8][2]) {
  constexpr int FC = KC * 32;
  if (F == FC && l0 + NW <= lend) {
    const T *wb = w + (l0 + r4) * FC + 8 * q;
#pragma unroll
    for (int nt = 0; nt < NW / 8; ++nt)
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) wf[nt][kc] = ldg16(wb + nt * 8 * FC + kc * 32);
    const int32_t *ib = idx + g * FC + kperm;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
#pragma unroll
      for (int s = 0; s < 2; ++s) aoff[kc][s] = xs_base + (uint32_t)__ldg(ib + kc * 32 + 4 * s) * stride;
    if (bias != nullptr && bias_pairs) {
#pragma unroll
      for (int nt = 0; nt < NW / 8; ++nt) {
        const float2 b = unpack2(T(), __ldg(reinterpret_cast<const unsigned *>(bias + l0 + nt * 8 + 2 * q)));
        bia[nt][0] = b.x;
        bia[nt][1] = b.y;
      }
      return;
    }
  } else {
#pragma unroll
    for (int nt = 0; nt < NW / 8; ++nt) {
      const int64_t l = l0 + nt * 8 + r4;
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        const int k = kc * 32 + 8 * q;
        wf[nt][kc] = (l < lend && k < F) ? ldg16(w + l * F + k) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int p = kc * 32 + 4 * s + kperm;
        const int h = p < F ? __ldg(idx + g * F + p) : H;
        aoff[kc][s] = xs_base + (uint32_t)h * stride;
      }
  }
#pragma unroll
  for (int nt = 0; nt < NW / 8; ++nt)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t l = l0 + nt * 8 + 2 * q + j;
      bia[nt][j] = (bias != nullptr && l < lend) ? to_acc(bias[l]) : 0.f;
    }
}

// The largest of the thread's NW / 4 logits (accumulators plus biases) of row half hh, NaN if any is: a pairwise
// tree, not a chain of NW / 4 dependent maxima.
template <int NW>
__device__ __forceinline__ float row_max(const float (&acc)[NW / 8][4], const float (&bia)[NW / 8][2], int hh) {
  float part[NW / 8];
#pragma unroll
  for (int nt = 0; nt < NW / 8; ++nt)
    part[nt] = max_nan(acc[nt][2 * hh] + bia[nt][0], acc[nt][2 * hh + 1] + bia[nt][1]);
#pragma unroll
  for (int w = 1; w < NW / 8; w *= 2)
#pragma unroll
    for (int nt = 0; nt + w < NW / 8; nt += 2 * w) part[nt] = max_nan(part[nt], part[nt + w]);
  return part[0];
}

// What a tensor-core forward launch produces: the logits; the filter's candidate lists; each work item's row
// maxima as keys; the loss gradients in place of the logits, and the loss terms' sum per block.
enum FwdOut { kLogits, kFilter, kChunkMax, kLossGrad };

// Loss-gradient mode: the mask words that hold bits l .. l + 7 (low first) of row b's positives, loaded raw so
// that the caller can load them well ahead of their use (positives8 then takes the 8 bits). The mask's words hold
// 32 labels each, and l is a multiple of 8 only where G is.
struct PosWords {
  uint32_t lo, hi;
};
__device__ __forceinline__ PosWords positive_words(const FwdLoss &lg, int64_t b, int64_t l) {
  const uint32_t *wp = lg.bits + b * lg.words + (l >> 5);
  const bool two = (l & 31) > 24 && (l >> 5) + 1 < lg.words;
  return {__ldg(wp), two ? __ldg(wp + 1) : 0u};
}
__device__ __forceinline__ uint32_t positives8(PosWords p, int64_t l) {
  const int sh = (int)(l & 31);
  return sh > 24 ? (p.lo >> sh) | (p.hi << (32 - sh)) : p.lo >> sh;
}

// NW (labels per warp item) and KC (32-wide fan-in chunks) of the tensor-core forward for shape s, and its batch
// tile (0 where the shape takes the generic kernel).
void mma_sizes(xmc_gsffi_shape s, int *nw, int *kc);
int tensor_core_tile(xmc_gsffi_shape s, const void *w);
// X(NW, KC) for every pair that mma_sizes picks.
#define XMC_FWD_SIZES(X) X(8, 1) X(16, 1) X(32, 1) X(8, 2) X(16, 2) X(32, 2) X(8, 4) X(16, 4) X(32, 4) X(8, 8) X(16, 8)

// A tensor-core forward launch's arguments (fwd_args fills them for a shape).
template <class T>
struct FwdArgs {
  const T *x, *w;
  const int32_t *idx;
  const T *bias;
  T *y;
  int64_t B, L, n_items;
  int H, F, G, BT, nbt, nj;
  bool x_vec, y_vec;
  FwdFilter flt;         // filter mode
  uint16_t *chunk_keys;  // chunk-maximum mode
  FwdLoss lg;            // loss-gradient mode
};

template <class T>
__host__ __device__ inline FwdArgs<T> fwd_args(xmc_gsffi_shape s, int NW, int BT, const void *x, const void *w,
                                               const int32_t *idx, const void *bias, void *y) {
  FwdArgs<T> a{};
  a.x = static_cast<const T *>(x);
  a.w = static_cast<const T *>(w);
  a.idx = idx;
  a.bias = static_cast<const T *>(bias);
  a.y = static_cast<T *>(y);
  a.B = s.batch;
  a.L = s.out_features;
  a.H = (int)s.in_features;
  a.F = (int)s.fan_in;
  a.G = (int)s.group_size;
  a.BT = BT;
  a.nbt = (int)((s.batch + BT - 1) / BT);
  a.nj = (int)((s.group_size + NW - 1) / NW);
  a.n_items = (s.out_features + s.group_size - 1) / s.group_size * a.nj;
  a.x_vec = s.in_features % 8 == 0 && (uintptr_t)x % 16 == 0;
  a.y_vec = s.out_features % 8 == 0 && s.group_size % 8 == 0 && (uintptr_t)y % 16 == 0;
  return a;
}

// Shared memory of a launch of `threads` threads: the x^T tile and the warps' staging tiles.
inline size_t fwd_smem(int64_t H, int BT, int threads = kFwdThreads) {
  return (size_t)(H + 1) * (BT * 2 + 16) + stage_bytes(threads);
}

// The work of block `block` of `nblocks` (a multiple of a.nbt); smem holds fwd_smem bytes.
template <class T, int NW, int KC, int MODE>
__device__ __forceinline__ void fwd_mma_tile(const FwdArgs<T> &a, int block, int nblocks, unsigned char *smem) {
  const T *__restrict__ x = a.x;
  const T *__restrict__ w = a.w;
  const int32_t *__restrict__ idx = a.idx;
  const T *__restrict__ bias = a.bias;
  T *__restrict__ y = a.y;
  const int64_t B = a.B, L = a.L, n_items = a.n_items;
  const int H = a.H, F = a.F, G = a.G, BT = a.BT, nbt = a.nbt, nj = a.nj;
  const bool x_vec = a.x_vec, y_vec = a.y_vec;
  const FwdFilter &flt = a.flt;
  uint16_t *chunk_keys = a.chunk_keys;
  const int stride = BT * 2 + 16;  // bytes per row; the 16-byte skew puts consecutive rows on other banks
  const int bt = block % nbt;
  const int64_t b0 = (int64_t)bt * BT;
  const int rows = (int)xmin<int64_t>(BT, B - b0);

  // Fill x^T: rows 0..H-1 from x, row H zeros (padded fan-in slots point there), columns >= rows zeros. Each
  // thread loads 8 pieces before it stores any: with one load at a time (the stores go through a generic
  // pointer, so the compiler keeps every load behind them) the fill waited ~24 L2 round trips per launch.
  const int hchunks = (H + 8) / 8, n_fill = BT * hchunks;  // 8 features per piece, row H included
  for (int e0 = threadIdx.x; e0 < n_fill; e0 += 8 * blockDim.x) {
    uint4 v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int e = e0 + i * blockDim.x, hc = e / BT, r = e - hc * BT, h0 = hc * 8;
      v[i] = make_uint4(0, 0, 0, 0);
      if (e < n_fill && r < rows && h0 < H) v[i] = load_elems<8>(x + (b0 + r) * H + h0, H - h0, x_vec);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int e = e0 + i * blockDim.x, hc = e / BT, r = e - hc * BT, h0 = hc * 8;  // r fastest: no bank shared
      const uint16_t *pv = reinterpret_cast<const uint16_t *>(&v[i]);
      if (e < n_fill)
#pragma unroll
        for (int k = 0; k < 8; ++k)
          if (h0 + k <= H) *reinterpret_cast<uint16_t *>(smem + (size_t)(h0 + k) * stride + r * 2) = pv[k];
    }
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane & 3, r4 = lane >> 2;
  const int nwarps = blockDim.x >> 5;
  const int64_t wstride = (int64_t)(nblocks / nbt) * nwarps;
  // ldmatrix.x4.trans: lane 8i + r gives row r of matrix i; i & 1 picks the batch half, i >> 1 the k half.
  const int kappa = ((lane >> 4) << 3) | (lane & 7);
  const int kperm = 8 * ((kappa & 7) >> 1) + 2 * (kappa >> 3) + (kappa & 1);
  const uint32_t xs_base = (uint32_t)__cvta_generic_to_shared(smem) + ((lane >> 3) & 1) * 16;
  const int mtiles = (rows + 15) >> 4;
  unsigned char *stage = smem + (size_t)(H + 1) * stride + warp * 8 * kStageRow;

  // Filter mode: each row's threshold and its lowered screen value, in the staging area that this mode does not
  // use (rows past the batch never pass the screen).
  const float2 *thr = reinterpret_cast<const float2 *>(smem + (size_t)(H + 1) * stride);
  if constexpr (MODE == kFilter) {
    for (int r = threadIdx.x; r < BT; r += blockDim.x) {
      float2 t = make_float2(INFINITY, INFINITY);
      if (r < rows) {
        // The screen threshold is lowered by more than the rounding to T can move a value (2^-7 relative, and
        // fp16's smallest subnormal).
        t.y = __ldg(flt.tau + b0 + r);
        t.x = t.y - fabsf(t.y) * 0x1p-7f - 1e-7f;
      }
      reinterpret_cast<float2 *>(smem + (size_t)(H + 1) * stride)[r] = t;
    }
    __syncthreads();
  }

  // The work items as (group g, slice j of NW labels), advanced by the warp-grid stride with no 64-bit division.
  int64_t item = (int64_t)(block / nbt) * nwarps + warp;
  int64_t g = item / nj;
  int j = (int)(item - g * nj);
  const int64_t gstep = wstride / nj;
  const int jstep = (int)(wstride - gstep * nj);
  const bool bias_pairs = (G & 1) == 0 && (reinterpret_cast<uintptr_t>(bias) & 3) == 0;
  double lane_loss = 0;  // loss-gradient mode: this lane's loss terms, a float sum per item
  for (; item < n_items; item += wstride, g += gstep, j += jstep) {
    if (j >= nj) j -= nj, ++g;
    const int64_t l0 = g * G + (int64_t)j * NW;
    const int64_t lend = xmin<int64_t>(g * G + G, L);

    uint4 wf[NW / 8][KC];
    uint32_t aoff[KC][2];
    float bia[NW / 8][2], item_loss = 0.f;
    load_item<T, NW, KC>(w, idx, bias, g, l0, lend, F, H, stride, xs_base, q, r4, kperm, bias_pairs, wf, aoff, bia);
    if constexpr (MODE == kChunkMax)  // columns past the item's labels never win a maximum
      if (l0 + NW > lend)
#pragma unroll
        for (int nt = 0; nt < NW / 8; ++nt)
#pragma unroll
          for (int j = 0; j < 2; ++j)
            if (l0 + nt * 8 + 2 * q + j >= lend) bia[nt][j] = -INFINITY;

    // Loss-gradient mode: the mask words of the 8 labels this lane stores, loaded one m-tile ahead and taken
    // apart only where used (ncu: 34% of the stall samples sat on this load's use when it was loaded at the
    // top of its own m-tile, which its products did not cover).
    const int64_t pos_l = l0 + lane % (NW / 8) * 8;
    PosWords pos_nx[2] = {{0u, 0u}, {0u, 0u}};
    auto load_pos = [&](int mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = mt * 16 + 8 * hh + lane / (NW / 8);
        pos_nx[hh] = PosWords{0u, 0u};
        if (lane < NW && row < rows && pos_l < lend) pos_nx[hh] = positive_words(a.lg, b0 + row, pos_l);
      }
    };
    if constexpr (MODE == kLossGrad) load_pos(0);
    for (int mt = 0; mt < mtiles; ++mt) {
      float2 taus[2];  // filter mode: the rows' thresholds, loaded before the products need them
      if constexpr (MODE == kFilter)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) taus[hh] = thr[mt * 16 + 8 * hh + r4];
      PosWords pos8[2];
      if constexpr (MODE == kLossGrad) {
        pos8[0] = pos_nx[0];
        pos8[1] = pos_nx[1];
        if (mt + 1 < mtiles) load_pos(mt + 1);
      }
      float acc[NW / 8][4];
#pragma unroll
      for (int nt = 0; nt < NW / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < KC; ++kc)
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          uint32_t a[4];
          ldsm_x4_trans(a, aoff[kc][s] + mt * 32);
#pragma unroll
          for (int nt = 0; nt < NW / 8; ++nt)
            mma16816(T(), acc[nt], a, s ? wf[nt][kc].z : wf[nt][kc].x, s ? wf[nt][kc].w : wf[nt][kc].y);
        }
      if constexpr (MODE == kChunkMax) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const float mine = row_max<NW>(acc, bia, hh);  // then the item's, over the row's 4 lanes
          float top = max_nan(mine, __shfl_xor_sync(0xffffffffu, mine, 1));
          top = max_nan(top, __shfl_xor_sync(0xffffffffu, top, 2));
          const int row = mt * 16 + 8 * hh + r4;
          if (q == 0 && row < rows)
            chunk_keys[(b0 + row) * n_items + item] = (uint16_t)rank_key<T>(bits16(T(), top));
        }
      } else if constexpr (MODE == kFilter) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          // First the largest of the thread's logits of this row against the lowered threshold.
          const int row = mt * 16 + 8 * hh + r4;
          if (row_max<NW>(acc, bia, hh) < taus[hh].x || row >= rows) continue;
          const float tau = taus[hh].y;
#pragma unroll
          for (int nt = 0; nt < NW / 8; ++nt)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const int64_t l = l0 + nt * 8 + 2 * q + j;
              const float v = rounded(T(), acc[nt][2 * hh + j] + bia[nt][j]);
              if (l < lend && !(v < tau)) {  // NaN passes: it ranks above every number
                const int64_t pos = (int64_t)atomicAdd(flt.count + b0 + row, 1ull);
                if (pos < flt.cap) {
                  flt.score[(b0 + row) * flt.cap + pos] = v;
                  flt.id[(b0 + row) * flt.cap + pos] = l;
                }
              }
            }
        }
      } else {
        // Through a per-warp staging tile, so that each row's NW labels leave in one instruction as whole
        // 32-byte sectors (2-label stores left half-written sectors that L2 wrote back partially).
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
          for (int nt = 0; nt < NW / 8; ++nt)
            *reinterpret_cast<uint32_t *>(stage + r4 * kStageRow + ((nt ^ out_swz(r4)) << 4) + 4 * q) =
                pack2(T(), acc[nt][2 * hh] + bia[nt][0], acc[nt][2 * hh + 1] + bia[nt][1]);
          __syncwarp();
          if (lane < NW) {
            const int r8 = lane / (NW / 8), c = lane % (NW / 8);
            const int row = mt * 16 + 8 * hh + r8;
            const int64_t l = l0 + c * 8;
            if (row < rows && l < lend) {
              uint4 v = *reinterpret_cast<const uint4 *>(stage + r8 * kStageRow + ((c ^ out_swz(r8)) << 4));
              if constexpr (MODE == kLossGrad) {
                const int n = (int)xmin<int64_t>(8, lend - l);
                v = a.lg.kind == XMC_LOSS_BCE
                        ? loss_grad8<T, XMC_LOSS_BCE>(v, positives8(pos8[hh], l), n, a.lg.zscale, item_loss)
                        : loss_grad8<T, XMC_LOSS_SQUARED_HINGE>(v, positives8(pos8[hh], l), n, a.lg.zscale,
                                                                 item_loss);
              }
              T *dst = y + (b0 + row) * L + l;
              if (y_vec && l + 8 <= lend) {
                __stcs(reinterpret_cast<uint4 *>(dst), v);
              } else {
#pragma unroll
                for (int e = 0; e < 8; ++e)
                  if (l + e < lend)
                    reinterpret_cast<uint16_t *>(dst)[e] = (uint16_t)(word(v, e >> 1) >> (16 * (e & 1)));
              }
            }
          }
          __syncwarp();
        }
      }
    }
    lane_loss += item_loss;
  }
  if constexpr (MODE == kLossGrad) {  // the block's sum in a fixed order: lanes by a butterfly, then warps
    double sum = lane_loss;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    double *red = reinterpret_cast<double *>(smem + (size_t)(H + 1) * stride);
    __syncthreads();  // every warp is done with its staging tile
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0;
      for (int w = 0; w < nwarps; ++w) total += red[w];
      a.lg.part[block] = total;
    }
  }
}

}  // namespace xmc_cuda
