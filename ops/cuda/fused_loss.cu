// Fused loss of a GSFFI layer against CSR positive labels, with its gradients, on CUDA (C API in ops/xmc.h).
// No [B, L] buffer, deterministic: no atomics on values (only a bitmask OR), every sum in a fixed order.
// bf16 / fp16 take the tensor-core path (launch_tc below: the layer's own kernels, one label chunk at a time).
// float32 / float64 take plain FMA kernels, in which every kernel recomputes the logits tile it needs in shared
// memory:
//   loss_dw   one block per label block (LB labels of a group), all rows: loss terms, dbias, dW. Reads the
//             group's inputs and weights once per F chunk; with F > TC the logits are recomputed per chunk.
//   dx        one block per (row tile, chunk of label blocks): dx of its rows summed in shared memory [rows, H],
//             written as the chunk's partial sum; dx_reduce adds the chunks in order.
//   loss_sum  adds the label blocks' loss in order.
#include "fused_common.cuh"
#include "loss_term.cuh"

namespace xmc_cuda {
namespace fused {
namespace {

// bits[l * 2 + r / 32] bit r % 32: (b0 + r, l0 + l) is a positive. Duplicates set the same bit.
__device__ void positive_bits(const int64_t *indptr, const int64_t *labels, int64_t l0, int nl, int64_t b0, int rt,
                              uint32_t *bits) {
  __syncthreads();
  for (int e = threadIdx.x; e < LB * (RT / 32); e += THREADS) bits[e] = 0;
  __syncthreads();
  const int r = threadIdx.x / 4, k = threadIdx.x % 4;  // 4 threads per row
  if (r < rt)
    for (int64_t p = indptr[b0 + r] + k; p < indptr[b0 + r + 1]; p += 4) {
      const int64_t l = labels[p] - l0;
      if (l >= 0 && l < nl) atomicOr(&bits[l * (RT / 32) + r / 32], 1u << (r % 32));
    }
  __syncthreads();
}

// dz[l][r] = scale * d loss / d logit for the tile; returns this thread's sum of the loss terms.
template <class A>
__device__ double gradient_tile(xmc_loss kind, const A z[2][4], const uint32_t *bits, int nl, int rt, A scale, A *dz) {
  double sum = 0;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int l = tile_label(i), r = tile_row(j);
      A g = 0;
      if (l < nl && r < rt) {
        const bool pos = (bits[l * (RT / 32) + r / 32] >> (r % 32)) & 1u;
        sum += (double)loss_term(kind, z[i][j], pos, &g);
      }
      dz[l * (RT + 1) + r] = g * scale;
    }
  __syncthreads();
  return sum;
}

template <class T>
__global__ void __launch_bounds__(THREADS) loss_dw_kernel(xmc_gsffi_shape s, const T *x, const T *w,
                                                          const int32_t *indices, const T *bias, const int64_t *indptr,
                                                          const int64_t *labels, xmc_loss kind, double scale,
                                                          double *block_loss, T *gw, T *gb) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  A *xs = reinterpret_cast<A *>(smem), *ws = xs + XS, *dz = ws + WS;
  uint32_t *bits = reinterpret_cast<uint32_t *>(dz + ZS);
  double *red = reinterpret_cast<double *>(bits + LB * (RT / 32));
  const int64_t B = s.batch, H = s.in_features, F = s.fan_in;
  const LabelBlock lb = label_block(blockIdx.x, s.out_features, s.group_size);
  if (lb.nl <= 0) {
    if (threadIdx.x == 0) block_loss[blockIdx.x] = 0;
    return;
  }
  const int32_t *ix = indices + lb.g * F;
  const int tid = threadIdx.x;
  double loss = 0;
  A bsum = 0;
  // dW: thread owns labels tid / 8 and features t0 + tid % 8 + 8 q of the chunk
  for (int64_t t0 = 0; t0 < (gw ? F : 1); t0 += TC) {
    A dw[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t b0 = 0; b0 < B; b0 += RT) {
      const int rt = (int)xmin<int64_t>(RT, B - b0);
      A z[2][4];
      logits_tile(x, H, w, F, ix, bias, lb.l0, lb.nl, b0, rt, xs, ws, z);
      positive_bits(indptr, labels, lb.l0, lb.nl, b0, rt, bits);
      const double part = gradient_tile(kind, z, bits, lb.nl, rt, A(scale), dz);
      if (t0 == 0) {
        loss += part;
        if (tid < LB)
          for (int r = 0; r < rt; ++r) bsum += dz[tid * (RT + 1) + r];
      }
      if (gw) {
        if (F > TC) load_x_chunk(x, H, ix, F, t0, b0, rt, xs);
        const int l = tid / 8;
        for (int r = 0; r < rt; ++r) {
          const A d = dz[l * (RT + 1) + r];
#pragma unroll
          for (int q = 0; q < 8; ++q) dw[q] += d * xs[(tid % 8 + 8 * q) * (RT + 1) + r];
        }
      }
    }
    if (gw && tid / 8 < lb.nl)
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const int64_t t = t0 + tid % 8 + 8 * q;
        if (t < F) put(gw + (lb.l0 + tid / 8) * F + t, dw[q]);
      }
  }
  if (gb && tid < lb.nl) put(gb + lb.l0 + tid, bsum);
  red[tid] = loss;
  __syncthreads();
  for (int n = THREADS / 2; n > 0; n /= 2) {
    if (tid < n) red[tid] += red[tid + n];
    __syncthreads();
  }
  if (tid == 0) block_loss[blockIdx.x] = red[0];
}

// part[c][b0 + r][h] for this block's rows: the input gradient from label blocks [c * n / C, (c + 1) * n / C).
template <class T>
__global__ void __launch_bounds__(THREADS) dx_kernel(xmc_gsffi_shape s, const T *x, const T *w,
                                                     const int32_t *indices, const T *bias, const int64_t *indptr,
                                                     const int64_t *labels, xmc_loss kind, double scale, int rows,
                                                     int64_t n_blocks, Acc<T> *part) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  A *xs = reinterpret_cast<A *>(smem), *ws = xs + XS, *dz = ws + WS;
  uint32_t *bits = reinterpret_cast<uint32_t *>(dz + ZS);
  A *acc = reinterpret_cast<A *>(bits + LB * (RT / 32));  // [rows, H]
  const int64_t B = s.batch, H = s.in_features, F = s.fan_in, C = gridDim.y, c = blockIdx.y;
  const int64_t b0 = (int64_t)blockIdx.x * rows;
  const int rt = (int)xmin<int64_t>(rows, B - b0);
  for (int64_t e = threadIdx.x; e < rows * H; e += THREADS) acc[e] = 0;
  for (int64_t id = c * n_blocks / C; id < (c + 1) * n_blocks / C; ++id) {
    const LabelBlock lb = label_block(id, s.out_features, s.group_size);
    if (lb.nl <= 0) continue;
    const int32_t *ix = indices + lb.g * F;
    A z[2][4];
    logits_tile(x, H, w, F, ix, bias, lb.l0, lb.nl, b0, rt, xs, ws, z);
    positive_bits(indptr, labels, lb.l0, lb.nl, b0, rt, bits);
    gradient_tile(kind, z, bits, lb.nl, rt, A(scale), dz);
    // acc[r][ix[t]] += sum_l w[l0 + l, t] dz[l][r]: a group's F indices are distinct, so each (r, t) has one writer
    for (int64_t t0 = 0; t0 < F; t0 += TC) {
      __syncthreads();
      load_w_chunk(w, F, lb.l0, lb.nl, t0, ws);
      const int t = threadIdx.x % TC;
      if (t0 + t < F) {
        const int64_t h = ix[t0 + t];
        for (int r = threadIdx.x / TC; r < rt; r += THREADS / TC) {
          A v = 0;
          for (int l = 0; l < lb.nl; ++l) v += ws[l * (TC + 1) + t] * dz[l * (RT + 1) + r];
          acc[r * H + h] += v;
        }
      }
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < (int64_t)rt * H; e += THREADS) part[(c * B + b0) * H + e] = acc[e];
}

template <class T>
__global__ void dx_reduce_kernel(int64_t n, int64_t C, const Acc<T> *part, T *gx) {
  const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= n) return;
  Acc<T> v = 0;
  for (int64_t c = 0; c < C; ++c) v += part[c * n + e];
  put(gx + e, v);
}

__global__ void loss_sum_kernel(int64_t n, const double *block_loss, double scale, double *out) {
  __shared__ double red[THREADS];
  double v = 0;
  for (int64_t i = threadIdx.x; i < n; i += THREADS) v += block_loss[i];
  red[threadIdx.x] = v;
  __syncthreads();
  for (int k = THREADS / 2; k > 0; k /= 2) {
    if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = red[0] * scale;
}

template <class T>
int launch(xmc_gsffi_shape s, const void *x, const void *w, const int32_t *indices, const void *bias,
           const int64_t *indptr, const int64_t *labels, xmc_loss kind, double scale, double *loss_out, void *gx,
           void *gw, void *gb, cudaStream_t stream) {
  using A = Acc<T>;
  const int64_t B = s.batch, H = s.in_features, L = s.out_features, G = s.group_size;
  const int64_t n_blocks = (L + G - 1) / G * ((G + LB - 1) / LB);
  const T *xp = static_cast<const T *>(x), *wp = static_cast<const T *>(w), *bp = static_cast<const T *>(bias);
  const size_t tile_smem = sizeof(A) * (XS + WS + ZS) + sizeof(uint32_t) * LB * (RT / 32);
  double *block_loss = nullptr;
  int err = (int)scratch_alloc(reinterpret_cast<void **>(&block_loss), sizeof(double) * n_blocks, stream);
  if (err) return err;
  const size_t smem1 = tile_smem + sizeof(double) * THREADS;
  prepare(loss_dw_kernel<T>, THREADS, smem1);
  loss_dw_kernel<T><<<(unsigned)n_blocks, THREADS, smem1, stream>>>(
      s, xp, wp, indices, bp, indptr, labels, kind, scale, block_loss, static_cast<T *>(gw), static_cast<T *>(gb));
  err = last_error();
  if (!err) {
    loss_sum_kernel<<<1, THREADS, 0, stream>>>(n_blocks, block_loss, scale, loss_out);
    err = last_error();
  }
  if (!err && gx) {
    // rows per block: as many as fit beside the tile in shared memory, at most RT
    int rows = RT;
    while (rows > 1 && tile_smem + sizeof(A) * rows * H > (size_t)smem_optin()) rows /= 2;
    const size_t smem2 = tile_smem + sizeof(A) * rows * H;
    if (smem2 > (size_t)smem_optin()) err = (int)cudaErrorInvalidConfiguration;
    const int64_t row_tiles = (B + rows - 1) / rows;
    // chunks of label blocks: enough blocks to fill the GPU twice, partial sums within 128 MB
    int64_t C = xmax<int64_t>(1, (2 * num_sms() + row_tiles - 1) / row_tiles);
    C = xmin<int64_t>(C, xmax<int64_t>(1, (int64_t(128) << 20) / (int64_t)(sizeof(A) * B * H)));
    C = xmin<int64_t>(C, n_blocks);
    A *part = nullptr;
    if (!err) err = (int)scratch_alloc(reinterpret_cast<void **>(&part), sizeof(A) * C * B * H, stream);
    if (!err) {
      prepare(dx_kernel<T>, THREADS, smem2);
      dx_kernel<T><<<dim3((unsigned)row_tiles, (unsigned)C), THREADS, smem2, stream>>>(
          s, xp, wp, indices, bp, indptr, labels, kind, scale, rows, n_blocks, part);
      err = last_error();
      if (!err) {
        const int64_t n = B * H;
        dx_reduce_kernel<T><<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(n, C, part, static_cast<T *>(gx));
        err = last_error();
      }
      cudaFreeAsync(part, stream);
    }
  }
  cudaFreeAsync(block_loss, stream);
  return err;
}

// ---- Tensor-core path (bf16, fp16): the layer's own kernels, one label chunk at a time ----
//
// The labels are cut into chunks of nl labels (whole groups, chunk_labels()) whose logits [B, nl] go to one
// scratch buffer. Per chunk:
//   mark_positives                  sets the chunk's positives in a bit mask [B, nl / 32] (clearing the previous
//                                   chunk's);
//   forward_loss_grad (gsffi_forward.cu) writes scale * d loss / d logit of the chunk's logits into the buffer
//                                   and sums its loss terms per block, in a fixed order; where the forward
//                                   takes its generic kernel, the plain forward writes the logits and
//                                   grad_chunk turns them into the same gradients in place;
//   grad_weight (gsffi_grad_weight.cu) writes the chunk's weight and bias gradients from the buffer (x^T for it
//                                   is made once per step); where forward_loss_dw applies (bf16, G = 32,
//                                   F = 64, Hopper), it takes the place of this and the loss-gradient forward:
//                                   one pass writes the loss gradients and the weight and bias gradients
//                                   (fused_loss_dw.cu), whichever of them are asked;
//   grad_input_add_f32 (gsffi_grad_input.cu) adds the chunk's input gradient into an fp32 [B, H] accumulator.
// Nothing is [B, L]; everything is deterministic (the OR of the mask is idempotent, every sum has a fixed order).

constexpr int kGradCols = 32;                   // threads across a grad_chunk block, 8 labels each
constexpr int kGradRows = 8;                    // row slices of a grad_chunk block
constexpr int kGradLabels = kGradCols * 8;      // labels per grad_chunk block

// bits[b * words + l / 32] bit l % 32: label c0 + l is a positive of row b (one warp per row). The mask holds
// the previous chunk's positives (from label p0; p0 < 0: the mask is clear): their words are cleared first, so
// the mask is zeroed once per step, not once per chunk.
__global__ void mark_positives(const int64_t *indptr, const int64_t *labels, int64_t B, int64_t p0, int64_t c0,
                               int64_t nl, int64_t words, uint32_t *bits) {
  pdl_begin();  // launched with launch_pdl
  const int64_t b = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (b >= B) return;
  uint32_t *row = bits + b * words;
  if (p0 >= 0) {
    for (int64_t p = indptr[b] + threadIdx.x % 32; p < indptr[b + 1]; p += 32) {
      const int64_t l = labels[p] - p0;
      if (l >= 0 && l < nl) row[l / 32] = 0;
    }
    __syncwarp();
  }
  for (int64_t p = indptr[b] + threadIdx.x % 32; p < indptr[b + 1]; p += 32) {
    const int64_t l = labels[p] - c0;
    if (l >= 0 && l < nl) atomicOr(&row[l / 32], 1u << (l % 32));
  }
}

// Rows b0, b0 + kGradRows, ... (U of them) of one thread's 8 labels: loads first, then the loss terms, in place.
// FULL: all 8 labels exist and the row is 16-byte aligned (no guards).
template <class T, xmc_loss KIND, bool FULL>
__device__ __forceinline__ void grad_rows(T *z, const uint32_t *bits, int64_t B, int64_t nl, int64_t words,
                                          int64_t b0, int64_t l0, int nv, float zscale, float &loss) {
  constexpr int U = 4;  // rows in flight per thread
  uint4 raw[U];
  uint32_t pos[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t b = b0 + u * kGradRows;
    raw[u] = make_uint4(0, 0, 0, 0);
    pos[u] = 0;
    if (b < B) {
      const T *zr = z + b * nl + l0;
      raw[u] = FULL ? *reinterpret_cast<const uint4 *>(zr) : load_elems<8>(zr, nv, false);
      pos[u] = bits[b * words + l0 / 32] >> (l0 % 32);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t b = b0 + u * kGradRows;
    if (b >= B) break;
    const uint4 g = loss_grad8<T, KIND>(raw[u], pos[u], FULL ? 8 : nv, zscale, loss);
    T *zr = z + b * nl + l0;
    if (FULL) {
      *reinterpret_cast<uint4 *>(zr) = g;
    } else {
      const T *e = reinterpret_cast<const T *>(&g);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j < nv) zr[j] = e[j];
    }
  }
}

// Block: labels l0 .. l0 + 255 of the chunk, all rows. Thread (cx, ry) takes labels l0 + 8 cx .. + 7 on rows
// ry, ry + 8, ...; the block adds its loss in double in a fixed order. (The path for shapes whose forward takes
// the generic kernel; the tensor-core forward does this in its loss-gradient mode.)
template <class T, xmc_loss KIND>
__global__ void __launch_bounds__(kGradCols * kGradRows)
    grad_chunk(T *z, const uint32_t *bits, int64_t B, int64_t nl, int64_t words, float zscale, bool vec,
               double *block_loss) {
  pdl_begin();  // launched with launch_pdl
  __shared__ double red[kGradCols * kGradRows];
  const int cx = threadIdx.x % kGradCols, ry = threadIdx.x / kGradCols;
  const int64_t l0 = (int64_t)blockIdx.x * kGradLabels + 8 * cx;
  float loss = 0;
  if (l0 < nl) {
    const int nv = (int)xmin<int64_t>(8, nl - l0);
    if (vec && nv == 8) {
      for (int64_t b0 = ry; b0 < B; b0 += 4 * kGradRows)
        grad_rows<T, KIND, true>(z, bits, B, nl, words, b0, l0, 8, zscale, loss);
    } else {
      for (int64_t b0 = ry; b0 < B; b0 += 4 * kGradRows)
        grad_rows<T, KIND, false>(z, bits, B, nl, words, b0, l0, nv, zscale, loss);
    }
  }
  red[threadIdx.x] = loss;
  __syncthreads();
  for (int n = blockDim.x / 2; n > 0; n /= 2) {
    if ((int)threadIdx.x < n) red[threadIdx.x] += red[threadIdx.x + n];
    __syncthreads();
  }
  if (threadIdx.x == 0) block_loss[blockIdx.x] = red[0];
}

template <class T>
void launch_grad_chunk(unsigned nb, cudaStream_t st, xmc_loss kind, void *z, const void *bits, int64_t B,
                       int64_t nl, int64_t words, float zscale, bool vec, double *bl) {
  auto k = kind == XMC_LOSS_BCE ? grad_chunk<T, XMC_LOSS_BCE> : grad_chunk<T, XMC_LOSS_SQUARED_HINGE>;
  launch_pdl(k, dim3(nb), dim3(kGradCols * kGradRows), 0, st, static_cast<T *>(z),
             static_cast<const uint32_t *>(bits), B, nl, words, zscale, vec, bl);
}

// out = acc * scale in the output dtype.
__global__ void f32_to(const float *acc, int64_t n, float scale, xmc_dtype dt, void *out) {
  const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= n) return;
  if (dt == XMC_BF16) put(static_cast<__nv_bfloat16 *>(out) + e, acc[e] * scale);
  else put(static_cast<__half *>(out) + e, acc[e] * scale);
}

__global__ void scale_half(__half *p, int64_t n, float scale) {
  const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e < n) p[e] = __float2half_rn(__half2float(p[e]) * scale);
}

int launch_tc(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *w, const int32_t *indices,
              const void *bias, const int64_t *indptr, const int64_t *labels, xmc_loss kind, double scale,
              double *loss_out, void *gx, void *gw, void *gb, const xmc_weight_update *upd, xmc_exec ex) {
  cudaStream_t st = ex.stream;
  const int64_t B = s.batch, H = s.in_features, L = s.out_features, F = s.fan_in, G = s.group_size;
  const int64_t nl = chunk_labels(s);
  const int64_t n_chunks = (L + nl - 1) / nl, words = (nl + 31) / 32;
  // loss partial sums per chunk: the loss-gradient forward's blocks, or grad_chunk's; the unused ones stay zero
  const int64_t parts_per_chunk = xmax<int64_t>(forward_loss_parts(), (nl + kGradLabels - 1) / kGradLabels);
  // The buffer holds scale * d loss / d logit in bf16 (fp32's exponent range); in fp16 it holds the unscaled
  // gradient (|.| <= 1 for BCE), since scales like 1 / (B L) would flush it to zero, and the products are scaled.
  const float zscale = dt == XMC_BF16 ? (float)scale : 1.f, post = dt == XMC_BF16 ? 1.f : (float)scale;
  void *block = nullptr, *buf = nullptr, *bits = nullptr, *block_loss = nullptr, *acc = nullptr, *gw_chunk = nullptr,
       *xt = nullptr;
  const bool want_gw = gw != nullptr || upd != nullptr;
  // The one-pass kernel serves a chunk where it applies, whatever outputs are asked, so that an output asked alone
  // is bitwise the one asked with the others (its logits' summation order is its own). It needs x^T.
  const bool fd_any = forward_loss_dw_applies({B, H, xmin(nl, L), F, G}, dt, w, bias);
  int err = (int)scratch_parts(&block,
                               {{&buf, (size_t)(B * nl) * 2},
                                {&bits, (size_t)(B * words) * 4},
                                {&block_loss, (size_t)(n_chunks * parts_per_chunk) * sizeof(double)},
                                {&acc, gx ? (size_t)(B * H) * sizeof(float) : 0},
                                {&gw_chunk, upd ? (size_t)(nl * F) * 2 : 0},
                                {&xt, want_gw || fd_any ? (size_t)(H * xt_cols(B)) * 2 : 0}},
                               st);
  if (!err) err = (int)cudaMemsetAsync(block_loss, 0, (size_t)(n_chunks * parts_per_chunk) * sizeof(double), st);
  if (!err && gx) err = (int)cudaMemsetAsync(acc, 0, (size_t)(B * H) * sizeof(float), st);
  if (!err) err = (int)cudaMemsetAsync(bits, 0, (size_t)(B * words) * 4, st);
  if (!err && (want_gw || fd_any)) err = transpose_x(s, x, xt, st);  // x^T, once for every chunk
  const int64_t esz = 2;
  for (int64_t c0 = 0; !err && c0 < L; c0 += nl) {
    const int64_t n = xmin<int64_t>(nl, L - c0), g0 = c0 / G;
    const xmc_gsffi_shape sc = {B, H, n, F, G};
    const unsigned char *wc = static_cast<const unsigned char *>(w) + c0 * F * esz;
    const int32_t *ic = indices + g0 * F;
    const void *bc = bias ? static_cast<const unsigned char *>(bias) + c0 * esz : nullptr;
    void *gbc = gb ? static_cast<unsigned char *>(gb) + c0 * esz : nullptr;
    // with an update, the chunk's weight gradient goes to scratch and is applied once grad_input has read wc
    void *gwc = gw ? static_cast<unsigned char *>(gw) + c0 * F * esz : gw_chunk;
    double *bl = static_cast<double *>(block_loss) + (c0 / nl) * parts_per_chunk;
    launch_pdl(mark_positives, dim3((unsigned)((B + 7) / 8)), dim3(256), 0, st, indptr, labels, B,
               c0 == 0 ? (int64_t)-1 : c0 - nl, c0, nl, words, static_cast<uint32_t *>(bits));
    err = last_error();
    const bool fd = fd_any && forward_loss_dw_applies(sc, dt, wc, bc);  // not a last chunk of part groups
    if (!err && fd) {
      err = forward_loss_dw(sc, xt, wc, ic, bc, buf, gwc, gbc,
                            {static_cast<const uint32_t *>(bits), words, zscale, kind, bl}, st);
    } else if (!err && filter_applies(sc, wc)) {
      err = forward_loss_grad(sc, dt, x, wc, ic, bc, buf,
                              {static_cast<const uint32_t *>(bits), words, zscale, kind, bl}, st);
    } else if (!err) {
      err = xmc_gsffi_forward_cuda(sc, dt, x, wc, ic, bc, buf, ex);
      const unsigned nb = (unsigned)((n + kGradLabels - 1) / kGradLabels);
      const bool vec = n % 8 == 0 && (uintptr_t)buf % 16 == 0;
      auto launch = dt == XMC_BF16 ? launch_grad_chunk<__nv_bfloat16> : launch_grad_chunk<__half>;
      if (!err) launch(nb, st, kind, buf, bits, B, n, words, zscale, vec, bl);
      if (!err) err = last_error();
    }
    if (!err && !fd) err = grad_weight_bias_xt(sc, dt, buf, x, want_gw ? xt : nullptr, ic, gwc, gbc, st);
    if (!err && gw && post != 1.f) {
      scale_half<<<(unsigned)((n * F + 255) / 256), 256, 0, st>>>(static_cast<__half *>(gwc), n * F, post);
      err = last_error();
    }
    if (!err && gbc && post != 1.f) {
      scale_half<<<(unsigned)((n + 255) / 256), 256, 0, st>>>(static_cast<__half *>(gbc), n, post);
      err = last_error();
    }
    if (!err && gx) err = grad_input_add_f32(sc, dt, buf, wc, ic, static_cast<float *>(acc), st);
    if (!err && upd) {
      xmc_sgd_sr_args a = upd->args;
      a.offset = c0 * F;  // the chunk draws the bits the whole weight's update would
      void *mc = upd->momentum_buf ? static_cast<unsigned char *>(upd->momentum_buf) + c0 * F * esz : nullptr;
      err = xmc_sgd_sr_cuda(n * F, dt, static_cast<unsigned char *>(upd->weight) + c0 * F * esz, mc, gw_chunk, a, ex);
    }
  }
  if (!err) {
    loss_sum_kernel<<<1, THREADS, 0, st>>>(n_chunks * parts_per_chunk, static_cast<double *>(block_loss), scale,
                                           loss_out);
    err = last_error();
  }
  if (!err && gx) {
    f32_to<<<(unsigned)((B * H + 255) / 256), 256, 0, st>>>(static_cast<float *>(acc), B * H, post, dt, gx);
    err = last_error();
  }
  if (block) cudaFreeAsync(block, st);
  return err;
}

}  // namespace
}  // namespace fused
}  // namespace xmc_cuda

extern "C" int xmc_gsffi_fused_loss_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                                         const int32_t *indices, const void *bias, const int64_t *indptr,
                                         const int64_t *labels, xmc_loss loss, double scale, double *loss_out,
                                         void *grad_x, void *grad_weight, void *grad_bias,
                                         const xmc_weight_update *update, xmc_exec ex) {
  using namespace xmc_cuda::fused;
  cudaStream_t st = ex.stream;
  if (update) {
    if ((dt != XMC_F32 && dt != XMC_BF16) || grad_weight) return XMC_ERR_DTYPE;  // SGD-SR: float32 / bfloat16
    if (dt == XMC_BF16 && s.batch > 0 && s.out_features > 0)                     // chunk by chunk
      return launch_tc(s, dt, x, weight, indices, bias, indptr, labels, loss, scale, loss_out, grad_x, nullptr,
                       grad_bias, update, ex);
    // the plain kernels write the whole weight gradient: to scratch, then one update over it
    void *gw = nullptr;
    const size_t bytes = (size_t)(s.out_features * s.fan_in) * (dt == XMC_BF16 ? 2 : 4);
    int err = (int)xmc_cuda::scratch_alloc(&gw, bytes, st);
    if (!err)
      err = xmc_gsffi_fused_loss_cuda(s, dt, x, weight, indices, bias, indptr, labels, loss, scale, loss_out, grad_x,
                                      gw, grad_bias, nullptr, ex);
    if (!err) err = xmc_sgd_sr_cuda(s.out_features * s.fan_in, dt, update->weight, update->momentum_buf, gw,
                                    update->args, ex);
    if (gw) cudaFreeAsync(gw, st);
    return err;
  }
  switch (dt) {
    case XMC_F32:
      return launch<float>(s, x, weight, indices, bias, indptr, labels, loss, scale, loss_out, grad_x, grad_weight,
                           grad_bias, st);
    case XMC_F64:
      return launch<double>(s, x, weight, indices, bias, indptr, labels, loss, scale, loss_out, grad_x, grad_weight,
                            grad_bias, st);
    case XMC_BF16:
    case XMC_F16:
      if (s.batch == 0 || s.out_features == 0)  // nothing to chunk: the generic kernels write the zeros
        return dt == XMC_BF16 ? launch<__nv_bfloat16>(s, x, weight, indices, bias, indptr, labels, loss, scale,
                                                      loss_out, grad_x, grad_weight, grad_bias, st)
                              : launch<__half>(s, x, weight, indices, bias, indptr, labels, loss, scale, loss_out,
                                               grad_x, grad_weight, grad_bias, st);
      return launch_tc(s, dt, x, weight, indices, bias, indptr, labels, loss, scale, loss_out, grad_x, grad_weight,
                       grad_bias, nullptr, ex);
  }
  return (int)cudaErrorInvalidValue;
}
