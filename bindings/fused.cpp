#include "fused.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace torch_xmc {
namespace {

void check_bias(const char *op, const std::optional<at::Tensor> &bias, const at::Tensor &x, int64_t L) {
  if (!bias.has_value()) return;
  check_same_device_dtype(op, "bias", *bias, x);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == L, op, ": bias must have shape [", L, "], got ", bias->sizes());
}

xmc_loss parse_loss(const char *op, std::string_view loss) {
  if (loss == "bce") return XMC_LOSS_BCE;
  if (loss == "squared_hinge") return XMC_LOSS_SQUARED_HINGE;
  TORCH_CHECK(false, op, ": loss must be 'bce' or 'squared_hinge', got '", loss, "'");
}

// The factor on the sum over all B * L terms; the names and meanings follow torch's losses.
double reduction_scale(const char *op, std::string_view reduction, int64_t B, int64_t L) {
  if (reduction == "sum") return 1.0;
  if (reduction == "batchmean") return 1.0 / static_cast<double>(B);                          // as nn.KLDivLoss
  if (reduction == "mean") return 1.0 / (static_cast<double>(B) * static_cast<double>(L));  // as nn.BCEWithLogitsLoss
  TORCH_CHECK(false, op, ": reduction must be 'batchmean', 'mean' or 'sum', got '", reduction, "'");
}

// Host checks of the CSR targets (contiguous, on the CPU); the kernels assume them.
void check_targets(const char *op, const at::Tensor &indptr, const at::Tensor &labels, int64_t B, int64_t L) {
  TORCH_CHECK(indptr.scalar_type() == at::kLong && indptr.dim() == 1 && indptr.size(0) == B + 1, op,
              ": indptr must be int64 of shape [batch + 1] = [", B + 1, "], got ", indptr.scalar_type(), " ",
              indptr.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1, op,
              ": labels must be a 1-D int64 tensor [nnz], got ", labels.scalar_type(), " ", labels.sizes());
  const int64_t *p = indptr.const_data_ptr<int64_t>(), *l = labels.const_data_ptr<int64_t>();
  const int64_t nnz = labels.size(0);
  int64_t at = 0;
  switch (xmc_check_csr_targets_cpu(p, B, l, nnz, L, &at)) {
    case XMC_CSR_FIRST_NOT_ZERO: TORCH_CHECK(false, op, ": indptr[0] must be 0, got ", p[0]);
    case XMC_CSR_DECREASING:
      TORCH_CHECK(false, op, ": indptr must be non-decreasing, got indptr[", at, "] = ", p[at], " > indptr[", at + 1,
                  "] = ", p[at + 1]);
    case XMC_CSR_LAST_NOT_NNZ:
      TORCH_CHECK(false, op, ": indptr[-1] must equal the number of labels (labels.numel() = ", nnz, "), got ",
                  p[B]);
    case XMC_CSR_LABEL_OUT_OF_RANGE:
      TORCH_CHECK(false, op, ": labels must lie in [0, out_features) = [0, ", L, "), got ", l[at], " at labels[", at,
                  "]");
    default: break;
  }
}

}  // namespace

namespace {

// The targets, contiguous, on the CPU for check_targets. From a GPU, well-typed ones come in one copy (one sync:
// the second copy's round trip was ~60 us of an idle GPU per step under the profiler); others as they are, for
// check_targets to name what is wrong.
std::pair<at::Tensor, at::Tensor> targets_on_host(const at::Tensor &indptr, const at::Tensor &labels) {
  if (!indptr.device().is_cpu() && indptr.scalar_type() == at::kLong && labels.scalar_type() == at::kLong &&
      indptr.dim() == 1 && labels.dim() == 1) {
    const at::Tensor both = at::cat({indptr, labels}).cpu();
    return {both.narrow(0, 0, indptr.size(0)), both.narrow(0, indptr.size(0), labels.size(0))};
  }
  return {indptr.cpu().contiguous(), labels.cpu().contiguous()};
}

// t (contiguous) on like's device: from the CPU to a GPU asynchronously, through pinned memory.
at::Tensor on_device_of(const at::Tensor &t, const at::Tensor &like) {
  if (t.device() == like.device()) return t.contiguous();
  if (t.device().is_cpu() && !like.device().is_cpu())
    return t.contiguous().pin_memory().to(like.device(), t.scalar_type(), /*non_blocking=*/true);
  return t.to(like.device()).contiguous();
}

// What both fused-loss ops check and prepare: the layer's shape, the parsed loss and scale, the targets on x's
// device, contiguous operands.
struct LossCall {
  xmc_gsffi_shape s;
  xmc_loss kind;
  double scale;
  at::Tensor ptr, lab, idx, x, w, b;
};

LossCall prepare_loss(const char *op, const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                      const std::optional<at::Tensor> &bias, int64_t group_size, const at::Tensor &indptr,
                      const at::Tensor &labels, std::string_view loss, std::string_view reduction,
                      const FusedKernels &k) {
  LossCall c;
  c.s = check_args(op, x, weight, indices, group_size, *k.layer);
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [batch, in_features], one row per target row, got shape ",
              x.sizes());
  check_bias(op, bias, x, c.s.out_features);
  c.kind = parse_loss(op, loss);
  c.s.batch = x.size(0);
  c.scale = reduction_scale(op, reduction, c.s.batch, c.s.out_features);
  TORCH_CHECK(indptr.device() == labels.device() && (indptr.device().is_cpu() || indptr.device() == x.device()), op,
              ": indptr and labels must be on the CPU or on ", x.device(), " like x, got ", indptr.device(), " and ",
              labels.device());
  // The targets are checked on the host and read by the kernel on x's device. Targets on the GPU cost a copy
  // to the host and a sync; targets on the CPU go up through pinned memory without one, so the host can run
  // ahead of the device.
  const auto [host_ptr, host_lab] = targets_on_host(indptr, labels);
  check_targets(op, host_ptr, host_lab, c.s.batch, c.s.out_features);
  c.ptr = on_device_of(indptr, x);
  c.lab = on_device_of(labels, x);
  c.idx = indices.contiguous();
  if (k.layer->check_index_range) check_index_range(op, c.idx, c.s.in_features);
  c.x = x.contiguous();
  c.w = weight.contiguous();
  if (bias.has_value()) c.b = bias->contiguous();
  return c;
}

// Runs the device's fused loss; returns the loss (double, on x's device).
at::Tensor run_loss(const char *op, const LossCall &c, const at::Tensor &gx, const at::Tensor &gw,
                    const at::Tensor &gb, const xmc_weight_update *update, const FusedKernels &k) {
  auto out = at::empty({}, c.x.options().dtype(at::kDouble));
  check_rc(op,
           k.loss(c.s, to_xmc(c.x.scalar_type()), c.x.const_data_ptr(), c.w.const_data_ptr(),
                  c.idx.const_data_ptr<int32_t>(), c.b.defined() ? c.b.const_data_ptr() : nullptr,
                  c.ptr.const_data_ptr<int64_t>(), c.lab.const_data_ptr<int64_t>(), c.kind, c.scale,
                  out.mutable_data_ptr<double>(), gx.defined() ? gx.mutable_data_ptr() : nullptr,
                  gw.defined() ? gw.mutable_data_ptr() : nullptr, gb.defined() ? gb.mutable_data_ptr() : nullptr,
                  update, k.layer->exec(c.x)),
           *k.layer);
  return out;
}

// The loss over no rows: the sum is 0 and the means are 0 / 0, as in torch.
at::Tensor empty_batch_loss(const at::Tensor &x, std::string_view reduction) {
  return at::full({}, reduction == "sum" ? 0.0 : std::numeric_limits<double>::quiet_NaN(), x.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gsffi_fused_loss(
    const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices, const std::optional<at::Tensor> &bias,
    int64_t group_size, const at::Tensor &indptr, const at::Tensor &labels, std::array<bool, 3> output_mask,
    std::string_view loss, std::string_view reduction, const FusedKernels &k) {
  const char *op = "torch_xmc::gsffi_fused_loss";
  const LossCall c = prepare_loss(op, x, weight, indices, bias, group_size, indptr, labels, loss, reduction, k);
  at::Tensor gx, gw, gb;
  if (output_mask[0]) gx = at::empty({c.s.batch, c.s.in_features}, x.options());
  if (output_mask[1]) gw = at::empty({c.s.out_features, c.s.fan_in}, weight.options());
  if (output_mask[2] && bias.has_value()) gb = at::empty({c.s.out_features}, x.options());
  if (c.s.batch == 0) {
    if (gw.defined()) gw.zero_();
    if (gb.defined()) gb.zero_();
    return {empty_batch_loss(x, reduction), gx, gw, gb};
  }
  return {run_loss(op, c, gx, gw, gb, nullptr, k).to(x.scalar_type()), gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor> gsffi_fused_loss_sgd_(
    const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices, const std::optional<at::Tensor> &bias,
    int64_t group_size, const at::Tensor &indptr, const at::Tensor &labels,
    const std::optional<at::Tensor> &weight_momentum, const std::optional<at::Tensor> &bias_momentum, double lr,
    double momentum, double dampening, double weight_decay, bool nesterov, bool first_step, int64_t weight_key,
    int64_t bias_key, bool input_grad, std::string_view loss, std::string_view reduction, const FusedKernels &k) {
  const char *op = "torch_xmc::gsffi_fused_loss_sgd_";
  const LossCall c = prepare_loss(op, x, weight, indices, bias, group_size, indptr, labels, loss, reduction, k);
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, op, ": weight must be float32 or bfloat16 (SGD-SR), got ",
              dt);
  // updated in place through raw pointers: the parameters and their momentum must be the tensors themselves
  check_like_param(op, "weight", weight, weight);
  if (bias.has_value()) check_like_param(op, "bias", *bias, *bias);
  TORCH_CHECK(momentum == 0.0 || (weight_momentum.has_value() && (!bias.has_value() || bias_momentum.has_value())),
              op, ": momentum = ", momentum, " needs weight_momentum and (with a bias) bias_momentum, got None");
  if (weight_momentum.has_value()) check_like_param(op, "weight_momentum", *weight_momentum, weight);
  if (bias.has_value() && bias_momentum.has_value()) check_like_param(op, "bias_momentum", *bias_momentum, *bias);
  const xmc_sgd_sr_args wa = sgd_sr_args(op, lr, momentum, dampening, weight_decay, nesterov, first_step, weight_key);
  const xmc_sgd_sr_args ba = sgd_sr_args(op, lr, momentum, dampening, weight_decay, nesterov, first_step, bias_key);

  // the device's SGD-SR step on a whole parameter from a stored gradient
  auto step = [&](const at::Tensor &param, const std::optional<at::Tensor> &buf, const at::Tensor &grad,
                  const xmc_sgd_sr_args &a) {
    void *m = buf.has_value() ? buf->mutable_data_ptr() : nullptr;
    check_rc(op, k.sgd(param.numel(), to_xmc(dt), param.mutable_data_ptr(), m, grad.const_data_ptr(), a,
                       k.layer->exec(x)),
             *k.layer);
  };
  at::Tensor gx, gb;
  if (input_grad) gx = at::empty({c.s.batch, c.s.in_features}, x.options());
  if (bias.has_value()) gb = at::empty({c.s.out_features}, x.options());
  at::Tensor out;
  if (c.s.batch == 0) {  // no terms, zero gradients: the update is still a step (weight decay, momentum)
    step(weight, weight_momentum, at::zeros_like(weight), wa);
    if (gb.defined()) gb.zero_();
    out = empty_batch_loss(x, reduction);
  } else {
    xmc_weight_update update{weight.mutable_data_ptr(),
                             weight_momentum.has_value() ? weight_momentum->mutable_data_ptr() : nullptr, wa};
    out = run_loss(op, c, gx, at::Tensor(), gb, &update, k).to(x.scalar_type());
  }
  if (bias.has_value()) step(*bias, bias_momentum, gb, ba);
  return {out, gx};
}

std::tuple<at::Tensor, at::Tensor> gsffi_topk(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                                              const std::optional<at::Tensor> &bias, int64_t group_size, int64_t k,
                                              const FusedKernels &kernels) {
  const char *op = "torch_xmc::gsffi_topk";
  xmc_gsffi_shape s = check_args(op, x, weight, indices, group_size, *kernels.layer);
  check_bias(op, bias, x, s.out_features);
  TORCH_CHECK(k >= 1 && k <= s.out_features, op, ": k must be in [1, out_features] = [1, ", s.out_features, "], got ",
              k);
  auto idx = indices.contiguous();
  if (kernels.layer->check_index_range) check_index_range(op, idx, s.in_features);
  auto x2 = x.reshape({-1, s.in_features}).contiguous();
  s.batch = x2.size(0);
  auto scores = at::empty({s.batch, k}, x.options());
  auto ids = at::empty({s.batch, k}, x.options().dtype(at::kLong));
  if (s.batch > 0) {
    auto w = weight.contiguous();
    at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    check_rc(op,
             kernels.topk(s, to_xmc(x.scalar_type()), x2.const_data_ptr(), w.const_data_ptr(),
                          idx.const_data_ptr<int32_t>(), b.defined() ? b.const_data_ptr() : nullptr, k,
                          scores.mutable_data_ptr(), ids.mutable_data_ptr<int64_t>(), kernels.layer->exec(x)),
             *kernels.layer);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(k);
  return {scores.view(shape), ids.view(shape)};
}

}  // namespace torch_xmc

// Top-k is not differentiable: autograd passes it through, so its outputs never require grad.
TORCH_LIBRARY_IMPL(torch_xmc, Autograd, m) { m.impl("gsffi_topk", torch::CppFunction::makeFallthrough()); }
