// fastrobust._C: the Python module of the extension. The ops themselves live one family per
// folder, each with its schemas, checks, kernels, autograd and registrations:
//
//   csrc/batch_norm/  multi_bn, multi_bn_backward, multi_bn_grads_with_graph, sync_bn_stats,
//                     sync_bn_apply, sync_bn_grad_sums, sync_bn_dx, sync_multi_bn
//   csrc/film/        film, film_backward
//   csrc/add_relu/    add_relu
//   csrc/pgd/         pgd_step, pgd_init, mifgsm_step
//
// Each op has one kernel per dispatch key and one autograd: CPU in C++ (the family's cpu.cpp),
// CUDA the Triton kernels launched from C++ (csrc/launch), other devices the eager kernels
// (fastrobust/ops/<family>/eager.py), and the Autograd key the family's C++ node. The fake
// (meta) implementations that torch.compile and opcheck trace with are in
// fastrobust/ops/<family>/schema.py, as is multi_bn_grads_with_graph's body (plain torch ops,
// so that a backward asked for with create_graph=True is itself differentiable).
#include <torch/extension.h>

#include <torch/csrc/jit/python/pybind_utils.h>

#include "checks.h"
#include "launch/plan_signature.h"
#include "spec.h"

namespace fastrobust::plans {
void register_python(pybind11::module& m);  // csrc/launch/plans.cpp
}

namespace {
// The launch-plan signature of a call of op `name` with `args` (csrc/launch/plans.cpp keys its
// plans by it; tests/test_plans.py checks what it tells apart).
pybind11::bytes plan_signature_of(const std::string& name, pybind11::args args) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
  const auto stack =
      torch::jit::createStackForSchema(op.schema(), args, pybind11::kwargs(), std::nullopt);
  return pybind11::bytes(fastrobust::plan_signature(op.schema().name(), stack));
}

// The argument checks of op `name` (csrc/<family>/checks.h, through csrc/checks.h
// check_boxed), for the kernels written in Python (eager, Triton) and the fake
// implementations.
void check_of(const std::string& name, pybind11::args args) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
  const auto stack =
      torch::jit::createStackForSchema(op.schema(), args, pybind11::kwargs(), std::nullopt);
  fastrobust::checks::check_boxed(op.schema(), stack);
}
}  // namespace

// Importing fastrobust._C loads this library, which registers every family's ops; the module
// itself carries the shared declarations of spec.h, the checks and signatures of any op for
// Python, and the launch plans' Python side.
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
