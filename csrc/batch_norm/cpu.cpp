// CPU kernels of the routed and mixed BN with their fused input scale / FiLM / ReLU
// (docs/math.md): the forward and backward of multi_bn. The algorithm is that of the eager
// implementation (fastrobust/ops/batch_norm/eager.py, its docstring derives it); this file is
// its C++ twin with the small per-(sample, branch, channel) math in double (cpu_route.h).
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
// Statistics: each plane's sums r = Σ(x - c), q = Σ(x - c)² about a centre c within a few of
// its standard deviations of its mean, then in double the planes' sums moved to one centre per
// (branch, channel) and added (Chan's merge with its cross terms, math.h part_r_share /
// part_q_share): no Σx² - (Σx)²/m cancellation and no rounded mean taken as exact, so the
// variance keeps F.batch_norm's accuracy when |mean| ≫ std. Small fp32 planes (S ≤ 64, planes
// layout) take their branch's reference centre (cpu_route.h reference_centres: one pass over
// each plane; for a routed call without input scale over planes up to 4×4 the sums go into
// the branch's as the pass goes, routed_stats); other planes their own mean as rounded (a
// first pass while the plane sits in L1).
#include "cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "cpu_route.h"

namespace fastrobust::cpu {
namespace {

// The operands the kernels read as flat arrays in x's dtype (their precondition; the op's
// CPU kernel in ops.cpp converts other dtypes first).
std::array<std::pair<const char*, const OptTensor*>, 6> operands(const bn::BnArgs& a) {
  return {{{"mix", &a.mix}, {"weight", &a.weight}, {"bias", &a.bias},
           {"input_scale", &a.input_scale}, {"film_gamma", &a.film_gamma},
           {"film_beta", &a.film_beta}}};
}

}  // namespace

// --- the BN family ----------------------------------------------------------------------------

// The running statistics (and num_batches_tracked) are updated in their own buffers.
std::vector<at::Tensor> multi_bn_forward(const bn::BnArgs& a) {
  const char* op = a.op();
  const int64_t K = a.num_branches, C = a.x.size(1);
  for (const auto& [name, t] : operands(a))
    checks::kernel_operand(op, name, *t, a.x);
  for (const auto& [name, t] : {std::pair<const char*, const OptTensor*>{"running_mean",
                                                                         &a.running_mean},
                                {"running_var", &a.running_var}})
    checks::kernel_operand(op, name, *t, a.x);
  const bool has_running = a.running_mean.has_value() && a.running_var.has_value();
  const bool batch_stats = a.training || !has_running;
  const bool update = a.training && has_running;
  auto [x, v] = as_view(a.x);
  auto y = empty_like_view(x, v);
  const View yv = as_view(y).second;
  auto mean_t = at::empty({K, C}, x.options());
  auto invstd_t = at::empty({K, C}, x.options());
  at::Tensor planes;
  if (a.mix && batch_stats) planes = at::empty({2, v.N, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_bn_forward", [&] {
    using T = scalar_t;
    const Route rt = make_route<T>(a.branch, a.mix, K, batch_stats);
    const Extras<T> e{ptr<T>(a.input_scale), ptr<T>(a.film_gamma), ptr<T>(a.film_beta)};
    const Params<T> p{ptr<T>(a.weight), ptr<T>(a.bias)};
    T* mean = mean_t.data_ptr<T>();
    T* invstd = invstd_t.data_ptr<T>();
    const auto single = single_value_branches(rt, v, batch_stats);
    BranchCoefficients<T> bc(K, C);
    if (batch_stats) {
      T* rm = update ? a.running_mean->data_ptr<T>() : nullptr;
      T* rv = update ? a.running_var->data_ptr<T>() : nullptr;
      int64_t* nbt = update && a.num_batches_tracked
                         ? a.num_batches_tracked->data_ptr<int64_t>()
                         : nullptr;
      std::vector<double> mom(K), count(K);
      std::vector<char> upd(K);
      for (int64_t k = 0; k < K; ++k) {
        count[k] = rt.total[k] * double(v.S);  // the (weighted) number of values
        upd[k] = update && count[k] >= 2;
        mom[k] = (a.cumulative && nbt) ? 1.0 / double(nbt[k] + 1) : a.momentum;
      }
      std::vector<double> bm, bv;
      // Each task of the statistics finishes its channels: mean, 1/std, the running
      // statistics and the branch coefficients (against a serial loop over [K, C] after the
      // statistics: 1–2 % off the forward at 512 × 4×4 and 256 × 8×8, K = 5).
      auto finish = [&](int64_t c0, int64_t c1) {
        for (int64_t k = 0; k < K; ++k)
          for (int64_t i = k * C + c0; i < k * C + c1; ++i) {
            mean[i] = T(bm[i]);
            invstd[i] = T(bn_invstd(bv[i], a.eps));
            if (upd[k]) {
              rm[i] = T(running_mean_update(double(rm[i]), mom[k], bm[i]));
              rv[i] = T(running_var_update(double(rv[i]), mom[k], bv[i], count[k]));
            }
          }
        bc.fill(K, C, p, mean, invstd, single, c0, c1);
      };
      const auto refs = reference_centres<T>(rt, v, walk<const T>(x, v));
      if (!refs.rows.empty() && rt.routed && !e.scale && v.S <= kRoutedStatsMaxS) {
        routed_stats<T>(rt, v, walk<const T>(x, v), refs, bm, bv, finish);
      } else {
        const auto pm = plane_moments<T>(v, walk<const T>(x, v), refs.given());
        if (planes.defined()) {  // each plane's mean and M2, for the mix gradient
          T* out = planes.data_ptr<T>();
          const int64_t NC = v.N * C;
          const double S = double(v.S);
          for (int64_t i = 0; i < NC; ++i) {
            out[i] = T(centred_mean(double(pm.c[i]), double(pm.r[i]), S));
            out[NC + i] = T(std::max(centred_m2(double(pm.r[i]), double(pm.q[i]), S), 0.0));
          }
        }
        branch_stats(rt, v, pm.c.data(), pm.r.data(), pm.q.data(), e, bm, bv, &refs, finish);
      }
      if (nbt)
        for (int64_t k = 0; k < K; ++k)
          if (upd[k]) nbt[k] += 1;
    } else {
      const T* rm = a.running_mean->data_ptr<T>();
      const T* rv = a.running_var->data_ptr<T>();
      for (int64_t i = 0; i < K * C; ++i) {
        mean[i] = rm[i];
        invstd[i] = T(bn_invstd(double(rv[i]), a.eps));
      }
      bc.fill(K, C, p, mean, invstd, single, 0, C);
    }
    affine_from_branches<T>(rt, v, bc, e, walk<const T>(x, v), walk<T>(y, yv), a.relu);
  });
  return {y, mean_t, invstd_t, planes};
}

// needs as BNGrad (spec.h); the gradients not needed are undefined.
std::vector<at::Tensor> multi_bn_backward(const bn::BnArgs& a) {
  for (const auto& [name, t] : operands(a))
    checks::kernel_operand(a.op(), name, *t, a.x);
  const bool need_x = a.need(kGradX), need_mix = a.need(kGradMix) && a.mix.has_value(),
             need_w = a.need(kGradWeight), need_b = a.need(kGradBias),
             need_s = a.need(kGradScale), need_g = a.need(kGradGamma),
             need_be = a.need(kGradBeta);
  const bool batch_stats = a.batch_stats, relu = a.relu;
  const int64_t N = a.x.size(0), C = a.x.size(1), K = a.num_branches;
  auto [x, v] = as_view(a.x);
  auto [dy, dyv] = match_layout(a.dy, x, v);
  auto mean_t = a.mean.contiguous(), invstd_t = a.invstd.contiguous();
  auto opts = x.options();
  at::Tensor dx, dmix, dweight, dbias, dscale, dgamma, dbeta;  // undefined: not needed
  if (need_x || need_s) dx = empty_like_view(x, v);
  if (need_mix) dmix = at::empty({N, K}, opts);
  if (need_w) dweight = at::empty({K, C}, opts);
  if (need_b) dbias = at::empty({K, C}, opts);
  if (need_s) dscale = at::zeros({N, C}, opts);
  if (need_g) dgamma = at::empty({N, C}, opts);
  if (need_be) dbeta = at::empty({N, C}, opts);
  // (the checks made sure a mixed call with batch statistics has the plane moments)
  auto planes = (need_mix && batch_stats) ? a.planes.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_bn_backward", [&] {
    using T = scalar_t;
    const Route rt = make_route<T>(a.branch, a.mix, K, false);
    const Extras<T> e{ptr<T>(a.input_scale), ptr<T>(a.film_gamma), ptr<T>(a.film_beta)};
    const Params<T> p{ptr<T>(a.weight), ptr<T>(a.bias)};
    const T* mean = mean_t.data_ptr<T>();
    const T* invstd = invstd_t.data_ptr<T>();
    const int64_t NC = N * C;
    const bool eval_dx_only = !batch_stats && !need_mix && !need_w && !need_b && !need_g &&
                              !need_be;
    // Ap, Dp per plane are needed by the FiLM gradient only, A, D by the ReLU mask only.
    const std::vector<char> single = single_value_branches(rt, v, batch_stats);
    const auto co = coefficients<T>(rt, v, p, e, mean, invstd, need_g, single, relu);
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
                         walk<T>(dx, as_view(dx).second), {P.data(), C}, {}, {R.data(), C},
                         {Sc.data(), C}, relu ? co.A.data() : nullptr,
                         relu ? co.D.data() : nullptr, need_s ? dscale.data_ptr<T>() : nullptr);
      }
      return;
    }
    // A routed call without input scale or FiLM: every per-plane value below is its branch's,
    // so the passes read [K, C] rows by each sample's branch (PlaneRows) instead of [N, C]
    // arrays filled from them (the same values: a routed sample's mixture is a copy).
    const bool by_branch = rt.routed && !sp_all && !gp_all;
    // Centre of the Σg·x sums, in x's units: the plane's mixture of branch means (a routed
    // sample without input scale: its branch's mean).
    const bool ctr_by_branch = rt.routed && !sp_all;
    Scratch<T> ctr_planes(ctr_by_branch ? 0 : NC);
    const PlaneRows<T> ctr = ctr_by_branch ? PlaneRows<T>(mean, C, rt.k.data())
                                           : PlaneRows<T>(ctr_planes.data(), C);
    if (!ctr_by_branch) {
      const std::vector<double> mean_d(mean, mean + K * C);
      parallel_planes(N, C, [&](int64_t n0, int64_t n1) {
        Scratch<double> row(C);
        for (int64_t n = n0; n < n1; ++n) {
          double tot = 0;
          for (int64_t e_ = rt.start[n]; e_ < rt.start[n + 1]; ++e_) tot += rt.w[e_];
          mix_row(rt, n, mean_d.data(), C, row.data());
          const double tz = nonzero(tot);
          if (tz != 1.0)  // a routed sample's total is 1: u = the branch mean, no division
            for (int64_t c = 0; c < C; ++c) row[c] /= tz;
          T* cn = &ctr_planes[n * C];
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
    }
    const auto G = plane_grad_sums<T>(v, walk<const T>(dy, dyv), walk<const T>(x, v), ctr,
                                      relu ? co.A.data() : nullptr,
                                      relu ? co.D.data() : nullptr);
    // Per plane: Z1 = Σdz, Zu = Σdz·u (dz = γ·g), and the FiLM gradients; per branch:
    // T1 = Σ M·dz (dbias), T2 = Σ M·dz·x̂ (dweight). Z1, Zu are kept per plane only for the
    // mix gradient.
    Scratch<double> Z1(need_mix ? NC : 0), Zu(need_mix ? NC : 0);
    LineAligned T1(K * C), T2(K * C);
    T* dbeta_p = need_be ? dbeta.data_ptr<T>() : nullptr;
    T* dgamma_p = need_g ? dgamma.data_ptr<T>() : nullptr;
    // Channels are independent: a task takes a block of them over the whole batch. A sample's
    // z1, zu over the block go to a row first, then into each of its branches' sums: the
    // loops over channels have no inner loop over routing entries (the same sums, in the same
    // order).
    const auto& leaf = leaves<T>();
    parallel_channels(C, kGrainPlanes / std::max<int64_t>(N, 1), [&](int64_t c0, int64_t c1) {
      const int64_t len = c1 - c0;
      Scratch<double> z1r(len), zur(len);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = n * C + c0;
        const T* ct = ctr.row(n) + c0;
        leaf.plane_z(&G.a[o], &G.b[o], ct, sp_all ? sp_all + o : nullptr,
                     gp_all ? gp_all + o : nullptr, z1r.data(), zur.data(), len);
        if (dbeta_p)
          for (int64_t c = 0; c < len; ++c) dbeta_p[o + c] = G.a[o + c];
        if (dgamma_p)
          for (int64_t c = 0; c < len; ++c) {
            const int64_t i = o + c;
            const double s = sp_all ? double(sp_all[i]) : 1.0;
            dgamma_p[i] = T(plane_dgamma(co.Ap[i], co.Dp[i], s, s * double(ct[c]),
                                         double(G.a[i]), double(G.b[i])));
          }
        if (need_mix) {
          std::copy(z1r.begin(), z1r.end(), &Z1[o]);
          std::copy(zur.begin(), zur.end(), &Zu[o]);
        }
        for (int64_t e_ = rt.start[n]; e_ < rt.start[n + 1]; ++e_)
          leaf.add_scaled2(&T1[rt.k[e_] * C + c0], &T2[rt.k[e_] * C + c0], z1r.data(),
                           zur.data(), rt.w[e_], len);
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
      const int64_t rows = by_branch ? K * C : NC;  // [K, C] or [N, C]
      Scratch<T> P(rows), Q, R(rows), Sc(rows);
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
        Q.resize(rows);
      }
      if (by_branch) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t o = k * C;
          leaf.plane_pqr(a_in.data() + o, batch_stats ? bq.data() + o : nullptr,
                         batch_stats ? dr.data() + o : nullptr, nullptr, nullptr, P.data() + o,
                         batch_stats ? Q.data() + o : nullptr, R.data() + o, Sc.data() + o, C);
        }
      } else {
        parallel_planes(N, C, [&](int64_t n0, int64_t n1) {
          Scratch<double> row(C), row2(batch_stats ? C : 0), row3(batch_stats ? C : 0);
          for (int64_t n = n0; n < n1; ++n) {
            const int64_t o = n * C;
            mix_row(rt, n, a_in.data(), C, row.data());  // Σ_k M·a_in per plane
            if (batch_stats) {
              mix_row(rt, n, bq.data(), C, row2.data());
              mix_row(rt, n, dr.data(), C, row3.data());
            }
            leaf.plane_pqr(row.data(), batch_stats ? row2.data() : nullptr,
                           batch_stats ? row3.data() : nullptr, sp_all ? sp_all + o : nullptr,
                           gp_all ? gp_all + o : nullptr, &P[o], batch_stats ? &Q[o] : nullptr,
                           &R[o], &Sc[o], C);
          }
        });
      }
      const int64_t* k_of = by_branch ? rt.k.data() : nullptr;
      backward_pass<T>(v, walk<const T>(dy, dyv), walk<const T>(x, v),
                       walk<T>(dx, as_view(dx).second), {P.data(), C, k_of},
                       batch_stats ? PlaneRows<T>(Q.data(), C, k_of) : PlaneRows<T>(),
                       {R.data(), C, k_of}, {Sc.data(), C, k_of},
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
      // Samples are independent (each sums its own channels, in order): in parallel.
      const int64_t grain = kGrainPlanes / std::max<int64_t>(K * C, 1);
      parallel_chunks(N, grain, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
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
      });
    }
  });
  if (!need_x) dx = at::Tensor();
  return {dx, dmix, dweight, dbias, dscale, dgamma, dbeta};
}

}  // namespace fastrobust::cpu
