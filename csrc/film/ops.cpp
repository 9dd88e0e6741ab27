// FiLM: y = gamma[n,c]·x + beta[n,c]. Its schemas, boxed checks and CUDA launch path; the CPU
// kernels in cpu.cpp, the autograd node in autograd.cpp, the Python kernels in
// fastrobust/ops/film/.
#include <torch/library.h>

#include "../launch/cuda.h"
#include "checks.h"

TORCH_LIBRARY_FRAGMENT(fastrobust, m) {
  // gamma and beta are each [N, C] (per sample) or [C] (per channel), either may be None.
  // film_backward returns (dx, dgamma, dbeta) for `needs` (spec.h: FilmGrad); `per_channel`
  // says which of gamma, beta are [C]: their gradients are then [C] (summed over the batch
  // inside the kernels), the others [N, C].
  m.def("film(Tensor x, Tensor? gamma, Tensor? beta) -> Tensor");
  m.def("film_backward(Tensor dy, Tensor x, Tensor? gamma, bool[3] needs, bool[2] per_channel) "
        "-> (Tensor, Tensor, Tensor)");
}

namespace fastrobust::checks {
namespace {

void film_boxed(const c10::FunctionSchema&, c10::ArrayRef<c10::IValue> a) {
  film(a[0].toTensor(), opt(a[1]), opt(a[2]));
}

void film_backward_boxed(const c10::FunctionSchema&, c10::ArrayRef<c10::IValue> a) {
  film_backward(a[0].toTensor(), a[1].toTensor(), opt(a[2]), bools(a[3]), bools(a[4]));
}

FASTROBUST_CHECKS({"film", &film_boxed}, {"film_backward", &film_backward_boxed});

}  // namespace
}  // namespace fastrobust::checks

FASTROBUST_LAUNCH_ON_CUDA("film", "film_backward");
