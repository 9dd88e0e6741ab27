// The launch path of every fastrobust op: the Triton kernels, launched from C++ (the CUDA
// dispatch key's kernel, cuda.cpp).
//
// A call computes its signature (plan_signature.h) and looks up the launch plan recorded for
// it. A plan is what the op's Python launcher did the first time it saw that signature
// (fastrobust/ops/_triton/plan.py): its allocations, and each launch's Triton kernel, grid and
// parameters as slots (input i or allocation j at a byte offset, a null pointer, an int, a
// float constant, or the op's float argument i). Replaying it allocates the same tensors and
// launches the same kernels on the current stream: no Python, no host sync.
//
// The launch itself goes to a Launcher (plans.h): on CUDA the driver's cuLaunchKernel
// (cuda.cpp); in the CPU tests (`fastrobust._C._plan_call`) a Python hook that gets the same
// bytes and runs the kernel under the Triton interpreter. Everything here runs in both.
//
// An unseen signature calls the Python hook (fastrobust/ops/_triton/plan.py, set at import)
// under the GIL: it runs the launcher with a recorder and returns the results and the plan. A
// plan that cannot be replayed is remembered as such; calls with that signature keep taking
// the Python launcher, and the reason is warned once. `fastrobust info` prints the counts and
// reasons. Built by the host C++ compiler in every build (no device code, no CUDA toolkit).
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "../checks.h"
#include "plan_signature.h"
#include "plans.h"

namespace fastrobust::plans {
namespace {

namespace py = pybind11;

// --- plans ---------------------------------------------------------------------------------

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
  bool pinned = false;          // holds only for the float arguments it was recorded with
  std::vector<double> floats;   // those (every float argument, in order)
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
using Variants = std::vector<std::shared_ptr<const Plan>>;
std::unordered_map<std::string, Variants>& plans() {
  static auto* p = new std::unordered_map<std::string, Variants>();
  return *p;
}
std::set<std::string>& warned() {
  static auto* w = new std::set<std::string>();
  return *w;
}
PyObject*& hook() {
  static PyObject* h = nullptr;
  return h;
}
std::atomic<int64_t> replays{0}, python_calls{0}, n_plans{0};
// Past this many plans, new signatures take the Python launcher (warned once) instead of
// growing the table without bound; a signature keeps at most kMaxPinned plans pinned to float
// values (a launcher that decides on a float's value, under a schedule of that float).
constexpr int64_t kMaxPlans = 4096;
constexpr size_t kMaxPinned = 16;

at::ScalarType dtype_of(const py::handle& d) {
  return torch::python::detail::py_object_to_dtype(py::reinterpret_borrow<py::object>(d));
}

std::vector<int64_t> ints_of(const py::handle& seq) {
  std::vector<int64_t> v;
  for (auto x : seq) v.push_back(x.cast<int64_t>());
  return v;
}

// The parameter types the replay writes: pointers, 32/64-bit ints and fp32 (an fp64 scalar
// comes as three fp32 parts, plan.py fp32_parts); the package's kernels take no others.
int8_t size_of_type(const std::string& ty) {
  if (!ty.empty() && ty[0] == '*') return 8;
  if (ty == "i64") return 8;
  if (ty == "i32" || ty == "fp32") return 4;
  return 0;
}

std::vector<double> floats_of(c10::ArrayRef<c10::IValue> args) {
  std::vector<double> f;
  for (const auto& a : args)
    if (a.isDouble()) f.push_back(a.toDouble());
  return f;
}

// Parses the Python hook's plan (fastrobust/ops/_triton/plan.py Plan.for_cpp) and checks every
// launch's parameter layout against the launch target's.
std::shared_ptr<const Plan> parse_plan(const py::handle& p, size_t n_returns,
                                       const Launcher& launcher,
                                       c10::ArrayRef<c10::IValue> args) {
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
  plan->pinned = d["pinned"].cast<bool>();
  plan->floats = floats_of(args);
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
  for (auto l : d["launches"]) {
    auto t = l.cast<py::tuple>();
    Launch L;
    L.fn = t[0].cast<uintptr_t>();
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
      const auto ty = s[4].cast<std::string>();
      P.size = size_of_type(ty);
      if (P.size == 0) {
        plan->why_not = L.name + ": parameter type " + ty + " has no replay";
        return plan;
      }
      if (P.kind == kArg && !(P.index >= 0 && size_t(P.index) < args.size() &&
                              args[P.index].isDouble() && P.offset >= 0 && P.offset < 3)) {
        plan->why_not = L.name + ": a float parameter from argument " +
                        std::to_string(P.index) + ", which is no float";
        return plan;
      }
      L.params.push_back(P);
    }
    // The target's own view of the parameters: the recorded ones, then the scratch pointers
    // a Triton version appends (global, profile), which these kernels do not use.
    L.sizes = launcher.param_sizes(L);
    const size_t n = L.sizes.size();
    if (n < L.params.size() || n > L.params.size() + 2) {
      plan->why_not = L.name + ": the kernel takes " + std::to_string(n) + " parameters for " +
                      std::to_string(L.params.size()) + " recorded";
      return plan;
    }
    for (size_t i = 0; i < n; ++i) {
      const size_t want = i < L.params.size() ? size_t(L.params[i].size) : 8;
      if (L.sizes[i] != want) {
        plan->why_not = L.name + ": parameter " + std::to_string(i) + " is " +
                        std::to_string(L.sizes[i]) + " bytes for the kernel, not the recorded " +
                        std::to_string(want);
        return plan;
      }
    }
    plan->launches.push_back(std::move(L));
  }
  // The compiled kernels own the CUfunctions: keep them alive for the process.
  Py_INCREF(d["keep"].ptr());
  plan->replayable = true;
  return plan;
}

// fp32 part `part` of v (fastrobust/ops/_triton/plan.py fp32_parts): hi = fp32(v), then the
// fp32 roundings of what is left, so that hi + mid + lo == v in fp64.
float fp32_part(double v, int64_t part) {
  // (past fp32's range, rounding to nearest gives inf: said explicitly, the cast would not)
  const float hi = std::fabs(v) >= 3.4028235677973366e38
                       ? std::copysign(std::numeric_limits<float>::infinity(), float(v))
                       : static_cast<float>(v);
  if (part == 0) return hi;
  if (!std::isfinite(hi)) return 0.0f;
  const float mid = static_cast<float>(v - double(hi));
  if (part == 1) return mid;
  return static_cast<float>(v - double(hi) - double(mid));
}

// --- the replay ----------------------------------------------------------------------------

std::vector<at::Tensor> replay(const Plan& plan, c10::ArrayRef<c10::IValue> args,
                               const at::Device& device, const Launcher& launcher) {
  std::vector<at::Tensor> allocs;
  allocs.reserve(plan.allocs.size());
  for (const auto& a : plan.allocs)
    allocs.push_back(at::empty_strided(a.sizes, a.strides,
                                       at::TensorOptions().dtype(a.dtype).device(device)));
  std::vector<uint64_t> values;
  std::vector<void*> ptrs;
  for (const auto& L : plan.launches) {
    if (uint64_t(L.grid[0]) * L.grid[1] * L.grid[2] == 0) continue;  // (Triton skips it too)
    const size_t n = L.sizes.size();
    values.assign(n, 0);  // (the scratch pointers stay null)
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
        case kArg: {
          const float f = P.kind == kFloat ? static_cast<float>(P.fval)
                                           : fp32_part(args[P.index].toDouble(), P.offset);
          std::memcpy(&v, &f, 4);
          break;
        }
      }
      values[i] = v;
    }
    for (size_t i = 0; i < n; ++i) ptrs[i] = &values[i];
    launcher.launch(L, ptrs.data(), device);
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
std::vector<at::Tensor> through_python(const c10::FunctionSchema& schema,
                                       c10::ArrayRef<c10::IValue> args, bool record,
                                       const Launcher& launcher,
                                       std::shared_ptr<const Plan>* plan) {
  py::gil_scoped_acquire gil;
  TORCH_CHECK(hook() != nullptr,
              "fastrobust: the launch plans' Python side is not set up (import fastrobust)");
  py::tuple pyargs(args.size());
  for (size_t i = 0; i < args.size(); ++i) pyargs[i] = torch::jit::toPyObject(args[i]);
  py::object fn = py::reinterpret_borrow<py::object>(hook());
  py::tuple res = fn(schema.name(), pyargs, record);
  const size_t n_returns = schema.returns().size();
  if (record) {
    // The launcher has run (running statistics, x_adv updated): a plan that cannot be read
    // is remembered as not replayable rather than failing a call that succeeded.
    try {
      *plan = parse_plan(res[1], n_returns, launcher, args);
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

// Says once per reason that calls take the Python launcher.
void warn_once(const std::string& op, const std::string& why) {
  const std::string key = op + ": " + why;
  {
    std::lock_guard<std::mutex> lock(plans_mutex());
    if (!warned().insert(key).second) return;
  }
  TORCH_WARN("fastrobust: ", key, "; calls like this one run the Python launcher (about a ",
             "millisecond of host time each). `fastrobust info` lists every such reason.");
}

// The plan for this call: a stored one whose pinned floats (if any) match, else none.
std::shared_ptr<const Plan> lookup(const std::string& key, c10::ArrayRef<c10::IValue> args,
                                   bool* full) {
  std::lock_guard<std::mutex> lock(plans_mutex());
  *full = n_plans.load() >= kMaxPlans;
  auto it = plans().find(key);
  if (it == plans().end()) return nullptr;
  std::vector<double> floats;
  bool have = false;
  for (const auto& p : it->second) {
    if (!p->pinned) return p;
    if (!have) floats = floats_of(args), have = true;
    if (p->floats == floats) return p;
  }
  *full = *full || it->second.size() >= kMaxPinned;
  return nullptr;
}

// --- the launch hook of the CPU tests --------------------------------------------------------

class HookLauncher final : public Launcher {
 public:
  explicit HookLauncher(py::object hook) : hook_(std::move(hook)) {}
  char tag() const override { return 'H'; }
  std::vector<size_t> param_sizes(const Launch& L) const override {
    py::gil_scoped_acquire gil;
    std::vector<size_t> sizes;
    for (auto s : hook_.attr("param_sizes")(L.fn)) sizes.push_back(s.cast<size_t>());
    return sizes;
  }
  void launch(const Launch& L, void** params, const at::Device&) const override {
    py::gil_scoped_acquire gil;
    py::list bytes;
    for (size_t i = 0; i < L.sizes.size(); ++i)
      bytes.append(py::bytes(static_cast<const char*>(params[i]), L.sizes[i]));
    hook_(L.fn, py::make_tuple(L.grid[0], L.grid[1], L.grid[2]), L.block, L.shared, bytes);
  }
  bool capturing(const at::Device&) const override {
    py::gil_scoped_acquire gil;
    return py::hasattr(hook_, "capturing") && hook_.attr("capturing").cast<bool>();
  }

 private:
  py::object hook_;
};

// Launches nothing: the host cost of a replay alone (benchmarks/host_frames.py).
class NullLauncher final : public Launcher {
 public:
  char tag() const override { return 'N'; }
  std::vector<size_t> param_sizes(const Launch& L) const override {
    std::vector<size_t> sizes;
    for (const auto& P : L.params) sizes.push_back(size_t(P.size));
    return sizes;
  }
  void launch(const Launch&, void**, const at::Device&) const override {}
};

// fastrobust._C._plan_call(name, hook, *args): op `name` on CPU tensors through the whole
// kernel above, its launches handed to `hook` (fastrobust.ops._triton.plan.InterpreterLaunch),
// or to none when `hook` is None.
py::object plan_call(const std::string& name, py::object hook, py::args args) {
  HANDLE_TH_ERRORS  // (C++ warnings reach Python as warnings, as through torch.ops)
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
  auto stack = torch::jit::createStackForSchema(op.schema(), args, py::kwargs(), std::nullopt);
  static const NullLauncher null_launcher;
  const HookLauncher hook_launcher(hook);
  const Launcher& launcher = hook.is_none() ? static_cast<const Launcher&>(null_launcher)
                                            : hook_launcher;
  std::vector<at::Tensor> outs;
  {
    py::gil_scoped_release nogil;  // (as the dispatcher calls the CUDA kernel)
    outs = run(op.schema(), stack, at::Device(at::kCPU), launcher);
  }
  if (op.schema().returns().empty()) return py::none();
  py::tuple t(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) t[i] = py::cast(outs[i]);
  return std::move(t);
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

// The whole kernel: argument checks, signature, plan, replay or the Python launcher.
std::vector<at::Tensor> run(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> args,
                            const at::Device& device, const Launcher& launcher) {
  const std::string& name = schema.name();
  checks::check_boxed(schema, args);
  const c10::DeviceGuard guard(device);
  std::string key = plan_signature(name, args);
  const bool describable = !key.empty();
  key += launcher.tag();
  bool full = false;
  auto plan = describable ? lookup(key, args, &full) : nullptr;
  if (plan && plan->replayable) {
    ++replays;
    return replay(*plan, args, device, launcher);
  }
  ++python_calls;
  if (plan) {  // recorded, not replayable: said once
    warn_once(name, plan->why_not);
    std::shared_ptr<const Plan> unused;
    return through_python(schema, args, false, launcher, &unused);
  }
  if (!describable || full) {
    warn_once(name, !describable ? "an argument the call signature cannot describe"
                                 : "more call signatures than the plan table holds (" +
                                       std::to_string(kMaxPlans) + ", or " +
                                       std::to_string(kMaxPinned) +
                                       " float values of one signature)");
    std::shared_ptr<const Plan> unused;
    return through_python(schema, args, false, launcher, &unused);
  }
  // Recording runs the Python launcher, whose first launch of a kernel compiles and loads it:
  // not something to do inside a CUDA graph capture.
  TORCH_CHECK(!launcher.capturing(device), "fastrobust: ", name,
              " is called inside a CUDA graph capture with a call signature it has not seen: "
              "run the captured code once before capturing (the warm-up torch.cuda.graph asks "
              "for), so that its launch plan is recorded outside the capture");
  std::shared_ptr<const Plan> recorded;
  auto outs = through_python(schema, args, true, launcher, &recorded);
  {
    std::lock_guard<std::mutex> lock(plans_mutex());
    auto& variants = plans()[key];
    if (!recorded->pinned) variants.clear();  // (pinned ones it now serves)
    variants.push_back(recorded);
    ++n_plans;
  }
  if (!recorded->replayable) warn_once(name, recorded->why_not);
  return outs;
}

void set_plan_hook(py::object fn) {
  PyObject*& h = hook();
  Py_XDECREF(h);
  h = fn.release().ptr();
}

// {plans, not replayable, replayed calls, calls through Python}
py::dict plan_stats() {
  std::lock_guard<std::mutex> lock(plans_mutex());
  int64_t refused = 0, stored = 0;
  for (const auto& [k, variants] : plans())
    for (const auto& p : variants) ++stored, refused += !p->replayable;
  py::dict d;
  d["plans"] = stored;
  d["not_replayable"] = refused;
  d["replayed_calls"] = replays.load();
  d["python_calls"] = python_calls.load();
  return d;
}

// Every reason a call took the Python launcher, once each.
std::vector<std::string> plan_refusals() {
  std::lock_guard<std::mutex> lock(plans_mutex());
  return {warned().begin(), warned().end()};
}

void register_python(py::module& m) {
  m.def("_set_plan_hook", &set_plan_hook);
  m.def("_plan_stats", &plan_stats);
  m.def("_plan_refusals", &plan_refusals);
  m.def("_plan_call", &plan_call);
#ifdef FASTROBUST_WITH_CUDA
  m.attr("CUDA_LAUNCH_PATH") = true;
#else
  m.attr("CUDA_LAUNCH_PATH") = false;
#endif
}

}  // namespace fastrobust::plans
