// add_relu: relu(a + b), equal shapes, dtypes and devices. Its schema, check, CPU kernel, the
// composite kernel of other devices (the two ATen ops), its autograd node and the CUDA launch
// path, all here; the Triton kernel is fastrobust/ops/add_relu/triton.py.
#include <torch/extension.h>

#include "../checks.h"
#include "../launch/cuda.h"

TORCH_LIBRARY_FRAGMENT(fastrobust, m) {
  m.def("add_relu(Tensor a, Tensor b) -> Tensor");
}

namespace fastrobust {
namespace checks {

inline void add_relu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
                        a.device() == b.device(),
                    "add_relu: a and b must have the same shape, dtype and device");
}

namespace {
void add_relu_boxed(const c10::FunctionSchema&, c10::ArrayRef<c10::IValue> a) {
  add_relu(a[0].toTensor(), a[1].toTensor());
}
FASTROBUST_CHECKS({"add_relu", &add_relu_boxed});
}  // namespace

}  // namespace checks

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor add_relu_cpu(const at::Tensor& a, const at::Tensor& b) {
  checks::add_relu(a, b);
  // ATen's one-pass _add_relu has CPU kernels for float and double only (bfloat16, as under
  // autocast, raised an internal assert): other dtypes take the two ops.
  if (a.scalar_type() != at::kFloat && a.scalar_type() != at::kDouble)
    return at::relu(at::add(a, b));
  return at::_add_relu(a, b);
}

at::Tensor add_relu_composite(const at::Tensor& a, const at::Tensor& b) {
  return at::relu(at::add(a, b));
}

// One pass forward; the backward is one masked pass serving both inputs.
struct AddRelu : public torch::autograd::Function<AddRelu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    checks::add_relu(a, b);
    static const auto fwd = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastrobust::add_relu", "")
                                .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
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

}  // namespace
}  // namespace fastrobust

TORCH_LIBRARY_IMPL(fastrobust, CPU, m) {
  m.impl("add_relu", &fastrobust::add_relu_cpu);
}

// add_relu on any other device: the two ATen ops.
TORCH_LIBRARY_IMPL(fastrobust, CompositeExplicitAutograd, m) {
  m.impl("add_relu", &fastrobust::add_relu_composite);
}

TORCH_LIBRARY_IMPL(fastrobust, Autograd, m) {
  m.impl("add_relu", &fastrobust::add_relu_autograd);
}

FASTROBUST_LAUNCH_ON_CUDA("add_relu");
