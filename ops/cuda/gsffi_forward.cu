// GSFFI forward on CUDA: y[b, l] = bias[l] + sum_t x[b, indices[l / G, t]] * weight[l, t].
//
// Tensor-core path (bf16/fp16): a persistent block keeps a batch tile of x transposed in shared memory
// (row h = x[b0 .. b0 + BT, h]), so a group's gather is free: ldmatrix takes one row address per lane, and each
// lane passes the row of its own feature id. A warp takes one work item (a group, or NW of its labels), loads
// those labels' weights ONCE into registers as mma B fragments (16-byte loads, see gsffi_common.cuh), and
// sweeps the whole batch tile with them. Blocks of the same label range but different batch tiles run side by
// side (block id = chunk * n_tiles + tile), so weights come from DRAM once and from L2 for the other tiles.
// The output, the largest stream, leaves in whole sectors with evict-first stores.
//
// Filter mode (forward_filter, for the fused top-k): no output; each logit, rounded to the dtype, that is not
// below its row's threshold is appended to the row's candidate list (an atomic count per row, so the order of a
// list is not fixed, only its set). Gated mode (forward_gated): the kernel returns at once unless *run_if.
#include "gsffi_common.cuh"

namespace xmc_cuda {
namespace {

constexpr int kFwdThreads = 512;
// A warp's 8 x NW output staging tile (NW <= 32): rows of 64 bytes, the 16-byte chunk c of row r at chunk
// c ^ out_swz(r). The 4-byte writes (8 rows x 4 lanes per instruction) and the 16-byte reads (two rows per
// quarter-warp for NW = 32, four half rows for NW = 16) then each fall on distinct banks; the earlier 80-byte
// rows made every 16-byte read take two wavefronts (ncu: 12 M for 6 M ideal per read instruction).
constexpr int kStageRow = 32 * 2;
constexpr int kStageBytes = kFwdThreads / 32 * 8 * kStageRow;

__device__ __forceinline__ int out_swz(int r) { return ((r >> 1) & 1) << 1 | (r >> 2); }  // bits of r >> 1 reversed

__device__ __forceinline__ float max_nan(float a, float b) {  // NaN if either is
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// The value that a logit has once stored in T.
__device__ __forceinline__ float rounded(__nv_bfloat16, float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float rounded(__half, float v) { return __half2float(__float2half_rn(v)); }

// The two 16-bit values of a word (low first) as floats.
__device__ __forceinline__ float2 unpack2(__nv_bfloat16, uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}
__device__ __forceinline__ float2 unpack2(__half, uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2 *>(&v));
}

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

template <class T, int NW, int KC, bool FILTER>
__global__ void __launch_bounds__(kFwdThreads, 1)
    fwd_mma(const T *__restrict__ x, const T *__restrict__ w, const int32_t *__restrict__ idx,
            const T *__restrict__ bias, T *__restrict__ y, int64_t B, int H, int64_t L, int F, int G, int BT, int nbt,
            int nj, int64_t n_items, bool x_vec, bool y_vec, const int *run_if, FwdFilter flt) {
  if (run_if != nullptr && *run_if == 0) return;
  extern __shared__ __align__(16) unsigned char smem[];
  const int stride = BT * 2 + 16;  // bytes per row; the 16-byte skew puts consecutive rows on other banks
  const int bt = blockIdx.x % nbt;
  const int64_t b0 = (int64_t)bt * BT;
  const int rows = (int)xmin<int64_t>(BT, B - b0);

  // Fill x^T: rows 0..H-1 from x, row H zeros (padded fan-in slots point there), columns >= rows zeros.
  const int hchunks = (H + 8) / 8;  // 8 features per step, row H included
  for (int e = threadIdx.x; e < BT * hchunks; e += blockDim.x) {
    const int hc = e / BT, r = e - hc * BT, h0 = hc * 8;  // r fastest: the 2-byte stores of a warp share no bank
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < rows && h0 < H) v = load_elems<8>(x + (b0 + r) * H + h0, H - h0, x_vec);
    const uint16_t *pv = reinterpret_cast<const uint16_t *>(&v);
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (h0 + k <= H) *reinterpret_cast<uint16_t *>(smem + (size_t)(h0 + k) * stride + r * 2) = pv[k];
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane & 3, r4 = lane >> 2;
  const int nwarps = blockDim.x >> 5;
  const int64_t wstride = (int64_t)(gridDim.x / nbt) * nwarps;
  // ldmatrix.x4.trans: lane 8i + r gives row r of matrix i; i & 1 picks the batch half, i >> 1 the k half.
  const int kappa = ((lane >> 4) << 3) | (lane & 7);
  const int kperm = 8 * ((kappa & 7) >> 1) + 2 * (kappa >> 3) + (kappa & 1);
  const uint32_t xs_base = (uint32_t)__cvta_generic_to_shared(smem) + ((lane >> 3) & 1) * 16;
  const int mtiles = (rows + 15) >> 4;
  unsigned char *stage = smem + (size_t)(H + 1) * stride + warp * 8 * kStageRow;

  // Filter mode: each row's threshold and its lowered screen value, in the staging area that this mode does not
  // use (rows past the batch never pass the screen).
  const float2 *thr = reinterpret_cast<const float2 *>(smem + (size_t)(H + 1) * stride);
  if constexpr (FILTER) {
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
  int64_t item = (int64_t)(blockIdx.x / nbt) * nwarps + warp;
  int64_t g = item / nj;
  int j = (int)(item - g * nj);
  const int64_t gstep = wstride / nj;
  const int jstep = (int)(wstride - gstep * nj);
  const bool bias_pairs = (G & 1) == 0 && (reinterpret_cast<uintptr_t>(bias) & 3) == 0;
  for (; item < n_items; item += wstride, g += gstep, j += jstep) {
    if (j >= nj) j -= nj, ++g;
    const int64_t l0 = g * G + (int64_t)j * NW;
    const int64_t lend = xmin<int64_t>(g * G + G, L);

    uint4 wf[NW / 8][KC];
    uint32_t aoff[KC][2];
    float bia[NW / 8][2];
    load_item<T, NW, KC>(w, idx, bias, g, l0, lend, F, H, stride, xs_base, q, r4, kperm, bias_pairs, wf, aoff, bia);

    for (int mt = 0; mt < mtiles; ++mt) {
      float2 taus[2];  // filter mode: the rows' thresholds, loaded before the products need them
      if constexpr (FILTER)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) taus[hh] = thr[mt * 16 + 8 * hh + r4];
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
      if constexpr (FILTER) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          // First the largest of the thread's NW / 4 logits of this row (NaN wins), against the lowered threshold.
          float part[NW / 8];  // a pairwise tree, not a chain of NW / 4 dependent maxima
#pragma unroll
          for (int nt = 0; nt < NW / 8; ++nt)
            part[nt] = max_nan(acc[nt][2 * hh] + bia[nt][0], acc[nt][2 * hh + 1] + bia[nt][1]);
#pragma unroll
          for (int w = 1; w < NW / 8; w *= 2)
#pragma unroll
            for (int nt = 0; nt + w < NW / 8; nt += 2 * w) part[nt] = max_nan(part[nt], part[nt + w]);
          const int row = mt * 16 + 8 * hh + r4;
          if (part[0] < taus[hh].x || row >= rows) continue;
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
              const uint4 v = *reinterpret_cast<const uint4 *>(stage + r8 * kStageRow + ((c ^ out_swz(r8)) << 4));
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
  }
}

// Any dtype and shape: one thread per output, accumulating in AccT.
template <class T>
__global__ void fwd_generic(const T *__restrict__ x, const T *__restrict__ w, const int32_t *__restrict__ idx,
                            const T *__restrict__ bias, T *__restrict__ y, int64_t B, int64_t H, int64_t L, int64_t F,
                            int64_t G) {
  using A = typename AccT<T>::type;
  const int64_t n = B * L;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = e / L, l = e - b * L;
    const T *xr = x + b * H, *wr = w + l * F;
    const int32_t *ir = idx + (l / G) * F;
    A acc = 0;
    for (int64_t t = 0; t < F; ++t) acc += (A)to_acc(xr[ir[t]]) * (A)to_acc(wr[t]);
    if (bias != nullptr) acc += (A)to_acc(bias[l]);
    put(y + e, acc);
  }
}

template <class T>
int launch_generic(xmc_gsffi_shape s, const void *x, const void *w, const int32_t *idx, const void *bias, void *y,
                   cudaStream_t st) {
  const int threads = 256;
  const int64_t blocks = xmin<int64_t>((s.batch * s.out_features + threads - 1) / threads, (int64_t)num_sms() * 32);
  fwd_generic<T><<<(unsigned)blocks, threads, 0, st>>>((const T *)x, (const T *)w, idx, (const T *)bias, (T *)y,
                                                       s.batch, s.in_features, s.out_features, s.fan_in,
                                                       s.group_size);
  XMC_CHECK_LAUNCH();
  return 0;
}

// Optional parts of a tensor-core forward launch: the gate, and filter mode (flt.tau set) instead of an output.
struct FwdMode {
  const int *run_if;
  FwdFilter flt;
};

template <class T, int NW, int KC>
int launch_mma(xmc_gsffi_shape s, const void *x, const void *w, const int32_t *idx, const void *bias, void *y,
               cudaStream_t st, int BT, FwdMode mode) {
  const size_t smem = (size_t)(s.in_features + 1) * (BT * 2 + 16) + kStageBytes;
  auto kernel = mode.flt.tau != nullptr ? fwd_mma<T, NW, KC, true> : fwd_mma<T, NW, KC, false>;
  const int per_sm = prepare(kernel, kFwdThreads, smem);
  XMC_CHECK_LAUNCH();
  const int nbt = (int)((s.batch + BT - 1) / BT);
  const int nj = (int)((s.group_size + NW - 1) / NW);
  const int64_t n_groups = (s.out_features + s.group_size - 1) / s.group_size;
  const int64_t n_items = n_groups * nj;
  const int64_t warps = kFwdThreads / 32;
  int64_t chunks = xmax<int64_t>(1, (int64_t)num_sms() * xmax(per_sm, 1) / nbt);
  chunks = xmin<int64_t>(chunks, (n_items + warps - 1) / warps);
  const bool x_vec = s.in_features % 8 == 0 && (uintptr_t)x % 16 == 0;
  const bool y_vec = s.out_features % 8 == 0 && s.group_size % 8 == 0 && (uintptr_t)y % 16 == 0;
  kernel<<<(unsigned)(chunks * nbt), kFwdThreads, smem, st>>>(
      (const T *)x, (const T *)w, idx, (const T *)bias, (T *)y, s.batch, (int)s.in_features, s.out_features,
      (int)s.fan_in, (int)s.group_size, BT, nbt, nj, n_items, x_vec, y_vec, mode.run_if, mode.flt);
  XMC_CHECK_LAUNCH();
  return 0;
}

// Picks NW (labels per warp item, at most 32: 64 spills under the 128-register cap of 512 threads) and KC
// (32-wide fan-in chunks) so the weight fragments stay <= 64 registers.
template <class T>
int launch_mma_sized(xmc_gsffi_shape s, const void *x, const void *w, const int32_t *idx, const void *bias, void *y,
                     cudaStream_t st, int BT, FwdMode mode) {
  const int64_t G8 = (s.group_size + 7) / 8 * 8;
  const int kc = s.fan_in <= 32 ? 1 : s.fan_in <= 64 ? 2 : s.fan_in <= 128 ? 4 : 8;
  const int cap = 128 / kc;  // NW * KC <= 128
  const int nw = (int)xmin<int64_t>(G8 <= 8 ? 8 : G8 <= 16 ? 16 : 32, cap);
#define XMC_FWD(NW_, KC_) \
  if (nw == NW_ && kc == KC_) return launch_mma<T, NW_, KC_>(s, x, w, idx, bias, y, st, BT, mode);
  XMC_FWD(8, 1) XMC_FWD(16, 1) XMC_FWD(32, 1)
  XMC_FWD(8, 2) XMC_FWD(16, 2) XMC_FWD(32, 2)
  XMC_FWD(8, 4) XMC_FWD(16, 4) XMC_FWD(32, 4)
  XMC_FWD(8, 8) XMC_FWD(16, 8)
#undef XMC_FWD
  return XMC_ERR_DTYPE;  // not reached: every (nw, kc) that the sizing above picks is instantiated
}

// Batch tile for the tensor-core path: the largest of 128/64/32/16 rows (no more than the batch needs) whose
// x^T tile fits in shared memory; 0 if none does.
int forward_batch_tile(xmc_gsffi_shape s) {
  const int64_t limit = smem_optin();
  int bt = 16;
  while (bt < 128 && bt < s.batch) bt *= 2;
  for (; bt >= 16; bt /= 2)
    if ((s.in_features + 1) * (int64_t)(bt * 2 + 16) + kStageBytes <= limit) return bt;
  return 0;
}

// Batch tile of the tensor-core path, or 0 where the shape takes the generic kernel.
int tensor_core_tile(xmc_gsffi_shape s, const void *w) {
  const bool ok = s.fan_in % 8 == 0 && s.fan_in <= 256 && (uintptr_t)w % 16 == 0;
  return ok ? forward_batch_tile(s) : 0;
}

template <class T>
int forward_half(xmc_gsffi_shape s, const void *x, const void *w, const int32_t *idx, const void *bias, void *y,
                 cudaStream_t st, FwdMode mode) {
  const int BT = tensor_core_tile(s, w);
  if (BT == 0) {
    if (mode.run_if != nullptr || mode.flt.tau != nullptr) return XMC_ERR_DTYPE;  // callers check filter_applies
    return launch_generic<T>(s, x, w, idx, bias, y, st);
  }
  return launch_mma_sized<T>(s, x, w, idx, bias, y, st, BT, mode);
}

int forward_mode(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *w, const int32_t *idx,
                 const void *bias, void *y, cudaStream_t st, FwdMode mode) {
  if (s.batch == 0 || s.out_features == 0) return 0;
  if (dt == XMC_BF16) return forward_half<__nv_bfloat16>(s, x, w, idx, bias, y, st, mode);
  if (dt == XMC_F16) return forward_half<__half>(s, x, w, idx, bias, y, st, mode);
  return XMC_ERR_DTYPE;
}

}  // namespace

bool filter_applies(xmc_gsffi_shape s, const void *w) { return tensor_core_tile(s, w) != 0; }

int forward_filter(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *w, const int32_t *idx,
                   const void *bias, FwdFilter flt, cudaStream_t st) {
  return forward_mode(s, dt, x, w, idx, bias, nullptr, st, {nullptr, flt});
}

int forward_gated(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *w, const int32_t *idx,
                  const void *bias, void *y, const int *run_if, cudaStream_t st) {
  return forward_mode(s, dt, x, w, idx, bias, y, st, {run_if, {}});
}

}  // namespace xmc_cuda

extern "C" int xmc_gsffi_forward_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                                      const int32_t *indices, const void *bias, void *y, xmc_exec ex) {
  using namespace xmc_cuda;
  if (s.batch == 0 || s.out_features == 0) return 0;
  cudaStream_t st = (cudaStream_t)ex.stream;
  switch (dt) {
    case XMC_BF16:
    case XMC_F16: return forward_mode(s, dt, x, weight, indices, bias, y, st, {});
    case XMC_F32: return launch_generic<float>(s, x, weight, indices, bias, y, st);
    case XMC_F64: return launch_generic<double>(s, x, weight, indices, bias, y, st);
  }
  return XMC_ERR_DTYPE;
}

extern "C" const char *xmc_cuda_error_string(int code) {
  if (code == XMC_ERR_DTYPE) return "unsupported dtype";
  if (code == XMC_ERR_NOMEM) return "out of device memory for scratch buffers";
  return cudaGetErrorString((cudaError_t)code);
}
