// CPU kernels of the PGD steps (shared/DESIGN.md §2.5). Python registers them as the "cpu"
// backend of torch.ops.fastrobust.{pgd_step,mifgsm_step,pgd_init} (fastrobust/_ops.py).
//
// Every tensor has x_adv's shape and strides, is dense and keeps each sample in one block of
// memory (contiguous or channels_last; the Python side copies other layouts); eps_t / alpha_t
// are per-sample [N] tensors in x's dtype, or undefined to use the scalars eps / alpha.
#pragma once
#include <torch/extension.h>

namespace fastrobust::cpu {

using OptTensor = c10::optional<at::Tensor>;

// Modes of pgd_update.
constexpr int64_t kLinfSign = 0;  // linf step: direction sign(grad) (torchattacks' order)
constexpr int64_t kL2 = 1;        // l2 step: direction grad / max(||grad_n||, 1e-12)
constexpr int64_t kLinfRaw = 2;   // linf with the direction as is (the random start)

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
