/*
 * torch_xmc C API: the kernels behind the registered torch ops.
 *
 * Plain C, no torch headers. Every tensor is a raw pointer to contiguous row-major data; every size is
 * int64_t. The C++ glue in bindings/ checks arguments before calling, so the kernels assume valid input:
 * indices in [0, H), shapes consistent, batch >= 1.
 *
 * Group-shared fixed fan-in (GSFFI) layer, see DESIGN.md section 2:
 *   labels l in [0, L), group of l is l / G, n_groups = ceil(L / G)
 *   x [B, H], weight [L, F], indices int32 [n_groups, F], bias [L] or NULL, y [B, L]
 *   y[b, l]       = bias[l] + sum_t x[b, indices[l / G, t]] * weight[l, t]
 *   grad_x[b, h]  = sum_{(g, t): indices[g, t] = h} sum_{l in g} grad_y[b, l] * weight[l, t]
 *   grad_w[l, t]  = sum_b grad_y[b, l] * x[b, indices[l / G, t]]
 * float32 and bfloat16 accumulate in float32, float64 in float64. Every output element is written
 * (grad_x is overwritten, not accumulated into). Results are deterministic: the same inputs and the same
 * num_threads (CPU) or device (CUDA) give bitwise-identical outputs.
 *
 * Each function returns 0 on success; otherwise a nonzero code (XMC_ERR_* or, on CUDA, a cudaError_t value).
 */
#ifndef TORCH_XMC_OPS_XMC_H
#define TORCH_XMC_OPS_XMC_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { XMC_F32 = 0, XMC_F64 = 1, XMC_BF16 = 2, XMC_F16 = 3 } xmc_dtype;

enum { XMC_OK = 0, XMC_ERR_DTYPE = -1, XMC_ERR_NOMEM = -2 };

/* Sizes of one GSFFI call. */
typedef struct {
  int64_t batch;        /* B */
  int64_t in_features;  /* H */
  int64_t out_features; /* L */
  int64_t fan_in;       /* F */
  int64_t group_size;   /* G */
} xmc_gsffi_shape;

/* Where a kernel runs: CPU kernels use num_threads (OpenMP), CUDA launchers enqueue on stream. */
struct CUstream_st; /* cudaStream_t is struct CUstream_st * */
typedef struct {
  int num_threads;             /* CPU: OpenMP threads to use (>= 1) */
  struct CUstream_st *stream;  /* CUDA: stream to enqueue on */
  int allow_tf32;              /* CUDA float32: may use TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32) */
} xmc_exec;

/* Signature shared by the CPU and CUDA kernels of each op, so the glue can hold either. */
typedef int (*xmc_gsffi_forward_fn)(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                                    const int32_t *indices, const void *bias, void *y, xmc_exec ex);
typedef int (*xmc_gsffi_grad_input_fn)(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *weight,
                                       const int32_t *indices, void *grad_x, xmc_exec ex);
typedef int (*xmc_gsffi_grad_weight_fn)(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x,
                                        const int32_t *indices, void *grad_weight, xmc_exec ex);
typedef int (*xmc_gsffi_backward_fn)(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x,
                                     const void *weight, const int32_t *indices, void *grad_x, void *grad_weight,
                                     xmc_exec ex);
/* grad_weight and, where grad_bias is not NULL, the bias gradient sum_b grad_y[b, l] (in the dtype, summed in
 * float32 / float64) from the same pass over grad_y. */
typedef int (*xmc_gsffi_grad_weight_bias_fn)(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x,
                                             const int32_t *indices, void *grad_weight, void *grad_bias,
                                             xmc_exec ex);

/* CPU (ops/cpu/): float32, bfloat16, float64. */
int xmc_gsffi_forward_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                          const int32_t *indices, const void *bias, void *y, xmc_exec ex);
int xmc_gsffi_grad_input_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *weight,
                             const int32_t *indices, void *grad_x, xmc_exec ex);
int xmc_gsffi_grad_weight_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x,
                              const int32_t *indices, void *grad_weight, xmc_exec ex);
/* Both gradients in one pass over grad_y (each may be NULL; x is only read for grad_weight, weight only for
 * grad_x). The two functions above are this one with one output left out. */
int xmc_gsffi_backward_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x, const void *weight,
                           const int32_t *indices, void *grad_x, void *grad_weight, xmc_exec ex);

/* First position p in indices[0 .. n) with indices[p] outside [0, bound), or -1 if there is none. */
int64_t xmc_find_out_of_range_cpu(const int32_t *indices, int64_t n, int64_t bound);

/* CUDA (ops/cuda/): float32, bfloat16, float16, float64. Asynchronous on ex.stream. */
int xmc_gsffi_forward_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                           const int32_t *indices, const void *bias, void *y, xmc_exec ex);
int xmc_gsffi_grad_input_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *weight,
                              const int32_t *indices, void *grad_x, xmc_exec ex);
int xmc_gsffi_grad_weight_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x,
                               const int32_t *indices, void *grad_weight, xmc_exec ex);
/* The weight gradient and, where grad_bias is not NULL, the bias gradient (grad_bias[l] = sum_b grad_y[b, l]) from
 * the same pass over grad_y; grad_weight NULL: the bias gradient alone. */
int xmc_gsffi_grad_weight_bias_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *grad_y, const void *x,
                                    const int32_t *indices, void *grad_weight, void *grad_bias, xmc_exec ex);
/* Text for a nonzero code returned by a CUDA launcher. */
const char *xmc_cuda_error_string(int code);

/* ---- SGD with momentum and stochastic rounding (ops/cpu/sgd_sr.c, ops/cuda/sgd_sr.cu) ------------------------
 * In place over n elements of param, momentum_buf (NULL, or ignored when momentum = 0) and grad, all of dtype dt:
 *   d = grad + weight_decay * param
 *   m = first_step ? d : momentum * m + (1 - dampening) * d;   d = nesterov ? d + momentum * m : m
 *   param -= lr * d
 * computed in float32. float32 stores the results as they are; bfloat16 rounds param and m stochastically
 * (unbiased), with the bits of element i a hash of (key, offset + i): the low 16 for param, the high 16 for m.
 * So the result depends on key and the data only, never on num_threads, the device, or how the tensor is cut:
 * updating elements [c, c + n) with offset c gives what updating the whole tensor gives there. The element
 * arithmetic is in ops/sgd_sr_update.h. */
typedef struct {
  float lr, momentum, dampening, weight_decay;
  int nesterov;
  int first_step; /* momentum_buf holds nothing yet: m = d */
  uint32_t key;   /* per (seed, parameter, step); see torch_xmc/optim.py */
  int64_t offset; /* index of element 0 in the whole parameter: 0 unless updating a chunk */
} xmc_sgd_sr_args;

int xmc_sgd_sr_cpu(int64_t n, xmc_dtype dt, void *param, void *momentum_buf, const void *grad, xmc_sgd_sr_args a,
                   xmc_exec ex);
/* CUDA: asynchronous on ex.stream; all pointers on the device. */
int xmc_sgd_sr_cuda(int64_t n, xmc_dtype dt, void *param, void *momentum_buf, const void *grad, xmc_sgd_sr_args a,
                    xmc_exec ex);

/* ---- Fused loss and fused top-k over a GSFFI layer (ops/cpu/gsffi_fused.c): no B x L buffer anywhere ----
 *
 * Both work one label group at a time: a logits tile [G, B] in scratch, never the whole [B, L] logits.
 * A dense head is the case F = H with every group's indices 0 .. H-1.
 *
 * Targets are CSR positive-label lists: row b's positives are labels[indptr[b] .. indptr[b + 1]), label ids
 * in [0, L); every other label of the row is a negative. indptr int64 [B + 1], labels int64 [nnz]. A label
 * listed twice in one row counts once; a row may have no positives. Callers validate them first with
 * xmc_check_csr_targets_cpu.
 *
 * Fused loss: total = scale * sum_{b, l} loss(y[b, l], target[b, l]) with y the layer's logits, and the
 * gradients of total for x, weight, bias (each may be NULL: not computed). Losses (target t in {0, 1}):
 *   XMC_LOSS_BCE            log(1 + exp(-y)) if t else log(1 + exp(y))     (binary cross-entropy with logits)
 *   XMC_LOSS_SQUARED_HINGE  max(0, 1 - s y)^2 with s = 2 t - 1
 * loss_out is one double in host memory (CPU). The loss is summed per group and the groups in label order, so
 * it does not depend on the thread count; the gradients are deterministic for a given thread count.
 *
 * Top-k: scores [B, k] (dtype dt) and label_ids int64 [B, k] of the k highest logits per row, best first;
 * equal scores rank the lower label id first; NaN ranks above every number, as in torch.topk. 1 <= k <= L.
 */
typedef enum { XMC_LOSS_BCE = 0, XMC_LOSS_SQUARED_HINGE = 1 } xmc_loss;

/* The fused loss may update the weight in place instead of returning its gradient (grad_weight NULL, update not
 * NULL): each block of labels gets xmc_sgd_sr's step with the block's gradient, rounded to the weight's dtype
 * first, as soon as it is complete and the block's weights have been read for the input gradient. The result is
 * bitwise that of storing grad_weight and calling xmc_sgd_sr on the whole weight, without a weight-sized
 * gradient anywhere: CUDA bf16 keeps one label chunk of it (CUDA float32, on the plain kernels, keeps all of it
 * in scratch). float32 and bfloat16 only. */
typedef struct {
  void *weight;          /* the weight argument itself, written in place */
  void *momentum_buf;    /* as xmc_sgd_sr's: NULL, or unused when args.momentum = 0 */
  xmc_sgd_sr_args args;  /* args.offset must be 0 */
} xmc_weight_update;

typedef int (*xmc_gsffi_fused_loss_fn)(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                                       const int32_t *indices, const void *bias, const int64_t *indptr,
                                       const int64_t *labels, xmc_loss loss, double scale, double *loss_out,
                                       void *grad_x, void *grad_weight, void *grad_bias,
                                       const xmc_weight_update *update, xmc_exec ex);
typedef int (*xmc_gsffi_topk_fn)(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                                 const int32_t *indices, const void *bias, int64_t k, void *scores,
                                 int64_t *label_ids, xmc_exec ex);

/* CPU: float32, bfloat16, float64. */
int xmc_gsffi_fused_loss_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                             const int32_t *indices, const void *bias, const int64_t *indptr, const int64_t *labels,
                             xmc_loss loss, double scale, double *loss_out, void *grad_x, void *grad_weight,
                             void *grad_bias, const xmc_weight_update *update, xmc_exec ex);
int xmc_gsffi_topk_cpu(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight, const int32_t *indices,
                       const void *bias, int64_t k, void *scores, int64_t *label_ids, xmc_exec ex);

/* CUDA (ops/cuda/fused_*.cu): float32, bfloat16, float16, float64. Asynchronous on ex.stream; indptr, labels
 * and loss_out are device pointers. float32 / float64 in plain FMA; bfloat16 / float16 on the layer's tensor-core
 * kernels, one label chunk at a time (the loss) or in one filtering pass after a sample (top-k, large L). */
int xmc_gsffi_fused_loss_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight,
                              const int32_t *indices, const void *bias, const int64_t *indptr, const int64_t *labels,
                              xmc_loss loss, double scale, double *loss_out, void *grad_x, void *grad_weight,
                              void *grad_bias, const xmc_weight_update *update, xmc_exec ex);
int xmc_gsffi_topk_cuda(xmc_gsffi_shape s, xmc_dtype dt, const void *x, const void *weight, const int32_t *indices,
                        const void *bias, int64_t k, void *scores, int64_t *label_ids, xmc_exec ex);

/* What xmc_check_csr_targets_cpu found; *where is the offending position in indptr or labels. */
enum { XMC_CSR_OK = 0, XMC_CSR_FIRST_NOT_ZERO = 1, XMC_CSR_DECREASING = 2, XMC_CSR_LAST_NOT_NNZ = 3,
       XMC_CSR_LABEL_OUT_OF_RANGE = 4 };
/* Checks host CSR targets: indptr[0] = 0, indptr non-decreasing (first bad b: indptr[b + 1] < indptr[b]),
 * indptr[rows] = nnz, every label in [0, n_labels). */
int xmc_check_csr_targets_cpu(const int64_t *indptr, int64_t rows, const int64_t *labels, int64_t nnz,
                              int64_t n_labels, int64_t *where);

#ifdef __cplusplus
}
#endif

#endif
