// CPU kernels of the PGD steps (docs/math.md), the CPU implementation of
// torch.ops.fastrobust.{pgd_step,mifgsm_step,pgd_init} (registered in cpu.cpp).
//
// Every tensor has x_adv's shape and strides, is dense and keeps each sample in one block of
// memory (contiguous or channels_last; the ops' kernels in cpu.cpp copy other layouts);
// eps_t / alpha_t are per-sample [N] tensors in x's dtype, or undefined to use the scalars
// eps / alpha.
#pragma once
#include <torch/extension.h>

#include "../spec.h"  // PgdMode

namespace fastrobust::cpu {

using OptTensor = c10::optional<at::Tensor>;

// out = clamp(x_nat + P(x_adv + alpha·dir(grad) − x_nat), clip_min, clip_max), P the
// projection onto the eps-ball. out may be x_adv or grad (each element is read before it is
// written).
void pgd_update(at::Tensor& out, const at::Tensor& x_adv, const at::Tensor& grad,
                const at::Tensor& x_nat, const OptTensor& eps_t, double eps,
                const OptTensor& alpha_t, double alpha, int64_t mode, double clip_min,
                double clip_max);

// MI-FGSM: buf = grad / mean(|grad_n|) + decay·buf, then the linf step with sign(buf); both
// x_adv and buf in place.
void mifgsm_update(at::Tensor& x_adv, const at::Tensor& grad, at::Tensor& buf,
                   const at::Tensor& x_nat, const OptTensor& eps_t, double eps,
                   const OptTensor& alpha_t, double alpha, double decay, double clip_min,
                   double clip_max);

}  // namespace fastrobust::cpu
