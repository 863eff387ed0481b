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
// list is not fixed, only its set). Chunk-maximum mode (forward_chunk_max, the top-k's sample): per row, each
// work item's largest logit as a 16-bit key. Loss-gradient mode (forward_loss_grad, the fused loss): each
// logit, rounded to the dtype, is replaced by its scaled loss gradient as it leaves the staging tile, and each
// block sums its loss terms (this takes the place of a separate pass that read and wrote every logit again).
// Gated mode (forward_gated): the kernel returns at once unless *run_if. The per-block work (fwd_mma_tile) is
// in gsffi_forward_tile.cuh, shared with the top-k's cooperative exact pass; this file holds the kernel and its
// launchers.
#include "gsffi_forward_tile.cuh"

namespace xmc_cuda {
namespace {

template <class T, int NW, int KC, int MODE, int NT>
__global__ void __launch_bounds__(NT, 1) fwd_mma(FwdArgs<T> a, const int *run_if) {
  pdl_begin();  // launched with launch_pdl
  if (run_if != nullptr && *run_if == 0) return;
  extern __shared__ __align__(16) unsigned char smem[];
  fwd_mma_tile<T, NW, KC, MODE>(a, blockIdx.x, gridDim.x, smem);
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

// Optional parts of a tensor-core forward launch: the gate, and instead of the logits, filter mode (flt.tau set),
// chunk-maximum mode (chunk_keys set) or loss-gradient mode (lg.part set).
struct FwdMode {
  const int *run_if;
  FwdFilter flt;
  uint16_t *chunk_keys;
  FwdLoss lg;
};

constexpr int kFwdMaxBlocksPerSm = 2048 / kFwdThreads;  // the most resident blocks an SM takes

// The plain logits at fan-in chunks KC <= 2 run 20 warps per block, not 16: that forward is paced by each warp's
// chain of latencies, not by one unit's throughput (benchmarks/gpu_notes.md), and at 640 threads these
// instances still fit in 96 registers without spilling (KC = 4 spills there, and so do 704 or 768 threads).
// The filter and loss-gradient modes keep 16 warps, since they need more registers (119 and 126 at KC = 2);
// so does the chunk-maximum mode, a short sampling pass of the top-k that was not measured wider.
constexpr int kFwdThreadsWide = 640;

inline bool plain_logits(const FwdMode &m) {
  return m.flt.tau == nullptr && m.chunk_keys == nullptr && m.lg.part == nullptr;
}

// The kernel instance of a launch of NT threads in mode m.
template <class T, int NW, int KC, int NT>
auto fwd_kernel(const FwdMode &m) {
  if constexpr (NT != kFwdThreads)
    return fwd_mma<T, NW, KC, kLogits, NT>;
  else
    return m.flt.tau != nullptr      ? fwd_mma<T, NW, KC, kFilter, NT>
           : m.chunk_keys != nullptr ? fwd_mma<T, NW, KC, kChunkMax, NT>
           : m.lg.part != nullptr    ? fwd_mma<T, NW, KC, kLossGrad, NT>
                                     : fwd_mma<T, NW, KC, kLogits, NT>;
}

template <class T, int NW, int KC, int NT>
int launch_mma_threads(xmc_gsffi_shape s, const void *x, const void *w, const int32_t *idx, const void *bias, void *y,
                       cudaStream_t st, int BT, FwdMode mode) {
  const size_t smem = fwd_smem(s.in_features, BT, NT);
  auto kernel = fwd_kernel<T, NW, KC, NT>(mode);
  const int per_sm = prepare(kernel, NT, smem);
  XMC_CHECK_LAUNCH();
  FwdArgs<T> a = fwd_args<T>(s, NW, BT, x, w, idx, bias, y);
  a.flt = mode.flt;
  a.chunk_keys = mode.chunk_keys;
  a.lg = mode.lg;
  const int64_t warps = NT / 32;
  int64_t chunks = xmax<int64_t>(1, (int64_t)num_sms() * xmax(per_sm, 1) / a.nbt);
  chunks = xmin<int64_t>(chunks, (a.n_items + warps - 1) / warps);
  if (mode.lg.part != nullptr && chunks * a.nbt > forward_loss_parts())  // not reached: per_sm <= the bound
    return (int)cudaErrorInvalidConfiguration;
  launch_pdl(kernel, dim3((unsigned)(chunks * a.nbt)), dim3(NT), smem, st, a, mode.run_if);
  XMC_CHECK_LAUNCH();
  return 0;
}

template <class T, int NW, int KC>
int launch_mma(xmc_gsffi_shape s, const void *x, const void *w, const int32_t *idx, const void *bias, void *y,
               cudaStream_t st, int BT, FwdMode mode) {
  if constexpr (KC <= 2)
    if (plain_logits(mode) && fwd_smem(s.in_features, BT, kFwdThreadsWide) <= (size_t)smem_optin())
      return launch_mma_threads<T, NW, KC, kFwdThreadsWide>(s, x, w, idx, bias, y, st, BT, mode);
  return launch_mma_threads<T, NW, KC, kFwdThreads>(s, x, w, idx, bias, y, st, BT, mode);
}

template <class T>
int launch_mma_sized(xmc_gsffi_shape s, const void *x, const void *w, const int32_t *idx, const void *bias, void *y,
                     cudaStream_t st, int BT, FwdMode mode) {
  int nw, kc;
  mma_sizes(s, &nw, &kc);
#define XMC_FWD(NW_, KC_) \
  if (nw == NW_ && kc == KC_) return launch_mma<T, NW_, KC_>(s, x, w, idx, bias, y, st, BT, mode);
  XMC_FWD_SIZES(XMC_FWD)
#undef XMC_FWD
  return XMC_ERR_DTYPE;  // not reached: every (nw, kc) that the sizing above picks is instantiated
}

template <class T>
int forward_half(xmc_gsffi_shape s, const void *x, const void *w, const int32_t *idx, const void *bias, void *y,
                 cudaStream_t st, FwdMode mode) {
  const int BT = tensor_core_tile(s, w);
  if (BT == 0) {
    if (mode.run_if != nullptr || mode.flt.tau != nullptr || mode.chunk_keys != nullptr || mode.lg.part != nullptr)
      return XMC_ERR_DTYPE;  // callers check filter_applies
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

// NW (labels per warp item, at most 32: 64 spills under the 128-register cap of 512 threads) and KC (32-wide
// fan-in chunks), so the weight fragments stay <= 64 registers.
void mma_sizes(xmc_gsffi_shape s, int *nw, int *kc) {
  const int64_t G8 = (s.group_size + 7) / 8 * 8;
  *kc = s.fan_in <= 32 ? 1 : s.fan_in <= 64 ? 2 : s.fan_in <= 128 ? 4 : 8;
  *nw = (int)xmin<int64_t>(G8 <= 8 ? 8 : G8 <= 16 ? 16 : 32, 128 / *kc);  // NW * KC <= 128
}

// Batch tile for the tensor-core path: the largest of 128/64/32/16 rows (no more than the batch needs) whose
// x^T tile fits in shared memory; 0 if none does.
int forward_batch_tile(xmc_gsffi_shape s) {
  const int64_t limit = smem_optin();
  int bt = 16;
  while (bt < 128 && bt < s.batch) bt *= 2;
  for (; bt >= 16; bt /= 2)
    if (fwd_smem(s.in_features, bt) <= (size_t)limit) return bt;
  return 0;
}

// Batch tile of the tensor-core path, or 0 where the shape takes the generic kernel.
int tensor_core_tile(xmc_gsffi_shape s, const void *w) {
  const bool ok = s.fan_in % 8 == 0 && s.fan_in <= 256 && (uintptr_t)w % 16 == 0;
  return ok ? forward_batch_tile(s) : 0;
}

bool filter_applies(xmc_gsffi_shape s, const void *w) { return tensor_core_tile(s, w) != 0; }

int64_t forward_loss_parts() { return (int64_t)num_sms() * kFwdMaxBlocksPerSm; }

int forward_loss_grad(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *w, const int32_t *idx,
                      const void *bias, void *y, FwdLoss lg, cudaStream_t st) {
  return forward_mode(s, dt, x, w, idx, bias, y, st, {nullptr, {}, nullptr, lg});
}

int forward_filter(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *w, const int32_t *idx,
                   const void *bias, FwdFilter flt, cudaStream_t st) {
  return forward_mode(s, dt, x, w, idx, bias, nullptr, st, {nullptr, flt, nullptr, {}});
}

int64_t forward_chunks(xmc_gsffi_shape s) {
  int nw, kc;
  mma_sizes(s, &nw, &kc);
  return (s.out_features + s.group_size - 1) / s.group_size * ((s.group_size + nw - 1) / nw);
}

int forward_chunk_max(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *w, const int32_t *idx,
                      const void *bias, uint16_t *keys, cudaStream_t st) {
  return forward_mode(s, dt, x, w, idx, bias, nullptr, st, {nullptr, {}, keys, {}});
}

int forward_gated(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *w, const int32_t *idx,
                  const void *bias, void *y, const int *run_if, cudaStream_t st) {
  return forward_mode(s, dt, x, w, idx, bias, y, st, {run_if, {}, nullptr, {}});
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
