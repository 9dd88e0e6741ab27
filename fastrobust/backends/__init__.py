"""Which implementation serves each op on each device, and why the others do not.

Every op is one schema (csrc/<family>/ops.cpp) with one kernel per dispatch key and one
autograd (csrc/<family>/autograd.cpp); the dispatcher picks the kernel by the tensors'
device, and nothing registers over a kernel after import:

    cpu     C++ kernels (csrc/*/cpu.cpp), the CPU key's own              backends/cpu.py
    triton  Triton kernels (fastrobust/ops/*/triton.py), launched from    backends/triton.py
            C++ by the CUDA key's kernel (csrc/launch/plans.cpp)
    eager   plain PyTorch (fastrobust/ops/*/eager.py), every other        backends/eager.py
            device

`use(name)` runs one backend's kernels for the calls made in a block by the current thread, for
tests, benchmarks and debugging: a dispatch mode (a torch mechanism that is per thread)
receives each fastrobust op below its autograd and calls that backend's kernel directly;
registrations are never touched, so other threads and the code after the block see the
dispatcher's own choice. A forced backend that cannot serve a call raises with its reasons;
nothing falls back silently. `describe()` prints the table (`fastrobust info`).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops import FAMILY as _FAMILY, SCHEMAS, _C
from ..ops._common import forced, forced_stack as _stack
from ..ops._triton import serves_by_default
from . import cpu, eager, triton

BACKENDS = ("eager", "cpu", "triton")
OPS = tuple(SCHEMAS)
_MODULES = {"eager": eager, "cpu": cpu, "triton": triton}


def not_supported_reasons(backend: str, op: str, device: torch.device | str) -> list[str]:
    """Why `backend` cannot run the op family `op` on `device` (empty: it can)."""
    if backend not in _MODULES:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if op not in SCHEMAS:
        raise ValueError(f"unknown op {op!r}; choose from {OPS}")
    return _MODULES[backend].reasons(op, torch.device(device))


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


class _Forced(TorchDispatchMode):
    """Sends this thread's fastrobust ops (below their autograd) to one backend's kernels;
    every other op runs as usual (higher-order operators of traced graphs too: what they
    call is not forced)."""

    supports_higher_order_operators = True

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.impls = _MODULES[name].implementations()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (getattr(func, "namespace", None) != "fastrobust"
                or forced() != self.name  # (a use(None) inside)
                or any(t is not torch.Tensor for t in types)):  # fake / traced tensors
            return func(*args, **kwargs)
        op_name = func._schema.name.split("::", 1)[1]
        if op_name not in _FAMILY:  # a composite (sync_multi_bn): its parts come here too
            with self:
                return func(*args, **kwargs)
        device = _device_of(args)
        why = not_supported_reasons(self.name, _FAMILY[op_name], device)
        if not why and self.name == "cpu":
            return func(*args, **kwargs)  # the C++ kernels are the CPU key's own
        fn = self.impls.get(op_name)
        if why or fn is None:
            why = why or [f"no {self.name} kernel for {op_name}"]
            raise RuntimeError(f"backend {self.name!r} was forced but cannot run {op_name} on "
                               f"{device.type}: " + "; ".join(why))
        return fn(*args, **kwargs)


@contextlib.contextmanager
def use(name: str | None):
    """Runs `name`'s kernels for the fastrobust ops this thread calls in the body (None: the
    dispatcher's choice). Per thread; registrations are not changed."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    stack = _stack()
    stack.append(name)
    try:
        if name is None:
            yield
        else:
            with _Forced(name):
                yield
    finally:
        stack.pop()


def choose(op: str, device: torch.device | str) -> str:
    """The name of the backend that serves the op family `op` on `device`."""
    device = torch.device(device)
    name = forced()
    if name is not None:
        reasons = not_supported_reasons(name, op, device)
        if reasons:
            raise RuntimeError(f"backend {name!r} was forced but cannot run {op} on "
                               f"{device.type}: " + "; ".join(reasons))
        return name
    if device.type == "cpu":
        return "cpu"
    if serves_by_default(device):
        return "triton"
    return "eager"


def table() -> list[dict]:
    """One row per (op family, device): the backend that serves it and every other
    backend's reasons."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for op in OPS:
        for dev in devices:
            try:
                chosen = choose(op, dev)
            except RuntimeError as e:
                chosen = f"error: {e}"
            rows.append({"op": op, "device": dev, "backend": chosen,
                         "others": {b: not_supported_reasons(b, op, dev) or ["available"]
                                    for b in BACKENDS if b != chosen}})
    return rows


def describe() -> str:
    """The backend table as text (printed by `fastrobust info` and the demo)."""
    lines = []
    for row in table():
        lines.append(f"{row['op']:<10} {row['device']:<5} -> {row['backend']}")
        for b, why in row["others"].items():
            lines.append(f"{'':<17}{b:<7} {'; '.join(why)}")
    lines.append(launch_path())
    if forced():
        lines.append(f"(forced: {forced()})")
    return "\n".join(lines)


def cuda_launches_from_cpp() -> bool:
    """Whether CUDA calls reach the Triton kernels from C++ (csrc/launch/plans.cpp: fastrobust._C
    was built against a CUDA build of torch)."""
    return bool(_C.CUDA_LAUNCH_PATH)


def launch_path() -> str:
    """Which launch path CUDA calls take, and why; with the plan counts and every reason a
    call took the Python launcher (printed by `fastrobust info`)."""
    if not cuda_launches_from_cpp():
        return ("CUDA calls: none in this build (torch is a CPU build, so fastrobust._C has "
                "no CUDA launch path)")
    why = triton.missing()
    lines = ["CUDA calls: the Triton kernels, launched from C++ (csrc/launch/plans.cpp): each call "
             "signature runs its Python launcher once, then replays its launches with no "
             "Python" + (f"; but {why}: the eager kernels serve CUDA tensors" if why else "")]
    stats = _C._plan_stats()
    lines.append("  plans: {plans} ({not_replayable} not replayable); calls replayed: "
                 "{replayed_calls}, through the Python launcher: {python_calls}".format(**stats))
    for reason in _C._plan_refusals():
        lines.append(f"  took the Python launcher: {reason}")
    return "\n".join(lines)
