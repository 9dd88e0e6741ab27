// The one autograd of the fastrobust ops, registered for the Autograd key: eager calls,
// torch.compile's traced graphs, opcheck and the synchronized BN all go through these nodes,
// whatever kernel (CPU C++, Triton, eager) serves the device below them. Forward and backward
// each call the registered ops through the dispatcher, so the backward of a CUDA call runs the
// CUDA kernel and a traced backward records multi_bn_backward / film_backward.
//
//   op              forward                                  backward
//   multi_bn        multi_bn                                 multi_bn_backward
//   film            film                                     film_backward
//   add_relu        add_relu                                 threshold_backward (ATen)
//   sync_multi_bn   sync_bn_stats → all-reduce →             sync_bn_grad_sums → all-reduce →
//                   sync_bn_apply                            sync_bn_dx
//
// The synchronized BN's all-reduce is torch's functional collective (_c10d_functional::
// all_reduce_ and wait_tensor, through the dispatcher) on the process group named by the op's
// group_name: one forward, one backward, nothing read on the host.
//
// When grad mode is on during the backward (torch.autograd.grad(..., create_graph=True): a
// gradient penalty), the gradients must themselves be differentiable: the BN family then calls
// multi_bn_grads_with_graph (plain torch ops, fastrobust/_ops.py) and film computes its three
// sums with ATen ops here. The synchronized BN refuses it (its statistics' share would need
// differentiable all-reduces): it raises rather than drop that term.
#include <torch/extension.h>

#include "checks.h"
#include "spec.h"

namespace fastrobust {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

at::Tensor value(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// A node's edges are those of its *defined* tensor arguments, so an argument's edge index
// skips the None arguments before it. Returns, per argument, its edge (or -1).
template <size_t N>
std::array<int64_t, N> edges_of(const std::array<at::Tensor, N>& args) {
  std::array<int64_t, N> e{};
  int64_t next = 0;
  for (size_t i = 0; i < N; ++i) e[i] = args[i].defined() ? next++ : -1;
  return e;
}

c10::ScalarType dtype_or_undefined(const at::Tensor& t) {
  return t.defined() ? t.scalar_type() : c10::ScalarType::Undefined;
}

// --- multi_bn -------------------------------------------------------------------------------

using MultiBnSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, int64_t, bool, double, bool, double, bool);
using MultiBnBackwardSig =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, const OptTensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const OptTensor&, const OptTensor&, const OptTensor&, int64_t, bool,
                           bool, std::array<bool, kNumBNGrads>);
using GradsWithGraphSig = std::vector<at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, int64_t, bool, double, bool, std::array<bool, kNumBNGrads>);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The ten tensor arguments of multi_bn, in schema order.
enum BnArg { kX, kBranch, kMix, kWeight, kBias, kRunMean, kRunVar, kNbt, kScale, kGamma, kBeta,
             kBnTensors };
// The argument of each BNGrad (spec.h), in that order.
constexpr BnArg kGradArg[kNumBNGrads] = {kX, kMix, kWeight, kBias, kScale, kGamma, kBeta};
constexpr size_t kBnArgs = 17;  // the schema's arguments: 11 tensors and 6 scalars

struct MultiBn : public torch::autograd::Function<MultiBn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const OptTensor& branch, const OptTensor& mix,
                               const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               const OptTensor& num_batches_tracked,
                               const OptTensor& input_scale, const OptTensor& film_gamma,
                               const OptTensor& film_beta, int64_t K, bool training,
                               double momentum, bool cumulative, double eps, bool relu) {
    static const auto fwd = op<MultiBnSig>("fastrobust::multi_bn");
    at::Tensor y, mean, invstd, planes;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, mean, invstd, planes) =
          fwd.call(x, branch, mix, weight, bias, running_mean, running_var,
                   num_batches_tracked, input_scale, film_gamma, film_beta, K, training,
                   momentum, cumulative, eps, relu);
    }
    // The running stats were written in place below the ADInplaceOrView key: bump their
    // version counters as an in-place op would.
    if (training && running_mean.has_value() && running_var.has_value()) {
      for (const OptTensor* t : {&running_mean, &running_var, &num_batches_tracked})
        if (t->has_value()) (*t)->unsafeGetTensorImpl()->bump_version();
    }
    const std::array<at::Tensor, kBnTensors> args = {
        x, value(branch), value(mix), value(weight), value(bias), value(running_mean),
        value(running_var), value(num_batches_tracked), value(input_scale), value(film_gamma),
        value(film_beta)};
    const auto edge = edges_of(args);
    std::vector<int64_t> edges, dtypes;
    for (BnArg a : kGradArg) {
      edges.push_back(edge[a]);
      dtypes.push_back(int64_t(dtype_or_undefined(args[a])));
    }
    ctx->save_for_backward({x, args[kBranch], args[kMix], args[kWeight], args[kBias], mean,
                            invstd, planes, args[kScale], args[kGamma], args[kBeta]});
    ctx->saved_data["K"] = K;
    ctx->saved_data["batch_stats"] = training || !running_mean.has_value();
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["edges"] = edges;
    ctx->saved_data["dtypes"] = dtypes;
    ctx->mark_non_differentiable({mean, invstd, planes});
    // The statistics get no gradient: leaving their grads undefined (instead of zeros)
    // spares three fills per backward.
    ctx->set_materialize_grads(false);
    return {y, mean, invstd, planes};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<MultiBnBackwardSig>("fastrobust::multi_bn_backward");
    static const auto with_graph =
        op<GradsWithGraphSig>("fastrobust::multi_bn_grads_with_graph");
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &mean = s[5], &invstd = s[6], &planes = s[7];
    const OptTensor branch = opt(s[1]), mix = opt(s[2]), weight = opt(s[3]), bias = opt(s[4]),
                    scale = opt(s[8]), gamma = opt(s[9]), beta = opt(s[10]);
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    const int64_t K = ctx->saved_data["K"].toInt();
    const bool batch_stats = ctx->saved_data["batch_stats"].toBool();
    const bool relu = ctx->saved_data["relu"].toBool();
    std::array<bool, kNumBNGrads> needs{};
    for (int i = 0; i < kNumBNGrads; ++i)
      needs[i] = edges[i] >= 0 && ctx->needs_input_grad(size_t(edges[i]));
    // The gradient of y itself; grads of the statistics are ignored (not differentiable).
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(kBnArgs);  // y itself got no gradient
    std::vector<at::Tensor> g;
    if (at::GradMode::is_enabled()) {
      g = with_graph.call(dy, x, branch, mix, weight, bias, mean, invstd, scale, gamma, beta, K,
                          batch_stats, ctx->saved_data["eps"].toDouble(), relu, needs);
    } else {
      auto r = bwd.call(dy, x, branch, mix, weight, bias, mean, invstd, planes, scale, gamma,
                        beta, K, batch_stats, relu, needs);
      g = {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r),
           std::get<4>(r), std::get<5>(r), std::get<6>(r)};
    }
    variable_list result(kBnArgs);
    for (int i = 0; i < kNumBNGrads; ++i) {
      if (!needs[i]) continue;
      const auto dt = static_cast<at::ScalarType>(dtypes[i]);
      result[kGradArg[i]] = g[i].scalar_type() == dt ? g[i] : g[i].to(dt);
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_bn_autograd(
    const at::Tensor& x, const OptTensor& branch, const OptTensor& mix,
    const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked,
    const OptTensor& input_scale, const OptTensor& film_gamma, const OptTensor& film_beta,
    int64_t K, bool training, double momentum, bool cumulative, double eps, bool relu) {
  auto out = MultiBn::apply(x, branch, mix, weight, bias, running_mean, running_var,
                            num_batches_tracked, input_scale, film_gamma, film_beta, K,
                            training, momentum, cumulative, eps, relu);
  return {out[0], out[1], out[2], out[3]};
}

// --- film -----------------------------------------------------------------------------------

using FilmSig = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&);
using FilmBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, std::array<bool, kNumFilmGrads>,
    std::array<bool, 2>);

// (dx, dgamma, dbeta) of y = gamma·x + beta as differentiable ATen ops (double backward); a
// per-channel ([C]) gamma or beta gets its gradient summed over the batch as well.
std::vector<at::Tensor> film_grads_with_graph(const at::Tensor& dy, const at::Tensor& x,
                                              const at::Tensor& gamma,
                                              std::array<bool, kNumFilmGrads> needs,
                                              std::array<bool, 2> per_channel,
                                              at::ScalarType x_dtype) {
  const int64_t nd = dy.dim();
  std::vector<int64_t> planes, channels{0}, shape(dy.sizes().begin(), dy.sizes().begin() + 2);
  for (int64_t d = 2; d < nd; ++d) {
    planes.push_back(d);
    channels.push_back(d);
    shape.push_back(1);
  }
  const auto acc = dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto reduce = [&](const at::Tensor& t, bool per_c) {
    const auto& dims = per_c ? channels : planes;
    return dims.empty() ? t.to(acc) : t.to(acc).sum(dims);
  };
  at::Tensor dx, dg, db;
  if (needs[kFilmX]) {
    auto gshape = shape;
    if (gamma.defined() && gamma.dim() == 1) gshape[0] = 1;
    dx = (gamma.defined() ? dy * gamma.view(gshape).to(dy.scalar_type()) : dy).to(x_dtype);
  }
  if (needs[kFilmGamma]) dg = reduce(dy * x, per_channel[0]);
  if (needs[kFilmBeta]) db = reduce(dy, per_channel[1]);
  return {dx, dg, db};
}

struct Film : public torch::autograd::Function<Film> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& gamma,
                            const OptTensor& beta) {
    static const auto fwd = op<FilmSig>("fastrobust::film");
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = fwd.call(x, gamma, beta);
    }
    const std::array<at::Tensor, 3> args = {x, value(gamma), value(beta)};
    const auto edge = edges_of(args);
    // x is needed only for dgamma, which exists only with a gamma.
    ctx->save_for_backward({gamma ? x : at::Tensor(), value(gamma)});
    ctx->saved_data["edges"] = std::vector<int64_t>(edge.begin(), edge.end());
    ctx->saved_data["dtypes"] = std::vector<int64_t>{
        int64_t(x.scalar_type()), int64_t(dtype_or_undefined(args[1])),
        int64_t(dtype_or_undefined(args[2]))};
    ctx->saved_data["per_channel"] = std::vector<int64_t>{
        gamma && gamma->dim() == 1, beta && beta->dim() == 1};
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<FilmBackwardSig>("fastrobust::film_backward");
    const auto s = ctx->get_saved_variables();
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    const auto pc = ctx->saved_data["per_channel"].toIntVector();
    const std::array<bool, 2> per_channel{pc[0] != 0, pc[1] != 0};
    std::array<bool, kNumFilmGrads> needs{};
    for (int i = 0; i < kNumFilmGrads; ++i)
      needs[i] = edges[i] >= 0 && ctx->needs_input_grad(size_t(edges[i]));
    const at::Tensor& dy = grads[0];
    const auto x_dtype = static_cast<at::ScalarType>(dtypes[0]);
    std::vector<at::Tensor> g;
    if (at::GradMode::is_enabled()) {
      g = film_grads_with_graph(dy, s[0], s[1], needs, per_channel, x_dtype);
    } else {
      // Without a gamma, dx = dy and dbeta = Σ dy need no x: dy stands in for it.
      auto r = bwd.call(dy, s[0].defined() ? s[0] : dy, opt(s[1]), needs, per_channel);
      g = {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
    }
    variable_list result(3);
    for (int i = 0; i < kNumFilmGrads; ++i) {
      if (!needs[i]) continue;
      const auto dt = static_cast<at::ScalarType>(dtypes[i]);
      result[i] = g[i].scalar_type() == dt ? g[i] : g[i].to(dt);
    }
    return result;
  }
};

at::Tensor film_autograd(const at::Tensor& x, const OptTensor& gamma, const OptTensor& beta) {
  return Film::apply(x, gamma, beta);
}

// --- add_relu: one pass forward; the backward is one masked pass serving both inputs ---------

struct AddRelu : public torch::autograd::Function<AddRelu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
                    a.device() == b.device(),
                "add_relu: a and b must have the same shape, dtype and device");
    static const auto fwd =
        op<at::Tensor(const at::Tensor&, const at::Tensor&)>("fastrobust::add_relu");
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = fwd.call(a, b);
    }
    ctx->save_for_backward({y});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto y = ctx->get_saved_variables()[0];
    auto g = at::threshold_backward(grads[0], y, 0);  // differentiable: ATen's own formula
    return {g, g};
  }
};

at::Tensor add_relu_autograd(const at::Tensor& a, const at::Tensor& b) {
  return AddRelu::apply(a, b);
}


// --- sync_multi_bn: the synchronized BN (fastrobust.distributed) ----------------------------

using SyncStatsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    int64_t, bool, int64_t, int64_t);
using SyncApplySig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const at::Tensor&, const at::Tensor&, int64_t, double, bool, double, bool);
using SyncGradSumsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, int64_t, bool, std::array<bool, kNumBNGrads>);
using SyncDxSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t, bool, std::array<bool, kNumBNGrads>);

// t summed over the ranks of the group named `group`: torch's functional collective and its
// wait, through the dispatcher (boxed: the group argument is a `str` in torch 2.6 and an `Any`
// in later versions). In place (all_reduce_) on real tensors: no copy, t itself comes back. On
// the tensors of a trace (fake or functional tensors, which carry the Python key:
// torch.compile's AOT autograd), the out-of-place all_reduce, since functionalization refuses
// an in-place collective; the compiled graph then holds all_reduce + wait_tensor, as Dynamo's
// own tracing of torch.distributed.all_reduce gives.
at::Tensor all_reduce(const at::Tensor& t, const std::string& group) {
  static const auto in_place =
      c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce_", "");
  static const auto out_of_place =
      c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce", "");
  static const auto wait =
      c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
  const bool traced = t.key_set().has(c10::DispatchKey::Python);
  std::vector<c10::IValue> stack{t, std::string("sum"), group};
  (traced ? out_of_place : in_place).callBoxed(&stack);
  std::vector<c10::IValue> waited{stack.at(0)};
  wait.callBoxed(&waited);
  return traced ? waited.at(0).toTensor() : t;
}

// The forward's op calls: stats, all-reduce, apply. Returns (y, mean, invstd, planes, payload).
std::array<at::Tensor, 5> sync_forward(
    const at::Tensor& x, const OptTensor& branch, const OptTensor& mix, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& input_scale,
    const OptTensor& film_gamma, const OptTensor& film_beta, int64_t K, double momentum,
    bool cumulative, double eps, bool relu, int64_t rank, int64_t world,
    const std::string& group) {
  static const auto stats = op<SyncStatsSig>("fastrobust::sync_bn_stats");
  static const auto apply = op<SyncApplySig>("fastrobust::sync_bn_apply");
  auto [local, planes, old] =
      stats.call(x, branch, mix, input_scale, running_mean ? num_batches_tracked : c10::nullopt,
                 K, cumulative, rank, world);
  const auto payload = all_reduce(local, group);  // the forward's one collective
  auto [y, mean, invstd] =
      apply.call(x, branch, mix, weight, bias, running_mean, running_var, num_batches_tracked,
                 input_scale, film_gamma, film_beta, payload, old, K, momentum, cumulative, eps,
                 relu);
  return {y, mean, invstd, planes, payload};
}

constexpr size_t kSyncArgs = 19;  // the schema's arguments: 11 tensors and 8 others

struct SyncMultiBn : public torch::autograd::Function<SyncMultiBn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const OptTensor& branch, const OptTensor& mix,
                               const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               const OptTensor& num_batches_tracked,
                               const OptTensor& input_scale, const OptTensor& film_gamma,
                               const OptTensor& film_beta, int64_t K, double momentum,
                               bool cumulative, double eps, bool relu, int64_t rank,
                               int64_t world, const std::string& group) {
    std::array<at::Tensor, 5> out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = sync_forward(x, branch, mix, weight, bias, running_mean, running_var,
                         num_batches_tracked, input_scale, film_gamma, film_beta, K, momentum,
                         cumulative, eps, relu, rank, world, group);
    }
    if (running_mean.has_value() && running_var.has_value()) {
      for (const OptTensor* t : {&running_mean, &running_var, &num_batches_tracked})
        if (t->has_value()) (*t)->unsafeGetTensorImpl()->bump_version();
    }
    const auto& [y, mean, invstd, planes, payload] = out;
    const std::array<at::Tensor, kBnTensors> args = {
        x, value(branch), value(mix), value(weight), value(bias), value(running_mean),
        value(running_var), value(num_batches_tracked), value(input_scale), value(film_gamma),
        value(film_beta)};
    const auto edge = edges_of(args);
    std::vector<int64_t> edges, dtypes;
    for (BnArg a : kGradArg) {
      edges.push_back(edge[a]);
      dtypes.push_back(int64_t(dtype_or_undefined(args[a])));
    }
    ctx->save_for_backward({x, args[kBranch], args[kMix], args[kWeight], args[kBias], mean,
                            invstd, planes, args[kScale], args[kGamma], args[kBeta], payload});
    ctx->saved_data["K"] = K;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["group"] = group;
    ctx->saved_data["edges"] = edges;
    ctx->saved_data["dtypes"] = dtypes;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto sums_op = op<SyncGradSumsSig>("fastrobust::sync_bn_grad_sums");
    static const auto dx_op = op<SyncDxSig>("fastrobust::sync_bn_dx");
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &mean = s[5], &invstd = s[6], &planes = s[7], &payload = s[11];
    const OptTensor branch = opt(s[1]), mix = opt(s[2]), weight = opt(s[3]), bias = opt(s[4]),
                    scale = opt(s[8]), gamma = opt(s[9]), beta = opt(s[10]);
    // The statistics' share of a second derivative would need differentiable all-reduces:
    // refuse rather than drop the term.
    TORCH_CHECK_NOT_IMPLEMENTED(
        !at::GradMode::is_enabled(),
        "sync_multi_batch_norm / sync_mixed_batch_norm: double backward (create_graph=True, "
        "e.g. a gradient penalty) is not supported through the synchronized BN; use "
        "sync_bn=False (per-rank statistics) for such losses");
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    const int64_t K = ctx->saved_data["K"].toInt();
    const bool relu = ctx->saved_data["relu"].toBool();
    std::array<bool, kNumBNGrads> needs{};
    for (int i = 0; i < kNumBNGrads; ++i)
      needs[i] = edges[i] >= 0 && ctx->needs_input_grad(size_t(edges[i]));
    const at::Tensor& dy = grads[0];
    variable_list result(kSyncArgs);
    if (!dy.defined()) return result;
    auto [local, parts, dweight, dbias] = sums_op.call(
        dy, x, branch, mix, weight, bias, mean, invstd, scale, gamma, beta, K, relu, needs);
    // the backward's one collective
    const auto sums = all_reduce(local, ctx->saved_data["group"].toStringRef());
    std::array<at::Tensor, kNumBNGrads> g{};
    g[kGradWeight] = dweight;
    g[kGradBias] = dbias;
    if (needs[kGradX] || needs[kGradMix] || needs[kGradScale] || needs[kGradGamma] ||
        needs[kGradBeta]) {
      std::tie(g[kGradX], g[kGradMix], g[kGradScale], g[kGradGamma], g[kGradBeta]) =
          dx_op.call(dy, x, branch, mix, weight, bias, mean, invstd, planes, scale, gamma, beta,
                     sums, parts, payload, K, relu, needs);
    }
    for (int i = 0; i < kNumBNGrads; ++i) {
      if (!needs[i]) continue;
      const auto dt = static_cast<at::ScalarType>(dtypes[i]);
      result[kGradArg[i]] = g[i].scalar_type() == dt ? g[i] : g[i].to(dt);
    }
    return result;
  }
};

at::Tensor sync_multi_bn_autograd(
    const at::Tensor& x, const OptTensor& branch, const OptTensor& mix, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& input_scale,
    const OptTensor& film_gamma, const OptTensor& film_beta, int64_t K, double momentum,
    bool cumulative, double eps, bool relu, int64_t rank, int64_t world,
    c10::string_view group_name) {
  checks::sync_multi_bn(x, branch, mix, weight, bias, running_mean, running_var,
                        num_batches_tracked, input_scale, film_gamma, film_beta, K, momentum,
                        cumulative, eps, rank, world);
  return SyncMultiBn::apply(x, branch, mix, weight, bias, running_mean, running_var,
                            num_batches_tracked, input_scale, film_gamma, film_beta, K,
                            momentum, cumulative, eps, relu, rank, world,
                            std::string(group_name))[0];
}

// Below autograd (inference mode, or a caller past the Autograd key): the same op calls, no
// node.
at::Tensor sync_multi_bn_plain(
    const at::Tensor& x, const OptTensor& branch, const OptTensor& mix, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& input_scale,
    const OptTensor& film_gamma, const OptTensor& film_beta, int64_t K, double momentum,
    bool cumulative, double eps, bool relu, int64_t rank, int64_t world,
    c10::string_view group_name) {
  checks::sync_multi_bn(x, branch, mix, weight, bias, running_mean, running_var,
                        num_batches_tracked, input_scale, film_gamma, film_beta, K, momentum,
                        cumulative, eps, rank, world);
  return sync_forward(x, branch, mix, weight, bias, running_mean, running_var,
                      num_batches_tracked, input_scale, film_gamma, film_beta, K, momentum,
                      cumulative, eps, relu, rank, world, std::string(group_name))[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrobust, Autograd, m) {
  m.impl("multi_bn", &multi_bn_autograd);
  m.impl("film", &film_autograd);
  m.impl("add_relu", &add_relu_autograd);
  m.impl("sync_multi_bn", &sync_multi_bn_autograd);
}

TORCH_LIBRARY_IMPL(fastrobust, CompositeExplicitAutograd, m) {
  m.impl("sync_multi_bn", &sync_multi_bn_plain);
}

}  // namespace fastrobust
