// The fastrobust ops: every schema, defined once. Each op has one implementation per dispatch
// key and one autograd:
//
//   schema (here)        CPU (C++)          CUDA                 other devices    Autograd
//   multi_bn             cpu/register.cpp   plans.cpp            backends/eager   autograd.cpp
//   multi_bn_backward    cpu/register.cpp   plans.cpp            backends/eager   -
//   film, film_backward  cpu/register.cpp   plans.cpp            backends/eager   autograd.cpp
//   add_relu             cpu/register.cpp   plans.cpp            (composite)      autograd.cpp
//   pgd_step, pgd_init,  cpu/register.cpp   plans.cpp            backends/eager   (no grad)
//   mifgsm_step
//   sync_bn_stats,       cpu/sync_bn.cpp    plans.cpp            backends/eager   -
//   sync_bn_apply,
//   sync_bn_grad_sums,
//   sync_bn_dx
//   sync_multi_bn        autograd.cpp (composite: the four above around two all-reduces)
//
// The synchronized BN (fastrobust.distributed) is one registered op, sync_multi_bn, whose
// Autograd kernel (autograd.cpp) calls sync_bn_stats → all-reduce → sync_bn_apply forward and
// sync_bn_grad_sums → all-reduce → sync_bn_dx backward through the dispatcher; the all-reduce
// is torch's functional collective (_c10d_functional::all_reduce_ + wait_tensor) on the group
// named by group_name. So on CUDA its four halves take the launch plans like every other op.
//
// On CUDA, plans.cpp launches the Triton kernels (fastrobust/kernels) from C++, replaying what
// their Python launchers did the first time they saw a call signature.
//
// The fake (meta) implementations that torch.compile and opcheck trace with live in
// fastrobust/_ops.py, as does multi_bn_grads_with_graph's body (plain torch ops, so that a
// backward asked for with create_graph=True is itself differentiable).
#include <torch/extension.h>

#include <torch/csrc/jit/python/pybind_utils.h>

#include "checks.h"
#include "plan_signature.h"
#include "spec.h"

namespace fastrobust::plans {
void register_python(pybind11::module& m);  // csrc/plans.cpp: the CUDA launch path
}

TORCH_LIBRARY(fastrobust, m) {
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
  // The same gradients as differentiable torch ops (the backward under create_graph=True).
  m.def("multi_bn_grads_with_graph(Tensor dy, Tensor x, Tensor? branch, Tensor? mix, "
        "Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, Tensor? input_scale, "
        "Tensor? film_gamma, Tensor? film_beta, int num_branches, bool batch_stats, float eps, "
        "bool relu, bool[7] needs) -> Tensor[]");
  // y = gamma[n,c]·x + beta[n,c]; gamma and beta are each [N, C] (per sample) or [C] (per
  // channel), either may be None. film_backward returns (dx, dgamma, dbeta) for `needs`
  // (spec.h: FilmGrad); `per_channel` says which of gamma, beta are [C]: their gradients are
  // then [C] (summed over the batch inside the kernels), the others [N, C].
  m.def("film(Tensor x, Tensor? gamma, Tensor? beta) -> Tensor");
  m.def("film_backward(Tensor dy, Tensor x, Tensor? gamma, bool[3] needs, bool[2] per_channel) "
        "-> (Tensor, Tensor, Tensor)");
  // relu(a + b), equal shapes, dtypes and devices.
  m.def("add_relu(Tensor a, Tensor b) -> Tensor");
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
  // The PGD family, in place (no autograd: attack steps run under no_grad).
  m.def("pgd_step(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, Tensor? eps_t, float eps, "
        "Tensor? alpha_t, float alpha, bool l2, float clip_min, float clip_max) -> ()");
  m.def("pgd_init(Tensor(a!) noise, Tensor x_nat, Tensor? eps_t, float eps, Tensor? radius, "
        "bool l2, float clip_min, float clip_max) -> ()");
  m.def("mifgsm_step(Tensor(a!) x_adv, Tensor grad, Tensor(b!) momentum, Tensor x_nat, "
        "Tensor? eps_t, float eps, Tensor? alpha_t, float alpha, float decay, float clip_min, "
        "float clip_max) -> ()");
}

namespace {
// The launch-plan signature of a call of op `name` with `args` (csrc/cuda/plans.cpp keys its
// plans by it; tests/test_plans.py checks what it tells apart).
pybind11::bytes plan_signature_of(const std::string& name, pybind11::args args) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
  const auto stack =
      torch::jit::createStackForSchema(op.schema(), args, pybind11::kwargs(), std::nullopt);
  return pybind11::bytes(fastrobust::plan_signature(op.schema().name(), stack));
}

// The argument checks of op `name` (csrc/checks.h), for the kernels written in Python (eager,
// Triton) and the fake implementations.
void check_of(const std::string& name, pybind11::args args) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
  const auto stack =
      torch::jit::createStackForSchema(op.schema(), args, pybind11::kwargs(), std::nullopt);
  fastrobust::checks::check_boxed(name.substr(name.find("::") + 2), stack);
}
}  // namespace

// Importing fastrobust._C loads this library, which registers the ops above; the module
// itself only carries the shared declarations of spec.h.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrobust: the op schemas and their C++ kernels (torch.ops.fastrobust)";
  pybind11::tuple grads(size_t(fastrobust::kNumBNGrads));
  for (size_t i = 0; i < size_t(fastrobust::kNumBNGrads); ++i)
    grads[i] = pybind11::str(fastrobust::kBNGradNames[i]);
  m.attr("BN_GRADS") = grads;
  pybind11::dict modes;
  for (int i = 0; i < 3; ++i) modes[fastrobust::kPgdModeNames[i]] = i;
  m.attr("PGD_MODES") = modes;
  m.def("_plan_signature", &plan_signature_of);
  m.def("_check", &check_of);
  fastrobust::plans::register_python(m);  // the launch plans (CUDA_LAUNCH_PATH: built for CUDA)
}
