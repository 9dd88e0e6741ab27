// The PGD family's argument checks (schemas in ops.cpp): x_adv (or noise) sets shape, dtype
// and device for the others. Every kernel runs them first: the CPU ones (cpu.cpp), the CUDA
// key's launch path and the Python ones (through the boxed checks registered in ops.cpp).
#pragma once
#include "../checks.h"

namespace fastrobust::checks {

inline void pgd_like(const char* op, const char* name, const at::Tensor& t,
                     const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " is ",
                   dt(t.scalar_type()), " but ", ref_name, " is ", dt(ref.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " has shape ",
                    shape_of(t.sizes()), " but ", ref_name, " has ", shape_of(ref.sizes()));
}

inline void per_sample(const char* op, const char* name, const OptTensor& t,
                       const at::Tensor& ref, const char* ref_name) {
  if (!t) return;
  float_on(op, name, *t, ref, ref_name);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == ref.size(0), op, ": a tensor ", name,
                    " must be per sample, shape [N] = [", ref.size(0), "], got ",
                    shape_of(t->sizes()));
}

// A per-sample eps must be >= 0, and a NaN is refused too (it compares false with everything,
// so a check of the minimum alone let it through and the step moved that sample unbounded).
// CPU tensors with values only: on a device the kernels make such a sample NaN instead of a
// host sync.
inline void per_sample_nonnegative(const char* op, const char* name, const OptTensor& t) {
  // (a fake or functional tensor, as tracing and the fake implementations pass, has no values
  // to read: the real call checks them)
  static const c10::DispatchKeySet traced{c10::DispatchKey::Python,
                                          c10::DispatchKey::Functionalize};
  if (!t || !(t->key_set() & traced).empty() ||
      t->unsafeGetTensorImpl()->has_symbolic_sizes_strides() || !t->device().is_cpu() ||
      !t->has_storage() || !t->numel())
    return;
  // Read in place, with no ATen op: a launch plan's recorder sees every op a launcher runs.
  const int64_t n = t->size(0), stride = t->stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "eps check", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(p[i * stride]);
      TORCH_CHECK_VALUE(v >= 0, op, ": ", name, " must be >= 0, got ", v, " at sample ", i);
    }
  });
}

inline void pgd_scalars(const char* op, double eps, double alpha, double clip_min,
                        double clip_max) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op,
                    ": eps must be a finite non-negative number, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  TORCH_CHECK_VALUE(!(clip_min > clip_max) && !std::isnan(clip_min) && !std::isnan(clip_max), op,
                    ": clip_min (", clip_min, ") must be <= clip_max (", clip_max, ")");
}

inline void pgd_x(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(floating(x), op, ": ", name, " must be floating point, got ",
                   dt(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", name, " must be [N, ...], got a 0-dim tensor");
}

// What the linf / l2 step and the MI-FGSM step share.
inline void pgd_common(const char* op, const at::Tensor& x_adv, const at::Tensor& grad,
                       const at::Tensor& x_nat, const OptTensor& eps_t, double eps,
                       const OptTensor& alpha_t, double alpha, double clip_min,
                       double clip_max) {
  pgd_x(op, "x_adv", x_adv);
  pgd_like(op, "grad", grad, x_adv, "x_adv");
  pgd_like(op, "x_nat", x_nat, x_adv, "x_adv");
  per_sample(op, "eps", eps_t, x_adv, "x_adv");
  per_sample(op, "alpha", alpha_t, x_adv, "x_adv");
  pgd_scalars(op, eps, alpha, clip_min, clip_max);
  per_sample_nonnegative(op, "eps", eps_t);
}

inline void pgd_step(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                     const OptTensor& eps_t, double eps, const OptTensor& alpha_t, double alpha,
                     double clip_min, double clip_max) {
  pgd_common("pgd_step_", x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, clip_min, clip_max);
}

inline void mifgsm_step(const at::Tensor& x_adv, const at::Tensor& grad,
                        const at::Tensor& momentum, const at::Tensor& x_nat,
                        const OptTensor& eps_t, double eps, const OptTensor& alpha_t,
                        double alpha, double decay, double clip_min, double clip_max) {
  const char* op = "mifgsm_step_";
  pgd_common(op, x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, clip_min, clip_max);
  pgd_like(op, "momentum_buf", momentum, x_adv, "x_adv");
  TORCH_CHECK_VALUE(std::isfinite(decay), op, ": decay must be finite, got ", decay);
}

inline void pgd_init(const at::Tensor& noise, const at::Tensor& x_nat, const OptTensor& eps_t,
                     double eps, const OptTensor& radius, bool l2, double clip_min,
                     double clip_max) {
  const char* op = "pgd_init";
  pgd_x(op, "x_nat", x_nat);
  pgd_like(op, "noise", noise, x_nat, "x_nat");
  per_sample(op, "eps", eps_t, x_nat, "x_nat");
  per_sample(op, "radius", radius, x_nat, "x_nat");
  TORCH_CHECK_VALUE(!l2 || radius, op, ": the l2 start needs radius");
  pgd_scalars(op, eps, 0.0, clip_min, clip_max);
  per_sample_nonnegative(op, "eps", eps_t);
}

}  // namespace fastrobust::checks
