// CPU kernels of the routed / mixed BN (cpu.cpp): the CPU implementation of
// torch.ops.fastrobust.{multi_bn, multi_bn_backward}, registered in ops.cpp. They take x's
// dtype (float32/float64) for every floating operand, each operand contiguous; ops.cpp
// converts other dtypes.
#pragma once
#include <torch/extension.h>

#include <vector>

#include "args.h"

namespace fastrobust::cpu {

using OptTensor = c10::optional<at::Tensor>;

// multi_bn: exactly one of branch (int64 [N], routed) and mix (float [N, K], mixed). Returns
// {y, mean, invstd, planes}: mean/invstd [K, C] are the statistics used; planes is x's
// per-plane mean and M2 [2, N, C] for a mixed call with batch statistics (the mix gradient
// needs them), else undefined. In training the running statistics (and num_batches_tracked)
// are updated in their own buffers.
std::vector<at::Tensor> multi_bn_forward(const bn::BnArgs& a);

// multi_bn_backward: {dx, dmix, dweight, dbias, dinput_scale, dfilm_gamma, dfilm_beta} for
// a.needs (spec.h BNGrad), the ones not needed undefined.
std::vector<at::Tensor> multi_bn_backward(const bn::BnArgs& a);

}  // namespace fastrobust::cpu
