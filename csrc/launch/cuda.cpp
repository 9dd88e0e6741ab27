// The CUDA dispatch key's kernel of every op: the launch plans (plans.cpp) replayed through the
// CUDA driver's cuLaunchKernel on the current stream. Each family registers its ops with one
// line (FASTROBUST_LAUNCH_ON_CUDA, cuda.h). Built with a CUDA build of torch only
// (FASTROBUST_WITH_CUDA); the host compiler builds it, with no CUDA toolkit: the driver is
// reached through dlopen, and only the CUDA stream comes from torch's CUDA headers.
#ifdef FASTROBUST_WITH_CUDA
#include <torch/library.h>

#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#include <dlfcn.h>

#include <string>
#include <vector>

#include "cuda.h"
#include "plans.h"

namespace fastrobust::plans {
namespace {

// The driver entry points, from the libcuda.so.1 that torch and triton already loaded (no
// driver header: the handles are pointers, the results ints).
using CUresult = int;
using LaunchFn = CUresult (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned,
                              unsigned, unsigned, void*, void**, void**);
using ParamInfoFn = CUresult (*)(void*, size_t, size_t*, size_t*);
using ErrorStringFn = CUresult (*)(CUresult, const char**);
using CtxGetCurrentFn = CUresult (*)(void**);
using CtxSetCurrentFn = CUresult (*)(void*);
using DeviceGetFn = CUresult (*)(int*, int);
using PrimaryCtxRetainFn = CUresult (*)(void**, int);

class DriverLauncher final : public Launcher {
 public:
  DriverLauncher() {
    void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (!lib) lib = dlopen("libcuda.so.1", RTLD_LAZY);
    if (!lib) return;
    launch_ = reinterpret_cast<LaunchFn>(dlsym(lib, "cuLaunchKernel"));
    param_info_ = reinterpret_cast<ParamInfoFn>(dlsym(lib, "cuFuncGetParamInfo"));
    error_string_ = reinterpret_cast<ErrorStringFn>(dlsym(lib, "cuGetErrorString"));
    ctx_get_ = reinterpret_cast<CtxGetCurrentFn>(dlsym(lib, "cuCtxGetCurrent"));
    ctx_set_ = reinterpret_cast<CtxSetCurrentFn>(dlsym(lib, "cuCtxSetCurrent"));
    device_get_ = reinterpret_cast<DeviceGetFn>(dlsym(lib, "cuDeviceGet"));
    primary_retain_ =
        reinterpret_cast<PrimaryCtxRetainFn>(dlsym(lib, "cuDevicePrimaryCtxRetain"));
  }
  char tag() const override { return 'D'; }
  std::vector<size_t> param_sizes(const Launch& L) const override {
    // (a driver without cuFuncGetParamInfo, older than CUDA 12.4: no plan is replayable)
    TORCH_CHECK(launch_ && param_info_,
                "the CUDA driver lacks cuLaunchKernel or cuFuncGetParamInfo (CUDA 12.4+)");
    std::vector<size_t> sizes;
    size_t offset = 0, size = 0;
    while (param_info_(reinterpret_cast<void*>(L.fn), sizes.size(), &offset, &size) == 0)
      sizes.push_back(size);
    return sizes;
  }
  bool capturing(const at::Device&) const override {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  }
  void launch(const Launch& L, void** params, const at::Device& device) const override {
    ensure_context(device.index());
    void* stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    const CUresult r = launch_(reinterpret_cast<void*>(L.fn), L.grid[0], L.grid[1], L.grid[2],
                               L.block, 1, 1, L.shared, stream, params, nullptr);
    TORCH_CHECK(r == 0, "fastrobust: launching the Triton kernel ", L.name, " failed: ",
                error(r));
  }

 private:
  // A thread that has not touched CUDA yet (an autograd or DataParallel worker replaying a
  // plan another thread recorded) has no current context, and the runtime's device guard
  // does not bind one when the device number already matches: bind the device's primary
  // context, as Triton's own launcher does before every launch.
  void ensure_context(int device) const {
    void* ctx = nullptr;
    if (!ctx_get_ || ctx_get_(&ctx) != 0 || ctx) return;
    int dev = 0;
    if (device_get_(&dev, device) == 0 && primary_retain_(&ctx, dev) == 0) ctx_set_(ctx);
  }
  std::string error(CUresult r) const {
    const char* s = nullptr;
    if (error_string_) error_string_(r, &s);
    return s ? s : ("CUDA driver error " + std::to_string(r));
  }
  LaunchFn launch_ = nullptr;
  ParamInfoFn param_info_ = nullptr;
  ErrorStringFn error_string_ = nullptr;
  CtxGetCurrentFn ctx_get_ = nullptr;
  CtxSetCurrentFn ctx_set_ = nullptr;
  DeviceGetFn device_get_ = nullptr;
  PrimaryCtxRetainFn primary_retain_ = nullptr;
};

void cuda_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  static const DriverLauncher driver;
  const size_t n = op.schema().arguments().size();
  auto args = torch::jit::last(*stack, n);
  at::Device device(at::kCUDA, 0);
  for (const auto& a : args)
    if (a.isTensor() && a.toTensor().is_cuda()) {
      device = a.toTensor().device();
      break;
    }
  auto outs = run(op.schema(), args, device, driver);
  torch::jit::drop(*stack, n);
  for (auto& t : outs) stack->emplace_back(std::move(t));
}

}  // namespace

void launch_on_cuda(torch::Library& m, std::initializer_list<const char*> names) {
  for (const char* name : names)
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cuda_kernel>());
}

}  // namespace fastrobust::plans
#endif
