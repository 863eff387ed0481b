// Probe: how fast can a CTA gather random 512-byte rows of x^T from its own shared memory, from the partner
// CTA's shared memory in a 2-CTA cluster (distributed shared memory), and from L2?
//
// It decides whether grad_weight's x^T gather can leave L2 (gpu_notes.md, "Where each op stands", grad_weight):
// today each (group, 256 rows) item gathers its 64 x^T rows (32 KB) from an L2-resident x^T beside 16 KB of
// grad_y, 4.5 GB through L2 per call at (256, 3M, 64, 32), and L2 bounds it (1.0 ms, floor 0.65). In a 2-CTA
// cluster whose CTAs each hold half of x^T's rows (384 features x 256 batch entries x 2 bytes = 196,608 bytes)
// in shared memory, every item reads its rows from the CTA that holds them, local or remote, with no partial
// sums to exchange and no new invariant on the slots. L2 would then carry only grad_y and dW (1.9 GB). That
// pays only if remote rows arrive at least as fast as rows from L2 do today; this probe measures it.
//
// Each warp step is the gather of one mma B operand set: 8 rows (lanes / 4) x 64 bytes (4 lanes x 16 bytes),
// rows drawn by a hash over the 768 features, the 16-byte chunks XOR-swizzled by the row as a kernel would
// store them; 8 such loads are in flight before any is used. Modes:
//   local          ld.shared of the CTA's own half (every row taken modulo 384)
//   local_cluster  the same rows through the cluster window at the CTA's own rank (ld.shared::cluster)
//   remote         the partner's half (ld.shared::cluster)
//   mixed          the design: row < 384 from rank 0, else rank 1, one uniform ld.shared::cluster
//   l2             the same rows of a global [768, 256] bf16 x^T (393 KB, L2-resident), ld.global.cg
//
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -o /tmp/dsmem_gather \
//       benchmarks/experiments/dsmem_gather.cu && /tmp/dsmem_gather [steps per warp, default 4096]
#include <cooperative_groups.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace cg = cooperative_groups;

constexpr int kFeatures = 768, kHalf = kFeatures / 2, kRowBytes = 512, kThreads = 512, kInFlight = 8;
constexpr int kSmem = kHalf * kRowBytes;  // 196,608 bytes
enum Mode { LOCAL, LOCAL_CLUSTER, REMOTE, MIXED, L2 };
const char *kModeNames[] = {"local", "local_cluster", "remote", "mixed", "l2"};

#define CHECK(call)                                                                     \
  do {                                                                                  \
    cudaError_t e_ = (call);                                                            \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

__device__ __forceinline__ uint32_t hash(uint32_t v) {
  v ^= v >> 16;
  v *= 0x7feb352du;
  v ^= v >> 15;
  v *= 0x846ca68bu;
  return v ^ (v >> 16);
}

// Byte offset of 16-byte chunk c of row r within a half (rows 0..383), chunks XOR-swizzled by the row.
__device__ __forceinline__ uint32_t offset(uint32_t r, uint32_t c) { return r * kRowBytes + ((c ^ (r & 7)) << 4); }

__device__ __forceinline__ uint4 ld_cluster(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t map_rank(uint32_t local, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(local), "r"(rank));
  return out;
}

template <Mode M>
__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(kThreads, 1)
    gather(const uint4 *__restrict__ xt, int steps, uint32_t *__restrict__ sink) {
  extern __shared__ __align__(128) uint4 xs[];
  for (int e = threadIdx.x; e < kSmem / 16; e += blockDim.x)  // distinct, non-zero words
    xs[e] = make_uint4(e * 4 + 1 + blockIdx.x, e * 4 + 2, e * 4 + 3, e * 4 + 4);
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();

  const uint32_t rank = cluster.block_rank(), base = (uint32_t)__cvta_generic_to_shared(xs);
  const uint32_t own = map_rank(base, rank), peer = map_rank(base, rank ^ 1), rank0 = map_rank(base, 0),
                 rank1 = map_rank(base, 1);
  const uint32_t lane = threadIdx.x & 31, seed = (blockIdx.x * kThreads + threadIdx.x) / 32 * 0x9e3779b9u;
  uint32_t acc = 0;
  for (int s = 0; s < steps; ++s) {
    uint4 v[kInFlight];
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {
      const uint32_t row = hash(seed + (uint32_t)(s * kInFlight + i) * 8 + lane / 4) % kFeatures;
      const uint32_t chunk = ((uint32_t)(s * kInFlight + i) % 8) * 4 + lane % 4;
      if (M == L2)
        v[i] = __ldcg(xt + row * (kRowBytes / 16) + chunk);
      else if (M == LOCAL)
        v[i] = xs[offset(row % kHalf, chunk) / 16];
      else if (M == MIXED)
        v[i] = ld_cluster((row < kHalf ? rank0 : rank1) + offset(row % kHalf, chunk));
      else
        v[i] = ld_cluster((M == REMOTE ? peer : own) + offset(row % kHalf, chunk));
    }
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) acc ^= v[i].x + v[i].y + v[i].z + v[i].w;
  }
  if (acc == 0x12345678u) sink[blockIdx.x] = acc;  // keeps the loads; practically never stores
  cluster.sync();  // the partner's shared memory stays alive until both CTAs are done reading it
}

template <Mode M>
double run(const uint4 *xt, uint32_t *sink, int steps, int *ctas_out) {
  CHECK(cudaFuncSetAttribute(gather<M>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kSmem;
  cfg.gridDim = dim3(2);
  int clusters = 0;
  CHECK(cudaOccupancyMaxActiveClusters(&clusters, gather<M>, &cfg));
  const int ctas = 2 * clusters;  // one wave: every CTA resident at once
  *ctas_out = ctas;
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  gather<M><<<ctas, kThreads, kSmem>>>(xt, steps / 8, sink);  // warm-up
  CHECK(cudaGetLastError());
  float best = 1e30f;
  for (int rep = 0; rep < 5; ++rep) {
    CHECK(cudaEventRecord(a));
    gather<M><<<ctas, kThreads, kSmem>>>(xt, steps, sink);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    best = ms < best ? ms : best;
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return best;
}

int main(int argc, char **argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 4096;
  cudaDeviceProp p;
  CHECK(cudaGetDeviceProperties(&p, 0));
  int clock_khz = 0;
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  uint4 *xt;
  uint32_t *sink;
  const size_t n = (size_t)kFeatures * kRowBytes / 16;
  CHECK(cudaMalloc(&xt, n * sizeof(uint4)));
  CHECK(cudaMalloc(&sink, 4096 * sizeof(uint32_t)));
  uint4 *host = new uint4[n];
  for (size_t e = 0; e < n; ++e) host[e] = make_uint4((uint32_t)e * 4 + 1, (uint32_t)e * 4 + 2, 3, 4);
  CHECK(cudaMemcpy(xt, host, n * sizeof(uint4), cudaMemcpyHostToDevice));
  delete[] host;
  std::printf("%s, %d SMs, %.2f GHz max; steps per warp %d, %d loads of 16 B per lane per step\n", p.name,
              p.multiProcessorCount, clock_khz / 1e6, steps, kInFlight);
  std::printf("%-14s %6s %9s %10s %16s\n", "mode", "CTAs", "ms", "TB/s", "B/clk per CTA");
  double (*runs[])(const uint4 *, uint32_t *, int, int *) = {run<LOCAL>, run<LOCAL_CLUSTER>, run<REMOTE>,
                                                               run<MIXED>, run<L2>};
  for (int m = 0; m < 5; ++m) {
    int ctas = 0;
    const double ms = runs[m](xt, sink, steps, &ctas);
    const double bytes = (double)ctas * (kThreads / 32) * steps * kInFlight * 32 * 16;
    std::printf("%-14s %6d %9.3f %10.2f %16.1f\n", kModeNames[m], ctas, ms, bytes / ms / 1e9,
                bytes / ctas / (ms * 1e-3 * clock_khz * 1e3));
  }
  CHECK(cudaFree(xt));
  CHECK(cudaFree(sink));
  return 0;
}
