// The BN family's arguments, one struct: every op of the family (multi_bn, multi_bn_backward,
// multi_bn_grads_with_graph, the sync_bn_* halves, sync_multi_bn; schemas in ops.cpp) is
// registered as a boxed kernel that reads its stack into a BnArgs by the schema's argument
// names, and calls the family's other ops from a BnArgs the same way (call_bn). So the
// argument list is written in the schemas and in FASTROBUST_BN_ARGS below, and the checks, the
// CPU kernels, the autograd nodes and the synchronized BN's halves take the struct.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/SmallVector.h>

#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "../spec.h"

namespace fastrobust::bn {

using OptTensor = c10::optional<at::Tensor>;
using Flags = c10::SmallVector<bool, 8>;  // a bool[] argument (needs)

// multi_bn's arguments in its schema's order, then those of the family's other ops. Unset
// fields (an op without that argument) keep their defaults: None, an undefined tensor, 0.
#define FASTROBUST_BN_ARGS(X)                                                                \
  X(at::Tensor, x) X(OptTensor, branch) X(OptTensor, mix) X(OptTensor, weight)              \
  X(OptTensor, bias) X(OptTensor, running_mean) X(OptTensor, running_var)                   \
  X(OptTensor, num_batches_tracked) X(OptTensor, input_scale) X(OptTensor, film_gamma)      \
  X(OptTensor, film_beta) X(int64_t, num_branches) X(bool, training) X(double, momentum)    \
  X(bool, cumulative) X(double, eps) X(bool, relu)                                          \
  /* the backward's */                                                                      \
  X(at::Tensor, dy) X(at::Tensor, mean) X(at::Tensor, invstd) X(at::Tensor, planes)         \
  X(bool, batch_stats) X(Flags, needs)                                                      \
  /* the synchronized BN's */                                                               \
  X(at::Tensor, payload) X(at::Tensor, old) X(at::Tensor, sums) X(at::Tensor, parts)        \
  X(int64_t, rank) X(int64_t, world_size) X(std::string, group_name)

struct BnArgs {
#define FASTROBUST_BN_FIELD(type, name) type name{};
  FASTROBUST_BN_ARGS(FASTROBUST_BN_FIELD)
#undef FASTROBUST_BN_FIELD

  bool mixed() const { return mix.has_value(); }
  // The public function a message names.
  const char* op() const { return mixed() ? "mixed_batch_norm" : "multi_batch_norm"; }
  const char* sync_op() const {
    return mixed() ? "sync_mixed_batch_norm" : "sync_multi_batch_norm";
  }
  // Whether needs[g] is set (false past the flags given).
  bool need(int g) const { return size_t(g) < needs.size() && needs[g]; }
  void set_needs(std::initializer_list<bool> flags) { needs.assign(flags.begin(), flags.end()); }

  // fn(name, tensor) for each defined tensor field, in FASTROBUST_BN_ARGS order.
  template <typename F>
  void for_each_tensor(F&& fn) const;
  // The defined tensor fields, in that order: the autograd inputs of a node over a call.
  std::vector<at::Tensor> tensors() const {
    std::vector<at::Tensor> ts;
    for_each_tensor([&](const char*, const at::Tensor& t) { ts.push_back(t); });
    return ts;
  }
  // Sets the tensor field `name`.
  void set_tensor(const std::string& name, const at::Tensor& t);

  // The arguments of a call of `schema` (one of the family's ops), read by name.
  static BnArgs read(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> stack);
  // The stack of a call of `schema` with these arguments.
  std::vector<c10::IValue> stack_for(const c10::FunctionSchema& schema) const;
};

namespace detail {
inline void get(const c10::IValue& v, at::Tensor& t) { t = v.isNone() ? at::Tensor() : v.toTensor(); }
inline void get(const c10::IValue& v, OptTensor& t) {
  t = v.isNone() ? OptTensor() : OptTensor(v.toTensor());
}
inline void get(const c10::IValue& v, int64_t& i) { i = v.toInt(); }
inline void get(const c10::IValue& v, bool& b) { b = v.toBool(); }
inline void get(const c10::IValue& v, double& d) { d = v.toDouble(); }
inline void get(const c10::IValue& v, std::string& s) { s = v.toStringRef(); }
inline void get(const c10::IValue& v, Flags& f) {
  f.clear();
  for (bool b : v.toBoolList()) f.push_back(b);
}
inline c10::IValue put(const at::Tensor& t) { return t; }
inline c10::IValue put(const OptTensor& t) { return t.has_value() ? c10::IValue(*t) : c10::IValue(); }
inline c10::IValue put(int64_t i) { return i; }
inline c10::IValue put(bool b) { return b; }
inline c10::IValue put(double d) { return d; }
inline c10::IValue put(const std::string& s) { return s; }
inline c10::IValue put(const Flags& f) {
  c10::List<bool> l;
  for (bool b : f) l.push_back(b);
  return l;
}
inline const at::Tensor* tensor_of(const at::Tensor& t) { return t.defined() ? &t : nullptr; }
inline const at::Tensor* tensor_of(const OptTensor& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}
template <typename T>
const at::Tensor* tensor_of(const T&) {
  return nullptr;
}
inline bool set(at::Tensor& field, const at::Tensor& t) { return field = t, true; }
inline bool set(OptTensor& field, const at::Tensor& t) { return field = t, true; }
template <typename T>
bool set(T&, const at::Tensor&) {
  return false;
}
}  // namespace detail

template <typename F>
void BnArgs::for_each_tensor(F&& fn) const {
#define FASTROBUST_BN_TENSOR(type, field) \
  if (const at::Tensor* t = detail::tensor_of(field)) fn(#field, *t);
  FASTROBUST_BN_ARGS(FASTROBUST_BN_TENSOR)
#undef FASTROBUST_BN_TENSOR
}

inline void BnArgs::set_tensor(const std::string& name, const at::Tensor& t) {
#define FASTROBUST_BN_SET(type, field) \
  if (name == #field && detail::set(field, t)) return;
  FASTROBUST_BN_ARGS(FASTROBUST_BN_SET)
#undef FASTROBUST_BN_SET
  TORCH_CHECK(false, "BnArgs: no tensor field ", name);
}

namespace detail {
// The BnArgs fields, numbered in FASTROBUST_BN_ARGS order.
enum Field : int {
#define FASTROBUST_BN_ENUM(type, field) k_##field,
  FASTROBUST_BN_ARGS(FASTROBUST_BN_ENUM)
#undef FASTROBUST_BN_ENUM
};

// The field of each of a schema's arguments, by position: matched by name the first time the
// schema is seen (every call of the family reads or writes its stack through this, and the
// name comparisons cost more than the rest of a small call's bookkeeping).
inline const std::vector<int>& fields_of(const c10::FunctionSchema& schema) {
  // Leaked, as boxed_checks() is: a call from a thread still running at exit finds them.
  static std::mutex& mu = *new std::mutex;
  static auto& known = *new std::unordered_map<const c10::FunctionSchema*, std::vector<int>>;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(&schema);
  if (it != known.end()) return it->second;
  std::vector<int> fields;
  for (const auto& arg : schema.arguments()) {
    const std::string& name = arg.name();
    int f = -1;
#define FASTROBUST_BN_MATCH(type, field) \
  if (f < 0 && name == #field) f = k_##field;
    FASTROBUST_BN_ARGS(FASTROBUST_BN_MATCH)
#undef FASTROBUST_BN_MATCH
    TORCH_CHECK(f >= 0, schema.name(), ": argument ", name, " is no BnArgs field");
    fields.push_back(f);
  }
  return known.emplace(&schema, std::move(fields)).first->second;
}
}  // namespace detail

inline BnArgs BnArgs::read(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> stack) {
  BnArgs a;
  const auto& fields = detail::fields_of(schema);
  for (size_t i = 0; i < fields.size() && i < stack.size(); ++i) {
    switch (fields[i]) {
#define FASTROBUST_BN_GET(type, field)   \
  case detail::k_##field:                \
    detail::get(stack[i], a.field);      \
    break;
      FASTROBUST_BN_ARGS(FASTROBUST_BN_GET)
#undef FASTROBUST_BN_GET
    }
  }
  return a;
}

inline std::vector<c10::IValue> BnArgs::stack_for(const c10::FunctionSchema& schema) const {
  const auto& fields = detail::fields_of(schema);
  std::vector<c10::IValue> stack;
  stack.reserve(fields.size());
  for (int f : fields) {
    switch (f) {
#define FASTROBUST_BN_PUT(type, field)     \
  case detail::k_##field:                  \
    stack.push_back(detail::put(field));   \
    break;
      FASTROBUST_BN_ARGS(FASTROBUST_BN_PUT)
#undef FASTROBUST_BN_PUT
    }
  }
  return stack;
}

// The handle of op `name`, looked up in the dispatcher once.
inline c10::OperatorHandle bn_op(const char* name) {
  static std::mutex& mu = *new std::mutex;  // leaked, as fields_of's
  static auto& known = *new std::unordered_map<std::string, c10::OperatorHandle>;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(name);
  if (it != known.end()) return it->second;
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  known.emplace(name, op);
  return op;
}

// Op `name` (fastrobust::<name>) called with `a` through the dispatcher
// (below whatever keys the caller's guards exclude); its results, a Tensor[] result flattened.
inline std::vector<at::Tensor> call_bn(const char* name, const BnArgs& a) {
  const auto op = bn_op(name);
  auto stack = a.stack_for(op.schema());
  op.callBoxed(&stack);
  std::vector<at::Tensor> out;
  for (auto& v : stack) {
    if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) out.push_back(t);
    } else {
      out.push_back(v.isNone() ? at::Tensor() : v.toTensor());
    }
  }
  return out;
}

// A boxed kernel of the family: reads the call's BnArgs, runs fn, pushes its results.
template <std::vector<at::Tensor> (*fn)(const BnArgs&)>
void boxed(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  auto out = fn(BnArgs::read(op.schema(), torch::jit::last(*stack, n)));
  torch::jit::drop(*stack, n);
  for (auto& t : out) stack->emplace_back(std::move(t));
}

}  // namespace fastrobust::bn
