// StepPO clipped policy loss: forward value, batch statistics and d(loss)/d(logp) in one pass.
//
// Units u are tokens (ratio_level "token") or steps ("step", "trajectory"); per unit
//   l_u = token: x_i;  step: sum_{i in s} x_i / n_s^p;  trajectory: sum_{i in b} x_i / N_b^p
//   (x_i = logp_i - old_logp_i on steps with weight > 0, else 0; N_b = tokens of b's weighted
//   steps), rho = exp(clamp(l, -20, 20)),
//   L_u = -rho A            if not clipped, -clamp(rho, 1-clip_low, 1+clip_high) A if clipped
//         (clipped = A > 0 and rho > 1+clip_high, or A < 0 and rho < 1-clip_low),
//   L_u = -dual_clip A      if dual clip is on, A < 0 and rho > dual_clip.
// Unit weights w_u (sw = step weight): step-mean 1 per step unit / 1/n_s per token unit;
// token-mean n_s / 1; traj-mean 1 / c_b (c_b = units of b on weighted steps); times sw.
// KL (kl_coef != 0): per token k_t = kl(logp, ref) on weighted steps, weighted by the token
// unit weights w'_t.
//
// Outputs: loss_sum = sum_u w_u L_u + kl_coef sum_t w'_t k_t (the Python side divides by the
// normalizer or D = sum_u w_u), the statistics below, and (when asked) the gradient of
// loss_sum w.r.t. logp: a unit contributes w_u (-A) rho dl/dlogp unless it is clipped, dual
// clipped or |l| > 20 (clamps are flat there); the KL term kl_coef w'_t dk/dlogp.
// Work is split over trajectories (or blocks of steps when no trajectory data is needed),
// accumulated in double, per chunk of work items, combined in chunk order.
#include "common.h"

#include <ATen/ops/scalar_tensor.h>

#include <array>

#include <cmath>
#include <limits>
#include <string>

namespace steppo_fast {
namespace {

enum class RatioLevel { kToken, kStep, kTrajectory };
enum class Agg { kStepMean, kTokenMean, kTrajMean };
enum class KlType { kK1, kK2, kK3 };

constexpr double kLogRatioClamp = 20.0;  // rho = exp(clamp(l, -20, 20))
constexpr double kK3Clamp = 10.0;        // k3 clamped to [-10, 10]
constexpr int64_t kStepBlock = 256;      // steps per work item when trajectories are not needed
// Action tokens from which the loss runs on num_threads() threads (below: one thread, a
// plain loop). Crossover measured with bench/bench_threads.py (bench/README.md).
constexpr int64_t kParallelMin = 1 << 16;

struct LossOptions {
  RatioLevel ratio_level;
  Agg agg;
  double length_power;  // p: step/trajectory log-ratio divided by (token count)^p
  double low, high;     // clip range [1 - clip_low, 1 + clip_high]
  bool has_dual;        // dual clip on
  double dual_clip;     // its bound (> 1)
  double kl_coef;       // KL term coefficient (0: no KL term)
  KlType kl_type;
  bool need_grad;       // write d(loss_sum)/d(logp)
};

// Statistic sums, in this order in the returned fp64 tensor.
enum Stat { kTotalW, kClipN, kDualN, kRatioN, kRatioMin, kRatioMax, kTokTotal, kKlN, kNumStats };

// Per unit: loss L, gradient factor dL/dl (0 when a clamp is flat) and the clip flags.
struct UnitResult {
  double loss, dloss_dl, rho;
  bool clipped, dual;
};

inline UnitResult unit_loss(double l, double adv, const LossOptions& o) {
  const double lc = std::min(std::max(l, -kLogRatioClamp), kLogRatioClamp);
  const double rho = std::exp(lc);
  UnitResult r{-rho * adv, -rho * adv, rho, false, false};
  r.clipped = (adv > 0 && rho > o.high) || (adv < 0 && rho < o.low);
  if (r.clipped) {
    r.loss = -std::min(std::max(rho, o.low), o.high) * adv;
    r.dloss_dl = 0.0;
  }
  if (o.has_dual && adv < 0 && rho > o.dual_clip) {
    r.dual = true;
    r.loss = -o.dual_clip * adv;
    r.dloss_dl = 0.0;
  }
  if (std::abs(l) > kLogRatioClamp) r.dloss_dl = 0.0;  // torch clamp passes grad on the bounds
  return r;
}

// KL estimate and its derivative w.r.t. logp (d = ref - logp).
inline void kl_term(double logp, double ref, KlType kind, double& k, double& dk) {
  if (kind == KlType::kK1) {
    k = logp - ref;
    dk = 1.0;
  } else if (kind == KlType::kK2) {
    k = 0.5 * (logp - ref) * (logp - ref);
    dk = logp - ref;
  } else {
    const double d = ref - logp;
    const double dc = std::min(std::max(d, -kLogRatioClamp), kLogRatioClamp);
    const double e = std::exp(dc);
    const double raw = e - dc - 1.0;
    k = std::min(std::max(raw, -kK3Clamp), kK3Clamp);
    const bool passes = std::abs(d) <= kLogRatioClamp && raw <= kK3Clamp && raw >= -kK3Clamp;
    dk = passes ? -(e - 1.0) : 0.0;
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
struct LossArgs {
  const scalar_t* logp;       // [A] current log-probs
  const scalar_t* old_logp;   // [A] rollout log-probs
  const scalar_t* ref_logp;   // [A] reference log-probs, nullptr without KL term
  const acc_t* adv;           // [S] advantages (compute dtype)
  const acc_t* step_weight;   // [S] step weights (compute dtype), nullptr = all 1
  const index_t* cu_steps;    // [S+1] token offsets of the steps
  const index_t* blocks;      // [W+1] step offsets of the work items (trajectories or blocks)
  int64_t num_blocks;         // W
  acc_t* grad;                // [A] d(loss_sum)/d(logp), nullptr when not needed
};

template <typename scalar_t, typename acc_t, typename index_t>
void loss_kernel(const LossArgs<scalar_t, acc_t, index_t>& a, const LossOptions& o,
                 double& loss_sum, double* st) {
  const bool kl_on = o.kl_coef != 0.0;
  // threads only pay off (and only risk waiting for a preempted thread) on large batches
  const int threads =
      region_threads(static_cast<int64_t>(a.cu_steps[a.blocks[a.num_blocks]]), kParallelMin);
  const int64_t chunks = num_chunks(a.num_blocks, threads);
  // per chunk of work items: the loss numerator then the stats (Stat order), combined below in
  // chunk order (deterministic for a given thread count)
  std::vector<std::array<double, 1 + kNumStats>> part(static_cast<size_t>(chunks));
  parallel_for_chunks(chunks, threads, [&](int64_t k) {
    double loss = 0.0, total_w = 0.0, clip_n = 0.0, dual_n = 0.0, ratio_n = 0.0;
    double tok_total = 0.0, kl_n = 0.0;
    double ratio_min = std::numeric_limits<double>::infinity();
    double ratio_max = -std::numeric_limits<double>::infinity();
    const int64_t b_lo = chunk_begin(k, a.num_blocks, chunks);
    const int64_t b_hi = chunk_begin(k + 1, a.num_blocks, chunks);
    for (int64_t b = b_lo; b < b_hi; ++b) {
      const int64_t s0 = a.blocks[b], s1 = a.blocks[b + 1];
      auto sw_of = [&](int64_t s) {
        return a.step_weight ? static_cast<double>(a.step_weight[s]) : 1.0;
      };
      auto x_of = [&](int64_t i) {
        return static_cast<double>(a.logp[i]) - static_cast<double>(a.old_logp[i]);
      };
      // Trajectory data (only meaningful when blocks are trajectories).
      double traj_tokens = 0.0, traj_steps = 0.0, traj_x = 0.0;
      if (o.agg == Agg::kTrajMean || o.ratio_level == RatioLevel::kTrajectory) {
        for (int64_t s = s0; s < s1; ++s) {
          if (!(sw_of(s) > 0)) continue;
          const int64_t t0 = a.cu_steps[s], t1 = a.cu_steps[s + 1];
          traj_tokens += static_cast<double>(t1 - t0);
          traj_steps += 1.0;
          if (o.ratio_level == RatioLevel::kTrajectory)
            for (int64_t i = t0; i < t1; ++i) traj_x += x_of(i);
        }
      }
      const double traj_norm = std::pow(std::max(traj_tokens, 1.0), o.length_power);
      const double traj_l = traj_x / traj_norm;
      double traj_dl = 0.0;  // d(loss_sum)/d(l_b) for the trajectory ratio
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t t0 = a.cu_steps[s], t1 = a.cu_steps[s + 1];
        const double n = static_cast<double>(t1 - t0);
        const double sw = sw_of(s);
        const bool valid = sw > 0;
        const double adv = valid ? static_cast<double>(a.adv[s]) : 0.0;
        // token-unit weight w'_t and step-unit weight
        double tok_w, step_w;
        if (o.agg == Agg::kStepMean) {
          tok_w = sw / std::max(n, 1.0);
          step_w = sw;
        } else if (o.agg == Agg::kTokenMean) {
          tok_w = sw;
          step_w = sw * n;
        } else {
          tok_w = sw / std::max(traj_tokens, 1.0);
          step_w = sw / std::max(traj_steps, 1.0);
        }
        tok_total += tok_w * n;
        double step_x = 0.0;  // sum of x over the step (0 on zero-weight steps)
        if (valid)
          for (int64_t i = t0; i < t1; ++i) step_x += x_of(i);
        kl_n -= tok_w * step_x;
        if (o.ratio_level == RatioLevel::kToken) {
          for (int64_t i = t0; i < t1; ++i) {
            const UnitResult r = unit_loss(valid ? x_of(i) : 0.0, adv, o);
            // the same terms in the same order as clip_n / dual_n, so that (rounded addition
            // being monotone) a fraction never exceeds 1
            total_w += tok_w;
            loss += tok_w * r.loss;
            clip_n += r.clipped ? tok_w : 0.0;
            dual_n += r.dual ? tok_w : 0.0;
            ratio_n += tok_w * r.rho;
            if (tok_w > 0) {
              ratio_min = std::min(ratio_min, r.rho);
              ratio_max = std::max(ratio_max, r.rho);
            }
            if (a.grad) a.grad[i] = static_cast<acc_t>(valid ? tok_w * r.dloss_dl : 0.0);
          }
        } else {
          const double step_norm = std::pow(std::max(n, 1.0), o.length_power);
          const double l = o.ratio_level == RatioLevel::kStep ? step_x / step_norm : traj_l;
          const UnitResult r = unit_loss(l, adv, o);
          total_w += step_w;
          loss += step_w * r.loss;
          clip_n += r.clipped ? step_w : 0.0;
          dual_n += r.dual ? step_w : 0.0;
          ratio_n += step_w * r.rho;
          if (step_w > 0) {
            ratio_min = std::min(ratio_min, r.rho);
            ratio_max = std::max(ratio_max, r.rho);
          }
          if (o.ratio_level == RatioLevel::kStep) {
            const double g = valid ? step_w * r.dloss_dl / step_norm : 0.0;
            if (a.grad)
              for (int64_t i = t0; i < t1; ++i) a.grad[i] = static_cast<acc_t>(g);
          } else {
            traj_dl += step_w * r.dloss_dl;
            if (a.grad)  // the trajectory's tokens get their share after the loop
              for (int64_t i = t0; i < t1; ++i) a.grad[i] = 0;
          }
        }
        if (kl_on) {
          for (int64_t i = t0; i < t1; ++i) {
            double k = 0.0, dk = 0.0;
            if (valid) {
              kl_term(static_cast<double>(a.logp[i]), static_cast<double>(a.ref_logp[i]),
                      o.kl_type, k, dk);
            }
            loss += o.kl_coef * tok_w * k;
            if (a.grad && valid) a.grad[i] += static_cast<acc_t>(o.kl_coef * tok_w * dk);
          }
        }
      }
      if (o.ratio_level == RatioLevel::kTrajectory && a.grad) {
        const double g = traj_dl / traj_norm;
        for (int64_t s = s0; s < s1; ++s) {
          if (!(sw_of(s) > 0)) continue;
          for (int64_t i = a.cu_steps[s]; i < a.cu_steps[s + 1]; ++i) {
            a.grad[i] += static_cast<acc_t>(g);
          }
        }
      }
    }
    auto& q = part[static_cast<size_t>(k)];
    q[0] = loss;
    q[1 + kTotalW] = total_w;
    q[1 + kClipN] = clip_n;
    q[1 + kDualN] = dual_n;
    q[1 + kRatioN] = ratio_n;
    q[1 + kRatioMin] = ratio_min;
    q[1 + kRatioMax] = ratio_max;
    q[1 + kTokTotal] = tok_total;
    q[1 + kKlN] = kl_n;
  });
  loss_sum = 0.0;
  for (int i = 0; i < kNumStats; ++i) st[i] = 0.0;
  st[kRatioMin] = std::numeric_limits<double>::infinity();
  st[kRatioMax] = -std::numeric_limits<double>::infinity();
  for (const auto& q : part) {
    loss_sum += q[0];
    for (int i = 0; i < kNumStats; ++i) {
      if (i == kRatioMin) st[i] = std::min(st[i], q[1 + i]);
      else if (i == kRatioMax) st[i] = std::max(st[i], q[1 + i]);
      else st[i] += q[1 + i];
    }
  }
}

LossOptions parse_options(const std::string& ratio_level, const std::string& agg,
                          double length_power, double clip_low, double clip_high,
                          const c10::optional<double>& dual_clip, double kl_coef,
                          const std::string& kl_type, bool need_grad) {
  LossOptions o{};
  if (ratio_level == "token") o.ratio_level = RatioLevel::kToken;
  else if (ratio_level == "step") o.ratio_level = RatioLevel::kStep;
  else if (ratio_level == "trajectory") o.ratio_level = RatioLevel::kTrajectory;
  else TORCH_CHECK(false, "ratio_level: '", ratio_level, "' is not step, token or trajectory");
  if (agg == "step-mean") o.agg = Agg::kStepMean;
  else if (agg == "token-mean") o.agg = Agg::kTokenMean;
  else if (agg == "traj-mean") o.agg = Agg::kTrajMean;
  else TORCH_CHECK(false, "agg: '", agg, "' is not 'step-mean', 'token-mean' or 'traj-mean'");
  if (kl_type == "k1") o.kl_type = KlType::kK1;
  else if (kl_type == "k2") o.kl_type = KlType::kK2;
  else if (kl_type == "k3") o.kl_type = KlType::kK3;
  else TORCH_CHECK(false, "kl_type: '", kl_type, "' is not 'k1', 'k2' or 'k3'");
  o.length_power = length_power;
  o.low = 1.0 - clip_low;
  o.high = 1.0 + clip_high;
  o.has_dual = dual_clip.has_value();
  o.dual_clip = dual_clip.value_or(0.0);
  o.kl_coef = kl_coef;
  o.need_grad = need_grad;
  return o;
}

}  // namespace

// Returns (loss_sum 0-d, stats [8] fp64 (see Stat), grad_logp [A] or [0] when !need_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_policy_loss(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& cu_steps, const c10::optional<at::Tensor>& cu_trajs,
    const c10::optional<at::Tensor>& step_weight, const c10::optional<at::Tensor>& ref_logp,
    const std::string& ratio_level, double length_power, double clip_low, double clip_high,
    const c10::optional<double>& dual_clip, const std::string& agg, double kl_coef,
    const std::string& kl_type, bool need_grad) {
  const LossOptions o = parse_options(ratio_level, agg, length_power, clip_low, clip_high,
                                      dual_clip, kl_coef, kl_type, need_grad);
  check_1d_cpu(logp, "logp");
  check_1d_cpu(old_logp, "old_logp");
  check_1d_cpu(advantages, "advantages");
  check_offsets_dtype(cu_steps, "cu_steps");
  const int64_t num_tokens = logp.numel(), num_steps = advantages.numel();
  TORCH_CHECK(old_logp.scalar_type() == logp.scalar_type(), "old_logp: dtype must equal logp's");
  TORCH_CHECK(old_logp.numel() == num_tokens, "old_logp: length must equal logp's");
  TORCH_CHECK(cu_steps.numel() == num_steps + 1, "cu_steps: length must be len(advantages) + 1");
  const auto odt = out_dtype(logp);
  TORCH_CHECK(advantages.scalar_type() == odt, "advantages: dtype must be ", odt);
  const bool needs_trajs = o.agg == Agg::kTrajMean || o.ratio_level == RatioLevel::kTrajectory;
  TORCH_CHECK(!needs_trajs || cu_trajs.has_value(), "cu_trajs: required for ", ratio_level,
              " ratios / ", agg);
  TORCH_CHECK(o.kl_coef == 0.0 || ref_logp.has_value(), "ref_logp: required when kl_coef != 0");
  auto lp = logp.contiguous(), olp = old_logp.contiguous(), adv = advantages.contiguous();
  auto cus = cu_steps.contiguous();
  at::Tensor sw, ref;
  if (step_weight.has_value()) {
    check_1d_cpu(*step_weight, "step_weight");
    TORCH_CHECK(step_weight->scalar_type() == odt, "step_weight: dtype must be ", odt);
    TORCH_CHECK(step_weight->numel() == num_steps, "step_weight: length must be len(advantages)");
    sw = step_weight->contiguous();
  }
  if (o.kl_coef != 0.0) {
    check_1d_cpu(*ref_logp, "ref_logp");
    TORCH_CHECK(ref_logp->scalar_type() == logp.scalar_type(), "ref_logp: dtype must equal logp's");
    TORCH_CHECK(ref_logp->numel() == num_tokens, "ref_logp: length must equal logp's");
    ref = ref_logp->contiguous();
  }
  // Work items: trajectories when their data is needed, else fixed blocks of steps.
  at::Tensor blocks;
  if (needs_trajs) {
    check_offsets_dtype(*cu_trajs, "cu_trajs");
    TORCH_CHECK(cu_trajs->scalar_type() == cus.scalar_type(),
                "cu_trajs: dtype must equal cu_steps'");
    blocks = cu_trajs->contiguous();
  } else {
    const int64_t nb = (num_steps + kStepBlock - 1) / kStepBlock;
    blocks = at::empty({nb + 1}, cus.options());
    STEPPO_DISPATCH_INDEX(cus.scalar_type(), "steppo_fast::loss_blocks", [&] {
      index_t* p = blocks.data_ptr<index_t>();
      for (int64_t k = 0; k <= nb; ++k) {
        p[k] = static_cast<index_t>(std::min(k * kStepBlock, num_steps));
      }
    });
  }
  at::Tensor loss_sum;
  auto stats = at::empty({kNumStats}, logp.options().dtype(at::kDouble));
  auto grad = empty_output(need_grad ? num_tokens : 0, logp.options().dtype(odt));
  STEPPO_DISPATCH_FLOAT(lp.scalar_type(), "steppo_fast::step_policy_loss", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    STEPPO_DISPATCH_INDEX(cus.scalar_type(), "steppo_fast::step_policy_loss", [&] {
      const index_t* cs = cus.data_ptr<index_t>();
      TORCH_CHECK(static_cast<int64_t>(cs[num_steps]) == num_tokens,
                  "cu_steps: offsets must end at the number of tokens ", num_tokens);
      const index_t* bl = blocks.data_ptr<index_t>();
      TORCH_CHECK(static_cast<int64_t>(bl[blocks.numel() - 1]) == num_steps,
                  "cu_trajs: offsets must end at the number of steps ", num_steps);
      LossArgs<scalar_t, acc_t, index_t> args{
          lp.data_ptr<scalar_t>(),
          olp.data_ptr<scalar_t>(),
          ref.defined() ? ref.data_ptr<scalar_t>() : nullptr,
          adv.data_ptr<acc_t>(),
          sw.defined() ? sw.data_ptr<acc_t>() : nullptr,
          cs,
          bl,
          blocks.numel() - 1,
          need_grad ? grad.data_ptr<acc_t>() : nullptr,
      };
      double total = 0.0;
      loss_kernel(args, o, total, stats.data_ptr<double>());
      // rounded like a tensor cast (beyond the fp32 range: +-inf, as an fp32 sum overflows);
      // fill_ would raise instead. The public op's input bounds keep total in range.
      loss_sum = at::scalar_tensor(total, logp.options().dtype(at::kDouble)).to(odt);
    });
  });
  return {loss_sum, stats, grad};
}

}  // namespace steppo_fast
