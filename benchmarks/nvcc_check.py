"""Compiles every CUDA source (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90 with
`-Xptxas -v` and writes the registers, spills and shared memory per kernel to
benchmarks/results/nvcc.md; then checks that the CUDA build's C++ binding (csrc/cuda/*.cpp)
compiles against the installed torch's headers (`-fsyntax-only`: a CPU torch has the c10/cuda
headers but not the CUDA libraries to link). Exits 1 on a compile error or any spill.

    python benchmarks/nvcc_check.py [--out PATH]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# What torch's CUDAExtension adds to every nvcc call: no implicit half/bfloat16 conversions.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def compile_cu(path: Path, arch: int) -> tuple[list[tuple], str | None]:
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["nvcc", "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v",
                            *TORCH_NVCC_FLAGS, "-c", str(path), "-o", str(Path(d) / "k.o")],
                           capture_output=True, text=True)
    if r.returncode:
        return [], r.stderr[-2000:]
    rows, name = [], None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            spill = max(int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
        if m and name:
            demangled = subprocess.run(["c++filt", name], capture_output=True,
                                       text=True).stdout.strip() or name
            kernel = demangled[:demangled.rfind("(")].removeprefix("void ")
            kernel = kernel.replace("fastrobust::cuda::(anonymous namespace)::", "")
            rows.append((kernel, int(m.group(1)), spill,
                         int(m.group(2) or 0)))
            name = None
    return rows, None


def check_binding(path: Path) -> str | None:
    """g++ -fsyntax-only of a CUDA-build C++ source, FASTROBUST_WITH_CUDA defined."""
    import sysconfig

    import torch
    from torch.utils import cpp_extension
    inc = cpp_extension.include_paths()
    cuda_home = cpp_extension.CUDA_HOME or "/usr/local/cuda"
    with tempfile.TemporaryDirectory() as d:
        # A CPU build of torch ships c10/cuda without its generated macros header.
        stub = Path(d) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        real = Path(torch.__file__).parent / "include" / "c10" / "cuda" / "impl" / stub.name
        stub.parent.mkdir(parents=True)
        stub.write_text(real.read_text() if real.exists() else "#pragma once\n")
        cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DFASTROBUST_WITH_CUDA", f"-I{d}",
               f"-I{cuda_home}/include", f"-I{sysconfig.get_paths()['include']}"]
        cmd += [f"-I{p}" for p in inc] + [str(path)]
        r = subprocess.run(cmd, capture_output=True, text=True)
    return r.stderr[-2000:] if r.returncode else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "nvcc.md"))
    args = ap.parse_args()
    version = subprocess.run(["nvcc", "--version"], capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
    lines = ["# CUDA sources under nvcc (no GPU)", "",
             f"Written by `python benchmarks/nvcc_check.py` (CI runs it); {version}; "
             "`nvcc -std=c++17 -O3 -arch=sm_XX -Xptxas -v` with torch's no-implicit-half "
             "flags.", "",
             "| source | arch | kernel | regs | spill B | smem B |", "|---|---|---|---|---|---|"]
    failures = []
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    for src in sources:
        for arch in (80, 90):
            rows, err = compile_cu(src, arch)
            if err:
                failures.append(f"{src.name} sm_{arch}: {err}")
                continue
            for kernel, regs, spill, smem in rows:
                lines.append(f"| {src.name} | sm_{arch} | `{kernel}` | {regs} | {spill} | "
                             f"{smem} |")
                if spill:
                    failures.append(f"{src.name} sm_{arch} {kernel}: {spill} bytes spilled")
            print(f"  {src.name} sm_{arch}: {len(rows)} kernels, max "
                  f"{max((r[1] for r in rows), default=0)} registers, "
                  f"max spill {max((r[2] for r in rows), default=0)} B")
    bindings = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))
    lines += ["", "The CUDA build's C++ binding, `g++ -fsyntax-only -DFASTROBUST_WITH_CUDA` "
              "against this torch's headers:", ""]
    for src in bindings:
        err = check_binding(src)
        lines.append(f"- {src.name}: {'error' if err else 'compiles'}")
        print(f"  {src.name}: {'ERROR' if err else 'compiles'}")
        if err:
            failures.append(f"{src.name}: {err}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
