// The small per-element math of the routed / mixed BN family (docs/math.md),
// written once for the CPU kernels (cpu.cpp and cpu_route.h, in double); the Triton kernels
// (fastrobust/ops/batch_norm/triton.py) write the same formulas. The derivation is in
// docs/math.md and fastrobust/ops/batch_norm/eager.py.
//
// No include guard and no includes but hd.h's macro, by design (like csrc/pgd/math.h): each user
// includes it inside its own namespace.
#include "../hd.h"

// --- statistics -------------------------------------------------------------------------------

// A part's mean and M2 from its S values' sums about a centre c, r = Σ(x − c) and
// q = Σ(x − c)²: c + r/S and q − r²/S. r is what a rounded c leaves out (zero only for an
// exact mean); keeping it is Chan's merge of the part with its centre.
template <typename T>
FASTROBUST_HD T centred_mean(T c, T r, T S) {
  return S > T(0) ? c + r / S : c;
}
template <typename T>
FASTROBUST_HD T centred_m2(T r, T q, T S) {
  return S > T(0) ? q - r * r / S : q;
}

// A part's shares of a merge's sums about a common centre C, in the units of u = s·x: the
// part has S values with sums r = Σ(x − c), q = Σ(x − c)² about its own centre c, weight w
// and input scale s; with d = s·c − C, Σ(u − C) = s·r + S·d and Σ(u − C)² = s²·q + 2·d·s·r +
// S·d² (Chan's merge, cross term 2·d·s·r included). Nothing of the centres' rounding is lost:
// the merged mean is C + R/m and its M2 Q − R²/m (centred_mean, centred_m2 with the merged
// R, Q and value count m), with no Σx² − (Σx)²/m cancellation.
template <typename T>
FASTROBUST_HD T part_r_share(T w, T s, T c, T r, T C, T S) {
  return w * (s * r + S * (s * c - C));
}
template <typename T>
FASTROBUST_HD T part_q_share(T w, T s, T c, T r, T q, T C, T S) {
  const T d = s * c - C;
  return w * (s * s * q + (T(2) * s * r + S * d) * d);
}

// 1/sqrt(var + eps) of a biased variance.
template <typename T>
FASTROBUST_HD T bn_invstd(T var, T eps) {
  return T(1) / sqrt(var + eps);
}

// The running-statistics update of nn.BatchNorm: the mean with the batch mean, the variance
// with the unbiased batch variance (count values, count ≥ 2).
template <typename T>
FASTROBUST_HD T running_mean_update(T old, T momentum, T batch_mean) {
  return (T(1) - momentum) * old + momentum * batch_mean;
}
template <typename T>
FASTROBUST_HD T running_var_update(T old, T momentum, T batch_var, T count) {
  return (T(1) - momentum) * old + momentum * batch_var * count / (count - T(1));
}

// --- coefficients -----------------------------------------------------------------------------

// Per branch: z = a·u + d with a = w·invstd, d = b − mean·a.
template <typename T>
FASTROBUST_HD T coef_a(T w, T invstd) {
  return w * invstd;
}
template <typename T>
FASTROBUST_HD T coef_d(T b, T mean, T a) {
  return b - mean * a;
}

// Per plane, from its routing mixture Ap = Σ_k M·a, Dp = Σ_k M·d, its input scale s and FiLM
// γ, β: f = A·x + D (the pre-activation the forward applies and the backward's ReLU mask).
template <typename T>
FASTROBUST_HD T plane_A(T Ap, T s, T g) {
  return Ap * s * g;
}
template <typename T>
FASTROBUST_HD T plane_D(T Dp, T g, T beta) {
  return Dp * g + beta;
}

// The elementwise passes (y = relu?(A·x + D), the ReLU-masked gradient, v = P·g + Q·x + R)
// are written inline in the leaf loops (cpu_leaf.inc), so that their vectorized code stays
// exactly what was measured.

// --- backward ---------------------------------------------------------------------------------

// A plane's Σdz and Σdz·u (dz = γ·g, u = s·x) from its sums about the centre ctr (in x's
// units): G1 = Σg, G2 = Σg·(x − ctr); sc = s·ctr, the centre in u's units.
template <typename T>
FASTROBUST_HD T plane_Z1(T g, T G1) {
  return g * G1;
}
template <typename T>
FASTROBUST_HD T plane_Zu(T g, T s, T sc, T G1, T G2) {
  return g * (s * G2) + sc * (g * G1);
}

// dweight of branch k: Σ M·dz·x̂ = invstd·(Σ M·dz·u − mean·Σ M·dz); dbias is T1 = Σ M·dz.
template <typename T>
FASTROBUST_HD T branch_dweight(T invstd, T TU, T mean, T T1) {
  return invstd * (TU - mean * T1);
}

// ∂L/∂u = P·g + Q·x + R per plane (Q carries the input scale: Q = s·Σ M·q_k): the per-branch
// q_k, r_k of the batch-statistics terms, with m the branch's weighted value count and a_in
// the branch's a (0 for a single-value branch).
template <typename T>
FASTROBUST_HD T branch_q(T a_in, T invstd, T T2, T m) {
  return -a_in * invstd * T2 / m;
}
template <typename T>
FASTROBUST_HD T branch_r(T a_in, T invstd, T T2, T mean, T T1, T m) {
  return a_in * (invstd * T2 * mean - T1) / m;
}

// dγ of a plane: Ap·Σg·u + Dp·Σg, from the sums about the centre (sc = s·ctr).
template <typename T>
FASTROBUST_HD T plane_dgamma(T Ap, T Dp, T s, T sc, T G1, T G2) {
  return Ap * (s * G2 + sc * G1) + Dp * G1;
}

// One (plane, branch) term of ∂L/∂mix[n, k] through the mix-weighted statistics: du = the
// plane's mean in u minus the branch mean, q = its mean square about the branch mean, var the
// branch's biased variance, W the branch's total weight.
template <typename T>
FASTROBUST_HD T dmix_stats_term(T a, T T1, T du, T invstd, T T2, T q, T var, T W) {
  return a * (T1 * du + T(0.5) * invstd * T2 * (q - var)) / W;
}
