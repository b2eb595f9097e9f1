// Registers the CPU kernels as torch ops in the `steppo_fast` namespace
// (torch.ops.steppo_fast.*), and defines the importable (empty) Python module
// steppo_fast._C whose import loads this library. Fake (meta) kernels and autograd formulas
// are registered from Python in steppo_fast/cpp/_registry.py. The module also carries the thread
// knobs (steppo_fast.cpp.set_num_threads).
#include <Python.h>
#include <torch/library.h>

#include "common.h"
#include "ops.h"

namespace {

// _C._set_num_threads(n): the kernels' thread count, 0 = follow torch.get_num_threads().
// Validated in Python (steppo_fast.cpp.set_num_threads); checked again here.
PyObject* set_num_threads(PyObject*, PyObject* arg) {
  const long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  if (n < 0 || n > 1 << 16) {
    PyErr_SetString(PyExc_ValueError, "n: thread count must be in [0, 65536]");
    return nullptr;
  }
  steppo_fast::thread_setting().store(static_cast<int>(n));
  Py_RETURN_NONE;
}

// _C._get_num_threads() -> (setting, effective): the knob (0 = torch's) and the thread count
// a parallel region would use now.
PyObject* get_num_threads(PyObject*, PyObject*) {
  return Py_BuildValue("(ii)", steppo_fast::thread_setting().load(),
                       steppo_fast::num_threads());
}

// _C._set_parallel_min(n): override every kernel's parallel threshold (entries), -1 = the
// kernels' own. For bench/bench_threads.py, which measures the thresholds.
PyObject* set_parallel_min(PyObject*, PyObject* arg) {
  const long long n = PyLong_AsLongLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  if (n < -1) {
    PyErr_SetString(PyExc_ValueError, "n: parallel threshold must be >= -1");
    return nullptr;
  }
  steppo_fast::parallel_min_setting().store(static_cast<int64_t>(n));
  Py_RETURN_NONE;
}

PyObject* get_parallel_min(PyObject*, PyObject*) {
  return PyLong_FromLongLong(steppo_fast::parallel_min_setting().load());
}

// _C._pool_stats() -> (regions, worker_chunks): see parallel.h.
PyObject* pool_stats(PyObject*, PyObject*) {
  int64_t regions = 0, worker_chunks = 0;
  steppo_fast::pool_stats(&regions, &worker_chunks);
  return Py_BuildValue("(LL)", static_cast<long long>(regions),
                       static_cast<long long>(worker_chunks));
}

PyMethodDef methods[] = {
    {"_set_num_threads", set_num_threads, METH_O, "Set the kernels' thread count (0 = torch's)."},
    {"_get_num_threads", get_num_threads, METH_NOARGS, "(setting, effective) thread count."},
    {"_set_parallel_min", set_parallel_min, METH_O, "Override the parallel thresholds (-1 = own)."},
    {"_get_parallel_min", get_parallel_min, METH_NOARGS, "The parallel-threshold override."},
    {"_pool_stats", pool_stats, METH_NOARGS, "(regions, worker_chunks) since start."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// `import steppo_fast._C` loads this shared library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                          // name
      "steppo_fast C++ CPU kernels (torch.ops.steppo_fast)",  // doc
      -1,                                                            // no per-interpreter state
      methods,                                                       // the thread knobs
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
