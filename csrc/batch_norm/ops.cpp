// The BN family's ops: routed (branch) / soft-mixed (mix) batch norm with the fused input
// scale, FiLM and ReLU, its backward, and the synchronized BN's halves. Here: their schemas,
// their boxed checks, the CPU kernels of multi_bn and multi_bn_backward (dtype handling around
// cpu.cpp's kernels) and the CUDA key's launch path. The synchronized halves' CPU kernels are
// in sync_cpu.cpp, the autograd nodes of multi_bn and sync_multi_bn in autograd.cpp. Every
// kernel reads its call into one BnArgs (args.h).
#include <torch/library.h>

#include "../accumulate.h"
#include "../launch/cuda.h"
#include "checks.h"
#include "cpu.h"

TORCH_LIBRARY_FRAGMENT(fastrobust, m) {
  // Routed (branch: int64 [N]) or soft-mixed (mix: float [N, K]) batch norm with the fused
  // input scale, FiLM and ReLU; exactly one of branch and mix. In training the running stats
  // (and num_batches_tracked) are updated in place. Returns (y, mean, invstd, planes): the
  // [K, C] statistics y was normalized with, and x's per-plane mean and M2 [2, N, C] for a
  // mixed call with batch statistics (empty otherwise).
  m.def("multi_bn(Tensor x, Tensor? branch, Tensor? mix, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "Tensor? input_scale, Tensor? film_gamma, Tensor? film_beta, int num_branches, "
        "bool training, float momentum, bool cumulative, float eps, bool relu) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // The gradients (x, mix, weight, bias, input_scale, film_gamma, film_beta) asked for in
  // `needs` (spec.h: BNGrad); the others come back empty. Parameter gradients are in the
  // statistics' dtype.
  m.def("multi_bn_backward(Tensor dy, Tensor x, Tensor? branch, Tensor? mix, Tensor? weight, "
        "Tensor? bias, Tensor mean, Tensor invstd, Tensor planes, Tensor? input_scale, "
        "Tensor? film_gamma, Tensor? film_beta, int num_branches, bool batch_stats, bool relu, "
        "bool[7] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same gradients as differentiable torch ops (the backward under create_graph=True;
  // its body is fastrobust/ops/batch_norm/schema.py's).
  m.def("multi_bn_grads_with_graph(Tensor dy, Tensor x, Tensor? branch, Tensor? mix, "
        "Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, Tensor? input_scale, "
        "Tensor? film_gamma, Tensor? film_beta, int num_branches, bool batch_stats, float eps, "
        "bool relu, bool[7] needs) -> Tensor[]");
  // The synchronized BN's halves (each rank runs them; the all-reduces are sync_multi_bn's).
  // sync_bn_stats: this rank's per-(k, c) count and sums of u = input_scale·x about a centre,
  // in fp64, in row `rank` of payload [world_size, K + 3·K·C] = [count K | centre K·C |
  // R K·C | Q K·C] per row (R = Σ(u − centre), Q = Σ(u − centre)²), zeros in the other rows
  // (the all-reduce then gathers them); planes as multi_bn's; old: num_batches_tracked before
  // this call in the statistics' dtype ([K], cumulative calls with a counter; else empty).
  m.def("sync_bn_stats(Tensor x, Tensor? branch, Tensor? mix, Tensor? input_scale, "
        "Tensor? num_batches_tracked, int num_branches, bool cumulative, int rank, "
        "int world_size) -> (Tensor payload, Tensor planes, Tensor old)");
  // sync_bn_apply: the ranks' rows of the all-reduced payload merged exactly (Chan's update)
  // to the global statistics, y normalized with them (BN·FiLM·ReLU), the running statistics
  // updated in place from them. Returns (y, mean, invstd) as multi_bn's.
  m.def("sync_bn_apply(Tensor x, Tensor? branch, Tensor? mix, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "Tensor? input_scale, Tensor? film_gamma, Tensor? film_beta, Tensor payload, "
        "Tensor old, int num_branches, float momentum, bool cumulative, float eps, bool relu) "
        "-> (Tensor y, Tensor mean, Tensor invstd)");
  // sync_bn_grad_sums: this rank's T1 = Σ M·dz, T2 = Σ M·dz·x̂ (sums [2, K, C], to be
  // all-reduced; dweight, dbias: this rank's own, for needs[2], needs[3]) and `parts`, the
  // per-plane partial sums an implementation's sync_bn_dx reads (the Triton kernels'
  // [2 or 4, splits, N, C]; empty from the others, whose sync_bn_dx recomputes them).
  m.def("sync_bn_grad_sums(Tensor dy, Tensor x, Tensor? branch, Tensor? mix, Tensor? weight, "
        "Tensor? bias, Tensor mean, Tensor invstd, Tensor? input_scale, Tensor? film_gamma, "
        "Tensor? film_beta, int num_branches, bool relu, bool[7] needs) "
        "-> (Tensor sums, Tensor parts, Tensor dweight, Tensor dbias)");
  // sync_bn_dx: dx, dmix, dinput_scale, dfilm_gamma, dfilm_beta (for needs; empty otherwise)
  // from the all-reduced sums and the forward's all-reduced payload.
  m.def("sync_bn_dx(Tensor dy, Tensor x, Tensor? branch, Tensor? mix, Tensor? weight, "
        "Tensor? bias, Tensor mean, Tensor invstd, Tensor planes, Tensor? input_scale, "
        "Tensor? film_gamma, Tensor? film_beta, Tensor sums, Tensor parts, Tensor payload, "
        "int num_branches, bool relu, bool[7] needs) "
        "-> (Tensor dx, Tensor dmix, Tensor dinput_scale, Tensor dfilm_gamma, "
        "Tensor dfilm_beta)");
  // The synchronized BN in training: statistics over every rank of the process group named
  // group_name (this process is `rank` of `world_size`); y, with the running stats updated
  // in place. One all-reduce forward, one backward; differentiable in x, mix, weight, bias
  // and the extras (first derivatives only).
  m.def("sync_multi_bn(Tensor x, Tensor? branch, Tensor? mix, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "Tensor? input_scale, Tensor? film_gamma, Tensor? film_beta, int num_branches, "
        "float momentum, bool cumulative, float eps, bool relu, int rank, int world_size, "
        "str group_name) -> Tensor");
}

namespace fastrobust::bn {
namespace {

// The boxed checks of each op, on the call's BnArgs.
template <void (*check)(const BnArgs&)>
void checked(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> a) {
  check(BnArgs::read(schema, a));
}

FASTROBUST_CHECKS({"multi_bn", &checked<&checks::multi_bn>},
                  {"multi_bn_backward", &checked<&checks::multi_bn_backward>},
                  {"sync_bn_stats", &checked<&checks::sync_bn_stats>},
                  {"sync_bn_apply", &checked<&checks::sync_bn_apply>},
                  {"sync_bn_grad_sums", &checked<&checks::sync_bn_grad_sums>},
                  {"sync_bn_dx", &checked<&checks::sync_bn_dx>},
                  {"sync_multi_bn", &checked<&checks::sync_multi_bn>});

// The floating operands the CPU kernels read in x's dtype.
constexpr OptTensor BnArgs::*kOperands[] = {
    &BnArgs::mix,         &BnArgs::weight,     &BnArgs::bias,     &BnArgs::running_mean,
    &BnArgs::running_var, &BnArgs::input_scale, &BnArgs::film_gamma, &BnArgs::film_beta};
constexpr at::Tensor BnArgs::*kGradOperands[] = {&BnArgs::dy, &BnArgs::mean, &BnArgs::invstd,
                                                 &BnArgs::planes};

bool native(const BnArgs& a) {
  if (!native_dtypes(a.x, {})) return false;
  for (auto f : kOperands)
    if ((a.*f).has_value() && (a.*f)->scalar_type() != a.x.scalar_type()) return false;
  for (auto f : {&BnArgs::dy, &BnArgs::mean})
    if ((a.*f).defined() && (a.*f).scalar_type() != a.x.scalar_type()) return false;
  return true;
}

// a with x and every floating operand in dtype dt (the accumulation dtype).
BnArgs in_acc_dtype(const BnArgs& a) {
  const auto dt = acc_dtype(a.x);
  BnArgs c = a;
  c.x = a.x.to(dt);
  for (auto f : kOperands) c.*f = in_dtype(a.*f, dt);
  for (auto f : kGradOperands)
    if ((a.*f).defined()) c.*f = (a.*f).to(dt);
  return c;
}

std::vector<at::Tensor> multi_bn_cpu(const BnArgs& a) {
  checks::multi_bn(a);
  std::vector<at::Tensor> out;
  if (native(a)) {
    out = cpu::multi_bn_forward(a);
  } else {
    const BnArgs c = in_acc_dtype(a);
    out = cpu::multi_bn_forward(c);
    if (a.training && c.running_mean && c.running_var) {  // back into the caller's buffers
      if (!c.running_mean->is_same(*a.running_mean)) a.running_mean->copy_(*c.running_mean);
      if (!c.running_var->is_same(*a.running_var)) a.running_var->copy_(*c.running_var);
    }
    out[0] = out[0].to(a.x.scalar_type());
  }
  if (!out[3].defined()) out[3] = out[1].new_empty({0});  // (outputs must not alias)
  return out;
}

std::vector<at::Tensor> multi_bn_backward_cpu(const BnArgs& a) {
  checks::multi_bn_backward(a);
  const bool is_native = native(a);
  const BnArgs c = is_native ? a : in_acc_dtype(a);
  auto g = cpu::multi_bn_backward(c);
  for (auto& t : g)  // fresh empties: outputs must not alias
    if (!t.defined()) t = c.x.new_empty({0});
  if (!is_native && a.need(kGradX)) g[kGradX] = g[kGradX].to(a.x.scalar_type());
  return g;
}

}  // namespace
}  // namespace fastrobust::bn

TORCH_LIBRARY_IMPL(fastrobust, CPU, m) {
  using namespace fastrobust::bn;
  m.impl("multi_bn", torch::CppFunction::makeFromBoxedFunction<&boxed<&multi_bn_cpu>>());
  m.impl("multi_bn_backward",
         torch::CppFunction::makeFromBoxedFunction<&boxed<&multi_bn_backward_cpu>>());
}

FASTROBUST_LAUNCH_ON_CUDA("multi_bn", "multi_bn_backward", "sync_bn_stats", "sync_bn_apply",
                          "sync_bn_grad_sums", "sync_bn_dx");
