// GSFFI input gradient on CUDA:
//   grad_x[b, h] = sum_{(g, t): indices[g, t] = h} P_g[b, t],   P_g = grad_y[:, labels of g] @ weight[labels of g, :]
//
// Deterministic without atomics: the groups are split into `chunks`; a block owns one (chunk, batch tile) pair
// and accumulates its chunk's contribution to its rows in fp32 shared memory, then writes that partial sum to
// a scratch buffer [chunks, B, H]; a second kernel adds the chunks in a fixed order. Inside a block every
// accumulator row belongs to one warp and a warp's read-modify-writes are ordered by program order; within one
// instruction the lanes touch distinct (row, feature) pairs because a group's feature ids are distinct (the
// Python layer checks this). The chunk count depends only on the shape and the GPU's SM count, so results are
// bitwise identical from run to run on one device.
//
// Tensor-core path (bf16/fp16): each warp owns 8 batch rows (the other half of the m16 tile is zero: the
// tensor cores have time to spare, shared memory for accumulators does not, and twice the warps hide twice
// the latency) and computes P_g (8 x F) with mma.sync, the grad_y fragments loaded straight from global
// memory (16-byte loads, see gsffi_common.cuh) and the weight fragments built from 16-byte weight-row loads
// by byte permutes (a k pair of B spans two weight rows). The next group's loads are issued before this
// group's arithmetic and scatter, so one group's latency hides behind the previous group's work.
#include "gsffi_common.cuh"

namespace xmc_cuda {
namespace {

// Scratch rows [chunks, B, H] in A are reduced over chunks in order into grad_x.
// ADD: out is a float accumulator that the sum is added to (the fused loss sums label chunks that way).
template <class T, class A, bool ADD>
__global__ void reduce_chunks(const A *__restrict__ part, int64_t chunks, int64_t n, T *__restrict__ out) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    A s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[c * n + e];
    if (ADD) s += (A)to_acc(out[e]);
    put(out + e, s);
  }
}

constexpr int kDxMaxWarps = 8;
constexpr int kDxRows = 8;  // batch rows per warp: half an m16 tile, so twice the warps fit the shared memory

// Accumulator row stride in floats: >= H and = 4 (mod 32), so the 8 rows one instruction touches start in
// 8 different bank quads.
inline int64_t acc_stride(int64_t H) { return H + ((4 - H % 32) + 32) % 32; }

template <class T, int KCG>
__global__ void __launch_bounds__(kDxMaxWarps * 32, 1)
    dx_mma(const T *__restrict__ dy, const T *__restrict__ w, const int32_t *__restrict__ idx,
           float *__restrict__ part, int64_t B, int H, int64_t L, int F, int G, int64_t n_groups, int nbt, int hs,
           bool dy_vec, bool idx_vec) {
  extern __shared__ __align__(16) float accs[];
  const int nwarps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane & 3, r4 = lane >> 2;
  const int BTB = nwarps * kDxRows;
  for (int e = threadIdx.x; e < BTB * hs; e += blockDim.x) accs[e] = 0.f;
  __syncthreads();

  const int bt = blockIdx.x % nbt, c = blockIdx.x / nbt, chunks = gridDim.x / nbt;
  const int64_t brow = (int64_t)bt * BTB;       // block's first row
  const int64_t b0 = brow + warp * kDxRows;     // warp's first row
  float *acc_w = accs + (size_t)warp * kDxRows * hs + r4 * hs;
  const int64_t g_begin = n_groups * c / chunks, g_end = n_groups * (c + 1) / chunks;

  if (b0 < B) {
    const int64_t row = b0 + r4;
    const bool row_ok = row < B;
    // Weight rows 32 kc + 8q .. + 7 of group g, fan-in slots 64 fc + 8 r4 .. + 7.
    auto load_w = [&](uint4 wv[8], int64_t g, int fc, int kc) {
      const int64_t lg = g * G, lend = xmin<int64_t>(lg + G, L);
      const int t0 = fc * 64 + 8 * r4;
#pragma unroll
      for (int v = 0; v < 8; ++v) {
        const int64_t l = lg + kc * 32 + 8 * q + v;
        wv[v] = (l < lend && t0 < F) ? ldg16(w + l * F + t0) : make_uint4(0, 0, 0, 0);
      }
    };
    // acc[u] += grad_y rows (8, padded to the m16 tile with zeros) x weight chunk; column n of tile u is slot 8n + u.
    auto mma_chunk = [&](float acc[8][4], const uint4 wv[8], const uint4 &d) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const uint32_t a[4] = {word(d, 2 * s), 0u, word(d, 2 * s + 1), 0u};
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const uint32_t b0f = halves(word(wv[4 * s], u >> 1), word(wv[4 * s + 1], u >> 1), u & 1);
          const uint32_t b1f = halves(word(wv[4 * s + 2], u >> 1), word(wv[4 * s + 3], u >> 1), u & 1);
          mma16816(T(), acc[u], a, b0f, b1f);
        }
      }
    };
    // Group g's grad_y, first weight chunk and first 64 feature ids (slot 16q + 8j + 4i + e in ids[2j + i].e).
    struct Stage {
      uint4 dy[KCG], w[8];
      int4 ids[4];
    };
    auto fetch = [&](Stage &st, int64_t g) {
      const int64_t lg = g * G, lend = xmin<int64_t>(lg + G, L);
#pragma unroll
      for (int kc = 0; kc < KCG; ++kc) {
        const int64_t l = lg + kc * 32 + 8 * q;
        st.dy[kc] = row_ok ? load_elems<8>(dy + row * L + l, lend - l, dy_vec) : make_uint4(0, 0, 0, 0);
      }
      load_w(st.w, g, 0, 0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int t = 16 * q + 4 * k;
        st.ids[k] = t < F ? (idx_vec ? __ldg(reinterpret_cast<const int4 *>(idx + g * F + t))
                                     : make_int4(idx[g * F + t], idx[g * F + t + 1], idx[g * F + t + 2],
                                                 idx[g * F + t + 3]))
                          : make_int4(0, 0, 0, 0);
      }
    };
    // Adds acc (columns 2q + j of tile u: slots 64 fc + 16 q + 8 j + u) into this lane's accumulator row. All
    // reads first, then all writes: a lane's 16 feature ids are distinct, so nothing waits on a store.
    auto scatter = [&](const float acc[8][4], const int h[16], int fc) {
      float old[16];
#pragma unroll
      for (int k = 0; k < 16; ++k) old[k] = fc * 64 + 16 * q + 8 * (k & 1) + (k >> 1) < F ? acc_w[h[k]] : 0.f;
#pragma unroll
      for (int k = 0; k < 16; ++k)
        if (fc * 64 + 16 * q + 8 * (k & 1) + (k >> 1) < F) acc_w[h[k]] = old[k] + acc[k >> 1][k & 1];
    };
    auto compute = [&](const Stage &st, int64_t g) {
      for (int fc = 0; fc * 64 < F; ++fc) {
        float acc[8][4];
#pragma unroll
        for (int u = 0; u < 8; ++u) acc[u][0] = acc[u][1] = acc[u][2] = acc[u][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < KCG; ++kc) {
          if (fc == 0 && kc == 0) {
            mma_chunk(acc, st.w, st.dy[0]);
          } else {
            uint4 wv[8];
            load_w(wv, g, fc, kc);
            mma_chunk(acc, wv, st.dy[kc]);
          }
        }
        int h[16];  // k = 2u + j
#pragma unroll
        for (int k = 0; k < 16; ++k) {
          const int u = k >> 1, j = k & 1;
          if (fc == 0) {
            const int4 v = st.ids[2 * j + (u >> 2)];
            h[k] = (u & 3) == 0 ? v.x : (u & 3) == 1 ? v.y : (u & 3) == 2 ? v.z : v.w;
          } else {
            const int t = fc * 64 + 16 * q + 8 * j + u;
            h[k] = t < F ? __ldg(idx + g * F + t) : 0;
          }
        }
        scatter(acc, h, fc);
      }
    };
    // Two stages in turn: the next group's loads are in flight while this one computes, with no copies.
    Stage s0, s1;
    int64_t g = g_begin;
    if (g < g_end) fetch(s0, g);
    for (; g + 1 < g_end; g += 2) {
      fetch(s1, g + 1);
      compute(s0, g);
      if (g + 2 < g_end) fetch(s0, g + 2);
      compute(s1, g + 1);
    }
    if (g < g_end) compute(s0, g);
  }
  __syncthreads();
  const int64_t rows = xmin<int64_t>(BTB, B - brow);
  for (int64_t e = threadIdx.x; e < rows * H; e += blockDim.x) {
    const int64_t r = e / H, h = e - r * H;
    part[((int64_t)c * B + brow + r) * H + h] = accs[r * hs + h];
  }
}

// Weight-staged variant, used where its ring fits beside the accumulators. The 8 warps of a block read the
// same group's weights, so the block copies them (and the group's feature ids) once into a ring of shared
// stages with cp.async, `ns` - 1 groups ahead, and each warp takes its B fragments with ldmatrix.trans: per
// group a warp then spends ~130 instructions instead of ~600 (8 weight loads, 32 byte permutes and their
// 64-bit address and bounds arithmetic, all repeated by every warp). Rows of a stage are F * 2 bytes; the
// 16-byte chunk c of row L sits at c ^ swz(L), so the 8 label rows one ldmatrix phase reads
// ({0, 1, 8, 9, 16, 17, 24, 25} + even offset) fall on 8 different bank groups.
__device__ __forceinline__ int stage_swz(int row, int mask) { return ((row & 1) | (((row >> 3) & 3) << 1)) & mask; }

//
// FT and NWT, where not 0, fix the fan-in and the warp count at compile time: the per-group copy loops and
// fan-in checks then fold away (with both at run time the loop body is ~900 instructions per group, mostly
// index arithmetic, and the kernel is instruction bound).
template <class T, int KCG, int FT, int NWT>
__global__ void __launch_bounds__(kDxMaxWarps * 32, 1)
    dx_mma_staged(const T *__restrict__ dy, const T *__restrict__ w, const int32_t *__restrict__ idx,
                  float *__restrict__ part, int64_t B, int H, int64_t L, int F_arg, int G, int64_t n_groups, int nbt,
                  int hs, int ns, int stage_bytes, bool dy_vec, bool dy_ring) {
  extern __shared__ __align__(16) float accs[];
  const int F = FT ? FT : F_arg, nthreads = NWT ? NWT * 32 : (int)blockDim.x;
  const int nwarps = nthreads >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane & 3, r4 = lane >> 2;
  const int BTB = nwarps * kDxRows;
  for (int e = threadIdx.x; e < BTB * hs; e += nthreads) accs[e] = 0.f;
  unsigned char *ring = reinterpret_cast<unsigned char *>(accs + BTB * hs);
  const uint32_t ring_s = (uint32_t)__cvta_generic_to_shared(ring);
  constexpr int kRows = 32 * KCG;  // weight rows per stage, zero past the group's end
  const int cpr = F / 8, smask = cpr % 8 == 0 ? 7 : 0;
  const int cpr_shift = (cpr & (cpr - 1)) == 0 ? __ffs(cpr) - 1 : -1;  // a shift, not a division, per chunk
  const int dy_off = kRows * F * 2 + F * 4;  // grad_y tile after weights and ids (dy_ring only)

  const int bt = blockIdx.x % nbt, c = blockIdx.x / nbt, chunks = gridDim.x / nbt;
  const int64_t brow = (int64_t)bt * BTB, b0 = brow + warp * kDxRows, row = b0 + r4;
  const bool row_ok = row < B;
  const uint32_t acc_s = (uint32_t)__cvta_generic_to_shared(accs + (size_t)warp * kDxRows * hs + r4 * hs);
  const int64_t g_begin = n_groups * c / chunks, g_end = n_groups * (c + 1) / chunks;

  // grad_y copies (dy_ring): the block's BTB rows x kRows / 8 16-byte pieces are BTB * 4 KCG = KCG per thread
  // whatever the warp count. Each thread's source rows and ring offsets are the same for every group: set them
  // once (the 64-bit row address arithmetic was a fifth of the group loop).
  const T *dy_src[KCG];  // row start + 8 c8 of piece it, or null past the batch
  uint32_t dy_dst[KCG];
  int dy_c8[KCG];
#pragma unroll
  for (int it = 0; it < KCG; ++it) {
    const int e = it * nthreads + (int)threadIdx.x, r = e / (kRows / 8), c8 = e - r * (kRows / 8);
    dy_src[it] = brow + r < B ? dy + (brow + r) * L + 8 * c8 : nullptr;
    dy_dst[it] = dy_off + r * kRows * 2 + c8 * 16;
    dy_c8[it] = 8 * c8;
  }
  auto issue = [&](int64_t g, int slot) {
    if (g < g_end) {
      const uint32_t sb = ring_s + slot * stage_bytes;
      const int64_t lg = g * G;
      const int nval = (int)(xmin<int64_t>(lg + G, L) - lg);
      // Loops of the form e0 += nthreads with e = e0 + tid: a fixed trip count when FT and NWT are set, so they
      // unroll and everything but the group's base address is hoisted out of the group loop.
      const T *wg = w + lg * F;
#pragma unroll
      for (int e0 = 0; e0 < kRows * cpr; e0 += nthreads) {
        const int e = e0 + (int)threadIdx.x;
        if (e >= kRows * cpr) break;
        const int r = cpr_shift >= 0 ? e >> cpr_shift : e / cpr, col = e - r * cpr;
        const bool ok = r < nval;
        cp_async16(sb + r * F * 2 + ((col ^ stage_swz(r, smask)) << 4), ok ? wg + r * F + col * 8 : w, ok ? 16 : 0);
      }
#pragma unroll
      for (int e0 = 0; e0 < F / 4; e0 += nthreads) {
        const int e = e0 + (int)threadIdx.x;
        if (e < F / 4) cp_async16(sb + kRows * F * 2 + e * 16, idx + g * F + e * 4, 16);
      }
      if (dy_ring) {  // the block's grad_y rows of this group: kRows labels each, zeros past the group or batch
#pragma unroll
        for (int it = 0; it < KCG; ++it) {
          const int n = dy_src[it] != nullptr ? xmax(0, xmin(8, nval - dy_c8[it])) : 0;
          cp_async16(sb + dy_dst[it], n > 0 ? dy_src[it] + lg : dy, 2 * n);
        }
      }
    }
    cp_async_commit();
  };
  auto load_dy = [&](uint4 d[KCG], int64_t g) {
    const int64_t lg = g * G, lend = xmin<int64_t>(lg + G, L);
#pragma unroll
    for (int kc = 0; kc < KCG; ++kc) {
      const int64_t l = lg + kc * 32 + 8 * q;
      d[kc] = !dy_ring && row_ok && g < g_end ? load_elems<8>(dy + row * L + l, lend - l, dy_vec)
                                              : make_uint4(0, 0, 0, 0);
    }
  };

  for (int k = 0; k < ns - 1; ++k) issue(g_begin + k, k);
  uint4 dyn[KCG];
  load_dy(dyn, g_begin);
  // ldmatrix.x4.trans: lane 8i + r gives label row r of matrix i; i & 1 is the k half, i >> 1 the tile of a pair.
  const int mi = lane >> 3, rr = lane & 7;
  uint32_t lrow_off[KCG][2];  // this lane's ldmatrix row (a weight label) and its swizzle, the same every group
  int lrow_swz[KCG][2];
#pragma unroll
  for (int kc = 0; kc < KCG; ++kc)
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int lrow = kc * 32 + 8 * (rr >> 1) + 4 * s + 2 * (mi & 1) + (rr & 1);
      lrow_off[kc][s] = lrow * F * 2;
      lrow_swz[kc][s] = stage_swz(lrow, smask);
    }
  // Ring slots counted in int: a 64-bit % by a run-time ns is a ~70-instruction call, three times per group.
  int slot = 0, slot_next = ns - 1;
  for (int64_t g = g_begin; g < g_end; ++g, slot = slot + 1 == ns ? 0 : slot + 1,
               slot_next = slot_next + 1 == ns ? 0 : slot_next + 1) {
    if (ns == 2) cp_async_wait<0>(); else if (ns == 3) cp_async_wait<1>(); else cp_async_wait<2>();
    __syncthreads();  // stage i is in; every warp is done with the stage that the next issue overwrites
    issue(g + ns - 1, slot_next);
    uint4 dyc[KCG];
#pragma unroll
    for (int kc = 0; kc < KCG; ++kc) dyc[kc] = dyn[kc];
    load_dy(dyn, g + 1);
    if (b0 >= B) continue;
    const uint32_t sb = ring_s + (uint32_t)(slot * stage_bytes);
    if (dy_ring) {
      const unsigned char *dt = ring + slot * stage_bytes + dy_off + (warp * kDxRows + r4) * kRows * 2;
#pragma unroll
      for (int kc = 0; kc < KCG; ++kc) dyc[kc] = *reinterpret_cast<const uint4 *>(dt + (kc * 32 + 8 * q) * 2);
    }
    const int *ids = reinterpret_cast<const int *>(ring + slot * stage_bytes + kRows * F * 2);
#pragma unroll
    for (int fc = 0; fc * 64 < F; ++fc) {
      float acc[8][4];
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u][0] = acc[u][1] = acc[u][2] = acc[u][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < KCG; ++kc)
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const uint32_t a[4] = {word(dyc[kc], 2 * s), 0u, word(dyc[kc], 2 * s + 1), 0u};
          const int sw = lrow_swz[kc][s];
          const uint32_t rbase = sb + lrow_off[kc][s];
#pragma unroll
          for (int p = 0; p < 4; ++p) {
            const int tile = fc * 8 + 2 * p;
            if (tile * 8 >= F) break;
            uint32_t b[4];
            ldsm_x4_trans(b, rbase + (((tile + (mi >> 1)) ^ sw) << 4));
            mma16816(T(), acc[2 * p], a, b[0], b[1]);
            mma16816(T(), acc[2 * p + 1], a, b[2], b[3]);
          }
        }
      // Column n = 2q + j of tile u is slot 64 fc + 8u + 2q + j. Reads first, then writes (ids are distinct).
      int h[16];
      float old[16];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int t = fc * 64 + 8 * u + 2 * q;
        const int2 v = t < F ? *reinterpret_cast<const int2 *>(ids + t) : make_int2(0, 0);
        h[2 * u] = v.x;
        h[2 * u + 1] = v.y;
      }
      // 32-bit shared addresses: one instruction per element (the C++ indexing took two)
      uint32_t ad[16];
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        ad[k] = acc_s + ((uint32_t)h[k] << 2);
        old[k] = fc * 64 + 8 * (k >> 1) + 2 * q < F ? lds_f32(ad[k]) : 0.f;
      }
#pragma unroll
      for (int k = 0; k < 16; ++k)
        if (fc * 64 + 8 * (k >> 1) + 2 * q < F) sts_f32(ad[k], old[k] + acc[k >> 1][k & 1]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  const int64_t rows = xmin<int64_t>(BTB, B - brow);
  for (int64_t e = threadIdx.x; e < rows * H; e += nthreads) {
    const int64_t r = e / H, hh = e - r * H;
    part[((int64_t)c * B + brow + r) * H + hh] = accs[r * hs + hh];
  }
}

// Any dtype and shape: block (chunk c, row b) adds its groups' P_g[b, :] into its own scratch row, one group
// at a time (a barrier between groups orders the read-modify-writes of different threads).
template <class T>
__global__ void dx_generic(const T *__restrict__ dy, const T *__restrict__ w, const int32_t *__restrict__ idx,
                           typename AccT<T>::type *__restrict__ part, int64_t B, int64_t H, int64_t L, int64_t F,
                           int64_t G, int64_t n_groups, int64_t chunks) {
  using A = typename AccT<T>::type;
  const int64_t c = blockIdx.x % chunks, b = blockIdx.x / chunks;
  A *row = part + (c * B + b) * H;
  const T *dyr = dy + b * L;
  for (int64_t g = n_groups * c / chunks; g < n_groups * (c + 1) / chunks; ++g) {
    const int64_t lend = xmin<int64_t>(g * G + G, L);
    for (int64_t t = threadIdx.x; t < F; t += blockDim.x) {
      A s = 0;
      for (int64_t l = g * G; l < lend; ++l) s += (A)to_acc(dyr[l]) * (A)to_acc(w[l * F + t]);
      row[idx[g * F + t]] += s;
    }
    __syncthreads();
  }
}

template <class T, class A>
int reduce(const A *part, int64_t chunks, int64_t n, DxOut gx, cudaStream_t st) {
  const int64_t blocks = xmin<int64_t>((n + 255) / 256, (int64_t)num_sms() * 16);
  if (gx.add_f32)
    reduce_chunks<float, A, true><<<(unsigned)blocks, 256, 0, st>>>(part, chunks, n, (float *)gx.ptr);
  else
    reduce_chunks<T, A, false><<<(unsigned)blocks, 256, 0, st>>>(part, chunks, n, (T *)gx.ptr);
  XMC_CHECK_LAUNCH();
  return 0;
}

// Runs launch(part) into a scratch of per-chunk partial sums [chunks, B, H] (zeroed first if asked), then adds
// the chunks in a fixed order into gx: the deterministic reduction every grad_input path shares.
template <class T, class A, class Launch>
int with_partials(xmc_gsffi_shape s, int64_t chunks, bool zero, DxOut gx, cudaStream_t st, Launch launch) {
  const int64_t n = s.batch * s.in_features;
  A *part = nullptr;
  if (scratch_alloc((void **)&part, (size_t)(chunks * n) * sizeof(A), st) != cudaSuccess) {
    cudaGetLastError();
    return XMC_ERR_NOMEM;
  }
  int rc = zero ? (int)cudaMemsetAsync(part, 0, (size_t)(chunks * n) * sizeof(A), st) : 0;
  if (rc == 0) {
    launch(part);
    rc = last_error();
  }
  if (rc == 0) rc = reduce<T, A>(part, chunks, n, gx, st);
  cudaFreeAsync(part, st);
  return rc;
}

// Group chunks for the tensor-core paths: enough blocks to fill the chip with nbt batch tiles each.
int64_t mma_chunks(int per_sm, int nbt, int64_t n_groups) {
  return xmin<int64_t>(xmax<int64_t>(1, (int64_t)num_sms() * xmax(per_sm, 1) / nbt), n_groups);
}

template <class T>
int grad_input_generic(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, DxOut gx,
                       cudaStream_t st) {
  using A = typename AccT<T>::type;
  const int64_t n_groups = (s.out_features + s.group_size - 1) / s.group_size;
  const int64_t chunks = xmin<int64_t>(xmax<int64_t>(1, (int64_t)num_sms() * 8 / s.batch), n_groups);
  const int threads = (int)xmin<int64_t>(256, (s.fan_in + 31) / 32 * 32);
  return with_partials<T, A>(s, chunks, true, gx, st, [&](A *part) {
    dx_generic<T><<<(unsigned)(chunks * s.batch), threads, 0, st>>>(
        (const T *)dy, (const T *)w, idx, part, s.batch, s.in_features, s.out_features, s.fan_in, s.group_size,
        n_groups, chunks);
  });
}

// Launches a tensor-core grad_input kernel (dx_mma or dx_mma_staged) over (group chunk, batch tile) blocks
// of nwarps warps, with extra_smem bytes of shared memory beside the accumulators; tail... are the kernel's
// arguments after the common ones.
template <class T, class Kernel, class... Tail>
int grad_input_tc(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, DxOut gx, cudaStream_t st,
                  int nwarps, Kernel kernel, size_t extra_smem, Tail... tail) {
  const int hs = (int)acc_stride(s.in_features);
  const size_t smem = (size_t)nwarps * kDxRows * hs * sizeof(float) + extra_smem;
  const int per_sm = prepare(kernel, nwarps * 32, smem);
  XMC_CHECK_LAUNCH();
  const int64_t n_groups = (s.out_features + s.group_size - 1) / s.group_size;
  const int nbt = (int)((s.batch + nwarps * kDxRows - 1) / (nwarps * kDxRows));
  const int64_t chunks = mma_chunks(per_sm, nbt, n_groups);
  return with_partials<T, float>(s, chunks, false, gx, st, [&](float *part) {
    kernel<<<(unsigned)(chunks * nbt), nwarps * 32, smem, st>>>((const T *)dy, (const T *)w, idx, part, s.batch,
                                                                (int)s.in_features, s.out_features, (int)s.fan_in,
                                                                (int)s.group_size, n_groups, nbt, hs, tail...);
  });
}

template <class T, int KCG>
int grad_input_mma(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, DxOut gx, cudaStream_t st,
                   int nwarps, bool dy_vec) {
  const bool idx_vec = (uintptr_t)idx % 16 == 0;
  return grad_input_tc<T>(s, dy, w, idx, gx, st, nwarps, dx_mma<T, KCG>, 0, dy_vec, idx_vec);
}

// The staged kernel with the fan-in and warp count fixed where they are the common ones (F = 64 or 128, 8 warps).
template <class T, int KCG>
int grad_input_staged(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, DxOut gx, cudaStream_t st,
                      int nwarps, bool dy_vec, int ns, int stage_bytes, bool dy_ring) {
  const size_t ring = (size_t)ns * stage_bytes;
  if (nwarps == 8 && s.fan_in == 64)
    return grad_input_tc<T>(s, dy, w, idx, gx, st, nwarps, dx_mma_staged<T, KCG, 64, 8>, ring, ns, stage_bytes,
                            dy_vec, dy_ring);
  if (nwarps == 8 && s.fan_in == 128)
    return grad_input_tc<T>(s, dy, w, idx, gx, st, nwarps, dx_mma_staged<T, KCG, 128, 8>, ring, ns, stage_bytes,
                            dy_vec, dy_ring);
  return grad_input_tc<T>(s, dy, w, idx, gx, st, nwarps, dx_mma_staged<T, KCG, 0, 0>, ring, ns, stage_bytes, dy_vec,
                          dy_ring);
}

template <class T>
int grad_input_half(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, DxOut gx, cudaStream_t st) {
  // Warps that fit: each owns kDxRows rows x H fp32 accumulators; no more warps than the batch has row tiles.
  const int64_t per_warp = kDxRows * acc_stride(s.in_features) * (int64_t)sizeof(float);
  int nwarps = (int)xmin<int64_t>(kDxMaxWarps, smem_optin() / per_warp);
  nwarps = (int)xmin<int64_t>(nwarps, (s.batch + kDxRows - 1) / kDxRows);
  const bool ok = nwarps >= 1 && s.fan_in % 8 == 0 && s.group_size <= 128 && (uintptr_t)w % 16 == 0;
  if (!ok) return grad_input_generic<T>(s, dy, w, idx, gx, st);
  const int kcg = (int)((s.group_size + 31) / 32);
  // Ring beside the accumulators: 2 to 4 stages of 32 KCG weight rows and F feature ids, plus, where 3 or more
  // stages still fit, the block's grad_y tile: then grad_y, the largest stream, has 2-3 groups in flight
  // per block instead of one per warp (Little's law: one group in flight held grad_input to ~0.35 TB/s).
  const int rows_w = 32 * (kcg == 3 ? 4 : kcg);
  const int stage_w = (int)(rows_w * s.fan_in * 2 + s.fan_in * 4);
  const int stage_dy = (int)(stage_w + nwarps * kDxRows * rows_w * 2);
  const int64_t spare = smem_optin() - (int64_t)nwarps * kDxRows * acc_stride(s.in_features) * (int64_t)sizeof(float);
  const bool dy_ok = s.out_features % 8 == 0 && s.group_size % 8 == 0 && (uintptr_t)dy % 16 == 0;
  const bool dy_ring = dy_ok && spare / stage_dy >= 3;
  const int stage_bytes = ((dy_ring ? stage_dy : stage_w) + 15) / 16 * 16;
  const int ns = (int)xmin<int64_t>(4, spare / stage_bytes);
  if (ns >= 2 && (uintptr_t)idx % 16 == 0) {
    if (kcg == 1) return grad_input_staged<T, 1>(s, dy, w, idx, gx, st, nwarps, dy_ok, ns, stage_bytes, dy_ring);
    if (kcg == 2) return grad_input_staged<T, 2>(s, dy, w, idx, gx, st, nwarps, dy_ok, ns, stage_bytes, dy_ring);
    return grad_input_staged<T, 4>(s, dy, w, idx, gx, st, nwarps, dy_ok, ns, stage_bytes, dy_ring);
  }
  if (kcg == 1) return grad_input_mma<T, 1>(s, dy, w, idx, gx, st, nwarps, dy_ok);
  if (kcg == 2) return grad_input_mma<T, 2>(s, dy, w, idx, gx, st, nwarps, dy_ok);
  return grad_input_mma<T, 4>(s, dy, w, idx, gx, st, nwarps, dy_ok);
}

}  // namespace
}  // namespace xmc_cuda

namespace xmc_cuda {
int grad_input_add_f32(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *weight,
                       const int32_t *indices, float *acc, cudaStream_t st) {
  if (s.batch == 0) return 0;
  const DxOut out{acc, true};
  switch (dt) {
    case XMC_BF16: return grad_input_half<__nv_bfloat16>(s, grad_y, weight, indices, out, st);
    case XMC_F16: return grad_input_half<__half>(s, grad_y, weight, indices, out, st);
    default: return XMC_ERR_DTYPE;
  }
}
}  // namespace xmc_cuda

extern "C" int xmc_gsffi_grad_input_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *weight,
                                         const int32_t *indices, void *grad_x, xmc_exec ex) {
  using namespace xmc_cuda;
  if (s.batch == 0) return 0;
  cudaStream_t st = (cudaStream_t)ex.stream;
  switch (dt) {
    case XMC_BF16: return grad_input_half<__nv_bfloat16>(s, grad_y, weight, indices, {grad_x, false}, st);
    case XMC_F16: return grad_input_half<__half>(s, grad_y, weight, indices, {grad_x, false}, st);
    case XMC_F32: return grad_input_generic<float>(s, grad_y, weight, indices, {grad_x, false}, st);
    case XMC_F64: return grad_input_generic<double>(s, grad_y, weight, indices, {grad_x, false}, st);
  }
  return XMC_ERR_DTYPE;
}
