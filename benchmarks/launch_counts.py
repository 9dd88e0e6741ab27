"""Kernel launches each fastrobust op would make on a CUDA device, counted without a GPU.

The ops run on meta tensors with the Triton backend's implementations registered for the Meta
dispatch key (for the duration of `counting()` only), under a TorchDispatchMode that records
every ATen op that would launch a kernel on CUDA (allocations, views and metadata queries do
not), and with Triton's launcher replaced by a recorder (nothing is run). The C++ autograd
node's own ATen calls are seen too, so a forward plus backward through `torch.autograd` counts
what a training step would launch.

    python benchmarks/launch_counts.py          # the table, one row per op and case

tests/test_gpu_path.py asserts the launch budget (docs/backends.md) on these counts.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fastrobust  # noqa: E402,F401 - registers the ops
from fastrobust import functional as F  # noqa: E402
from fastrobust.backends import triton as triton_backend  # noqa: E402
import op_table  # noqa: E402 - the tests' table of ops (tests/op_table.py)

aten = torch.ops.aten
# ATen ops that launch nothing on CUDA: allocation, views, metadata.
_FREE = {
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
    aten.new_empty.default, aten.new_empty_strided.default, aten.view.default,
    aten._unsafe_view.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.as_strided.default, aten.expand.default, aten.t.default, aten.permute.default,
    aten.select.int, aten.slice.Tensor, aten.alias.default, aten.detach.default,
    aten.transpose.int, aten.lift_fresh.default, aten.sym_size.int, aten.sym_stride.int,
    aten.sym_numel.default, aten.is_contiguous.default, aten.is_contiguous.memory_format,
    aten.sym_storage_offset.default, aten.reshape.default, aten.unbind.int,
}


def _returns_alias(func, args, out) -> bool:
    """A view (or the input itself, e.g. `.to` to its own dtype) launches nothing."""
    returns = func._schema.returns
    if not returns or returns[0].alias_info is None or returns[0].alias_info.is_write:
        return False
    first = args[0] if args else None
    return isinstance(out, torch.Tensor) and (out is first or out._is_view())


def _launcher_classes():
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
    except ImportError:
        pass
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


class LaunchCounter(TorchDispatchMode):
    """Records aten launches and Triton launches (kernel names) in `self.launches`."""

    def __init__(self, impls: dict):
        super().__init__()
        self.impls = impls
        self.launches: list[str] = []
        self.grids: list[tuple[str, tuple]] = []  # (kernel, grid) of each Triton launch
        self.collectives: list[str] = []  # the synchronized BN's all-reduces (not run here)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "_c10d_functional":
            # A collective of the synchronized BN (its C++ node calls it through the
            # dispatcher): recorded, not run (one process, meta tensors).
            if func._opname.startswith("all_reduce"):
                self.collectives.append(func._opname)
            return args[0]
        if func.namespace == "fastrobust":
            # Our op: run the Triton backend's implementation under this mode, so its ATen
            # calls and kernel launches are recorded (the dispatcher would hide them); a
            # composite (sync_multi_bn below autograd) runs its parts under it too.
            impl = self.impls.get(func._opname, func)
            with self:
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        if func not in _FREE and not _returns_alias(func, args, out):
            self.launches.append(f"aten.{func._opname}")
        return out


@contextlib.contextmanager
def counting(record_only: bool = False):
    """Yields a LaunchCounter; fastrobust ops on meta tensors take the Triton path.
    ``record_only``: leave Triton's launcher alone (a caller that patched it itself)."""
    impls = triton_backend.implementations()
    counter = LaunchCounter(impls)
    saved = {}

    def recorder(fn):
        def run(*args, grid=None, warmup=False, **kwargs):
            counter.launches.append(f"triton.{getattr(fn, '__name__', '?')}")
            counter.grids.append((getattr(fn, "__name__", "?"), tuple(grid)))
        return run

    for cls in ([] if record_only else _launcher_classes()):
        saved[cls] = cls.run
        cls.run = (lambda self, *a, **k: recorder(self.fn)(*a, **k))
    lib = torch.library.Library("fastrobust", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in impls.items():
            lib.impl(name, fn, "Meta")
    try:
        with counter:
            yield counter
    finally:
        for cls, run in saved.items():
            cls.run = run
        del lib


def _t(*shape, dtype=torch.float32, requires_grad=False, channels_last=False):
    t = torch.empty(*shape, device="meta", dtype=dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def bn_case(kind: str, K: int = 2, N: int = 8, C: int = 16, H: int = 8, extras: bool = False,
            training: bool = True, strided_running: bool = False):
    """(forward, backward) closures for a routed or mixed BN call on meta tensors
    (`strided_running`: the running statistics [K, C] views of [C, K] tensors)."""
    x = _t(N, C, H, H, requires_grad=True)
    w, b = _t(K, C, requires_grad=True), _t(K, C, requires_grad=True)
    rm, rv = torch.zeros(K, C, device="meta"), torch.ones(K, C, device="meta")
    if strided_running:
        rm, rv = torch.zeros(C, K, device="meta").t(), torch.ones(C, K, device="meta").t()
    kw = dict(training=training, momentum=0.1, eps=1e-5)
    if extras:
        kw.update(input_scale=_t(N, C, requires_grad=True), film_gamma=_t(N, C, requires_grad=True),
                  film_beta=_t(N, C, requires_grad=True), activation="relu")
    if kind == "routed":
        branch = torch.zeros(N, dtype=torch.long, device="meta")
        call = lambda: F.multi_batch_norm(x, branch, w, b, rm, rv, **kw)  # noqa: E731
    else:
        mix = _t(N, K, requires_grad=True)
        call = lambda: F.mixed_batch_norm(x, mix, w, b, rm, rv, **kw)  # noqa: E731
    return call


def measure_bn(kind, **case):
    """(forward launches, backward launches) of one BN call through autograd."""
    call = bn_case(kind, **case)
    with counting() as c:
        y = call()
    fwd = list(c.launches)
    dy = torch.empty_like(y)
    with counting() as c:
        y.backward(dy)
    return fwd, list(c.launches)


@contextlib.contextmanager
def _one_rank():
    """The synchronized BN as rank 0 of a two-rank job sees it, without a process group: its
    collectives are recorded by the counter (`LaunchCounter.collectives`), not run."""
    from fastrobust import distributed as D

    saved = D._group
    D._group = lambda op, group: (0, 2, "launch-counts")
    try:
        yield
    finally:
        D._group = saved


def measure_sync(kind, K=2, N=8, C=16, H=8, extras=False):
    """(forward launches, backward launches, forward all-reduces, backward all-reduces) of one
    synchronized BN call (fastrobust.distributed, the op sync_multi_bn) through autograd."""
    from fastrobust import distributed as D

    x = _t(N, C, H, H, requires_grad=True)
    w, b = _t(K, C, requires_grad=True), _t(K, C, requires_grad=True)
    rm, rv = torch.zeros(K, C, device="meta"), torch.ones(K, C, device="meta")
    kw = dict(momentum=0.1, eps=1e-5)
    if extras:
        kw.update(input_scale=_t(N, C, requires_grad=True), film_gamma=_t(N, C, requires_grad=True),
                  film_beta=_t(N, C, requires_grad=True), activation="relu")
    branch = torch.zeros(N, dtype=torch.long, device="meta")
    mix = _t(N, K, requires_grad=True)
    with _one_rank():
        with counting() as c:
            if kind == "routed":
                y = D.sync_multi_batch_norm(x, branch, w, b, rm, rv, **kw)
            else:
                y = D.sync_mixed_batch_norm(x, mix, w, b, rm, rv, **kw)
        fwd, n_fwd = list(c.launches), len(c.collectives)
        with counting() as c:
            y.backward(torch.empty_like(y))
        return fwd, list(c.launches), n_fwd, len(c.collectives)


def measure_film(gamma="NC", beta="NC", per_channel=False, shape=(8, 16, 8, 8),
                 channels_last=False):
    """gamma, beta: "NC" ([N, C]), "C" ([C]) or None; per_channel=True makes both "C"."""
    x = _t(*shape, requires_grad=True, channels_last=channels_last)
    N, C = shape[:2]
    kind = {"NC": (N, C), "C": (C,)}
    if per_channel:
        gamma, beta = ("C" if gamma else None), ("C" if beta else None)
    g = None if gamma is None else _t(*kind[gamma], requires_grad=True)
    b = None if beta is None else _t(*kind[beta], requires_grad=True)
    with counting() as c:
        y = F.film(x, g, b)
    fwd = list(c.launches)
    with counting() as c:
        y.backward(torch.empty_like(y))
    return fwd, list(c.launches)


def measure_add_relu():
    a, b = _t(8, 16, 8, 8, requires_grad=True), _t(8, 16, 8, 8, requires_grad=True)
    with counting() as c:
        y = F.add_relu(a, b)
    fwd = list(c.launches)
    with counting() as c:  # grad(), not backward(): leaves sharing one gradient cost a copy
        torch.autograd.grad(y, (a, b), torch.empty_like(y))
    return fwd, list(c.launches)


def measure_pgd(norm="linf", per_sample=False, momentum=False, shape=(8, 3, 32, 32),
                layouts=False):
    """The launches of one step (`layouts`: x_adv every second column of a wider tensor, grad
    channels_last, x_nat a slice: each read and written through its strides)."""
    x_adv, g, x_nat = _t(*shape), _t(*shape), _t(*shape)
    if layouts:
        x_adv = _t(*shape[:-1], 2 * shape[-1])[..., ::2]
        g = _t(*shape, channels_last=True)
        x_nat = _t(*shape[:-1], shape[-1] + 1)[..., 1:]
    N = shape[0]
    eps = _t(N) if per_sample else 8 / 255
    alpha = _t(N) if per_sample else 2 / 255
    with counting() as c:
        if momentum:
            F.mifgsm_step_(x_adv, g, _t(*shape), x_nat, eps, alpha, decay=1.0)
        else:
            F.pgd_step_(x_adv, g, x_nat, eps, alpha, norm=norm)
    return list(c.launches)


def table_ops(dtype=torch.float32) -> list[tuple[str, object]]:
    """(op, a closure that calls it once on meta tensors) for every op of tests/op_table.py
    with a kernel per backend, on its row's valid call: a new op is counted here, and compiled
    and checked by aot_compile.py and plan_layout_check.py, with no edit of these scripts."""
    out = []
    for op in op_table.OPS.values():
        if op.kernel and not op.needs_group:
            with counting():  # (the ops a row's arguments come from take the Triton path too)
                args = op.args(0, dtype, device="meta")
            out.append((op.name, lambda a=args, name=op.name: op_table.run(name, a)))
    return out


def measure_ops() -> list[tuple[str, list[str]]]:
    """(op, its launches) for one call of each op of table_ops()."""
    rows = []
    for name, call in table_ops():
        with counting() as c:
            call()
        rows.append((name, list(c.launches)))
    return rows


def table() -> list[tuple[str, int, int, list[str]]]:
    """(case, forward launches, backward launches or -1, the launches) per case."""
    rows = []
    for kind in ("routed", "mixed"):
        for extras in (False, True):
            for training in (True, False):
                f, b = measure_bn(kind, K=5 if kind == "routed" else 2, extras=extras,
                                  training=training)
                name = f"{kind} bn K={5 if kind == 'routed' else 2}" \
                       f"{' +scale+film+relu' if extras else ''}" \
                       f"{'' if training else ' eval'}"
                rows.append((name, len(f), len(b), f + ["|"] + b))
    for kind in ("routed", "mixed"):
        for extras in (False, True):
            K = 5 if kind == "routed" else 2
            f, b, rf, rb = measure_sync(kind, K=K, extras=extras)
            rows.append((f"sync {kind} bn K={K}{' +scale+film+relu' if extras else ''}",
                         len(f), len(b), f + ["all_reduce"] * rf + ["|"] + b
                         + ["all_reduce"] * rb))
    for per_channel in (False, True):
        f, b = measure_film(per_channel=per_channel)
        rows.append((f"film {'[C]' if per_channel else '[N, C]'}", len(f), len(b), f + ["|"] + b))
    f, b = measure_add_relu()
    rows.append(("add_relu", len(f), len(b), f + ["|"] + b))
    for norm in ("linf", "l2"):
        for per_sample in (False, True):
            launches = measure_pgd(norm, per_sample)
            rows.append((f"pgd_step_ {norm}{' per-sample eps' if per_sample else ''}",
                         len(launches), -1, launches))
    launches = measure_pgd(momentum=True)
    rows.append(("mifgsm_step_", len(launches), -1, launches))
    for norm in ("linf", "l2"):
        launches = measure_pgd(norm, layouts=True)
        rows.append((f"pgd_step_ {norm} strided views", len(launches), -1, launches))
    f, b = measure_bn("routed", K=5, strided_running=True)
    rows.append(("routed bn K=5 strided running stats", len(f), len(b), f + ["|"] + b))
    for shape in ((256, 3, 32, 32), (256, 3, 224, 224)):  # one program per sample, the split
        name = "x".join(map(str, shape))
        launches = measure_pgd("l2", shape=shape)
        rows.append((f"pgd_step_ l2 {name}", len(launches), -1, launches))
        launches = measure_pgd(momentum=True, shape=shape)
        rows.append((f"mifgsm_step_ {name}", len(launches), -1, launches))
    for name, launches in measure_ops():  # each registered op's own call (tests/op_table.py)
        rows.append((f"op {name}", len(launches), -1, launches))
    return rows


def main():
    print("(all_reduce: a collective of the synchronized BN, not counted in fwd / bwd)")
    print(f"{'case':<34} {'fwd':>4} {'bwd':>4}  launches")
    for name, f, b, launches in table():
        detail = ", ".join(f"{k}x{v}" if v > 1 else k for k, v in Counter(launches).items())
        print(f"{name:<34} {f:>4} {b if b >= 0 else '':>4}  {detail}")


if __name__ == "__main__":
    main()
