"""Compiles every Triton specialization the launchers produce for representative shapes, for
sm_80 and sm_90, without a GPU, and writes a table of registers, spills and shared memory.

The launches are recorded on meta tensors (benchmarks/launch_counts.py's recorder: the real
launchers run, Triton's `run` is replaced), deduplicated by (kernel, argument types,
constexprs, num_warps), then compiled with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` and the PTX assembled by Triton's bundled ptxas with
`-v` for the register and spill figures.

    python benchmarks/aot_compile.py [--out benchmarks/results/triton_aot.md] [--jobs 2] [--kernels K1,K2]

Exits 1 if a kernel fails to compile or computes an int32 offset product, and with
--strict-spills (as CI runs it) on any spill on sm_90 with fp32/bf16 inputs; other spills
(sm_80, fp16) are listed in the table.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real JITFunctions, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import launch_counts as lc  # noqa: E402
from fastrobust import functional as F  # noqa: E402

_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
       torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.int8: "i8",
       torch.bool: "i1", torch.uint8: "u8"}


def _arg_type(v):
    if isinstance(v, torch.Tensor):
        return "*" + _DT[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(v).__name__}")


def _attr_val(v):
    """Triton's own specialization: 16-byte aligned pointers, ints divisible by 16."""
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0


def record(cases) -> dict:
    """{key: (kernel name, fn, signature, constexprs, attrs, options, data dtype)}."""
    from triton.runtime.jit import JITFunction

    found = {}
    dtype_of_case = [None]

    def run(self, *args, grid=None, warmup=False, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args))
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound.update(kwargs)
        sig, cons, attrs = {}, {}, {}
        for i, name in enumerate(names):
            v = bound[name]
            if i in self.constexprs or (type(v) is int and v == 1):
                # (Triton's JIT compiles an int equal to 1 in, as a constant: the strides
                # and sizes of 1 that make a layout's fast path)
                sig[name] = "constexpr"
                cons[name] = v
            else:
                sig[name] = _arg_type(v)
                if _attr_val(v):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        key = (self.fn.__name__, tuple(sig.items()),
               tuple((k, str(v)) for k, v in cons.items()), tuple(options.items()))
        found.setdefault(key, (self.fn.__name__, self, sig, cons, attrs, options,
                               dtype_of_case[0]))

    saved = JITFunction.run
    JITFunction.run = run
    try:
        with lc.counting(record_only=True):
            for dtype, case in cases:
                dtype_of_case[0] = dtype
                case()
    finally:
        JITFunction.run = saved
    return found


def _t(shape, dtype, cl=False, grad=False):
    t = torch.empty(shape, device="meta", dtype=dtype)
    if cl and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


SHAPES = [(256, 256, 32), (256, 64, 16), (256, 256, 8), (256, 512, 4), (256, 2048, 0)]


def bn_cases(full: bool):
    """Forward and backward of routed and mixed BN over the representative shapes: every
    shape and layout, K=2 and 5, extras on and off, fp32/bf16/fp16 (`full`); else fp16 and
    K=2 only at the first shape (K=2..4 and fp16 share the code of K=5 and bf16 but for
    BLOCK_K and the element type)."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for i, (N, C, H) in enumerate(SHAPES):
            if not full and dtype == torch.float16 and i:
                continue
            for cl in ((False, True) if H else (False,)):
                for K in ((2, 5) if full or i == 0 else (5,)):
                    for extras in (False, True):
                        for mixed in (False, True):
                            for training in (True, False):
                                cases.append((dtype, _bn_case(N, C, H, cl, K, extras, mixed,
                                                              training, dtype)))
    return cases


def _bn_case(N, C, H, cl, K, extras, mixed, training, dtype):
    def run():
        shape = (N, C, H, H) if H else (N, C)
        x = _t(shape, dtype, cl, grad=True)
        w, b = _t((K, C), torch.float32, grad=True), _t((K, C), torch.float32, grad=True)
        rm, rv = _t((K, C), torch.float32), _t((K, C), torch.float32)
        kw = dict(training=training, momentum=0.1, eps=1e-5)
        if extras:
            kw.update(input_scale=_t((N, C), dtype, grad=True),
                      film_gamma=_t((N, C), dtype, grad=True),
                      film_beta=_t((N, C), dtype, grad=True), activation="relu")
        if mixed:
            y = F.mixed_batch_norm(x, _t((N, K), torch.float32, grad=True), w, b, rm, rv, **kw)
        else:
            y = F.multi_batch_norm(x, _t((N,), torch.int64), w, b, rm, rv, **kw)
        y.backward(torch.empty_like(y))
    return run


def sync_cases(full: bool):
    """The synchronized BN's kernels (fastrobust.distributed on CUDA: the local passes, the
    apply and the dx kernel after each all-reduce) over the same shapes and layouts, training only, fp32/bf16
    (fp16 with `full`)."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16) + ((torch.float16,) if full else ()):
        for i, (N, C, H) in enumerate(SHAPES):
            for cl in ((False, True) if H else (False,)):
                for K in ((2, 5) if full or i == 0 else (5,)):
                    for extras in (False, True):
                        for mixed in (False, True):
                            cases.append((dtype, _sync_case(N, C, H, cl, K, extras, mixed,
                                                            dtype)))
    return cases


def _sync_case(N, C, H, cl, K, extras, mixed, dtype):
    def run():
        from fastrobust import distributed as D
        shape = (N, C, H, H) if H else (N, C)
        x = _t(shape, dtype, cl, grad=True)
        w, b = _t((K, C), torch.float32, grad=True), _t((K, C), torch.float32, grad=True)
        rm, rv = _t((K, C), torch.float32), _t((K, C), torch.float32)
        kw = dict(momentum=0.1, eps=1e-5)
        if extras:
            kw.update(input_scale=_t((N, C), dtype, grad=True),
                      film_gamma=_t((N, C), dtype, grad=True),
                      film_beta=_t((N, C), dtype, grad=True), activation="relu")
        with lc._one_rank():
            if mixed:
                y = D.sync_mixed_batch_norm(x, _t((N, K), torch.float32, grad=True), w, b, rm,
                                            rv, **kw)
            else:
                y = D.sync_multi_batch_norm(x, _t((N,), torch.int64), w, b, rm, rv, **kw)
            y.backward(torch.empty_like(y))
    return run


def film_cases():
    """[N, C] and [C] (per-channel) γ, β, mixed, on NCHW, channels_last and 2-D inputs, and a
    batch of 8 (the backward then splits each plane over S and sums the splits)."""
    cases = []
    forms = (((256, 64), (256, 64)), ((64,), (64,)), ((64,), (256, 64)))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, cl in (((256, 64, 16, 16), False), ((256, 64, 16, 16), True),
                          ((8, 64, 32, 32), False), ((256, 64), False)):
            def run(dtype=dtype, shape=shape, cl=cl):
                x = _t(shape, dtype, cl, grad=True)
                N = shape[0]
                for g, b in forms:
                    g = (N,) + g[1:] if len(g) == 2 else g
                    b = (N,) + b[1:] if len(b) == 2 else b
                    y = F.film(x, _t(g, dtype, grad=True), _t(b, dtype, grad=True))
                    y.backward(torch.empty_like(y))
            cases.append((dtype, run))
    return cases


def add_relu_cases():
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        def run(dtype=dtype):
            a, b = _t((256, 64, 16, 16), dtype, True), _t((256, 64, 16, 16), dtype, True)
            F.add_relu(a, b)
        cases.append((dtype, run))
    return cases


def table_cases():
    """Every op's row of tests/op_table.py (a new op's kernels are compiled with no edit here),
    fp32/bf16/fp16."""
    return [(dtype, call) for dtype in (torch.float32, torch.bfloat16, torch.float16)
            for _, call in lc.table_ops(dtype)]


def pgd_cases():
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # N=8: the split l2 / MI-FGSM (few samples: partial sums, then the update)
        for shape in ((256, 3, 32, 32), (256, 3, 224, 224), (8, 3, 32, 32), (8, 3, 224, 224)):
            for per_sample in (False, True):
                def run(dtype=dtype, shape=shape, per_sample=per_sample):
                    xa, g, xn = _t(shape, dtype), _t(shape, dtype), _t(shape, dtype)
                    N = shape[0]
                    eps = _t((N,), torch.float32) if per_sample else 8 / 255
                    alpha = _t((N,), torch.float32) if per_sample else 2 / 255
                    F.pgd_step_(xa, g, xn, eps, alpha, norm="linf")
                    F.pgd_step_(xa, g, xn, eps, alpha, norm="l2")
                    F.mifgsm_step_(xa, g, _t(shape, dtype), xn, eps, alpha, decay=1.0)
                    F.pgd_init(xn, eps, norm="linf")
                    F.pgd_init(xn, eps, norm="l2")
                cases.append((dtype, run))

        def strided(dtype=dtype):  # every tensor its own strides: the general addressing
            shape = (8, 3, 32, 32)
            xa = _t((8, 3, 32, 64), dtype)[..., ::2]
            g, xn = _t(shape, dtype, cl=True), _t((8, 3, 32, 33), dtype)[..., 1:]
            F.pgd_step_(xa, g, xn, 8 / 255, 2 / 255, norm="linf")
            F.pgd_step_(xa, g, xn, 8 / 255, 2 / 255, norm="l2")
            F.mifgsm_step_(xa, g, _t(shape, dtype).transpose(2, 3), xn, 8 / 255, 2 / 255,
                           decay=1.0)
        cases.append((dtype, strided))
    return cases


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


_INT_OPS = ("arith.divsi", "arith.remsi", "arith.divui", "arith.remui", "arith.addi",
            "arith.subi", "arith.muli")


def int32_offsets(ttir: str) -> list[str]:
    """The TTIR lines that multiply a program-id-derived scalar in i32 by a runtime value
    (a stride, a size): the products that overflow past 2^31 elements. A program id times a
    block-size constant (bounded by the tensor's extent along one axis) is fine."""
    pid, const, bad = set(), set(), []
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w#]+) = ([\w.]+) (.*)", line)
        if not m:
            continue
        res, op, rest = m.groups()
        body = rest.split(" loc(")[0]
        operands = re.findall(r"%[\w#]+", body)
        if op == "arith.constant":
            const.add(res)
        elif op == "tt.get_program_id":
            pid.add(res)
        elif op in _INT_OPS and re.search(r":\s*i32\s*$", body) \
                and any(o in pid for o in operands):
            if op == "arith.muli" and not all(o in pid or o in const for o in operands):
                bad.append(line.strip())
            pid.add(res)
    return bad


def compile_one(item):
    """(name, arch, regs, spill bytes, shared bytes, seconds, error)."""
    name, module, sig, cons, attrs, options, arch = item
    import importlib
    fn = getattr(importlib.import_module(module), name)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    t0 = time.time()
    try:
        k = triton.compile(ASTSource(fn, sig, cons, attrs),
                           target=GPUTarget("cuda", arch, 32), options=options or None)
        with tempfile.TemporaryDirectory() as d:
            ptx = Path(d) / "k.ptx"
            ptx.write_text(k.asm["ptx"])
            target = re.search(r"^\.target (\S+)", k.asm["ptx"], re.M).group(1)
            out = subprocess.run([_ptxas(arch), f"-arch={target}", "-v", str(ptx), "-o",
                                  str(Path(d) / "k.cubin")], capture_output=True, text=True,
                                 check=True).stderr
        regs = int(re.search(r"Used (\d+) registers", out).group(1))
        spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
        narrow = int32_offsets(k.asm["ttir"])
        err = f"int32 offset product: {narrow[0]}" if narrow else None
        return name, arch, regs, max(spills or [0]), k.metadata.shared, time.time() - t0, err
    except Exception as e:  # a kernel that does not compile is a result, reported below
        return name, arch, 0, 0, 0, time.time() - t0, f"{type(e).__name__}: {e}"[:300]


def _describe(cons) -> str:
    parts = []
    for k, v in cons.items():
        if isinstance(v, bool):
            if v:
                parts.append(k)
        elif isinstance(v, tl.dtype):
            parts.append(f"{k}={v}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "triton_aot.md"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--strict-spills", action="store_true",
                    help="exit 1 on any sm_90 spill with fp32/bf16 (CI passes it)")
    ap.add_argument("--full", action="store_true", help="the whole BN matrix (slow)")
    ap.add_argument("--count-only", action="store_true")
    ap.add_argument("--limit", type=int, default=0, help="compile only the first N (timing)")
    ap.add_argument("--kernels", default="",
                    help="comma-separated kernel names: compile only these (a partial check; "
                         "--out then defaults to a scratch file, not the results table)")
    args = ap.parse_args()
    t0 = time.time()
    found = record(bn_cases(args.full) + sync_cases(args.full) + film_cases() + add_relu_cases()
                   + pgd_cases() + table_cases())
    if args.count_only:
        from collections import Counter
        print(len(found), Counter(v[0] for v in found.values()))
        return
    if args.kernels:
        wanted = set(args.kernels.split(","))
        unknown = wanted - {v[0] for v in found.values()}
        if unknown:
            sys.exit(f"--kernels: no recorded specialization of {', '.join(sorted(unknown))}")
        found = {k: v for k, v in found.items() if v[0] in wanted}
        if args.out == ap.get_default("out"):
            args.out = str(Path(tempfile.gettempdir()) / "triton_aot_partial.md")
    archs = [int(a) for a in args.archs.split(",")]
    # sm_90 gets every specialization; sm_80 (same code generator, older ISA) the fp32 ones
    # unless --full.
    items, dtypes = [], []
    for (name, fn, sig, cons, attrs, options, dt) in found.values():
        for arch in archs:
            if arch != 90 and not args.full and dt != torch.float32:
                continue
            items.append((name, fn.fn.__module__, sig, cons, attrs, options, arch))
            dtypes.append(dt)
    if args.limit:
        items, dtypes = items[:args.limit], dtypes[:args.limit]
    print(f"{len(found)} specializations recorded, {len(items)} compiles "
          f"({args.jobs} jobs)", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(compile_one, items, chunksize=4))
    rows, failures, spilled = [], [], []
    for (name, fn, sig, cons, attrs, options, arch), dt, r in zip(items, dtypes, results):
        _, _, regs, spill, shared, secs, err = r
        data = ",".join(sorted({t[1:] for t in sig.values() if t.startswith("*f")
                                or t.startswith("*b")}))
        rows.append((name, arch, data, _describe(cons), options.get("num_warps", 4), regs,
                     spill, shared, err))
        if err:
            failures.append(f"{name} sm_{arch} [{_describe(cons)}]: {err}")
        elif spill and arch == 90 and dt in (torch.float32, torch.bfloat16):
            spilled.append(f"{name} sm_90 [{_describe(cons)}] ({dt}): {spill} bytes spilled")
    rows.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
    lines = [
        "# Triton kernels compiled ahead of time (no GPU)",
        "",
        f"Written by `python benchmarks/aot_compile.py` (CI runs it on every change); "
        f"triton {triton.__version__}, torch {torch.__version__}. Every specialization the "
        "launchers produce for the representative shapes (BN: N=256 at C=256 32², 64 16², "
        "256 8², 512 4², 2-D [256, 2048], NCHW and channels_last, K=2 and 5, input scale + "
        "FiLM + ReLU on and off, routed and mixed, training and eval, fp32/bf16/fp16; the "
        "synchronized BN's kernels at the same shapes, training, fp32/bf16; FiLM; "
        "add_relu; PGD: 256×3×32² and 256×3×224², every mode, float and per-sample ε; fp16 "
        "and K=2 at the first shape only unless --full), compiled for sm_90, the fp32 ones also for "
        "sm_80; registers and spills from ptxas -v.",
        "",
        f"{len(found)} specializations, {len(items)} compiles, "
        f"{sum(1 for r in rows if r[8])} failed, "
        f"max spill on sm_90: {max((r[6] for r in rows if r[1] == 90), default=0)} bytes "
        f"(sm_80: {max((r[6] for r in rows if r[1] == 80), default=0)}), "
        f"{time.time() - t0:.0f} s on {os.cpu_count()} cores.",
        "",
        "| kernel | arch | data | constexprs | warps | regs | spill B | shared B |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, arch, data, desc, warps, regs, spill, shared, err in rows:
        if err:
            lines.append(f"| {name} | sm_{arch} | {data} | {desc} | {warps} | error: "
                         f"{err[:80]} | | |")
        else:
            lines.append(f"| {name} | sm_{arch} | {data} | {desc} | {warps} | {regs} | "
                         f"{spill} | {shared} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    by_kernel = {}
    for r in rows:
        if not r[8]:
            k = (r[0], r[1])
            regs, spill = by_kernel.get(k, (0, 0))
            by_kernel[k] = (max(regs, r[5]), max(spill, r[6]))
    for (name, arch), (regs, spill) in sorted(by_kernel.items()):
        print(f"  {name:<20} sm_{arch}: max {regs} registers, max spill {spill} B")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")
    if spilled:
        print(f"{'FAILED' if args.strict_spills else 'SPILLS (not yet fixed)'}:\n  "
              + "\n  ".join(spilled))
    if failures or (spilled and args.strict_spills):
        print("FAILED:\n  " + "\n  ".join(failures[:20]))
        sys.exit(1)


if __name__ == "__main__":
    main()
