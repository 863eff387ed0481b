// GSFFI weight gradient on CUDA: grad_w[l, t] = sum_b grad_y[b, l] * x[b, indices[l / G, t]].
//
// Tensor-core path (bf16/fp16): per group, grad_w_g (labels x slots) = grad_y_g^T (labels x B) @ x_g (B x slots),
// summed over the whole batch inside one warp, so every weight gradient is written once, with no partial sums.
// x is first transposed into scratch, x^T [H, B rounded up to 32, zero padded], so the gathered operand
// (slot t -> row indices[g, t] of x^T) is a run of consecutive batch entries: 16-byte loads give the B
// fragments directly. grad_y rows are taken 2-16 labels wide and turned into A fragments by byte permutes
// (an A k pair spans two batch rows). A warp item is (group, label chunk, slot chunk), slot chunk fastest, so
// the warps that share a group's grad_y run side by side and hit L1/L2. Where grad_y comes in whole 16-byte
// pieces, each warp streams its operands through its own cp.async ring in shared memory (dw_mma_ring);
// otherwise they are loaded straight into registers, two chunks ahead (dw_mma).
//
// The bias gradient, grad_b[l] = sum_b grad_y[b, l], can come out of the same pass: the warp that holds a
// label chunk's grad_y fragments for slot chunk 0 adds one more mma per tile with an all-ones B operand, so
// grad_y is read once for both (as a separate reduction it was another pass over the B x L gradient).
#include "gsffi_common.cuh"

namespace xmc_cuda {
namespace {

// 16-bit elements moved as raw bits.
__global__ void transpose_pad(const uint16_t *__restrict__ x, uint16_t *__restrict__ xt, int64_t B, int64_t Bp,
                              int64_t H) {
  pdl_begin();  // launched with launch_pdl
  __shared__ uint16_t tile[32][33];
  const int64_t h0 = blockIdx.x * 32LL, b0 = blockIdx.y * 32LL;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t b = b0 + i, h = h0 + threadIdx.x;
    tile[i][threadIdx.x] = (b < B && h < H) ? x[b * H + h] : uint16_t(0);
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t h = h0 + i, b = b0 + threadIdx.x;
    if (h < H && b < Bp) xt[h * Bp + b] = tile[threadIdx.x][i];
  }
}

constexpr int kDwThreads = 256;

// A warp item of the tensor-core kernels: group g, label chunk lc (8 LW labels from l0), slot chunk sc (8 NTW
// slots from s0); item index = (g * nlc + lc) * nsc + sc, slot chunk fastest.
struct DwItem {
  int64_t g, l0, lend;
  int s0;
  bool first_slots;  // sc == 0: this item's warp also sums the bias gradient of its labels
};
template <int LW, int NTW>
__device__ __forceinline__ DwItem dw_item(int64_t item, int64_t L, int G, int nlc, int nsc) {
  const int64_t g = item / (nlc * nsc);
  const int rem = (int)(item - g * nlc * nsc), lc = rem / nsc, sc = rem - lc * nsc;
  const int64_t lg = g * G;
  return {g, lg + (int64_t)lc * 8 * LW, xmin<int64_t>(lg + G, L), sc * 8 * NTW, sc == 0};
}

// One 32-row batch chunk of grad_w_g += grad_y_g^T x_g (and of the bias row sums): dd[v] holds this lane's LW
// labels (from LW r4) of batch row 8 q + v of the chunk, xx[nt] the 8 batch entries 8 q .. 8 q + 7 of slot
// 8 nt + r4 (the k relabelling of gsffi_common.cuh).
// Its k half s (batch rows 8 q + 4 s .. + 3: dd[4 s ..], words 2 s, 2 s + 1 of xx) is dw_half, which the ring
// kernel calls with only that half's operands loaded (its 128 accumulators leave no registers for both).
template <class T, int LW, int NTW>
__device__ __forceinline__ void dw_half(float (&acc)[LW / 2][NTW][4], float (&accb)[LW / 2][4], const uint4 *dd,
                                        const uint2 (&xx)[NTW], bool with_b) {
  const uint32_t ones = pack2(T(), 1.f, 1.f);
#pragma unroll
  for (int mt = 0; mt < LW / 2; ++mt) {
    // row m = r4 is label LW r4 + 2 mt (low halves), m + 8 the next label (high halves)
    const uint32_t a[4] = {halves(word(dd[0], mt), word(dd[1], mt), false),
                           halves(word(dd[0], mt), word(dd[1], mt), true),
                           halves(word(dd[2], mt), word(dd[3], mt), false),
                           halves(word(dd[2], mt), word(dd[3], mt), true)};
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) mma16816(T(), acc[mt][nt], a, xx[nt].x, xx[nt].y);
    if (with_b) mma16816(T(), accb[mt], a, ones, ones);
  }
}
template <class T, int LW, int NTW>
__device__ __forceinline__ void dw_chunk(float (&acc)[LW / 2][NTW][4], float (&accb)[LW / 2][4], const uint4 (&dd)[8],
                                         const uint4 (&xx)[NTW], bool with_b) {
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    uint2 xs[NTW];
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) xs[nt] = make_uint2(word(xx[nt], 2 * s), word(xx[nt], 2 * s + 1));
    dw_half<T, LW, NTW>(acc, accb, dd + 4 * s, xs, with_b);
  }
}

// Writes an item's weight gradient (and, with with_b, its labels' bias gradient) from the accumulators.
template <class T, int LW, int NTW>
__device__ __forceinline__ void dw_store(const float (&acc)[LW / 2][NTW][4], const float (&accb)[LW / 2][4],
                                         const DwItem &it, int F, bool with_b, T *__restrict__ gw,
                                         T *__restrict__ gb) {
  const int lane = threadIdx.x & 31, q = lane & 3, r4 = lane >> 2;
  const int64_t lane_l = it.l0 + LW * r4;
#pragma unroll
  for (int mt = 0; mt < LW / 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) {
      const int t = it.s0 + nt * 8 + 2 * q;
      if (t >= F) continue;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int64_t l = lane_l + 2 * mt + hh;
        if (l < it.lend)
          *reinterpret_cast<uint32_t *>(gw + l * F + t) = pack2(T(), acc[mt][nt][2 * hh], acc[mt][nt][2 * hh + 1]);
      }
    }
  if (with_b && q == 0) {
#pragma unroll
    for (int mt = 0; mt < LW / 2; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int64_t l = lane_l + 2 * mt + hh;
        if (l < it.lend) put(gb + l, accb[mt][2 * hh]);
      }
  }
}

template <int LW, int NTW>
__device__ __forceinline__ void dw_zero(float (&acc)[LW / 2][NTW][4], float (&accb)[LW / 2][4]) {
#pragma unroll
  for (int mt = 0; mt < LW / 2; ++mt) {
    accb[mt][0] = accb[mt][1] = accb[mt][2] = accb[mt][3] = 0.f;
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
  }
}

// LW labels per lane load (label chunk = 8 LW labels, LW / 2 m16 tiles), NTW n8 tiles of slots. The operands
// come straight from global memory into registers, two chunks in flight per warp: the path for grad_y that
// is not 16-byte aligned (dw_mma_ring below takes the rest).
template <class T, int LW, int NTW>
__global__ void __launch_bounds__(kDwThreads, 1)
    dw_mma(const T *__restrict__ dy, const T *__restrict__ xt, const int32_t *__restrict__ idx, T *__restrict__ gw,
           T *__restrict__ gb, int64_t B, int64_t Bp, int64_t L, int F, int G, int nlc, int nsc, int64_t n_items,
           bool dy_vec) {
  pdl_begin();  // launched with launch_pdl
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane & 3, r4 = lane >> 2;
  const int64_t wstride = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t item = (int64_t)blockIdx.x * (blockDim.x >> 5) + warp; item < n_items; item += wstride) {
    const DwItem it = dw_item<LW, NTW>(item, L, G, nlc, nsc);
    const int64_t lane_l = it.l0 + LW * r4;  // this lane's first label in grad_y loads
    const T *xrow[NTW];
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) {
      const int t = it.s0 + nt * 8 + r4;
      xrow[nt] = t < F ? xt + (int64_t)__ldg(idx + it.g * F + t) * Bp + 8 * q : nullptr;
    }
    float acc[LW / 2][NTW][4], accb[LW / 2][4];  // accb: row sums of the grad_y tile (every column the same)
    const bool with_b = gb != nullptr && it.first_slots;
    dw_zero<LW, NTW>(acc, accb);

    // Chunk kb + 32's loads are issued before chunk kb's arithmetic (two register stages), so each warp
    // keeps two chunks of grad_y and gathered x in flight: the kernel waited on load latency before.
    uint4 d[2][8], xv[2][NTW];
    auto load_chunk = [&](uint4 (&dd)[8], uint4 (&xx)[NTW], int64_t kb) {
#pragma unroll
      for (int v = 0; v < 8; ++v) {
        const int64_t b = kb + 8 * q + v;
        dd[v] = b < B ? load_elems<LW>(dy + b * L + lane_l, it.lend - lane_l, dy_vec) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int nt = 0; nt < NTW; ++nt)
        xx[nt] = xrow[nt] != nullptr && kb < B ? ldg16(xrow[nt] + kb) : make_uint4(0, 0, 0, 0);
    };
    load_chunk(d[0], xv[0], 0);
    for (int64_t kb = 0; kb < B; kb += 64) {
      load_chunk(d[1], xv[1], kb + 32);
      dw_chunk<T, LW, NTW>(acc, accb, d[0], xv[0], with_b);
      if (kb + 64 < B) load_chunk(d[0], xv[0], kb + 64);
      if (kb + 32 < B) dw_chunk<T, LW, NTW>(acc, accb, d[1], xv[1], with_b);
    }
    dw_store<T, LW, NTW>(acc, accb, it, F, with_b, gw, gb);
  }
}

// dw_mma with a ring of shared stages per warp: each warp streams its items' 32-row batch chunks (grad_y
// 32 x 8 LW labels, then x^T 8 NTW slots x 32 batch entries) into its own NS stages with cp.async, NS - 1 chunks
// ahead and straight on across its items, so the loads in flight no longer drain at every item's start and end
// and cost no registers. Each lane reads back exactly the fragments dw_mma loads (same words, same k order),
// so the two kernels agree bitwise. Needs grad_y rows and label groups in whole 16-byte pieces (L, G multiples
// of 8, grad_y 16-byte aligned).
//
// A stage's grad_y row r (16 LW bytes) sits at row r ^ ((r >> 3) & (8 / LW - 1)): the 4 rows 8 q + v that one
// fragment read takes then fall on different banks (2 LW-byte reads, 8 lanes per row). x^T rows are 64 bytes,
// slot after slot: a fragment read is 512 contiguous bytes.
template <int LW, int NTW>
struct DwRing {
  static constexpr int kDyBytes = 32 * 16 * LW, kStage = kDyBytes + 8 * NTW * 64;
  static __device__ __forceinline__ int dy_row(int r) { return r ^ ((r >> 3) & (8 / LW - 1)); }
};

template <class T, int LW, int NTW, int NS>
__global__ void __launch_bounds__(kDwThreads, 1)
    dw_mma_ring(const T *__restrict__ dy, const T *__restrict__ xt, const int32_t *__restrict__ idx,
                T *__restrict__ gw, T *__restrict__ gb, int64_t B, int64_t Bp, int64_t L, int F, int G, int nlc,
                int nsc, int64_t n_items) {
  pdl_begin();  // launched with launch_pdl
  using Ring = DwRing<LW, NTW>;
  extern __shared__ __align__(16) unsigned char dw_stages[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane & 3, r4 = lane >> 2;
  const int64_t wstride = (int64_t)gridDim.x * (kDwThreads / 32);
  const int nkb = (int)((B + 31) / 32);
  const uint32_t ring = (uint32_t)__cvta_generic_to_shared(dw_stages) + (uint32_t)(warp * NS * Ring::kStage);

  // Copy side: chunk p_kb of item p_item goes to stage p_slot. This lane's grad_y pieces are rows
  // lane / LW + (32 / LW) j of the chunk, labels 8 (lane % LW) .. + 7 of the item's; its x^T pieces are
  // slots lane / 4 + 8 j of the item's, batch entries 8 (lane % 4) .. + 7 of the chunk.
  int64_t p_item = (int64_t)blockIdx.x * (kDwThreads / 32) + warp;
  int p_kb = 0, p_slot = 0, p_nlab = 0;
  const T *p_dy = dy;
  int32_t c_ids[NTW];  // p_item's feature ids (-1 past F): 32-bit, where pointers took twice the registers
  // The feature ids of the item after p_item (-1 past F), loaded one item ahead: loaded where their x^T
  // addresses were needed, their latency stalled the copy side once per item (ncu: 38% of the stall samples;
  // A/B: -2.5% at (256, 3M, 64, 32), -22% at (64, 670080, 64, 16)).
  int32_t p_ids[NTW];
  auto load_ids = [&](int64_t item) {
#pragma unroll
    for (int j = 0; j < NTW; ++j) p_ids[j] = -1;
    if (item >= n_items) return;
    const DwItem it = dw_item<LW, NTW>(item, L, G, nlc, nsc);
#pragma unroll
    for (int j = 0; j < NTW; ++j) {
      const int t = it.s0 + lane / 4 + 8 * j;
      if (t < F) p_ids[j] = __ldg(idx + it.g * F + t);
    }
  };
  auto start_item = [&]() {
    if (p_item >= n_items) return;
    const DwItem it = dw_item<LW, NTW>(p_item, L, G, nlc, nsc);
    const int64_t l = it.l0 + 8 * (lane % LW);
    p_nlab = (int)xmax<int64_t>(0, xmin<int64_t>(8, it.lend - l));
    p_dy = dy + (lane / LW) * L + l;
#pragma unroll
    for (int j = 0; j < NTW; ++j) c_ids[j] = p_ids[j];
    load_ids(p_item + wstride);
  };
  auto issue = [&]() {
    if (p_item < n_items) {
      const uint32_t sb = ring + (uint32_t)(p_slot * Ring::kStage);
      const int64_t kb = (int64_t)p_kb * 32;
#pragma unroll
      for (int j = 0; j < LW; ++j) {
        const int r = lane / LW + (32 / LW) * j;
        const bool ok = kb + r < B && p_nlab > 0;
        cp_async16(sb + Ring::dy_row(r) * 16 * LW + 16 * (lane % LW), ok ? p_dy + (kb + (32 / LW) * j) * L : dy,
                   ok ? 2 * p_nlab : 0);
      }
#pragma unroll
      for (int j = 0; j < NTW; ++j)
        cp_async16(sb + Ring::kDyBytes + (lane / 4 + 8 * j) * 64 + 16 * (lane & 3),
                   c_ids[j] >= 0 ? xt + (int64_t)c_ids[j] * Bp + 8 * (lane & 3) + kb : xt, c_ids[j] >= 0 ? 16 : 0);
      if (++p_kb == nkb) {
        p_kb = 0;
        p_item += wstride;
        start_item();
      }
    }
    cp_async_commit();
    p_slot = p_slot + 1 == NS ? 0 : p_slot + 1;
  };

  load_ids(p_item);
  start_item();
#pragma unroll
  for (int k = 0; k < NS - 1; ++k) issue();
  int slot = 0;
  for (int64_t item = (int64_t)blockIdx.x * (kDwThreads / 32) + warp; item < n_items; item += wstride) {
    const DwItem it = dw_item<LW, NTW>(item, L, G, nlc, nsc);
    const bool with_b = gb != nullptr && it.first_slots;
    float acc[LW / 2][NTW][4], accb[LW / 2][4];
    dw_zero<LW, NTW>(acc, accb);
    for (int kb = 0; kb < nkb; ++kb) {
      cp_async_wait<NS - 2>();
      __syncwarp();  // every lane's copies of this stage are in; every lane is done with the stage issue() refills
      issue();
      const uint32_t sb = ring + (uint32_t)(slot * Ring::kStage);
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        uint4 dd[4];
        uint2 xx[NTW];
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const uint32_t a = sb + Ring::dy_row(8 * q + 4 * s + v) * 16 * LW + 2 * LW * r4;
          if (LW == 8) dd[v] = lds_u32x4(a);
          if (LW == 4) { const uint2 u = lds_u32x2(a); dd[v] = make_uint4(u.x, u.y, 0, 0); }
          if (LW == 2) dd[v] = make_uint4((uint32_t)lds_i32(a), 0, 0, 0);
        }
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt) xx[nt] = lds_u32x2(sb + Ring::kDyBytes + (8 * nt + r4) * 64 + 16 * q + 8 * s);
        dw_half<T, LW, NTW>(acc, accb, dd, xx, with_b);
      }
      slot = slot + 1 == NS ? 0 : slot + 1;
    }
    dw_store<T, LW, NTW>(acc, accb, it, F, with_b, gw, gb);
  }
  cp_async_wait<0>();
}

// Bias gradient where the weight gradient has no tensor-core pass to share: one thread per label, l fastest.
template <class T>
__global__ void db_generic(const T *__restrict__ dy, T *__restrict__ gb, int64_t B, int64_t L) {
  using A = typename AccT<T>::type;
  for (int64_t l = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; l < L; l += (int64_t)gridDim.x * blockDim.x) {
    A s = 0;
    for (int64_t b = 0; b < B; ++b) s += (A)to_acc(dy[b * L + l]);
    put(gb + l, s);
  }
}

// Any dtype and shape: one thread per weight, l fastest so grad_y reads coalesce.
template <class T>
__global__ void dw_generic(const T *__restrict__ dy, const T *__restrict__ x, const int32_t *__restrict__ idx,
                           T *__restrict__ gw, int64_t B, int64_t H, int64_t L, int64_t F, int64_t G) {
  using A = typename AccT<T>::type;
  const int64_t n = L * F;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = e / L, l = e - t * L;
    const int64_t h = idx[(l / G) * F + t];
    A s = 0;
    for (int64_t b = 0; b < B; ++b) s += (A)to_acc(dy[b * L + l]) * (A)to_acc(x[b * H + h]);
    put(gw + l * F + t, s);
  }
}

template <class T>
int grad_bias_generic(xmc_gsffi_shape s, const void *dy, void *gb, cudaStream_t st) {
  const int64_t blocks = xmin<int64_t>((s.out_features + 255) / 256, (int64_t)num_sms() * 32);
  db_generic<T><<<(unsigned)blocks, 256, 0, st>>>((const T *)dy, (T *)gb, s.batch, s.out_features);
  XMC_CHECK_LAUNCH();
  return 0;
}

template <class T>
int grad_weight_generic(xmc_gsffi_shape s, const void *dy, const void *x, const int32_t *idx, void *gw, void *gb,
                        cudaStream_t st) {
  const int64_t n = s.out_features * s.fan_in;
  const int64_t blocks = xmin<int64_t>((n + 255) / 256, (int64_t)num_sms() * 32);
  dw_generic<T><<<(unsigned)blocks, 256, 0, st>>>((const T *)dy, (const T *)x, idx, (T *)gw, s.batch,
                                                  s.in_features, s.out_features, s.fan_in, s.group_size);
  XMC_CHECK_LAUNCH();
  return gb ? grad_bias_generic<T>(s, dy, gb, st) : 0;
}

// Ring stages per warp: 4 (3 chunks in flight) where the 8 warps' rings fit in 192 KB, else 3.
template <int LW, int NTW>
constexpr int dw_ring_stages() { return kDwThreads / 32 * 4 * DwRing<LW, NTW>::kStage <= 192 * 1024 ? 4 : 3; }

// Whether dw_mma_ring can take shape s with these operands.
template <int LW, int NTW>
bool dw_ring_ok(xmc_gsffi_shape s, const void *dy) {
  const size_t smem = (size_t)kDwThreads / 32 * dw_ring_stages<LW, NTW>() * DwRing<LW, NTW>::kStage;
  return s.out_features % 8 == 0 && s.group_size % 8 == 0 && (uintptr_t)dy % 16 == 0 && smem <= (size_t)smem_optin();
}

// xt: x^T as transpose_x writes it, or null (then it is made here, in scratch). An item of 8 LW labels x 8 NTW
// slots has LW / 2 x NTW x 4 accumulators per lane; 128 only in the ring kernel, whose operands wait in shared
// memory (dw_mma's registers for two chunks in flight would spill), so without the ring LW = 8 takes NTW = 4.
template <class T, int LW, int NTW>
int grad_weight_mma(xmc_gsffi_shape s, const void *dy, const void *x, const void *xt_given, const int32_t *idx,
                    void *gw, void *gb, cudaStream_t st) {
  const bool ring_ok = dw_ring_ok<LW, NTW>(s, dy);
  if constexpr (LW * NTW > 32)
    if (!ring_ok) return grad_weight_mma<T, LW, 32 / LW>(s, dy, x, xt_given, idx, gw, gb, st);
  const int64_t Bp = xt_cols(s.batch);
  T *xt = (T *)xt_given;
  if (xt == nullptr && scratch_alloc((void **)&xt, (size_t)(s.in_features * Bp) * sizeof(T), st) != cudaSuccess) {
    cudaGetLastError();
    return XMC_ERR_NOMEM;
  }
  int rc = xt_given ? 0 : transpose_x(s, x, xt, st);
  const int64_t n_groups = (s.out_features + s.group_size - 1) / s.group_size;
  const int nlc = (int)((s.group_size + 8 * LW - 1) / (8 * LW));
  const int nsc = (int)((s.fan_in + 8 * NTW - 1) / (8 * NTW));
  const int64_t n_items = n_groups * nlc * nsc, warps = kDwThreads / 32;
  auto blocks = [&](int per_sm) {
    return xmin<int64_t>((int64_t)num_sms() * xmax(per_sm, 1), (n_items + warps - 1) / warps);
  };
  constexpr int kNs = dw_ring_stages<LW, NTW>();
  const size_t ring_smem = (size_t)warps * kNs * DwRing<LW, NTW>::kStage;
  if (rc == 0 && ring_ok) {
    auto kernel = dw_mma_ring<T, LW, NTW, kNs>;
    const int per_sm = prepare(kernel, kDwThreads, ring_smem);
    launch_pdl(kernel, dim3((unsigned)blocks(per_sm)), dim3(kDwThreads), ring_smem, st, (const T *)dy,
               (const T *)xt, idx, (T *)gw, (T *)gb, s.batch, Bp, s.out_features, (int)s.fan_in, (int)s.group_size,
               nlc, nsc, n_items);
    rc = last_error();
  } else if (rc == 0 && LW * NTW <= 32) {
    auto kernel = dw_mma<T, LW, LW * NTW <= 32 ? NTW : 32 / LW>;
    const int per_sm = prepare(kernel, kDwThreads, 0);
    const bool dy_vec = s.out_features % LW == 0 && s.group_size % LW == 0 && (uintptr_t)dy % (2 * LW) == 0;
    launch_pdl(kernel, dim3((unsigned)blocks(per_sm)), dim3(kDwThreads), 0, st, (const T *)dy, (const T *)xt, idx,
               (T *)gw, (T *)gb, s.batch, Bp, s.out_features, (int)s.fan_in, (int)s.group_size, nlc, nsc, n_items,
               dy_vec);
    rc = last_error();
  }
  if (!xt_given) cudaFreeAsync(xt, st);
  return rc;
}

template <class T>
int grad_weight_half(xmc_gsffi_shape s, const void *dy, const void *x, const void *xt, const int32_t *idx, void *gw,
                     void *gb, cudaStream_t st) {
  if (!gw) return grad_bias_generic<T>(s, dy, gb, st);
  const bool ok = s.fan_in % 8 == 0 && (uintptr_t)gw % 4 == 0;
  if (!ok) return grad_weight_generic<T>(s, dy, x, idx, gw, gb, st);
  // Accumulators: (LW / 2) x NTW x 4 registers = 64, or 128 where G > 32 and F > 32: then one item takes 64
  // slots and each group's grad_y is read ceil(F / 64) times instead of ceil(F / 32) (measured: gpu_notes.md).
  if (s.group_size > 32)
    return s.fan_in > 32 ? grad_weight_mma<T, 8, 8>(s, dy, x, xt, idx, gw, gb, st)
                         : grad_weight_mma<T, 8, 4>(s, dy, x, xt, idx, gw, gb, st);
  if (s.group_size > 16) return grad_weight_mma<T, 4, 8>(s, dy, x, xt, idx, gw, gb, st);
  return grad_weight_mma<T, 2, 8>(s, dy, x, xt, idx, gw, gb, st);
}

}  // namespace

int64_t xt_cols(int64_t B) { return (B + 31) / 32 * 32; }

int transpose_x(xmc_gsffi_shape s, const void *x, void *xt, cudaStream_t st) {
  const int64_t Bp = xt_cols(s.batch);
  launch_pdl(transpose_pad, dim3((unsigned)((s.in_features + 31) / 32), (unsigned)(Bp / 32)), dim3(32, 8), 0, st,
             (const uint16_t *)x, (uint16_t *)xt, s.batch, Bp, s.in_features);
  return last_error();
}

int grad_weight_bias_xt(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x, const void *xt,
                        const int32_t *indices, void *grad_weight, void *grad_bias, cudaStream_t st) {
  if (s.batch == 0 || (!grad_weight && !grad_bias)) return 0;
  switch (dt) {
    case XMC_BF16: return grad_weight_half<__nv_bfloat16>(s, grad_y, x, xt, indices, grad_weight, grad_bias, st);
    case XMC_F16: return grad_weight_half<__half>(s, grad_y, x, xt, indices, grad_weight, grad_bias, st);
    case XMC_F32:
      return grad_weight ? grad_weight_generic<float>(s, grad_y, x, indices, grad_weight, grad_bias, st)
                         : grad_bias_generic<float>(s, grad_y, grad_bias, st);
    case XMC_F64:
      return grad_weight ? grad_weight_generic<double>(s, grad_y, x, indices, grad_weight, grad_bias, st)
                         : grad_bias_generic<double>(s, grad_y, grad_bias, st);
  }
  return XMC_ERR_DTYPE;
}

}  // namespace xmc_cuda

extern "C" int xmc_gsffi_grad_weight_bias_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x,
                                               const int32_t *indices, void *grad_weight, void *grad_bias,
                                               xmc_exec ex) {
  return xmc_cuda::grad_weight_bias_xt(s, dt, grad_y, x, nullptr, indices, grad_weight, grad_bias,
                                       (cudaStream_t)ex.stream);
}

extern "C" int xmc_gsffi_grad_weight_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x,
                                          const int32_t *indices, void *grad_weight, xmc_exec ex) {
  return xmc_gsffi_grad_weight_bias_cuda(s, dt, grad_y, x, indices, grad_weight, nullptr, ex);
}
