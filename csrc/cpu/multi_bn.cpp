// CPU kernels of the per-sample affine family (docs/math.md): routed BN, mixed
// BN, their fused input scale / FiLM / ReLU, and FiLM. The algorithm is that of
// fastrobust/_engine.py (read its docstring for the derivation); this file is its C++ twin with
// the small per-(sample, branch, channel) math in double.
//
// Layouts served natively, as [N, C, S] with S = prod(spatial):
//   planes        x[n, c, s] at n*sN + c*S + s   (NCHW-contiguous samples; sN may be anything)
//   channels_last x[n, c, s] at n*sN + s*C + c   (NHWC-contiguous samples)
// Every tensor of a call has the same layout but its own sN (a batch slice keeps its stride);
// anything else is made contiguous once (the only copy this file makes).
//
// Each op is three stages: per-plane values (a plane is one (n, c)) from the layout-specific
// leaf loops, a per-(branch, channel) reduction of them in double, and one elementwise pass
// with per-plane coefficients, y = act(A[n,c]·x + D[n,c]).
// Statistics: each plane's mean c (as rounded) and its sums r = Σ(x - c), q = Σ(x - c)² in two
// passes while it sits in L1, then in double the planes' sums moved to one centre per
// (branch, channel) and added (Chan's merge with its cross terms, bn_math.h part_r_share /
// part_q_share): no Σx² - (Σx)²/m cancellation and no rounded mean taken as exact, so the
// variance keeps F.batch_norm's accuracy when |mean| ≫ std.
#include "multi_bn.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "passes.h"

namespace fastrobust::cpu {
namespace {

#include "../bn_math.h"  // the per-element formulas the CUDA kernels share

// --- routing --------------------------------------------------------------------------------

// The nonzero routing weights of each sample (CSR): one entry (branch[n], 1) for a routed op,
// the nonzero mix[n, k] for a mixed one. Skipping zeros keeps a NaN sample out of the branches
// it has no weight in, and makes the routed op's small math O(N·C).
struct Route {
  std::vector<int64_t> start, k;
  std::vector<double> w;
  std::vector<double> total;  // Σ_n weight per branch [K]
  int64_t K;
};

Route route_branch(const at::Tensor& branch, int64_t K) {
  Route r;
  r.K = K;
  const int64_t N = branch.numel();
  const int64_t* b = branch.data_ptr<int64_t>();
  r.start.resize(N + 1);
  r.k.resize(N);
  r.w.assign(N, 1.0);
  r.total.assign(K, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(b[n] >= 0 && b[n] < K, "multi_batch_norm: branch id ", b[n],
                      " at sample ", n, " is out of range [0, ", K, ")");
    r.start[n] = n;
    r.k[n] = b[n];
    r.total[b[n]] += 1.0;
  }
  r.start[N] = N;
  return r;
}

template <typename T>
Route route_mix(const at::Tensor& mix, bool check_nonneg) {
  Route r;
  const int64_t N = mix.size(0), K = mix.size(1);
  r.K = K;
  const T* m = mix.data_ptr<T>();
  r.start.resize(N + 1);
  r.total.assign(K, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    r.start[n] = int64_t(r.k.size());
    for (int64_t k = 0; k < K; ++k) {
      const double w = double(m[n * K + k]);
      TORCH_CHECK_VALUE(!check_nonneg || !(w < 0),
                        "mixed_batch_norm: mix weights must be >= 0 when the statistics are "
                        "mix-weighted (training, or no running statistics); mix[",
                        n, ", ", k, "] = ", w);
      if (w == 0) continue;
      r.k.push_back(k);
      r.w.push_back(w);
      r.total[k] += w;
    }
  }
  r.start[N] = int64_t(r.k.size());
  return r;
}

double nonzero(double v) { return v != 0 ? v : 1.0; }

// --- the small math (double) ------------------------------------------------------------------

// Optional per-plane [N, C] and per-branch [K, C] inputs.
template <typename T>
struct Extras {
  const T* scale = nullptr;  // input_scale
  const T* gamma = nullptr;  // film_gamma
  const T* beta = nullptr;   // film_beta
  double s(int64_t i) const { return scale ? double(scale[i]) : 1.0; }
  double g(int64_t i) const { return gamma ? double(gamma[i]) : 1.0; }
  double b(int64_t i) const { return beta ? double(beta[i]) : 0.0; }
};

template <typename T>
struct Params {
  const T* weight = nullptr;  // [K, C]
  const T* bias = nullptr;
  double w(int64_t i) const { return weight ? double(weight[i]) : 1.0; }
  double b(int64_t i) const { return bias ? double(bias[i]) : 0.0; }
};

// Branch statistics from x's per-plane sums about their centres (c, r = Σ(x - c),
// q = Σ(x - c)²; r may be null: c, q are then the plane's exact mean and M2), scaled to
// u = s·x: mean, biased variance [K, C]. An exact merge in double (bn_math.h part_r_share,
// part_q_share: Chan's, cross term included): pass 1 picks a centre per (k, c), the weighted
// mean of the planes' centres; pass 2 moves every plane's sums to it. No plane mean is
// rounded on the way, so nothing of the centres' rounding is lost (fp64 inputs included).
template <typename T>
void branch_stats(const Route& rt, const View& v, const T* pc, const T* pr, const T* pq,
                  const Extras<T>& e, std::vector<double>& mean, std::vector<double>& var) {
  const int64_t C = v.C, K = rt.K;
  const double S = double(v.S);
  std::vector<double> ck(K * C, 0.0), R(K * C, 0.0), Q(K * C, 0.0);
  mean.resize(K * C);
  var.resize(K * C);
  // Channels are independent: a task takes a block of them through both passes.
  parallel_planes(C, v.N, [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < v.N; ++n)
      for (int64_t e_ = rt.start[n]; e_ < rt.start[n + 1]; ++e_) {
        const double w = rt.w[e_];
        double* ckk = &ck[rt.k[e_] * C];
        for (int64_t c = c0; c < c1; ++c) ckk[c] += w * e.s(n * C + c) * double(pc[n * C + c]);
      }
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = c0; c < c1; ++c) ck[k * C + c] /= nonzero(rt.total[k]);
    for (int64_t n = 0; n < v.N; ++n)
      for (int64_t e_ = rt.start[n]; e_ < rt.start[n + 1]; ++e_) {
        const double w = rt.w[e_];
        const int64_t o = rt.k[e_] * C;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i = n * C + c;
          const double s = e.s(i), cp = double(pc[i]), r = pr ? double(pr[i]) : 0.0;
          R[o + c] += part_r_share(w, s, cp, r, ck[o + c], S);
          Q[o + c] += part_q_share(w, s, cp, r, double(pq[i]), ck[o + c], S);
        }
      }
    for (int64_t k = 0; k < K; ++k) {
      const double m = rt.total[k] * S;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i = k * C + c;
        mean[i] = m > 0 ? centred_mean(ck[i], R[i], m) : 0.0;
        var[i] = m > 0 ? std::max(centred_m2(R[i], Q[i], m), 0.0) / m : 0.0;
      }
    }
  });
}

// out[0..C) = Σ_e w_e·t[k_e, 0..C) over sample n's routing entries (t: [K, C]). A sample
// with one entry (every routed sample) is a copy or one product: the same value the sum from
// zero gives, without the pass that zeroes `out`.
inline void mix_row(const Route& rt, int64_t n, const double* t, int64_t C, double* out) {
  const int64_t e0 = rt.start[n], e1 = rt.start[n + 1];
  if (e1 - e0 == 1) {
    const double w = rt.w[e0];
    const double* tk = t + rt.k[e0] * C;
    if (w == 1.0) {
      std::copy(tk, tk + C, out);
    } else {
      for (int64_t c = 0; c < C; ++c) out[c] = w * tk[c];
    }
    return;
  }
  std::fill(out, out + C, 0.0);
  for (int64_t e_ = e0; e_ < e1; ++e_) {
    const double w = rt.w[e_];
    const double* tk = t + rt.k[e_] * C;
    for (int64_t c = 0; c < C; ++c) out[c] += w * tk[c];
  }
}

// a = w·r, d = b - μ·a per (k, c); Ap, Dp per plane (z = Ap·u + Dp; kept only when asked
// for); A, D per plane in T (f = A·x + D): the same code in forward and backward, so the ReLU
// mask is recomputed exactly.
template <typename T>
struct Coefficients {
  std::vector<double> a, d;
  Scratch<double> Ap, Dp;
  Scratch<T> A, D;
};

// Branches whose batch statistics come from one value (one sample routed there, 1x1 maps): x̂
// is exactly 0, so the output is exactly the bias and the input gradient exactly 0.
std::vector<char> single_value_branches(const Route& rt, const View& v, bool batch_stats) {
  std::vector<char> single(rt.K, 0);
  if (!batch_stats || v.S != 1) return single;
  std::vector<int64_t> nnz(rt.K, 0);
  for (int64_t e_ = 0; e_ < int64_t(rt.k.size()); ++e_) nnz[rt.k[e_]]++;
  for (int64_t k = 0; k < rt.K; ++k) single[k] = nnz[k] == 1;
  return single;
}

// `single`: the planes use a = 0, d = b for those branches (exactly b instead of a·x + d with
// a = w/sqrt(eps), which rounds); a and d themselves stay the true per-branch values (the mix
// gradient of other samples needs them).
template <typename T>
Coefficients<T> coefficients(const Route& rt, const View& v, const Params<T>& p,
                             const Extras<T>& e, const T* mean, const T* invstd,
                             bool keep_planes, const std::vector<char>& single) {
  const int64_t C = v.C, K = rt.K, NC = v.N * C;
  Coefficients<T> co;
  co.a.resize(K * C);
  co.d.resize(K * C);
  for (int64_t i = 0; i < K * C; ++i) {
    co.a[i] = coef_a(p.w(i), double(invstd[i]));
    co.d[i] = coef_d(p.b(i), double(mean[i]), co.a[i]);
  }
  const bool any_single = std::find(single.begin(), single.end(), 1) != single.end();
  std::vector<double> a_pl, d_pl;
  if (any_single) {
    a_pl = co.a;
    d_pl = co.d;
    for (int64_t i = 0; i < K * C; ++i)
      if (single[i / C]) {
        a_pl[i] = 0.0;
        d_pl[i] = p.b(i);
      }
  }
  const double* a_src = any_single ? a_pl.data() : co.a.data();
  const double* d_src = any_single ? d_pl.data() : co.d.data();
  if (keep_planes) {
    co.Ap.resize(NC);
    co.Dp.resize(NC);
  }
  co.A.resize(NC);
  co.D.resize(NC);
  parallel_planes(v.N, C, [&](int64_t n0, int64_t n1) {
    Scratch<double> row_a(keep_planes ? 0 : C), row_d(keep_planes ? 0 : C);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t o = n * C;
      double* ap = keep_planes ? &co.Ap[o] : row_a.data();
      double* dp = keep_planes ? &co.Dp[o] : row_d.data();
      mix_row(rt, n, a_src, C, ap);
      mix_row(rt, n, d_src, C, dp);
      T* A = &co.A[o];
      T* D = &co.D[o];
      const T* sp = e.scale ? e.scale + o : nullptr;
      const T* gp = e.gamma ? e.gamma + o : nullptr;
      const T* bp = e.beta ? e.beta + o : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const double s = sp ? double(sp[c]) : 1.0, g = gp ? double(gp[c]) : 1.0;
        A[c] = T(plane_A(ap[c], s, g));
        D[c] = T(plane_D(dp[c], g, bp ? double(bp[c]) : 0.0));
      }
    }
  });
  return co;
}

void check_bn(const at::Tensor& x, const OptTensor& branch, const OptTensor& mix,
              const OptTensor& weight, const OptTensor& bias, const OptTensor& scale,
              const OptTensor& gamma, const OptTensor& beta, int64_t K, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must be [N, C, *spatial]");
  TORCH_CHECK(branch.has_value() != mix.has_value(), op, ": pass exactly one of branch, mix");
  const int64_t N = x.size(0), C = x.size(1);
  if (branch)
    TORCH_CHECK(branch->scalar_type() == at::kLong && branch->dim() == 1 &&
                    branch->size(0) == N,
                op, ": branch must be int64 [N]");
  check_float(mix, x, op, "mix", {N, K});
  check_float(weight, x, op, "weight", {K, C});
  check_float(bias, x, op, "bias", {K, C});
  check_float(scale, x, op, "input_scale", {N, C});
  check_float(gamma, x, op, "film_gamma", {N, C});
  check_float(beta, x, op, "film_beta", {N, C});
}

template <typename T>
Route make_route(const OptTensor& branch, const OptTensor& mix, int64_t K, bool check_nonneg) {
  if (branch) return route_branch(branch->contiguous(), K);
  return route_mix<T>(mix->contiguous(), check_nonneg);
}

}  // namespace

// --- the BN family ----------------------------------------------------------------------------

std::vector<at::Tensor> bn_forward_impl(const at::Tensor& x_in, const OptTensor& branch,
                                   const OptTensor& mix, const OptTensor& weight,
                                   const OptTensor& bias, const OptTensor& running_mean,
                                   const OptTensor& running_var,
                                   const OptTensor& num_batches_tracked,
                                   const OptTensor& input_scale, const OptTensor& film_gamma,
                                   const OptTensor& film_beta, int64_t K, bool training,
                                   double momentum, bool cumulative, double eps, bool relu,
                                        bool running_in_place) {
  const char* op = branch ? "multi_batch_norm" : "mixed_batch_norm";
  check_bn(x_in, branch, mix, weight, bias, input_scale, film_gamma, film_beta, K, op);
  const int64_t C = x_in.size(1);
  check_float(running_mean, x_in, op, "running_mean", {K, C});
  check_float(running_var, x_in, op, "running_var", {K, C});
  const bool has_running = running_mean.has_value() && running_var.has_value();
  const bool batch_stats = training || !has_running;
  const bool update = training && has_running;
  if (num_batches_tracked)
    TORCH_CHECK(num_batches_tracked->scalar_type() == at::kLong &&
                    num_batches_tracked->numel() == K,
                op, ": num_batches_tracked must be int64 [K]");
  TORCH_CHECK(!(update && cumulative) || num_batches_tracked.has_value(), op,
              ": momentum=None needs num_batches_tracked");
  auto [x, v] = as_view(x_in);
  auto y = empty_like_view(x, v);
  const View yv = as_view(y).second;
  auto mean_t = at::empty({K, C}, x.options());
  auto invstd_t = at::empty({K, C}, x.options());
  // The updated running stats: new tensors (the registered op is functional), or written into
  // the buffers themselves for the C++ autograd path.
  at::Tensor new_rm, new_rv, new_nbt;
  if (update) {
    new_rm = running_in_place ? *running_mean : running_mean->clone();
    new_rv = running_in_place ? *running_var : running_var->clone();
    if (num_batches_tracked) {
      TORCH_CHECK(!running_in_place || num_batches_tracked->is_contiguous(), op,
                  ": num_batches_tracked must be contiguous");
      new_nbt = running_in_place ? *num_batches_tracked : num_batches_tracked->clone();
    }
  }
  at::Tensor planes;
  if (mix && batch_stats) planes = at::empty({2, v.N, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_forward", [&] {
    using T = scalar_t;
    const Route rt = make_route<T>(branch, mix, K, batch_stats);
    const Extras<T> e{ptr<T>(input_scale), ptr<T>(film_gamma), ptr<T>(film_beta)};
    const Params<T> p{ptr<T>(weight), ptr<T>(bias)};
    T* mean = mean_t.data_ptr<T>();
    T* invstd = invstd_t.data_ptr<T>();
    if (batch_stats) {
      const auto pm = plane_moments<T>(v, walk<const T>(x, v));
      if (planes.defined()) {  // each plane's mean and M2, for the mix gradient
        T* out = planes.data_ptr<T>();
        const int64_t NC = v.N * C;
        const double S = double(v.S);
        for (int64_t i = 0; i < NC; ++i) {
          out[i] = T(centred_mean(double(pm.c[i]), double(pm.r[i]), S));
          out[NC + i] = T(centred_m2(double(pm.r[i]), double(pm.q[i]), S));
        }
      }
      std::vector<double> bm, bv;
      branch_stats(rt, v, pm.c.data(), pm.r.data(), pm.q.data(), e, bm, bv);
      T* rm = update ? new_rm.data_ptr<T>() : nullptr;
      T* rv = update ? new_rv.data_ptr<T>() : nullptr;
      int64_t* nbt = new_nbt.defined() ? new_nbt.data_ptr<int64_t>() : nullptr;
      for (int64_t k = 0; k < K; ++k) {
        const double m = rt.total[k] * double(v.S);  // the (weighted) number of values
        const bool upd = update && m >= 2;
        const double mom = (cumulative && nbt) ? 1.0 / double(nbt[k] + 1) : momentum;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = k * C + c;
          mean[i] = T(bm[i]);
          invstd[i] = T(bn_invstd(bv[i], eps));
          if (upd) {
            rm[i] = T(running_mean_update(double(rm[i]), mom, bm[i]));
            rv[i] = T(running_var_update(double(rv[i]), mom, bv[i], m));
          }
        }
        if (upd && nbt) nbt[k] += 1;
      }
    } else {
      const T* rm = running_mean->data_ptr<T>();
      const T* rv = running_var->data_ptr<T>();
      for (int64_t i = 0; i < K * C; ++i) {
        mean[i] = rm[i];
        invstd[i] = T(bn_invstd(double(rv[i]), eps));
      }
    }
    const auto single = single_value_branches(rt, v, batch_stats);
    const auto co = coefficients<T>(rt, v, p, e, mean, invstd, false, single);
    affine_pass<T>(v, walk<const T>(x, v), walk<T>(y, yv), co.A.data(), co.D.data(), relu);
  });
  if (running_in_place) new_rm = new_rv = new_nbt = at::Tensor();
  return {y, mean_t, invstd_t, new_rm, new_rv, new_nbt, planes};
}

std::vector<at::Tensor> bn_forward(const at::Tensor& x, const OptTensor& branch,
                                   const OptTensor& mix, const OptTensor& weight,
                                   const OptTensor& bias, const OptTensor& running_mean,
                                   const OptTensor& running_var,
                                   const OptTensor& num_batches_tracked,
                                   const OptTensor& input_scale, const OptTensor& film_gamma,
                                   const OptTensor& film_beta, int64_t K, bool training,
                                   double momentum, bool cumulative, double eps, bool relu) {
  auto out = bn_forward_impl(x, branch, mix, weight, bias, running_mean, running_var,
                             num_batches_tracked, input_scale, film_gamma, film_beta, K,
                             training, momentum, cumulative, eps, relu, false);
  for (size_t i = 3; i < out.size(); ++i)  // fresh empties: outputs must not alias
    if (!out[i].defined()) out[i] = x.new_empty({0}, i == 5 ? x.options().dtype(at::kLong)
                                                           : x.options());
  return out;
}

std::vector<at::Tensor> bn_backward_impl(const at::Tensor& dy_in, const at::Tensor& x_in,
                                    const OptTensor& branch, const OptTensor& mix,
                                    const OptTensor& weight, const OptTensor& bias,
                                    const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                    const at::Tensor& planes_in, const OptTensor& input_scale,
                                    const OptTensor& film_gamma, const OptTensor& film_beta,
                                    int64_t K, bool batch_stats, bool relu,
                                    std::vector<bool> needs) {
  const char* op = branch ? "multi_batch_norm" : "mixed_batch_norm";
  check_bn(x_in, branch, mix, weight, bias, input_scale, film_gamma, film_beta, K, op);
  TORCH_CHECK(needs.size() == 7, op, ": needs must have 7 flags");
  const bool need_x = needs[0], need_mix = needs[1] && mix.has_value(), need_w = needs[2],
             need_b = needs[3], need_s = needs[4], need_g = needs[5], need_be = needs[6];
  const int64_t N = x_in.size(0), C = x_in.size(1);
  auto [x, v] = as_view(x_in);
  auto [dy, dyv] = match_layout(dy_in, x, v);
  auto mean_t = mean_in.contiguous(), invstd_t = invstd_in.contiguous();
  auto opts = x.options();
  at::Tensor dx, dmix, dweight, dbias, dscale, dgamma, dbeta;  // undefined: not needed
  if (need_x || need_s) dx = empty_like_view(x, v);
  if (need_mix) dmix = at::empty({N, K}, opts);
  if (need_w) dweight = at::empty({K, C}, opts);
  if (need_b) dbias = at::empty({K, C}, opts);
  if (need_s) dscale = at::zeros({N, C}, opts);
  if (need_g) dgamma = at::empty({N, C}, opts);
  if (need_be) dbeta = at::empty({N, C}, opts);
  if (need_mix && batch_stats)
    TORCH_CHECK(planes_in.sizes() == at::IntArrayRef({2, N, C}), op,
                ": the mix gradient in training needs the forward's plane moments [2, N, C]");
  auto planes = (need_mix && batch_stats) ? planes_in.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_backward", [&] {
    using T = scalar_t;
    const Route rt = make_route<T>(branch, mix, K, false);
    const Extras<T> e{ptr<T>(input_scale), ptr<T>(film_gamma), ptr<T>(film_beta)};
    const Params<T> p{ptr<T>(weight), ptr<T>(bias)};
    const T* mean = mean_t.data_ptr<T>();
    const T* invstd = invstd_t.data_ptr<T>();
    const int64_t NC = N * C;
    const bool eval_dx_only = !batch_stats && !need_mix && !need_w && !need_b && !need_g &&
                              !need_be;
    // Ap, Dp per plane are needed by the FiLM gradient only.
    const std::vector<char> single = single_value_branches(rt, v, batch_stats);
    const auto co = coefficients<T>(rt, v, p, e, mean, invstd, need_g, single);
    const T* sp_all = e.scale;
    const T* gp_all = e.gamma;
    // Running statistics and only the input gradient wanted (an attack's backward in eval
    // mode): ∂L/∂u = A_in·γ·g, no per-plane sums needed, one pass.
    if (eval_dx_only) {
      if (need_x || need_s) {
        Scratch<T> P(NC), R(NC, T(0)), Sc(NC, T(1));
        parallel_planes(N, C, [&](int64_t n0, int64_t n1) {
          Scratch<double> row(C);
          for (int64_t n = n0; n < n1; ++n) {
            const int64_t o = n * C;
            mix_row(rt, n, co.a.data(), C, row.data());  // Ap
            for (int64_t c = 0; c < C; ++c)
              P[o + c] = T(row[c] * (gp_all ? double(gp_all[o + c]) : 1.0));
            if (sp_all)
              for (int64_t c = 0; c < C; ++c) Sc[o + c] = sp_all[o + c];
          }
        });
        backward_pass<T>(v, walk<const T>(dy, dyv), walk<const T>(x, v),
                         walk<T>(dx, as_view(dx).second), P.data(), nullptr, R.data(),
                         Sc.data(), relu ? co.A.data() : nullptr, relu ? co.D.data() : nullptr,
                         need_s ? dscale.data_ptr<T>() : nullptr);
      }
      return;
    }
    // Centre of the Σg·x sums, in x's units: the plane's mixture of branch means.
    std::vector<double> mean_d(mean, mean + K * C);
    Scratch<T> ctr(NC);
    parallel_planes(N, C, [&](int64_t n0, int64_t n1) {
      Scratch<double> row(C);
      for (int64_t n = n0; n < n1; ++n) {
        double tot = 0;
        for (int64_t e_ = rt.start[n]; e_ < rt.start[n + 1]; ++e_) tot += rt.w[e_];
        mix_row(rt, n, mean_d.data(), C, row.data());
        const double tz = nonzero(tot);
        if (tz != 1.0)  // a routed sample's total is 1: u = the branch mean, no division
          for (int64_t c = 0; c < C; ++c) row[c] /= tz;
        T* cn = &ctr[n * C];
        if (sp_all) {
          const T* sn = sp_all + n * C;
          for (int64_t c = 0; c < C; ++c) {
            const double s = double(sn[c]);
            cn[c] = s != 0 ? T(row[c] / s) : T(0);
          }
        } else {
          for (int64_t c = 0; c < C; ++c) cn[c] = T(row[c]);
        }
      }
    });
    const auto G = plane_grad_sums<T>(v, walk<const T>(dy, dyv), walk<const T>(x, v),
                                      ctr.data(), relu ? co.A.data() : nullptr,
                                      relu ? co.D.data() : nullptr);
    // Per plane: Z1 = Σdz, Zu = Σdz·u (dz = γ·g), and the FiLM gradients; per branch:
    // T1 = Σ M·dz (dbias), T2 = Σ M·dz·x̂ (dweight). Z1, Zu are kept per plane only for the
    // mix gradient.
    Scratch<double> Z1(need_mix ? NC : 0), Zu(need_mix ? NC : 0);
    std::vector<double> T1(K * C, 0.0), T2(K * C, 0.0);
    T* dbeta_p = need_be ? dbeta.data_ptr<T>() : nullptr;
    T* dgamma_p = need_g ? dgamma.data_ptr<T>() : nullptr;
    // Channels are independent: a task takes a block of them over the whole batch.
    parallel_planes(C, N, [&](int64_t c0, int64_t c1) {
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = n * C;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i = o + c;
          const double s = sp_all ? double(sp_all[i]) : 1.0;
          const double g = gp_all ? double(gp_all[i]) : 1.0;
          const double G1 = double(G.a[i]), G2 = double(G.b[i]), ct = double(ctr[i]);
          const double z1 = plane_Z1(g, G1), zu = plane_Zu(g, s, s * ct, G1, G2);
          if (need_mix) {
            Z1[i] = z1;
            Zu[i] = zu;
          }
          if (dbeta_p) dbeta_p[i] = T(G1);
          if (dgamma_p) dgamma_p[i] = T(plane_dgamma(co.Ap[i], co.Dp[i], s, s * ct, G1, G2));
          for (int64_t e_ = rt.start[n]; e_ < rt.start[n + 1]; ++e_) {
            const int64_t kc = rt.k[e_] * C + c;
            T1[kc] += rt.w[e_] * z1;
            T2[kc] += rt.w[e_] * zu;
          }
        }
      }
    });
    // A branch whose batch statistics come from one value has x̂ ≡ 0, hence a constant output:
    // exactly zero dweight and input gradient, which the sums (scaled by r = 1/sqrt(eps))
    // would only reach up to rounding.
    T* dweight_p = need_w ? dweight.data_ptr<T>() : nullptr;
    T* dbias_p = need_b ? dbias.data_ptr<T>() : nullptr;
    for (int64_t i = 0; i < K * C; ++i) {
      T2[i] = single[i / C] ? 0.0
                            : branch_dweight(double(invstd[i]), T2[i], double(mean[i]), T1[i]);
      if (dweight_p) dweight_p[i] = T(T2[i]);
      if (dbias_p) dbias_p[i] = T(T1[i]);
    }
    // ∂L/∂u = P·g + Q·x + R (Q carries the input scale), dx = s·∂L/∂u.
    if (need_x || need_s) {
      Scratch<T> P(NC), Q, R(NC), Sc(NC);
      std::vector<double> bq, dr, a_in(co.a);  // a_in: zero for single-value branches
      if (batch_stats) {
        bq.assign(K * C, 0.0);
        dr.assign(K * C, 0.0);
        for (int64_t k = 0; k < K; ++k) {
          const double m = nonzero(rt.total[k] * double(v.S));
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = k * C + c;
            const double r = invstd[i];
            if (single[k]) a_in[i] = 0;
            bq[i] = branch_q(a_in[i], r, T2[i], m);
            dr[i] = branch_r(a_in[i], r, T2[i], double(mean[i]), T1[i], m);
          }
        }
        Q.resize(NC);
      }
      parallel_planes(N, C, [&](int64_t n0, int64_t n1) {
        Scratch<double> row(C), row2(batch_stats ? C : 0), row3(batch_stats ? C : 0);
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t o = n * C;
          mix_row(rt, n, a_in.data(), C, row.data());  // Σ_k M·a_in per plane
          if (batch_stats) {
            mix_row(rt, n, bq.data(), C, row2.data());
            mix_row(rt, n, dr.data(), C, row3.data());
          }
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = o + c;
            const double s = sp_all ? double(sp_all[i]) : 1.0;
            P[i] = T(row[c] * (gp_all ? double(gp_all[i]) : 1.0));
            Sc[i] = T(s);
            R[i] = batch_stats ? T(row3[c]) : T(0);
            if (batch_stats) Q[i] = T(row2[c] * s);
          }
        }
      });
      backward_pass<T>(v, walk<const T>(dy, dyv), walk<const T>(x, v),
                       walk<T>(dx, as_view(dx).second), P.data(),
                       batch_stats ? Q.data() : nullptr, R.data(), Sc.data(),
                       relu ? co.A.data() : nullptr, relu ? co.D.data() : nullptr,
                       need_s ? dscale.data_ptr<T>() : nullptr);
    }
    // ∂L/∂mix[n, k]: the direct term Σ_c a·Zu + d·Z1, then the path through the statistics.
    if (need_mix) {
      T* dm = dmix.data_ptr<T>();
      std::vector<double> bm, bv;
      const T* pm = nullptr;
      const T* pm2 = nullptr;
      if (batch_stats) {
        pm = planes.data_ptr<T>();
        pm2 = pm + NC;
        branch_stats<T>(rt, v, pm, nullptr, pm2, e, bm, bv);
      }
      const double S = double(v.S), Sd = nonzero(S);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) {
          double acc = 0;
          const double W = nonzero(rt.total[k]);
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = n * C + c, kc = k * C + c;
            acc += co.a[kc] * Zu[i] + co.d[kc] * Z1[i];
            if (batch_stats) {
              const double s = e.s(i), um = s * double(pm[i]), du = um - double(mean[kc]);
              const double q = s * s * double(pm2[i]) / Sd + du * du;
              acc -= dmix_stats_term(co.a[kc], T1[kc], du, double(invstd[kc]), T2[kc], q,
                                     bv[kc], W);
            }
          }
          dm[n * K + k] = T(acc);
        }
    }
  });
  if (!need_x) dx = at::Tensor();
  return {dx, dmix, dweight, dbias, dscale, dgamma, dbeta};
}

std::vector<at::Tensor> bn_backward(const at::Tensor& dy, const at::Tensor& x,
                                    const OptTensor& branch, const OptTensor& mix,
                                    const OptTensor& weight, const OptTensor& bias,
                                    const at::Tensor& mean, const at::Tensor& invstd,
                                    const at::Tensor& planes, const OptTensor& input_scale,
                                    const OptTensor& film_gamma, const OptTensor& film_beta,
                                    int64_t K, bool batch_stats, bool relu,
                                    std::vector<bool> needs) {
  auto out = bn_backward_impl(dy, x, branch, mix, weight, bias, mean, invstd, planes,
                              input_scale, film_gamma, film_beta, K, batch_stats, relu,
                              std::move(needs));
  for (auto& t : out)  // fresh empties: outputs must not alias
    if (!t.defined()) t = x.new_empty({0}, x.options());
  return out;
}

}  // namespace fastrobust::cpu
