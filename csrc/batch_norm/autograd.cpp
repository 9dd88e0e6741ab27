// The autograd of the BN family, registered for the Autograd key: eager calls, torch.compile's
// traced graphs and opcheck all go through these nodes, whatever kernel (CPU C++, Triton,
// eager) serves the device below them. Forward and backward call the registered ops through
// the dispatcher (call_bn), so the backward of a CUDA call runs the CUDA kernel and a traced
// backward records the backward ops.
//
//   op              forward                                  backward
//   multi_bn        multi_bn                                 multi_bn_backward
//   sync_multi_bn   sync_bn_stats → all-reduce →             sync_bn_grad_sums → all-reduce →
//                   sync_bn_apply                            sync_bn_dx
//
// The synchronized BN's all-reduce is torch's functional collective (_c10d_functional::
// all_reduce_ and wait_tensor, through the dispatcher) on the process group named by the op's
// group_name: one forward, one backward, nothing read on the host.
//
// When grad mode is on during the backward (torch.autograd.grad(..., create_graph=True): a
// gradient penalty), the gradients must themselves be differentiable: multi_bn's node then
// calls multi_bn_grads_with_graph (plain torch ops, fastrobust/ops/batch_norm/schema.py). The
// synchronized BN refuses it (its statistics' share would need differentiable all-reduces): it
// raises rather than drop that term.
//
// A node's inputs are the call's defined tensors (BnArgs::tensors, one edge each) and the
// BnArgs itself; the backward reads what the forward saved back into a BnArgs.
#include <torch/extension.h>

#include "../spec.h"
#include "args.h"
#include "checks.h"

namespace fastrobust::bn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The running statistics were written in place below the ADInplaceOrView key: bump their
// version counters as an in-place op would.
void bump_running(const BnArgs& a) {
  if (!a.running_mean || !a.running_var) return;
  for (const OptTensor* t : {&a.running_mean, &a.running_var, &a.num_batches_tracked})
    if (t->has_value()) (*t)->unsafeGetTensorImpl()->bump_version();
}

// Saves what the backward reads: a's tensors (but the running statistics, which the op
// writes, and which no gradient reads), its scalars, and for each BNGrad its input's edge
// (its position among a.tensors(), or -1) and dtype.
void save_args(AutogradContext* ctx, const BnArgs& a) {
  std::vector<int64_t> edges(kNumBNGrads, -1), dtypes(kNumBNGrads, -1);
  int64_t edge = 0;
  a.for_each_tensor([&](const char* name, const at::Tensor& t) {
    for (int g = 0; g < kNumBNGrads; ++g)
      if (std::string(name) == kBNGradNames[g]) {
        edges[g] = edge;
        dtypes[g] = int64_t(t.scalar_type());
      }
    ++edge;
  });
  std::vector<at::Tensor> tensors;
  c10::List<std::string> names;
  a.for_each_tensor([&](const char* name, const at::Tensor& t) {
    const std::string n(name);
    if (n == "running_mean" || n == "running_var" || n == "num_batches_tracked") return;
    tensors.push_back(t);
    names.push_back(name);
  });
  ctx->save_for_backward(tensors);
  ctx->saved_data["tensors"] = names;
  ctx->saved_data["edges"] = edges;
  ctx->saved_data["dtypes"] = dtypes;
  ctx->saved_data["num_branches"] = a.num_branches;
  ctx->saved_data["batch_stats"] = a.batch_stats;
  ctx->saved_data["eps"] = a.eps;
  ctx->saved_data["relu"] = a.relu;
  ctx->saved_data["group_name"] = a.group_name;
}

// The saved arguments, with the output's gradient as dy and needs from the edges that want a
// gradient.
BnArgs saved_args(AutogradContext* ctx, const at::Tensor& dy) {
  BnArgs a;
  const auto tensors = ctx->get_saved_variables();
  const auto names = ctx->saved_data["tensors"].toList();
  for (size_t i = 0; i < tensors.size(); ++i) a.set_tensor(names.get(i).toStringRef(), tensors[i]);
  a.num_branches = ctx->saved_data["num_branches"].toInt();
  a.batch_stats = ctx->saved_data["batch_stats"].toBool();
  a.eps = ctx->saved_data["eps"].toDouble();
  a.relu = ctx->saved_data["relu"].toBool();
  a.group_name = ctx->saved_data["group_name"].toStringRef();
  a.dy = dy;
  const auto edges = ctx->saved_data["edges"].toIntVector();
  for (int g = 0; g < kNumBNGrads; ++g)
    a.needs.push_back(edges[g] >= 0 && ctx->needs_input_grad(size_t(edges[g])));
  return a;
}

// The node's gradients: g[i] (a BNGrad) at its input's edge, in that input's dtype; one more
// (undefined) for the BnArgs argument.
variable_list gradients(AutogradContext* ctx, const BnArgs& a, const std::vector<at::Tensor>& g,
                        size_t n_inputs) {
  const auto edges = ctx->saved_data["edges"].toIntVector();
  const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
  variable_list result(n_inputs + 1);
  for (int i = 0; i < kNumBNGrads; ++i) {
    if (!a.need(i)) continue;
    const auto dt = static_cast<at::ScalarType>(dtypes[i]);
    result[edges[i]] = g[i].scalar_type() == dt ? g[i] : g[i].to(dt);
  }
  return result;
}

// --- multi_bn -------------------------------------------------------------------------------

struct MultiBn : public torch::autograd::Function<MultiBn> {
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, const BnArgs& a) {
    std::vector<at::Tensor> out;  // y, mean, invstd, planes
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = call_bn("fastrobust::multi_bn", a);
    }
    if (a.training) bump_running(a);
    BnArgs saved = a;
    saved.mean = out[1], saved.invstd = out[2], saved.planes = out[3];
    saved.batch_stats = a.training || !a.running_mean.has_value();
    save_args(ctx, saved);
    ctx->saved_data["inputs"] = int64_t(inputs.size());
    ctx->mark_non_differentiable({out[1], out[2], out[3]});
    // The statistics get no gradient: leaving their grads undefined (instead of zeros)
    // spares three fills per backward.
    ctx->set_materialize_grads(false);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const size_t n_inputs = size_t(ctx->saved_data["inputs"].toInt());
    // The gradient of y itself; grads of the statistics are ignored (not differentiable).
    if (!grads[0].defined()) return variable_list(n_inputs + 1);
    const BnArgs a = saved_args(ctx, grads[0]);
    const auto g = call_bn(at::GradMode::is_enabled() ? "fastrobust::multi_bn_grads_with_graph"
                                                      : "fastrobust::multi_bn_backward",
                           a);
    return gradients(ctx, a, g, n_inputs);
  }
};

std::vector<at::Tensor> multi_bn_autograd(const BnArgs& a) {
  const auto inputs = a.tensors();
  return MultiBn::apply(at::TensorList(inputs), a);
}

// --- sync_multi_bn: the synchronized BN (fastrobust.distributed) ----------------------------

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

// The forward's op calls: stats, all-reduce, apply. Returns a with y's statistics filled in
// (mean, invstd, planes, payload) and y.
std::pair<at::Tensor, BnArgs> sync_forward(const BnArgs& a) {
  BnArgs stats = a;
  if (!a.running_mean) stats.num_batches_tracked = c10::nullopt;
  const auto local = call_bn("fastrobust::sync_bn_stats", stats);  // payload, planes, old
  BnArgs out = a;
  out.payload = all_reduce(local[0], a.group_name);  // the forward's one collective
  out.planes = local[1];
  out.old = local[2];
  const auto r = call_bn("fastrobust::sync_bn_apply", out);  // y, mean, invstd
  out.mean = r[1], out.invstd = r[2];
  return {r[0], out};
}

struct SyncMultiBn : public torch::autograd::Function<SyncMultiBn> {
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, const BnArgs& a) {
    std::pair<at::Tensor, BnArgs> out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = sync_forward(a);
    }
    bump_running(a);
    out.second.old = at::Tensor();  // (not read by the backward)
    save_args(ctx, out.second);
    ctx->saved_data["inputs"] = int64_t(inputs.size());
    return {out.first};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The statistics' share of a second derivative would need differentiable all-reduces:
    // refuse rather than drop the term.
    TORCH_CHECK_NOT_IMPLEMENTED(
        !at::GradMode::is_enabled(),
        "sync_multi_batch_norm / sync_mixed_batch_norm: double backward (create_graph=True, "
        "e.g. a gradient penalty) is not supported through the synchronized BN; use "
        "sync_bn=False (per-rank statistics) for such losses");
    const size_t n_inputs = size_t(ctx->saved_data["inputs"].toInt());
    if (!grads[0].defined()) return variable_list(n_inputs + 1);
    BnArgs a = saved_args(ctx, grads[0]);
    const auto local = call_bn("fastrobust::sync_bn_grad_sums", a);  // sums, parts, dw, db
    a.sums = all_reduce(local[0], a.group_name);  // the backward's one collective
    a.parts = local[1];
    std::vector<at::Tensor> g(kNumBNGrads);
    g[kGradWeight] = local[2];
    g[kGradBias] = local[3];
    if (a.need(kGradX) || a.need(kGradMix) || a.need(kGradScale) || a.need(kGradGamma) ||
        a.need(kGradBeta)) {
      const auto d = call_bn("fastrobust::sync_bn_dx", a);
      g[kGradX] = d[0], g[kGradMix] = d[1], g[kGradScale] = d[2], g[kGradGamma] = d[3];
      g[kGradBeta] = d[4];
    }
    return gradients(ctx, a, g, n_inputs);
  }
};

std::vector<at::Tensor> sync_multi_bn_autograd(const BnArgs& a) {
  checks::sync_multi_bn(a);
  const auto inputs = a.tensors();
  return SyncMultiBn::apply(at::TensorList(inputs), a);
}

// Below autograd (inference mode, or a caller past the Autograd key): the same op calls, no
// node.
std::vector<at::Tensor> sync_multi_bn_plain(const BnArgs& a) {
  checks::sync_multi_bn(a);
  return {sync_forward(a).first};
}

}  // namespace
}  // namespace fastrobust::bn

TORCH_LIBRARY_IMPL(fastrobust, Autograd, m) {
  using namespace fastrobust::bn;
  m.impl("multi_bn", torch::CppFunction::makeFromBoxedFunction<&boxed<&multi_bn_autograd>>());
  m.impl("sync_multi_bn",
         torch::CppFunction::makeFromBoxedFunction<&boxed<&sync_multi_bn_autograd>>());
}

TORCH_LIBRARY_IMPL(fastrobust, CompositeExplicitAutograd, m) {
  using namespace fastrobust::bn;
  m.impl("sync_multi_bn",
         torch::CppFunction::makeFromBoxedFunction<&boxed<&sync_multi_bn_plain>>());
}
