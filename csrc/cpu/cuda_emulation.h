// The host emulation of the CUDA BN kernels (cuda_emulation.cpp), exposed to Python as
// fastrobust._C._emulated_cuda_bn_forward / _backward for the tests. The arguments are the
// multi_bn / multi_bn_backward schemas' (csrc/ops.cpp).
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastrobust::cuda {

std::vector<at::Tensor> emulated_bn_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& branch,
    const c10::optional<at::Tensor>& mix, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked,
    const c10::optional<at::Tensor>& input_scale, const c10::optional<at::Tensor>& film_gamma,
    const c10::optional<at::Tensor>& film_beta, int64_t K, bool training, double momentum,
    bool cumulative, double eps, bool relu);

std::vector<at::Tensor> emulated_bn_backward(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& branch,
    const c10::optional<at::Tensor>& mix, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& planes, const c10::optional<at::Tensor>& input_scale,
    const c10::optional<at::Tensor>& film_gamma, const c10::optional<at::Tensor>& film_beta,
    int64_t K, bool batch_stats, bool relu, std::vector<bool> needs);

}  // namespace fastrobust::cuda
