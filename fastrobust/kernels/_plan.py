"""Launch plans: how a call on CUDA reaches the Triton kernels with no Python on the way.

The Python launchers (multi_bn.py, film.py, pgd.py, elementwise.py) decide everything from the
call's *signature*: the op, each tensor's dtype, sizes, strides, device, 16-byte alignment and
which tensors share storage, and each scalar's value; nothing on the host reads a value on the
device. So the first call with a signature runs the launcher under a recorder, which writes down
a plan:

  allocations  every tensor the launcher allocated (sizes, strides, dtype), in order;
  launches     every kernel launch: the compiled kernel, its grid, and for each parameter a slot
               (input i or allocation j at a byte offset, a null pointer, an int, a float);
  outputs      the op's results: an allocation, or a fresh empty tensor.

csrc/cuda/plans.cpp, the CUDA dispatch key's kernel for every op, keys its plans by the
signature (computed in C++), replays a stored plan for every later call with cuLaunchKernel, and
calls `record` (through the hook `install` registers) only for a signature it has not seen.

A launcher that did anything but allocate, view and launch (a copy of a non-contiguous input, a
fill, a table of fp64 scalars written from the host) makes a plan that could not be replayed
without that data: `Plan.why_not` says why, and the C++ kernel then runs the Python launcher for
every call with that signature (correct, with Python's cost).

`replay` is the same algorithm in Python, launching through Triton (the interpreter on CPU
tensors): tests/test_plans.py records a plan on one set of inputs and replays it on another.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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

# slot kinds (csrc/cuda/plans.cpp reads the same numbers)
INPUT, ALLOC, NULL, INT, FLOAT = 0, 1, 2, 3, 4


@dataclass
class Slot:
    kind: int
    index: int = -1       # INPUT / ALLOC: which
    offset: int = 0       # INPUT / ALLOC: bytes from its first element
    value: float = 0      # INT / FLOAT
    dtype: torch.dtype | None = None  # a pointer's element type (Python replay)


@dataclass
class Launch:
    kernel: object        # the JITFunction (InterpretedFunction under the interpreter)
    compiled: object      # Triton's CompiledKernel (None under the interpreter)
    grid: tuple
    params: list          # (name, Slot or a constexpr value, constexpr?) in the kernel's order


@dataclass
class Plan:
    allocations: list = field(default_factory=list)  # (sizes, strides, dtype)
    launches: list = field(default_factory=list)
    outputs: list = field(default_factory=list)  # ("alloc", j) | ("empty", sizes, strides,
    #                                              dtype) | None
    why_not: str | None = None                       # set: not replayable

    def refuse(self, why: str) -> None:
        if self.why_not is None:
            self.why_not = why

    def for_cpp(self) -> dict:
        """The plan as csrc/cuda/plans.cpp reads it: each launch's CUfunction, warps, shared
        memory, grid and, for every parameter the compiled kernel takes (Triton's own
        signature: what it specialized away as a constant is not passed), (slot kind, index,
        byte offset, value, type)."""
        if self.why_not:
            return {"why_not": self.why_not}
        launches, keep = [], []
        for L in self.launches:
            c = L.compiled
            if c is None:
                return {"why_not": f"{L.kernel.__name__} was not compiled (the interpreter)"}
            if getattr(c, "function", None) is None:
                c._init_handles()
            recorded = {name: (v, const) for name, v, const in L.params}
            names = [name for name, _, _ in L.params]
            params = []
            for key, ty in c.src.signature.items():
                name = names[key] if isinstance(key, int) else key
                if ty == "constexpr":
                    continue
                v, const = recorded[name]
                if const or not isinstance(ty, str):
                    return {"why_not": f"{L.kernel.__name__}: parameter {name} is {ty} for "
                                       "Triton but a constant for the launcher"}
                params.append((v.kind, v.index, v.offset, v.value, ty))
            launches.append((int(c.function), int(c.metadata.num_warps),
                             int(c.metadata.shared), L.grid, params, L.kernel.__name__))
            keep.append(c)
        return {"why_not": None, "allocs": self.allocations, "outputs": self.outputs,
                "launches": launches, "keep": keep}


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
        if isinstance(t, bool):
            self.plan.refuse("a bool kernel argument")
            return Slot(INT, value=int(t))
        if isinstance(t, int):
            return Slot(INT, value=t)
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
        if compiled is not None:
            meta = compiled.metadata
            extra = [k for k in ("global_scratch_size", "profile_scratch_size")
                     if getattr(meta, k, 0)]
            if (getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid",
                                                             False)
                    or getattr(meta, "launch_pdl", False) or extra):
                self.plan.refuse(f"{kernel.__name__} needs a launch option the replay lacks "
                                 f"(clusters, cooperative grid, PDL or scratch: {extra})")
        self.plan.launches.append(Launch(kernel, compiled, grid, params))

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
        compiled = kernel[grid](*args, **kwargs)
    try:
        rec.launch(kernel, grid, args, kwargs, compiled)
    except Exception as e:  # noqa: BLE001 - the kernel ran; the plan only is lost
        rec.plan.refuse(f"{getattr(kernel, '__name__', kernel)} could not be written down "
                        f"({type(e).__name__}: {e})")
    return compiled


def _python_dispatch_excluded() -> bool:
    excluded = getattr(torch._C, "_dispatch_tls_is_dispatch_key_excluded", None)
    return bool(excluded and excluded(torch._C.DispatchKey.Python))


def record_call(fn, args):
    """Runs `fn(*args)` (a Python launcher) and returns (its result, the Plan of it)."""
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
        if s.kind in (INT, FLOAT):
            return s.value
        if s.kind == NULL:
            return torch.empty(0, dtype=s.dtype or torch.float32, device=device)
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


# --- the hook of csrc/cuda/plans.cpp -------------------------------------------------------------

def for_cpp(name: str, args, record: bool):
    """Runs the op `name` ("fastrobust::multi_bn", ...) through its Python launcher (Triton's;
    the eager one, with a warning, where triton is missing) and returns (its results, the plan
    for C++ when `record`, else None)."""
    from ..backends import triton as triton_backend
    impl = triton_backend.cuda_implementations()[name.split("::", 1)[1]]
    if not record or triton_backend.missing() is not None:
        return impl(*args), None
    out, plan = record_call(impl, args)
    try:
        return out, plan.for_cpp()
    except Exception as e:  # noqa: BLE001 - the launcher ran: its results stand
        return out, {"why_not": f"the plan could not be written for C++ ({type(e).__name__}: "
                                f"{e})"}
