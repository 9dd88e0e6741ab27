// From the multi_bn / multi_bn_backward schemas (csrc/ops.cpp) to the torch-free BnArgs of
// multi_bn_cuda.h: argument checks, dtype and layout preparation, outputs and workspace.
// Shared by the CUDA registration (csrc/cuda/register.cpp, CUDA builds) and the host
// emulation (csrc/cpu/cuda_emulation.cpp), so the CPU tests cover this code too. `launch`
// runs the kernels: the CUDA launchers, or the bodies in host loops.
#pragma once
#include <torch/extension.h>

#include <array>
#include <vector>

#include "../spec.h"
#include "multi_bn_cuda.h"

namespace fastrobust::cuda {

using OptTensor = c10::optional<at::Tensor>;

inline at::ScalarType bn_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline Dtype bn_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return Dtype::kFloat;
    case at::kDouble: return Dtype::kDouble;
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "multi_batch_norm: x must be a floating tensor");
  }
  return Dtype::kFloat;
}

// The product of the spatial sizes (explicit: an empty batch cannot infer a -1).
inline int64_t bn_spatial(const at::Tensor& t) {
  int64_t S = 1;
  for (int64_t d = 2; d < t.dim(); ++d) S *= t.size(d);
  return S;
}

// An input as [N, C, S]: a view where one exists, else a contiguous copy.
inline at::Tensor bn_ncs(const at::Tensor& t) {
  if (t.dim() == 2) return t.unsqueeze(2);
  return t.reshape({t.size(0), t.size(1), bn_spatial(t)});
}

// A new output like x, and its [N, C, S] view (x's layout when that flattens to a view).
inline std::pair<at::Tensor, at::Tensor> bn_output(const at::Tensor& x) {
  at::Tensor y = at::empty_like(x);
  if (y.dim() == 2) return {y, y.unsqueeze(2)};
  const int64_t S = bn_spatial(y);
  try {
    return {y, y.view({y.size(0), y.size(1), S})};
  } catch (const c10::Error&) {
    y = at::empty(x.sizes(), x.options());
    return {y, y.view({y.size(0), y.size(1), S})};
  }
}

inline void bn_strides(const at::Tensor& t3, int64_t* st) {
  for (int i = 0; i < 3; ++i) st[i] = t3.stride(i);
}

inline OptTensor bn_as(const OptTensor& t, at::ScalarType dt) {
  return t.has_value() ? OptTensor(t->to(dt).contiguous()) : t;
}

inline const void* bn_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

inline void bn_check(const at::Tensor& x, const OptTensor& branch, const OptTensor& mix,
                     int64_t K, const char* op) {
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be [N, C, *spatial]");
  TORCH_CHECK_VALUE(branch.has_value() != mix.has_value(), op,
                    ": pass exactly one of branch, mix");
  TORCH_CHECK_VALUE(K >= 1, op, ": num_branches must be >= 1");
  if (branch)
    TORCH_CHECK_VALUE(branch->scalar_type() == at::kLong && branch->dim() == 1 &&
                          branch->size(0) == x.size(0),
                      op, ": branch must be int64 [N]");
  if (mix)
    TORCH_CHECK_VALUE(mix->dim() == 2 && mix->size(0) == x.size(0) && mix->size(1) == K, op,
                      ": mix must be [N, num_branches]");
}

// Fills the fields common to forward and backward; keeps the prepared tensors alive in `keep`.
inline BnArgs bn_common(const at::Tensor& x3, const OptTensor& branch, const OptTensor& mix,
                        const OptTensor& weight, const OptTensor& bias,
                        const OptTensor& input_scale, const OptTensor& film_gamma,
                        const OptTensor& film_beta, int64_t K, std::vector<at::Tensor>& keep) {
  const auto acc = bn_acc_type(x3), dt = x3.scalar_type();
  BnArgs a;
  a.N = x3.size(0);
  a.C = x3.size(1);
  a.S = x3.size(2);
  a.K = K;
  a.dtype = bn_dtype(x3);
  a.x = x3.data_ptr();
  bn_strides(x3, a.sx);
  auto hold = [&](const OptTensor& t) -> const void* {
    if (t.has_value()) keep.push_back(*t);
    return bn_ptr(t);
  };
  if (branch) a.branch = static_cast<const int64_t*>(hold(branch->contiguous()));
  a.mix = hold(bn_as(mix, acc));
  a.weight = hold(bn_as(weight, acc));
  a.bias = hold(bn_as(bias, acc));
  a.scale = hold(bn_as(input_scale, dt));
  a.gamma = hold(bn_as(film_gamma, dt));
  a.beta = hold(bn_as(film_beta, dt));
  bn_choose_splits(a);
  return a;
}

// The multi_bn op: returns (y, mean, invstd, planes); running stats updated in place.
template <typename Launch>
std::vector<at::Tensor> bn_forward_with(
    const at::Tensor& x, const OptTensor& branch, const OptTensor& mix, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& input_scale,
    const OptTensor& film_gamma, const OptTensor& film_beta, int64_t K, bool training,
    double momentum, bool cumulative, double eps, bool relu, const Launch& launch) {
  const char* op = branch ? "multi_batch_norm" : "mixed_batch_norm";
  bn_check(x, branch, mix, K, op);
  const bool has_running = running_mean.has_value() && running_var.has_value();
  const auto acc = bn_acc_type(x);
  std::vector<at::Tensor> keep;
  const at::Tensor x3 = bn_ncs(x);
  BnArgs a = bn_common(x3, branch, mix, weight, bias, input_scale, film_gamma, film_beta, K,
                       keep);
  a.batch_stats = training || !has_running;
  a.update = training && has_running;
  a.cumulative = cumulative;
  a.momentum = momentum;
  a.eps = eps;
  a.relu = relu;
  TORCH_CHECK_VALUE(!(a.update && cumulative) || num_batches_tracked.has_value(), op,
                    ": momentum=None needs num_batches_tracked");
  at::Tensor rm, rv;
  if (has_running) {
    rm = running_mean->scalar_type() == acc && running_mean->is_contiguous()
             ? *running_mean : running_mean->to(acc).contiguous();
    rv = running_var->scalar_type() == acc && running_var->is_contiguous()
             ? *running_var : running_var->to(acc).contiguous();
    a.running_mean = rm.data_ptr();
    a.running_var = rv.data_ptr();
  }
  if (num_batches_tracked && a.update) {
    TORCH_CHECK_VALUE(num_batches_tracked->scalar_type() == at::kLong &&
                          num_batches_tracked->numel() == K &&
                          num_batches_tracked->is_contiguous(),
                      op, ": num_batches_tracked must be contiguous int64 [num_branches]");
    a.nbt = num_batches_tracked->data_ptr<int64_t>();
  }
  const auto [y, y3] = bn_output(x);
  a.y = y3.data_ptr();
  bn_strides(y3, a.sy);
  auto opts = x.options().dtype(acc);
  auto mean = at::empty({K, a.C}, opts), invstd = at::empty({K, a.C}, opts);
  a.mean = mean.data_ptr();
  a.invstd = invstd.data_ptr();
  at::Tensor planes = at::empty({mix && a.batch_stats ? 2 : 0, a.N, a.C}, opts);
  if (mix && a.batch_stats) {
    a.planes = planes.data_ptr();
  } else {
    planes = at::empty({0}, opts);
  }
  auto work = at::empty({bn_workspace(a)}, opts);
  a.work = work.data_ptr();
  launch(a);
  if (a.update) {
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return {y, mean, invstd, planes};
}

// The multi_bn_backward op: the gradients asked for in `needs` (spec.h BNGrad), others empty.
template <typename Launch>
std::vector<at::Tensor> bn_backward_with(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& branch, const OptTensor& mix,
    const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& planes, const OptTensor& input_scale,
    const OptTensor& film_gamma, const OptTensor& film_beta, int64_t K, bool batch_stats,
    bool relu, std::array<bool, kNumBNGrads> needs, const Launch& launch) {
  const char* op = branch ? "multi_batch_norm" : "mixed_batch_norm";
  bn_check(x, branch, mix, K, op);
  const auto acc = bn_acc_type(x);
  std::vector<at::Tensor> keep;
  const at::Tensor x3 = bn_ncs(x);
  BnArgs a = bn_common(x3, branch, mix, weight, bias, input_scale, film_gamma, film_beta, K,
                       keep);
  a.batch_stats = batch_stats;
  a.relu = relu;
  const at::Tensor dyc = dy.scalar_type() == x.scalar_type() ? dy : dy.to(x.scalar_type());
  const at::Tensor dy3 = bn_ncs(dyc);
  a.dy = dy3.data_ptr();
  bn_strides(dy3, a.sdy);
  const at::Tensor mean_c = mean.to(acc).contiguous(), invstd_c = invstd.to(acc).contiguous();
  a.mean = const_cast<void*>(mean_c.const_data_ptr());
  a.invstd = const_cast<void*>(invstd_c.const_data_ptr());
  const bool need_mix = needs[kGradMix] && mix.has_value();
  at::Tensor planes_c;
  if (mix && batch_stats) {
    TORCH_CHECK_VALUE(planes.dim() == 3 && planes.size(0) == 2 && planes.size(1) == a.N &&
                          planes.size(2) == a.C,
                      op, ": the backward needs the forward's plane moments [2, N, C]");
    planes_c = planes.to(acc).contiguous();
    a.planes = const_cast<void*>(planes_c.const_data_ptr());
  }
  auto opts = x.options().dtype(acc);
  at::Tensor dx, dmix, dweight, dbias, dscale, dgamma, dbeta;
  if (needs[kGradX]) {
    at::Tensor dx3;
    std::tie(dx, dx3) = bn_output(x);
    a.dx = dx3.data_ptr();
    bn_strides(dx3, a.sdx);
  }
  if (need_mix) a.dmix = (dmix = at::empty({a.N, K}, opts)).data_ptr();
  if (needs[kGradWeight]) a.dweight = (dweight = at::empty({K, a.C}, opts)).data_ptr();
  if (needs[kGradBias]) a.dbias = (dbias = at::empty({K, a.C}, opts)).data_ptr();
  if (needs[kGradScale] && input_scale)
    a.dscale = (dscale = at::empty({a.N, a.C}, opts)).data_ptr();
  if (needs[kGradGamma] && film_gamma)
    a.dgamma = (dgamma = at::empty({a.N, a.C}, opts)).data_ptr();
  if (needs[kGradBeta] && film_beta)
    a.dbeta = (dbeta = at::empty({a.N, a.C}, opts)).data_ptr();
  auto work = at::empty({bn_workspace(a)}, opts);
  a.work = work.data_ptr();
  launch(a, needs[kGradX]);
  std::vector<at::Tensor> out = {dx, dmix, dweight, dbias, dscale, dgamma, dbeta};
  for (auto& t : out)  // fresh empties: outputs must not alias
    if (!t.defined()) t = x.new_empty({0});
  return out;
}

}  // namespace fastrobust::cuda
