// The fused loss's forward, loss gradient and weight gradient of one label chunk in ONE pass (forward_loss_dw):
// bf16, groups of G = 32 labels with F = 64 fan-in slots. Where it applies, it takes the place of the
// loss-gradient forward followed by grad_weight (fused_loss.cu, launch_tc): the loss gradients leave for
// grad_input as before, but grad_weight no longer reads them back, and the gathered x is read once for both
// products.
//
// A warp item is one group g. Its 32-row batch chunks stream through the warp's cp.async ring of x^T slices
// (64 slots x 32 batch entries, gathered from x^T [H, Bp] by the group's feature ids), 3 chunks ahead and
// straight on across items, with the next item's weights and biases (one of two buffers) copied beside its
// first chunk. Per chunk:
//   forward    y^T (32 labels x 32 rows) = W_g (A, ldmatrix) x^T (B, ldmatrix.trans), 32 mma;
//   loss       bias, rounding to bf16, then loss_grad8 (the same per-logit math as the loss-gradient forward)
//              on 8 logits at a time, taken so that its results are the weight gradient's A fragments; the
//              positives from the chunk's bit mask;
//   dy out     each 8 x 8 block transposed in registers (movmatrix), staged per warp, stored as 64-byte rows;
//   weight     grad W_g (32 x 64) += dy^T (A: the loss gradients' registers as they are, no shuffle) x x
//              (B, ldmatrix of the same slice), plus one mma per tile with an all-ones B for the bias gradient.
// The forward's k order is the layer forward's (gsffi_common.cuh: logical k 2q, 2q + 1, 2q + 8, 2q + 9 of k16
// step s are physical slots 8q + 4s .. 8q + 4s + 3 of a 32-slot half), so the logits, and so the loss and its
// gradients, are bitwise those of the separate kernels. The x^T rows of an ldmatrix follow it through their
// addresses. The weights are copied 4 bytes at a time into the order ldmatrix wants: label row l (128 bytes)
// holds 16-byte piece c = 4 kc + 2 s + h (words q = 0..3: physical slots 32 kc + 8 q + 4 s + 2 h, + 1) at
// c ^ (l & 7), so a fragment is one ldmatrix per slice, free of bank conflicts. (Held in registers across an
// item, the fragments were copied before every mma: ~120 moves per slice, and 26 more registers.)
//
// A slice's slot row r (64 bytes) keeps its 16-byte chunk c at c ^ ((r >> 1 ^ r >> 3) & 3): both the forward's
// rows (slots {0, 1, 8, 9, 16, 17, 24, 25} + const) and the weight gradient's (8 consecutive slots) then fall
// on 8 distinct 16-byte bank groups.
#include "gsffi_forward_tile.cuh"

namespace xmc_cuda {
namespace {

constexpr int kFdWarps = 8, kFdThreads = 32 * kFdWarps, kFdStages = 4;
constexpr int kFdSlice = 64 * 64;          // x^T of 64 slots x 32 batch entries
constexpr int kFdW = 32 * 64 * 2 + 64;     // an item's weights (32 labels x 64 slots) and its 32 biases
constexpr int kFdOut = 32 * 64;            // dy staging: 32 rows x 32 labels
constexpr int kFdWarpBytes = kFdStages * kFdSlice + 2 * kFdW + kFdOut;
constexpr size_t kFdSmem = (size_t)kFdWarps * kFdWarpBytes;

__device__ __forceinline__ int fd_swz(int r) { return ((r >> 1) ^ (r >> 3)) & 3; }

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
  extern __shared__ __align__(16) unsigned char fd_smem[];
  const T *__restrict__ xt = a.xt;
  const int64_t B = a.B, Bp = a.Bp, n_groups = a.n_groups, L = n_groups * 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane & 3, r4 = lane >> 2;
  const int64_t wstride = (int64_t)gridDim.x * kFdWarps;
  const int nkb = (int)((B + 31) / 32);
  const uint32_t base = (uint32_t)__cvta_generic_to_shared(fd_smem) + (uint32_t)(warp * kFdWarpBytes);
  const uint32_t ring = base, wbuf = base + kFdStages * kFdSlice, out = wbuf + 2 * kFdW;

  // Copy side: chunk p_kb of group p_item into slice p_slot; this lane's pieces are slots lane / 4 + 8 j,
  // batch entries 8 (lane % 4) .. + 7 of the chunk. Feature ids one item ahead (their latency otherwise
  // stalls the copies once per item).
  int64_t p_item = (int64_t)blockIdx.x * kFdWarps + warp;
  int p_kb = 0, p_slot = 0, p_wb = 0;
  uint32_t c_ids[8], p_ids[8];  // element offsets of the x^T rows (id * Bp < 2^31: forward_loss_dw_applies)
  auto load_ids = [&](int64_t g) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      p_ids[j] = g < n_groups ? (uint32_t)__ldg(a.idx + g * 64 + lane / 4 + 8 * j) * (uint32_t)Bp : 0u;
  };
  auto start_item = [&]() {
#pragma unroll
    for (int j = 0; j < 8; ++j) c_ids[j] = p_ids[j];
    load_ids(p_item + wstride);
  };
  // weight pair p = lane (slots 2 p, 2 p + 1) of every label row: physical k 8 q + 4 s + 2 h (+ 1) of half kc
  const int w_cc = 4 * (lane >> 4) + 2 * ((lane >> 1) & 1) + (lane & 1), w_q4 = 4 * ((lane >> 2) & 3);
  auto issue = [&]() {
    if (p_item < n_groups) {
      const uint32_t sb = ring + (uint32_t)(p_slot * kFdSlice);
      const T *src = xt + p_kb * 32 + 8 * (lane & 3);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int slot = lane / 4 + 8 * j, c = lane & 3;
        cp_async16(sb + slot * 64 + ((c ^ fd_swz(slot)) << 4), src + c_ids[j], 16);
      }
      if (p_kb == 0) {  // the item's weights, 4 bytes a copy (the layout above), and biases
        const uint32_t wb = wbuf + (uint32_t)(p_wb * kFdW);
        const T *ws = a.w + p_item * 32 * 64 + 2 * lane;
#pragma unroll
        for (int l = 0; l < 32; ++l) cp_async4(wb + l * 128 + (((w_cc ^ (l & 7)) << 4) | w_q4), ws + l * 64);
        if (lane < 4)
          cp_async16(wb + 4096 + lane * 16, a.bias != nullptr ? a.bias + p_item * 32 + lane * 8 : a.w,
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

  // Per-lane ldmatrix offsets within a slice, the same for every chunk. Forward (x4.trans), for 32-slot half
  // kc, k16 step s and n-tile pair pp: matrix m = lane / 8 is n-tile 2 pp + m / 2, fragment b(m % 2); its row
  // i = lane % 8 is logical k 8 (m % 2) + i, physical slot 32 kc + 4 s + 2 (m % 2) + 8 (i / 2) + i % 2.
  uint32_t fo[2][2][2];
#pragma unroll
  for (int kc = 0; kc < 2; ++kc)
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int pp = 0; pp < 2; ++pp) {
        const int m = lane >> 3, i = lane & 7;
        const int slot = 32 * kc + 4 * s + 2 * (m & 1) + 8 * (i >> 1) + (i & 1), c = 2 * pp + (m >> 1);
        fo[kc][s][pp] = (uint32_t)(slot * 64 + ((c ^ fd_swz(slot)) << 4));
      }
  // Weight gradient (x4), slot tile nt: matrix m is k16 step m / 2, fragment b(m % 2) (batch entries
  // 16 (m / 2) + 8 (m % 2) .. + 7: chunk m); its row i is slot 8 nt + i.
  uint32_t wo[8];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const int slot = 8 * nt + (lane & 7), c = lane >> 3;
    wo[nt] = (uint32_t)(slot * 64 + ((c ^ fd_swz(slot)) << 4));
  }
  // Forward A (x4) from the item's weights, half kc, k16 step s: matrix m is word u = m of the fragment, labels
  // 8 (m % 2) + lane % 8 (+ 16 mt), its row the 16-byte piece 4 kc + 2 s + m / 2 of the label.
  uint32_t wo_a[2][2];
#pragma unroll
  for (int kc = 0; kc < 2; ++kc)
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int m = lane >> 3, l = 8 * (m & 1) + (lane & 7), c = 4 * kc + 2 * s + (m >> 1);
      wo_a[kc][s] = (uint32_t)(l * 128 + ((c ^ (l & 7)) << 4));
    }
  const uint32_t ones = pack2(T(), 1.f, 1.f);
  const bool want_b = a.gb != nullptr;

  load_ids(p_item);
  start_item();
#pragma unroll
  for (int k = 0; k < kFdStages - 1; ++k) issue();
  int slot = 0, wb_c = 0;
  double lane_loss = 0;
  for (int64_t g = (int64_t)blockIdx.x * kFdWarps + warp; g < n_groups; g += wstride) {
    float accw[2][8][4], accb[2][4], item_loss = 0.f;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      accb[mt][0] = accb[mt][1] = accb[mt][2] = accb[mt][3] = 0.f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) accw[mt][nt][0] = accw[mt][nt][1] = accw[mt][nt][2] = accw[mt][nt][3] = 0.f;
    }
    // The item's weights and biases, read by every chunk of the item: their buffer is refilled for item g + 2,
    // 3 chunks ahead, so at the earliest at item g + 1's first chunk (B > 64: at least 3 chunks per item).
    uint32_t wcur = 0;
    float bia[2][2];
    for (int kb = 0; kb < nkb; ++kb) {
      const int64_t b0 = (int64_t)kb * 32;
      // the chunk's positives: this lane's row's mask word of the group's 32 labels
      const uint32_t pw = b0 + lane < B ? __ldg(a.lg.bits + (b0 + lane) * a.lg.words + g) : 0u;
      cp_async_wait<kFdStages - 2>();
      __syncwarp();  // every lane's copies of this slice are in; every lane is done with the slice issue() refills
      if (kb == 0) {
        const uint32_t wb = wbuf + (uint32_t)(wb_c * kFdW);
        wcur = wb;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) bia[mt][h] = unpack2(T(), lds_u16(wb + 4096 + 2 * (16 * mt + 8 * h + r4))).x;
        wb_c ^= 1;
      }
      issue();
      const uint32_t sb = ring + (uint32_t)(slot * kFdSlice);

      // forward: y[mt][nt] = logits of labels 16 mt + r4 (+ 8: [2], [3]) at rows 8 nt + 2 q, + 1
      float y[2][4][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) y[mt][nt][0] = y[mt][nt][1] = y[mt][nt][2] = y[mt][nt][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < 2; ++kc)
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          uint32_t bx[2][4], wa[2][4];
          ldsm_x4_trans(bx[0], sb + fo[kc][s][0]);
          ldsm_x4_trans(bx[1], sb + fo[kc][s][1]);
          ldsm_x4(wa[0], wcur + wo_a[kc][s]);
          ldsm_x4(wa[1], wcur + wo_a[kc][s] + 16 * 128);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
              mma16816(T(), y[mt][nt], wa[mt], bx[nt >> 1][2 * (nt & 1)], bx[nt >> 1][2 * (nt & 1) + 1]);
        }

      // loss gradients, computed 8 at a time on the weight gradient's A fragments ga[mt][ks] (m tile mt, k16
      // step ks): word u is label 16 mt + 8 (u & 1) + r4 at rows 16 ks + 8 (u >> 1) + 2 q, + 1. Rows past the
      // batch get the logit -inf: no loss term, zero gradient (BCE and squared hinge alike).
      const int valid = (int)xmin<int64_t>(32, B - b0);
      const bool anyp = __any_sync(0xffffffffu, pw != 0u);
      uint32_t ga[2][2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int ks = 0; ks < 2; ++ks)
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int h = u & 1, nt = 2 * ks + (u >> 1);
            ga[mt][ks][u] = pack2(T(), y[mt][nt][2 * h] + bia[mt][h], y[mt][nt][2 * h + 1] + bia[mt][h]);
          }
      if (KIND == XMC_LOSS_BCE && valid == 32 && !anyp) {  // the common case: 32 negatives side by side
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int ks = 0; ks < 2; ++ks) {
            const uint4 g = bce_negatives8<T>(make_uint4(ga[mt][ks][0], ga[mt][ks][1], ga[mt][ks][2], ga[mt][ks][3]),
                                              a.lg.zscale, item_loss);
            ga[mt][ks][0] = g.x, ga[mt][ks][1] = g.y, ga[mt][ks][2] = g.z, ga[mt][ks][3] = g.w;
          }
      } else {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int ks = 0; ks < 2; ++ks) {
            uint32_t pos = 0;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const int h = u & 1, nt = 2 * ks + (u >> 1), row = 8 * nt + 2 * q;
              if (row >= valid) ga[mt][ks][u] = (ga[mt][ks][u] & 0xffff0000u) | 0xff80u;
              if (row + 1 >= valid) ga[mt][ks][u] = (ga[mt][ks][u] & 0x0000ffffu) | 0xff800000u;
#pragma unroll
              for (int j = 0; j < 2; ++j) {
                const uint32_t wr = __shfl_sync(0xffffffffu, pw, row + j);
                pos |= ((wr >> (16 * mt + 8 * h + r4)) & 1u) << (2 * u + j);
              }
            }
            const uint4 g = loss_grad8<T, KIND>(make_uint4(ga[mt][ks][0], ga[mt][ks][1], ga[mt][ks][2], ga[mt][ks][3]),
                                                pos, 8, a.lg.zscale, item_loss);
            ga[mt][ks][0] = g.x, ga[mt][ks][1] = g.y, ga[mt][ks][2] = g.z, ga[mt][ks][3] = g.w;
          }
      }

      // dy out: each 8 x 8 block (labels x rows) transposed to rows x labels, staged, then 64-byte rows
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            const int k = 2 * mt + h;  // 16-byte chunk: labels 8 k .. 8 k + 7
            sts_u32(out + (8 * nt + r4) * 64 + ((k ^ out_swz(r4)) << 4) + 4 * q,
                    movm_trans(ga[mt][nt >> 1][h + 2 * (nt & 1)]));
          }
      __syncwarp();
#pragma unroll
      for (int it = 0; it < 4; ++it) {
        const int r = 8 * it + (lane >> 2), c = lane & 3;
        const uint4 v = lds_u32x4(out + r * 64 + ((c ^ out_swz(lane >> 2)) << 4));
        if (r < valid) __stcs(reinterpret_cast<uint4 *>(a.dy + (b0 + r) * L + g * 32 + 8 * c), v);
      }
      __syncwarp();

      // weight gradient: A (labels x rows) straight from g8
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        uint32_t bw[4];
        ldsm_x4(bw, sb + wo[nt]);
#pragma unroll
        for (int ks = 0; ks < 2; ++ks)
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816(T(), accw[mt][nt], ga[mt][ks], bw[2 * ks], bw[2 * ks + 1]);
            if (nt == 0 && want_b) mma16816(T(), accb[mt], ga[mt][ks], ones, ones);
          }
      }
      slot = slot + 1 == kFdStages ? 0 : slot + 1;
    }
    // the group's weight gradient (label 16 mt + 8 h + r4, slots 8 nt + 2 q, + 1) and bias gradient
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t l = g * 32 + 16 * mt + 8 * h + r4;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          *reinterpret_cast<uint32_t *>(a.gw + l * 64 + 8 * nt + 2 * q) =
              pack2(T(), accw[mt][nt][2 * h], accw[mt][nt][2 * h + 1]);
        if (want_b && q == 0) put(a.gb + l, accb[mt][2 * h]);
      }
    lane_loss += item_loss;
  }
  cp_async_wait<0>();
  // the block's loss sum in a fixed order: lanes by a butterfly, then warps
  __shared__ double red[kFdWarps];
  double sum = lane_loss;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) red[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int w = 0; w < kFdWarps; ++w) total += red[w];
    a.lg.part[blockIdx.x] = total;
  }
}

}  // namespace

bool forward_loss_dw_applies(xmc_gsffi_shape s, xmc_dtype dt, const void *w, const void *bias, const void *dy,
                             const void *gw, const void *gb) {
  auto al = [](const void *p, uintptr_t n) { return p == nullptr || (uintptr_t)p % n == 0; };
  return dt == XMC_BF16 && s.group_size == 32 && s.fan_in == 64 && s.out_features % 32 == 0 && s.batch > 64 &&
         s.in_features * xt_cols(s.batch) < ((int64_t)1 << 31) &&
         gw != nullptr && al(w, 16) && al(bias, 16) && al(dy, 16) && al(gw, 4) &&
         (int64_t)kFdSmem <= (int64_t)smem_optin() && num_sms() <= forward_loss_parts();
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
  const int64_t blocks = xmin<int64_t>(num_sms(), (a.n_groups + kFdWarps - 1) / kFdWarps);
  launch_pdl(kernel, dim3((unsigned)blocks), dim3(kFdThreads), kFdSmem, st, a);
  return last_error();
}

}  // namespace xmc_cuda
