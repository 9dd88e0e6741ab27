"""Launch plans: how a call on CUDA reaches the Triton kernels with no Python on the way.

The Python launchers (fastrobust/ops/<family>/triton.py) decide everything from the
call's *signature*: the op, each tensor's dtype, sizes, strides, device, 16-byte alignment and
which tensors share storage, and each int's and bool's value; nothing on the host reads a value
on the device. So the first call with a signature runs the launcher under a recorder, which
writes down a plan:

  allocations  every tensor the launcher allocated (sizes, strides, dtype), in order;
  launches     every kernel launch: the kernel, its grid, and for each parameter the kernel
               takes a slot (input i or allocation j at a byte offset, a null pointer, an int,
               a float constant, or float argument i of the op) and its type;
  outputs      the op's results: an allocation, or a fresh empty tensor.

csrc/launch/plans.cpp, the CUDA dispatch key's kernel of every op, keys plans by the signature
(computed in C++), replays a stored plan for every later call, and calls the hook that
`cpp_hook` makes (fastrobust/ops/__init__.py sets it) only for a signature it has not seen.
The op's float arguments (ε, α, momentum, eps, clip bounds) are not part of the signature: the recorder hands them to the
launcher tagged (`_Arg`), a tagged float passed straight to a kernel becomes a replay argument,
and any other use of one (arithmetic, a comparison) makes the plan hold for those values only.

The parameter layout (which parameters a compiled kernel takes, of which type) is layout.py's
model of Triton's specialization; on a GPU it is checked against the compiled kernel's own
signature and the driver's parameter sizes.

Where no GPU is, the same C++ path runs on CPU tensors (`fastrobust._C._plan_call`): each
launch goes, as the bytes cuLaunchKernel would read, to a Python launch hook;
`InterpreterLaunch` decodes them and runs the kernel under the Triton interpreter, so every
line of the C++ replay runs in the CPU tests, bitwise against the Python launcher.

A launcher that did anything but allocate, view and launch (a copy, a fill) makes a plan that
could not be replayed: `Plan.why_not` says why, C++ warns once per reason, and calls with that
signature take the Python launcher (`fastrobust info` counts them).
"""
from __future__ import annotations

import contextlib
import ctypes
import inspect
import itertools
import math
import struct
import threading
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .layout import (ALLOC, ARG, FLOAT, INPUT, INT, NULL, _TYPES, Launch, Slot,  # noqa: F401
                     _check_compiled, _name, layout)

_local = threading.local()  # .recorder: this thread's active _Recorder, if any

aten = torch.ops.aten
# Ops a launcher may run that write no data: allocations (recorded) and views.
_ALLOC = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
          aten.new_empty.default, aten.new_empty_strided.default}
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.default, aten.squeeze.dims, aten.expand.default,
          aten.select.int, aten.slice.Tensor, aten.as_strided.default, aten.t.default,
          aten.permute.default, aten.transpose.int, aten.detach.default, aten.alias.default,
          aten.unbind.int, aten.split.Tensor}



# --- the op's float arguments, tagged ----------------------------------------------------------

class _Arg(float):
    """Float argument `index` of the op being recorded (`part`: 0 the value, 1 and 2 the fp32
    remainders of `fp32_parts`). Passed straight to a kernel it is a replay argument; any
    other use on the host makes the plan hold for these values only."""

    def __new__(cls, value, index, part=0):
        obj = super().__new__(cls, value)
        obj.index, obj.part = index, part
        return obj

    def _pin(self):
        rec = active()
        if rec is not None:
            rec.plan.pinned = True

    def __float__(self):
        self._pin()
        return float.__float__(self)

    def __reduce__(self):  # (pickled: a plain float)
        return (float, (float.__float__(self),))


def _pinning(name):
    base = getattr(float, name)

    def op(self, *args):
        self._pin()
        return base(float.__float__(self), *args)
    op.__name__ = name
    return op


for _method in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
                "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__",
                "__rmod__", "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__", "__eq__",
                "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__int__",
                "__round__", "__trunc__", "__floor__", "__ceil__", "__divmod__", "__rdivmod__"):
    setattr(_Arg, _method, _pinning(_method))
_Arg.__hash__ = float.__hash__


def _f32(v: float) -> float:
    """v rounded to fp32 (to nearest, as a kernel's float argument is), inf past its range."""
    if not math.isfinite(v) or abs(v) >= 3.4028235677973366e38:
        return v if not math.isfinite(v) else math.copysign(math.inf, v)
    return struct.unpack("<f", struct.pack("<f", v))[0]


def fp32_parts(v) -> tuple:
    """(hi, mid, lo), fp32 values whose fp64 sum is v exactly: how an fp64 scalar reaches a
    kernel (a kernel's float argument is fp32). csrc/launch/plans.cpp computes the same at
    replay."""
    x = float.__float__(v) if isinstance(v, float) else float(v)
    hi = _f32(x)
    if not math.isfinite(hi):
        parts = (hi, 0.0, 0.0)
    else:
        mid = _f32(x - hi)
        parts = (hi, mid, _f32(x - hi - mid))
    if isinstance(v, _Arg):
        return tuple(_Arg(p, v.index, i) for i, p in enumerate(parts))
    return parts


def _plain(a):
    return float.__float__(a) if isinstance(a, _Arg) else a


# --- plans -----------------------------------------------------------------------------------

@dataclass
class Plan:
    allocations: list = field(default_factory=list)  # (sizes, strides, dtype)
    launches: list = field(default_factory=list)
    outputs: list = field(default_factory=list)  # ("alloc", j) | ("empty", sizes, strides,
    #                                              dtype) | None
    why_not: str | None = None                       # set: not replayable
    pinned: bool = False                             # holds for the recorded floats only

    def refuse(self, why: str) -> None:
        if self.why_not is None:
            self.why_not = why

    def for_cpp(self) -> dict:
        """The plan as csrc/launch/plans.cpp reads it: each launch's handle (the CUfunction of a
        compiled kernel; under the interpreter a key of `InterpreterLaunch`), warps, shared
        memory, grid and, for every parameter the kernel takes, (slot kind, index, offset,
        value, type)."""
        if self.why_not:
            return {"why_not": self.why_not}
        launches, keep = [], []
        for L in self.launches:
            model = layout(L)
            if isinstance(model, str):
                return {"why_not": model}
            if L.compiled is None:
                handle, shared = _interpreted(L, model), 0
            else:
                c = L.compiled
                if getattr(c, "function", None) is None:
                    c._init_handles()
                why = _check_compiled(L, c, model)
                if why:
                    return {"why_not": why}
                handle, shared = int(c.function), int(c.metadata.shared)
                keep.append(c)
            params = [(s.kind, s.index, s.offset,
                       int(s.value) if s.kind == INT else float(_plain(s.value)), ty)
                      for _, s, ty in model]
            launches.append((handle, L.num_warps, shared, L.grid, params, _name(L.kernel)))
        return {"why_not": None, "pinned": self.pinned, "allocs": self.allocations,
                "outputs": self.outputs, "launches": launches, "keep": keep}


def _is_constexpr(annotation) -> bool:
    return getattr(annotation, "__name__", None) == "constexpr" or (
        isinstance(annotation, str) and annotation.split(".")[-1] == "constexpr")


def _params(kernel) -> list[tuple[str, bool]]:
    """(name, constexpr?) of a Triton kernel's parameters, in order."""
    fn = getattr(kernel, "fn", kernel)
    return [(p.name, _is_constexpr(p.annotation))
            for p in inspect.signature(fn).parameters.values()]


class _Recorder(TorchDispatchMode):
    """Audits the aten ops a launcher runs (allocations are recorded, views pass, anything
    else makes the plan unreplayable) and collects its launches."""

    def __init__(self, inputs):
        super().__init__()
        self.inputs = [t if isinstance(t, torch.Tensor) else None for t in inputs]
        self.plan = Plan()
        self.allocs: list[torch.Tensor] = []  # held: their storage cannot be reused meanwhile

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ALLOC:
            self.allocs.append(out)
        elif func not in _VIEWS and not self.checking:
            self.plan.refuse(f"the launcher ran {func} (data a replay would not have)")
        return out

    checking = False

    def slot(self, t) -> Slot:
        if t is None:
            return Slot(NULL)
        if isinstance(t, bool):
            self.plan.refuse("a bool kernel argument")
            return Slot(INT, value=int(t))
        if isinstance(t, int):
            return Slot(INT, value=t)
        if isinstance(t, _Arg):
            return Slot(ARG, t.index, t.part, value=float.__float__(t))
        if isinstance(t, float):
            return Slot(FLOAT, value=t)
        if not isinstance(t, torch.Tensor):
            self.plan.refuse(f"a kernel argument of type {type(t).__name__}")
            return Slot(NULL)
        if t.numel() == 0 or t.data_ptr() == 0:
            return Slot(NULL, dtype=t.dtype)
        ptr, storage = t.data_ptr(), t.untyped_storage().data_ptr()
        for i, inp in enumerate(self.inputs):
            if (inp is not None and inp.numel() and inp.device == t.device
                    and inp.untyped_storage().data_ptr() == storage):
                if (ptr - inp.data_ptr()) % 16:
                    # the signature holds the input's own 16-byte alignment, which Triton
                    # specializes on: at another offset it would not hold the argument's
                    self.plan.refuse("a kernel argument at an odd offset into an input")
                return Slot(INPUT, i, ptr - inp.data_ptr(), dtype=t.dtype)
        for j, a in enumerate(self.allocs):
            if a.numel() and a.untyped_storage().data_ptr() == storage:
                return Slot(ALLOC, j, ptr - a.data_ptr(), dtype=t.dtype)
        self.plan.refuse("a kernel argument that is neither an input nor an allocation")
        return Slot(NULL, dtype=t.dtype)

    def launch(self, kernel, grid, args, kwargs, compiled):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        params = []
        values = dict(zip([n for n, _ in _params(kernel)], args))
        values.update(kwargs)
        for name, constexpr in _params(kernel):
            v = values[name]
            params.append((name, v if constexpr else self.slot(v), constexpr))
        warps = kwargs.get("num_warps")
        if compiled is not None:
            warps = compiled.metadata.num_warps
        self.plan.launches.append(Launch(kernel, compiled, grid, params, int(warps or 4)))

    def finish(self, out) -> Plan:
        plan = self.plan
        used = set()
        for L in plan.launches:
            used |= {s.index for _, s, c in L.params if not c and s.kind == ALLOC}
        outs = out if isinstance(out, (tuple, list)) else (out,)
        results = []
        for t in outs:
            if t is None:
                results.append(None)
            elif not isinstance(t, torch.Tensor):
                plan.refuse(f"a result of type {type(t).__name__}")
            elif t.numel() == 0:
                results.append(("empty", tuple(t.shape), tuple(t.stride()), t.dtype))
            else:
                j = next((j for j, a in enumerate(self.allocs) if a.numel() and _same_view(a, t)),
                         None)
                if j is None:
                    plan.refuse("a result that is not one of the launcher's allocations")
                else:
                    used.add(j)
                    results.append(("alloc", j))
        # only what a launch or a result uses is allocated again, renumbered in order
        keep = sorted(used)
        renum = {j: k for k, j in enumerate(keep)}
        plan.allocations = [(tuple(self.allocs[j].shape), tuple(self.allocs[j].stride()),
                             self.allocs[j].dtype) for j in keep]
        for L in plan.launches:
            for _, s, c in L.params:
                if not c and s.kind == ALLOC:
                    s.index = renum[s.index]
        plan.outputs = [r if r is None or r[0] == "empty" else ("alloc", renum[r[1]])
                        for r in results]
        return plan


def _same_view(a: torch.Tensor, t: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            and a.storage_offset() == t.storage_offset() and a.shape == t.shape
            and a.stride() == t.stride() and a.dtype == t.dtype)


def active() -> _Recorder | None:
    return getattr(_local, "recorder", None)


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, written down when this thread records a plan. Every
    launch of the package's kernels goes through here."""
    rec = active()
    if rec is None:
        return kernel[grid](*args, **kwargs)
    if _python_dispatch_excluded():  # the audit of allocations and data ops sees nothing
        rec.plan.refuse("the launcher ran with torch's Python dispatch turned off")
    with host_check():  # (the interpreter's own tensor work is not the launcher's)
        compiled = kernel[grid](*[_plain(a) for a in args],
                                **{k: _plain(v) for k, v in kwargs.items()})
    try:
        rec.launch(kernel, grid, args, kwargs, compiled)
    except Exception as e:  # noqa: BLE001 - the kernel ran; the plan only is lost
        rec.plan.refuse(f"{_name(kernel)} could not be written down ({type(e).__name__}: {e})")
    return compiled


def _python_dispatch_excluded() -> bool:
    excluded = getattr(torch._C, "_dispatch_tls_is_dispatch_key_excluded", None)
    return bool(excluded and excluded(torch._C.DispatchKey.Python))


def record_call(fn, args):
    """Runs `fn(*args)` (a Python launcher) and returns (its result, the Plan of it). The
    op's float arguments reach the launcher tagged (`_Arg`)."""
    args = [_Arg(a, i) if type(a) is float else a for i, a in enumerate(args)]
    rec = _Recorder(args)
    saved, _local.recorder = active(), rec
    try:
        with rec:
            out = fn(*args)
    finally:
        _local.recorder = saved
    try:
        plan = rec.finish(out)
    except Exception as e:  # noqa: BLE001 - the launcher ran; the plan only is lost
        plan = Plan(why_not=f"the plan could not be finished ({type(e).__name__}: {e})")
    return out, plan


def replay(plan: Plan, args):
    """What the C++ kernel does with a plan, in Python: the allocations, each launch through
    Triton with its slots resolved against `args`, then the results."""
    if plan.why_not:
        raise ValueError(f"plan not replayable: {plan.why_not}")
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    allocs = [torch.empty_strided(sizes, strides, dtype=dt, device=device)
              for sizes, strides, dt in plan.allocations]

    def resolve(s: Slot):
        if s.kind == ARG:
            return fp32_parts(args[s.index])[s.offset]
        if s.kind in (INT, FLOAT):
            return s.value
        if s.kind == NULL:
            return None if s.dtype is None else torch.empty(0, dtype=s.dtype, device=device)
        base = args[s.index] if s.kind == INPUT else allocs[s.index]
        size = s.dtype.itemsize if s.dtype is not None else base.element_size()
        start = base.storage_offset() * base.element_size() + s.offset
        n = (base.untyped_storage().nbytes() - start) // size
        return torch.empty(0, dtype=s.dtype, device=device).set_(
            base.untyped_storage(), start // size, (n,), (1,))

    for L in plan.launches:
        L.kernel[L.grid](*[v if c else resolve(v) for _, v, c in L.params])
    outs = [None if o is None else (torch.empty_strided(o[1], o[2], dtype=o[3], device=device)
                                    if o[0] == "empty" else allocs[o[1]]) for o in plan.outputs]
    return outs


@contextlib.contextmanager
def host_check():
    """The body only checks values on the host (CPU tensors: bad routing raises): its ops make
    no data for the kernels, so they do not stop a plan."""
    rec = active()
    if rec is None:
        yield
        return
    saved, rec.checking = rec.checking, True
    try:
        yield
    finally:
        rec.checking = saved


# --- the hook of csrc/launch/plans.cpp -------------------------------------------------------

def cpp_hook(implementations, recordable):
    """The hook csrc/launch/plans.cpp calls for a signature it has not seen: `for_cpp(name, args,
    record)` runs the op `name` ("fastrobust::multi_bn", ...) through its Python launcher,
    `implementations()[op]`, and returns (its results, the plan for C++ when `record` and
    `recordable()`, else None)."""
    def for_cpp(name: str, args, record: bool):
        impl = implementations()[name.split("::", 1)[1]]
        if not record or not recordable():
            return impl(*args), None
        out, plan = record_call(impl, args)
        try:
            return out, plan.for_cpp()
        except Exception as e:  # noqa: BLE001 - the launcher ran: its results stand
            return out, {"why_not": f"the plan could not be written for C++ "
                                    f"({type(e).__name__}: {e})"}
    return for_cpp


# --- launches under the interpreter: what csrc/launch/plans.cpp sends, run from its bytes -----

_handles: dict = {}   # handle -> (kernel, [(name, type | None, value)] every parameter in order)
_handle_of: dict = {}
_next_handle = itertools.count(1)
_SIZES = {"i32": 4, "i64": 8, "fp32": 4}
_FORMATS = {"i32": "<i", "i64": "<q", "fp32": "<f"}


def _interpreted(L: Launch, model) -> int:
    """The handle of an interpreted launch: the kernel, and for each of its parameters the
    type it is passed as (None: compiled in, with its value)."""
    passed = {name: ty for name, _, ty in model}
    params = []
    for name, v, const in L.params:
        if name in passed:
            params.append((name, passed[name], None))
        elif const:
            params.append((name, None, v))
        elif v.kind == NULL:
            params.append((name, None, None))
        else:  # an int compiled in (1)
            params.append((name, None, int(v.value)))
    key = (id(L.kernel), tuple((n, t, repr(v)) for n, t, v in params))
    handle = _handle_of.get(key)
    if handle is None:
        handle = _handle_of[key] = next(_next_handle)
        _handles[handle] = (L.kernel, params)
    return handle


def _tensor_at(address: int, ty: str) -> torch.Tensor:
    """A CPU tensor whose first element is at `address` (what the interpreter reads a
    pointer argument from)."""
    dtype = next(d for d, t in _TYPES.items() if t == ty[1:])
    if address == 0:
        return torch.empty(0, dtype=dtype)
    raw = (ctypes.c_char * dtype.itemsize).from_address(address)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype)


class InterpreterLaunch:
    """The launch hook of `fastrobust._C._plan_call` (CPU tensors, tests): receives each
    launch as C++ would hand it to cuLaunchKernel (handle, grid, block, shared memory, and each
    parameter's bytes) and runs the kernel under the Triton interpreter from those bytes.
    `scratch` trailing pointer parameters are reported, as a compiled Triton kernel has them
    (global and profile scratch since Triton 3.5); the replay must pass them as null."""

    def __init__(self, scratch: int = 2):
        self.scratch = scratch
        self.launches: list = []  # (kernel name, grid, block, shared) of each launch
        self.capturing = False    # a CUDA graph capture, as the driver launcher asks it

    def param_sizes(self, handle: int) -> list[int]:
        _, params = _handles[handle]
        sizes = [8 if ty.startswith("*") else _SIZES[ty] for _, ty, _ in params if ty]
        return sizes + [8] * self.scratch

    def __call__(self, handle: int, grid, block: int, shared: int, params: list) -> None:
        kernel, layout_ = _handles[handle]
        passed = [(n, ty) for n, ty, _ in layout_ if ty]
        if len(params) != len(passed) + self.scratch:
            raise RuntimeError(f"{_name(kernel)}: {len(params)} parameters launched for "
                               f"{len(passed)} + {self.scratch} scratch")
        if any(struct.unpack("<Q", p)[0] for p in params[len(passed):]):
            raise RuntimeError(f"{_name(kernel)}: a scratch parameter is not null")
        values = {}
        for (name, ty), raw in zip(passed, params):
            if ty.startswith("*"):
                values[name] = _tensor_at(struct.unpack("<Q", raw)[0], ty)
            else:
                values[name] = struct.unpack(_FORMATS[ty], raw)[0]
        args = [values[n] if ty else v for n, ty, v in layout_]
        self.launches.append((_name(kernel), tuple(grid), block, shared))
        kernel[tuple(grid)](*args)
