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
  bool routed = false;  // one entry of weight 1 per sample, start[n] = n (a branch tensor)
};

Route route_branch(const at::Tensor& branch, int64_t K) {
  Route r;
  r.K = K;
  r.routed = true;
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

// Centres for the statistics' pass over small planes (planes layout, S ≤ kReferenceMaxS): a
// [K, C] row per branch, the rounded means of the planes of the branch's first sample (a mixed
// sample counts for its branch of largest weight; a sample of no weight is no branch's first),
// read by each sample's branch. Each plane then takes one pass instead of two (planes_moments,
// which takes a plane far from its centre again about its own mean). A mean that is not finite
// (an inf or NaN in that plane) gives the centre 0. `has[k]`: branch k has a row of its own.
// A routed call merges each branch about its row (branch_stats, routed_stats): its first
// sample's plane is part of the branch, so the branch's M2 is at least S·(row - mean)², and the
// double merge's Q is at most N_k + 1 times M2 (N_k samples), far from where double rounding
// shows in the fp32 result. fp32 only: fp64 inputs keep each plane's own mean, and a mixed call
// merges about the weighted mean of the planes' centres (a reference sample may have a small
// weight in the branch).
constexpr int64_t kReferenceMaxS = 64;

template <typename T>
struct ReferenceCentres {
  Scratch<T> rows;  // [K, C]; empty: none (each plane's own mean)
  std::vector<int64_t> k;
  std::vector<char> has;
  int64_t C = 0;
  PlaneRows<T> given() const {
    return rows.empty() ? PlaneRows<T>() : PlaneRows<T>(rows.data(), C, k.data());
  }
};

template <typename T>
ReferenceCentres<T> reference_centres(const Route& rt, const View& v, Walk<const T> x) {
  ReferenceCentres<T> rc;
  if (!std::is_same<T, float>::value || v.layout != Layout::Planes || v.S > kReferenceMaxS ||
      v.N == 0 || v.C == 0)
    return rc;
  const int64_t K = rt.K, C = v.C;
  rc.C = C;
  rc.k.resize(v.N);
  for (int64_t n = 0; n < v.N; ++n) {
    int64_t best = 0;
    double bw = 0;
    for (int64_t e_ = rt.start[n]; e_ < rt.start[n + 1]; ++e_)
      if (e_ == rt.start[n] || rt.w[e_] > bw) best = rt.k[e_], bw = rt.w[e_];
    rc.k[n] = best;
  }
  rc.rows.assign(K * C, T(0));
  rc.has.assign(K, 0);
  Scratch<T> r(C), q(C);
  const auto& leaf = leaves<T>();
  for (int64_t n = 0; n < v.N; ++n) {
    const int64_t k = rc.k[n];
    if (rc.has[k] || rt.start[n] == rt.start[n + 1]) continue;
    rc.has[k] = 1;
    T* row = &rc.rows[k * C];
    leaf.planes_moments(x.sample(n), C, v.S, nullptr, row, r.data(), q.data());
    for (int64_t c = 0; c < C; ++c)
      if (!std::isfinite(double(row[c]))) row[c] = T(0);
  }
  return rc;
}

// Branch statistics from x's per-plane sums about their centres (c, r = Σ(x - c),
// q = Σ(x - c)²; r may be null: c, q are then the plane's exact mean and M2), scaled to
// u = s·x: mean, biased variance [K, C]. An exact merge in double (math.h part_r_share,
// part_q_share: Chan's, cross term included): pass 1 picks a centre per (k, c), the weighted
// mean of the planes' centres; pass 2 moves every plane's sums to it. No plane mean is
// rounded on the way, so nothing of the centres' rounding is lost (fp64 inputs included).
// `refs` (or null): for a routed call without input scale, the branches with a reference row
// merge about it instead (the planes whose centre it is add their sums unchanged, d = 0 in
// part_*_share, as routed_stats does).
// `finish(c0, c1)` runs in the task that computed channels c0..c1, right after them.
struct NoFinish {
  void operator()(int64_t, int64_t) const {}
};

template <typename T, typename Finish = NoFinish>
void branch_stats(const Route& rt, const View& v, const T* pc, const T* pr, const T* pq,
                  const Extras<T>& e, std::vector<double>& mean, std::vector<double>& var,
                  const ReferenceCentres<T>* refs = nullptr, const Finish& finish = Finish()) {
  const int64_t C = v.C, K = rt.K;
  const double S = double(v.S);
  LineAligned ck(K * C), R(K * C), Q(K * C);
  mean.resize(K * C);
  var.resize(K * C);
  // Channels are independent: a task takes a block of them through both passes (the rows'
  // loops are the ISA-picked leaves).
  const auto& leaf = leaves<T>();
  parallel_channels(C, kGrainPlanes / std::max<int64_t>(v.N, 1), [&](int64_t c0, int64_t c1) {
    const int64_t len = c1 - c0;
    auto at = [&](const T* t, int64_t n) { return t ? t + n * C + c0 : nullptr; };
    for (int64_t n = 0; n < v.N; ++n)
      for (int64_t e_ = rt.start[n]; e_ < rt.start[n + 1]; ++e_)
        leaf.centre_add(&ck[rt.k[e_] * C + c0], at(pc, n), at(e.scale, n), rt.w[e_], len);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = c0; c < c1; ++c) ck[k * C + c] /= nonzero(rt.total[k]);
    if (refs && !refs->rows.empty() && rt.routed && !e.scale)
      for (int64_t k = 0; k < K; ++k)
        if (refs->has[k])
          for (int64_t c = c0; c < c1; ++c) ck[k * C + c] = double(refs->rows[k * C + c]);
    for (int64_t n = 0; n < v.N; ++n)
      for (int64_t e_ = rt.start[n]; e_ < rt.start[n + 1]; ++e_) {
        const int64_t o = rt.k[e_] * C + c0;
        leaf.shares_add(&R[o], &Q[o], at(pc, n), at(pr, n), at(pq, n), at(e.scale, n),
                        &ck[o], rt.w[e_], S, len);
      }
    for (int64_t k = 0; k < K; ++k) {
      const double m = rt.total[k] * S;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i = k * C + c;
        mean[i] = m > 0 ? centred_mean(ck[i], R[i], m) : 0.0;
        var[i] = m > 0 ? std::max(centred_m2(R[i], Q[i], m), 0.0) / m : 0.0;
      }
    }
    finish(c0, c1);
  });
}

// The branch statistics of a routed call without input scale over small planes (reference
// centres), in one pass over x: each plane's sums, about its branch's row (or, for a plane far
// from it, about its own mean), go straight into the (k, c) sums about that row (part_*_share;
// d = 0 for the row's own planes: the same bits as branch_stats with these centres). A task
// takes a block of channels through the whole batch and adds each plane's sums as it goes: no
// [N, C] arrays, no second parallel region, and each (k, c) adds its planes in sample order,
// however the channels are blocked.
// Up to 4×4 planes: at 8×8 the pass that streams through x a sample at a time and the merge
// over [N, C] arrays after it came out ahead (two threads, N = 128, 256 × 8×8: 1.98–2.12×
// against 1.82–1.86× the compiled OAT dual BN, paired runs; 512 × 4×4: 1.44–1.47× against
// 1.53–1.55×).
constexpr int64_t kRoutedStatsMaxS = 16;

template <typename T, typename Finish = NoFinish>
void routed_stats(const Route& rt, const View& v, Walk<const T> x,
                  const ReferenceCentres<T>& refs, std::vector<double>& mean,
                  std::vector<double>& var, const Finish& finish = Finish()) {
  const int64_t C = v.C, K = rt.K, S = v.S;
  LineAligned R(K * C), Q(K * C);
  const std::vector<double> ck(refs.rows.begin(), refs.rows.end());
  mean.resize(K * C);
  var.resize(K * C);
  const auto& leaf = leaves<T>();
  const PlaneRows<T> given = refs.given();
  parallel_channels(C, kGrainElems / std::max<int64_t>(v.N * S, 1), [&](int64_t c0, int64_t c1) {
    const int64_t len = c1 - c0;
    Scratch<T> cb(len), rb(len), qb(len);
    for (int64_t n = 0; n < v.N; ++n) {
      leaf.planes_moments(x.sample(n) + c0 * S, len, S, given.row(n) + c0, cb.data(), rb.data(),
                          qb.data());
      const int64_t o = rt.k[n] * C + c0;
      leaf.shares_add(&R[o], &Q[o], cb.data(), rb.data(), qb.data(), nullptr, &ck[o], 1.0,
                      double(S), len);
    }
    for (int64_t k = 0; k < K; ++k) {
      const double m = rt.total[k] * double(S);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i = k * C + c;
        mean[i] = m > 0 ? centred_mean(double(refs.rows[i]), R[i], m) : 0.0;
        var[i] = m > 0 ? std::max(centred_m2(R[i], Q[i], m), 0.0) / m : 0.0;
      }
    }
    finish(c0, c1);
  });
}

// out[0..c1-c0) = Σ_e w_e·t[k_e, c0..c1) over sample n's routing entries (t: [K, C]). A
// sample with one entry (every routed sample) is a copy or one product: the same value the
// sum from zero gives, without the pass that zeroes `out`.
inline void mix_range(const Route& rt, int64_t n, const double* t, int64_t C, int64_t c0,
                      int64_t c1, double* out) {
  const int64_t e0 = rt.start[n], e1 = rt.start[n + 1], len = c1 - c0;
  if (e1 - e0 == 1) {
    const double w = rt.w[e0];
    const double* tk = t + rt.k[e0] * C + c0;
    if (w == 1.0) {
      std::copy(tk, tk + len, out);
    } else {
      for (int64_t c = 0; c < len; ++c) out[c] = w * tk[c];
    }
    return;
  }
  std::fill(out, out + len, 0.0);
  for (int64_t e_ = e0; e_ < e1; ++e_) {
    const double w = rt.w[e_];
    const double* tk = t + rt.k[e_] * C + c0;
    for (int64_t c = 0; c < len; ++c) out[c] += w * tk[c];
  }
}

// The whole row, c = 0..C.
inline void mix_row(const Route& rt, int64_t n, const double* t, int64_t C, double* out) {
  mix_range(rt, n, t, C, 0, C, out);
}

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

// a = w·r, d = b - μ·a per (k, c), and the values the planes mix (a_pl, d_pl): the same but
// a = 0, d = b for `single` branches (exactly b instead of a·x + d with a = w/sqrt(eps),
// which rounds); a and d themselves stay the true per-branch values (the mix gradient of
// other samples needs them).
template <typename T>
struct BranchCoefficients {
  std::vector<double> a, d, a_pl, d_pl;
  BranchCoefficients(int64_t K, int64_t C) : a(K * C), d(K * C), a_pl(K * C), d_pl(K * C) {}
  BranchCoefficients(const Route& rt, int64_t C, const Params<T>& p, const T* mean,
                     const T* invstd, const std::vector<char>& single)
      : BranchCoefficients(rt.K, C) {
    fill(rt.K, C, p, mean, invstd, single, 0, C);
  }
  // Channels c0..c1 of every branch.
  void fill(int64_t K, int64_t C, const Params<T>& p, const T* mean, const T* invstd,
            const std::vector<char>& single, int64_t c0, int64_t c1) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = k * C + c0; i < k * C + c1; ++i) {
        a[i] = coef_a(p.w(i), double(invstd[i]));
        d[i] = coef_d(p.b(i), double(mean[i]), a[i]);
        a_pl[i] = single[k] ? 0.0 : a[i];
        d_pl[i] = single[k] ? double(p.b(i)) : d[i];
      }
  }
};

// Planes (n, c0..c1) of one sample: Ap, Dp (its routing mixture of a_pl, d_pl; z = Ap·u + Dp)
// and A, D in T (f = A·x + D). The same code in forward and backward, so the ReLU mask is
// recomputed exactly.
template <typename T>
void plane_coefficients(const Route& rt, int64_t C, const BranchCoefficients<T>& bc,
                        const Extras<T>& e, int64_t n, int64_t c0, int64_t c1, double* ap,
                        double* dp, T* A, T* D) {
  mix_range(rt, n, bc.a_pl.data(), C, c0, c1, ap);
  mix_range(rt, n, bc.d_pl.data(), C, c0, c1, dp);
  const int64_t o = n * C + c0, len = c1 - c0;
  const T* sp = e.scale ? e.scale + o : nullptr;
  const T* gp = e.gamma ? e.gamma + o : nullptr;
  const T* bp = e.beta ? e.beta + o : nullptr;
  for (int64_t c = 0; c < len; ++c) {
    const double s = sp ? double(sp[c]) : 1.0, g = gp ? double(gp[c]) : 1.0;
    A[c] = T(plane_A(ap[c], s, g));
    D[c] = T(plane_D(dp[c], g, bp ? double(bp[c]) : 0.0));
  }
}

// The branch coefficients a, d; per plane Ap, Dp (kept when asked for: the FiLM gradient) and
// A, D ([N, C] each; formed when asked for, or with Ap, Dp: the backward's ReLU mask).
template <typename T>
struct Coefficients {
  std::vector<double> a, d;
  Scratch<double> Ap, Dp;
  Scratch<T> A, D;
};

template <typename T>
Coefficients<T> coefficients(const Route& rt, const View& v, const Params<T>& p,
                             const Extras<T>& e, const T* mean, const T* invstd,
                             bool keep_planes, const std::vector<char>& single,
                             bool want_planes) {
  const int64_t C = v.C, NC = v.N * C;
  BranchCoefficients<T> bc(rt, C, p, mean, invstd, single);
  Coefficients<T> co;
  if (!keep_planes && !want_planes) {
    co.a = std::move(bc.a);
    co.d = std::move(bc.d);
    return co;
  }
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
      plane_coefficients<T>(rt, C, bc, e, n, 0, C, keep_planes ? &co.Ap[o] : row_a.data(),
                            keep_planes ? &co.Dp[o] : row_d.data(), &co.A[o], &co.D[o]);
    }
  });
  co.a = std::move(bc.a);
  co.d = std::move(bc.d);
  return co;
}

// The forward's output y = act(A·x + D), each run's A, D formed just before the leaf call
// reads them (a sample's run of planes, or its whole row for channels-last rows): no [N, C]
// coefficient arrays written and read back, and one parallel region fewer than
// coefficients() and affine_pass().
template <typename T>
void affine_from_branches(const Route& rt, const View& v, const BranchCoefficients<T>& bc,
                          const Extras<T>& e, Walk<const T> x, Walk<T> out, bool relu) {
  const auto& leaf = leaves<T>();
  const int64_t C = v.C;
  const bool stream = stream_output(v.N * C * v.S * int64_t(sizeof(T)));
  const auto planes_leaf = stream ? leaf.planes_affine_nt : leaf.planes_affine;
  // A routed call without per-sample extras: every sample's A, D are its branch's, formed once
  // as [K, C] rows (the values plane_coefficients gives: a routed sample's mixture is a copy).
  // Forming them per sample and run cost 7–8 % of the forward at 128 × 512 × 4×4 (K = 2, 5),
  // 3–5 % at 256 × 8×8 (alternating call by call).
  if (rt.routed && !e.scale && !e.gamma && !e.beta) {
    const int64_t KC = rt.K * C;
    Scratch<T> A(KC), D(KC);
    for (int64_t i = 0; i < KC; ++i) {
      A[i] = T(plane_A(bc.a_pl[i], 1.0, 1.0));
      D[i] = T(plane_D(bc.d_pl[i], 1.0, 0.0));
    }
    for_runs(v, false, [&](int64_t n, int64_t j, int64_t run) {
      const int64_t o = rt.k[n] * C;
      if (v.layout == Layout::Planes)
        planes_leaf(out.sample(n) + j * v.S, x.sample(n) + j * v.S, run, v.S, &A[o + j],
                    &D[o + j], relu);
      else
        leaf.rows_affine(out.sample(n) + j * C, x.sample(n) + j * C, run, C, &A[o], &D[o],
                         relu);
    });
    return;
  }
  struct Rows {
    Scratch<double> ap, dp;
    Scratch<T> A, D;
  };
  for_runs(
      v, false, [&] { return Rows{Scratch<double>(C), Scratch<double>(C), Scratch<T>(C),
                                  Scratch<T>(C)}; },
      [&](Rows& r, int64_t n, int64_t j, int64_t run) {
        if (v.layout == Layout::Planes) {
          plane_coefficients<T>(rt, C, bc, e, n, j, j + run, r.ap.data(), r.dp.data(),
                                r.A.data(), r.D.data());
          planes_leaf(out.sample(n) + j * v.S, x.sample(n) + j * v.S, run, v.S, r.A.data(),
                      r.D.data(), relu);
        } else {
          plane_coefficients<T>(rt, C, bc, e, n, 0, C, r.ap.data(), r.dp.data(), r.A.data(),
                                r.D.data());
          leaf.rows_affine(out.sample(n) + j * C, x.sample(n) + j * C, run, C, r.A.data(),
                           r.D.data(), relu);
        }
      });
}

template <typename T>
Route make_route(const OptTensor& branch, const OptTensor& mix, int64_t K, bool check_nonneg) {
  if (branch) return route_branch(branch->contiguous(), K);
  return route_mix<T>(mix->contiguous(), check_nonneg);
}

}  // namespace
}  // namespace fastrobust::cpu
