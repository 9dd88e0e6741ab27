"""Builds fastrobust._C: the op schemas, their autograd and the CPU kernels always, the CUDA
kernels when torch has CUDA and a toolkit is present. The extension defines the ops, so the
package needs it: a failed compile fails the install.

Install with `pip install --no-build-isolation .` so the build uses the torch you already have.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"[fastrobust build] {msg}", file=sys.stderr, flush=True)


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:  # the build needs the torch it will run against
        raise SystemExit(f"[fastrobust build] torch is not importable ({e}): install torch "
                         "first and build with --no-build-isolation") from e

    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/autograd.cpp", "csrc/ops.cpp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fopenmp-simd"]
    # OpenMP: ATen's parallel_for is header code that only runs in parallel under -fopenmp;
    # linking -fopenmp reuses the libgomp that torch has already loaded.
    link = ["-fopenmp"]
    macros = []

    if torch.version.cuda is None:
        why = "torch is a CPU build (torch.version.cuda is None)"
    elif cpp_extension.CUDA_HOME is None:
        why = "no CUDA toolkit found (set CUDA_HOME)"
    elif not cuda_sources:
        why = "no CUDA sources in csrc/cuda yet"
    else:
        why = None
    if why is None:
        _say(f"building fastrobust._C with CPU and CUDA kernels "
             f"({len(cpu_sources)} C++ + {len(cuda_sources)} CUDA sources)")
        macros.append(("FASTROBUST_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "fastrobust._C", cpu_sources + cuda_sources, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},  # IEEE div/sqrt,
            # as benchmarks/nvcc_check.py compiles them (no --use_fast_math: the statistics
            # would drift from the CPU kernels the tests compare the bodies with)
            extra_link_args=link)
    else:
        _say(f"building fastrobust._C with CPU kernels only; CUDA kernels skipped: {why}")
        ext = cpp_extension.CppExtension("fastrobust._C", cpu_sources, define_macros=macros,
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
