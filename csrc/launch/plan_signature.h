// The signature of a call, the key of its launch plan (plans.cpp,
// fastrobust/ops/_triton/plan.py): everything the Python launchers decide from, and nothing else.
// Per argument: a tensor's dtype, device, sizes, strides, whether it is empty, 16-byte
// alignment of its first element (Triton specializes on it) and which earlier tensor argument
// shares its storage, at what byte distance; an int's, bool's or bool list's value. Not a
// float's value: the plans pass the op's floats to the kernels as replay arguments (a plan
// whose launcher decided on a float's value says so, and holds for that value only). Two calls
// with the same signature get the same launches with the same grids; only the tensors'
// addresses and the float arguments differ. An argument of another kind gives an empty
// signature: such a call is never replayed.
#pragma once
#include <ATen/core/ivalue.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace fastrobust {

namespace detail {
template <typename T>
inline void put(std::string& key, T v) {
  key.append(reinterpret_cast<const char*>(&v), sizeof(T));
}
}  // namespace detail

inline std::string plan_signature(const std::string& op, c10::ArrayRef<c10::IValue> args) {
  using detail::put;
  std::string key;
  key.reserve(64 + 48 * args.size());
  key += op;
  key += '\0';
  std::vector<const at::Tensor*> tensors;
  for (const auto& a : args) {
    if (a.isNone()) {
      key += 'N';
    } else if (a.isTensor()) {
      const at::Tensor& t = a.toTensor();
      key += 'T';
      put<int8_t>(key, static_cast<int8_t>(t.scalar_type()));
      put<int8_t>(key, static_cast<int8_t>(t.device().type()));
      put<int8_t>(key, t.device().index());
      put<int8_t>(key, static_cast<int8_t>(t.dim()));
      for (int64_t d = 0; d < t.dim(); ++d) {
        put<int64_t>(key, t.size(d));
        put<int64_t>(key, t.stride(d));
      }
      const bool empty = t.numel() == 0;
      const auto ptr = empty ? 0 : reinterpret_cast<uintptr_t>(t.data_ptr());
      put<int8_t>(key, static_cast<int8_t>(empty));
      put<int8_t>(key, static_cast<int8_t>(ptr % 16 == 0));
      int8_t alias = -1;
      int64_t distance = 0;
      if (!empty) {
        const void* storage = t.storage().data();
        for (size_t j = 0; j < tensors.size(); ++j) {
          const at::Tensor& o = *tensors[j];
          if (o.numel() && o.storage().data() == storage) {
            alias = static_cast<int8_t>(j);
            distance = static_cast<int64_t>(ptr - reinterpret_cast<uintptr_t>(o.data_ptr()));
            break;
          }
        }
      }
      put<int8_t>(key, alias);
      put<int64_t>(key, distance);
      tensors.push_back(&t);
    } else if (a.isBool()) {  // (before isInt: a bool is no int here)
      key += 'B';
      put<int8_t>(key, static_cast<int8_t>(a.toBool()));
    } else if (a.isInt()) {
      key += 'I';
      put<int64_t>(key, a.toInt());
    } else if (a.isDouble()) {  // (its value is a replay argument: plans.cpp)
      key += 'D';
    } else if (a.isBoolList()) {
      key += 'L';
      for (bool b : a.toBoolList()) key += b ? '1' : '0';
      key += ';';
    } else {
      return std::string();  // no signature: the call is never replayed
    }
  }
  return key;
}

}  // namespace fastrobust
