// The accumulation dtype of every fastrobust op, written once for C++: sums, statistics and
// parameter gradients are kept in float32, or in float64 when x is float64. The CPU kernels
// run natively when x is float32 or float64 and every other floating operand has x's dtype;
// any other combination (float16 / bfloat16 activations, float32 parameters with float64 x,
// ...) is computed in the accumulation dtype and the outputs cast back, as the eager backend
// (fastrobust/ops/_common.py acc_dtype) does.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>

namespace fastrobust {

inline at::ScalarType acc_dtype(at::ScalarType x) {
  return x == at::kDouble ? at::kDouble : at::kFloat;
}
inline at::ScalarType acc_dtype(const at::Tensor& x) { return acc_dtype(x.scalar_type()); }

// Whether a CPU kernel can take the operands as they are: x float32 or float64, and every
// given floating tensor in x's dtype.
inline bool native_dtypes(const at::Tensor& x,
                          std::initializer_list<const c10::optional<at::Tensor>*> ts) {
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  for (const auto* t : ts)
    if (t->has_value() && (*t)->scalar_type() != x.scalar_type()) return false;
  return true;
}

// t in dtype `dt` (None stays None).
inline c10::optional<at::Tensor> in_dtype(const c10::optional<at::Tensor>& t,
                                          at::ScalarType dt) {
  return t.has_value() ? c10::optional<at::Tensor>(t->to(dt)) : t;
}

}  // namespace fastrobust
