"""Builds fastrobust._C with the host C++ compiler from every C++ source under csrc/: one folder
per op family (its schemas, checks, CPU kernels, autograd), the launch plans (csrc/launch/)
and the module; a new family's folder needs no edit here. With a CUDA build of torch, the
plans also become the CUDA key's kernel (the Triton kernels launched from C++). No CUDA toolkit and
no nvcc are needed: there is no device code, the driver is reached through dlopen, and the CUDA
runtime headers torch's stream API includes come with torch's own nvidia-* packages (or a
toolkit, if there is one). The extension defines the ops, so the package needs it: a failed
compile fails the install.

Install with `pip install --no-build-isolation .` so the build uses the torch you already have.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"[fastrobust build] {msg}", file=sys.stderr, flush=True)


def cuda_runtime_includes(torch_dir, cuda_home):
    """Folders holding the CUDA runtime headers torch's stream API includes
    (cuda_runtime_api.h and the crt/ headers it includes): torch's nvidia-* runtime packages
    beside it (nvidia/cu13/include, nvidia/cuda_runtime/include), the copy Triton ships for its
    own launcher, else a toolkit's. [] if none has cuda_runtime_api.h."""
    site = os.path.dirname(torch_dir)
    candidates = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    candidates.append(os.path.join(site, "triton", "backends", "nvidia", "include"))
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "include"))

    def has(d, f):
        return os.path.exists(os.path.join(d, f))
    runtime = next((d for d in candidates if has(d, "cuda_runtime_api.h")), None)
    if runtime is None:
        return []
    found = [runtime]
    if not has(runtime, os.path.join("crt", "host_defines.h")):
        crt = next((d for d in candidates if has(d, os.path.join("crt", "host_defines.h"))
                    and has(d, "cuda_runtime_api.h")), None)
        if crt is None:
            return []
        found.append(crt)
    return found


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:  # the build needs the torch it will run against
        raise SystemExit(f"[fastrobust build] torch is not importable ({e}): install torch "
                         "first and build with --no-build-isolation") from e

    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    # torch 2.14's headers need C++20; older ones are built as they always were, in C++17
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    std = "-std=c++20" if version >= (2, 14) else "-std=c++17"
    # No debug information unless asked for (FASTROBUST_DEBUG_INFO=1): Python's own flags add
    # -g, which on torch's headers made the build 4.6 min instead of 3.5 (two cores) and the
    # library 70 MB instead of 2 MB; symbol names (perf, gdb backtraces) stay either way.
    debug = ["-g"] if os.environ.get("FASTROBUST_DEBUG_INFO") == "1" else ["-g0"]
    cxx = ["-O3", *debug, std, "-fopenmp", "-fopenmp-simd"]
    # OpenMP: ATen's parallel_for is header code that only runs in parallel under -fopenmp;
    # linking -fopenmp reuses the libgomp that torch has already loaded.
    link = ["-fopenmp"]
    macros, include_dirs, libraries = [], [], []
    if torch.version.cuda is None:
        _say("torch is a CPU build: fastrobust._C with the CPU kernels (CUDA tensors: no "
             "launch path, the eager kernels)")
    else:
        inc = cuda_runtime_includes(os.path.dirname(torch.__file__), cpp_extension.CUDA_HOME)
        if not inc:
            raise SystemExit(
                "[fastrobust build] torch is a CUDA build but the CUDA runtime headers "
                "(cuda_runtime_api.h, crt/host_defines.h) were found neither in its nvidia-* "
                "packages, nor in triton, nor in a CUDA toolkit: reinstall torch with its CUDA "
                "dependencies, or set CUDA_HOME")
        _say(f"torch {torch.__version__} is a CUDA {torch.version.cuda} build: fastrobust._C "
             f"with the CPU kernels and the CUDA launch path (Triton kernels launched from "
             f"C++; host compiler, no nvcc; CUDA runtime headers from {', '.join(inc)})")
        macros.append(("FASTROBUST_WITH_CUDA", None))
        include_dirs.extend(inc)
        libraries.append("c10_cuda")
    ext = cpp_extension.CppExtension("fastrobust._C", sources, define_macros=macros,
                                     include_dirs=include_dirs, libraries=libraries,
                                     extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class Build(cpp_extension.BuildExtension):
        def run(self):
            if not cpp_extension.is_ninja_available():
                _say("ninja not found: the sources compile one after another (pip install "
                     "ninja first for a parallel build)")
            super().run()
            _say("built " + ", ".join(e.name for e in self.extensions))

    return [ext], {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
