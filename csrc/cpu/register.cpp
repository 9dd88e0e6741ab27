// The CPU implementations of the fastrobust ops (schemas in csrc/ops.cpp): thin adapters from
// the schemas to the kernels of multi_bn.cpp and pgd.cpp. The kernels work in x's dtype when it
// is float32 or float64 and every other floating argument has it too; any other combination
// (float16 / bfloat16 activations, float32 parameters with float64 x, ...) is computed in the
// accumulation dtype (float64 for float64 x, else float32) and the outputs cast back, which is
// what the eager backend does too.
#include <torch/extension.h>

#include "../checks.h"
#include "../spec.h"
#include "multi_bn.h"
#include "pgd.h"

namespace fastrobust::cpu {
namespace {

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// True when every given floating tensor already has x's dtype and that is float32/float64.
bool native(const at::Tensor& x, std::initializer_list<const OptTensor*> ts) {
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  for (const OptTensor* t : ts)
    if (t->has_value() && (*t)->scalar_type() != x.scalar_type()) return false;
  return true;
}

OptTensor as(const OptTensor& t, at::ScalarType dt) {
  return t.has_value() ? OptTensor(t->to(dt)) : t;
}

at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : like.new_empty({0});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_bn(
    const at::Tensor& x, const OptTensor& branch, const OptTensor& mix,
    const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked,
    const OptTensor& input_scale, const OptTensor& film_gamma, const OptTensor& film_beta,
    int64_t K, bool training, double momentum, bool cumulative, double eps, bool relu) {
  checks::multi_bn(x, branch, mix, weight, bias, running_mean, running_var, num_batches_tracked,
                   input_scale, film_gamma, film_beta, K, training, momentum, cumulative, eps);
  if (native(x, {&mix, &weight, &bias, &running_mean, &running_var, &input_scale, &film_gamma,
                 &film_beta})) {
    auto out = bn_forward_impl(x, branch, mix, weight, bias, running_mean, running_var,
                               num_batches_tracked, input_scale, film_gamma, film_beta, K,
                               training, momentum, cumulative, eps, relu,
                               /*running_in_place=*/true);
    return {out[0], out[1], out[2], or_empty(out[6], out[1])};
  }
  const auto dt = acc_type(x);
  const OptTensor rm = as(running_mean, dt), rv = as(running_var, dt);
  auto out = bn_forward_impl(x.to(dt), branch, as(mix, dt), as(weight, dt), as(bias, dt), rm,
                             rv, num_batches_tracked, as(input_scale, dt), as(film_gamma, dt),
                             as(film_beta, dt), K, training, momentum, cumulative, eps, relu,
                             /*running_in_place=*/true);
  if (training && rm.has_value() && rv.has_value()) {
    if (!rm->is_same(*running_mean)) running_mean->copy_(*rm);
    if (!rv->is_same(*running_var)) running_var->copy_(*rv);
  }
  return {out[0].to(x.scalar_type()), out[1], out[2], or_empty(out[6], out[1])};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
multi_bn_backward(const at::Tensor& dy, const at::Tensor& x, const OptTensor& branch,
                  const OptTensor& mix, const OptTensor& weight, const OptTensor& bias,
                  const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& planes,
                  const OptTensor& input_scale, const OptTensor& film_gamma,
                  const OptTensor& film_beta, int64_t K, bool batch_stats, bool relu,
                  std::array<bool, kNumBNGrads> needs) {
  checks::multi_bn_backward(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
                            film_gamma, film_beta, K, batch_stats, needs);
  const std::vector<bool> flags(needs.begin(), needs.end());
  const OptTensor st = mean, dyo = dy;
  std::vector<at::Tensor> g;
  if (native(x, {&dyo, &mix, &weight, &bias, &st, &input_scale, &film_gamma, &film_beta})) {
    g = bn_backward(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
                    film_gamma, film_beta, K, batch_stats, relu, flags);
  } else {
    const auto dt = acc_type(x);
    g = bn_backward(dy.to(dt), x.to(dt), branch, as(mix, dt), as(weight, dt), as(bias, dt),
                    mean.to(dt), invstd.to(dt), planes.to(dt), as(input_scale, dt),
                    as(film_gamma, dt), as(film_beta, dt), K, batch_stats, relu, flags);
    if (needs[kGradX]) g[kGradX] = g[kGradX].to(x.scalar_type());
  }
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6]};
}

at::Tensor film(const at::Tensor& x, const OptTensor& gamma, const OptTensor& beta) {
  checks::film(x, gamma, beta);
  if (native(x, {&gamma, &beta})) return film_forward(x, gamma, beta);
  const auto dt = acc_type(x);
  return film_forward(x.to(dt), as(gamma, dt), as(beta, dt)).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> film_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& gamma,
    std::array<bool, kNumFilmGrads> needs, std::array<bool, 2> per_channel) {
  checks::film_backward(dy, x, gamma, needs, per_channel);
  const OptTensor dyo = dy;
  std::vector<at::Tensor> g;
  if (native(x, {&dyo, &gamma})) {
    g = film_backward(dy, x, gamma, needs[kFilmX], needs[kFilmGamma], needs[kFilmBeta],
                      per_channel[0], per_channel[1]);
  } else {
    const auto dt = acc_type(x);
    g = film_backward(dy.to(dt), x.to(dt), as(gamma, dt), needs[kFilmX], needs[kFilmGamma],
                      needs[kFilmBeta], per_channel[0], per_channel[1]);
    if (needs[kFilmX]) g[0] = g[0].to(x.scalar_type());
  }
  return {g[0], g[1], g[2]};
}

// --- PGD: the kernels walk each tensor as a flat [N, S] array in x_adv's layout ------------

// Dense, with each sample one block of memory (contiguous, channels_last, ...).
bool flat_layout(const at::Tensor& t) {
  if (t.numel() == 0 || t.dim() == 0) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the non-unit dims
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return t.size(0) == 1 || t.stride(0) == t.numel() / t.size(0);
}

// t in ref's layout: t itself when the strides agree, else a copy.
at::Tensor like(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides()) return t;
  return at::empty_like(ref).copy_(t);
}

at::Tensor work_of(const at::Tensor& t) { return flat_layout(t) ? t : t.contiguous(); }

// A per-sample eps / alpha / radius as the kernels read it: contiguous, in the working dtype
// (any floating dtype is accepted; float16 / bfloat16 steps work in float32).
OptTensor in_dtype(const OptTensor& t, at::ScalarType dt) {
  if (!t) return t;
  return (t->scalar_type() == dt && t->is_contiguous()) ? t : OptTensor(t->to(dt).contiguous());
}

// float16 / bfloat16 steps run in float32 copies (eps_t, alpha_t and radius come in the
// accumulation dtype already).
bool half(const at::Tensor& t) {
  return t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble;
}

void pgd_step(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
              const OptTensor& eps_t, double eps, const OptTensor& alpha_t, double alpha,
              bool l2, double clip_min, double clip_max) {
  checks::pgd_step(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, clip_min, clip_max);
  if (half(x_adv)) {
    const auto w = x_adv.to(at::kFloat);
    pgd_step(w, grad.to(at::kFloat), x_nat.to(at::kFloat), eps_t, eps, alpha_t, alpha, l2,
             clip_min, clip_max);
    x_adv.copy_(w);
    return;
  }
  at::Tensor work = work_of(x_adv);
  const auto dt = x_adv.scalar_type();
  pgd_update(work, work, like(grad, work), like(x_nat, work), in_dtype(eps_t, dt), eps,
             in_dtype(alpha_t, dt), alpha, l2 ? kL2 : kLinfSign, clip_min, clip_max);
  if (!work.is_same(x_adv)) x_adv.copy_(work);
}

void pgd_init(const at::Tensor& noise, const at::Tensor& x_nat, const OptTensor& eps_t,
              double eps, const OptTensor& radius, bool l2, double clip_min, double clip_max) {
  checks::pgd_init(noise, x_nat, eps_t, eps, radius, l2, clip_min, clip_max);
  if (half(noise)) {
    const auto w = noise.to(at::kFloat);
    pgd_init(w, x_nat.to(at::kFloat), eps_t, eps, radius, l2, clip_min, clip_max);
    noise.copy_(w);
    return;
  }
  at::Tensor work = work_of(noise);
  const at::Tensor xn = like(x_nat, work);
  const auto dt = noise.scalar_type();
  const OptTensor e = in_dtype(eps_t, dt);
  if (l2)
    pgd_update(work, xn, work, xn, e, eps, in_dtype(radius, dt), 0.0, kL2, clip_min, clip_max);
  else
    pgd_update(work, xn, work, xn, e, eps, e, eps, kLinfRaw, clip_min, clip_max);
  if (!work.is_same(noise)) noise.copy_(work);
}

void mifgsm_step(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& momentum,
                 const at::Tensor& x_nat, const OptTensor& eps_t, double eps,
                 const OptTensor& alpha_t, double alpha, double decay, double clip_min,
                 double clip_max) {
  checks::mifgsm_step(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha, decay, clip_min,
                      clip_max);
  if (half(x_adv)) {
    const auto w = x_adv.to(at::kFloat), m = momentum.to(at::kFloat);
    mifgsm_step(w, grad.to(at::kFloat), m, x_nat.to(at::kFloat), eps_t, eps, alpha_t, alpha,
                decay, clip_min, clip_max);
    x_adv.copy_(w);
    momentum.copy_(m);
    return;
  }
  at::Tensor work = work_of(x_adv);
  at::Tensor buf = like(momentum, work);
  const auto dt = x_adv.scalar_type();
  mifgsm_update(work, like(grad, work), buf, like(x_nat, work), in_dtype(eps_t, dt), eps,
                in_dtype(alpha_t, dt), alpha, decay, clip_min, clip_max);
  if (!work.is_same(x_adv)) x_adv.copy_(work);
  if (!buf.is_same(momentum)) momentum.copy_(buf);
}

at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b) {
  checks::add_relu(a, b);
  // ATen's one-pass _add_relu has CPU kernels for float and double only (bfloat16, as under
  // autocast, raised an internal assert): other dtypes take the two ops.
  if (a.scalar_type() != at::kFloat && a.scalar_type() != at::kDouble)
    return at::relu(at::add(a, b));
  return at::_add_relu(a, b);
}

at::Tensor add_relu_composite(const at::Tensor& a, const at::Tensor& b) {
  return at::relu(at::add(a, b));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrobust, CPU, m) {
  m.impl("multi_bn", &multi_bn);
  m.impl("multi_bn_backward", &multi_bn_backward);
  m.impl("film", &film);
  m.impl("film_backward", &film_backward_cpu);
  m.impl("add_relu", &add_relu);
  m.impl("pgd_step", &pgd_step);
  m.impl("pgd_init", &pgd_init);
  m.impl("mifgsm_step", &mifgsm_step);
}

// add_relu on any other device: the two ATen ops.
TORCH_LIBRARY_IMPL(fastrobust, CompositeExplicitAutograd, m) {
  m.impl("add_relu", &add_relu_composite);
}

}  // namespace fastrobust::cpu
