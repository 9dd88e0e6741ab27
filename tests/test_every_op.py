"""What holds for every registered op, with the cases taken from tests/op_table.py: the table
names every op the extension registers; a valid call passes the argument checks on every
backend; every op with a bad-argument row in tests/test_op_boundary.py; each Triton op's
launch plan replays bitwise, in Python and from C++; each op on each device agrees with the
eager kernels; the differentiable ops have second derivatives."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastrobust import _C, backends
from fastrobust.backends import triton as triton_backend
from op_table import BAD, OPS, Op, cloned, registered, run, tensors

_CALLED = [op for op in OPS.values() if not op.needs_group]
_KERNELS = [op for op in _CALLED if op.kernel]


def _ids(ops: list[Op]) -> list[str]:
    return [op.name for op in ops]


def test_the_table_has_every_registered_op():
    assert set(OPS) == registered()


def test_every_kernel_op_is_in_its_backend_family():
    for op in OPS.values():
        if op.kernel:
            assert op.name in backends.SCHEMAS[op.family], op.name


def test_every_op_has_a_bad_argument_case():
    assert {row[0] for row in BAD} == set(OPS) - {"multi_bn_grads_with_graph", "sync_multi_bn"}


@pytest.mark.parametrize("op", _CALLED, ids=_ids(_CALLED))
def test_a_valid_call_passes_the_checks(backend, op):
    """(the baseline each bad-argument case changes one argument of)"""
    run(op.name, op.args())


# --- launch plans: Python replay, then the C++ one -----------------------------------------

def _triton_impls() -> dict:
    return triton_backend.implementations() if triton_backend.missing() is None else {}


def _same(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.stride() == w.stride() and g.dtype == w.dtype, i
        assert torch.equal(g, w), f"result {i} differs"


@pytest.mark.skipif(triton_backend.missing() is not None, reason="triton missing")
@pytest.mark.parametrize("op", _KERNELS, ids=_ids(_KERNELS))
def test_the_launch_plan_replays_bitwise(op, monkeypatch):
    """Recorded on one input set, replayed on another of the same signature: by the Python
    twin of the replay, and by the CUDA key's C++ kernel (csrc/launch/plans.cpp) with each launch
    handed to the Triton interpreter; both bitwise equal to the launcher."""
    from fastrobust.ops._triton import plan as _plan, tiles as _common
    monkeypatch.setattr(_common, "MIN_PROGRAMS", 4)  # split reductions at test sizes
    impl = _triton_impls()[op.name]
    with backends.use("triton"):  # (the earlier ops a row's arguments come from)
        a, b = op.args(1), op.args(2)
    name = f"fastrobust::{op.name}"
    assert _C._plan_signature(name, *a.values()) == _C._plan_signature(name, *b.values())
    _, plan = _plan.record_call(impl, list(cloned(a).values()))
    assert plan.why_not is None, plan.why_not
    assert plan.launches
    direct, py, cpp = cloned(b), cloned(b), cloned(b)
    want = tensors(impl(*direct.values()), direct)
    _same(tensors(_plan.replay(plan, list(py.values())), py), want)
    hook = _plan.InterpreterLaunch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plan that is not replayable warns: fail on it
        _C._plan_call(name, hook, *cloned(a).values())
        before = _C._plan_stats()["replayed_calls"]
        _same(tensors(_C._plan_call(name, hook, *cpp.values()), cpp), want)
    assert _C._plan_stats()["replayed_calls"] == before + 1


# --- devices -------------------------------------------------------------------------------

# fp32: the kernels reduce in another order than the eager ones (a few ulps of values of
# order 1 after ~16-term sums; divisions and fused multiply-adds on a GPU add ~2 ulps)
F32 = dict(rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("op", _KERNELS, ids=_ids(_KERNELS))
def test_on_each_device_the_op_agrees_with_the_eager_kernels(device, op):
    """The device's own kernels (CPU: C++; CUDA: Triton) against the eager ones on CPU."""
    a = op.args(3)
    on_device = {k: v.to(device, copy=True) if isinstance(v, torch.Tensor) else v
                 for k, v in a.items()}
    got = tensors(run(op.name, on_device), on_device)
    on_cpu = cloned(a)
    with backends.use("eager"):
        want = tensors(run(op.name, on_cpu), on_cpu)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, i
        if g.numel() or w.numel():
            torch.testing.assert_close(g.cpu(), w, **F32, msg=f"{op.name}: result {i}")


# --- second derivatives --------------------------------------------------------------------

GG = dict(eps=1e-6, atol=1e-5, rtol=1e-4)  # fp64 finite differences of a backward
_DIFF = [op for op in _CALLED if op.differentiable]


@pytest.mark.parametrize("op", _DIFF, ids=_ids(_DIFF))
def test_second_derivatives_of_the_registered_op(backend, op):
    """gradgradcheck of the op's first result in every input its autograd differentiates
    (fp64), through the registered op: what torch.compile traces."""
    a = op.args(4, torch.float64)
    names = [n for n in op.differentiable if a[n] is not None]
    leaves = [a[n].detach().requires_grad_() for n in names]

    def first_result(*ts):
        call = dict(a, **dict(zip(names, ts)))
        out = run(op.name, call)
        return out[0] if isinstance(out, (tuple, list)) else out
    if "running_mean" in a:  # the update is in place: keep each evaluation's inputs equal
        a["running_mean"], a["running_var"] = None, None
        a["num_batches_tracked"] = None
    assert torch.autograd.gradgradcheck(first_result, leaves, fast_mode=True, **GG)
