// The CPU BN kernels' routing and their small math: each sample's routing weights (CSR), the
// per-(branch, channel) statistics merged in double, and the per-plane coefficients of the
// affine pass. Internal to cpu.cpp (an anonymous namespace, like cpu_passes.h).
#pragma once
#include "cpu_passes.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastrobust::cpu {
namespace {

#include "math.h"  // the per-element formulas the Triton kernels write too

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
// u = s·x: mean, biased variance [K, C]. An exact merge in double (math.h part_r_share,
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

template <typename T>
Route make_route(const OptTensor& branch, const OptTensor& mix, int64_t K, bool check_nonneg) {
  if (branch) return route_branch(branch->contiguous(), K);
  return route_mix<T>(mix->contiguous(), check_nonneg);
}

}  // namespace
}  // namespace fastrobust::cpu
