// CPU kernels of the per-sample affine family (routed BN, mixed BN, their fused input scale /
// FiLM / ReLU, and FiLM itself): the CPU implementation of torch.ops.fastrobust.{multi_bn,
// multi_bn_backward, film, film_backward} (registered in csrc/cpu/register.cpp). The argument
// order is the ops' schema (csrc/ops.cpp) and that of fastrobust._engine.Engine, the eager
// twin. They take x's dtype (float32/float64) for every floating tensor; register.cpp
// converts other dtypes.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastrobust::cpu {

using OptTensor = c10::optional<at::Tensor>;

// Exactly one of branch (int64 [N], routed) and mix (float [N, K], mixed) is given.
// Returns {y, mean, invstd, new_running_mean, new_running_var, new_num_batches_tracked,
// plane_moments}: mean/invstd [K, C] are the statistics used; the op is functional, so the
// updated running stats come back as new tensors (empty when nothing is updated);
// plane_moments is x's per-plane mean and M2 [2, N, C] for a mixed op with batch statistics
// (the mix gradient needs them), else empty.
std::vector<at::Tensor> bn_forward(const at::Tensor& x, const OptTensor& branch,
                                   const OptTensor& mix, const OptTensor& weight,
                                   const OptTensor& bias, const OptTensor& running_mean,
                                   const OptTensor& running_var,
                                   const OptTensor& num_batches_tracked,
                                   const OptTensor& input_scale, const OptTensor& film_gamma,
                                   const OptTensor& film_beta, int64_t num_branches,
                                   bool training, double momentum, bool cumulative, double eps,
                                   bool relu);

// needs = (x, mix, weight, bias, input_scale, film_gamma, film_beta). Returns
// {dx, dmix, dweight, dbias, dinput_scale, dfilm_gamma, dfilm_beta}, unneeded ones empty.
std::vector<at::Tensor> bn_backward(const at::Tensor& dy, const at::Tensor& x,
                                    const OptTensor& branch, const OptTensor& mix,
                                    const OptTensor& weight, const OptTensor& bias,
                                    const at::Tensor& mean, const at::Tensor& invstd,
                                    const at::Tensor& planes, const OptTensor& input_scale,
                                    const OptTensor& film_gamma, const OptTensor& film_beta,
                                    int64_t num_branches, bool batch_stats, bool relu,
                                    std::vector<bool> needs);

// The same two, for C++ callers (the autograd node in csrc/autograd.cpp): results that
// bn_forward / bn_backward return as empty tensors are undefined here, and with
// running_in_place the running stats (and num_batches_tracked) are updated in their own
// buffers instead of coming back as new tensors.
std::vector<at::Tensor> bn_forward_impl(const at::Tensor& x, const OptTensor& branch,
                                        const OptTensor& mix, const OptTensor& weight,
                                        const OptTensor& bias, const OptTensor& running_mean,
                                        const OptTensor& running_var,
                                        const OptTensor& num_batches_tracked,
                                        const OptTensor& input_scale,
                                        const OptTensor& film_gamma,
                                        const OptTensor& film_beta, int64_t num_branches,
                                        bool training, double momentum, bool cumulative,
                                        double eps, bool relu, bool running_in_place);
std::vector<at::Tensor> bn_backward_impl(const at::Tensor& dy, const at::Tensor& x,
                                         const OptTensor& branch, const OptTensor& mix,
                                         const OptTensor& weight, const OptTensor& bias,
                                         const at::Tensor& mean, const at::Tensor& invstd,
                                         const at::Tensor& planes,
                                         const OptTensor& input_scale,
                                         const OptTensor& film_gamma,
                                         const OptTensor& film_beta, int64_t num_branches,
                                         bool batch_stats, bool relu, std::vector<bool> needs);

// y = gamma[n,c]·x + beta[n,c]; gamma, beta [N, C] or [C] (per channel), either may be None.
at::Tensor film_forward(const at::Tensor& x, const OptTensor& gamma, const OptTensor& beta);

// Returns {dx, dgamma, dbeta}; unneeded ones empty. dgamma (dbeta) is [C], summed over the
// batch, when per_channel_gamma (per_channel_beta), else [N, C].
std::vector<at::Tensor> film_backward(const at::Tensor& dy, const at::Tensor& x,
                                      const OptTensor& gamma, bool need_x, bool need_gamma,
                                      bool need_beta, bool per_channel_gamma,
                                      bool per_channel_beta);

}  // namespace fastrobust::cpu
