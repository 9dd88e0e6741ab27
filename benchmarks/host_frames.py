"""Host work per call, counted: the Python frames a call of each public function enters, split
into those of the wrapper (fastrobust.functional, fastrobust.nn) and those entered while the
registered op runs (a kernel written in Python, or the first call of a signature on CUDA, which
records its launch plan), and host µs per call. The goal on CUDA is zero frames inside the op:
from torch.ops to the launches is C++ (csrc/launch/plans.cpp).

    python benchmarks/host_frames.py [--device cuda] [--json PATH]

Counting is deterministic (sys.setprofile 'call' events); the µs are medians of 200 calls with
no synchronization, so on a GPU they are the host's time, not the kernels'.

On the CPU it also times the CUDA launch path without a GPU: csrc/launch/plans.cpp replays each op's
recorded plan on CPU tensors with a null launcher (`fastrobust._C._plan_call(op, None, ...)`:
argument checks, signature, plan lookup, allocations, parameter buffers; the launch itself
does nothing), beside F.batch_norm on the same tiny tensor. What functional and the module add
on top is their own wrapper's time, measured as (the call through them − the same call through
torch.ops) on the CPU kernels; the last column adds it to the replay.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

from fastrobust import functional as F  # noqa: E402
from fastrobust.nn import DualBatchNorm2d, routing  # noqa: E402


class FrameCounter:
    """Python frames entered by a call: all of them, and those entered while a
    torch.ops.fastrobust op (torch/_ops.py's OpOverload call) was on the stack."""

    def __init__(self):
        self.total = 0
        self.inside = 0
        self.inside_names: list[str] = []
        self._op_depth = None
        self._depth = 0

    def __call__(self, frame, event, arg):
        if event == "call":
            self._depth += 1
            self.total += 1
            code = frame.f_code
            if self._op_depth is not None:
                self.inside += 1
                self.inside_names.append(f"{Path(code.co_filename).name}:{code.co_name}")
            elif (code.co_filename.endswith(("torch/_ops.py", "torch\\_ops.py"))
                  and code.co_name == "__call__"
                  and getattr(frame.f_locals.get("self"), "namespace", None) == "fastrobust"):
                self._op_depth = self._depth
        elif event == "return":
            if self._op_depth is not None and self._depth == self._op_depth:
                self._op_depth = None
            self._depth -= 1

    @classmethod
    def count(cls, fn):
        c = cls()
        sys.setprofile(c)
        try:
            fn()
        finally:
            sys.setprofile(None)
        return c


def cases(device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 8, 8, generator=g).to(device)
    br = torch.tensor([0, 1] * 4, device=device)
    w, b = torch.ones(2, 16, device=device), torch.zeros(2, 16, device=device)
    rm, rv = torch.zeros(2, 16, device=device), torch.ones(2, 16, device=device)
    w1, b1 = torch.ones(16, device=device), torch.zeros(16, device=device)
    rm1, rv1 = torch.zeros(16, device=device), torch.ones(16, device=device)
    xa, gr = torch.rand(8, 3, 8, 8, device=device), torch.randn(8, 3, 8, 8, device=device)
    bn = DualBatchNorm2d(16).to(device).train()
    return {
        "multi_batch_norm (training forward)":
            lambda: F.multi_batch_norm(x, br, w, b, rm, rv, training=True),
        "DualBatchNorm2d module under routing":
            lambda: _routed(bn, x, br),
        "film":
            lambda: F.film(x, w1, b1),
        "pgd_step_ linf":
            lambda: F.pgd_step_(xa, gr, xa, 8 / 255, 2 / 255),
        "F.batch_norm (torch, for reference)":
            lambda: TF.batch_norm(x, rm1, rv1, w1, b1, True, 0.1, 1e-5),
    }


def _routed(bn, x, br):
    with routing(bn, branch=br):
        return bn(x)


def host_us(fn, device, calls=200):
    for _ in range(20):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    if device == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def replay_cases():
    """(name, op, args, the same call through torch.ops, and through the public wrapper):
    a BN forward and forward+backward, the PGD step, on CPU tensors."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 8, 8, generator=g)
    br = torch.tensor([0, 1] * 4)
    w, b = torch.ones(2, 16), torch.zeros(2, 16)
    rm, rv, nbt = torch.zeros(2, 16), torch.ones(2, 16), torch.zeros(2, dtype=torch.long)
    fwd = [x, br, None, w, b, rm, rv, nbt, None, None, None, 2, True, 0.1, False, 1e-5, False]
    op = torch.ops.fastrobust.multi_bn.default
    _, mean, invstd, planes = op(*fwd)
    dy = torch.randn_like(x)
    bwd = [dy, x, br, None, w, b, mean, invstd, planes, None, None, None, 2, True, False,
           [True, False, True, True, False, False, False]]
    xa, gr = torch.rand(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g)
    xn = xa.clone()
    pgd = [xa, gr, xn, None, 8 / 255, None, 2 / 255, False, 0.0, 1.0]
    bn = DualBatchNorm2d(16).train()
    xg = x.clone().requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()

    def fb_ops():
        y = op(xg, br, None, wg, bg, rm, rv, nbt, None, None, None, 2, True, 0.1, False, 1e-5,
               False)[0]
        torch.autograd.grad(y, (xg, wg, bg), dy)

    def fb_functional():
        y = F.multi_batch_norm(xg, br, wg, bg, rm, rv, training=True)
        torch.autograd.grad(y, (xg, wg, bg), dy)

    bn_param = list(bn.parameters())

    def fb_module():
        y = _routed(bn, xg, br)
        torch.autograd.grad(y, [xg] + bn_param, dy)

    return [
        ("BN forward (multi_bn), via functional", [("multi_bn", fwd)],
         lambda: op(*fwd), lambda: F.multi_batch_norm(x, br, w, b, rm, rv, training=True)),
        ("BN forward, via the module", [("multi_bn", fwd)],
         lambda: op(*fwd), lambda: _routed(bn, x, br)),
        ("BN forward+backward, via functional", [("multi_bn", fwd), ("multi_bn_backward", bwd)],
         fb_ops, fb_functional),
        ("BN forward+backward, via the module", [("multi_bn", fwd), ("multi_bn_backward", bwd)],
         fb_ops, fb_module),
        ("pgd_step_ linf", [("pgd_step", pgd)],
         lambda: torch.ops.fastrobust.pgd_step.default(*pgd),
         lambda: F.pgd_step_(xa, gr, xn, 8 / 255, 2 / 255)),
    ]


def replay_rows():
    """Host µs of the C++ replay (null launcher) per case, beside F.batch_norm's."""
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the first call records on CPU tensors
    from fastrobust import _C
    x = torch.randn(8, 16, 8, 8)
    w1, b1, rm1, rv1 = torch.ones(16), torch.zeros(16), torch.zeros(16), torch.ones(16)
    ref = host_us(lambda: TF.batch_norm(x, rm1, rv1, w1, b1, True, 0.1, 1e-5), "cpu")
    rows = []
    for name, calls, via_ops, via_wrapper in replay_cases():
        def replay(calls=calls):
            for op, args in calls:
                _C._plan_call(f"fastrobust::{op}", None, *args)
        replay()  # records
        before = _C._plan_stats()["replayed_calls"]
        replay()
        assert _C._plan_stats()["replayed_calls"] == before + len(calls), _C._plan_refusals()
        r = host_us(replay, "cpu")
        wrapper = max(0.0, host_us(via_wrapper, "cpu") - host_us(via_ops, "cpu"))
        rows.append(dict(case=name, replay_us=round(r, 1), wrapper_us=round(wrapper, 1),
                         total_us=round(r + wrapper, 1), batch_norm_us=round(ref, 1),
                         ratio=round((r + wrapper) / ref, 2)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny tensors: one thread, no OpenMP hand-offs in the times
    rows = []
    with torch.no_grad():
        for name, fn in cases(args.device).items():
            fn()  # the first call of a signature may record its plan (CUDA)
            c = FrameCounter.count(fn)
            rows.append(dict(case=name, frames=c.total, frames_inside_op=c.inside,
                             inside=sorted(set(c.inside_names)),
                             host_us=round(host_us(fn, args.device), 1)))
    print(f"host work per call on {args.device} (torch {torch.__version__}):")
    print("| call | Python frames | of them inside the op | host µs |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['frames']} | {r['frames_inside_op']} | {r['host_us']} |")
    if args.device == "cpu":
        replay = replay_rows()
        print()
        print("the CUDA launch path's host time, replayed on CPU tensors with a null launcher "
              "(µs per call):")
        print("| call | C++ replay | + the Python wrapper | total | F.batch_norm | ratio |")
        print("|---|---|---|---|---|---|")
        for r in replay:
            print(f"| {r['case']} | {r['replay_us']} | {r['wrapper_us']} | {r['total_us']} | "
                  f"{r['batch_norm_us']} | {r['ratio']} |")
        rows = {"frames": rows, "replay": replay}
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
