"""Compiles every CUDA source (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90 with
`-Xptxas -v` and writes the registers, spills and shared memory per kernel to
benchmarks/results/nvcc.md. Exits 1 on a compile error or any spill.

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


def compile_cu(path: Path, arch: int) -> tuple[list[tuple], str | None]:
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["nvcc", "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v",
                            "-c", str(path), "-o", str(Path(d) / "k.o")],
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "nvcc.md"))
    args = ap.parse_args()
    version = subprocess.run(["nvcc", "--version"], capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
    lines = ["# CUDA sources under nvcc (no GPU)", "",
             f"Written by `python benchmarks/nvcc_check.py` (CI runs it); {version}; "
             "`nvcc -std=c++17 -O3 -arch=sm_XX -Xptxas -v`.", "",
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
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
