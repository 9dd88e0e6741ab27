// The argument checks of every op's schema (csrc/ops.cpp), written once and run by every
// kernel before it reads or writes anything: the CPU kernels (cpu/register.cpp), the CUDA key's
// kernel (cuda/plans.cpp), and the Python ones (eager, Triton, the fake implementations:
// fastrobust._C._check, through check_boxed). A bad argument is one line naming the public
// function and the argument, as ATen's own ops do; nothing has been changed when it raises.
//
// Checked here: dtypes, shapes, devices (every tensor on x's), scalar ranges, and the values
// of a per-sample eps where the host can read them without a sync (CPU tensors, whichever
// backend serves them: per_sample_nonnegative). Not here: the other values inside tensors (a
// branch id out of range, a negative mix weight), which the kernels themselves check: CPU
// kernels raise on them, CUDA kernels make the affected sample NaN (as they do for a bad eps:
// reading it on the host would be a sync).
#pragma once
#include <ATen/core/ivalue.h>
#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/SmallVector.h>

#include <cmath>
#include <string>

namespace fastrobust::checks {

using OptTensor = c10::optional<at::Tensor>;

inline bool floating(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// torch's spelling of a dtype (torch.float32), as the Python side's messages write it.
inline std::string dt(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(s);
  }
}

inline std::string shape_of(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// t is floating point and on x's device.
inline void float_on(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                     const char* x_name = "x") {
  TORCH_CHECK_TYPE(floating(t), op, ": ", name, " must be floating point, got ",
                   dt(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but ",
                    x_name, " is on ", x.device());
}

inline void shape_is(const char* op, const char* name, const at::Tensor& t,
                     at::IntArrayRef shape, const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", what, " = ",
                    shape_of(shape), ", got ", shape_of(t.sizes()));
}

inline void x_of(const char* op, const at::Tensor& x) {
  TORCH_CHECK_TYPE(floating(x), op, ": x must be floating point, got ", dt(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be [N, C, *spatial], got shape ",
                    shape_of(x.sizes()));
}

// branch / mix, weight, bias and the [N, C] extras of the BN family.
inline void bn_common(const char* op, const at::Tensor& x, const OptTensor& branch,
                      const OptTensor& mix, const OptTensor& weight, const OptTensor& bias,
                      const OptTensor& input_scale, const OptTensor& film_gamma,
                      const OptTensor& film_beta, int64_t K) {
  x_of(op, x);
  TORCH_CHECK_VALUE(K >= 1, op, ": num_branches must be >= 1, got ", K);
  TORCH_CHECK_VALUE(branch.has_value() != mix.has_value(), op,
                    ": pass exactly one of branch and mix");
  const int64_t N = x.size(0), C = x.size(1);
  if (branch) {
    TORCH_CHECK_TYPE(branch->scalar_type() == at::kLong, op, ": branch must be int64, got ",
                     dt(branch->scalar_type()));
    TORCH_CHECK_VALUE(branch->device() == x.device(), op, ": branch is on ", branch->device(),
                      " but x is on ", x.device());
    shape_is(op, "branch", *branch, {N}, "[N]");
  }
  if (mix) {
    float_on(op, "mix", *mix, x);
    shape_is(op, "mix", *mix, {N, K}, "[N, num_branches]");
  }
  for (const auto& [name, t] : {std::pair<const char*, const OptTensor*>{"weight", &weight},
                                {"bias", &bias}}) {
    if (!*t) continue;
    float_on(op, name, **t, x);
    shape_is(op, name, **t, {K, C}, "[num_branches, C]");
  }
  for (const auto& [name, t] : {std::pair<const char*, const OptTensor*>{"input_scale",
                                                                         &input_scale},
                                {"film_gamma", &film_gamma}, {"film_beta", &film_beta}}) {
    if (!*t) continue;
    float_on(op, name, **t, x);
    shape_is(op, name, **t, {N, C}, "[N, C]");
  }
}

// multi_bn's arguments, for the public function `op`.
inline void bn_args(const char* op, const at::Tensor& x, const OptTensor& branch,
                    const OptTensor& mix, const OptTensor& weight, const OptTensor& bias,
                    const OptTensor& running_mean, const OptTensor& running_var,
                    const OptTensor& num_batches_tracked, const OptTensor& input_scale,
                    const OptTensor& film_gamma, const OptTensor& film_beta, int64_t K,
                    bool training, double momentum, bool cumulative, double eps) {
  bn_common(op, x, branch, mix, weight, bias, input_scale, film_gamma, film_beta, K);
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(), op,
                    ": pass both running_mean and running_var, or neither");
  for (const auto& [name, t] : {std::pair<const char*, const OptTensor*>{"running_mean",
                                                                         &running_mean},
                                {"running_var", &running_var}}) {
    if (!*t) continue;
    float_on(op, name, **t, x);
    shape_is(op, name, **t, {K, C}, "[num_branches, C]");
  }
  if (num_batches_tracked) {
    TORCH_CHECK_TYPE(num_batches_tracked->scalar_type() == at::kLong, op,
                     ": num_batches_tracked must be int64, got ",
                     dt(num_batches_tracked->scalar_type()));
    TORCH_CHECK_VALUE(num_batches_tracked->device() == x.device(), op,
                      ": num_batches_tracked is on ", num_batches_tracked->device(),
                      " but x is on ", x.device());
    shape_is(op, "num_batches_tracked", *num_batches_tracked, {K}, "[num_branches]");
    // Every kernel advances the counters at stride 1.
    TORCH_CHECK_VALUE(!(training && running_mean) || num_batches_tracked->is_contiguous(), op,
                      ": num_batches_tracked must be contiguous (it is updated in place)");
  }
  TORCH_CHECK_VALUE(!(training && cumulative && running_mean) || num_batches_tracked, op,
                    ": a cumulative average (momentum=None) needs num_batches_tracked");
  TORCH_CHECK_VALUE(cumulative || (momentum >= 0 && momentum <= 1), op,
                    ": momentum must be in [0, 1], got ", momentum);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, op, ": eps must be a finite number > 0, got ",
                    eps);
}

inline void multi_bn(const at::Tensor& x, const OptTensor& branch, const OptTensor& mix,
                     const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& running_mean, const OptTensor& running_var,
                     const OptTensor& num_batches_tracked, const OptTensor& input_scale,
                     const OptTensor& film_gamma, const OptTensor& film_beta, int64_t K,
                     bool training, double momentum, bool cumulative, double eps) {
  bn_args(mix ? "mixed_batch_norm" : "multi_batch_norm", x, branch, mix, weight, bias,
          running_mean, running_var, num_batches_tracked, input_scale, film_gamma, film_beta, K,
          training, momentum, cumulative, eps);
}

// multi_bn_backward's arguments, for the public function `op`.
inline void bn_grad_args(const char* op, const at::Tensor& dy, const at::Tensor& x,
                         const OptTensor& branch, const OptTensor& mix, const OptTensor& weight,
                         const OptTensor& bias, const at::Tensor& mean,
                         const at::Tensor& invstd, const at::Tensor& planes,
                         const OptTensor& input_scale, const OptTensor& film_gamma,
                         const OptTensor& film_beta, int64_t K, bool batch_stats,
                         c10::ArrayRef<bool> needs) {
  bn_common(op, x, branch, mix, weight, bias, input_scale, film_gamma, film_beta, K);
  float_on(op, "dy (the gradient of y)", dy, x);
  shape_is(op, "dy (the gradient of y)", dy, x.sizes(), "x's");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean},
                                {"invstd", &invstd}}) {
    float_on(op, name, *t, x);
    shape_is(op, name, *t, {K, x.size(1)}, "[num_branches, C]");
  }
  if (mix && batch_stats) {
    float_on(op, "planes", planes, x);
    shape_is(op, "planes", planes, {2, x.size(0), x.size(1)}, "[2, N, C]");
  }
  TORCH_CHECK_VALUE(needs.size() == 7, op, ": needs must have 7 flags, got ", needs.size());
}

inline void multi_bn_backward(const at::Tensor& dy, const at::Tensor& x, const OptTensor& branch,
                              const OptTensor& mix, const OptTensor& weight,
                              const OptTensor& bias, const at::Tensor& mean,
                              const at::Tensor& invstd, const at::Tensor& planes,
                              const OptTensor& input_scale, const OptTensor& film_gamma,
                              const OptTensor& film_beta, int64_t K, bool batch_stats,
                              c10::ArrayRef<bool> needs) {
  bn_grad_args(mix ? "mixed_batch_norm" : "multi_batch_norm", dy, x, branch, mix, weight, bias,
               mean, invstd, planes, input_scale, film_gamma, film_beta, K, batch_stats, needs);
}

// --- the synchronized BN (fastrobust.distributed): its halves and the composite -------------

inline const char* sync_op(const OptTensor& mix) {
  return mix ? "sync_mixed_batch_norm" : "sync_multi_batch_norm";
}

inline void rank_of(const char* op, int64_t rank, int64_t world) {
  TORCH_CHECK_VALUE(world >= 1 && rank >= 0 && rank < world, op,
                    ": rank must be in [0, world_size), got rank ", rank, " of world_size ",
                    world);
}

// The forward's payload: fp64 [ranks, K + 3·K·C] on x's device.
inline void payload_of(const char* op, const at::Tensor& payload, const at::Tensor& x,
                       int64_t K) {
  TORCH_CHECK_TYPE(payload.scalar_type() == at::kDouble, op, ": payload must be float64, got ",
                   dt(payload.scalar_type()));
  TORCH_CHECK_VALUE(payload.device() == x.device(), op, ": payload is on ", payload.device(),
                    " but x is on ", x.device());
  const int64_t width = K + 3 * K * x.size(1);
  TORCH_CHECK_VALUE(payload.dim() == 2 && payload.size(0) >= 1 && payload.size(1) == width,
                    op, ": payload must have shape [world_size, K + 3·K·C] = [*, ", width,
                    "], got ", shape_of(payload.sizes()));
}

inline void sync_bn_stats(const at::Tensor& x, const OptTensor& branch, const OptTensor& mix,
                          const OptTensor& input_scale, const OptTensor& num_batches_tracked,
                          int64_t K, bool cumulative, int64_t rank, int64_t world) {
  const char* op = sync_op(mix);
  bn_common(op, x, branch, mix, {}, {}, input_scale, {}, {}, K);
  rank_of(op, rank, world);
  if (num_batches_tracked) {
    TORCH_CHECK_TYPE(num_batches_tracked->scalar_type() == at::kLong, op,
                     ": num_batches_tracked must be int64, got ",
                     dt(num_batches_tracked->scalar_type()));
    TORCH_CHECK_VALUE(num_batches_tracked->device() == x.device(), op,
                      ": num_batches_tracked is on ", num_batches_tracked->device(),
                      " but x is on ", x.device());
    shape_is(op, "num_batches_tracked", *num_batches_tracked, {K}, "[num_branches]");
  }
}

inline void sync_bn_apply(const at::Tensor& x, const OptTensor& branch, const OptTensor& mix,
                          const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var,
                          const OptTensor& num_batches_tracked, const OptTensor& input_scale,
                          const OptTensor& film_gamma, const OptTensor& film_beta,
                          const at::Tensor& payload, const at::Tensor& old, int64_t K,
                          double momentum, bool cumulative, double eps) {
  const char* op = sync_op(mix);
  bn_args(op, x, branch, mix, weight, bias, running_mean, running_var, num_batches_tracked,
          input_scale, film_gamma, film_beta, K, true, momentum, cumulative, eps);
  payload_of(op, payload, x, K);
  float_on(op, "old", old, x);
  TORCH_CHECK_VALUE(old.dim() == 1 && (old.size(0) == K || old.size(0) == 0), op,
                    ": old must have shape [num_branches] or [0], got ",
                    shape_of(old.sizes()));
}

inline void sync_bn_grad_sums(const at::Tensor& dy, const at::Tensor& x, const OptTensor& branch,
                              const OptTensor& mix, const OptTensor& weight,
                              const OptTensor& bias, const at::Tensor& mean,
                              const at::Tensor& invstd, const OptTensor& input_scale,
                              const OptTensor& film_gamma, const OptTensor& film_beta,
                              int64_t K, c10::ArrayRef<bool> needs) {
  bn_grad_args(sync_op(mix), dy, x, branch, mix, weight, bias, mean, invstd, mean, input_scale,
               film_gamma, film_beta, K, false, needs);
}

inline void sync_bn_dx(const at::Tensor& dy, const at::Tensor& x, const OptTensor& branch,
                       const OptTensor& mix, const OptTensor& weight, const OptTensor& bias,
                       const at::Tensor& mean, const at::Tensor& invstd,
                       const at::Tensor& planes, const OptTensor& input_scale,
                       const OptTensor& film_gamma, const OptTensor& film_beta,
                       const at::Tensor& sums, const at::Tensor& parts,
                       const at::Tensor& payload, int64_t K, c10::ArrayRef<bool> needs) {
  const char* op = sync_op(mix);
  bn_grad_args(op, dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
               film_gamma, film_beta, K, true, needs);
  float_on(op, "sums", sums, x);
  shape_is(op, "sums", sums, {2, K, x.size(1)}, "[2, num_branches, C]");
  float_on(op, "parts", parts, x);
  payload_of(op, payload, x, K);
}

inline void sync_multi_bn(const at::Tensor& x, const OptTensor& branch, const OptTensor& mix,
                          const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var,
                          const OptTensor& num_batches_tracked, const OptTensor& input_scale,
                          const OptTensor& film_gamma, const OptTensor& film_beta, int64_t K,
                          double momentum, bool cumulative, double eps, int64_t rank,
                          int64_t world) {
  const char* op = sync_op(mix);
  bn_args(op, x, branch, mix, weight, bias, running_mean, running_var, num_batches_tracked,
          input_scale, film_gamma, film_beta, K, true, momentum, cumulative, eps);
  rank_of(op, rank, world);
}

inline void film_coefficient(const char* op, const char* name, const OptTensor& t,
                             const at::Tensor& x) {
  if (!t) return;
  float_on(op, name, *t, x);
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({N, C}) || t->sizes() == at::IntArrayRef({C}),
                    op, ": ", name, " must have shape [N, C] = ", shape_of({N, C}),
                    " or [C] = ", shape_of({C}), ", got ", shape_of(t->sizes()));
}

inline void film(const at::Tensor& x, const OptTensor& gamma, const OptTensor& beta) {
  x_of("film", x);
  film_coefficient("film", "gamma", gamma, x);
  film_coefficient("film", "beta", beta, x);
}

inline void film_backward(const at::Tensor& dy, const at::Tensor& x, const OptTensor& gamma,
                          c10::ArrayRef<bool> needs, c10::ArrayRef<bool> per_channel) {
  x_of("film", x);
  float_on("film", "dy (the gradient of y)", dy, x);
  shape_is("film", "dy (the gradient of y)", dy, x.sizes(), "x's");
  film_coefficient("film", "gamma", gamma, x);
  TORCH_CHECK_VALUE(needs.size() == 3 && per_channel.size() == 2,
                    "film: needs must have 3 flags and per_channel 2");
  TORCH_CHECK(!gamma || (gamma->dim() == 1) == per_channel[0],  // (RuntimeError, as before)
              "film: per_channel[0] must say whether gamma is [C]");
}

inline void add_relu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
                        a.device() == b.device(),
                    "add_relu: a and b must have the same shape, dtype and device");
}

// The PGD family: x_adv (or noise) sets shape, dtype and device for the others.
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
  shape_is(op, name, *t, {ref.size(0)}, "[N]");
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
                    ": eps must be a finite number >= 0, got ", eps);
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

// --- the boxed form: an op's name and its arguments as the dispatcher holds them -------------

inline OptTensor opt(const c10::IValue& v) {
  return v.isNone() ? OptTensor() : OptTensor(v.toTensor());
}

inline c10::SmallVector<bool, 8> bools(const c10::IValue& v) {
  c10::SmallVector<bool, 8> r;  // (not std::vector<bool>: no ArrayRef of a bit vector)
  for (bool b : v.toBoolList()) r.push_back(b);
  return r;
}

// `name` without its namespace ("multi_bn", ...); `a` the schema's arguments in order.
inline void check_boxed(const std::string& name, c10::ArrayRef<c10::IValue> a) {
  if (name == "multi_bn") {
    multi_bn(a[0].toTensor(), opt(a[1]), opt(a[2]), opt(a[3]), opt(a[4]), opt(a[5]), opt(a[6]),
             opt(a[7]), opt(a[8]), opt(a[9]), opt(a[10]), a[11].toInt(), a[12].toBool(),
             a[13].toDouble(), a[14].toBool(), a[15].toDouble());
  } else if (name == "multi_bn_backward") {
    multi_bn_backward(a[0].toTensor(), a[1].toTensor(), opt(a[2]), opt(a[3]), opt(a[4]),
                      opt(a[5]), a[6].toTensor(), a[7].toTensor(), a[8].toTensor(), opt(a[9]),
                      opt(a[10]), opt(a[11]), a[12].toInt(), a[13].toBool(), bools(a[15]));
  } else if (name == "sync_bn_stats") {
    sync_bn_stats(a[0].toTensor(), opt(a[1]), opt(a[2]), opt(a[3]), opt(a[4]), a[5].toInt(),
                  a[6].toBool(), a[7].toInt(), a[8].toInt());
  } else if (name == "sync_bn_apply") {
    sync_bn_apply(a[0].toTensor(), opt(a[1]), opt(a[2]), opt(a[3]), opt(a[4]), opt(a[5]),
                  opt(a[6]), opt(a[7]), opt(a[8]), opt(a[9]), opt(a[10]), a[11].toTensor(),
                  a[12].toTensor(), a[13].toInt(), a[14].toDouble(), a[15].toBool(),
                  a[16].toDouble());
  } else if (name == "sync_bn_grad_sums") {
    sync_bn_grad_sums(a[0].toTensor(), a[1].toTensor(), opt(a[2]), opt(a[3]), opt(a[4]),
                      opt(a[5]), a[6].toTensor(), a[7].toTensor(), opt(a[8]), opt(a[9]),
                      opt(a[10]), a[11].toInt(), bools(a[13]));
  } else if (name == "sync_bn_dx") {
    sync_bn_dx(a[0].toTensor(), a[1].toTensor(), opt(a[2]), opt(a[3]), opt(a[4]), opt(a[5]),
               a[6].toTensor(), a[7].toTensor(), a[8].toTensor(), opt(a[9]), opt(a[10]),
               opt(a[11]), a[12].toTensor(), a[13].toTensor(), a[14].toTensor(), a[15].toInt(),
               bools(a[17]));
  } else if (name == "sync_multi_bn") {
    sync_multi_bn(a[0].toTensor(), opt(a[1]), opt(a[2]), opt(a[3]), opt(a[4]), opt(a[5]),
                  opt(a[6]), opt(a[7]), opt(a[8]), opt(a[9]), opt(a[10]), a[11].toInt(),
                  a[12].toDouble(), a[13].toBool(), a[14].toDouble(), a[16].toInt(),
                  a[17].toInt());
  } else if (name == "film") {
    film(a[0].toTensor(), opt(a[1]), opt(a[2]));
  } else if (name == "film_backward") {
    film_backward(a[0].toTensor(), a[1].toTensor(), opt(a[2]), bools(a[3]), bools(a[4]));
  } else if (name == "add_relu") {
    add_relu(a[0].toTensor(), a[1].toTensor());
  } else if (name == "pgd_step") {
    pgd_step(a[0].toTensor(), a[1].toTensor(), a[2].toTensor(), opt(a[3]), a[4].toDouble(),
             opt(a[5]), a[6].toDouble(), a[8].toDouble(), a[9].toDouble());
  } else if (name == "pgd_init") {
    pgd_init(a[0].toTensor(), a[1].toTensor(), opt(a[2]), a[3].toDouble(), opt(a[4]),
             a[5].toBool(), a[6].toDouble(), a[7].toDouble());
  } else if (name == "mifgsm_step") {
    mifgsm_step(a[0].toTensor(), a[1].toTensor(), a[2].toTensor(), a[3].toTensor(), opt(a[4]),
                a[5].toDouble(), opt(a[6]), a[7].toDouble(), a[8].toDouble(), a[9].toDouble(),
                a[10].toDouble());
  }
}

}  // namespace fastrobust::checks
