"""The C++ launch path (csrc/launch/plans.cpp), run here on CPU tensors: `fastrobust._C._plan_call`
takes a call through the CUDA key's kernel (argument checks, signature, plan table, the
Python recording, the parsing of the plan, the parameter buffers of the replay), and hands
each launch, as the bytes cuLaunchKernel would read, to `_plan.InterpreterLaunch`, which runs
the kernel under the Triton interpreter from those bytes.

Every op and every launcher branch is recorded on one input set and replayed from C++ on
another of the same signature, with other float arguments (ε, α, momentum, eps, clip bounds,
decay are replay arguments, not part of the signature): bitwise equal to the Python launcher
on the second set."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastrobust import _C
from fastrobust.backends import triton as triton_backend
from fastrobust.ops._triton import plan as _plan, tiles as _common
from fastrobust.ops.pgd import triton as pgd_kernels

pytestmark = pytest.mark.skipif(triton_backend.missing() is not None, reason="triton missing")

IMPLS = triton_backend.implementations() if triton_backend.missing() is None else {}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}


def _bn(g, v, N=6, C=5, H=4, K=2, mixed=False, training=True, extras=(), relu=False,
        dtype=torch.float32, cl=False, running=True, affine=True, cumulative=False):
    """multi_bn's arguments; `v` (0 or 1) picks the float arguments, so the two input sets
    of a case differ in them."""
    x = torch.randn(N, C, H, H, generator=g).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    branch = None if mixed else torch.randint(0, K, (N,), generator=g)
    mix = torch.rand(N, K, generator=g).to(dtype) if mixed else None
    w, b = (torch.rand(K, C, generator=g) + .5, torch.randn(K, C, generator=g)) if affine \
        else (None, None)
    rm, rv = (torch.randn(K, C, generator=g), torch.rand(K, C, generator=g) + .5) if running \
        else (None, None)
    nbt = torch.zeros(K, dtype=torch.long) if running else None
    ext = [torch.rand(N, C, generator=g).to(dtype) + .5 if e in extras else None
           for e in ("scale", "gamma", "beta")]
    momentum, eps = (0.1, 1e-5) if v == 0 else (0.3, 1e-3)
    return [x, branch, mix, w, b, rm, rv, nbt, *ext, K, training, momentum, cumulative, eps,
            relu]


def _bwd(g, v, needs=None, batch_stats=True, **kw):
    fwd = _bn(g, 0, **kw)
    _, mean, invstd, planes = IMPLS["multi_bn"](*fwd)
    x, mixed = fwd[0], fwd[2] is not None
    extras = [t is not None for t in fwd[8:11]]
    if needs is None:
        needs = [True, mixed, fwd[3] is not None, fwd[4] is not None, *extras]
    return [torch.randn(x.shape, generator=g).to(x.dtype).contiguous(
        memory_format=torch.channels_last if kw.get("cl") else torch.contiguous_format),
        x, fwd[1], fwd[2], fwd[3], fwd[4], mean, invstd, planes, *fwd[8:11], fwd[11],
        batch_stats, fwd[16], needs]


def _pgd(g, v, N=5, shape=(3, 6, 6), l2=False, per_sample=False, dtype=torch.float32):
    x_nat = torch.rand(N, *shape, generator=g).to(dtype)
    x_adv = (x_nat + 0.01 * torch.randn(x_nat.shape, generator=g).to(dtype)).clamp(0, 1)
    grad = torch.randn(x_nat.shape, generator=g).to(dtype)
    eps, alpha = (0.03, 0.01) if v == 0 else (0.05, 0.02)
    eps_t = torch.full((N,), eps, dtype=dtype) if per_sample else None
    lo, hi = (0.0, 1.0) if v == 0 else (0.1, 0.9)
    return [x_adv, grad, x_nat, eps_t, eps, None, alpha, l2, lo, hi]


def _running_t(a, g, stride2=False):
    """multi_bn's arguments `a` with running statistics that are not contiguous: a [K, C] view
    of a [C, K] tensor transposed, or every second column of a [K, 2C] tensor."""
    K, C = a[5].shape
    for i, shift in ((5, 0.0), (6, 0.5)):
        if stride2:
            a[i] = (torch.rand(K, 2 * C, generator=g) + shift)[:, ::2]
        else:
            a[i] = (torch.rand(C, K, generator=g) + shift).t()
    return a


def _pgd_layouts(g, v, grad_cl=False, nat_slice=False, adv_view=False, **kw):
    """_pgd's arguments with a grad in channels_last while x_adv is contiguous, an x_nat that
    is a slice of a wider tensor, or an x_adv that is a strided view (every second column of
    a wider tensor, in place)."""
    a = _pgd(g, v, **kw)
    if grad_cl:
        a[1] = a[1].contiguous(memory_format=torch.channels_last)
    if nat_slice:
        wide = torch.rand(*a[2].shape[:-1], a[2].shape[-1] + 3, generator=g).to(a[2].dtype)
        wide[..., 1:-2] = a[2]
        a[2] = wide[..., 1:-2]
    if adv_view:
        wide = torch.randn(*a[0].shape[:-1], 2 * a[0].shape[-1], generator=g).to(a[0].dtype)
        wide[..., ::2] = a[0]
        a[0] = wide[..., ::2]
    return a


def _mifgsm(g, v, **kw):
    a = _pgd(g, v, **kw)
    return [a[0], a[1], torch.randn(a[0].shape, generator=g).to(a[0].dtype), *a[2:7],
            0.9 if v == 0 else 1.0, a[8], a[9]]


def _init(g, v, l2=False, N=4, dtype=torch.float32):
    x_nat = torch.rand(N, 3, 5, 5, generator=g).to(dtype)
    noise = torch.rand(N, 3, 5, 5, generator=g).to(dtype) * 2 - 1
    radius = torch.rand(N, generator=g).to(dtype) if l2 else None
    return [noise, x_nat, None, 0.03 if v == 0 else 0.05, radius, l2, 0.0, 1.0]


def _sync(g, v, stage, world=2, rank=1, cumulative=False, **kw):
    """The arguments of one half of the synchronized BN (`stage`), on the earlier halves'
    outputs (this rank's payload standing for the all-reduced one)."""
    a = _bn(g, v, cumulative=cumulative, **kw)
    x, branch, mix, w, b, rm, rv, nbt, s, gm, be = a[:11]
    K, momentum, eps, relu = a[11], a[13], a[15], a[16]
    stats = [x, branch, mix, s, nbt, K, cumulative, rank, world]
    if stage == "stats":
        return stats
    pay, planes, old = IMPLS["sync_bn_stats"](*stats)
    apply = [x, branch, mix, w, b, rm, rv, nbt, s, gm, be, pay, old, K,
             0.0 if cumulative else momentum, cumulative, eps, relu]
    if stage == "apply":
        return apply
    _, mean, invstd = IMPLS["sync_bn_apply"](*_clone(apply))
    dy = torch.randn(x.shape, generator=g).to(x.dtype).contiguous(
        memory_format=torch.channels_last if kw.get("cl") else torch.contiguous_format)
    needs = [True, mix is not None, w is not None, b is not None, s is not None,
             gm is not None, be is not None]
    sums_args = [dy, x, branch, mix, w, b, mean, invstd, s, gm, be, K, relu, needs]
    if stage == "grad_sums":
        return sums_args
    sums, parts, _, _ = IMPLS["sync_bn_grad_sums"](*sums_args)
    return [dy, x, branch, mix, w, b, mean, invstd, planes, s, gm, be, sums, parts, pay, K,
            relu, needs]


CASES = {}
_EXTRAS = dict(mixed=True, extras=("scale", "gamma", "beta"), relu=True)
for stage in ("stats", "apply", "grad_sums", "dx"):
    op = f"sync_bn_{stage}"
    CASES.update({
        f"{op}_routed": (op, lambda g, v, st=stage: _sync(g, v, st)),
        f"{op}_mixed_extras_relu": (op, lambda g, v, st=stage: _sync(g, v, st, **_EXTRAS)),
        f"{op}_split_planes_cl_K5": (op, lambda g, v, st=stage: _sync(
            g, v, st, N=2, C=3, H=24, K=5, cl=True)),
        f"{op}_fp64_cumulative_one_rank": (op, lambda g, v, st=stage: _sync(
            g, v, st, dtype=torch.float64, cumulative=True, world=1, rank=0)),
    })
CASES["sync_bn_stats_one_value_planes"] = ("sync_bn_stats", lambda g, v: _sync(
    g, v, "stats", H=1))
for K in (1, 2, 5):
    CASES[f"routed_K{K}"] = ("multi_bn", lambda g, v, K=K: _bn(g, v, K=K))
for name, dt in DTYPES.items():
    CASES[f"routed_{name}"] = ("multi_bn", lambda g, v, dt=dt: _bn(g, v, dtype=dt))
    CASES[f"mixed_extras_relu_{name}"] = ("multi_bn", lambda g, v, dt=dt: _bn(
        g, v, mixed=True, extras=("scale", "gamma", "beta"), relu=True, dtype=dt))
    CASES[f"backward_routed_{name}"] = ("multi_bn_backward",
                                        lambda g, v, dt=dt: _bwd(g, v, dtype=dt))
    CASES[f"pgd_linf_{name}"] = ("pgd_step", lambda g, v, dt=dt: _pgd(g, v, dtype=dt))
for extra in ("scale", "gamma", "beta"):
    CASES[f"routed_{extra}"] = ("multi_bn", lambda g, v, e=extra: _bn(g, v, extras=(e,)))
CASES.update({
    "routed_eval_extras_relu": ("multi_bn", lambda g, v: _bn(
        g, v, training=False, extras=("scale", "gamma", "beta"), relu=True)),
    "mixed_eval": ("multi_bn", lambda g, v: _bn(g, v, mixed=True, training=False)),
    "routed_cl_K5": ("multi_bn", lambda g, v: _bn(g, v, K=5, cl=True)),
    "mixed_cl": ("multi_bn", lambda g, v: _bn(g, v, mixed=True, cl=True)),
    "routed_no_running_no_affine": ("multi_bn", lambda g, v: _bn(g, v, running=False,
                                                               affine=False)),
    "routed_cumulative": ("multi_bn", lambda g, v: _bn(g, v, cumulative=True)),
    "one_value_planes": ("multi_bn", lambda g, v: _bn(g, v, H=1)),
    "routed_split_planes": ("multi_bn", lambda g, v: _bn(g, v, N=2, C=3, H=24)),
    "empty_batch": ("multi_bn", lambda g, v: _bn(g, v, N=0)),
    "backward_mixed_extras_relu": ("multi_bn_backward", lambda g, v: _bwd(
        g, v, mixed=True, extras=("scale", "gamma", "beta"), relu=True)),
    "backward_eval_K5_cl": ("multi_bn_backward", lambda g, v: _bwd(
        g, v, K=5, cl=True, training=False, batch_stats=False)),
    "backward_split_planes": ("multi_bn_backward", lambda g, v: _bwd(g, v, N=2, C=3, H=24)),
    "backward_dx_only": ("multi_bn_backward", lambda g, v: _bwd(
        g, v, needs=[True, False, False, False, False, False, False])),
    "backward_empty_batch": ("multi_bn_backward", lambda g, v: _bwd(g, v, N=0)),
    "film_NxC": ("film", lambda g, v: [torch.randn(4, 3, 5, 5, generator=g),
                                       torch.randn(4, 3, generator=g),
                                       torch.randn(4, 3, generator=g)]),
    "film_C_no_beta": ("film", lambda g, v: [torch.randn(4, 3, 5, 5, generator=g),
                                             torch.randn(3, generator=g), None]),
    "film_backward_C": ("film_backward", lambda g, v: [
        torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g),
        torch.randn(3, generator=g), [True, True, True], [True, True]]),
    "film_backward_NxC_split": ("film_backward", lambda g, v: [
        torch.randn(2, 3, 24, 24, generator=g), torch.randn(2, 3, 24, 24, generator=g),
        torch.randn(2, 3, generator=g), [True, True, True], [False, False]]),
    "film_backward_dx_only": ("film_backward", lambda g, v: [
        torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g),
        torch.randn(4, 3, generator=g), [True, False, False], [False, False]]),
    "add_relu": ("add_relu", lambda g, v: [torch.randn(4, 8, 3, 3, generator=g),
                                           torch.randn(4, 8, 3, 3, generator=g)]),
    "pgd_linf_per_sample": ("pgd_step", lambda g, v: _pgd(g, v, per_sample=True)),
    "pgd_l2": ("pgd_step", lambda g, v: _pgd(g, v, N=8, l2=True)),
    "pgd_l2_split": ("pgd_step", lambda g, v: _pgd(g, v, N=2, l2=True, per_sample=True)),
    "pgd_l2_fp64": ("pgd_step", lambda g, v: _pgd(g, v, N=2, l2=True, dtype=torch.float64)),
    "pgd_init_linf": ("pgd_init", lambda g, v: _init(g, v)),
    "pgd_init_l2_fp64": ("pgd_init", lambda g, v: _init(g, v, l2=True, dtype=torch.float64)),
    "mifgsm": ("mifgsm_step", lambda g, v: _mifgsm(g, v, N=8)),
    "running_transposed": ("multi_bn", lambda g, v: _running_t(_bn(g, v, K=3), g)),
    "running_stride2_mixed": ("multi_bn", lambda g, v: _running_t(
        _bn(g, v, K=2, mixed=True), g, stride2=True)),
    "running_transposed_eval": ("multi_bn", lambda g, v: _running_t(
        _bn(g, v, K=3, training=False), g)),
    "running_expanded_eval": ("multi_bn", lambda g, v: _running_expanded(_bn(
        g, v, training=False), g)),
    "pgd_grad_cl": ("pgd_step", lambda g, v: _pgd_layouts(g, v, grad_cl=True)),
    "pgd_x_nat_slice": ("pgd_step", lambda g, v: _pgd_layouts(g, v, nat_slice=True)),
    "pgd_x_adv_view": ("pgd_step", lambda g, v: _pgd_layouts(g, v, adv_view=True)),
    "pgd_l2_split_layouts": ("pgd_step", lambda g, v: _pgd_layouts(
        g, v, N=2, l2=True, grad_cl=True, nat_slice=True, adv_view=True)),
    "pgd_l2_layouts": ("pgd_step", lambda g, v: _pgd_layouts(
        g, v, N=8, l2=True, grad_cl=True, adv_view=True)),
    "pgd_init_views": ("pgd_init", lambda g, v: _init_views(g, v)),
    "mifgsm_layouts": ("mifgsm_step", lambda g, v: _mifgsm_layouts(g, v, N=8)),
    "mifgsm_split_layouts": ("mifgsm_step", lambda g, v: _mifgsm_layouts(g, v, N=2)),
    "mifgsm_split_fp64": ("mifgsm_step", lambda g, v: _mifgsm(g, v, dtype=torch.float64)),
})


def _running_expanded(a, g):
    """Eval-mode running statistics that are one [C] row expanded over the K branches."""
    K, C = a[5].shape
    a[5] = torch.randn(C, generator=g).expand(K, C)
    a[6] = (torch.rand(C, generator=g) + 0.5).expand(K, C)
    return a


def _init_views(g, v):
    """The random start into a strided view of noise, x_nat in channels_last."""
    a = _init(g, v)
    wide = torch.zeros(*a[0].shape[:-1], 2 * a[0].shape[-1])
    wide[..., ::2] = a[0]
    a[0] = wide[..., ::2]
    a[1] = a[1].contiguous(memory_format=torch.channels_last)
    return a


def _mifgsm_layouts(g, v, N):
    """MI-FGSM with x_adv a strided view, grad in channels_last and a transposed momentum."""
    a = _mifgsm(g, v, N=N)
    lay = _pgd_layouts(g, v, N=N, grad_cl=True, nat_slice=True, adv_view=True)
    buf = torch.randn(N, 3, 6, 6, generator=g).transpose(2, 3)
    return [lay[0], lay[1], buf, lay[2], *a[4:]]


def _clone(args):
    """Copies with the same storage size, offset and strides (a view's whole storage)."""
    return [torch.empty(0, dtype=a.dtype).set_(a.untyped_storage().clone(), a.storage_offset(),
                                               a.shape, a.stride())
            if isinstance(a, torch.Tensor) else a for a in args]


def _storages(args):
    """The whole memory of every tensor argument (what a view's neighbours hold too)."""
    return [torch.empty(0, dtype=a.dtype).set_(a.untyped_storage())
            for a in args if isinstance(a, torch.Tensor)]


def _results(out, args):
    """What a call left: its results and every input (the in-place ops' results)."""
    outs = list(out) if isinstance(out, (tuple, list)) else [] if out is None else [out]
    return [t for t in outs + list(args) if isinstance(t, torch.Tensor)]


def _bf16_in_interpreter(case, exc):
    if "bf16" in case and isinstance(exc, (TypeError, ValueError, NotImplementedError)):
        pytest.skip(f"bf16 arithmetic under the Triton interpreter: {exc}")


@pytest.mark.parametrize("case", list(CASES))
def test_cpp_replay_equals_the_launcher(case, monkeypatch):
    monkeypatch.setattr(_common, "MIN_PROGRAMS", 4)  # the split reductions at test sizes
    monkeypatch.setattr(pgd_kernels, "MIN_PROGRAMS", 4)
    op, make = CASES[case]
    name = f"fastrobust::{op}"
    hook = _plan.InterpreterLaunch()
    a = make(torch.Generator().manual_seed(1), 0)
    b = make(torch.Generator().manual_seed(2), 1)  # other values and floats, the same signature
    assert _C._plan_signature(name, *a) == _C._plan_signature(name, *b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plan that is not replayable warns: fail on it
        try:
            _C._plan_call(name, hook, *_clone(a))  # records (or replays an earlier plan)
        except Exception as e:  # noqa: BLE001
            _bf16_in_interpreter(case, e)
            raise
        b_direct, b_cpp = _clone(b), _clone(b)
        want = _results(IMPLS[op](*b_direct), b_direct)
        hook.launches.clear()
        before = _C._plan_stats()["replayed_calls"]
        got = _results(_C._plan_call(name, hook, *b_cpp), b_cpp)
    assert _C._plan_stats()["replayed_calls"] == before + 1
    assert hook.launches or not any(t.numel() for t in want)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.stride() == w.stride() and g.dtype == w.dtype, i
        assert torch.equal(g, w) or (g.isnan() == w.isnan()).all() and torch.equal(
            g.nan_to_num(), w.nan_to_num()), f"result {i} differs"
    for i, (g, w) in enumerate(zip(_storages(b_cpp), _storages(b_direct))):
        assert torch.equal(g.nan_to_num(), w.nan_to_num()), f"memory of argument {i} differs"


def test_the_replay_launches_what_the_launcher_launched(monkeypatch):
    """Kernels, grids, warps and shared memory of the replay are the recorded ones, in order
    (the routed BN forward: the moments, statistics and apply kernels)."""
    monkeypatch.setattr(_common, "MIN_PROGRAMS", 4)
    a = _bn(torch.Generator().manual_seed(3), 0, N=4, C=3, H=24, K=2)
    _, plan = _plan.record_call(IMPLS["multi_bn"], _clone(a))
    hook = _plan.InterpreterLaunch()
    _C._plan_call("fastrobust::multi_bn", hook, *_clone(a))
    hook.launches.clear()
    _C._plan_call("fastrobust::multi_bn", hook, *_clone(a))
    assert [(n, g) for n, g, _, _ in hook.launches] == [
        (_plan._name(L.kernel), L.grid) for L in plan.launches]
    assert [n for n, *_ in hook.launches] == ["_moments_kernel", "_bn_stats_kernel",
                                              "_affine_kernel"]
    assert all(block == 128 and shared == 0 for _, _, block, shared in hook.launches)


def test_a_layout_the_target_disagrees_with_is_refused_once():
    """A kernel that takes other parameter sizes than the plan recorded (as the driver's
    cuFuncGetParamInfo reports them on a GPU) makes the plan not replayable: warned once, the
    launcher serves every call, and `_plan_refusals` lists the reason."""
    class OneScratchTooMany(_plan.InterpreterLaunch):
        def param_sizes(self, handle):
            return super().param_sizes(handle) + [8]

    args = [torch.randn(3, 7, 2, 2), torch.randn(3, 7, 2, 2)]
    hook = OneScratchTooMany()
    with pytest.warns(UserWarning, match="the kernel takes .* parameters for"):
        out1 = _C._plan_call("fastrobust::add_relu", hook, *args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = _C._plan_call("fastrobust::add_relu", hook, *args)
    assert not hook.launches
    assert torch.equal(out1[0], torch.relu(args[0] + args[1])) and torch.equal(out1[0], out2[0])
    assert any("the kernel takes" in r for r in _C._plan_refusals())


def test_a_scratch_parameter_reaches_the_kernel_null():
    hook = _plan.InterpreterLaunch(scratch=2)
    args = [torch.randn(2, 9), torch.randn(2, 9)]
    for _ in range(2):
        out = _C._plan_call("fastrobust::add_relu", hook, *args)
    assert hook.launches and torch.equal(out[0], torch.relu(args[0] + args[1]))


def _unmergeable(seed):
    """pgd_step on 6-D tensors whose sample dims merge into no three strided dims: x_adv
    contiguous, grad with the sample dims in the reverse order (the one layout the PGD
    launcher copies)."""
    g = torch.Generator().manual_seed(seed)
    a = _pgd(g, 0, N=3, shape=(2, 3, 2, 3, 2))
    a[1] = torch.randn(3, 2, 3, 2, 3, 2, generator=g).permute(0, 5, 4, 3, 2, 1)
    assert a[1].shape == a[0].shape
    return a


def test_a_launcher_that_copies_data_is_warned_once_and_still_right():
    """A PGD layout with more than three unmergeable sample dims is stepped on contiguous
    copies: no replay; said once with the reason, and every call is right."""
    hook = _plan.InterpreterLaunch()
    with pytest.warns(UserWarning, match="merge into no three strided dims"):
        _C._plan_call("fastrobust::pgd_step", hook, *_unmergeable(4))
    b_direct, b_cpp = _unmergeable(5), _unmergeable(5)
    IMPLS["pgd_step"](*b_direct)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _C._plan_call("fastrobust::pgd_step", hook, *b_cpp)
    assert not hook.launches
    assert all(torch.equal(g, w) for g, w in zip(_results(None, b_cpp), _results(None, b_direct)))
    assert any("merge into no three" in r for r in _C._plan_refusals())


@pytest.mark.parametrize("case", ["pgd_grad_cl", "pgd_x_nat_slice", "pgd_x_adv_view",
                                  "pgd_l2_split_layouts", "pgd_l2_layouts", "pgd_init_views",
                                  "mifgsm_layouts", "mifgsm_split_layouts"])
def test_pgd_layouts_step_as_contiguous_copies_do(case, monkeypatch):
    """The strided launches equal the same step on contiguous copies, bitwise (each sample is
    walked in x_adv's logical order either way), and write nothing but the view."""
    monkeypatch.setattr(pgd_kernels, "MIN_PROGRAMS", 4)
    op, make = CASES[case]
    args = make(torch.Generator().manual_seed(8), 0)
    flat = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args)
    outside = [(a._base, a) for a in args if isinstance(a, torch.Tensor) and a._base is not None]
    kept = [(base.clone(), view) for base, view in outside]
    IMPLS[op](*args)
    IMPLS[op](*flat)
    for a, f in zip(args, flat):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, f)
    for (base_before, view), (base, _) in zip(kept, outside):
        written = torch.zeros(base.shape, dtype=torch.bool)
        written.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
        assert torch.equal(base[~written], base_before[~written])


def test_written_tensors_that_overlap_themselves_are_refused():
    """x_adv, a momentum or (training) running statistics whose elements share memory cannot
    be written elementwise: one error naming the argument, nothing written."""
    hook = _plan.InterpreterLaunch()
    a = _pgd(torch.Generator().manual_seed(7), 0)
    a[0] = torch.rand(1, 3, 6, 6).expand(5, 3, 6, 6)
    before = a[0].clone()
    with pytest.raises(ValueError, match="x_adv has elements that share memory"):
        _C._plan_call("fastrobust::pgd_step", hook, *a)
    assert torch.equal(a[0], before)
    m = _mifgsm(torch.Generator().manual_seed(7), 0)
    m[2] = torch.zeros(3, 6, 6).expand(5, 3, 6, 6)
    with pytest.raises(ValueError, match="momentum has elements that share memory"):
        _C._plan_call("fastrobust::mifgsm_step", hook, *m)
    b = _running_expanded(_bn(torch.Generator().manual_seed(7), 0), torch.Generator())
    rm = b[5].clone()
    with pytest.raises(ValueError, match="running_mean has elements that share memory"):
        _C._plan_call("fastrobust::multi_bn", hook, *b)
    assert torch.equal(b[5], rm) and not hook.launches


def test_floats_are_replay_arguments_not_signature():
    a = _pgd(torch.Generator().manual_seed(6), 0)
    b = _pgd(torch.Generator().manual_seed(6), 1)
    assert _C._plan_signature("fastrobust::pgd_step", *a) == _C._plan_signature(
        "fastrobust::pgd_step", *b)
    _, plan = _plan.record_call(IMPLS["pgd_step"], _clone(a))
    assert not plan.pinned
    slots = [s for L in plan.launches for _, s, c in L.params if not c]
    assert {(s.index, s.offset) for s in slots if s.kind == _plan.ARG} == {
        (i, p) for i in (4, 6, 8, 9) for p in range(3)}  # eps, alpha, clip_min, clip_max
    assert not [s for s in slots if s.kind == _plan.FLOAT]


def test_a_launcher_that_decides_on_a_float_pins_the_plan():
    """Arithmetic or a comparison on a float argument in the launcher: the plan holds for
    that value only (the C++ table keeps one per value, up to a bound)."""
    def deciding(x, eps):
        out = torch.empty_like(x)
        if eps > 0.5:
            pass
        return out
    _, plan = _plan.record_call(deciding, [torch.randn(3), 0.1])
    assert plan.pinned
    _, plan = _plan.record_call(lambda x, eps: torch.empty_like(x), [torch.randn(3), 0.1])
    assert not plan.pinned


@pytest.mark.parametrize("v", [0.1, 1e-5, 1 / 3, 8 / 255, 0.0, -2.5, 1e300, float("inf")])
def test_fp32_parts_sum_to_the_double(v):
    parts = _plan.fp32_parts(v)
    assert all(p == _plan._f32(p) for p in parts)  # each one an fp32 value
    assert parts[0] + parts[1] + parts[2] == v or (v > 3.5e38 and parts[0] == float("inf"))


def test_a_first_call_inside_a_graph_capture_is_refused_clearly():
    """Recording a plan inside a CUDA graph capture would compile and load kernels mid-capture:
    refused with what to do, nothing recorded; a recorded signature replays inside one."""
    hook = _plan.InterpreterLaunch()
    args = [torch.randn(5, 11, 3), torch.randn(5, 11, 3)]
    hook.capturing = True
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture.*warm-up"):
        _C._plan_call("fastrobust::add_relu", hook, *args)
    hook.capturing = False
    _C._plan_call("fastrobust::add_relu", hook, *args)  # recorded outside the capture
    hook.capturing = True
    out = _C._plan_call("fastrobust::add_relu", hook, *args)
    assert hook.launches and torch.equal(out[0], torch.relu(args[0] + args[1]))
