// What every implementation of the fastrobust ops agrees on, declared once: the order of the
// BN family's differentiable arguments (the `needs` flags of multi_bn_backward and its
// results) and the modes of the PGD update. module.cpp exports both to Python
// (fastrobust._C.BN_GRADS, fastrobust._C.PGD_MODES), where fastrobust/ops/_common.py turns
// them into the enums the Triton and eager backends use.
#pragma once
#include <cstdint>

namespace fastrobust {

// multi_bn_backward(..., bool[7] needs) -> the seven gradients, in this order.
enum BNGrad : int { kGradX, kGradMix, kGradWeight, kGradBias, kGradScale, kGradGamma,
                    kGradBeta, kNumBNGrads };
inline constexpr const char* kBNGradNames[kNumBNGrads] = {
    "x", "mix", "weight", "bias", "input_scale", "film_gamma", "film_beta"};

// film_backward(..., bool[3] needs, bool[2] per_channel) -> (dx, dgamma, dbeta).
enum FilmGrad : int { kFilmX, kFilmGamma, kFilmBeta, kNumFilmGrads };

// The modes of the PGD update kernels (pgd_update in csrc/pgd/cpu.h and
// fastrobust/ops/pgd/triton.py).
enum PgdMode : int64_t {
  kLinfSign = 0,  // linf step: direction sign(grad) (torchattacks' order)
  kL2 = 1,        // l2 step: direction grad / max(||grad_n||, 1e-12)
  kLinfRaw = 2,   // linf with the direction as is (the random start)
};
inline constexpr const char* kPgdModeNames[3] = {"LINF_SIGN", "L2", "LINF_RAW"};

}  // namespace fastrobust
