"""multi_batch_norm: every backend against the reference on awkward cases, the reference against
per-branch F.batch_norm, the identity property, gradcheck, opcheck, compile and errors."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings, strategies as st

from fastrobust import backends, functional as F, reference
from conftest import cpu_backends, opcheck_utils

# fp32: reductions over up to ~10^3 values in a different order than the reference
# (≈ sqrt(n)·2^-24 relative); fp64 the same at 2^-53.
TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    K: int
    branch: tuple | None = None  # explicit routing; random when None
    layout: str = "contiguous"  # contiguous | channels_last | batch_slice | channel_slice
    affine: bool = True

    def __str__(self):
        return self.name


CASES = [
    Case("N1_C3_7x5_K1", (1, 3, 7, 5), 1),
    Case("N8_C3_7x5_K3", (8, 3, 7, 5), 3),
    Case("spatial1d_K2", (6, 4, 9), 2),
    Case("spatial3d_K4", (5, 2, 3, 4, 2), 4),
    Case("no_spatial_K2", (7, 5), 2, branch=(0, 1, 1, 0, 1, 0, 0)),
    Case("K8_empty_branches", (10, 3, 4, 4), 8, branch=(0, 3, 7, 7, 0, 3, 3, 0, 7, 0)),
    Case("single_value_branch", (5, 3), 3, branch=(0, 0, 1, 2, 2)),
    Case("single_value_branch_1x1", (5, 3, 1, 1), 3, branch=(2, 0, 1, 2, 0)),
    Case("channels_last_K5", (9, 6, 5, 3), 5, layout="channels_last"),
    Case("batch_slice_K2", (6, 3, 5, 5), 2, layout="batch_slice"),
    Case("channels_last_batch_slice_K3", (6, 4, 3, 5), 3, layout="channels_last_batch_slice"),
    Case("channel_slice_K3", (6, 3, 4, 3), 3, layout="channel_slice"),
    Case("no_affine_K2", (6, 4, 3, 3), 2, affine=False),
    Case("C1_K2", (6, 1, 8, 8), 2),
]

# 4x4 planes, 13 channels: the CPU kernels' fp32 loops for planes of 8..64 values take 8 planes
# a step (here one step, then 5 planes of the general loop). Those loops are the CPU backend's
# own, in fp32 only: the tests of this case (test_small_planes_*) run it there.
SMALL_PLANES = Case("C13_4x4_K2", (6, 13, 4, 4), 2)


def make_inputs(case: Case, dtype=torch.float32, requires_grad=True):
    N, C = case.shape[:2]
    # A non-zero mean exercises the variance's numerics.
    if case.layout == "batch_slice":  # every other sample of a bigger batch: planes stay dense
        x = (torch.randn((2 * N,) + case.shape[1:], dtype=dtype) * 3 + 2)[::2]
    elif case.layout == "channels_last_batch_slice":
        x = (torch.randn((2 * N,) + case.shape[1:], dtype=dtype) * 3 + 2)
        x = x.contiguous(memory_format=torch.channels_last)[::2]
    elif case.layout == "channel_slice":  # every other channel: not dense, no layout serves it
        x = (torch.randn((N, 2 * C) + case.shape[2:], dtype=dtype) * 3 + 2)[:, ::2]
    else:
        x = torch.randn(case.shape, dtype=dtype) * 3 + 2
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert (case.layout in ("contiguous", "channels_last")) == x.is_contiguous(
        memory_format=torch.channels_last if case.layout == "channels_last"
        else torch.contiguous_format)
    x.requires_grad_(requires_grad)
    if case.branch is not None:
        branch = torch.tensor(case.branch, dtype=torch.long)
    else:
        branch = torch.randint(0, case.K, (N,))
    w = b = None
    if case.affine:
        w = (torch.rand(case.K, C, dtype=dtype) + 0.5).requires_grad_(requires_grad)
        b = torch.randn(case.K, C, dtype=dtype).requires_grad_(requires_grad)
    rm = torch.randn(case.K, C, dtype=dtype)
    rv = torch.rand(case.K, C, dtype=dtype) + 0.5
    nbt = torch.randint(0, 5, (case.K,))
    return x, branch, w, b, rm, rv, nbt


def _grads(y, inputs, gy):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(y, wanted, gy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "cumulative"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, case, momentum, training, dtype):
    x, branch, w, b, rm, rv, nbt = make_inputs(case, dtype)
    gy = torch.randn(x.shape, dtype=dtype)
    stats = (rm.clone(), rv.clone(), nbt.clone())
    y = F.multi_batch_norm(x, branch, w, b, stats[0], stats[1], training=training,
                           momentum=momentum, num_batches_tracked=stats[2], num_branches=case.K)
    ref_stats = (rm.clone(), rv.clone(), nbt.clone())
    y_ref = reference.multi_batch_norm(x, branch, w, b, ref_stats[0], ref_stats[1],
                                       training=training, momentum=momentum,
                                       num_batches_tracked=ref_stats[2], num_branches=case.K)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert y.shape == x.shape and y.dtype == x.dtype
    for g, g_ref in zip(_grads(y, (x, w, b), gy), _grads(y_ref, (x, w, b), gy)):
        torch.testing.assert_close(g, g_ref, **TOL[dtype])
    for s, s_ref in zip(stats, ref_stats):
        torch.testing.assert_close(s, s_ref, **TOL[dtype]) if s.is_floating_point() \
            else torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    if not training:  # eval never touches the running stats
        torch.testing.assert_close(stats[0], rm, rtol=0, atol=0)
        assert torch.equal(stats[2], nbt)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "cumulative"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_small_planes_match_reference(momentum, training):
    with backends.use("cpu"):
        test_matches_reference("cpu", SMALL_PLANES, momentum, training, torch.float32)


@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "expanded",
                                         "batch_slice"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_gradient_in_another_layout(backend, x_layout, grad_layout):
    """Autograd may hand the backward a dy whose layout differs from x's (e.g. the stride-0
    gradient of y.sum())."""
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    x = (torch.randn(6, 4, 5, 3) * 2 + 1).contiguous(memory_format=fmt[x_layout])
    x.requires_grad_()
    branch = torch.tensor([0, 1, 2, 0, 1, 1])
    w = torch.rand(3, 4).add_(0.5).requires_grad_()
    if grad_layout == "expanded":
        gy = torch.tensor(0.7).expand(x.shape)
    elif grad_layout == "batch_slice":
        gy = torch.randn(12, 4, 5, 3)[::2]
    else:
        gy = torch.randn(x.shape).contiguous(memory_format=fmt[grad_layout])
    y = F.multi_batch_norm(x, branch, w, training=True)
    y_ref = reference.multi_batch_norm(x, branch, w, training=True)
    for g, g_ref in zip(_grads(y, (x, w), gy), _grads(y_ref, (x, w), gy)):
        torch.testing.assert_close(g, g_ref, **TOL[torch.float32])


@pytest.mark.parametrize("K", range(1, 9))
def test_every_branch_count(backend, K):
    x = torch.randn(16, 3, 4, 3, requires_grad=True)
    branch = torch.arange(16) % K
    w, b = torch.rand(K, 3).requires_grad_(), torch.randn(K, 3).requires_grad_()
    rm, rv, rm2, rv2 = torch.zeros(K, 3), torch.ones(K, 3), torch.zeros(K, 3), torch.ones(K, 3)
    y = F.multi_batch_norm(x, branch, w, b, rm, rv, training=True)
    y_ref = reference.multi_batch_norm(x, branch, w, b, rm2, rv2, training=True)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(rv, rv2, **TOL[torch.float32])
    gy = torch.randn_like(x)
    for g, g_ref in zip(_grads(y, (x, w, b), gy), _grads(y_ref, (x, w, b), gy)):
        torch.testing.assert_close(g, g_ref, **TOL[torch.float32])


def _naive_multi_bn(x, branch, w, b, rm, rv, K, momentum, eps=1e-5):
    """What users write today: mask each branch out, F.batch_norm it, scatter back."""
    y = torch.empty_like(x)
    for k in range(K):
        idx = (branch == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        y[idx] = TF.batch_norm(x[idx], rm[k], rv[k], w[k], b[k], training=True,
                               momentum=momentum, eps=eps)
    return y


@pytest.mark.parametrize("case", [c for c in CASES if "single" not in c.name and c.affine
                                  and c.shape[0] > 1], ids=str)
def test_reference_matches_per_branch_batch_norm(case):
    """The reference itself against an independent formulation (fp64)."""
    x, branch, w, b, rm, rv, _ = make_inputs(case, torch.float64)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y = reference.multi_batch_norm(x, branch, w, b, rm1, rv1, training=True, momentum=0.3)
    y_naive = _naive_multi_bn(x, branch, w, b, rm2, rv2, case.K, momentum=0.3)
    torch.testing.assert_close(y, y_naive, **TOL[torch.float64])
    torch.testing.assert_close(rm1, rm2, **TOL[torch.float64])
    torch.testing.assert_close(rv1, rv2, **TOL[torch.float64])
    gy = torch.randn_like(x)
    for g, g_naive in zip(_grads(y, (x, w, b), gy), _grads(y_naive, (x, w, b), gy)):
        torch.testing.assert_close(g, g_naive, **TOL[torch.float64])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "cumulative"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_identity_with_batch_norm(backend, momentum, memory_format):
    """K=1 with every sample on branch 0 is nn.BatchNorm2d: forward, backward and running stats
    over several steps, then eval."""
    C = 4
    bn = torch.nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    w = bn.weight.detach()[None].clone().requires_grad_()
    b = bn.bias.detach()[None].clone().requires_grad_()
    rm, rv = bn.running_mean[None].clone(), bn.running_var[None].clone()
    nbt = torch.zeros(1, dtype=torch.long)
    for step in range(3):
        x = (torch.randn(6, C, 5, 7) * 2 + 1).contiguous(memory_format=memory_format)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        branch = torch.zeros(6, dtype=torch.long)
        y = F.multi_batch_norm(x1, branch, w, b, rm, rv, training=True, momentum=momentum,
                               num_batches_tracked=nbt)
        y_bn = bn(x2)
        torch.testing.assert_close(y, y_bn, **TOL[torch.float32])
        gy = torch.randn_like(y)
        y.backward(gy)
        y_bn.backward(gy)
        torch.testing.assert_close(x1.grad, x2.grad, **TOL[torch.float32])
        torch.testing.assert_close(w.grad[0], bn.weight.grad, **TOL[torch.float32])
        torch.testing.assert_close(b.grad[0], bn.bias.grad, **TOL[torch.float32])
        w.grad = b.grad = bn.weight.grad = bn.bias.grad = None
        torch.testing.assert_close(rm[0], bn.running_mean, **TOL[torch.float32])
        torch.testing.assert_close(rv[0], bn.running_var, **TOL[torch.float32])
        assert nbt.item() == bn.num_batches_tracked.item() == step + 1
    bn.eval()
    x = torch.randn(3, C, 5, 7)
    y = F.multi_batch_norm(x, torch.zeros(3, dtype=torch.long), w, b, rm, rv, training=False)
    torch.testing.assert_close(y, bn(x), **TOL[torch.float32])


def test_single_value_and_empty_branches(backend):
    """A branch with one value normalizes to its bias and keeps its running stats and counter;
    an empty branch gets zero parameter gradients; a branch with 2+ values is updated."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)  # S = 1
    branch = torch.tensor([0, 0, 1, 0])  # branch 1: one value per channel; branch 2: empty
    w = torch.rand(3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, 3, dtype=torch.float64), torch.rand(3, 3, dtype=torch.float64) + 1
    rm0, rv0 = rm.clone(), rv.clone()
    nbt = torch.zeros(3, dtype=torch.long)
    y = F.multi_batch_norm(x, branch, w, b, rm, rv, training=True, num_batches_tracked=nbt)
    torch.testing.assert_close(y[2], b[1].detach(), rtol=0, atol=1e-12)
    assert torch.isfinite(y).all()
    assert torch.equal(rm[1:], rm0[1:]) and torch.equal(rv[1:], rv0[1:])
    assert not torch.equal(rm[0], rm0[0])
    assert nbt.tolist() == [1, 0, 0]
    y.backward(torch.randn_like(y))
    assert torch.equal(w.grad[2], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(b.grad[2], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(x.grad[2], torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)


# Under the Triton interpreter a full fp64 Jacobian costs 1-1.5 min per case; there gradcheck
# compares one random projection of it (fast_mode), which a wrong entry fails almost surely. The
# eager and C++ backends, the same math, check the full Jacobian.
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_fp64(backend, training):
    x = torch.randn(5, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    branch = torch.tensor([0, 1, 1, 0, 1])
    w = torch.rand(2, 2, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, 2, dtype=torch.float64), torch.rand(2, 2, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        # Running stats only in eval, where they are read, never written.
        return F.multi_batch_norm(x, branch, w, b, None if training else rm,
                                  None if training else rv, training=training)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6,
                                    fast_mode=backend == "triton")


def test_opcheck(backend):
    from torch.library import opcheck

    from fastrobust.ops import needs as needs_of

    for case in (CASES[1], CASES[8], CASES[5]):
        x, branch, w, b, rm, rv, nbt = make_inputs(case)
        N, C = x.shape[:2]
        for extras, relu in (((None, None, None), False),
                             ((torch.rand(N, C) + 0.5, torch.randn(N, C), torch.randn(N, C)),
                              True)):
            for training in (True, False):
                args = (x, branch, None, w, b, rm.clone(), rv.clone(), nbt.clone(), *extras,
                        case.K, training, 0.1, False, 1e-5, relu)
                opcheck(torch.ops.fastrobust.multi_bn.default, args,
                        test_utils=opcheck_utils(backend))
            _, mean, invstd, planes = torch.ops.fastrobust.multi_bn(
                x.detach(), branch, None, w, b, rm.clone(), rv.clone(), nbt.clone(), *extras,
                case.K, True, 0.1, False, 1e-5, relu)
            has = extras[0] is not None
            needs = needs_of(x=True, weight=True, bias=True, input_scale=has, film_gamma=has)
            opcheck(torch.ops.fastrobust.multi_bn_backward.default,
                    (torch.randn_like(x), x.detach(), branch, None, w.detach(), b.detach(),
                     mean, invstd, planes, *extras, case.K, True, relu, needs),
                    test_utils=opcheck_utils(backend))


@pytest.mark.parametrize("size,sample", [(3, 1), (4, 1), (4, 0)],
                         ids=["3x3", "4x4", "4x4_first_sample"])
def test_nan_in_nan_out(backend, size, sample):
    """A NaN stays in its (branch, channel) group. At 4x4 the CPU kernels' statistics take
    each branch's first sample's plane means as centres: a NaN there (4x4_first_sample) must
    not spread either."""
    x = torch.randn(6, 2, size, size)
    x[sample, 0, 1, 1] = float("nan")
    branch = torch.tensor([0, 0, 1, 1, 0, 1])
    y = F.multi_batch_norm(x, branch, training=True, num_branches=2)
    assert torch.isnan(y[branch == 0][:, 0]).all()  # the NaN's (branch, channel) group
    assert torch.isfinite(y[branch == 1]).all() and torch.isfinite(y[:, 1]).all()
    clean = x.clone()
    clean[branch == 0, 0] = 0.0  # the NaN's group, out of the comparison
    torch.testing.assert_close(y[branch == 1],
                               F.multi_batch_norm(clean, branch, training=True,
                                                  num_branches=2)[branch == 1])


@pytest.mark.parametrize("bad", [-1, 3, 100])
def test_out_of_range_branch(backend, bad):
    x = torch.randn(4, 2, 3, 3)
    branch = torch.tensor([0, 1, bad, 2])
    with pytest.raises((ValueError, RuntimeError), match="out of range"):
        F.multi_batch_norm(x, branch, torch.ones(3, 2), torch.zeros(3, 2), training=True)


def test_argument_errors():
    x = torch.randn(4, 2, 3, 3)
    branch = torch.zeros(4, dtype=torch.long)
    w = torch.ones(2, 2)
    with pytest.raises(TypeError, match="integer"):
        F.multi_batch_norm(x, branch.float(), w, training=True)
    with pytest.raises(TypeError, match="floating point"):
        F.multi_batch_norm(x.long(), branch, w, training=True)
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        F.multi_batch_norm(x, branch[:3], w, training=True)
    with pytest.raises(ValueError, match=r"\[num_branches, C\]"):
        F.multi_batch_norm(x, branch, torch.ones(2, 3), training=True)
    with pytest.raises(ValueError, match=r"\[num_branches, C\]"):
        F.multi_batch_norm(x, branch, w, torch.zeros(3, 2), training=True)
    with pytest.raises(ValueError, match="on meta"):
        F.multi_batch_norm(x, branch, w.to("meta"), training=True)
    with pytest.raises(ValueError, match="on meta"):
        F.multi_batch_norm(x, branch.to("meta"), w, training=True)
    with pytest.raises(ValueError, match="num_branches"):
        F.multi_batch_norm(x, branch, training=True)
    with pytest.raises(ValueError, match=r"\[N, C, \*spatial\]"):
        F.multi_batch_norm(torch.randn(4), branch, w, training=True)
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        F.multi_batch_norm(x, branch, w, None, torch.zeros(2, 2), None, training=True)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        F.multi_batch_norm(x, branch, w, None, torch.zeros(2, 2), torch.ones(2, 2),
                           training=True, momentum=None)


def test_no_host_sync_in_eager_path():
    """The eager engine never reads a value on the host (the Triton path's launches are
    checked on meta tensors in test_gpu_path):
    it runs on meta tensors, which have no data (`.item()`, masks or nonzero would raise)."""
    from fastrobust.ops.batch_norm import eager

    def t(*shape, dtype=torch.float32):
        return torch.empty(shape, device="meta", dtype=dtype)

    x, s, planes = t(4, 2, 3, 3), t(4, 2), t(2, 4, 2)
    rm, rv, nbt = t(3, 2), t(3, 2), t(3, dtype=torch.long)
    every = (True,) * 7
    for branch, mix in ((t(4, dtype=torch.long), None), (None, t(4, 3))):
        y, mean, invstd, _ = eager.multi_bn(x, branch, mix, t(3, 2), t(3, 2), rm, rv, nbt, s,
                                            s, s, 3, True, 0.1, True, 1e-5, True)
        grads = eager.multi_bn_backward(x, x, branch, mix, t(3, 2), t(3, 2), mean, invstd,
                                        planes, s, s, s, 3, True, True, every)
        assert y.shape == x.shape and grads[0].shape == x.shape
        assert [tuple(g.shape) for g in grads[2:]] == [(3, 2), (3, 2), (4, 2), (4, 2), (4, 2)]
    assert grads[1].shape == (4, 3)


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 9), C=st.integers(1, 5), spatial=st.lists(st.integers(1, 4), max_size=3),
       K=st.integers(1, 6), channels_last=st.booleans(), data=st.data())
def test_random_shapes_match_reference(N, C, spatial, K, channels_last, data):
    """Property test over shapes, branch counts and routings (the default backend: the C++
    kernel where built), in fp64 so any difference is a bug, not rounding."""
    shape = (N, C, *spatial)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1)
    if channels_last and len(spatial) == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    branch = torch.tensor(data.draw(st.lists(st.integers(0, K - 1), min_size=N, max_size=N)))
    w = torch.rand(K, C, dtype=torch.float64).add_(0.5).requires_grad_()
    rm, rv = torch.zeros(K, C, dtype=torch.float64), torch.ones(K, C, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    y = F.multi_batch_norm(x, branch, w, None, rm, rv, training=True, momentum=0.3)
    y_ref = reference.multi_batch_norm(x, branch, w, None, rm2, rv2, training=True, momentum=0.3)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(rv, rv2, **TOL[torch.float64])
    gy = torch.randn_like(x)
    for g, g_ref in zip(_grads(y, (x, w), gy), _grads(y_ref, (x, w), gy)):
        torch.testing.assert_close(g, g_ref, **TOL[torch.float64])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
def test_one_autograd_node(backend, mixed, training):
    """Whatever kernel serves the call, its autograd is the one C++ node registered for the
    Autograd key; a training call bumps the running stats' version counters (an in-place
    update), an eval call does not; a gradient asked for alone equals the same gradient asked
    for with the others."""
    N, C, K = 6, 3, 3
    x = torch.randn(N, C, 4, 3, dtype=torch.float64, requires_grad=True)
    route = (torch.rand(N, K, dtype=torch.float64, requires_grad=True) if mixed
             else torch.tensor([0, 2, 2, 0, 2, 0]))
    w = torch.randn(K, C, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(K, C, dtype=torch.float64), torch.ones(K, C, dtype=torch.float64)
    version = rm._version
    fn = F.mixed_batch_norm if mixed else F.multi_batch_norm
    y = fn(x, route, w, None, rm, rv, training=training)
    assert "MultiBn" in y.grad_fn.name(), y.grad_fn.name()
    assert (rm._version > version) == training
    dy = torch.randn_like(y)
    both = torch.autograd.grad(y, (x, w), dy, retain_graph=True)
    alone, = torch.autograd.grad(y, x, dy)
    assert torch.equal(alone, both[0])


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (4, 0, 4, 4), (0, 3), (3, 2, 0, 5)], ids=str)
def test_empty_inputs_give_empty_results(backend, shape):
    """An empty batch (N = 0), no channels (C = 0) or an empty spatial size: every op returns
    empty results (zero parameter gradients) on every backend, as the CPU kernels and
    nn.BatchNorm2d's training forward on N·S > 1 do; 858ad8d's Triton launcher raised
    "cannot reshape tensor of 0 elements"."""
    from fastrobust.nn import MultiBatchNorm2d
    N, C = shape[:2]
    x = torch.randn(shape, requires_grad=True)
    w = torch.rand(2, C, requires_grad=True)
    b = torch.randn(2, C, requires_grad=True)
    mix = torch.rand(N, 2, requires_grad=True)
    branch = torch.zeros(N, dtype=torch.long)
    for y, wrt in ((F.multi_batch_norm(x, branch, w, b, num_branches=2, training=False),
                    (x, w)),
                   (F.mixed_batch_norm(x, mix, w, b, training=False), (x, w, mix)),
                   (F.film(x, torch.randn(C), torch.randn(N, C)), (x,))):
        assert y.shape == x.shape
        grads = torch.autograd.grad(y.sum(), wrt)
        assert [g.shape for g in grads] == [t.shape for t in wrt]
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])
    if len(shape) == 4 and C:
        m = MultiBatchNorm2d(C, 2).eval()
        y = m(x, branch=branch)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        assert torch.equal(m.weight.grad, torch.zeros_like(m.weight))


# Issue 37: the batch variance a training step writes to running_var when |mean| ≫ std, against
# an fp64 reference. Bound: 10× F.batch_norm's error on the same x (one branch), or 4 ulps of
# the dtype, running_var's own rounding being one. Before the exact merge (each plane's rounded
# mean taken as exact, Chan's cross term dropped) fp32 was 50-500× F.batch_norm's error.
VARIANCE_BACKENDS = ("cpu", "eager", "triton")


@pytest.mark.parametrize("backend", [p for p in cpu_backends() if p.id in VARIANCE_BACKENDS])
@pytest.mark.parametrize("shape", [(32, 4, 8, 8), (8, 3, 32, 32)], ids=["8x8", "32x32"])
@pytest.mark.parametrize("K", [1, 2], ids=["one_branch", "two_branches"])
@pytest.mark.parametrize("mode", ["routed", "mixed"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("ratio", [1e3, 1e4, 1e5], ids=["mean_std_1e3", "1e4", "1e5"])
def test_variance_exact_when_mean_dominates(backend, ratio, dtype, layout, mode, K, shape):
    import variance_error as ve
    x = ve.make_x(ratio, shape, dtype, layout)
    bound = max(10 * ve.relative_error(x, "F.batch_norm"), 4 * torch.finfo(dtype).eps)
    err = ve.relative_error(x, backend, mode, K)
    assert err <= bound, f"relative error {err:.2e} of running_var, bound {bound:.2e}"


@pytest.mark.parametrize("K", [1, 2], ids=["one_branch", "two_branches"])
@pytest.mark.parametrize("mode", ["routed", "mixed"])
@pytest.mark.parametrize("ratio", [1e3, 1e4, 1e5], ids=["mean_std_1e3", "1e4", "1e5"])
def test_variance_exact_small_planes(ratio, mode, K):
    """4x4 planes: the CPU kernels' fp32 loop for small planes (SMALL_PLANES)."""
    test_variance_exact_when_mean_dominates("cpu", ratio, torch.float32, "nchw", mode, K,
                                            (16, 12, 4, 4))


@pytest.mark.parametrize("shape", [(16, 7, 16, 16), (16, 9, 12, 12)], ids=["16x16", "12x12"])
@pytest.mark.parametrize("mode", ["routed", "mixed"])
@pytest.mark.parametrize("ratio", [1e3, 1e5], ids=["mean_std_1e3", "1e5"])
def test_variance_exact_planes_of_128_values_and_more(ratio, mode, shape):
    """fp32 planes of 8·M values, M >= 16: the CPU kernels take 4 planes a step (cpu_leaf.inc
    mid_moments) and the rest of a sample's channels one at a time (7 channels: 4 + 3; 12x12:
    M = 18)."""
    test_variance_exact_when_mean_dominates("cpu", ratio, torch.float32, "nchw", mode, 2, shape)


@pytest.mark.parametrize("mode", ["routed", "mixed"])
@pytest.mark.parametrize("ratio", [1e3, 1e5], ids=["mean_std_1e3", "1e5"])
def test_variance_exact_when_a_plane_starts_far_from_its_mean(ratio, mode):
    """fp32 planes of 128 values and more are summed in one pass about the mean of their first
    8 values (cpu_leaf.inc mid_moments). Planes whose first 8 values lie 30 of the data's
    standard deviations above the rest put that centre more than 4 of the plane's standard
    deviations from its mean: they are summed again about their own mean. Every other sample
    starts so (odd samples: plain data, the centre close to the mean). Bound: 10x F.batch_norm's
    error on the same data."""
    import variance_error as ve
    x = ve.make_x(ratio, (16, 8, 16, 16), torch.float32, "nchw")
    x[::2, :, 0, :8] += 30 * ve.SIGMA
    route, M = ve.routing(mode, 16, 2)
    ref = ve.reference_running_var(x, M)
    err = ((ve.running_var_of(x, "cpu", route).double() - ref).abs() / ref).max().item()
    bound = max(10 * ve.relative_error(x, "F.batch_norm"), 4 * torch.finfo(torch.float32).eps)
    assert err <= bound, f"relative error {err:.2e} of running_var, bound {bound:.2e}"


@pytest.mark.parametrize("size", [4, 8], ids=["4x4", "8x8"])
@pytest.mark.parametrize("mode", ["routed", "mixed"])
def test_variance_exact_when_a_reference_sample_is_far_off(mode, size):
    """The CPU kernels sum small fp32 planes about each branch's reference centres, the plane
    means of its first sample (for a mixed sample: of its largest weight). A first sample far
    from the rest (zeros before data of mean 10 and std 0.01; in the mixed case with weight 1e-3
    and none elsewhere, so that it hardly counts in its branch) must not cost accuracy: a plane
    far from its centre is summed again about its own mean. Bound: 10x F.batch_norm's error on
    the data without that sample."""
    import variance_error as ve
    x = ve.make_x(1e3, (64, 4, size, size), torch.float32, "nchw")
    x[0] = 0
    g = torch.Generator().manual_seed(3)
    if mode == "routed":
        branch = torch.randint(0, 2, (64,), generator=g)
        route, M = ("branch", branch), torch.nn.functional.one_hot(branch, 2).double()
    else:
        M = torch.rand(64, 2, generator=g, dtype=torch.float64) + 0.5
        M[0] = torch.tensor([1e-3, 0.0])
        route = ("mix", M)
    ref = ve.reference_running_var(x, M)
    err = ((ve.running_var_of(x, "cpu", route).double() - ref).abs() / ref).max().item()
    bound = max(10 * ve.relative_error(x[1:].contiguous(), "F.batch_norm"),
                4 * torch.finfo(torch.float32).eps)
    assert err <= bound, f"relative error {err:.2e} of running_var, bound {bound:.2e}"


@pytest.mark.parametrize("activation", [None, "relu"], ids=["plain", "relu"])
@pytest.mark.parametrize("dtype,H", [(torch.float32, 33), (torch.float64, 23)],
                         ids=["fp32", "fp64"])
def test_outputs_of_32mib_take_streaming_stores_with_the_same_bits(dtype, H, activation):
    """The CPU kernels write y and dx of 32 MiB or more with non-temporal stores
    (cpu_passes.h kStreamOutputBytes); each value is the plain loop's. 128 × 64 planes of
    33×33 fp32 (35.7 MB; planes of 1089 values, so most start off a 16-byte boundary) or 23×23
    fp64: y and x's gradient bitwise those of the op on each half of the channels (17.8 MB,
    plain stores), and y the reference's values."""
    g = torch.Generator().manual_seed(5)
    N, C, K = 128, 64, 2
    x = (torch.randn(N, C, H, H, generator=g, dtype=dtype) * 2 + 1).requires_grad_()
    gy = torch.randn(x.shape, generator=g, dtype=dtype)
    branch = torch.randint(0, K, (N,), generator=g)
    w = torch.rand(K, C, generator=g, dtype=dtype) + .5
    b = torch.randn(K, C, generator=g, dtype=dtype)
    assert x.numel() * x.element_size() >= 32 << 20 > x.numel() * x.element_size() // 2

    def run(c0, c1):
        xs = x.detach()[:, c0:c1].requires_grad_()
        y = F.multi_batch_norm(xs, branch, w[:, c0:c1], b[:, c0:c1], training=True,
                               num_branches=K, activation=activation)
        return y, *torch.autograd.grad(y, xs, gy[:, c0:c1])

    with backends.use("cpu"):
        y, dx = run(0, C)
        halves = [run(c, c + C // 2) for c in (0, C // 2)]
    assert torch.equal(y, torch.cat([h[0] for h in halves], 1))
    assert torch.equal(dx, torch.cat([h[1] for h in halves], 1))
    want = reference.multi_batch_norm(x.detach(), branch, w, b, training=True, num_branches=K)
    torch.testing.assert_close(y, want.relu() if activation else want, **TOL[dtype])


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds addr (Linux /proc/self/smaps)."""
    start = end = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                start, end = lo, hi
            elif head == "VmFlags:" and start is not None and start <= addr < end:
                return line.split()[1:]
    return []


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
@pytest.mark.parametrize("backend", [p for p in cpu_backends() if p.values[0] == "cpu"])
def test_large_outputs_ask_for_huge_pages(backend):
    """The CPU kernels' outputs of 32 MiB and more (y, dx: fresh mmap'd pages under glibc on
    every call) are advised MADV_HUGEPAGE, "hg" in the mapping's VmFlags; a small one is not."""
    N, C, H = 128, 64, 32  # 32 MiB of fp32
    x = torch.randn(N, C, H, H, requires_grad=True)
    branch = torch.zeros(N, dtype=torch.long)
    with backends.use(backend):
        y = F.multi_batch_norm(x, branch, num_branches=1, training=True)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        small = F.multi_batch_norm(x[:2].detach(), branch[:2], num_branches=1, training=True)
    mid = lambda t: t.data_ptr() + t.numel() * t.element_size() // 2  # noqa: E731
    assert "hg" in _vm_flags(mid(y)) and "hg" in _vm_flags(mid(dx))
    assert "hg" not in _vm_flags(mid(small))


@pytest.mark.parametrize("backend", [p for p in cpu_backends() if p.values[0] == "cpu"])
def test_reused_scratch_changes_no_result(backend):
    """The CPU kernels keep their per-plane scratch blocks (64 KB and more) for the thread's
    next call instead of freeing them. A call after calls of other shapes, whose blocks it
    reuses with their old contents, gives bitwise the same output, gradients and running
    statistics as the first call."""
    def step(shape, mixed=False):
        g = torch.Generator().manual_seed(shape[1])
        x = torch.randn(*shape, generator=g, requires_grad=True)
        w = torch.rand(2, shape[1], generator=g, requires_grad=True)
        rm, rv = torch.zeros(2, shape[1]), torch.ones(2, shape[1])
        if mixed:
            route = torch.rand(shape[0], 2, generator=g)
            y = F.mixed_batch_norm(x, route, w, None, rm, rv, training=True)
        else:
            route = torch.arange(shape[0]) % 2
            y = F.multi_batch_norm(x, route, w, None, rm, rv, training=True)
        gx, gw = torch.autograd.grad(y, (x, w), torch.randn(y.shape, generator=g))
        return y, gx, gw, rm, rv

    big = (64, 512, 2, 2)  # [N, C] arrays of 128 KB
    with backends.use(backend):
        first = step(big)
        step((32, 1024, 2, 2), mixed=True)  # the same block sizes, other values
        step((128, 640, 1, 2))
        again = step(big)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
