// The PGD family: pgd_step, pgd_init and mifgsm_step, in place (no autograd: attack steps run
// under no_grad). Their schemas, checks and CUDA launch path are registered here; the CPU
// kernels in cpu.cpp; the Python kernels in fastrobust/ops/pgd/.
#include <torch/library.h>

#include "../launch/cuda.h"
#include "checks.h"

TORCH_LIBRARY_FRAGMENT(fastrobust, m) {
  m.def("pgd_step(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, Tensor? eps_t, float eps, "
        "Tensor? alpha_t, float alpha, bool l2, float clip_min, float clip_max) -> ()");
  m.def("pgd_init(Tensor(a!) noise, Tensor x_nat, Tensor? eps_t, float eps, Tensor? radius, "
        "bool l2, float clip_min, float clip_max) -> ()");
  m.def("mifgsm_step(Tensor(a!) x_adv, Tensor grad, Tensor(b!) momentum, Tensor x_nat, "
        "Tensor? eps_t, float eps, Tensor? alpha_t, float alpha, float decay, float clip_min, "
        "float clip_max) -> ()");
}

namespace fastrobust::checks {
namespace {

void pgd_step_boxed(const c10::FunctionSchema&, c10::ArrayRef<c10::IValue> a) {
  pgd_step(a[0].toTensor(), a[1].toTensor(), a[2].toTensor(), opt(a[3]), a[4].toDouble(),
           opt(a[5]), a[6].toDouble(), a[8].toDouble(), a[9].toDouble());
}

void pgd_init_boxed(const c10::FunctionSchema&, c10::ArrayRef<c10::IValue> a) {
  pgd_init(a[0].toTensor(), a[1].toTensor(), opt(a[2]), a[3].toDouble(), opt(a[4]),
           a[5].toBool(), a[6].toDouble(), a[7].toDouble());
}

void mifgsm_step_boxed(const c10::FunctionSchema&, c10::ArrayRef<c10::IValue> a) {
  mifgsm_step(a[0].toTensor(), a[1].toTensor(), a[2].toTensor(), a[3].toTensor(), opt(a[4]),
              a[5].toDouble(), opt(a[6]), a[7].toDouble(), a[8].toDouble(), a[9].toDouble(),
              a[10].toDouble());
}

FASTROBUST_CHECKS({"pgd_step", &pgd_step_boxed}, {"pgd_init", &pgd_init_boxed},
                  {"mifgsm_step", &mifgsm_step_boxed});

}  // namespace
}  // namespace fastrobust::checks

FASTROBUST_LAUNCH_ON_CUDA("pgd_step", "pgd_init", "mifgsm_step");
