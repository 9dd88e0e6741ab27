// CPU kernels of multi_batch_norm; Python registers them as the "cpu" backend of
// torch.ops.fastrobust.multi_bn_fwd / multi_bn_bwd (fastrobust/_ops.py).
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastrobust::cpu {

// Returns {y, mean, invstd, new_running_mean, new_running_var, new_num_batches_tracked}.
// mean/invstd are [K, C], the statistics y was normalized with (batch statistics in training,
// running statistics in eval). The inputs are not modified: in training the updated running
// stats come back as new tensors (empty when there is nothing to update).
std::vector<at::Tensor> multi_bn_forward(const at::Tensor& x, const at::Tensor& branch,
                                         const c10::optional<at::Tensor>& weight,
                                         const c10::optional<at::Tensor>& bias,
                                         const c10::optional<at::Tensor>& running_mean,
                                         const c10::optional<at::Tensor>& running_var,
                                         const c10::optional<at::Tensor>& num_batches_tracked,
                                         int64_t num_branches, bool training, double momentum,
                                         bool cumulative, double eps);

// Returns {dx, dweight, dbias}; dweight/dbias are [K, C], or [0, C] when not requested.
std::vector<at::Tensor> multi_bn_backward(const at::Tensor& dy, const at::Tensor& x,
                                          const at::Tensor& branch,
                                          const c10::optional<at::Tensor>& weight,
                                          const at::Tensor& mean, const at::Tensor& invstd,
                                          int64_t num_branches, bool batch_stats,
                                          bool need_param_grads);

}  // namespace fastrobust::cpu
