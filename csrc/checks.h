// The shared pieces of the argument checks every kernel runs before it reads or writes
// anything: the helpers each family's checks (csrc/<family>/checks.h) are written with, and the
// boxed dispatcher through which the kernels that hold an op's arguments as a stack (the CUDA
// key's launch path, csrc/launch/plans.cpp) and the kernels written in Python (eager, Triton,
// the fake implementations: fastrobust._C._check) run an op's checks by its name. A bad
// argument is one line naming the public function and the argument, as ATen's own ops do;
// nothing has been changed when it raises.
//
// Checked: dtypes, shapes, devices (every tensor on x's), scalar ranges, and the values of a
// per-sample eps where the host can read them without a sync (CPU tensors, whichever backend
// serves them: csrc/pgd/checks.h per_sample_nonnegative). Not checked: the other values inside
// tensors (a branch id out of range, a negative mix weight), which the kernels themselves
// check: CPU kernels raise on them, CUDA kernels make the affected sample NaN (as they do for a
// bad eps: reading it on the host would be a sync).
#pragma once
#include <ATen/core/function_schema.h>
#include <ATen/core/ivalue.h>
#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/SmallVector.h>

#include <cmath>
#include <string>
#include <unordered_map>

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
  TORCH_CHECK_TYPE(floating(t), op, ": ", name, " must be a floating-point tensor, got ",
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

// A C++ kernel's own precondition on an operand it reads as a flat array: x's dtype (the op's
// kernel converts the others first) and contiguous.
inline void kernel_operand(const char* op, const char* name, const OptTensor& t,
                           const at::Tensor& x) {
  if (!t) return;
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, " (cpu kernel): ", name, " dtype ",
              t->scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(t->is_contiguous(), op, " (cpu kernel): ", name, " must be contiguous");
}

// --- the boxed form: an op's arguments as the dispatcher holds them ------------------------

inline OptTensor opt(const c10::IValue& v) {
  return v.isNone() ? OptTensor() : OptTensor(v.toTensor());
}

inline c10::SmallVector<bool, 8> bools(const c10::IValue& v) {
  c10::SmallVector<bool, 8> r;  // (not std::vector<bool>: no ArrayRef of a bit vector)
  for (bool b : v.toBoolList()) r.push_back(b);
  return r;
}

// An op's checks on its boxed arguments (`a`: the schema's arguments in order).
using BoxedCheck = void (*)(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> a);

inline std::unordered_map<std::string, BoxedCheck>& boxed_checks() {
  static auto* table = new std::unordered_map<std::string, BoxedCheck>();
  return *table;
}

// Each family registers its ops' checks when the library loads (FASTROBUST_CHECKS in its
// ops.cpp); `name` without the namespace ("multi_bn", ...).
inline bool register_checks(std::initializer_list<std::pair<const char*, BoxedCheck>> checks) {
  for (const auto& [name, fn] : checks) boxed_checks()[name] = fn;
  return true;
}

// The checks of op `schema` (fastrobust::<name>) on its boxed arguments.
inline void check_boxed(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> a) {
  const std::string& name = schema.name();
  const auto it = boxed_checks().find(name.substr(name.find("::") + 2));
  if (it != boxed_checks().end()) it->second(schema, a);
}

}  // namespace fastrobust::checks

// Registers the boxed checks of a family's ops: FASTROBUST_CHECKS({"film", &film_boxed}, ...).
#define FASTROBUST_CHECKS_CAT2(a, b) a##b
#define FASTROBUST_CHECKS_CAT(a, b) FASTROBUST_CHECKS_CAT2(a, b)
#define FASTROBUST_CHECKS(...)                                                               \
  static const bool FASTROBUST_CHECKS_CAT(fastrobust_checks_, __COUNTER__) =                \
      ::fastrobust::checks::register_checks({__VA_ARGS__})
