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
