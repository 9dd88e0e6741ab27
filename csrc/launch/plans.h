// The launch plans' types shared by the replay (plans.cpp) and the launch targets: a launch
// as a plan holds it, and the Launcher a replay hands it to (the CUDA driver in cuda.cpp, the
// Python hook of the CPU tests or none in plans.cpp).
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/function_schema.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fastrobust::plans {

enum SlotKind : int8_t { kInput = 0, kAlloc = 1, kNull = 2, kInt = 3, kFloat = 4, kArg = 5 };

struct Param {
  SlotKind kind;
  int32_t index;   // kInput / kAlloc / kArg
  int64_t offset;  // kInput / kAlloc: bytes; kArg: the fp32 part (0 value, 1 and 2 remainders)
  int64_t ival;    // kInt
  double fval;     // kFloat
  int8_t size;     // bytes the kernel reads (pointers 8; i32 4, i64 8; fp32 4)
};

struct Launch {
  uintptr_t fn;  // CUfunction, or the launch hook's handle
  unsigned grid[3];
  unsigned block;
  unsigned shared;
  std::vector<Param> params;
  std::vector<size_t> sizes;  // of every parameter the target takes: params, then scratch
  std::string name;
};

// Where a plan's launches go.
class Launcher {
 public:
  virtual ~Launcher() = default;
  virtual char tag() const = 0;  // plans recorded for one launcher are not given to another
  // The size of each parameter L's kernel takes, as the launch target reports it (L.params
  // holds the recorded ones).
  virtual std::vector<size_t> param_sizes(const Launch& L) const = 0;
  virtual void launch(const Launch& L, void** params, const at::Device& device) const = 0;
  // Whether the current stream is being captured into a CUDA graph.
  virtual bool capturing(const at::Device&) const { return false; }
};


// The whole kernel of op `schema` on its boxed arguments: argument checks, signature, plan,
// replay on `launcher` or the Python launcher. Returns the op's results.
std::vector<at::Tensor> run(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> args,
                            const at::Device& device, const Launcher& launcher);

}  // namespace fastrobust::plans
