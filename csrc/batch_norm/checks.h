// The BN family's argument checks (schemas in ops.cpp), on its one argument struct. Every
// kernel of the family runs them first: the CPU kernels (cpu.cpp, sync_cpu.cpp), the CUDA
// key's launch path and the Python kernels (through the boxed checks registered in ops.cpp).
#pragma once
#include "../checks.h"
#include "args.h"

namespace fastrobust::checks {

using bn::BnArgs;

// num_batches_tracked: int64 [num_branches] on x's device.
inline void nbt_of(const char* op, const BnArgs& a) {
  const auto& nbt = a.num_batches_tracked;
  if (!nbt) return;
  TORCH_CHECK_TYPE(nbt->scalar_type() == at::kLong, op,
                   ": num_batches_tracked must be int64, got ", dt(nbt->scalar_type()));
  TORCH_CHECK_VALUE(nbt->device() == a.x.device(), op, ": num_batches_tracked is on ",
                    nbt->device(), " but x is on ", a.x.device());
  shape_is(op, "num_batches_tracked", *nbt, {a.num_branches}, "[num_branches]");
}

// A [num_branches, C] tensor (weight, bias, running stats); when only C is off, the message
// says it is x's channels that differ.
inline void per_branch(const char* op, const char* name, const at::Tensor& t, const BnArgs& a) {
  float_on(op, name, t, a.x);
  const int64_t K = a.num_branches, C = a.x.size(1);
  TORCH_CHECK_VALUE(!(t.dim() == 2 && t.size(0) == K && t.size(1) != C), op, ": x has ", C,
                    " channels but ", name, " is [num_branches, C] = ", shape_of(t.sizes()),
                    ": C must match x.shape[1]");
  shape_is(op, name, t, {K, C}, "[num_branches, C]");
}

// x, branch / mix, weight, bias and the [N, C] extras.
inline void bn_common(const char* op, const BnArgs& a) {
  const at::Tensor& x = a.x;
  const int64_t K = a.num_branches;
  x_of(op, x);
  TORCH_CHECK_VALUE(K >= 1, op, ": num_branches must be >= 1, got ", K);
  TORCH_CHECK_VALUE(a.branch.has_value() != a.mix.has_value(), op,
                    ": pass exactly one of branch and mix");
  const int64_t N = x.size(0), C = x.size(1);
  if (a.branch) {
    TORCH_CHECK_TYPE(a.branch->scalar_type() == at::kLong, op,
                     ": branch must be an integer tensor (int64), got ",
                     dt(a.branch->scalar_type()));
    TORCH_CHECK_VALUE(a.branch->device() == x.device(), op, ": branch is on ",
                      a.branch->device(), " but x is on ", x.device());
    shape_is(op, "branch", *a.branch, {N}, "[N]");
  }
  if (a.mix) {
    float_on(op, "mix", *a.mix, x);
    TORCH_CHECK_VALUE(a.mix->dim() == 2 && a.mix->size(0) == N, op,
                      ": mix must have shape [N, K] with N = ", N, ", got ",
                      shape_of(a.mix->sizes()));
    shape_is(op, "mix", *a.mix, {N, K}, "[N, num_branches]");
  }
  for (const auto& [name, t] : {std::pair<const char*, const OptTensor*>{"weight", &a.weight},
                                {"bias", &a.bias}}) {
    if (*t) per_branch(op, name, **t, a);
  }
  for (const auto& [name, t] : {std::pair<const char*, const OptTensor*>{"input_scale",
                                                                         &a.input_scale},
                                {"film_gamma", &a.film_gamma}, {"film_beta", &a.film_beta}}) {
    if (!*t) continue;
    float_on(op, name, **t, x);
    shape_is(op, name, **t, {N, C}, "[N, C]");
  }
}

// multi_bn's arguments, for the public function `op` (`training` as the call has it).
inline void bn_args(const char* op, const BnArgs& a, bool training) {
  bn_common(op, a);
  TORCH_CHECK_VALUE(a.running_mean.has_value() == a.running_var.has_value(), op,
                    ": pass both running_mean and running_var, or neither");
  for (const auto& [name, t] : {std::pair<const char*, const OptTensor*>{"running_mean",
                                                                         &a.running_mean},
                                {"running_var", &a.running_var}}) {
    if (*t) per_branch(op, name, **t, a);
  }
  nbt_of(op, a);
  // Every kernel advances the counters at stride 1.
  TORCH_CHECK_VALUE(!(training && a.running_mean && a.num_batches_tracked) ||
                        a.num_batches_tracked->is_contiguous(),
                    op, ": num_batches_tracked must be contiguous (it is updated in place)");
  TORCH_CHECK_VALUE(!(training && a.cumulative && a.running_mean) || a.num_batches_tracked, op,
                    ": a cumulative average (momentum=None) needs num_batches_tracked");
  TORCH_CHECK_VALUE(a.cumulative || (a.momentum >= 0 && a.momentum <= 1), op,
                    ": momentum must be in [0, 1], got ", a.momentum);
  TORCH_CHECK_VALUE(std::isfinite(a.eps) && a.eps > 0, op,
                    ": eps must be a finite number > 0, got ", a.eps);
}

// multi_bn_backward's arguments, for the public function `op`.
inline void bn_grad_args(const char* op, const BnArgs& a, bool batch_stats) {
  bn_common(op, a);
  const at::Tensor& x = a.x;
  float_on(op, "dy (the gradient of y)", a.dy, x);
  shape_is(op, "dy (the gradient of y)", a.dy, x.sizes(), "x's");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &a.mean},
                                {"invstd", &a.invstd}}) {
    float_on(op, name, *t, x);
    shape_is(op, name, *t, {a.num_branches, x.size(1)}, "[num_branches, C]");
  }
  if (a.mix && batch_stats) {
    float_on(op, "planes", a.planes, x);
    shape_is(op, "planes", a.planes, {2, x.size(0), x.size(1)}, "[2, N, C]");
  }
  TORCH_CHECK_VALUE(a.needs.size() == kNumBNGrads, op, ": needs must have 7 flags, got ",
                    a.needs.size());
}

inline void multi_bn(const BnArgs& a) { bn_args(a.op(), a, a.training); }
inline void multi_bn_backward(const BnArgs& a) { bn_grad_args(a.op(), a, a.batch_stats); }

// --- the synchronized BN (fastrobust.distributed): its halves and the composite -------------

inline void rank_of(const char* op, const BnArgs& a) {
  TORCH_CHECK_VALUE(a.world_size >= 1 && a.rank >= 0 && a.rank < a.world_size, op,
                    ": rank must be in [0, world_size), got rank ", a.rank, " of world_size ",
                    a.world_size);
}

// The forward's payload: fp64 [ranks, K + 3·K·C] on x's device.
inline void payload_of(const char* op, const BnArgs& a) {
  const at::Tensor& payload = a.payload;
  TORCH_CHECK_TYPE(payload.scalar_type() == at::kDouble, op, ": payload must be float64, got ",
                   dt(payload.scalar_type()));
  TORCH_CHECK_VALUE(payload.device() == a.x.device(), op, ": payload is on ", payload.device(),
                    " but x is on ", a.x.device());
  const int64_t width = a.num_branches + 3 * a.num_branches * a.x.size(1);
  TORCH_CHECK_VALUE(payload.dim() == 2 && payload.size(0) >= 1 && payload.size(1) == width,
                    op, ": payload must have shape [world_size, K + 3·K·C] = [*, ", width,
                    "], got ", shape_of(payload.sizes()));
}

inline void sync_bn_stats(const BnArgs& a) {
  bn_common(a.sync_op(), a);  // (the op has no weight, bias or FiLM: those are None)
  rank_of(a.sync_op(), a);
  nbt_of(a.sync_op(), a);
}

inline void sync_bn_apply(const BnArgs& a) {
  const char* op = a.sync_op();
  bn_args(op, a, /*training=*/true);
  payload_of(op, a);
  float_on(op, "old", a.old, a.x);
  TORCH_CHECK_VALUE(a.old.dim() == 1 && (a.old.size(0) == a.num_branches || a.old.size(0) == 0),
                    op, ": old must have shape [num_branches] or [0], got ",
                    shape_of(a.old.sizes()));
}

inline void sync_bn_grad_sums(const BnArgs& a) {
  bn_grad_args(a.sync_op(), a, /*batch_stats=*/false);
}

inline void sync_bn_dx(const BnArgs& a) {
  const char* op = a.sync_op();
  bn_grad_args(op, a, /*batch_stats=*/true);
  float_on(op, "sums", a.sums, a.x);
  shape_is(op, "sums", a.sums, {2, a.num_branches, a.x.size(1)}, "[2, num_branches, C]");
  float_on(op, "parts", a.parts, a.x);
  payload_of(op, a);
}

inline void sync_multi_bn(const BnArgs& a) {
  bn_args(a.sync_op(), a, /*training=*/true);
  rank_of(a.sync_op(), a);
}

}  // namespace fastrobust::checks
