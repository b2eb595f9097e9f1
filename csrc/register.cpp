// Registers the CPU kernels as torch ops in the `steppo_fast` namespace
// (torch.ops.steppo_fast.*), and defines the importable (empty) Python module
// steppo_fast._C whose import loads this library. Fake (meta) kernels and autograd formulas
// are registered from Python in steppo_fast/cpu.py.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

extern "C" {
// `import steppo_fast._C` loads this shared library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                              // name
      "steppo_fast C++/OpenMP CPU kernels (torch.ops.steppo_fast)",  // doc
      -1,                                                // no per-interpreter state
      nullptr,                                           // no methods: ops live in torch.ops
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(steppo_fast, m) {
  m.def(
      "step_gae(Tensor rewards, Tensor values, Tensor cu_trajs, float gamma, float lam, "
      "Tensor? last_values) -> (Tensor, Tensor)");
  m.def(
      "discounted_returns(Tensor rewards, Tensor cu_trajs, float gamma, Tensor? last_values) "
      "-> Tensor");
  m.def("segment_sum(Tensor x, Tensor cu_steps) -> Tensor");
  m.def("segment_mean(Tensor x, Tensor cu_steps) -> Tensor");
  m.def("segment_broadcast(Tensor y, Tensor cu_steps) -> Tensor");
  m.def("segment_mean_backward(Tensor grad, Tensor cu_steps) -> Tensor");
  m.def("whiten(Tensor x, Tensor? weight, float eps) -> Tensor");
  m.def("whiten_backward(Tensor grad, Tensor x, Tensor? weight, float eps) -> Tensor");
  m.def("group_advantages(Tensor scores, Tensor group, str mode, float eps) -> Tensor");
  m.def(
      "group_advantages_backward(Tensor grad, Tensor scores, Tensor group, str mode, float eps) "
      "-> Tensor");
  m.def(
      "step_policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor cu_steps, "
      "Tensor? cu_trajs, Tensor? step_weight, Tensor? ref_logp, str ratio_level, "
      "float length_power, float clip_low, float clip_high, float? dual_clip, str agg, "
      "float kl_coef, str kl_type, bool need_grad) -> (Tensor loss_sum, Tensor stats, "
      "Tensor grad_logp)");
}

TORCH_LIBRARY_IMPL(steppo_fast, CPU, m) {
  m.impl("step_gae", &steppo_fast::step_gae);
  m.impl("discounted_returns", &steppo_fast::discounted_returns);
  m.impl("segment_sum", &steppo_fast::segment_sum);
  m.impl("segment_mean", &steppo_fast::segment_mean);
  m.impl("segment_broadcast", &steppo_fast::segment_broadcast);
  m.impl("segment_mean_backward", &steppo_fast::segment_mean_backward);
  m.impl("whiten", &steppo_fast::whiten);
  m.impl("whiten_backward", &steppo_fast::whiten_backward);
  m.impl("group_advantages", &steppo_fast::group_advantages);
  m.impl("group_advantages_backward", &steppo_fast::group_advantages_backward);
  m.impl("step_policy_loss", &steppo_fast::step_policy_loss);
}
