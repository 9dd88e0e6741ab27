// The per-element math of the PGD steps (docs/math.md), written once for the CPU leaves
// (cpu_leaf.inc); the Triton kernels (fastrobust/ops/pgd/triton.py) write the same formulas.
//
// No include guard and no includes but hd.h's macro, by design: each user includes it inside
// its own namespace (the CPU leaves once per ISA, under that ISA's target pragma), so no
// function compiled for one ISA can be linked into another's path.
#include "../hd.h"

// clamp(v, lo, hi) as torch.clamp computes it: max first, then min; NaN passes through.
template <typename T>
FASTROBUST_HD T clamp_(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// sign as torch.sign: -1, 0 or 1, and 0 for NaN.
template <typename T>
FASTROBUST_HD T sign_(T v) {
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

// One element of the linf step in torchattacks' order: clamp(xn + clamp(xa + al·d − xn, −e,
// e), lo, hi), d = sign(g) (or the raw direction of the random start). al·sign(g) is exact,
// so a fused multiply-add rounds alike.
template <typename T>
FASTROBUST_HD T linf_value(T xa, T d, T xn, T e, T al, T lo, T hi) {
  const T delta = clamp_(xa + al * d - xn, -e, e);
  return clamp_(xn + delta, lo, hi);
}

// The l2 step's scale of the gradient: al / max(‖g‖, 1e-12).
FASTROBUST_HD double l2_step_scale(double al, double norm_g) {
  return al / (norm_g > 1e-12 ? norm_g : 1e-12);
}

// The l2 projection of δ onto the eps-ball: δ·min(1, e/‖δ‖).
FASTROBUST_HD double l2_ball_factor(double norm_delta, double e) {
  return norm_delta > e ? e / norm_delta : 1.0;
}

// MI-FGSM's divisor mean(|g|): an all-zero gradient divides by 1 (adds 0); a NaN spreads.
FASTROBUST_HD double mifgsm_divisor(double sum_abs, long long count) {
  const double mean = sum_abs / double(count > 0 ? count : 1);
  return mean == 0.0 ? 1.0 : mean;
}
