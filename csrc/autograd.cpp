// The routed / mixed batch norm's autograd node in C++, for eager calls that the C++ kernels
// serve (fastrobust/_ops.py: batch_norm, its fast path). A Python autograd.Function costs about
// 12 us a forward and 50 us a backward on top of the kernels, which at CIFAR-on-CPU sizes is
// as much as the kernels themselves; this node costs one Python -> C++ call forward and none
// backward. The registered ops (torch.compile, tensor subclasses, modes) do not come here.
#include "autograd.h"

#include <torch/extension.h>

#include "cpu/multi_bn.h"

namespace fastrobust {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

struct Kernels {
  decltype(&cpu::bn_forward_impl) forward;
  decltype(&cpu::bn_backward_impl) backward;
};

Kernels kernels_for(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "bn_autograd: no C++ autograd path for ", x.device(),
              " tensors (the Python path serves them)");
  return {&cpu::bn_forward_impl, &cpu::bn_backward_impl};
}

// The ten tensor arguments, in order. The node's edges are those of the *defined* ones, so
// an argument's edge index skips the None arguments before it.
enum Arg { kX, kRoute, kWeight, kBias, kRunMean, kRunVar, kNbt, kScale, kGamma, kBeta, kTensors };
// The differentiable ones, in the order of bn_backward's `needs` flags and results.
constexpr Arg kGradArgs[7] = {kX, kRoute, kWeight, kBias, kScale, kGamma, kBeta};
constexpr int64_t kForwardArgs = 17;  // the ten tensors and seven scalars of `forward`

at::Tensor value(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// Grad mode on during the backward means create_graph: the gradients must themselves be
// differentiable (gradient penalties). fastrobust/_ops.py registers this op, whose body is the
// BN family in plain torch ops (fastrobust/_engine.py: bn_grads_with_graph).
std::vector<at::Tensor> grads_with_graph(AutogradContext* ctx, const at::Tensor& dy,
                                         const variable_list& s, const std::vector<bool>& needs) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastrobust::bn_grads_with_graph", "")
          .typed<std::vector<at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
              const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
              const OptTensor&, const OptTensor&, int64_t, bool, double, bool, bool, int64_t)>();
  int64_t bits = 0;
  for (int i = 0; i < 7; ++i) bits |= needs[i] ? (int64_t(1) << i) : 0;
  return op.call(dy, s[0], s[1], opt(s[2]), opt(s[3]), s[4], s[5], opt(s[7]), opt(s[8]),
                 opt(s[9]), ctx->saved_data["K"].toInt(),
                 ctx->saved_data["batch_stats"].toBool(), ctx->saved_data["eps"].toDouble(),
                 ctx->saved_data["relu"].toBool(), ctx->saved_data["mixed"].toBool(), bits);
}

struct BNFunction : public torch::autograd::Function<BNFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& route,
                            const OptTensor& weight, const OptTensor& bias,
                            const OptTensor& running_mean, const OptTensor& running_var,
                            const OptTensor& num_batches_tracked, const OptTensor& input_scale,
                            const OptTensor& film_gamma, const OptTensor& film_beta, int64_t K,
                            bool training, double momentum, bool cumulative, double eps,
                            bool relu, bool mixed) {
    const Kernels kern = kernels_for(x);
    const OptTensor branch = mixed ? c10::nullopt : OptTensor(route);
    const OptTensor mix = mixed ? OptTensor(route) : c10::nullopt;
    auto out = kern.forward(x, branch, mix, weight, bias, running_mean, running_var,
                            num_batches_tracked, input_scale, film_gamma, film_beta, K, training,
                            momentum, cumulative, eps, relu, /*running_in_place=*/true);
    // out = {y, mean, invstd, -, -, -, plane_moments (mixed, batch statistics) or undefined};
    // the running stats were updated in their buffers. Bump their version counters as an
    // in-place op would (the kernel wrote through data pointers).
    if (training && running_mean.has_value() && running_var.has_value()) {
      for (const OptTensor* t : {&running_mean, &running_var, &num_batches_tracked})
        if (t->has_value()) (*t)->unsafeGetTensorImpl()->bump_version();
    }
    const at::Tensor args[kTensors] = {x,
                                       route,
                                       value(weight),
                                       value(bias),
                                       value(running_mean),
                                       value(running_var),
                                       value(num_batches_tracked),
                                       value(input_scale),
                                       value(film_gamma),
                                       value(film_beta)};
    std::vector<int64_t> edges, dtypes;
    int64_t edge = 0;
    int64_t edge_of[kTensors];
    for (int i = 0; i < kTensors; ++i) edge_of[i] = args[i].defined() ? edge++ : -1;
    for (Arg a : kGradArgs) {
      edges.push_back(edge_of[a]);
      dtypes.push_back(args[a].defined() ? int64_t(args[a].scalar_type()) : -1);
    }
    ctx->save_for_backward({x, route, args[kWeight], args[kBias], out[1], out[2], out[6],
                            args[kScale], args[kGamma], args[kBeta]});
    ctx->saved_data["K"] = K;
    ctx->saved_data["batch_stats"] = training || !running_mean.has_value();
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["mixed"] = mixed;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["edges"] = edges;
    ctx->saved_data["dtypes"] = dtypes;
    return out[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &route = s[1];
    const bool mixed = ctx->saved_data["mixed"].toBool();
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    std::vector<bool> needs(7);
    for (int i = 0; i < 7; ++i)
      needs[i] = edges[i] >= 0 && ctx->needs_input_grad(size_t(edges[i]));
    needs[1] = needs[1] && mixed;  // a branch index has no gradient
    auto g = at::GradMode::is_enabled() ? grads_with_graph(ctx, grads[0], s, needs)
                                        : kernels_for(x).backward(
        grads[0], x, mixed ? c10::nullopt : opt(route), mixed ? opt(route) : c10::nullopt,
        opt(s[2]), opt(s[3]), s[4], s[5], s[6], opt(s[7]), opt(s[8]),
        opt(s[9]), ctx->saved_data["K"].toInt(), ctx->saved_data["batch_stats"].toBool(),
        ctx->saved_data["relu"].toBool(), needs);
    variable_list result(kForwardArgs);
    for (int i = 0; i < 7; ++i) {
      if (!needs[i]) continue;
      const auto dt = static_cast<at::ScalarType>(dtypes[i]);
      result[kGradArgs[i]] = g[i].scalar_type() == dt ? g[i] : g[i].to(dt);
    }
    return result;
  }
};

// relu(a + b) in one pass (ATen's vectorized _add_relu), the residual junction of a ResNet
// block; backward is one masked pass whose result is the gradient of both inputs.
struct AddReluFunction : public torch::autograd::Function<AddReluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
                    a.device() == b.device(),
                "add_relu: a and b must have the same shape, dtype and device");
    auto y = at::_add_relu(a, b);
    ctx->save_for_backward({y});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto y = ctx->get_saved_variables()[0];
    auto g = at::threshold_backward(grads[0], y, 0);
    return {g, g};
  }
};

}  // namespace

at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b) {
  return AddReluFunction::apply(a, b);
}

at::Tensor bn_autograd(const at::Tensor& x, const at::Tensor& route, const OptTensor& weight,
                       const OptTensor& bias, const OptTensor& running_mean,
                       const OptTensor& running_var, const OptTensor& num_batches_tracked,
                       const OptTensor& input_scale, const OptTensor& film_gamma,
                       const OptTensor& film_beta, int64_t num_branches, bool training,
                       double momentum, bool cumulative, double eps, bool relu, bool mixed) {
  return BNFunction::apply(x, route, weight, bias, running_mean, running_var,
                           num_batches_tracked, input_scale, film_gamma, film_beta, num_branches,
                           training, momentum, cumulative, eps, relu, mixed);
}

}  // namespace fastrobust
