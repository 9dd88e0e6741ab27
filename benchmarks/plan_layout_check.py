"""Checks the launch plans' parameter layout against kernels Triton compiles for sm_90, without
a GPU: what csrc/launch/plans.cpp writes into a launch's parameter buffer must be what the compiled
kernel reads.

The ops run on meta tensors (benchmarks/launch_counts.py's recorder; Triton's launcher is
replaced, nothing runs) over cases that reach every kernel and every kind of parameter (fp16 /
bf16 / fp32 / fp64, K = 1, 2 and 5, empty batches, split and unsplit reductions, per-sample and
float ε, the synchronized BN's halves). For each distinct (kernel, layout):

  the plan's model   fastrobust.ops._triton.plan.layout: which parameters are passed, of which
                     type (what the recorder writes down and C++ replays);
  Triton's own       its binder specializes the same arguments (its native specialization:
                     a None, a constexpr or an int equal to 1 compiled in), triton.compile
                     builds the kernel for sm_90, and the PTX entry's parameter list gives the
                     sizes the driver reads (then the trailing scratch pointers).

The two must agree: the names and types of `_plan._check_compiled` (what a GPU run checks at
record time), and every parameter's size in the PTX, with at most two trailing 8-byte scratch
pointers. Run it with each Triton the project supports (CI: the one it installs, and 3.6.0, the
GPU machines' version, from a side folder on PYTHONPATH).

    python benchmarks/plan_layout_check.py [--jobs 2]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real JITFunctions, not the interpreter's
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402

import aot_compile as aot  # noqa: E402
import launch_counts as lc  # noqa: E402
from fastrobust import functional as F  # noqa: E402
from fastrobust.ops._triton import plan as _plan  # noqa: E402

ARCH = 90


def _t(shape, dtype=torch.float32, grad=False):
    return aot._t(shape, dtype, grad=grad)


def cases():
    """Calls that reach every kernel and every kind of parameter."""
    def bn(N, C, H, K, dtype, mixed, extras, training, cl=False):
        aot._bn_case(N, C, H, cl, K, extras, mixed, training, dtype)()

    def pgd(shape, dtype, per_sample, layouts=False):
        xa, g, xn = _t(shape, dtype), _t(shape, dtype), _t(shape, dtype)
        if layouts:  # strides passed as ints: x_adv a strided view, grad channels_last
            xa = _t((*shape[:-1], 2 * shape[-1]), dtype)[..., ::2]
            g = g.contiguous(memory_format=torch.channels_last)
        N = shape[0]
        eps = _t((N,), dtype) if per_sample else 8 / 255
        alpha = _t((N,), dtype) if per_sample else 2 / 255
        F.pgd_step_(xa, g, xn, eps, alpha, norm="linf")
        F.pgd_step_(xa, g, xn, eps, alpha, norm="l2")
        F.mifgsm_step_(xa, g, _t(shape, dtype), xn, eps, alpha, decay=1.0)
        F.pgd_init(xn, eps, norm="linf")
        F.pgd_init(xn, eps, norm="l2")

    def film(shape, dtype):
        x = _t(shape, dtype, grad=True)
        N, C = shape[:2]
        for g, b in (((N, C), (N, C)), ((C,), (C,))):
            y = F.film(x, _t(g, dtype, grad=True), _t(b, dtype, grad=True))
            y.backward(torch.empty_like(y))

    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for mixed in (False, True):
            for extras in (False, True):
                for training in (True, False):
                    out.append(lambda d=dtype, m=mixed, e=extras, t=training:
                               bn(64, 32, 8, 2, d, m, e, t))
                # the synchronized BN's four halves (sync_multi_bn as rank 0 of two)
                out.append(aot._sync_case(64, 32, 8, False, 2, extras, mixed, dtype))
        out.append(aot._sync_case(4, 8, 32, True, 5, True, False, dtype))  # split S
        out.append(lambda d=dtype: bn(4, 8, 32, 5, d, False, True, True, cl=True))  # split S
        out.append(lambda d=dtype: pgd((256, 3, 32, 32), d, False))
        out.append(lambda d=dtype: pgd((4, 3, 64, 64), d, True))  # the split l2 / MI-FGSM
        out.append(lambda d=dtype: film((16, 8, 8, 8), d))
        out.append(lambda d=dtype: film((2, 8, 64, 64), d))  # split: the reduce kernel
        out.append(lambda d=dtype: F.add_relu(_t((8, 4, 4, 4), d), _t((8, 4, 4, 4), d)))
    out.append(lambda: bn(64, 32, 8, 1, torch.float32, False, False, True))  # K = 1: an int 1
    out.append(lambda: bn(0, 32, 8, 2, torch.float32, False, False, True))  # empty batch
    for dtype in (torch.float32, torch.float64):
        out.append(lambda d=dtype: pgd((8, 3, 16, 16), d, False, layouts=True))
        out.append(lambda d=dtype: pgd((2, 3, 64, 64), d, True, layouts=True))
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        out += [call for _, call in lc.table_ops(dtype)]  # every op's row of tests/op_table.py
    out.append(lambda: F.multi_batch_norm(  # running statistics through their strides
        _t((8, 16, 4, 4), torch.float32), torch.zeros(8, dtype=torch.long, device="meta"),
        None, None, _t((16, 2), torch.float32).t(), _t((16, 2), torch.float32).t(),
        training=True))
    return out


def record():
    """[(JITFunction, args, kwargs)] of every launch the cases make, one per distinct
    (kernel, plan layout)."""
    from triton.runtime.jit import JITFunction
    found = {}

    def run(self, *args, grid=None, warmup=False, **kwargs):
        names = [p.name for p in self.params]
        bound = dict(zip(names, args), **kwargs)
        params = []
        for p in self.params:
            v = bound[p.name]
            if p.is_constexpr:
                params.append((p.name, v, True))
            elif isinstance(v, torch.Tensor):
                params.append((p.name, _plan.Slot(_plan.INPUT, dtype=v.dtype), False))
            elif v is None:
                params.append((p.name, _plan.Slot(_plan.NULL), False))
            elif isinstance(v, bool):
                raise TypeError(f"{self.fn.__name__}: a bool argument {p.name}")
            elif isinstance(v, int):
                params.append((p.name, _plan.Slot(_plan.INT, value=v), False))
            else:
                params.append((p.name, _plan.Slot(_plan.FLOAT, value=float(v)), False))
        L = _plan.Launch(self, None, tuple(grid if isinstance(grid, tuple) else (1,)), params,
                         kwargs.get("num_warps", 4))
        model = _plan.layout(L)
        if isinstance(model, str):
            raise RuntimeError(model)
        key = (self.fn.__name__, tuple(ty for _, _, ty in model))
        found.setdefault(key, (self.fn.__module__, self.fn.__name__, _portable(args),
                               _portable(kwargs), [(n, ty) for n, _, ty in model]))

    saved = JITFunction.run
    JITFunction.run = run
    try:
        with lc.counting(record_only=True):
            for case in cases():
                case()
    finally:
        JITFunction.run = saved
    return found


def _portable(v):
    """Arguments a worker process can take (meta tensors as their description)."""
    if isinstance(v, torch.Tensor):
        return ("meta tensor", v.dtype, tuple(v.shape), tuple(v.stride()))
    if isinstance(v, dict):
        return {k: _portable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_portable(x) for x in v)
    return v


def _unportable(v):
    if isinstance(v, tuple) and v and v[0] == "meta tensor":
        return torch.empty_strided(v[2], v[3], dtype=v[1], device="meta")
    if isinstance(v, dict):
        return {k: _unportable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_unportable(x) for x in v)
    return v


_SIZE = {"u64": 8, "b64": 8, "s64": 8, "f64": 8, "u32": 4, "b32": 4, "s32": 4, "f32": 4,
         "u16": 2, "b16": 2, "u8": 1, "b8": 1}


def ptx_param_sizes(ptx: str) -> list[int]:
    entry = ptx[ptx.index(".entry"):]
    entry = entry[:entry.index(")")]
    return [_SIZE[m] for m in re.findall(r"\.param\s+\.(\w+)", entry)]


def check_one(item):
    """(kernel, model, what Triton compiled, problems) for one launch."""
    key, (module, fname, args, kwargs, model_types) = item
    import importlib
    fn = getattr(importlib.import_module(module), fname)
    args, kwargs = _unportable(args), _unportable(kwargs)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", ARCH, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    sizes = ptx_param_sizes(compiled.asm["ptx"])
    problems = []
    mine = [(n, ty) for n, ty in model_types]
    theirs = [(n, ty) for n, ty in ((fn.arg_names[k] if isinstance(k, int) else k, ty)
                                    for k, ty in compiled.src.signature.items())
              if ty != "constexpr"]
    if mine != theirs:
        problems.append(f"Triton's signature {theirs} != the plan's {mine}")
    want = [8 if ty.startswith("*") else {"i32": 4, "i64": 8, "fp32": 4}[ty] for _, ty in mine]
    if sizes[:len(want)] != want:
        problems.append(f"PTX parameter sizes {sizes} != the plan's {want}")
    scratch = sizes[len(want):]
    if len(scratch) > 2 or any(s != 8 for s in scratch):
        problems.append(f"PTX parameters past the plan's: {scratch} (the replay passes at most "
                        "two null 8-byte scratch pointers)")
    return fname, len(want), len(scratch), problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    t0 = time.time()
    found = record()
    print(f"triton {triton.__version__}, sm_{ARCH}: {len(found)} distinct launches")
    bad = 0
    with ProcessPoolExecutor(args.jobs) as pool:
        for name, n, scratch, problems in pool.map(check_one, found.items()):
            status = "ok" if not problems else "MISMATCH"
            print(f"  {status:8} {name:<24} {n:2} parameters + {scratch} scratch")
            for p in problems:
                print(f"           {p}")
            bad += bool(problems)
    print(f"{len(found) - bad} of {len(found)} layouts agree ({time.time() - t0:.0f} s)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
