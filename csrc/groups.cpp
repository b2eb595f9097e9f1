// Group-relative advantages (GRPO, Dr.GRPO, RLOO), forward and backward.
//
// Classes are the entries sharing an int64 `group` id (arbitrary ids). Per class of n entries:
//   m = mean, c = x - m, var = sum c^2 / max(n - 1, 1), s = sqrt(var) (0 at var = 0),
//   grpo:    y = c / (s + eps)
//   dr_grpo: y = c
//   rloo:    y = n / (n - 1) * c          (x minus the mean of the others)
// and y = 0 for classes of one; a zero divisor s + eps (equal members, eps = 0) is taken as 1
// (so y = 0, never NaN). As the reference: in double, about a per-class pivot p (the class's
// first member): m = p + mean(x - p), c = (x - p) - (m - p), so equal members give c = 0
// exactly. Backward per class (n >= 2), G = sum g, P = sum g c, C = sum c, d = the divisor:
//   grpo:    k = P / (d^2 s (n - 1)) if s > 0 else 0,
//            dx_j = g_j / d - k c_j - (G / d - k C) / n
//   dr_grpo: dx_j = g_j - G / n;   rloo: dx_j = n / (n - 1) (g_j - G / n).
//
// Batches are small (one entry per trajectory), so this runs serially: ids are mapped to dense
// class numbers by direct indexing when their range is small, else by sorting.
#include "common.h"

#include <cmath>
#include <string>
#include <utility>

namespace steppo_fast {
namespace {

enum class GroupMode { kGrpo, kDrGrpo, kRloo };

GroupMode parse_mode(const std::string& mode) {
  if (mode == "grpo") return GroupMode::kGrpo;
  if (mode == "dr_grpo") return GroupMode::kDrGrpo;
  if (mode == "rloo") return GroupMode::kRloo;
  TORCH_CHECK(false, "mode: '", mode, "' is not one of 'grpo', 'dr_grpo', 'rloo'");
}

// Dense class number of every entry (classes numbered by increasing id) and the class count.
template <typename id_t>
int64_t dense_classes(const id_t* ids, int64_t n, std::vector<int64_t>& cls) {
  cls.assign(n, 0);
  if (n == 0) return 0;
  const auto [lo_it, hi_it] = std::minmax_element(ids, ids + n);
  const int64_t lo = static_cast<int64_t>(*lo_it), hi = static_cast<int64_t>(*hi_it);
  // (hi - lo) computed in unsigned arithmetic so extreme ids cannot overflow
  const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
  if (range < static_cast<uint64_t>(4 * n + 1024)) {
    std::vector<int64_t> number(range + 1, -1);
    for (int64_t i = 0; i < n; ++i) number[static_cast<uint64_t>(ids[i]) - lo] = 0;
    int64_t classes = 0;
    for (auto& v : number) v = v < 0 ? -1 : classes++;
    for (int64_t i = 0; i < n; ++i) cls[i] = number[static_cast<uint64_t>(ids[i]) - lo];
    return classes;
  }
  std::vector<std::pair<int64_t, int64_t>> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = {static_cast<int64_t>(ids[i]), i};
  std::sort(order.begin(), order.end());
  int64_t classes = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (i > 0 && order[i].first != order[i - 1].first) ++classes;
    cls[order[i].second] = classes;
  }
  return classes + 1;
}

struct ClassStats {
  std::vector<double> count, pivot, mean, std;  // per class: n, p, m - p, s

  double centred(double x, int64_t c) const { return (x - pivot[c]) - mean[c]; }
  // the grpo divisor: s + eps, or 1 where that is 0
  double divisor(int64_t c, double eps) const { return std[c] + eps > 0.0 ? std[c] + eps : 1.0; }
};

template <typename scalar_t>
ClassStats class_stats(const scalar_t* x, const std::vector<int64_t>& cls, int64_t classes) {
  ClassStats st;
  st.count.assign(classes, 0.0);
  st.pivot.assign(classes, 0.0);
  st.mean.assign(classes, 0.0);
  st.std.assign(classes, 0.0);
  const int64_t n = static_cast<int64_t>(cls.size());
  for (int64_t i = 0; i < n; ++i) {
    if (st.count[cls[i]] == 0.0) st.pivot[cls[i]] = static_cast<double>(x[i]);
    st.count[cls[i]] += 1.0;
    st.mean[cls[i]] += static_cast<double>(x[i]) - st.pivot[cls[i]];
  }
  for (int64_t c = 0; c < classes; ++c) st.mean[c] /= std::max(st.count[c], 1.0);
  std::vector<double> m2(classes, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const double d = st.centred(static_cast<double>(x[i]), cls[i]);
    m2[cls[i]] += d * d;
  }
  for (int64_t c = 0; c < classes; ++c) {
    const double var = m2[c] / std::max(st.count[c] - 1.0, 1.0);
    st.std[c] = var > 0.0 ? std::sqrt(var) : 0.0;
  }
  return st;
}

// Runs fn(x_ptr, cls, classes) with scores dispatched to scalar_t and ids to dense classes.
template <typename Fn>
void with_classes(const at::Tensor& scores, const at::Tensor& group, Fn&& fn) {
  std::vector<int64_t> cls;
  int64_t classes = 0;
  STEPPO_DISPATCH_INDEX(group.scalar_type(), "steppo_fast::group_ids", [&] {
    classes = dense_classes(group.data_ptr<index_t>(), group.numel(), cls);
  });
  STEPPO_DISPATCH_FLOAT(scores.scalar_type(), "steppo_fast::group_advantages", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fn(scores.data_ptr<scalar_t>(), static_cast<out_t*>(nullptr), cls, classes);
  });
}

void check_inputs(const at::Tensor& scores, const at::Tensor& group) {
  check_1d_cpu(scores, "scores");
  check_1d_cpu(group, "group");
  TORCH_CHECK(group.scalar_type() == at::kInt || group.scalar_type() == at::kLong,
              "group: ids must be int32 or int64");
  TORCH_CHECK(group.numel() == scores.numel(), "group: length must equal the scores' length");
}

}  // namespace

at::Tensor group_advantages(const at::Tensor& scores, const at::Tensor& group,
                            const std::string& mode, double eps) {
  check_inputs(scores, group);
  const GroupMode gm = parse_mode(mode);
  auto x = scores.contiguous();
  auto ids = group.contiguous();
  auto out = at::empty({x.numel()}, x.options().dtype(out_dtype(x)));
  with_classes(x, ids, [&](const auto* xp, auto* typed_null, const std::vector<int64_t>& cls,
                           int64_t classes) {
    using out_t = std::remove_pointer_t<decltype(typed_null)>;
    out_t* y = out.data_ptr<out_t>();
    const ClassStats st = class_stats(xp, cls, classes);
    for (size_t i = 0; i < cls.size(); ++i) {
      const int64_t c = cls[i];
      const double n = st.count[c];
      const double centred = st.centred(static_cast<double>(xp[i]), c);
      double v = 0.0;
      if (n >= 2.0) {
        if (gm == GroupMode::kGrpo) v = centred / st.divisor(c, eps);
        if (gm == GroupMode::kDrGrpo) v = centred;
        if (gm == GroupMode::kRloo) v = centred * n / (n - 1.0);
      }
      y[i] = static_cast<out_t>(v);
    }
  });
  return out;
}

at::Tensor group_advantages_backward(const at::Tensor& grad, const at::Tensor& scores,
                                     const at::Tensor& group, const std::string& mode,
                                     double eps) {
  check_inputs(scores, group);
  check_1d_cpu(grad, "grad");
  TORCH_CHECK(grad.numel() == scores.numel(), "grad: length must equal the scores' length");
  const GroupMode gm = parse_mode(mode);
  auto x = scores.contiguous();
  auto ids = group.contiguous();
  const auto odt = out_dtype(x);
  auto g = grad.to(odt).contiguous();
  auto dx = at::empty({x.numel()}, x.options().dtype(odt));
  with_classes(x, ids, [&](const auto* xp, auto* typed_null, const std::vector<int64_t>& cls,
                           int64_t classes) {
    using out_t = std::remove_pointer_t<decltype(typed_null)>;
    const out_t* gp = g.data_ptr<out_t>();
    out_t* d = dx.data_ptr<out_t>();
    const ClassStats st = class_stats(xp, cls, classes);
    std::vector<double> G(classes, 0.0), P(classes, 0.0), C(classes, 0.0);
    for (size_t i = 0; i < cls.size(); ++i) {
      const double c = st.centred(static_cast<double>(xp[i]), cls[i]);
      G[cls[i]] += static_cast<double>(gp[i]);
      P[cls[i]] += static_cast<double>(gp[i]) * c;
      C[cls[i]] += c;
    }
    for (size_t i = 0; i < cls.size(); ++i) {
      const int64_t k = cls[i];
      const double n = st.count[k];
      const double gi = static_cast<double>(gp[i]);
      double v = 0.0;
      if (n >= 2.0) {
        if (gm == GroupMode::kGrpo) {
          const double scale = st.divisor(k, eps);
          const double kk =
              st.std[k] > 0.0 ? P[k] / (scale * scale * st.std[k] * (n - 1.0)) : 0.0;
          const double c = st.centred(static_cast<double>(xp[i]), k);
          v = gi / scale - kk * c - (G[k] / scale - kk * C[k]) / n;
        } else {
          v = gi - G[k] / n;
          if (gm == GroupMode::kRloo) v *= n / (n - 1.0);
        }
      }
      d[i] = static_cast<out_t>(v);
    }
  });
  return dx;
}

}  // namespace steppo_fast
