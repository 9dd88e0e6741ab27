// The CPU implementations of the synchronized BN's halves (schemas in ops.cpp: sync_bn_stats,
// sync_bn_apply, sync_bn_grad_sums, sync_bn_dx): ATen ops around the BN's own CPU kernels
// (multi_bn, multi_bn_backward, called through the dispatcher). The math is that of the eager
// implementation, fastrobust/ops/batch_norm/sync_eager.py (its docstring derives it):
//
//   stats     each plane's centre c (its mean as rounded), r = Σ(x − c), q = Σ(x − c)² in fp64,
//             moved to one centre per (k, c) and added: this rank's [count | centre | R | Q]
//             in its row of the [world, K + 3·K·C] payload, zeros in the others
//   apply     the rows merged exactly (merge_ranks: Chan's update with its cross terms), y from
//             multi_bn with those statistics as its running ones, the running stats updated
//   grad sums multi_bn_backward with the statistics held fixed: T1 = dbias, T2 = dweight
//   dx        the direct terms from multi_bn_backward, plus the statistics' share from the
//             global T1, T2: ∂L/∂u += Q·u + R per plane (and its share of d scale, d mix)
#include <torch/extension.h>

#include "../accumulate.h"
#include "../spec.h"
#include "args.h"
#include "checks.h"

namespace fastrobust::cpu {
namespace {

using at::indexing::Slice;
using bn::BnArgs;
using bn::call_bn;
using bn::OptTensor;

int64_t plane_size(const at::Tensor& x) {
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  return S;
}

// [N, K] routing weights in `dt`; out-of-range branch ids and negative mix weights raise here,
// in the words of the BN's own checks.
at::Tensor routing(const char* op, const BnArgs& a, at::ScalarType dt) {
  const auto &branch = a.branch, &mix = a.mix;
  const int64_t K = a.num_branches;
  if (mix) {
    if (mix->numel() && !(*mix >= 0).all().item<bool>())
      TORCH_CHECK_VALUE(false, op, ": mix weights must be >= 0 when the statistics are "
                        "mix-weighted (training, or no running statistics); smallest is ",
                        mix->min().item<double>());
    return mix->to(dt);
  }
  const auto bad = (*branch < 0).logical_or(*branch >= K);
  if (branch->numel() && bad.any().item<bool>()) {
    const int64_t n = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": branch id ", (*branch)[n].item<int64_t>(), " at sample ",
                      n, " is out of range [0, ", K, ")");
  }
  return branch->unsqueeze(1).eq(at::arange(K, branch->options())).to(dt);
}

// M[n, k, None]·t with exact zeros where M is zero (a NaN sample stays out of the branches it
// has no weight in); t broadcasts against [N, K, C].
at::Tensor masked(const at::Tensor& M, const at::Tensor& t) {
  const auto Mb = M.unsqueeze(2);
  return at::where(Mb != 0, Mb * t, 0.0);
}

// Each plane's centre c and sums r = Σ(x − c), q = Σ(x − c)², fp64 [N, C].
std::array<at::Tensor, 3> plane_sums(const at::Tensor& x) {
  const auto xs = x.to(at::kDouble).reshape({x.size(0), x.size(1), plane_size(x)});
  const auto c = xs.size(2) ? xs.mean(2) : xs.sum(2);
  const auto dev = xs - c.unsqueeze(2);
  return {c, dev.sum(2), dev.square().sum(2)};
}

// Each plane's mean and M2 = Σ(x − mean)² ([N, C], acc).
std::array<at::Tensor, 2> plane_moments(const at::Tensor& x, at::ScalarType acc) {
  const auto [c, r, q] = plane_sums(x);
  const double S = double(std::max<int64_t>(plane_size(x), 1));
  return {(c + r / S).to(acc), (q - r * r / S).to(acc)};
}

// The global count [K], mean and biased variance [K, C] (fp64) from the all-reduced payload
// [world, K + 3·K·C]: Chan's merge of the ranks' rows, cross terms included, about the centre
// of the first rank with values of branch k.
std::array<at::Tensor, 3> merge_ranks(const at::Tensor& pay, int64_t K, int64_t C) {
  const int64_t KC = K * C;
  const auto cnt = pay.index({Slice(), Slice(0, K)}).unsqueeze(2);  // [R, K, 1]
  auto part = [&](int64_t j) {
    return pay.index({Slice(), Slice(K + j * KC, K + (j + 1) * KC)}).reshape({-1, K, C});
  };
  const auto ctr = part(0), Rr = part(1), Qr = part(2);
  const auto n = cnt.sum(0);  // [K, 1]
  const auto nz = at::where(n != 0, n, 1.0);
  const auto first = (cnt.select(2, 0) != 0).to(at::kChar).argmax(0);  // [K]
  const auto c0 = ctr.gather(0, first.view({1, K, 1}).expand({1, K, C})).select(0, 0);
  const auto d = at::where(cnt != 0, ctr - c0, 0.0);
  const auto R = (Rr + cnt * d).sum(0);
  const auto Q = (Qr + (2 * Rr + cnt * d) * d).sum(0);
  return {n.squeeze(1), c0 + R / nz, ((Q - R * R / nz) / nz).clamp_min(0)};
}

std::vector<at::Tensor> sync_bn_stats(const BnArgs& a) {
  checks::sync_bn_stats(a);
  const at::Tensor& x = a.x;
  const int64_t K = a.num_branches, C = x.size(1);
  const auto acc = acc_dtype(x);
  const double S = double(plane_size(x));
  const auto M = routing(a.sync_op(), a, at::kDouble);  // [N, K]
  auto [c, r, q] = plane_sums(x);
  at::Tensor planes = at::empty({0}, x.options().dtype(acc));
  if (a.mix) {
    const auto pm = plane_moments(x, acc);
    planes = at::stack({pm[0], pm[1]});
  }
  if (a.input_scale) {  // u = s·x
    const auto s = a.input_scale->to(at::kDouble);
    c = s * c, r = s * r, q = s * s * q;
  }
  const auto W = M.sum(0);
  const auto ck = masked(M, c.unsqueeze(1)).sum(0) / at::where(W != 0, W, 1.0).unsqueeze(1);
  const auto d = c.unsqueeze(1) - ck.unsqueeze(0);  // [N, K, C]
  const auto r3 = r.unsqueeze(1);
  const auto R = masked(M, r3 + S * d).sum(0);
  const auto Q = masked(M, q.unsqueeze(1) + (2 * r3 + S * d) * d).sum(0);
  auto payload = at::zeros({a.world_size, K + 3 * K * C}, x.options().dtype(at::kDouble));
  payload.select(0, a.rank).copy_(at::cat({S * W, ck.flatten(), R.flatten(), Q.flatten()}));
  const auto old = a.cumulative && a.num_batches_tracked
                       ? a.num_batches_tracked->to(acc)
                       : at::empty({0}, x.options().dtype(acc));
  return {payload, planes, old};
}

std::vector<at::Tensor> sync_bn_apply(const BnArgs& a) {
  checks::sync_bn_apply(a);
  const int64_t K = a.num_branches;
  const auto acc = acc_dtype(a.x);
  const auto [count64, mean64, var64] = merge_ranks(a.payload, K, a.x.size(1));
  const auto mean = mean64.to(acc), var = var64.to(acc);
  at::AutoDispatchBelowADInplaceOrView below;
  // Normalize with the global statistics: the BN in its running-statistics mode.
  BnArgs bn = a;
  bn.running_mean = mean, bn.running_var = var, bn.num_batches_tracked = c10::nullopt;
  bn.training = false, bn.momentum = 0.0, bn.cumulative = false;
  auto out = call_bn("fastrobust::multi_bn", bn);  // (y, mean, invstd, planes)
  if (a.running_mean && a.running_var) {  // r ← (1 − m)·r + m·stat where the count is ≥ 2
    at::NoGradGuard no_grad;
    const auto count = count64.to(acc);
    const auto valid = (count >= 2).unsqueeze(1);
    const bool cum = a.cumulative && a.num_batches_tracked;
    const auto m = cum ? (1.0 / (a.num_batches_tracked->to(acc) + 1)).unsqueeze(1)
                       : at::full({K, 1}, a.momentum, count.options());
    const auto unbiased = var * (count / (count - 1).clamp_min(1)).unsqueeze(1);
    const auto rm = a.running_mean->to(acc), rv = a.running_var->to(acc);
    a.running_mean->copy_(at::where(valid, (1 - m) * rm + m * mean, rm));
    a.running_var->copy_(at::where(valid, (1 - m) * rv + m * unbiased, rv));
    if (a.num_batches_tracked) a.num_batches_tracked->add_(valid.squeeze(1).to(at::kLong));
  }
  out.resize(3);
  return out;
}

// multi_bn_backward with the statistics held fixed (batch_stats false, no planes), for the
// gradients in `needs`.
std::vector<at::Tensor> fixed_stats_backward(const BnArgs& a, std::initializer_list<bool> needs) {
  BnArgs bwd = a;
  bwd.planes = at::empty({0}, a.x.options().dtype(acc_dtype(a.mean)));
  bwd.batch_stats = false;
  bwd.set_needs(needs);
  at::AutoDispatchBelowADInplaceOrView below;
  return call_bn("fastrobust::multi_bn_backward", bwd);
}

std::vector<at::Tensor> sync_bn_grad_sums(const BnArgs& a) {
  checks::sync_bn_grad_sums(a);
  const auto acc = acc_dtype(a.mean);
  const auto empty = [&] { return at::empty({0}, a.x.options().dtype(acc)); };
  // The BN's backward with the statistics held fixed: its dbias, dweight are T1, T2.
  const auto g = fixed_stats_backward(a, {false, false, true, true, false, false, false});
  const auto T2 = g[kGradWeight].to(acc), T1 = g[kGradBias].to(acc);
  return {at::stack({T1, T2}), empty(), a.need(kGradWeight) ? T2 : empty(),
          a.need(kGradBias) ? T1 : empty()};
}

std::vector<at::Tensor> sync_bn_dx(const BnArgs& args) {
  checks::sync_bn_dx(args);
  const at::Tensor& x = args.x;
  const int64_t K = args.num_branches;
  const auto acc = acc_dtype(args.mean);
  const auto empty = [&] { return at::empty({0}, x.options().dtype(acc)); };
  const bool need_x = args.need(kGradX), need_mix = args.need(kGradMix) && args.mixed();
  const bool need_s = args.need(kGradScale) && args.input_scale.has_value();
  const bool need_g = args.need(kGradGamma) && args.film_gamma.has_value();
  const bool need_be = args.need(kGradBeta) && args.film_beta.has_value();
  // The direct terms: the BN's backward with the statistics held fixed.
  const auto g = fixed_stats_backward(
      args, {need_x || need_s, need_mix, false, false, need_s, need_g, need_be});
  const OptTensor& input_scale = args.input_scale;
  const at::Tensor &mean = args.mean, &invstd = args.invstd, &planes = args.planes;
  const auto T1 = args.sums[0].to(acc), T2 = args.sums[1].to(acc);
  const auto merged = merge_ranks(args.payload, K, x.size(1));
  const auto count = merged[0].to(acc), var = merged[2].to(acc);
  const auto M = routing(args.sync_op(), args, acc);
  const auto r = invstd.to(acc), mu = mean.to(acc);
  const auto a = args.weight ? r * args.weight->to(acc) : r;
  const auto m = at::where(count != 0, count, 1.0).unsqueeze(1);  // [K, 1]
  // ∂L/∂u += Q·u + R per plane: the statistics' share, -Σ_k M·a/m·(T1 + x̂·T2).
  const auto Q = -masked(M, (a * r * T2 / m).unsqueeze(0)).sum(1);  // [N, C]
  const auto R = -masked(M, (a * (T1 - r * mu * T2) / m).unsqueeze(0)).sum(1);
  const OptTensor s = input_scale ? OptTensor(input_scale->to(acc)) : c10::nullopt;
  const int64_t S = plane_size(x);
  const double Sz = double(std::max<int64_t>(S, 1));
  auto planes_of = [&](const at::Tensor& t) {  // [N, C] -> [N, C, 1, ...] against x
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape.resize(size_t(x.dim()), 1);
    return t.reshape(shape);
  };
  at::Tensor dx = x.new_empty({0}), dmix = empty(), ds = empty();
  if (need_x) {
    const auto qx = s ? *s * *s * Q : Q, rx = s ? *s * R : R;
    dx = (g[kGradX].to(acc) + planes_of(qx) * x.to(acc) + planes_of(rx))
             .to(x.scalar_type());
  }
  at::Tensor pmean, pm2;
  if (need_s || need_mix) {
    if (planes.numel()) {
      pmean = planes[0], pm2 = planes[1];
    } else {
      const auto pm = plane_moments(x, acc);
      pmean = pm[0], pm2 = pm[1];
    }
  }
  if (need_s) {  // Σ_s x·(Q·s·x + R) from the planes' Σx and Σx²
    const auto sx = double(S) * pmean, sxx = pm2 + double(S) * pmean.square();
    ds = g[kGradScale].to(acc) + Q * *s * sxx + R * sx;
  }
  if (need_mix) {  // the statistics' share: -Σ_c a·[T1·(ū - μ) + ½·r·T2·(q - σ²)]/W
    const auto ub = s ? *s * pmean : pmean;
    const auto q = (s ? *s * *s * pm2 : pm2) / Sz;
    const auto du = ub.unsqueeze(1) - mu.unsqueeze(0);  // [N, K, C]
    auto W = count / Sz;
    W = at::where(W != 0, W, 1.0).unsqueeze(0).unsqueeze(2);
    const auto stat = (a.unsqueeze(0) *
                       (T1.unsqueeze(0) * du + 0.5 * r.unsqueeze(0) * T2.unsqueeze(0) *
                                                   (q.unsqueeze(1) + du.square() -
                                                    var.unsqueeze(0))) /
                       W)
                          .sum(2);
    dmix = g[kGradMix].to(acc) - stat;
  }
  return {dx, dmix, ds, need_g ? g[kGradGamma].to(acc) : empty(),
          need_be ? g[kGradBeta].to(acc) : empty()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrobust, CPU, m) {
  using bn::boxed;
  m.impl("sync_bn_stats", torch::CppFunction::makeFromBoxedFunction<&boxed<&sync_bn_stats>>());
  m.impl("sync_bn_apply", torch::CppFunction::makeFromBoxedFunction<&boxed<&sync_bn_apply>>());
  m.impl("sync_bn_grad_sums",
         torch::CppFunction::makeFromBoxedFunction<&boxed<&sync_bn_grad_sums>>());
  m.impl("sync_bn_dx", torch::CppFunction::makeFromBoxedFunction<&boxed<&sync_bn_dx>>());
}

}  // namespace fastrobust::cpu
