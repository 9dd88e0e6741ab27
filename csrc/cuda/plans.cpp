// The CUDA dispatch key's kernel of every fastrobust op: Triton kernels launched from C++.
//
// A call computes its signature (plan_signature.h) and looks up the launch plan recorded for
// it. A plan is what the op's Python launcher did the first time it saw that signature
// (fastrobust/kernels/_plan.py): its allocations, and each launch's compiled Triton kernel,
// grid and arguments as slots (input i or allocation j at a byte offset, a null pointer, an int
// or a float). Replaying it allocates the same tensors and launches the same kernels with
// cuLaunchKernel on the current stream: no Python, no host sync, CUDA-graph capturable.
//
// An unseen signature calls the Python hook (set at import by fastrobust._ops) under the GIL:
// it runs the launcher with a recorder and returns the results and the plan. A plan that cannot
// be replayed (the launcher copied or filled data, a kernel needs launch options the replay
// lacks, the driver reports a parameter layout other than the recorded one) is remembered as
// such, and calls with that signature keep taking the Python launcher: correct, at Python's
// cost, and `fastrobust info` counts them.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "../checks.h"
#include "../plan_signature.h"

namespace fastrobust::cuda {
namespace {

namespace py = pybind11;

// --- the driver entry points, from the libcuda.so.1 that torch and triton already loaded -----

using LaunchFn = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                              unsigned, unsigned, CUstream, void**, void**);
using ParamInfoFn = CUresult (*)(CUfunction, size_t, size_t*, size_t*);
using ErrorStringFn = CUresult (*)(CUresult, const char**);
using CtxGetCurrentFn = CUresult (*)(CUcontext*);
using CtxSetCurrentFn = CUresult (*)(CUcontext);
using DeviceGetFn = CUresult (*)(CUdevice*, int);
using PrimaryCtxRetainFn = CUresult (*)(CUcontext*, CUdevice);

struct Driver {
  LaunchFn launch = nullptr;
  ParamInfoFn param_info = nullptr;  // CUDA 12.4+ drivers
  ErrorStringFn error_string = nullptr;
  CtxGetCurrentFn ctx_get = nullptr;
  CtxSetCurrentFn ctx_set = nullptr;
  DeviceGetFn device_get = nullptr;
  PrimaryCtxRetainFn primary_retain = nullptr;
  Driver() {
    void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (!lib) lib = dlopen("libcuda.so.1", RTLD_LAZY);
    if (!lib) return;
    launch = reinterpret_cast<LaunchFn>(dlsym(lib, "cuLaunchKernel"));
    param_info = reinterpret_cast<ParamInfoFn>(dlsym(lib, "cuFuncGetParamInfo"));
    error_string = reinterpret_cast<ErrorStringFn>(dlsym(lib, "cuGetErrorString"));
    ctx_get = reinterpret_cast<CtxGetCurrentFn>(dlsym(lib, "cuCtxGetCurrent"));
    ctx_set = reinterpret_cast<CtxSetCurrentFn>(dlsym(lib, "cuCtxSetCurrent"));
    device_get = reinterpret_cast<DeviceGetFn>(dlsym(lib, "cuDeviceGet"));
    primary_retain = reinterpret_cast<PrimaryCtxRetainFn>(dlsym(lib, "cuDevicePrimaryCtxRetain"));
  }
  // A thread that has not touched CUDA yet (an autograd or DataParallel worker replaying a
  // plan another thread recorded) has no current context, and the runtime's device guard
  // does not bind one when the device number already matches: bind the device's primary
  // context, as Triton's own launcher does before every launch.
  void ensure_context(int device) const {
    CUcontext ctx = nullptr;
    if (!ctx_get || ctx_get(&ctx) != CUDA_SUCCESS || ctx) return;
    CUdevice dev;
    if (device_get(&dev, device) == CUDA_SUCCESS && primary_retain(&ctx, dev) == CUDA_SUCCESS)
      ctx_set(ctx);
  }
  std::string error(CUresult r) const {
    const char* s = nullptr;
    if (error_string) error_string(r, &s);
    return s ? s : ("CUDA driver error " + std::to_string(int(r)));
  }
};

const Driver& driver() {
  static const Driver d;
  return d;
}

// --- plans ---------------------------------------------------------------------------------

enum SlotKind : int8_t { kInput = 0, kAlloc = 1, kNull = 2, kInt = 3, kFloat = 4 };

struct Param {
  SlotKind kind;
  int32_t index;   // kInput / kAlloc
  int64_t offset;  // kInput / kAlloc: bytes
  int64_t ival;    // kInt
  double fval;     // kFloat
  int8_t size;     // bytes the kernel reads (pointers 8; ints 1-8; fp32 4; fp64 8)
  bool is_float;
};

struct Launch {
  CUfunction fn;
  unsigned grid[3];
  unsigned block;
  unsigned shared;
  std::vector<Param> params;
  size_t scratch;  // trailing scratch-pointer parameters the replay passes as null
  std::string name;
};

struct Alloc {
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
};

struct Output {
  int kind;  // 0: allocation `index`; 1: a fresh empty tensor; 2: no value
  int index;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
};

struct Plan {
  bool replayable = false;
  std::string why_not;
  std::vector<Alloc> allocs;
  std::vector<Launch> launches;
  std::vector<Output> outputs;
};

std::mutex& plans_mutex() {
  static std::mutex m;
  return m;
}
// Never destroyed: a plan holds references to Python objects (the compiled kernels), which
// must not be released after the interpreter is gone.
std::unordered_map<std::string, std::shared_ptr<const Plan>>& plans() {
  static auto* p = new std::unordered_map<std::string, std::shared_ptr<const Plan>>();
  return *p;
}
PyObject*& hook() {
  static PyObject* h = nullptr;
  return h;
}
std::atomic<int64_t> replays{0}, python_calls{0};
constexpr size_t kMaxPlans = 4096;

at::ScalarType dtype_of(const py::handle& d) {
  return torch::python::detail::py_object_to_dtype(py::reinterpret_borrow<py::object>(d));
}

std::vector<int64_t> ints_of(const py::handle& seq) {
  std::vector<int64_t> v;
  for (auto x : seq) v.push_back(x.cast<int64_t>());
  return v;
}

// The parameter types the replay writes (pointers, 32/64-bit ints, fp32, fp64); the package's
// kernels take no others (bools and fp16 / bf16 scalars would need their own encodings).
int8_t size_of_type(const std::string& ty, bool& is_float, bool& ok) {
  ok = true;
  is_float = false;
  if (!ty.empty() && ty[0] == '*') return 8;
  if (ty == "i64" || ty == "u64") return 8;
  if (ty == "i32" || ty == "u32") return 4;
  is_float = true;
  if (ty == "fp32" || ty == "f32") return 4;
  if (ty == "fp64") return 8;
  ok = false;
  return 0;
}

// Parses the Python hook's plan (fastrobust/kernels/_plan.py Plan.for_cpp) and checks every
// launch's parameter layout against the driver's.
std::shared_ptr<const Plan> parse_plan(const py::handle& p, size_t n_returns) {
  auto plan = std::make_shared<Plan>();
  if (p.is_none()) {
    plan->why_not = "the launcher could not be recorded";
    return plan;
  }
  const py::dict d = py::reinterpret_borrow<py::dict>(p);
  if (!d["why_not"].is_none()) {
    plan->why_not = d["why_not"].cast<std::string>();
    return plan;
  }
  for (auto a : d["allocs"]) {
    auto t = a.cast<py::tuple>();
    plan->allocs.push_back({ints_of(t[0]), ints_of(t[1]), dtype_of(t[2])});
  }
  size_t values = 0;
  for (auto o : d["outputs"]) {
    if (o.is_none()) {
      plan->outputs.push_back({2, -1, {}, {}, at::kFloat});
      continue;
    }
    ++values;
    auto t = o.cast<py::tuple>();
    if (t[0].cast<std::string>() == "alloc")
      plan->outputs.push_back({0, t[1].cast<int>(), {}, {}, at::kFloat});
    else
      plan->outputs.push_back({1, -1, ints_of(t[1]), ints_of(t[2]), dtype_of(t[3])});
  }
  if (values != n_returns) {
    plan->why_not = "the launcher gave " + std::to_string(values) + " results for " +
                    std::to_string(n_returns) + " in the schema";
    return plan;
  }
  const Driver& drv = driver();
  for (auto l : d["launches"]) {
    auto t = l.cast<py::tuple>();
    Launch L;
    L.fn = reinterpret_cast<CUfunction>(t[0].cast<uintptr_t>());
    L.block = 32u * t[1].cast<unsigned>();
    L.shared = t[2].cast<unsigned>();
    auto grid = ints_of(t[3]);
    for (int i = 0; i < 3; ++i) L.grid[i] = unsigned(grid[i]);
    L.name = t[5].cast<std::string>();
    for (auto q : t[4]) {
      auto s = q.cast<py::tuple>();
      Param P{};
      P.kind = SlotKind(s[0].cast<int>());
      P.index = s[1].cast<int32_t>();
      P.offset = s[2].cast<int64_t>();
      if (P.kind == kInt) P.ival = s[3].cast<int64_t>();
      if (P.kind == kFloat) P.fval = s[3].cast<double>();
      bool ok = false;
      P.size = size_of_type(s[4].cast<std::string>(), P.is_float, ok);
      if (!ok) {
        plan->why_not = L.name + ": parameter type " + s[4].cast<std::string>() +
                        " has no replay";
        return plan;
      }
      L.params.push_back(P);
    }
    // The driver's own view of the parameters: the recorded ones, then the scratch pointers
    // a Triton version appends (global, profile), which these kernels do not use.
    if (!drv.launch || !drv.param_info) {
      plan->why_not = "the CUDA driver lacks cuLaunchKernel or cuFuncGetParamInfo";
      return plan;
    }
    size_t i = 0, offset = 0, size = 0;
    for (; drv.param_info(L.fn, i, &offset, &size) == CUDA_SUCCESS; ++i) {
      if (i < L.params.size() ? size != size_t(L.params[i].size) : size != 8) {
        plan->why_not = L.name + ": parameter " + std::to_string(i) + " is " +
                        std::to_string(size) + " bytes for the driver, not the recorded " +
                        std::to_string(i < L.params.size() ? L.params[i].size : 8);
        return plan;
      }
    }
    if (i < L.params.size() || i > L.params.size() + 2) {
      plan->why_not = L.name + ": the driver reports " + std::to_string(i) +
                      " parameters for " + std::to_string(L.params.size()) + " recorded";
      return plan;
    }
    L.scratch = i - L.params.size();
    plan->launches.push_back(std::move(L));
  }
  // The compiled kernels own the CUfunctions: keep them alive for the process.
  Py_INCREF(d["keep"].ptr());
  plan->replayable = true;
  return plan;
}

// --- the kernel ----------------------------------------------------------------------------

std::vector<at::Tensor> replay(const Plan& plan, c10::ArrayRef<c10::IValue> args,
                               const at::Device& device) {
  std::vector<at::Tensor> allocs;
  allocs.reserve(plan.allocs.size());
  for (const auto& a : plan.allocs)
    allocs.push_back(at::empty_strided(a.sizes, a.strides,
                                       at::TensorOptions().dtype(a.dtype).device(device)));
  const CUstream stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  driver().ensure_context(device.index());
  std::vector<uint64_t> values;
  std::vector<void*> ptrs;
  for (const auto& L : plan.launches) {
    if (uint64_t(L.grid[0]) * L.grid[1] * L.grid[2] == 0) continue;  // (Triton skips it too)
    const size_t n = L.params.size() + L.scratch;
    values.assign(n, 0);
    ptrs.resize(n);
    for (size_t i = 0; i < L.params.size(); ++i) {
      const Param& P = L.params[i];
      uint64_t v = 0;
      switch (P.kind) {
        case kInput:
          v = reinterpret_cast<uint64_t>(args[P.index].toTensor().data_ptr()) + P.offset;
          break;
        case kAlloc:
          v = reinterpret_cast<uint64_t>(allocs[P.index].data_ptr()) + P.offset;
          break;
        case kNull:
          break;
        case kInt:
          std::memcpy(&v, &P.ival, P.size);  // little-endian: the low bytes
          break;
        case kFloat:
          if (P.size == 4) {
            const float f = static_cast<float>(P.fval);
            std::memcpy(&v, &f, 4);
          } else {
            std::memcpy(&v, &P.fval, 8);
          }
          break;
      }
      values[i] = v;
    }
    for (size_t i = 0; i < n; ++i) ptrs[i] = &values[i];
    const CUresult r = driver().launch(L.fn, L.grid[0], L.grid[1], L.grid[2], L.block, 1, 1,
                                       L.shared, stream, ptrs.data(), nullptr);
    TORCH_CHECK(r == CUDA_SUCCESS, "fastrobust: launching the Triton kernel ", L.name,
                " failed: ", driver().error(r));
  }
  std::vector<at::Tensor> outs;
  for (const auto& o : plan.outputs) {
    if (o.kind == 0)
      outs.push_back(allocs[o.index]);
    else if (o.kind == 1)
      outs.push_back(at::empty_strided(o.sizes, o.strides,
                                       at::TensorOptions().dtype(o.dtype).device(device)));
  }
  return outs;
}

// Runs the op's Python launcher through the hook; returns its results and, if `record`, the
// plan for this signature.
std::vector<at::Tensor> through_python(const c10::OperatorHandle& op,
                                       c10::ArrayRef<c10::IValue> args, bool record,
                                       std::shared_ptr<const Plan>* plan) {
  py::gil_scoped_acquire gil;
  TORCH_CHECK(hook() != nullptr,
              "fastrobust: the CUDA kernels' Python side is not set up (import fastrobust)");
  py::tuple pyargs(args.size());
  for (size_t i = 0; i < args.size(); ++i) pyargs[i] = torch::jit::toPyObject(args[i]);
  py::object fn = py::reinterpret_borrow<py::object>(hook());
  py::tuple res = fn(op.schema().name(), pyargs, record);
  const size_t n_returns = op.schema().returns().size();
  if (record) {
    // The launcher has run (running statistics, x_adv updated): a plan that cannot be read
    // is remembered as not replayable rather than failing a call that succeeded.
    try {
      *plan = parse_plan(res[1], n_returns);
    } catch (const std::exception& e) {
      auto refused = std::make_shared<Plan>();
      refused->why_not = std::string("the plan could not be read: ") + e.what();
      *plan = refused;
    }
  }
  std::vector<at::Tensor> outs;
  py::object out = res[0];
  if (n_returns == 1 && THPVariable_Check(out.ptr())) {
    outs.push_back(out.cast<at::Tensor>());
  } else if (n_returns > 0) {
    for (auto t : out) outs.push_back(t.cast<at::Tensor>());
  }
  return outs;
}

void plan_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  auto args = torch::jit::last(*stack, n);
  const std::string& name = op.schema().name();
  checks::check_boxed(name.substr(name.find("::") + 2), args);
  at::Device device(at::kCUDA, 0);
  for (const auto& a : args)
    if (a.isTensor() && a.toTensor().is_cuda()) {
      device = a.toTensor().device();
      break;
    }
  const c10::cuda::CUDAGuard guard(device);
  const std::string key = plan_signature(op.schema().name(), args);
  std::shared_ptr<const Plan> plan;
  bool keep = !key.empty();  // (empty: an argument the signature cannot describe)
  {
    std::lock_guard<std::mutex> lock(plans_mutex());
    auto it = keep ? plans().find(key) : plans().end();
    if (it != plans().end()) plan = it->second;
    // Each new float value (an eps schedule, say) is a new signature: past this many, new
    // signatures take the Python launcher instead of growing the table without bound.
    if (plans().size() >= kMaxPlans) keep = false;
  }
  if (!plan && !keep) {
    std::shared_ptr<const Plan> unused;
    auto outs = through_python(op, args, /*record=*/false, &unused);
    ++python_calls;
    torch::jit::drop(*stack, n);
    for (auto& t : outs) stack->emplace_back(std::move(t));
    return;
  }
  std::vector<at::Tensor> outs;
  if (plan && plan->replayable) {
    outs = replay(*plan, args, device);
    ++replays;
  } else {
    std::shared_ptr<const Plan> recorded;
    outs = through_python(op, args, /*record=*/!plan, &recorded);
    ++python_calls;
    if (!plan) {
      std::lock_guard<std::mutex> lock(plans_mutex());
      plans().emplace(key, recorded);
    }
  }
  torch::jit::drop(*stack, n);
  for (auto& t : outs) stack->emplace_back(std::move(t));
}

}  // namespace

void set_plan_hook(py::object fn) {
  PyObject*& h = hook();
  Py_XDECREF(h);
  h = fn.release().ptr();
}

// (signatures stored, of them not replayable, replayed calls, calls through Python)
std::tuple<int64_t, int64_t, int64_t, int64_t> plan_stats() {
  std::lock_guard<std::mutex> lock(plans_mutex());
  int64_t refused = 0;
  for (const auto& [k, p] : plans()) refused += p && !p->replayable;
  return {int64_t(plans().size()), refused, replays.load(), python_calls.load()};
}

std::vector<std::string> plan_refusals() {
  std::lock_guard<std::mutex> lock(plans_mutex());
  std::vector<std::string> why;
  for (const auto& [k, p] : plans())
    if (p && !p->replayable) why.push_back(k.substr(0, k.find('\0')) + ": " + p->why_not);
  return why;
}

TORCH_LIBRARY_IMPL(fastrobust, CUDA, m) {
  for (const char* name : {"multi_bn", "multi_bn_backward", "film", "film_backward", "add_relu",
                           "pgd_step", "pgd_init", "mifgsm_step"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&plan_kernel>());
}

}  // namespace fastrobust::cuda
