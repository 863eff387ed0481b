// Fused loss of a GSFFI layer against CSR positive labels, with its gradients, on CUDA (C API in ops/xmc.h).
// No [B, L] buffer: every kernel recomputes the logits tile it needs in shared memory. Deterministic: no atomics
// on values (only a bitmask OR), every sum in a fixed order.
//   loss_dw   one block per label block (LB labels of a group), all rows: loss terms, dbias, dW. Reads the
//             group's inputs and weights once per F chunk; with F > TC the logits are recomputed per chunk.
//   dx        one block per (row tile, chunk of label blocks): dx of its rows summed in shared memory [rows, H],
//             written as the chunk's partial sum; dx_reduce adds the chunks in order.
//   loss_sum  adds the label blocks' loss in order.
#include "fused_common.cuh"

namespace xmc_cuda {
namespace fused {
namespace {

// Loss of one logit z with target pos, and its gradient in *grad (BCE with logits or squared hinge).
template <class A>
__device__ __forceinline__ A loss_term(xmc_loss kind, A z, bool pos, A *grad) {
  if (kind == XMC_LOSS_BCE) {
    const A e = exp(-fabs(z)), r = A(1) / (A(1) + e);
    const A sig = z >= 0 ? r : e * r, one_minus_sig = z >= 0 ? e * r : r;
    *grad = pos ? -one_minus_sig : sig;
    return xmax(pos ? -z : z, A(0)) + log1p(e);
  }
  const A s = pos ? A(1) : A(-1), m = xmax(A(1) - s * z, A(0));
  *grad = A(-2) * s * m;
  return m * m;
}

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

}  // namespace
}  // namespace fused
}  // namespace xmc_cuda

extern "C" int xmc_gsffi_fused_loss_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                                         const int32_t *indices, const void *bias, const int64_t *indptr,
                                         const int64_t *labels, xmc_loss loss, double scale, double *loss_out,
                                         void *grad_x, void *grad_weight, void *grad_bias, xmc_exec ex) {
  using namespace xmc_cuda::fused;
  cudaStream_t st = ex.stream;
  switch (dt) {
    case XMC_F32:
      return launch<float>(s, x, weight, indices, bias, indptr, labels, loss, scale, loss_out, grad_x, grad_weight,
                           grad_bias, st);
    case XMC_F64:
      return launch<double>(s, x, weight, indices, bias, indptr, labels, loss, scale, loss_out, grad_x, grad_weight,
                            grad_bias, st);
    case XMC_BF16:
      return launch<__nv_bfloat16>(s, x, weight, indices, bias, indptr, labels, loss, scale, loss_out, grad_x,
                                   grad_weight, grad_bias, st);
    case XMC_F16:
      return launch<__half>(s, x, weight, indices, bias, indptr, labels, loss, scale, loss_out, grad_x, grad_weight,
                            grad_bias, st);
  }
  return (int)cudaErrorInvalidValue;
}
