// FiLM's argument checks (schemas in ops.cpp), run first by every kernel of film and
// film_backward: the CPU ones (cpu.cpp), the CUDA key's launch path and the Python ones
// (through the boxed checks registered in ops.cpp).
#pragma once
#include "../checks.h"

namespace fastrobust::checks {

inline void film_coefficient(const char* op, const char* name, const OptTensor& t,
                             const at::Tensor& x) {
  if (!t) return;
  float_on(op, name, *t, x);
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({N, C}) || t->sizes() == at::IntArrayRef({C}),
                    op, ": ", name, " must have shape [N, C] = ", shape_of({N, C}),
                    " or [C] = ", shape_of({C}), ", got ", shape_of(t->sizes()));
}

inline void film(const at::Tensor& x, const OptTensor& gamma, const OptTensor& beta) {
  x_of("film", x);
  film_coefficient("film", "gamma", gamma, x);
  film_coefficient("film", "beta", beta, x);
}

inline void film_backward(const at::Tensor& dy, const at::Tensor& x, const OptTensor& gamma,
                          c10::ArrayRef<bool> needs, c10::ArrayRef<bool> per_channel) {
  x_of("film", x);
  float_on("film", "dy (the gradient of y)", dy, x);
  shape_is("film", "dy (the gradient of y)", dy, x.sizes(), "x's");
  film_coefficient("film", "gamma", gamma, x);
  TORCH_CHECK_VALUE(needs.size() == 3 && per_channel.size() == 2,
                    "film: needs must have 3 flags and per_channel 2");
  TORCH_CHECK(!gamma || (gamma->dim() == 1) == per_channel[0],  // (RuntimeError, as before)
              "film: per_channel[0] must say whether gamma is [C]");
}

}  // namespace fastrobust::checks
