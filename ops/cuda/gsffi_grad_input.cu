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
template <class T, class A>
__global__ void reduce_chunks(const A *__restrict__ part, int64_t chunks, int64_t n, T *__restrict__ out) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    A s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[c * n + e];
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
           bool dy_vec) {
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
    // The next group's grad_y, first weight chunk and first 64 feature ids load while this group computes.
    uint4 pdy[KCG], pw[8];
    int pidx[16];
    auto fetch = [&](int64_t g) {
      const int64_t lg = g * G, lend = xmin<int64_t>(lg + G, L);
#pragma unroll
      for (int kc = 0; kc < KCG; ++kc) {
        const int64_t l = lg + kc * 32 + 8 * q;
        pdy[kc] = row_ok ? load_elems<8>(dy + row * L + l, lend - l, dy_vec) : make_uint4(0, 0, 0, 0);
      }
      load_w(pw, g, 0, 0);
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        const int t = 16 * q + 8 * (k & 1) + (k >> 1);
        pidx[k] = t < F ? __ldg(idx + g * F + t) : 0;
      }
    };
    if (g_begin < g_end) fetch(g_begin);
    for (int64_t g = g_begin; g < g_end; ++g) {
      uint4 cdy[KCG], cw[8];
      int cidx[16];
#pragma unroll
      for (int kc = 0; kc < KCG; ++kc) cdy[kc] = pdy[kc];
#pragma unroll
      for (int v = 0; v < 8; ++v) cw[v] = pw[v];
#pragma unroll
      for (int k = 0; k < 16; ++k) cidx[k] = pidx[k];
      if (g + 1 < g_end) fetch(g + 1);
      for (int fc = 0; fc * 64 < F; ++fc) {
        float acc[8][4];
#pragma unroll
        for (int u = 0; u < 8; ++u) acc[u][0] = acc[u][1] = acc[u][2] = acc[u][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < KCG; ++kc) {
          if (fc == 0 && kc == 0) {
            mma_chunk(acc, cw, cdy[0]);
          } else {
            uint4 wv[8];
            load_w(wv, g, fc, kc);
            mma_chunk(acc, wv, cdy[kc]);
          }
        }
        // This lane holds columns n = 2q, 2q + 1 of tile u: slots 64 fc + 16 q + 8 j + u.
#pragma unroll
        for (int u = 0; u < 8; ++u)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int t = fc * 64 + 16 * q + 8 * j + u;
            if (t < F) {
              const int h = fc == 0 ? cidx[2 * u + j] : __ldg(idx + g * F + t);
              acc_w[h] += acc[u][j];
            }
          }
      }
    }
  }
  __syncthreads();
  const int64_t rows = xmin<int64_t>(BTB, B - brow);
  for (int64_t e = threadIdx.x; e < rows * H; e += blockDim.x) {
    const int64_t r = e / H, h = e - r * H;
    part[((int64_t)c * B + brow + r) * H + h] = accs[r * hs + h];
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
int reduce(const A *part, int64_t chunks, int64_t n, void *gx, cudaStream_t st) {
  const int64_t blocks = xmin<int64_t>((n + 255) / 256, (int64_t)num_sms() * 16);
  reduce_chunks<T, A><<<(unsigned)blocks, 256, 0, st>>>(part, chunks, n, (T *)gx);
  XMC_CHECK_LAUNCH();
  return 0;
}

template <class T>
int grad_input_generic(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, void *gx,
                       cudaStream_t st) {
  using A = typename AccT<T>::type;
  const int64_t n_groups = (s.out_features + s.group_size - 1) / s.group_size;
  int64_t chunks = xmax<int64_t>(1, (int64_t)num_sms() * 8 / s.batch);
  chunks = xmin<int64_t>(chunks, n_groups);
  const int64_t n = s.batch * s.in_features;
  A *part = nullptr;
  if (scratch_alloc((void **)&part, (size_t)(chunks * n) * sizeof(A), st) != cudaSuccess) {
    cudaGetLastError();
    return XMC_ERR_NOMEM;
  }
  int rc = (int)cudaMemsetAsync(part, 0, (size_t)(chunks * n) * sizeof(A), st);
  if (rc == 0) {
    const int threads = (int)xmin<int64_t>(256, (s.fan_in + 31) / 32 * 32);
    dx_generic<T><<<(unsigned)(chunks * s.batch), threads, 0, st>>>(
        (const T *)dy, (const T *)w, idx, part, s.batch, s.in_features, s.out_features, s.fan_in, s.group_size,
        n_groups, chunks);
    rc = last_error();
  }
  if (rc == 0) rc = reduce<T, A>(part, chunks, n, gx, st);
  cudaFreeAsync(part, st);
  return rc;
}

template <class T, int KCG>
int grad_input_mma(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, void *gx, cudaStream_t st,
                   int nwarps) {
  const int hs = (int)acc_stride(s.in_features);
  const size_t smem = (size_t)nwarps * kDxRows * hs * sizeof(float);
  auto kernel = dx_mma<T, KCG>;
  const int per_sm = prepare(kernel, nwarps * 32, smem);
  XMC_CHECK_LAUNCH();
  const int64_t n_groups = (s.out_features + s.group_size - 1) / s.group_size;
  const int nbt = (int)((s.batch + nwarps * kDxRows - 1) / (nwarps * kDxRows));
  int64_t chunks = xmax<int64_t>(1, (int64_t)num_sms() * xmax(per_sm, 1) / nbt);
  chunks = xmin<int64_t>(chunks, n_groups);
  const int64_t n = s.batch * s.in_features;
  float *part = nullptr;
  if (scratch_alloc((void **)&part, (size_t)(chunks * n) * sizeof(float), st) != cudaSuccess) {
    cudaGetLastError();
    return XMC_ERR_NOMEM;
  }
  const bool dy_vec = s.out_features % 8 == 0 && s.group_size % 8 == 0 && (uintptr_t)dy % 16 == 0;
  kernel<<<(unsigned)(chunks * nbt), nwarps * 32, smem, st>>>((const T *)dy, (const T *)w, idx, part, s.batch,
                                                              (int)s.in_features, s.out_features, (int)s.fan_in,
                                                              (int)s.group_size, n_groups, nbt, hs, dy_vec);
  int rc = last_error();
  if (rc == 0) rc = reduce<T, float>(part, chunks, n, gx, st);
  cudaFreeAsync(part, st);
  return rc;
}

template <class T>
int grad_input_half(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, void *gx, cudaStream_t st) {
  // Warps that fit: each owns kDxRows rows x H fp32 accumulators; no more warps than the batch has row tiles.
  const int64_t per_warp = kDxRows * acc_stride(s.in_features) * (int64_t)sizeof(float);
  int nwarps = (int)xmin<int64_t>(kDxMaxWarps, smem_optin() / per_warp);
  nwarps = (int)xmin<int64_t>(nwarps, (s.batch + kDxRows - 1) / kDxRows);
  const bool ok = nwarps >= 1 && s.fan_in % 8 == 0 && s.group_size <= 128 && (uintptr_t)w % 16 == 0;
  if (!ok) return grad_input_generic<T>(s, dy, w, idx, gx, st);
  const int kcg = (int)((s.group_size + 31) / 32);
  if (kcg == 1) return grad_input_mma<T, 1>(s, dy, w, idx, gx, st, nwarps);
  if (kcg == 2) return grad_input_mma<T, 2>(s, dy, w, idx, gx, st, nwarps);
  return grad_input_mma<T, 4>(s, dy, w, idx, gx, st, nwarps);
}

}  // namespace
}  // namespace xmc_cuda

extern "C" int xmc_gsffi_grad_input_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *weight,
                                         const int32_t *indices, void *grad_x, xmc_exec ex) {
  using namespace xmc_cuda;
  if (s.batch == 0) return 0;
  cudaStream_t st = (cudaStream_t)ex.stream;
  switch (dt) {
    case XMC_BF16: return grad_input_half<__nv_bfloat16>(s, grad_y, weight, indices, grad_x, st);
    case XMC_F16: return grad_input_half<__half>(s, grad_y, weight, indices, grad_x, st);
    case XMC_F32: return grad_input_generic<float>(s, grad_y, weight, indices, grad_x, st);
    case XMC_F64: return grad_input_generic<double>(s, grad_y, weight, indices, grad_x, st);
  }
  return XMC_ERR_DTYPE;
}
