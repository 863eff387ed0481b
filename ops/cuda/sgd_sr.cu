// SGD with momentum and stochastic rounding on CUDA (C API in ops/xmc.h): the element update of
// ops/sgd_sr_update.h, the same one the C kernel runs, so CPU and GPU results are bitwise equal. Memory bound:
// each thread moves 16 bytes of param, grad and momentum at a time.
#include <type_traits>

#include "gsffi_common.cuh"
#include "sgd_sr_update.h"

namespace xmc_cuda {
namespace {

constexpr int kThreads = 256;

// Elements [base, base + V) of each thread's grid stride; vec: param, grad and momentum are 16-byte aligned.
template <bool BF16>
__global__ void __launch_bounds__(kThreads)
    sgd_sr_kernel(int64_t n, void *param, void *momentum_buf, const void *grad, xmc_sgd_sr_args a, bool vec) {
  pdl_begin();  // launched with launch_pdl
  using E = std::conditional_t<BF16, uint16_t, float>;
  constexpr int V = 16 / sizeof(E);
  const bool has_buf = momentum_buf != nullptr && a.momentum != 0.0f;
  E *p = static_cast<E *>(param), *m = static_cast<E *>(momentum_buf);
  const E *g = static_cast<const E *>(grad);
  const int64_t stride = (int64_t)gridDim.x * kThreads * V;
  for (int64_t base = ((int64_t)blockIdx.x * kThreads + threadIdx.x) * V; base < n; base += stride) {
    if (vec && base + V <= n) {
      uint4 pv = *reinterpret_cast<const uint4 *>(p + base), gv = ldg16(g + base), mv = make_uint4(0, 0, 0, 0);
      if (has_buf) mv = *reinterpret_cast<const uint4 *>(m + base);
      xmc_sgd_sr_args at = a;
      at.offset = a.offset + base;  // the bits of element base + j
      const E *ge = reinterpret_cast<const E *>(&gv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float gj = BF16 ? xmc_sr_bf16_to_f32((uint16_t)ge[j]) : (float)ge[j];
        xmc_sgd_sr_element(BF16, &pv, has_buf ? &mv : nullptr, j, gj, &at);
      }
      *reinterpret_cast<uint4 *>(p + base) = pv;
      if (has_buf) *reinterpret_cast<uint4 *>(m + base) = mv;
    } else {
      for (int64_t i = base; i < xmin<int64_t>(base + V, n); ++i) {
        const float gi = BF16 ? xmc_sr_bf16_to_f32((uint16_t)g[i]) : (float)g[i];
        xmc_sgd_sr_element(BF16, p, has_buf ? m : nullptr, i, gi, &a);
      }
    }
  }
}

}  // namespace
}  // namespace xmc_cuda

extern "C" int xmc_sgd_sr_cuda(int64_t n, xmc_dtype dt, void *param, void *momentum_buf, const void *grad,
                               xmc_sgd_sr_args a, xmc_exec ex) {
  using namespace xmc_cuda;
  if (dt != XMC_F32 && dt != XMC_BF16) return XMC_ERR_DTYPE;
  if (n <= 0) return XMC_OK;
  const bool vec = (uintptr_t)param % 16 == 0 && (uintptr_t)grad % 16 == 0 && (uintptr_t)momentum_buf % 16 == 0;
  const int64_t per_block = (int64_t)kThreads * 8;
  const unsigned blocks = (unsigned)xmin<int64_t>((n + per_block - 1) / per_block, (int64_t)num_sms() * 16);
  if (dt == XMC_BF16)
    launch_pdl(sgd_sr_kernel<true>, dim3(blocks), dim3(kThreads), 0, ex.stream, n, param, momentum_buf, grad, a, vec);
  else
    launch_pdl(sgd_sr_kernel<false>, dim3(blocks), dim3(kThreads), 0, ex.stream, n, param, momentum_buf, grad, a,
               vec);
  return last_error();
}
