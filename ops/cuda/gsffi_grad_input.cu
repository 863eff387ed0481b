// GSFFI input gradient on CUDA:
//   grad_x[b, h] = sum_{(g, t): indices[g, t] = h} P_g[b, t],   P_g = grad_y[:, labels of g] @ weight[labels of g, :]
//
// Deterministic without atomics: the groups are split into `chunks`; a block owns one (chunk, batch tile) pair
// and accumulates its chunk's contribution to its rows in fp32 shared memory, then writes that partial sum to
// a scratch buffer [chunks, B, H]; a second kernel adds the chunks in a fixed order. Inside a block, within one
// group every accumulator element is read, added to and written by one lane of one warp (a group's feature
// ids are distinct; the Python layer checks this), and the groups follow each other in program order (dx_mma:
// a warp owns its rows) or across the block barrier that starts each group (dx_mma_staged). The chunk count
// depends only on the shape and the GPU's SM count, so results are bitwise identical from run to run on one
// device.
//
// Tensor-core paths (bf16/fp16): the weight-staged kernel (dx_mma_staged, described there) wherever its ring
// fits; otherwise (feature ids not 16-byte aligned, or H too large for a ring) the unstaged dx_mma: each warp
// owns 8 batch rows (the other half of the m16 tile is zero) and computes P_g (8 x F) with mma.sync, the
// grad_y fragments loaded straight from global memory (16-byte loads, see gsffi_common.cuh) and the weight
// fragments built from 16-byte weight-row loads by byte permutes (a k pair of B spans two weight rows). The
// next group's loads are issued before this group's arithmetic and scatter.
#include "gsffi_common.cuh"

namespace xmc_cuda {
namespace {

// Scratch rows [chunks, B, H] in A are reduced over chunks in order into grad_x.
// ADD: out is a float accumulator that the sum is added to (the fused loss sums label chunks that way).
template <class T, class A, bool ADD>
__global__ void reduce_chunks(const A *__restrict__ part, int64_t chunks, int64_t n, T *__restrict__ out) {
  pdl_begin();  // launched with launch_pdl
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    A s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[c * n + e];
    if (ADD) s += (A)to_acc(out[e]);
    put(out + e, s);
  }
}

// Writes a block's partial sums, rows x H floats, to its scratch rows: dst[r * H + h] = accs[word(r, h)]. A warp
// per row and lanes across features (coalesced), with 32-bit indices (the loops it replaced divided a 64-bit
// element index by H per element; measured, that was not a visible cost: in-run A/B within noise). For
// row-major accumulators (dx_mma).
template <class Word>
__device__ __forceinline__ void write_partial(float *__restrict__ dst, const float *accs, int rows, int H,
                                              int nthreads, Word word) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < rows; r += nthreads >> 5) {
    float *d = dst + (int64_t)r * H;
    for (int h = lane; h < H; h += 32) d[h] = accs[word(r, h)];
  }
}

// The same for feature-major accumulators [H][R] (dx_mma_staged), whose 32 rows r0 .. r0 + 31 of a feature are
// the 32 words from h R + r0 in some order (r0 a multiple of 32, R too). Read along features at one row, those
// words share one bank (32 wavefronts per instruction); so a warp takes a tile of 32 features x 32 rows with
// lanes across rows (one wavefront per read), writes it back into the same words transposed with a skew
// (feature i, row l at word (l + i) % 32 of its run: distinct banks both ways), and reads it along features,
// one coalesced 128-byte store per row. Where R is not a multiple of 32 (odd warp pairs), lanes take rows and
// each writes 32 features of its row in 16-byte pieces: scattered stores (~1 TB/s at (256, 768): ~25 us per
// call, when every block writes its sums at once).
template <class Word>
__device__ __forceinline__ void write_partial_fm(float *__restrict__ dst, float *accs, int rows, int R, int H,
                                                 int nthreads, Word word) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rtiles = (rows + 31) / 32, htiles = (H + 31) / 32;
  for (int t = warp; t < rtiles * htiles; t += nthreads >> 5) {
    const int r0 = (t % rtiles) * 32, h0 = (t / rtiles) * 32, r = r0 + lane;
    float v[32];
    if (R % 32 == 0) {
#pragma unroll
      for (int i = 0; i < 32; ++i) v[i] = h0 + i < H ? accs[word(r, h0 + i)] : 0.f;
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 32; ++i)
        if (h0 + i < H) accs[(h0 + i) * R + r0 + ((lane + i) & 31)] = v[i];
      __syncwarp();
      if (h0 + lane < H)
        for (int k = 0; k < 32 && r0 + k < rows; ++k)
          dst[(int64_t)(r0 + k) * H + h0 + lane] = accs[(h0 + lane) * R + r0 + ((k + lane) & 31)];
      continue;
    }
    if (r >= rows) continue;
#pragma unroll
    for (int i = 0; i < 32; ++i) v[i] = h0 + i < H ? accs[word(r, h0 + i)] : 0.f;
    float *d = dst + (int64_t)r * H + h0;
    if (H % 4 == 0 && h0 + 32 <= H && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
#pragma unroll
      for (int i = 0; i < 32; i += 4) *reinterpret_cast<float4 *>(d + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    } else {
#pragma unroll
      for (int i = 0; i < 32; ++i)
        if (h0 + i < H) d[i] = v[i];
    }
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
  pdl_begin();  // launched with launch_pdl
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
  write_partial(part + ((int64_t)c * B + brow) * H, accs, (int)rows, H, blockDim.x,
                [&](int r, int h) { return r * hs + h; });
}

// Weight-staged variant, used where its ring fits beside the accumulators. The warps of a block read the same
// group's weights, so the block copies them (and the group's feature ids) once into a ring of shared stages
// with cp.async, `ns` - 1 groups ahead. Rows of a stage are F * 2 bytes; the 16-byte chunk c of row L sits at
// c ^ swz(L), so the 8 label rows one ldmatrix phase reads ({0, 1, 8, 9, 16, 17, 24, 25} + even offset) fall
// on 8 different bank groups.
//
// The product is taken transposed, P_g^T = W_g^T (F x G) @ grad_y_g^T (G x rows): the fan-in slots are the m16
// side (A from the stage by ldmatrix.trans) and the batch rows the n8 side (B is a thread's 16-byte grad_y
// piece), so no part of a tile is zero padding. Warps come in teams of NT = 2 (pairs) or 4 (quads): a team owns
// 8 NT batch rows (NT n8 tiles), its warp i the 16-slot tiles i, i + NT, ... (distinct slots, so distinct
// features: two warps of a team never touch the same accumulator in one group). Each A fragment serves NT n
// tiles, and a thread holds, per slot it owns, 2 NT batch rows.
//
// Accumulators are feature-major, [H][R] floats for the block's R rows, and a thread's rows of one feature
// come in 16-byte runs of four (one 128-bit shared read and write per feature and 4 rows):
//   pairs: row 16 p + 8 n + 2 q + j at word 16 p' + 4 q + 2 n + j of the feature's column, p' = p ^ (h & 1)
//          where the pairs are even in number. A quarter-warp touches two random features' 16-word runs, which
//          share banks when the features' parities agree: ~1.5 wavefronts per 32 elements (the row-major
//          layout took ~2.1 and needed one access per element).
//   quads: row 32 p + 8 n + 2 q + j at word 32 p + 16 (n >> 1) + 4 q + 2 (n & 1) + j: a thread's rows of a
//          feature are two runs, the halves c = 0, 1 of the quad's 32 banks. The lanes of odd r4 take c = 1
//          first, so the two features of a quarter-warp always sit in different halves: one wavefront per 32
//          elements (the price: each thread selects which of its two runs it adds, 4 selects per run).
//          In-run A/B, quads against pairs: 1.33 -> 1.24 ms at (256, 3M, 64, 32), 1.22 -> 1.12 at (1024,
//          670080, 64, 32), bitwise the same sums.
__device__ __forceinline__ int stage_swz(int row, int mask) { return ((row & 1) | (((row >> 3) & 3) << 1)) & mask; }

// Word of (feature h, block row r) in the staged kernel's accumulators of R rows, for teams of NT warps (see
// above and dx_mma_staged).
template <int NT>
__host__ __device__ __forceinline__ int64_t acc_word(int64_t h, int r, int R) {
  if (NT == 4) return h * R + (r & ~31) + 16 * ((r >> 4) & 1) + 4 * ((r >> 1) & 3) + 2 * ((r >> 3) & 1) + (r & 1);
  const int swz = (R / 16) % 2 == 0 ? (int)(h & 1) : 0;
  return h * R + (((r >> 4) ^ swz) << 4) + 4 * ((r >> 1) & 3) + 2 * ((r >> 3) & 1) + (r & 1);
}
// Bytes of those accumulators (R is a multiple of 16, so the ring after them is 16-byte aligned).
__host__ __device__ inline int64_t acc_tbytes(int64_t H, int R) { return H * R * 4; }

//
// FT and NWT, where not 0, fix the fan-in and the warp count at compile time: the per-group copy loops and
// fan-in checks then fold away (with both at run time the loop body is mostly index arithmetic, and the
// kernel is instruction bound). DYR: grad_y comes through the ring (else each thread loads its rows' pieces
// one group ahead); fixed at compile time so that neither path carries the other's register moves.
// SPG: ring stages per group. 1: a stage holds a whole group (kRows = 32 KCG >= G labels). 2: a stage holds
// half a group's labels (G <= 2 kRows), so that a ring with grad_y fits where whole-group stages do not (F = 96,
// G = 48 at H = 768); the products of the two halves add up in registers and the accumulators take them once,
// at the second half. That needs every fan-in slot in one pass of the tile loop (F <= 128) and the ring.
template <class T, int KCG, int FT, int NWT, bool DYR, int NT, int SPG>
__global__ void __launch_bounds__(kDxMaxWarps * 32, 1)
    dx_mma_staged(const T *__restrict__ dy, const T *__restrict__ w, const int32_t *__restrict__ idx,
                  float *__restrict__ part, int64_t B, int H, int64_t L, int F_arg, int G, int64_t n_groups, int nbt,
                  int R_arg, int ns, int stage_bytes, bool dy_vec) {
  pdl_begin();  // launched with launch_pdl
  constexpr bool dy_ring = DYR;
  static_assert(SPG == 1 || (SPG == 2 && DYR), "half-group stages carry grad_y in the ring");
  extern __shared__ __align__(16) float accs[];
  const int F = FT ? FT : F_arg, nthreads = NWT ? NWT * 32 : (int)blockDim.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane & 3, r4 = lane >> 2;
  const int R = NWT ? NWT * kDxRows : R_arg;  // block rows: 8 NT per team of NT warps
  const int wp = warp / NT, par = warp % NT;  // team (its 8 NT rows) and the warp's residue of 16-slot tiles
  for (int e = threadIdx.x; e < H * R; e += nthreads) accs[e] = 0.f;
  unsigned char *ring = reinterpret_cast<unsigned char *>(accs) + acc_tbytes(H, R);
  const uint32_t ring_s = (uint32_t)__cvta_generic_to_shared(ring);
  constexpr int kRows = 32 * KCG;  // weight rows per stage, zero past the group's (or half's) end
  const int cpr = F / 8, smask = cpr % 8 == 0 ? 7 : 0;
  const int cpr_shift = (cpr & (cpr - 1)) == 0 ? __ffs(cpr) - 1 : -1;  // a shift, not a division, per chunk
  const int dy_off = kRows * F * 2 + F * 4;  // grad_y tile after weights and ids (dy_ring only)

  const int bt = blockIdx.x % nbt, c = blockIdx.x / nbt, chunks = gridDim.x / nbt;
  const int64_t brow = (int64_t)bt * R, wrow = brow + 8 * NT * wp;  // block's and team's first row
  // This thread's accumulator runs of feature h (4 rows each, see acc_word): pairs, rows 16 wp + {2q, 2q + 1,
  // 8 + 2q, 9 + 2q} at acc_s + h * R * 4 + (lane_off ^ ((h & swz) << 6)); quads, the same rows + 16 c at
  // acc_s + h * R * 4 + lane_off + 64 c.
  const uint32_t acc_s = (uint32_t)__cvta_generic_to_shared(accs), acc_r = (uint32_t)R * 4;
  const uint32_t lane_off = 32 * NT * wp + 16 * q, swz = (R / 16) % 2 == 0 ? 1 : 0;
  const int odd = r4 & 1;  // quads: this lane's first 16-byte access is its rows' chunk odd (see below)
  const int64_t g_begin = n_groups * c / chunks, g_end = n_groups * (c + 1) / chunks;

  // grad_y copies (dy_ring): the block's R rows x kRows / 8 16-byte pieces are KCG per thread whatever the warp
  // count. Each thread's source rows and ring offsets are the same for every group: set them once.
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
  // The copies are issued for the stages of groups g_begin, g_begin + 1, ... in turn: their base pointers
  // advance by one group after a group's last stage (the 64-bit products g * G * F and g * F were a third of the
  // group loop). Stage hi of group gi holds its labels li + hi kRows ...; the feature ids come with its last.
  int64_t gi = g_begin, li = g_begin * G;
  int hi = 0;
  const T *wi = w + li * F;
  const int32_t *ii = idx + g_begin * F;
  const int64_t wstep = (int64_t)G * F;
  auto issue = [&](int slot) {
    if (gi < g_end) {
      const uint32_t sb = ring_s + slot * stage_bytes;
      const int nval = (gi + 1 < n_groups ? G : (int)(L - li)) - hi * kRows;  // this stage's labels (<= kRows used)
      const T *ws = wi + hi * kRows * F;
      // Loops of the form e0 += nthreads with e = e0 + tid: a fixed trip count when FT and NWT are set, so they
      // unroll and everything but the group's base address is hoisted out of the group loop.
#pragma unroll
      for (int e0 = 0; e0 < kRows * cpr; e0 += nthreads) {
        const int e = e0 + (int)threadIdx.x;
        if (e >= kRows * cpr) break;
        const int r = cpr_shift >= 0 ? e >> cpr_shift : e / cpr, col = e - r * cpr;
        const bool ok = r < nval;
        cp_async16(sb + r * F * 2 + ((col ^ stage_swz(r, smask)) << 4), ok ? ws + r * F + col * 8 : w, ok ? 16 : 0);
      }
      if (hi == SPG - 1)
#pragma unroll
        for (int e0 = 0; e0 < F / 4; e0 += nthreads) {
          const int e = e0 + (int)threadIdx.x;
          if (e < F / 4) cp_async16(sb + kRows * F * 2 + e * 16, ii + e * 4, 16);
        }
      if (dy_ring) {  // the block's grad_y rows of this group: kRows labels each, zeros past the group or batch
#pragma unroll
        for (int it = 0; it < KCG; ++it) {
          const int n = dy_src[it] != nullptr ? xmax(0, xmin(8, nval - dy_c8[it])) : 0;
          cp_async16(sb + dy_dst[it], n > 0 ? dy_src[it] + li + hi * kRows : dy, 2 * n);
        }
      }
    }
    cp_async_commit();
    if (++hi == SPG) {
      hi = 0;
      ++gi;
      li += G;
      wi += wstep;
      ii += F;
    }
  };
  // Without the ring, each thread loads its rows' pieces (rows wrow + 8 n + r4) one group ahead.
  auto load_dy = [&](uint4 d[NT][KCG], int64_t g) {
    const int64_t lg = g * G, lend = xmin<int64_t>(lg + G, L);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int64_t row = wrow + 8 * n + r4;
#pragma unroll
      for (int kc = 0; kc < KCG; ++kc) {
        const int64_t l = lg + kc * 32 + 8 * q;
        d[n][kc] = !dy_ring && row < B && g < g_end ? load_elems<8>(dy + row * L + l, lend - l, dy_vec)
                                                    : make_uint4(0, 0, 0, 0);
      }
    }
  };

  for (int k = 0; k < ns - 1; ++k) issue(k);
  uint4 dyn[NT][KCG];
  load_dy(dyn, g_begin);
  // ldmatrix.x4.trans: lane 8i + r gives label row r of matrix i; i >> 1 is the k half, i & 1 the slot half of
  // the 16-slot tile, so the four registers are the A fragment {a0, a1, a2, a3} of W_g^T.
  const int mi = lane >> 3, rr = lane & 7;
  uint32_t lrow_off[KCG][2];  // this lane's ldmatrix row (a weight label) and its swizzle, the same every group
  int lrow_swz[KCG][2];
#pragma unroll
  for (int kc = 0; kc < KCG; ++kc)
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int lrow = kc * 32 + 8 * (rr >> 1) + 4 * s + 2 * (mi >> 1) + (rr & 1);
      lrow_off[kc][s] = lrow * F * 2;
      lrow_swz[kc][s] = stage_swz(lrow, smask);
    }
  // This lane's NT grad_y rows in a stage (dy_ring).
  uint32_t dy_row[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) dy_row[n] = (uint32_t)(dy_off + (8 * NT * wp + 8 * n + r4) * kRows * 2);
  // Ring slots counted in int: a 64-bit % by a run-time ns is a ~70-instruction call, three times per group.
  int slot = 0, slot_next = ns - 1;
  constexpr int MT = 8 / NT, NC = NT / 2;  // MT: 16-slot tiles per pass; NC: 16-byte chunks (4 rows) of a slot
  float acc[MT][NT][4];  // SPG = 2: the group's products so far (one pass of the tile loop, F <= 128)
  for (int64_t g = g_begin; g < g_end; ++g)
#pragma unroll
  for (int hf = 0; hf < SPG; ++hf, slot = slot + 1 == ns ? 0 : slot + 1,
           slot_next = slot_next + 1 == ns ? 0 : slot_next + 1) {
    const bool first = hf == 0, last = hf == SPG - 1;  // the group's first and last stage
    if (ns == 2) cp_async_wait<0>(); else if (ns == 3) cp_async_wait<1>(); else cp_async_wait<2>();
    __syncthreads();  // stage i is in; every warp is done with the stage that the next issue overwrites
    issue(slot_next);
    uint4 dyc[NT][KCG];
    if (!dy_ring) {
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int kc = 0; kc < KCG; ++kc) dyc[n][kc] = dyn[n][kc];
      load_dy(dyn, g + 1);
    }
    if (wrow >= B) continue;
    const uint32_t sb = ring_s + (uint32_t)(slot * stage_bytes);
    if (dy_ring) {  // at 32-bit shared addresses (a generic pointer re-derived the shared window every group)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int kc = 0; kc < KCG; ++kc) dyc[n][kc] = lds_u32x4(sb + dy_row[n] + (kc * 32 + 8 * q) * 2);
    }
    const uint32_t ids_s = sb + kRows * F * 2;
    // This warp's 16-slot tiles par, par + NT, ..., MT at a time (32 accumulators). The accumulators' old values
    // are read first, so their latency (feature id, address, then the 128-bit read) overlaps the products; then
    // all writes (a group's feature ids are distinct, so no write waits on another's read). SPG = 2: the first
    // half's products stay in acc, and the second adds to them before the accumulators are read and written.
#pragma unroll
    for (int m0 = par; m0 * 16 < F; m0 += NT * MT) {
      // access k = (2 m + u) NC + c: slot 16 (m0 + NT m) + 8 u + r4, chunk c of its rows
      uint32_t ad[2 * MT * NC];
      float4 old[2 * MT * NC];
#pragma unroll
      for (int mu = 0; mu < 2 * MT; ++mu) {
        const int t = 16 * (m0 + NT * (mu >> 1)) + 8 * (mu & 1) + r4;
        if (last && t < F) {
          const uint32_t h = (uint32_t)lds_i32(ids_s + 4 * t);
#pragma unroll
          for (int c = 0; c < NC; ++c) {
            // quads: lanes of odd r4 take their chunks in the other order, so the two features a quarter-warp
            // touches (r4 = 2i, 2i + 1) sit in different halves of the 32 banks: no conflict
            ad[mu * NC + c] = acc_s + h * acc_r + (NT == 2 ? lane_off ^ ((h & swz) << 6) : lane_off + 64 * (c ^ odd));
            old[mu * NC + c] = lds_f32x4(ad[mu * NC + c]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (first)
#pragma unroll
          for (int n = 0; n < NT; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
        const int t16 = 16 * (m0 + NT * m);
        if (t16 >= F) break;
        // the upper 8 slots of a last, half tile (F = 8 mod 16) read chunk cpr - 1 again; their rows of P are unused
        const int chunk = F % 16 == 0 ? t16 / 8 + (mi & 1) : xmin(t16 / 8 + (mi & 1), cpr - 1);
#pragma unroll
        for (int kc = 0; kc < KCG; ++kc)
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            uint32_t a[4];
            ldsm_x4_trans(a, sb + lrow_off[kc][s] + ((chunk ^ lrow_swz[kc][s]) << 4));
#pragma unroll
            for (int n = 0; n < NT; ++n) mma16816(T(), acc[m][n], a, word(dyc[n][kc], 2 * s), word(dyc[n][kc], 2 * s + 1));
          }
      }
      // acc[m][n][2 u + j]: slot 16 (m0 + NT m) + 8 u + r4, row 8 n + 2 q + j of the team; chunk c of a slot's
      // rows is n tiles 2 c and 2 c + 1.
#pragma unroll
      for (int mu = 0; mu < 2 * MT; ++mu) {
        const int t = 16 * (m0 + NT * (mu >> 1)) + 8 * (mu & 1) + r4, m = mu >> 1, u = mu & 1;
        if (last && t < F) {
#pragma unroll
          for (int c = 0; c < NC; ++c) {
            const int c0 = NT == 2 ? 0 : c ^ 1;  // chunk c0 where odd, c elsewhere, with compile-time indices
            const float4 e = make_float4(acc[m][2 * c][2 * u], acc[m][2 * c][2 * u + 1], acc[m][2 * c + 1][2 * u],
                                         acc[m][2 * c + 1][2 * u + 1]),
                         o = make_float4(acc[m][2 * c0][2 * u], acc[m][2 * c0][2 * u + 1],
                                         acc[m][2 * c0 + 1][2 * u], acc[m][2 * c0 + 1][2 * u + 1]);
            const float4 v = NT == 4 && odd ? o : e, p = old[mu * NC + c];
            sts_f32x4(ad[mu * NC + c], make_float4(p.x + v.x, p.y + v.y, p.z + v.z, p.w + v.w));
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  const int64_t rows = xmin<int64_t>(R, B - brow);
  write_partial_fm(part + ((int64_t)c * B + brow) * H, accs, (int)rows, R, H, nthreads,
                   [&](int r, int h) { return (int)acc_word<NT>(h, r, R); });
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
    launch_pdl(reduce_chunks<float, A, true>, dim3((unsigned)blocks), dim3(256), 0, st, part, chunks, n,
               (float *)gx.ptr);
  else
    launch_pdl(reduce_chunks<T, A, false>, dim3((unsigned)blocks), dim3(256), 0, st, part, chunks, n, (T *)gx.ptr);
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
// of nwarps warps with smem bytes of shared memory; hs is the kernel's accumulator stride and tail... its
// arguments after the common ones.
template <class T, class Kernel, class... Tail>
int grad_input_tc(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, DxOut gx, cudaStream_t st,
                  int nwarps, int rows, Kernel kernel, size_t smem, int hs, Tail... tail) {
  const int per_sm = prepare(kernel, nwarps * 32, smem);
  XMC_CHECK_LAUNCH();
  const int64_t n_groups = (s.out_features + s.group_size - 1) / s.group_size;
  const int nbt = (int)((s.batch + rows - 1) / rows);
  const int64_t chunks = mma_chunks(per_sm, nbt, n_groups);
  return with_partials<T, float>(s, chunks, false, gx, st, [&](float *part) {
    launch_pdl(kernel, dim3((unsigned)(chunks * nbt)), dim3(nwarps * 32), smem, st, (const T *)dy, (const T *)w, idx,
               part, s.batch, (int)s.in_features, s.out_features, (int)s.fan_in, (int)s.group_size, n_groups, nbt,
               hs, tail...);
  });
}

template <class T, int KCG>
int grad_input_mma(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, DxOut gx, cudaStream_t st,
                   int nwarps, bool dy_vec) {
  const bool idx_vec = (uintptr_t)idx % 16 == 0;
  const int hs = (int)acc_stride(s.in_features);
  const size_t smem = (size_t)nwarps * kDxRows * hs * sizeof(float);
  return grad_input_tc<T>(s, dy, w, idx, gx, st, nwarps, nwarps * kDxRows, dx_mma<T, KCG>, smem, hs, dy_vec,
                          idx_vec);
}

// The staged kernel for `pairs` warp pairs (16 rows each) in teams of NT warps, with the fan-in and warp count
// fixed where they are the common ones (F = 64 or 128, 8 warps).
template <class T, int KCG, bool DYR, int NT, int SPG = 1>
int grad_input_staged(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, DxOut gx, cudaStream_t st,
                      int pairs, bool dy_vec, int ns, int stage_bytes) {
  const int nwarps = 2 * pairs, rows = 16 * pairs;
  const size_t smem = (size_t)acc_tbytes(s.in_features, rows) + (size_t)ns * stage_bytes;
  if (nwarps == 8 && s.fan_in == 64)
    return grad_input_tc<T>(s, dy, w, idx, gx, st, nwarps, rows, dx_mma_staged<T, KCG, 64, 8, DYR, NT, SPG>, smem,
                            rows, ns, stage_bytes, dy_vec);
  if (nwarps == 8 && s.fan_in == 128)
    return grad_input_tc<T>(s, dy, w, idx, gx, st, nwarps, rows, dx_mma_staged<T, KCG, 128, 8, DYR, NT, SPG>, smem,
                            rows, ns, stage_bytes, dy_vec);
  return grad_input_tc<T>(s, dy, w, idx, gx, st, nwarps, rows, dx_mma_staged<T, KCG, 0, 0, DYR, NT, SPG>, smem, rows,
                          ns, stage_bytes, dy_vec);
}

template <class T, int KCG>
int grad_input_staged(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, DxOut gx, cudaStream_t st,
                      int pairs, bool dy_vec, int ns, int stage_bytes, bool dy_ring) {
  // Quads where grad_y comes through the ring (without it, each of a team's warps loads the team's rows from
  // global memory, twice as many per warp as in a pair: measured 11-17% slower at F = 128 or G = 64).
  if (dy_ring && pairs % 2 == 0)
    return grad_input_staged<T, KCG, true, 4>(s, dy, w, idx, gx, st, pairs, dy_vec, ns, stage_bytes);
  return dy_ring ? grad_input_staged<T, KCG, true, 2>(s, dy, w, idx, gx, st, pairs, dy_vec, ns, stage_bytes)
                 : grad_input_staged<T, KCG, false, 2>(s, dy, w, idx, gx, st, pairs, dy_vec, ns, stage_bytes);
}

template <class T>
int grad_input_half(xmc_gsffi_shape s, const void *dy, const void *w, const int32_t *idx, DxOut gx, cudaStream_t st) {
  const bool mma_ok = s.fan_in % 8 == 0 && s.group_size <= 128 && (uintptr_t)w % 16 == 0;
  if (!mma_ok) return grad_input_generic<T>(s, dy, w, idx, gx, st);
  const int64_t optin = smem_optin();
  const int kcg = (int)((s.group_size + 31) / 32);
  const bool dy_ok = s.out_features % 8 == 0 && s.group_size % 8 == 0 && (uintptr_t)dy % 16 == 0;
  // Staged kernel: the most warp pairs (each 16 batch rows of feature-major accumulators) that leave room for a
  // ring of 2 to 4 stages of 32 KCG weight rows and F feature ids, plus, where enough stages still fit, the
  // block's grad_y tile: then grad_y, the largest stream, has 1-3 groups in flight per block instead of one
  // per warp (Little's law: one group in flight held grad_input to ~0.35 TB/s). Enough: 3 stages for warp pairs;
  // 2 where the pairs are even, since the ring is what lets them work in quads (measured against pairs without
  // the ring: -27..-34% at F = 128 or G = 64, (256 | 1024, 670080); bitwise the same sums).
  const int rows_w = 32 * (kcg == 3 ? 4 : kcg);
  const int stage_w = (int)((rows_w * s.fan_in * 2 + s.fan_in * 4 + 15) / 16 * 16);
  int pairs = (int)xmin<int64_t>(kDxMaxWarps / 2, (s.batch + 15) / 16);
  while (pairs > 0 && acc_tbytes(s.in_features, 16 * pairs) + 2 * stage_w > optin) --pairs;
  if (pairs >= 1 && (uintptr_t)idx % 16 == 0) {
    const int64_t spare = optin - acc_tbytes(s.in_features, 16 * pairs);
    auto stage_dy = [&](int rows) {  // a stage of `rows` weight rows, the feature ids and the block's grad_y
      return (int)((rows * s.fan_in * 2 + s.fan_in * 4 + 16 * pairs * rows * 2 + 15) / 16 * 16);
    };
    const bool dy_ring = dy_ok && spare / stage_dy(rows_w) >= (pairs % 2 == 0 ? 2 : 3);
    // Where whole-group stages with grad_y do not fit twice, half-group ones may (quads, F <= 128), but only 3
    // or more of them beat pairs without the ring: in-run A/B at (256, 670080), F = 96 with G = 48 (3 stages)
    // 1.23 -> 1.00 ms; F = 128 with G = 64 (2 stages) 0.54 -> 0.60, and 2.3 -> 2.6 at L = 3M.
    if (!dy_ring && dy_ok && pairs % 2 == 0 && kcg >= 2 && s.fan_in <= 128 && spare / stage_dy(rows_w / 2) >= 3) {
      const int half = stage_dy(rows_w / 2), ns = (int)xmin<int64_t>(4, spare / half);
      if (kcg == 2) return grad_input_staged<T, 1, true, 4, 2>(s, dy, w, idx, gx, st, pairs, dy_ok, ns, half);
      return grad_input_staged<T, 2, true, 4, 2>(s, dy, w, idx, gx, st, pairs, dy_ok, ns, half);
    }
    const int stage_bytes = dy_ring ? stage_dy(rows_w) : stage_w;
    const int ns = (int)xmin<int64_t>(4, spare / stage_bytes);
    if (kcg == 1) return grad_input_staged<T, 1>(s, dy, w, idx, gx, st, pairs, dy_ok, ns, stage_bytes, dy_ring);
    if (kcg == 2) return grad_input_staged<T, 2>(s, dy, w, idx, gx, st, pairs, dy_ok, ns, stage_bytes, dy_ring);
    return grad_input_staged<T, 4>(s, dy, w, idx, gx, st, pairs, dy_ok, ns, stage_bytes, dy_ring);
  }
  // Unstaged kernel (feature ids not 16-byte aligned, or H too large for a ring): row-major accumulators.
  const int64_t per_warp = kDxRows * acc_stride(s.in_features) * (int64_t)sizeof(float);
  const int nwarps = (int)xmin<int64_t>(xmin<int64_t>(kDxMaxWarps, optin / per_warp), (s.batch + kDxRows - 1) / kDxRows);
  if (nwarps < 1) return grad_input_generic<T>(s, dy, w, idx, gx, st);
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
