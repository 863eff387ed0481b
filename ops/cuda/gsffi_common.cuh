// Pieces shared by the GSFFI CUDA kernels: dtype helpers, tensor-core fragments, launch sizing, workspace.
//
// Tensor-core layout trick used by all three kernels. mma.sync m16n8k16 wants each thread to hold the k pairs
// {2q, 2q+1} and {2q+8, 2q+9} of a 16-wide k step (q = lane % 4). The order in which k is summed is free, so
// we relabel k inside every 32-wide chunk: logical k of step s maps to physical k = 8q + 4s + 2*(k >= 8) + (k & 1).
// A thread that loads 8 consecutive physical k (16 bytes) then holds both k steps' fragments in its 4 words,
// with no shuffles; the operand that comes from shared memory through ldmatrix uses the same map in its row
// addresses, which costs nothing because ldmatrix takes one address per row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>
#include <initializer_list>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "xmc.h"

namespace xmc_cuda {

template <class T> __host__ __device__ __forceinline__ T xmin(T a, T b) { return a < b ? a : b; }
template <class T> __host__ __device__ __forceinline__ T xmax(T a, T b) { return a < b ? b : a; }

template <class T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

__device__ __forceinline__ void put(float *p, float v) { *p = v; }
__device__ __forceinline__ void put(double *p, double v) { *p = v; }
__device__ __forceinline__ void put(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void put(__half *p, float v) { *p = __float2half_rn(v); }

// Two 16-bit values packed low-first, as the mma fragments want them.
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16, float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
__device__ __forceinline__ uint32_t pack2(__half, float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

// The two 16-bit values of a word (low first) as floats.
__device__ __forceinline__ float2 unpack2(__nv_bfloat16, uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}
__device__ __forceinline__ float2 unpack2(__half, uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2 *>(&v));
}

// D += A * B, m16n8k16, fp32 accumulators.
__device__ __forceinline__ void mma16816(__nv_bfloat16, float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(__half, float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

// 16-byte global -> shared copy that bypasses registers: the first src_bytes (0..16) come from gmem, the rest
// of the 16 are zeros.
__device__ __forceinline__ void cp_async16(uint32_t smem_addr, const void *gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Shared-memory loads / stores at a 32-bit shared address (one address instruction where C++ indexing takes
// two); volatile keeps them in program order.
__device__ __forceinline__ int lds_i32(uint32_t a) {
  int v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ uint4 lds_u32x4(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}
__device__ __forceinline__ void sts_u32(uint32_t a, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a), "r"(v) : "memory");
}
__device__ __forceinline__ uint2 lds_u32x2(uint32_t a) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(a));
  return v;
}
__device__ __forceinline__ float4 lds_f32x4(uint32_t a) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(a));
  return v;
}
__device__ __forceinline__ void sts_f32x4(uint32_t a, float4 v) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
}

__device__ __forceinline__ uint4 ldg16(const void *p) { return __ldg(reinterpret_cast<const uint4 *>(p)); }

// ---- Hopper warpgroup MMA (wgmma, sm_90a: built where setup.py defines XMC_SM90A) ----
// A warpgroup (4 consecutive warps, the first at a warp index divisible by 4) issues wgmma.mma_async together;
// A and B come from shared memory through 64-bit descriptors: start address, leading and stride byte offsets
// (LBO, SBO; >> 4) and the swizzle mode (bits 62-63: 1 = 128-byte rows, 2 = 64-byte rows). Tiles are
// stored in rows of the swizzle width, 16-byte chunk c of row r at c ^ (r & 7) (128 B) or c ^ (r >> 1 & 3)
// (64 B), from a base aligned to 1024 (512) bytes; 8 rows form a core group, SBO apart.
enum WgSwizzle : uint32_t { kSw128 = 1, kSw64 = 2 };
// A descriptor as two words: the high one constant per layout, the low one the address (moved along a tile by
// adding bytes / 16: the address field has room up to 256 KB, so no carry leaves it).
__host__ __device__ constexpr uint32_t wg_desc_hi(uint32_t sbo, WgSwizzle sw) { return sbo >> 4 | (uint32_t)sw << 30; }
__device__ __forceinline__ uint32_t wg_desc_lo(uint32_t smem_addr, uint32_t lbo) { return smem_addr >> 4 | (lbo >> 4) << 16; }
__device__ __forceinline__ uint64_t wg_desc(uint32_t lo, uint32_t hi) { return (uint64_t)hi << 32 | lo; }
// D (64 x 32, fp32; thread t of the warpgroup holds rows 16 (t / 32) + (t % 32) / 4 (+ 8) and columns
// 8 j + 2 (t % 4) (+ 1) at d[4 j + 2 h + e]) = (accumulate ? D : 0) + A (64 x 16) B (16 x 32), bf16.
// TA = 1: A is M-major in shared memory (else K-major); TB = 1: B is N-major (else K-major).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n32k16(float d[16], uint64_t a, uint64_t b, bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(a), "l"(b), "r"((int)accumulate), "n"(TA), "n"(TB));
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Keeps the compiler from moving accesses of an accumulator across the asynchronous MMA that writes it.
__device__ __forceinline__ void wgmma_hold(float d[16]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Shared memory written by this thread's ordinary or cp.async stores, made visible to the tensor cores' reads
// (the async proxy); a barrier after it covers the other threads' writes.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Barrier `id` (1..15) among `threads` threads (a warpgroup: 128).
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ uint32_t word(const uint4 &v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The low (sel_hi = false) or high 16-bit halves of a and b, packed (a's half low).
__device__ __forceinline__ uint32_t halves(uint32_t a, uint32_t b, bool hi) {
  return __byte_perm(a, b, hi ? 0x7632 : 0x5410);
}

// n consecutive 16-bit elements starting at p (n = 2, 4 or 8) as up to 4 words; elements at or past `valid`
// read as zero. `vec` says that p is aligned to the full width.
template <int N, class T>
__device__ __forceinline__ uint4 load_elems(const T *p, int64_t valid, bool vec) {
  uint4 r = make_uint4(0, 0, 0, 0);
  if (valid >= N && vec) {
    if (N == 8) r = *reinterpret_cast<const uint4 *>(p);
    if (N == 4) { uint2 v = *reinterpret_cast<const uint2 *>(p); r.x = v.x; r.y = v.y; }
    if (N == 2) r.x = *reinterpret_cast<const uint32_t *>(p);
    return r;
  }
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int e = 0; e < N; ++e) {
    if (e < valid) {
      uint32_t bits = *reinterpret_cast<const uint16_t *>(p + e);
      w[e >> 1] |= bits << (16 * (e & 1));
    }
  }
  r.x = w[0]; r.y = w[1]; r.z = w[2]; r.w = w[3];
  return r;
}

// The bits of v rounded to T.
__device__ __forceinline__ uint16_t bits16(__nv_bfloat16, float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ uint16_t bits16(__half, float v) { return __half_as_ushort(__float2half_rn(v)); }

// A 16-bit value's rank as an unsigned key: order-preserving for numbers, NaN (which ranks above every number)
// the largest key; and back.
template <class T> __device__ __forceinline__ bool is_nan_bits(uint16_t u);
template <> __device__ __forceinline__ bool is_nan_bits<__nv_bfloat16>(uint16_t u) {
  return (u & 0x7f80) == 0x7f80 && (u & 0x7f) != 0;
}
template <> __device__ __forceinline__ bool is_nan_bits<__half>(uint16_t u) {
  return (u & 0x7c00) == 0x7c00 && (u & 0x3ff) != 0;
}
template <class T> __device__ __forceinline__ uint32_t rank_key(uint16_t u) {
  if (is_nan_bits<T>(u)) return 0xffff;
  return (u & 0x8000) ? (~u & 0xffffu) : (u | 0x8000u);
}
template <class T> __device__ __forceinline__ float key_value(uint32_t key) {  // 0xffff: a NaN
  const uint16_t u = (uint16_t)((key & 0x8000) ? (key & 0x7fff) : (~key & 0xffff));
  return to_acc(*reinterpret_cast<const T *>(&u));
}

inline int current_device() {
  int dev = 0;
  cudaGetDevice(&dev);
  return dev;
}

// Device attributes and kernel set-up are looked up once per device (and kernel, block size, shared memory):
// the driver queries cost ~0.3-1 us each, and a fused top-k or training step made ~30 of them before its first
// kernel could start.
constexpr int kMaxDevices = 64;

template <cudaDeviceAttr A>
inline int device_attr() {
  static std::atomic<int> cache[kMaxDevices];  // 0 until read: every attribute used here is positive
  const int dev = current_device();
  int v = dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    cudaDeviceGetAttribute(&v, A, dev);
    if (dev < kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}
inline int num_sms() { return device_attr<cudaDevAttrMultiProcessorCount>(); }
inline int smem_optin() { return device_attr<cudaDevAttrMaxSharedMemoryPerBlockOptin>(); }

// Programmatic dependent launch (compute capability 9.0): a kernel launched with launch_pdl may be scheduled
// while the kernel before it on the stream is finishing, instead of after a launch gap (~3 us each, ~100 kernels
// per fused training step). Every kernel launched so calls pdl_begin() before it touches global memory: it
// returns once the previous kernel has completed and its writes are visible, so the stream order holds as with
// <<<>>>; then it lets the next kernel be scheduled as soon as every block of this one has started. On other
// devices, and under a plain launch, it does nothing. In-run A/B on the H100 (2026-11-25): the fused training
// step 6.34-6.37 -> 6.18-6.30 ms, bitwise the same results.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Raises a kernel's dynamic shared-memory limit (needed above 48 KB) and returns its blocks per SM (0 if the
// launch cannot fit).
template <class K>
inline int prepare(K kernel, int threads, size_t smem) {
  struct Key {
    const void *kernel;
    int threads, dev;
    size_t smem;
    bool operator==(const Key &o) const {
      return kernel == o.kernel && threads == o.threads && dev == o.dev && smem == o.smem;
    }
  };
  struct Hash {
    size_t operator()(const Key &k) const {
      return std::hash<const void *>()(k.kernel) ^ (k.smem * 0x9e3779b97f4a7c15ull) ^ ((size_t)k.threads << 40) ^
             ((size_t)k.dev << 56);
    }
  };
  static std::mutex mu;
  static std::unordered_map<Key, int, Hash> blocks_of;
  const Key key{reinterpret_cast<const void *>(kernel), threads, current_device(), smem};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = blocks_of.find(key);
    if (it != blocks_of.end()) return it->second;
  }
  // The limit goes straight to the device's opt-in maximum (less the kernel's static shared memory), so a cached
  // entry never meets a limit that a later call with less shared memory lowered; occupancy still counts each
  // launch's own size.
  cudaFuncAttributes fa;
  const int stat = cudaFuncGetAttributes(&fa, kernel) == cudaSuccess ? (int)fa.sharedSizeBytes : 0;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       xmax<int>(smem_optin() - stat, (int)smem));
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess) return 0;
  std::lock_guard<std::mutex> lock(mu);
  blocks_of[key] = blocks;
  return blocks;
}

// kernel<<<grid, block, smem, st>>>(args...) with one launch attribute, where `apply`; returns the launch's error.
template <class... P, class... A>
inline cudaError_t launch_ex(cudaLaunchAttribute attr, bool apply, void (*kernel)(P...), dim3 grid, dim3 block,
                             size_t smem, cudaStream_t st, A &&...args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cfg.attrs = &attr;
  cfg.numAttrs = apply ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
}

// launch_ex with programmatic dependent launch where the device has it (see pdl_begin).
template <class... P, class... A>
inline cudaError_t launch_pdl(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                              A &&...args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return launch_ex(attr, device_attr<cudaDevAttrComputeCapabilityMajor>() >= 9, kernel, grid, block, smem, st,
                   std::forward<A>(args)...);
}

// Scratch memory, stream-ordered (cudaMallocAsync / cudaFreeAsync), so the C API keeps the same signature on
// every device and the launcher stays usable under CUDA graph capture. The device's default pool is allowed
// to keep up to 256 MB between calls (set once per device), so a training loop does not map and unmap its
// scratch every step.
inline cudaError_t scratch_alloc(void **p, size_t bytes, cudaStream_t s) {
  static std::atomic<bool> pool_set[kMaxDevices];
  const int dev = current_device();
  if (dev >= kMaxDevices || !pool_set[dev].load(std::memory_order_relaxed)) {
    cudaMemPool_t pool;
    if (cudaDeviceGetDefaultMemPool(&pool, dev) == cudaSuccess) {
      uint64_t keep = 0;
      cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
      if (keep < (uint64_t(256) << 20)) {
        keep = uint64_t(256) << 20;
        cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
      }
    }
    if (dev < kMaxDevices) pool_set[dev].store(true, std::memory_order_relaxed);
  }
  return cudaMallocAsync(p, bytes, s);
}

// Several scratch buffers carved from one allocation (*block, freed with cudaFreeAsync; nullptr on failure),
// each 256-byte aligned: one cudaMallocAsync per call instead of one per buffer. A part of 0 bytes is nullptr.
inline cudaError_t scratch_parts(void **block, std::initializer_list<std::pair<void **, size_t>> parts,
                                 cudaStream_t s) {
  size_t total = 0;
  for (const auto &p : parts) total += (p.second + 255) / 256 * 256;
  *block = nullptr;
  const cudaError_t e = scratch_alloc(block, total, s);
  if (e != cudaSuccess) return e;
  size_t off = 0;
  for (const auto &p : parts) {
    *p.first = p.second ? static_cast<unsigned char *>(*block) + off : nullptr;
    off += (p.second + 255) / 256 * 256;
  }
  return cudaSuccess;
}

inline int last_error() { return (int)cudaGetLastError(); }

// Where a grad_input launch puts its result: the dtype's [B, H] output, or (add_f32) added into a float [B, H]
// accumulator.
struct DxOut {
  void *ptr;
  bool add_f32;
};

// The forward kernel's filter mode (the fused top-k): every logit v of row b (as stored in the dtype) with
// !(v < tau[b]) is appended to row b's list: count[b] += 1, and while the count is within cap, (v, label id) at
// score / id [b * cap + position]. Only bf16 / fp16 shapes for which filter_applies(); count is zeroed by the
// caller.
struct FwdFilter {
  const float *tau;
  unsigned long long *count;
  float *score;
  int64_t *id;
  int64_t cap;
};
bool filter_applies(xmc_gsffi_shape s, const void *weight);
int forward_filter(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight, const int32_t *indices,
                   const void *bias, FwdFilter flt, cudaStream_t st);
// The forward's chunk-maximum mode (the fused top-k's sample; tensor-core shapes, filter_applies): for each row b
// and work item i < forward_chunks(s) (a slice of at most 32 labels of one group), the largest of the item's
// logits as stored in the dtype, as an order-preserving key (rank_key; NaN the largest), at keys[b * M + i].
int64_t forward_chunks(xmc_gsffi_shape s);
int forward_chunk_max(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight, const int32_t *indices,
                      const void *bias, uint16_t *keys, cudaStream_t st);
// The forward's loss-gradient mode (the fused loss; tensor-core shapes, filter_applies): every logit v (as stored
// in the dtype) of row b and label l is replaced in y by zscale * d loss(v, positive) / d v, positive being bit
// l % 32 of bits[b * words + l / 32], and block i of the launch writes the sum of its loss terms to part[i]
// (part[i] for i >= the launch's block count is left alone: at most forward_loss_parts() blocks).
struct FwdLoss {
  const uint32_t *bits;
  int64_t words;
  float zscale;
  xmc_loss kind;
  double *part;
};
int64_t forward_loss_parts();
int forward_loss_grad(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight, const int32_t *indices,
                      const void *bias, void *y, FwdLoss lg, cudaStream_t st);
// The loss-gradient forward and the weight and bias gradients of one label chunk in one pass (fused_loss_dw.cu),
// for the shapes where forward_loss_dw_applies (bf16, G = 32, F = 64, B > 64, on a compute capability 9.0 device
// with the sm_90a build); x^T as transpose_x makes it. grad_weight / grad_bias may be null (not computed).
bool forward_loss_dw_applies(xmc_gsffi_shape s, xmc_dtype dt, const void *w, const void *bias);
int forward_loss_dw(xmc_gsffi_shape s, const void *xt, const void *w, const int32_t *idx, const void *bias,
                    void *dy, void *gw, void *gb, FwdLoss lg, cudaStream_t st);
// The bf16 / fp16 forward (tensor-core shapes, filter_applies) that returns at once unless *run_if != 0.
int forward_gated(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight, const int32_t *indices,
                  const void *bias, void *y, const int *run_if, cudaStream_t st);

// grad_weight's tensor-core kernels read x as x^T [H, xt_cols(B)], zero padded; transpose_x writes it (16-bit x).
// grad_weight_bias_xt is xmc_gsffi_grad_weight_bias_cuda with that x^T given (or null: made per call), so that
// the fused loss transposes x once per step, not once per label chunk.
int64_t xt_cols(int64_t B);
int transpose_x(xmc_gsffi_shape s, const void *x, void *xt, cudaStream_t st);
int grad_weight_bias_xt(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x, const void *xt,
                        const int32_t *indices, void *grad_weight, void *grad_bias, cudaStream_t st);

// grad_input for bf16/fp16 added into acc (fp32 [B, H]); the fused loss calls it once per label chunk.
int grad_input_add_f32(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *weight,
                       const int32_t *indices, float *acc, cudaStream_t st);

}  // namespace xmc_cuda

#define XMC_CHECK_LAUNCH()            \
  do {                                \
    int e_ = xmc_cuda::last_error();  \
    if (e_ != 0) return e_;           \
  } while (0)
