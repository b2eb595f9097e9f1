// Declarations of the CPU kernels' entry points (one definition file per op family), bound
// as torch ops in register.cpp. Semantics: see each definition file's header comment and the
// Python backend steppo_fast/cpp/ops.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace steppo_fast {

// scans.cpp
std::tuple<at::Tensor, at::Tensor> step_gae(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& cu_trajs, double gamma, double lam,
                                            const c10::optional<at::Tensor>& last_values);
at::Tensor discounted_returns(const at::Tensor& rewards, const at::Tensor& cu_trajs, double gamma,
                              const c10::optional<at::Tensor>& last_values);

// segments.cpp
at::Tensor segment_sum(const at::Tensor& x, const at::Tensor& cu_steps);
at::Tensor segment_mean(const at::Tensor& x, const at::Tensor& cu_steps);
at::Tensor segment_broadcast(const at::Tensor& y, const at::Tensor& cu_steps);
at::Tensor segment_mean_backward(const at::Tensor& grad, const at::Tensor& cu_steps);

// whiten.cpp
at::Tensor whiten(const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps);
at::Tensor whiten_backward(const at::Tensor& grad, const at::Tensor& x,
                           const c10::optional<at::Tensor>& weight, double eps);

// groups.cpp
at::Tensor group_advantages(const at::Tensor& scores, const at::Tensor& group,
                            const std::string& mode, double eps);
at::Tensor group_advantages_backward(const at::Tensor& grad, const at::Tensor& scores,
                                     const at::Tensor& group, const std::string& mode,
                                     double eps);

// policy_loss.cpp: (loss_sum, stats [8] fp64, d loss_sum / d logp [A] or [0])
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_policy_loss(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& cu_steps, const c10::optional<at::Tensor>& cu_trajs,
    const c10::optional<at::Tensor>& step_weight, const c10::optional<at::Tensor>& ref_logp,
    const std::string& ratio_level, double length_power, double clip_low, double clip_high,
    const c10::optional<double>& dual_clip, const std::string& agg, double kl_coef,
    const std::string& kl_type, bool need_grad);

}  // namespace steppo_fast
