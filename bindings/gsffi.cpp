#include "gsffi.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <vector>

namespace torch_xmc {
namespace {

std::vector<int64_t> with_last(at::IntArrayRef lead, int64_t last) {
  std::vector<int64_t> s(lead.begin(), lead.end());
  s.push_back(last);
  return s;
}

}  // namespace

xmc_dtype to_xmc(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return XMC_F32;
    case at::kDouble: return XMC_F64;
    case at::kBFloat16: return XMC_BF16;
    default: return XMC_F16;
  }
}

void check_same_device_dtype(const char *op, const char *name, const at::Tensor &t, const at::Tensor &x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), " like x, got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ", x.scalar_type(),
              " like x, got ", t.scalar_type());
}

xmc_gsffi_shape check_args(const char *op, const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                           int64_t group_size, const GsffiKernels &k) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension [..., in_features], got shape ", x.sizes());
  auto dt = x.scalar_type();
  bool ok_dtype = dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || (k.half && dt == at::kHalf);
  TORCH_CHECK(ok_dtype, op, ": x must be float32, bfloat16, ", k.half ? "float16, " : "", "or float64 on ", k.device,
              ", got ", dt);
  check_same_device_dtype(op, "weight", weight, x);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, fan_in], got shape ", weight.sizes());
  TORCH_CHECK(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  const int64_t H = x.size(-1), L = weight.size(0), F = weight.size(1);
  TORCH_CHECK(L >= 1 && F >= 1, op, ": weight must have out_features >= 1 and fan_in >= 1, got shape ",
              weight.sizes());
  TORCH_CHECK(F <= H, op, ": fan_in (weight.size(1) = ", F, ") must be <= in_features (x.size(-1) = ", H, ")");
  const int64_t n_groups = (L + group_size - 1) / group_size;
  TORCH_CHECK(indices.device() == x.device(), op, ": indices must be on ", x.device(), " like x, got ",
              indices.device());
  TORCH_CHECK(indices.scalar_type() == at::kInt && indices.dim() == 2 && indices.size(0) == n_groups &&
                  indices.size(1) == F,
              op, ": indices must be int32 of shape [ceil(out_features / group_size), fan_in] = [", n_groups, ", ", F,
              "], got ", indices.scalar_type(), " ", indices.sizes());
  return xmc_gsffi_shape{0, H, L, F, group_size};
}

void check_index_range(const char *op, const at::Tensor &indices, int64_t H) {
  int64_t bad = xmc_find_out_of_range_cpu(indices.data_ptr<int32_t>(), indices.numel(), H);
  TORCH_CHECK(bad < 0, op, ": indices must lie in [0, in_features) = [0, ", H, "), got ",
              bad < 0 ? 0 : indices.data_ptr<int32_t>()[bad], " at indices[", bad / std::max<int64_t>(indices.size(1), 1),
              ", ", bad % std::max<int64_t>(indices.size(1), 1), "]");
}

void check_rc(const char *op, int rc, const GsffiKernels &k) {
  TORCH_CHECK(rc == 0, op, ": ", k.device, " kernel failed: ", k.error_string(rc));
}

at::Tensor gsffi_forward(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &indices,
                         const std::optional<at::Tensor> &bias, int64_t group_size, const GsffiKernels &k) {
  const char *op = "torch_xmc::gsffi_forward";
  xmc_gsffi_shape s = check_args(op, x, weight, indices, group_size, k);
  if (bias.has_value()) {
    check_same_device_dtype(op, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.out_features, op, ": bias must have shape [",
                s.out_features, "], got ", bias->sizes());
  }
  auto idx = indices.contiguous();
  if (k.check_index_range) check_index_range(op, idx, s.in_features);
  auto x2 = x.reshape({-1, s.in_features}).contiguous();
  s.batch = x2.size(0);
  auto y = at::empty({s.batch, s.out_features}, x.options());
  if (s.batch > 0) {
    auto w = weight.contiguous();
    at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    check_rc(op,
             k.forward(s, to_xmc(x.scalar_type()), x2.const_data_ptr(), w.const_data_ptr(), idx.const_data_ptr<int32_t>(),
                       b.defined() ? b.const_data_ptr() : nullptr, y.mutable_data_ptr(), k.exec(x)),
             k);
  }
  return y.view(with_last(x.sizes().slice(0, x.dim() - 1), s.out_features));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gsffi_backward(const at::Tensor &grad_y, const at::Tensor &x,
                                                              const at::Tensor &weight, const at::Tensor &indices,
                                                              int64_t group_size, std::array<bool, 3> output_mask,
                                                              const GsffiKernels &k) {
  const char *op = "torch_xmc::gsffi_backward";
  xmc_gsffi_shape s = check_args(op, x, weight, indices, group_size, k);
  check_same_device_dtype(op, "grad_y", grad_y, x);
  auto lead = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(with_last(lead, s.out_features)), op,
              ": grad_y must have shape [..., out_features] = ", at::IntArrayRef(with_last(lead, s.out_features)),
              " to match x, got ", grad_y.sizes());
  auto idx = indices.contiguous();
  if (k.check_index_range) check_index_range(op, idx, s.in_features);
  auto dy = grad_y.reshape({-1, s.out_features}).contiguous();
  s.batch = dy.size(0);
  const xmc_dtype dt = to_xmc(x.scalar_type());
  at::Tensor gx, gw, gb;
  if (output_mask[0]) gx = at::empty({s.batch, s.in_features}, x.options());
  if (output_mask[1]) gw = s.batch > 0 ? at::empty({s.out_features, s.fan_in}, weight.options())
                                       : at::zeros({s.out_features, s.fan_in}, weight.options());
  // The bias gradient rides on the weight gradient's pass over grad_y where the device has that kernel.
  const bool bias_in_pass = output_mask[2] && gw.defined() && s.batch > 0 && !k.backward && k.grad_weight_bias;
  if (bias_in_pass) gb = at::empty({s.out_features}, x.options());
  if (s.batch > 0 && (gx.defined() || gw.defined())) {
    auto w = weight.contiguous();
    auto x2 = x.reshape({-1, s.in_features}).contiguous();
    const int32_t *ix = idx.const_data_ptr<int32_t>();
    void *gx_ptr = gx.defined() ? gx.mutable_data_ptr() : nullptr;
    void *gw_ptr = gw.defined() ? gw.mutable_data_ptr() : nullptr;
    if (k.backward) {
      check_rc(op, k.backward(s, dt, dy.const_data_ptr(), x2.const_data_ptr(), w.const_data_ptr(), ix, gx_ptr, gw_ptr,
                              k.exec(x)), k);
    } else {
      if (gx_ptr) check_rc(op, k.grad_input(s, dt, dy.const_data_ptr(), w.const_data_ptr(), ix, gx_ptr, k.exec(x)), k);
      if (gw_ptr && bias_in_pass)
        check_rc(op, k.grad_weight_bias(s, dt, dy.const_data_ptr(), x2.const_data_ptr(), ix, gw_ptr,
                                        gb.mutable_data_ptr(), k.exec(x)), k);
      else if (gw_ptr)
        check_rc(op, k.grad_weight(s, dt, dy.const_data_ptr(), x2.const_data_ptr(), ix, gw_ptr, k.exec(x)), k);
    }
  }
  if (gx.defined()) gx = gx.view(with_last(lead, s.in_features));
  if (output_mask[2] && !bias_in_pass) {
    // Reduced in the accumulation dtype, like nn.Linear's bias gradient.
    auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    gb = dy.sum({0}, false, acc).to(x.scalar_type());
  }
  return {gx, gw, gb};
}

}  // namespace torch_xmc
