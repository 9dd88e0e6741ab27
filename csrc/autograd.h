// The eager C++ autograd path of the routed / mixed batch norm (see autograd.cpp).
#pragma once
#include <torch/extension.h>

namespace fastrobust {

// y of multi_batch_norm (mixed = false, route = int64 branch [N]) or mixed_batch_norm
// (mixed = true, route = float mix [N, K]), attached to autograd by a C++ node; in training the
// running stats (and num_batches_tracked) are updated in place. Arguments as in
// fastrobust::cpu::bn_forward.
at::Tensor bn_autograd(const at::Tensor& x, const at::Tensor& route,
                       const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& running_mean,
                       const c10::optional<at::Tensor>& running_var,
                       const c10::optional<at::Tensor>& num_batches_tracked,
                       const c10::optional<at::Tensor>& input_scale,
                       const c10::optional<at::Tensor>& film_gamma,
                       const c10::optional<at::Tensor>& film_beta, int64_t num_branches,
                       bool training, double momentum, bool cumulative, double eps, bool relu,
                       bool mixed);

// relu(a + b) for equal-shape a, b with a C++ autograd node (one pass each way).
at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b);

}  // namespace fastrobust
