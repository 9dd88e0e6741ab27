"""Launch plans (fastrobust/ops/_triton/plan.py, csrc/launch/plans.cpp): on CUDA builds the CUDA
key's kernel replays, from C++, what each op's Python launcher did the first time it saw a call
signature. Here (Triton under the interpreter, CPU tensors) the same plans are recorded and
replayed by the Python twin of the C++ replay (tests/test_plan_replay.py runs the C++ one): a plan recorded on one set of inputs, replayed
on another of the same signature, gives bitwise what the launcher gives; and the signature the
C++ kernel keys plans by tells apart every change the launchers decide on."""
from __future__ import annotations

import pytest
import torch

from fastrobust import _C
from fastrobust.backends import triton as triton_backend
from fastrobust.ops._triton import plan as _plan

pytestmark = pytest.mark.skipif(triton_backend.missing() is not None, reason="triton missing")

IMPLS = triton_backend.implementations() if triton_backend.missing() is None else {}


def _bn_args(g, N=6, C=5, H=4, K=3, mixed=False, training=True, extras=False,
             channels_last=False, relu=False):
    x = torch.randn(N, C, H, H, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    branch = None if mixed else torch.randint(0, K, (N,), generator=g)
    mix = torch.rand(N, K, generator=g) if mixed else None
    w, b = torch.rand(K, C, generator=g) + .5, torch.randn(K, C, generator=g)
    rm, rv = torch.randn(K, C, generator=g), torch.rand(K, C, generator=g) + .5
    nbt = torch.zeros(K, dtype=torch.long)
    ext = [torch.rand(N, C, generator=g) + .5 for _ in range(3)] if extras else [None] * 3
    return [x, branch, mix, w, b, rm, rv, nbt, *ext, K, training, 0.1, False, 1e-5, relu]


def _bwd_args(g, mixed=False, extras=False, channels_last=False, relu=False):
    fwd = _bn_args(g, mixed=mixed, extras=extras, channels_last=channels_last, relu=relu)
    _, mean, invstd, planes = IMPLS["multi_bn"](*fwd)
    x = fwd[0]
    needs = [True, mixed, True, True, extras, extras, extras]
    return [torch.randn_like(x), x, fwd[1], fwd[2], fwd[3], fwd[4], mean, invstd, planes,
            *fwd[8:11], fwd[11], True, relu, needs]


def _pgd_args(g, N=5, l2=False, per_sample=False):
    x_nat = torch.rand(N, 3, 6, 6, generator=g)
    x_adv = (x_nat + 0.01 * torch.randn(x_nat.shape, generator=g)).clamp(0, 1)
    grad = torch.randn(x_nat.shape, generator=g)
    eps_t = torch.full((N,), 0.03) if per_sample else None
    return [x_adv, grad, x_nat, eps_t, 0.03, None, 0.01, l2, 0.0, 1.0]


CASES = {
    "routed": ("multi_bn", lambda g: _bn_args(g)),
    "routed_eval_extras_relu": ("multi_bn", lambda g: _bn_args(g, training=False, extras=True,
                                                              relu=True)),
    "mixed_cl": ("multi_bn", lambda g: _bn_args(g, mixed=True, channels_last=True)),
    "mixed_extras": ("multi_bn", lambda g: _bn_args(g, mixed=True, extras=True, relu=True)),
    "one_value_planes": ("multi_bn", lambda g: _bn_args(g, H=1)),
    "backward_routed": ("multi_bn_backward", lambda g: _bwd_args(g)),
    "backward_mixed_extras": ("multi_bn_backward",
                              lambda g: _bwd_args(g, mixed=True, extras=True, relu=True)),
    "film_NxC": ("film", lambda g: [torch.randn(4, 3, 5, 5, generator=g),
                                    torch.randn(4, 3, generator=g), torch.randn(4, 3,
                                                                                generator=g)]),
    "film_backward_C": ("film_backward",
                        lambda g: [torch.randn(4, 3, 5, 5, generator=g),
                                   torch.randn(4, 3, 5, 5, generator=g),
                                   torch.randn(3, generator=g), [True, True, True],
                                   [True, True]]),
    "add_relu": ("add_relu", lambda g: [torch.randn(4, 8, 3, 3, generator=g),
                                        torch.randn(4, 8, 3, 3, generator=g)]),
    "pgd_linf": ("pgd_step", lambda g: _pgd_args(g)),
    "pgd_l2_split": ("pgd_step", lambda g: _pgd_args(g, N=2, l2=True, per_sample=True)),
    "pgd_l2": ("pgd_step", lambda g: _pgd_args(g, N=300, l2=True)),
    "mifgsm": ("mifgsm_step", lambda g: (lambda a: [a[0], a[1], torch.randn_like(a[0]),
                                                    *a[2:7], 1.0, 0.0, 1.0])(_pgd_args(g))),
}


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _results(out, args):
    """What a call left: its results and every input (the in-place ops' results)."""
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [t for t in outs + list(args) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("case", list(CASES))
def test_replay_equals_the_launcher(case):
    op, make = CASES[case]
    a = make(torch.Generator().manual_seed(1))
    _, plan = _plan.record_call(IMPLS[op], _clone(a))
    assert plan.why_not is None, plan.why_not
    assert plan.launches
    b = make(torch.Generator().manual_seed(2))  # other values, the same signature
    assert _C._plan_signature(f"fastrobust::{op}", *a) == _C._plan_signature(
        f"fastrobust::{op}", *b)
    b_direct, b_replay = _clone(b), _clone(b)
    want = _results(IMPLS[op](*b_direct), b_direct)
    got = _results(_plan.replay(plan, b_replay), b_replay)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.stride() == w.stride() and g.dtype == w.dtype, i
        assert torch.equal(g, w), f"result {i} differs"


@pytest.mark.parametrize("case", ["routed", "mixed_extras", "backward_mixed_extras",
                                  "pgd_l2_split"])
def test_the_same_signature_records_the_same_plan(case):
    """What the launcher decided (kernels, grids, scalars, slots) depends on the signature
    alone: two recordings with other values agree."""
    op, make = CASES[case]

    def shape(plan):
        return [(L.kernel.__name__, L.grid,
                 [(n, v if c else (v.kind, v.index, v.offset, v.value)) for n, v, c in L.params])
                for L in plan.launches], plan.allocations, plan.outputs

    plans = [_plan.record_call(IMPLS[op], make(torch.Generator().manual_seed(s)))[1]
             for s in (3, 4)]
    assert shape(plans[0]) == shape(plans[1])


def _sig(op, args):
    return _C._plan_signature(f"fastrobust::{op}", *args)


def test_the_signature_tells_apart_what_the_launchers_decide_on():
    g = torch.Generator().manual_seed(5)
    base = _bn_args(g)
    s0 = _sig("multi_bn", base)
    changed = {
        "dtype": [base[0].double()] + base[1:],
        "shape": [base[0][:, :, :3, :3].contiguous()] + base[1:],
        "layout": [base[0].contiguous(memory_format=torch.channels_last)] + base[1:],
        "alignment": [torch.empty(base[0].numel() + 1)[1:].view_as(base[0])] + base[1:],
        "training": base[:12] + [False] + base[13:],
        "an extra": base[:8] + [torch.rand(6, 5)] + base[9:],
        "weight shares x's storage": base[:3] + [base[0].view(-1)[:15].view(3, 5)] + base[4:],
    }
    for what, args in changed.items():
        assert _sig("multi_bn", args) != s0, what
    # values alone do not change it, nor do the float arguments (replay arguments)
    assert _sig("multi_bn", [t.clone() if isinstance(t, torch.Tensor) else t
                             for t in base]) == s0
    assert _sig("multi_bn", base[:13] + [0.3] + base[14:15] + [1e-3] + base[16:]) == s0
    bwd = _bwd_args(g)
    other_needs = bwd[:-1] + [[True, False, False, True, False, False, False]]
    assert _sig("multi_bn_backward", bwd) != _sig("multi_bn_backward", other_needs)
    x = torch.randn(4, 3, 5, 5)
    gamma, beta = torch.randn(4, 3), torch.randn(4, 3)
    assert _sig("film", [x, gamma, gamma]) != _sig("film", [x, gamma, beta])  # aliasing


def test_a_launcher_that_copies_data_is_not_replayed():
    """A PGD step whose sample dims merge into no three strided dims runs on contiguous
    copies, written back: a replay would not know to copy, so the plan says why and C++ keeps
    the launcher."""
    g = torch.Generator().manual_seed(6)
    x_nat = torch.rand(3, 2, 3, 2, 3, 2, generator=g)
    # grad with the sample dims in the reverse order of x_adv's (the shape is a palindrome)
    grad = torch.randn(3, 2, 3, 2, 3, 2, generator=g).permute(0, 5, 4, 3, 2, 1)
    args = [x_nat.clone(), grad, x_nat, None, 0.03, None, 0.01, False, 0.0, 1.0]
    _, plan = _plan.record_call(IMPLS["pgd_step"], args)
    assert plan.why_not and "merge into no three strided dims" in plan.why_not
    assert plan.for_cpp() == {"why_not": plan.why_not}
    with pytest.raises(ValueError, match="not replayable"):
        _plan.replay(plan, args)


def test_an_interpreted_plan_is_given_to_cpp_with_handles():
    """Under the interpreter a launch's handle is a key of `_plan.InterpreterLaunch` (the
    CPU tests' launch hook) instead of a CUfunction; the parameters are the layout model's."""
    _, plan = _plan.record_call(IMPLS["add_relu"], CASES["add_relu"][1](
        torch.Generator().manual_seed(7)))
    d = plan.for_cpp()
    assert d["why_not"] is None and not d["pinned"]
    (handle, warps, shared, grid, params, name), = d["launches"]
    assert name == "_add_relu_kernel" and handle in _plan._handles and grid == (1, 1, 1)
    # a, b, out, total (BLOCK is a constexpr): three pointers to fp32, an i32
    assert [(p[0], p[4]) for p in params] == [(_plan.INPUT, "*fp32"), (_plan.INPUT, "*fp32"),
                                              (_plan.ALLOC, "*fp32"), (_plan.INT, "i32")]


def test_no_python_frame_inside_the_op_on_cpu():
    """From torch.ops to the CPU kernels is C++: no Python frame is entered while the op runs
    (benchmarks/host_frames.py counts the same on CUDA, where plans.cpp replays the Triton
    launches; tests/test_gpu_correctness.py checks it there)."""
    import host_frames
    for name, fn in host_frames.cases("cpu").items():
        fn()
        c = host_frames.FrameCounter.count(fn)
        assert c.inside == 0, (name, c.inside_names)
        assert c.total > 0  # (the counter sees the wrapper's frames)


def test_the_counter_sees_a_python_kernel():
    """A kernel written in Python (Triton's launcher under the interpreter) is counted as
    frames inside the op: the check above can fail."""
    import host_frames

    from fastrobust import backends, functional as F
    x, br = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])
    with backends.use("triton"):
        c = host_frames.FrameCounter.count(
            lambda: F.multi_batch_norm(x, br, num_branches=2, training=True))
    assert c.inside > 0
