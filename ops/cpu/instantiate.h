/* Instantiates the kernels of the file named by XMC_IMPL (e.g. "gsffi_impl.inc") once per compute type:
 * name_f32 computing in float with xmc_sgemm (float32 and bfloat16 tensors), name_f64 in double with xmc_dgemm.
 * Include it where the kernels are used, with XMC_IMPL defined; no include guard, on purpose. */
#define FN(name) name##_f32
#define CT float
#define GEMM xmc_sgemm
#include XMC_IMPL
#undef FN
#undef CT
#undef GEMM

#define FN(name) name##_f64
#define CT double
#define GEMM xmc_dgemm
#include XMC_IMPL
#undef FN
#undef CT
#undef GEMM
#undef XMC_IMPL
