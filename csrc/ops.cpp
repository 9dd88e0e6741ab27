// fastrobust._C: the compiled kernels, exposed to Python with the same names and argument order
// as their Triton and reference twins. The torch ops themselves (schemas, fake tensors, autograd)
// are defined in fastrobust/_ops.py, which dispatches here through fastrobust/backends.py.
#include <torch/extension.h>

#include "autograd.h"
#include "cpu/multi_bn.h"
#include "cpu/pgd.h"
#ifdef FASTROBUST_WITH_CUDA
#include "cuda/bindings.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrobust compiled kernels (CPU C++; CUDA C++ where built)";
  m.def("bn_forward", &fastrobust::cpu::bn_forward,
        "routed (branch) or mixed (mix) batch norm forward with fused extras (CPU)");
  m.def("bn_backward", &fastrobust::cpu::bn_backward,
        "routed or mixed batch norm backward (CPU)");
  m.def("bn_autograd", &fastrobust::bn_autograd,
        "routed or mixed batch norm with its autograd node in C++ (eager calls; running "
        "stats updated in place)");
  m.def("add_relu", &fastrobust::add_relu,
        "relu(a + b), one pass, with its autograd node in C++ (eager calls)");
  m.def("film_forward", &fastrobust::cpu::film_forward, "FiLM y = gamma*x + beta (CPU)");
  m.def("film_backward", &fastrobust::cpu::film_backward, "FiLM backward (CPU)");
  m.def("pgd_update", &fastrobust::cpu::pgd_update,
        "projected linf / l2 step or random start, written to out (CPU)");
  m.def("mifgsm_update", &fastrobust::cpu::mifgsm_update,
        "MI-FGSM momentum and linf step, in place (CPU)");
#ifdef FASTROBUST_WITH_CUDA
  // CUDA kernels live in the submodule `cuda`, under the same names as the CPU ones.
  auto cuda = m.def_submodule("cuda", "CUDA C++ kernels");
  fastrobust::cuda::register_bindings(cuda);
#endif
}
