// The fused loss's forward, loss gradient and weight gradient of one label chunk in ONE pass (forward_loss_dw):
// bf16, groups of G = 32 labels with F = 64 fan-in slots, on Hopper's warpgroup MMA (wgmma, sm_90a). Where it
// applies, it takes the place of the loss-gradient forward followed by grad_weight (fused_loss.cu, launch_tc):
// the loss gradients leave for grad_input as before, but grad_weight no longer reads them back, and the
// gathered x is read once for both products.
//
// A warpgroup item is one group g. Its 64-row batch slices stream through the warpgroup's cp.async ring of
// x^T slices (64 slots x 64 batch entries, gathered from x^T [H, Bp] by the group's feature ids), 2 slices
// ahead and straight on across items, with the next item's weights and biases (one of two buffers) copied
// beside its first slice. Per slice:
//   forward    y (64 rows x 32 labels) = x_g (A: the slice, M-major) W_g^T (B: the weights, K-major), 4 wgmma;
//   loss       bias, rounding to bf16, then the per-logit math of the loss-gradient forward on each thread's
//              16 logits: bce_negatives8_small where the warp's 64-row slice is whole, holds no positive and no
//              logit above 8 (the common case: e^z itself, ~9 instructions per logit), loss_grad8 otherwise;
//              the positives from the chunk's bit mask;
//   dy         staged in shared memory (64-byte rows, swizzled), from where it is stored for grad_input as
//              16-byte pieces and read by the tensor cores;
//   weight     grad W_g^T (64 slots x 32 labels) += x_g^T (A: the same slice, K-major) dy (B: N-major),
//              and grad b as all-ones (A) x dy, 4 wgmma each, asynchronous: they run under the next slice's
//              copies and forward.
// The forward's wgmma waits for everything before it, so a ring stage, a dy tile and a weight buffer are
// refilled only after the tensor cores are done with them. The positives' mask words come one slice ahead.
// With 16 warps per SM and no operand fragments in registers, the loss's MUFU / FMA chains of four warps per
// scheduler overlap one another. (The mma.sync version, one warp per group, 32-row slices, 8 warps per SM, is
// in git history: 167 us per chunk at (256, 3M, 64, 32); see benchmarks/gpu_notes.md.)
#include "gsffi_forward_tile.cuh"

namespace xmc_cuda {
namespace {

constexpr int kWgs = 4, kWgThreads = 128, kFdThreads = kWgs * kWgThreads, kFdStages = 3;
constexpr int kFdSlice = 64 * 128;   // x^T of 64 slots (128-byte rows) x 64 batch entries
constexpr int kFdW = 32 * 128;       // an item's weights: 32 labels x 64 slots (128-byte rows)
constexpr int kFdDy = 64 * 64;       // dy of a slice: 64 rows x 32 labels (64-byte rows)
constexpr int kFdBias = 64;          // an item's 32 biases
constexpr int kFdOnes = 64 * 128;    // the all-ones A of the bias gradient
constexpr int kFdWgBytes = (kFdStages * kFdSlice + 2 * kFdW + 2 * kFdDy + 2 * kFdBias + 1023) / 1024 * 1024;
constexpr size_t kFdSmem = 1024 + kFdOnes + (size_t)kWgs * kFdWgBytes;  // + 1024: the base aligned up

template <class T>
struct FdArgs {
  const T *xt, *w, *bias;
  const int32_t *idx;
  T *dy, *gw, *gb;
  int64_t B, Bp, n_groups;
  FwdLoss lg;
};

template <class T, xmc_loss KIND>
__global__ void __launch_bounds__(kFdThreads, 1) fwd_loss_dw(FdArgs<T> a) {
  pdl_begin();  // launched with launch_pdl
  extern __shared__ unsigned char fd_smem[];
  const int64_t B = a.B, Bp = a.Bp, n_groups = a.n_groups, L = n_groups * 32;
  const int wg = threadIdx.x / kWgThreads, t = threadIdx.x % kWgThreads, w = t >> 5, lane = t & 31;
  const int q = lane & 3, r4 = lane >> 2;
  const int64_t wstride = (int64_t)gridDim.x * kWgs;
  const int nkb = (int)((B + 63) / 64);
  const uint32_t base0 = ((uint32_t)__cvta_generic_to_shared(fd_smem) + 1023u) & ~1023u, ones = base0;
  const uint32_t base = base0 + kFdOnes + (uint32_t)(wg * kFdWgBytes);
  const uint32_t ring = base, wbuf = ring + kFdStages * kFdSlice, dybuf = wbuf + 2 * kFdW, bbuf = dybuf + 2 * kFdDy;
  for (int i = threadIdx.x; i < kFdOnes / 4; i += kFdThreads) sts_u32(ones + 4 * i, pack2(T(), 1.f, 1.f));

  // Copy side: slice p_kb of group p_item into stage p_slot. This thread's pieces: slots t / 8 + 16 i (i < 4),
  // batch entries 8 (t % 8) .. + 7 of the slice; weights of labels t / 8 + 16 i (i < 2), slots 8 (t % 8) .. + 7.
  // All those rows are = t / 8 (mod 8), so the swizzled chunk is one per thread. Feature ids one item ahead.
  const int cc = t & 7, crow = t >> 3;
  const uint32_t cdst = (uint32_t)(crow * 128 + ((cc ^ (crow & 7)) << 4));
  const unsigned char *xcol = reinterpret_cast<const unsigned char *>(a.xt + 8 * cc);
  int64_t p_item = (int64_t)blockIdx.x * kWgs + wg;
  int p_kb = 0, p_slot = 0, p_wb = 0;
  uint32_t c_ids[4], p_ids[4];  // byte offsets of the x^T rows (2 id Bp < 2^32: forward_loss_dw_applies)
  auto load_ids = [&](int64_t g) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      p_ids[i] = g < n_groups ? (uint32_t)__ldg(a.idx + g * 64 + crow + 16 * i) * (uint32_t)(2 * Bp) : 0u;
  };
  auto start_item = [&]() {
#pragma unroll
    for (int i = 0; i < 4; ++i) c_ids[i] = p_ids[i];
    load_ids(p_item + wstride);
  };
  auto issue = [&]() {
    if (p_item < n_groups) {
      const uint32_t sb = ring + (uint32_t)(p_slot * kFdSlice) + cdst;
      // Bp is a multiple of 32: a piece is all in x^T or all past it (a zero-byte copy; its address stays in x^T)
      const int64_t col = (int64_t)p_kb * 64;
      const bool in = col + 8 * cc < Bp;
      const unsigned char *src = xcol + (in ? 2 * col : 0);
#pragma unroll
      for (int i = 0; i < 4; ++i) cp_async16(sb + 16 * 128 * i, src + c_ids[i], in ? 16 : 0);
      if (p_kb == 0) {  // the item's weights and biases
        const uint32_t wb = wbuf + (uint32_t)(p_wb * kFdW) + cdst;
        const T *ws = a.w + (p_item * 32 + crow) * 64 + 8 * cc;
#pragma unroll
        for (int i = 0; i < 2; ++i) cp_async16(wb + 16 * 128 * i, ws + 16 * 64 * i, 16);
        if (t < 4)
          cp_async16(bbuf + (uint32_t)(p_wb * kFdBias + 16 * t), a.bias != nullptr ? a.bias + p_item * 32 + 8 * t : a.w,
                     a.bias != nullptr ? 16 : 0);
        p_wb ^= 1;
      }
      if (++p_kb == nkb) {
        p_kb = 0;
        p_item += wstride;
        start_item();
      }
    }
    cp_async_commit();
    p_slot = p_slot + 1 == kFdStages ? 0 : p_slot + 1;
  };

  // Per-thread constants of the compute side: the dy tile's words this thread writes (rows 16 w + r4 (+ 8), the
  // 16-byte chunk j at j ^ (r4 >> 1 & 3)) and the pieces it stores (rows t / 4 (+ 32), chunk t % 4).
  const uint32_t dt_w = (uint32_t)((16 * w + r4) * 64 + 4 * q), dt_sw = (uint32_t)(((r4 >> 1) & 3) << 4);
  const uint32_t dt_r = (uint32_t)((t >> 2) * 64 + (((t & 3) ^ ((t >> 3) & 3)) << 4));
  constexpr uint32_t kHi128 = wg_desc_hi(1024, kSw128), kHi64 = wg_desc_hi(512, kSw64);
  const uint32_t ones_lo = wg_desc_lo(ones, 16);
  const bool want_w = a.gw != nullptr, want_b = a.gb != nullptr, want_wb = want_w || want_b;
  load_ids(p_item);
  start_item();
#pragma unroll
  for (int k = 0; k < kFdStages - 1; ++k) issue();
  __syncthreads();  // the all-ones tile
  int slot = 0, wb_c = 0, dsel = 0;
  double lane_loss = 0;
  // Each slice's copies are waited for, fenced and made visible to the warpgroup at the end of the slice before
  // (with its dy tile): one barrier per slice.
  cp_async_wait<kFdStages - 2>();
  fence_proxy_async();
  bar_sync(1 + wg, kWgThreads);
  // The positives' mask words of this thread's rows 16 w + r4 (+ 8) of a slice (the group's 32 labels), loaded
  // one slice ahead: their latency otherwise stalls every slice's loss.
  const int64_t mwords = a.lg.words, mslice = 64 * mwords;
  const uint32_t *mrow = a.lg.bits + (16 * w + r4) * mwords;
  auto mask_words = [&](int64_t g, int kb, uint32_t pw[2]) {
    const int64_t row = (int64_t)kb * 64 + 16 * w + r4;
    const uint32_t *p = mrow + kb * mslice + g;
    pw[0] = g < n_groups && row < B ? __ldg(p) : 0u;
    pw[1] = g < n_groups && row + 8 < B ? __ldg(p + 8 * mwords) : 0u;
  };
  uint32_t pw_next[2];
  mask_words((int64_t)blockIdx.x * kWgs + wg, 0, pw_next);
  for (int64_t g = (int64_t)blockIdx.x * kWgs + wg; g < n_groups; g += wstride) {
    float accw[16], accb[16], bia[4][2], item_loss = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) accw[i] = accb[i] = 0.f;
    T *dyp = a.dy + (int64_t)(t >> 2) * L + g * 32 + 8 * (t & 3);
    uint32_t w_lo = 0;
    for (int kb = 0; kb < nkb; ++kb) {
      const int64_t b0 = (int64_t)kb * 64;
      const int valid = (int)xmin<int64_t>(64, B - b0);
      const uint32_t pw[2] = {pw_next[0], pw_next[1]};
      if (kb + 1 < nkb)
        mask_words(g, kb + 1, pw_next);
      else
        mask_words(g + wstride, 0, pw_next);
      if (kb == 0) {
        w_lo = wg_desc_lo(wbuf + (uint32_t)(wb_c * kFdW), 16);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 b2 = unpack2(T(), lds_i32(bbuf + (uint32_t)(wb_c * kFdBias + 2 * (8 * j + 2 * q))));
          bia[j][0] = b2.x, bia[j][1] = b2.y;
        }
        wb_c ^= 1;
      }
      const uint32_t sb = ring + (uint32_t)(slot * kFdSlice);

      // forward: y[4 j + 2 h + e] = logit of row 16 w + r4 + 8 h, label 8 j + 2 q + e
      float y[16];
      const uint32_t x_lo = wg_desc_lo(sb, 0);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; ++k)
        wgmma_m64n32k16<1, 0>(y, wg_desc(x_lo + 128 * k, kHi128), wg_desc(w_lo + 2 * k, kHi128), k > 0);
      wgmma_commit();
      wgmma_wait<0>();  // and so the previous slice's weight gradient: its stage and dy tile are free
      wgmma_hold(y);
      wgmma_hold(accw);
      wgmma_hold(accb);
      issue();

      // loss gradients, 8 logits (one row h, labels 8 j + 2 q + e) at a time. Rows past the batch get the logit
      // -inf: no loss term, zero gradient (BCE and squared hinge alike).
      uint32_t ga[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 4; ++j) ga[h][j] = pack2(T(), y[4 * j + 2 * h] + bia[j][0], y[4 * j + 2 * h + 1] + bia[j][1]);
      const bool small = small_logits8<T>(make_uint4(ga[0][0], ga[0][1], ga[0][2], ga[0][3])) &&
                         small_logits8<T>(make_uint4(ga[1][0], ga[1][1], ga[1][2], ga[1][3]));
      if (KIND == XMC_LOSS_BCE && valid == 64 && !__any_sync(0xffffffffu, (pw[0] | pw[1]) != 0u || !small)) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint4 g8 =
              bce_negatives8_small<T>(make_uint4(ga[h][0], ga[h][1], ga[h][2], ga[h][3]), a.lg.zscale, item_loss);
          ga[h][0] = g8.x, ga[h][1] = g8.y, ga[h][2] = g8.z, ga[h][3] = g8.w;
        }
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t pos = 0;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (16 * w + r4 + 8 * h >= valid) ga[h][j] = 0xff80ff80u;
            pos |= ((pw[h] >> (8 * j + 2 * q)) & 3u) << (2 * j);
          }
          const uint4 g8 = loss_grad8<T, KIND>(make_uint4(ga[h][0], ga[h][1], ga[h][2], ga[h][3]), pos, 8,
                                               a.lg.zscale, item_loss);
          ga[h][0] = g8.x, ga[h][1] = g8.y, ga[h][2] = g8.z, ga[h][3] = g8.w;
        }
      }

      // dy tile: row r (64 bytes) keeps its 16-byte chunk j (labels 8 j ..) at j ^ (r >> 1 & 3)
      const uint32_t dt = dybuf + (uint32_t)(dsel * kFdDy);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 4; ++j) sts_u32(dt + dt_w + 512 * h + (((uint32_t)j << 4) ^ dt_sw), ga[h][j]);
      cp_async_wait<kFdStages - 2>();  // the next slice's copies
      fence_proxy_async();
      bar_sync(1 + wg, kWgThreads);
      if (want_wb) {  // both products or neither: the tensor cores' time is not the limit, a branch per wgmma is
        const uint32_t dy_lo = wg_desc_lo(dt, 0), xk_lo = wg_desc_lo(sb, 16);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint64_t bd = wg_desc(dy_lo + 64 * k, kHi64);
          wgmma_m64n32k16<0, 1>(accw, wg_desc(xk_lo + 2 * k, kHi128), bd, true);
          wgmma_m64n32k16<0, 1>(accb, wg_desc(ones_lo + 2 * k, kHi128), bd, true);
        }
        wgmma_commit();
      }
      // dy out: 64 rows x 4 pieces of 16 bytes, two per thread
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint4 v = lds_u32x4(dt + dt_r + 2048 * i);
        if ((t >> 2) + 32 * i < valid) __stcs(reinterpret_cast<uint4 *>(dyp + 32 * i * L), v);
      }
      dyp += 64 * L;
      slot = slot + 1 == kFdStages ? 0 : slot + 1;
      dsel ^= 1;
    }
    wgmma_wait<0>();
    wgmma_hold(accw);
    wgmma_hold(accb);
    // the group's weight gradient (slot 16 w + r4 + 8 h, label 8 j + 2 q + e) and bias gradient (every row of
    // the all-ones product holds it; warp 0's row 0 stores)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t l = g * 32 + 8 * j + 2 * q + e;
        if (want_w)
#pragma unroll
          for (int h = 0; h < 2; ++h) put(a.gw + l * 64 + 16 * w + r4 + 8 * h, accw[4 * j + 2 * h + e]);
        if (want_b && t < 4) put(a.gb + l, accb[4 * j + e]);
      }
    lane_loss += item_loss;
  }
  cp_async_wait<0>();
  // the block's loss sum in a fixed order: lanes by a butterfly, then warps
  __shared__ double red[kFdThreads / 32];
  double sum = lane_loss;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) red[threadIdx.x >> 5] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int i = 0; i < kFdThreads / 32; ++i) total += red[i];
    a.lg.part[blockIdx.x] = total;
  }
}

}  // namespace

bool forward_loss_dw_applies(xmc_gsffi_shape s, xmc_dtype dt, const void *w, const void *bias) {
#ifdef XMC_SM90A
  auto al = [](const void *p, uintptr_t n) { return p == nullptr || (uintptr_t)p % n == 0; };
  const bool hopper = device_attr<cudaDevAttrComputeCapabilityMajor>() == 9 &&
                      device_attr<cudaDevAttrComputeCapabilityMinor>() == 0;
  return hopper && dt == XMC_BF16 && s.group_size == 32 && s.fan_in == 64 && s.out_features % 32 == 0 &&
         s.batch > 64 && s.in_features * xt_cols(s.batch) < ((int64_t)1 << 31) && al(w, 16) && al(bias, 16) &&
         (int64_t)kFdSmem <= (int64_t)smem_optin() && num_sms() <= forward_loss_parts();
#else
  return false;  // built without sm_90a: no wgmma
#endif
}

int forward_loss_dw(xmc_gsffi_shape s, const void *xt, const void *w, const int32_t *idx, const void *bias,
                    void *dy, void *gw, void *gb, FwdLoss lg, cudaStream_t st) {
  using T = __nv_bfloat16;
  FdArgs<T> a{static_cast<const T *>(xt), static_cast<const T *>(w), static_cast<const T *>(bias), idx,
              static_cast<T *>(dy), static_cast<T *>(gw), static_cast<T *>(gb), s.batch, xt_cols(s.batch),
              s.out_features / 32, lg};
  auto kernel = lg.kind == XMC_LOSS_BCE ? fwd_loss_dw<T, XMC_LOSS_BCE> : fwd_loss_dw<T, XMC_LOSS_SQUARED_HINGE>;
  const int per_sm = prepare(kernel, kFdThreads, kFdSmem);
  XMC_CHECK_LAUNCH();
  if (per_sm < 1) return XMC_ERR_NOMEM;
  const int64_t blocks = xmin<int64_t>(num_sms(), (a.n_groups + kWgs - 1) / kWgs);
  launch_pdl(kernel, dim3((unsigned)blocks), dim3(kFdThreads), kFdSmem, st, a);
  return last_error();
}

}  // namespace xmc_cuda
