// Every torch_xmc op schema, in one place. Kernels register per device in bindings/<op>_<device>.cpp;
// fake kernels and autograd live in torch_xmc/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(torch_xmc, m) {
  // y [..., L] = GSFFI layer of x [..., H]; see ops/xmc.h for the maths and layouts.
  m.def("gsffi_forward(Tensor x, Tensor weight, Tensor indices, Tensor? bias, int group_size) -> Tensor");
  // Gradients (x, weight, bias) of gsffi_forward; an output whose mask entry is false is returned as None.
  m.def(
      "gsffi_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor indices, int group_size, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Loss of the GSFFI layer's logits against CSR positive-label targets (indptr [B + 1], labels [nnz]) and its
  // gradients (x, weight, bias), without a B x L buffer; an output whose mask entry is false is None.
  // loss: 'bce' | 'squared_hinge'; reduction: 'batchmean' (sum / B) | 'mean' (sum / (B * L)) | 'sum'.
  m.def(
      "gsffi_fused_loss(Tensor x, Tensor weight, Tensor indices, Tensor? bias, int group_size, Tensor indptr, "
      "Tensor labels, bool[3] output_mask, str loss=\"bce\", str reduction=\"batchmean\") "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // gsffi_fused_loss whose weight and bias gradients are not returned but applied in place as an SGD-SR step
  // (the arguments of sgd_sr_, one key per parameter), the weight's chunk by chunk: no weight-sized gradient.
  // Returns the loss and, if input_grad, the gradient of x (else None).
  m.def(
      "gsffi_fused_loss_sgd_(Tensor x, Tensor(a!) weight, Tensor indices, Tensor(b!)? bias, int group_size, "
      "Tensor indptr, Tensor labels, Tensor(c!)? weight_momentum, Tensor(d!)? bias_momentum, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool first_step, int weight_key, "
      "int bias_key, bool input_grad, str loss=\"bce\", str reduction=\"batchmean\") -> (Tensor, Tensor)");
  // Scores and label ids [..., k] of the k highest logits of the GSFFI layer, without a B x L buffer.
  m.def("gsffi_topk(Tensor x, Tensor weight, Tensor indices, Tensor? bias, int group_size, int k) -> (Tensor, Tensor)");
  // In-place SGD (+momentum) step; bfloat16 rounds stochastically with bits hashed from key. See ops/xmc.h.
  m.def(
      "sgd_sr_(Tensor(a!) param, Tensor(b!)? momentum_buf, Tensor grad, float lr, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool first_step, int key) -> ()");
}

// `import torch_xmc._C` only loads this library so that the registrations above run; ops live in torch.ops.
extern "C" PyObject *PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
