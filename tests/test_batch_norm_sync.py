"""The synchronized BN's four halves (the registered ops sync_bn_stats, sync_bn_apply,
sync_bn_grad_sums, sync_bn_dx, which sync_multi_bn's C++ autograd node runs around its
all-reduces) in one process: opcheck, the CPU's C++ implementation against the eager one, an
empty local batch. tests/test_distributed.py runs the whole op on two gloo processes."""
from __future__ import annotations

import pytest
import torch

from fastrobust import distributed as D

# fp64: the same sums in another order
TOL64 = dict(rtol=1e-8, atol=1e-10)


def test_sync_op_without_a_process_group_says_so():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="sync_multi_batch_norm: torch.distributed is not "
                                           "initialized"):
        D.sync_multi_batch_norm(x, torch.tensor([0, 1, 1, 0]), num_branches=2)


def _halves(mixed, extras, world=1, rank=0, dtype=torch.float64, N=6, C=3, K=2):
    """Arguments of the four halves of the synchronized op on CPU tensors (one rank)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, C, 4, 3, generator=g, dtype=dtype) * 3 + 2
    branch = None if mixed else torch.tensor([0, 1, 1, 0, 1, 0, 0, 1][:N])
    mix = torch.rand(N, K, generator=g, dtype=dtype) if mixed else None
    w, b = torch.rand(K, C, generator=g, dtype=dtype) + .5, torch.randn(K, C, generator=g,
                                                                          dtype=dtype)
    ext = [torch.rand(N, C, generator=g, dtype=dtype) + .5 if extras else None
           for _ in range(3)]
    rm, rv = torch.zeros(K, C, dtype=dtype), torch.ones(K, C, dtype=dtype)
    nbt = torch.zeros(K, dtype=torch.long)
    dy = torch.randn(x.shape, generator=g, dtype=dtype)
    needs = [True, mixed, True, True, extras, extras, extras]
    return dict(x=x, branch=branch, mix=mix, w=w, b=b, ext=ext, rm=rm, rv=rv, nbt=nbt, dy=dy,
                needs=needs, K=K, world=world, rank=rank)


def _run_halves(a, ops):
    """stats → apply → grad sums → dx with the payload and sums of one rank as the all-reduced
    ones (world 1)."""
    x, br, mix, K = a["x"], a["branch"], a["mix"], a["K"]
    pay, planes, old = ops.sync_bn_stats(x, br, mix, a["ext"][0], a["nbt"], K, True,
                                         a["rank"], a["world"])
    y, mean, invstd = ops.sync_bn_apply(x, br, mix, a["w"], a["b"], a["rm"], a["rv"], a["nbt"],
                                        *a["ext"], pay, old, K, 0.0, True, 1e-5, a["ext"][0]
                                        is not None)
    sums, parts, dw, db = ops.sync_bn_grad_sums(a["dy"], x, br, mix, a["w"], a["b"], mean,
                                                invstd, *a["ext"], K, True, a["needs"])
    grads = ops.sync_bn_dx(a["dy"], x, br, mix, a["w"], a["b"], mean, invstd, planes,
                           *a["ext"], sums, parts, pay, K, True, a["needs"])
    return pay, y, mean, invstd, sums, dw, db, grads


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "scale_film_relu"])
@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
def test_sync_halves_opcheck(mixed, extras):
    """torch.library.opcheck of the four halves on CPU (schema, fake implementations,
    aot dispatch), each on the previous one's outputs."""
    ops = torch.ops.fastrobust
    a = _halves(mixed, extras, world=2, rank=1)
    x, br, mix, K = a["x"], a["branch"], a["mix"], a["K"]
    pay, planes, old = ops.sync_bn_stats(x, br, mix, a["ext"][0], a["nbt"], K, True, 1, 2)
    assert pay.shape == (2, K + 3 * K * x.shape[1]) and not pay[0].any()  # rank 1's row only
    torch.library.opcheck(ops.sync_bn_stats.default,
                          (x, br, mix, a["ext"][0], a["nbt"], K, True, 1, 2))
    apply_args = (x, br, mix, a["w"], a["b"], a["rm"], a["rv"], a["nbt"], *a["ext"], pay, old,
                  K, 0.0, True, 1e-5, extras)
    y, mean, invstd = ops.sync_bn_apply(*apply_args)
    torch.library.opcheck(ops.sync_bn_apply.default, apply_args)
    sums_args = (a["dy"], x, br, mix, a["w"], a["b"], mean, invstd, *a["ext"], K, extras,
                 a["needs"])
    sums, parts, _, _ = ops.sync_bn_grad_sums(*sums_args)
    torch.library.opcheck(ops.sync_bn_grad_sums.default, sums_args)
    torch.library.opcheck(ops.sync_bn_dx.default, (
        a["dy"], x, br, mix, a["w"], a["b"], mean, invstd, planes, *a["ext"], sums, parts, pay,
        K, extras, a["needs"]))


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "scale_film_relu"])
@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
def test_sync_halves_cpu_equals_eager(mixed, extras):
    """The CPU's C++ halves and the eager ones agree: payload, y, statistics, running stats,
    T1 / T2 and every gradient (fp64: the same sums in another order)."""
    from fastrobust import backends
    a, b = _halves(mixed, extras), _halves(mixed, extras)
    cpu = _run_halves(a, torch.ops.fastrobust)
    with backends.use("eager"):
        eager = _run_halves(b, torch.ops.fastrobust)
    for got, want in zip(cpu[:-1] + tuple(cpu[-1]), eager[:-1] + tuple(eager[-1])):
        torch.testing.assert_close(got, want, **TOL64)
    for got, want in ((a["rm"], b["rm"]), (a["rv"], b["rv"]), (a["nbt"], b["nbt"])):
        torch.testing.assert_close(got, want, **TOL64)
    assert a["nbt"].tolist() == [1, 1]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_sync_halves_of_an_empty_local_batch(backend):
    """A rank with no samples still writes its (zero) row, takes the global statistics and
    updates the running ones: the CPU's halves and the Triton ones (which hand an empty batch
    to the eager implementation: their grids would be empty) equal the eager halves."""
    from fastrobust import backends
    a, b = _halves(True, True, N=0, world=2, rank=1), _halves(True, True, N=0, world=2, rank=1)
    # the other rank's row: 12 values of branch 0 about centre 1.5 (R = 0, Q = 6 per channel)
    K, C = a["K"], a["x"].shape[1]
    other = torch.zeros(K + 3 * K * C, dtype=torch.float64)
    other[0] = 12.0
    other[K:K + C] = 1.5
    other[K + 2 * K * C:K + 2 * K * C + C] = 6.0

    def run(args, name):
        ops = torch.ops.fastrobust
        x, mix, ext = args["x"], args["mix"], args["ext"]
        with backends.use(name):
            pay, planes, old = ops.sync_bn_stats(x, None, mix, ext[0], args["nbt"], K, True, 1,
                                                 2)
            assert not pay.any()
            pay = pay + torch.stack([other, torch.zeros_like(other)])  # "all-reduced"
            y, mean, invstd = ops.sync_bn_apply(x, None, mix, args["w"], args["b"], args["rm"],
                                                args["rv"], args["nbt"], *ext, pay, old, K, 0.0,
                                                True, 1e-5, True)
            sums, parts, dw, db = ops.sync_bn_grad_sums(args["dy"], x, None, mix, args["w"],
                                                        args["b"], mean, invstd, *ext, K, True,
                                                        args["needs"])
            grads = ops.sync_bn_dx(args["dy"], x, None, mix, args["w"], args["b"], mean, invstd,
                                   planes, *ext, sums, parts, pay, K, True, args["needs"])
        return [y, mean, invstd, sums, dw, db, *grads, args["rm"], args["rv"], args["nbt"]]
    got, want = run(a, backend), run(b, "eager")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL64)
    assert a["nbt"].tolist() == [1, 0]  # branch 0 has 12 values globally, branch 1 none
    torch.testing.assert_close(a["rm"][0], torch.full((C,), 1.5, dtype=torch.float64))
