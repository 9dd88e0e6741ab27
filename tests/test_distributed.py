"""Synchronized multi-branch BN and the DDP trainer on this CPU: two processes with the gloo
backend. The synchronized op on two half-batches must equal the single-process op on the
whole batch (forward, every gradient, running stats), with exactly one all-reduce forward and
one backward; a branch may be present on one rank only, or on none."""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from collectives import AllReduceCounter  # benchmarks/, on the path (conftest.py)
from fastrobust import distributed as D, functional as F
from fastrobust.trainers.base import _collective
from fastrobust.nn import MixedBatchNorm2d, MultiBatchNorm2d, SyncMixedBatchNorm2d, \
    SyncMultiBatchNorm2d, convert_sync_multi_bn

WORLD = 2
# fp64: the synchronized statistics come from each rank's fp64 sums about a centre merged over
# the ranks (Chan's update), the single-process op's from per-plane sums merged over the batch;
# both orders of summation differ, nothing else.
TOL64 = dict(rtol=1e-8, atol=1e-10)


def _spawn(fn, *args):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(fn, args=(os.path.join(d, "store"), *args), nprocs=WORLD, join=True)


def _init(rank, store):
    torch.set_num_threads(1)
    # torch._dynamo before the process group: its import (lazy, on the first op under a
    # dispatch mode: backends.use) imports torch.distributed.nn, whose functions take
    # `group=group.WORLD` as a default argument. Imported after init_process_group, they hold
    # the group past destroy_process_group, and its gloo threads then race the interpreter's
    # exit ("terminate called without an active exception", SIGABRT).
    from torch import _dynamo  # noqa: F401
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)


_LAUNCHERS = ("sync_bn_stats", "sync_bn_apply", "sync_bn_grad_sums", "sync_bn_dx")


def _op_worker(rank, store, cases):
    """Each case, (mixed, extras, placement[, spatial, backend, channels_last, C]), in one
    process group: spawning the two processes costs more than a case (they import torch)."""
    _init(rank, store)
    try:
        for case in cases:
            try:
                _op_case(rank, *case)
            except Exception as e:
                raise AssertionError(f"case {case}: {e}") from e
    finally:
        dist.destroy_process_group()


def _op_case(rank, mixed, extras, placement, spatial=(5, 4), backend=None,
             channels_last=False, C=3):
    """backend='triton': the synchronized op runs through the Triton kernels (under the
    interpreter here), the single-process reference through the CPU's."""
    from fastrobust import backends
    from fastrobust.ops.batch_norm import sync_triton as sync_bn
    calls = []
    launchers = {name: getattr(sync_bn, name) for name in _LAUNCHERS}

    def counted(fn, name):
        def run(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return run
    for name, fn in launchers.items():
        setattr(sync_bn, name, counted(fn, name))
    try:
        f64 = torch.float64
        g = torch.Generator().manual_seed(0)  # the same global batch on every rank
        N, K, half = 8, 3, 4
        x = torch.randn(N, C, *spatial, generator=g, dtype=f64) * 2 + 1
        if mixed:
            route = torch.rand(N, K, generator=g, dtype=f64)
            if placement == "one_rank":  # branch 2 weighs only rank 1's samples
                route[:half, 2] = 0
            elif placement == "none":
                route[:, 2] = 0
        else:
            route = {"one_rank": torch.tensor([0, 1, 0, 1, 2, 2, 1, 0]),
                     "none": torch.tensor([0, 1, 0, 1, 1, 0, 1, 0]),
                     "spread": torch.tensor([2, 1, 0, 2, 1, 0, 2, 1]),
                     "two_on_one_rank": torch.tensor([0, 1, 0, 1, 1, 1, 1, 1])}[placement]
        w = torch.randn(K, C, generator=g, dtype=f64)
        b = torch.randn(K, C, generator=g, dtype=f64)
        ext = [torch.rand(N, C, generator=g, dtype=f64) + 0.5 for _ in range(3)]
        dy = torch.randn(N, C, *spatial, generator=g, dtype=f64)
        rm0, rv0 = torch.randn(K, C, generator=g, dtype=f64), torch.rand(K, C, generator=g,
                                                                          dtype=f64) + 0.5
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            dy = dy.contiguous(memory_format=torch.channels_last)

        def run(sync, sl):
            leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_()
                      for t in [x[sl], w, b]]
            xe = [t[sl].clone().requires_grad_() for t in ext] if extras else []
            r = route[sl].clone()
            if mixed:
                r.requires_grad_()
            rm, rv, nbt = rm0.clone(), rv0.clone(), torch.zeros(K, dtype=torch.long)
            kw = dict(momentum=None, num_batches_tracked=nbt)
            if extras:
                kw.update(input_scale=xe[0], film_gamma=xe[1], film_beta=xe[2],
                          activation="relu")
            if sync:
                fn = D.sync_mixed_batch_norm if mixed else D.sync_multi_batch_norm
            else:
                fn = F.mixed_batch_norm if mixed else F.multi_batch_norm
                kw["training"] = True
            with backends.use(backend if sync else None):
                with AllReduceCounter() as fwd:
                    y = fn(leaves[0], r, leaves[1], leaves[2], rm, rv, **kw)
                inputs = leaves + xe + ([r] if mixed else [])
                with AllReduceCounter() as bwd:
                    grads = torch.autograd.grad(y, inputs, dy[sl])
            return y, list(grads), (rm, rv, nbt), (fwd.n, bwd.n)

        y_ref, g_ref, run_ref, _ = run(False, slice(None))
        mine = slice(rank * half, (rank + 1) * half)
        y, grads, running, counts = run(True, mine)
        assert counts == (1, 1), counts  # one all-reduce forward, one backward
        # the kernels served the synchronized op exactly where the Triton backend was forced
        assert calls == (list(_LAUNCHERS) if backend == "triton" else []), calls
        torch.testing.assert_close(y, y_ref[mine], **TOL64)
        torch.testing.assert_close(grads[0], g_ref[0][mine], **TOL64)  # dx
        for i in (1, 2):  # dweight, dbias: each rank's share; their sum is the whole batch's
            total = grads[i].clone()
            _collective(dist.all_reduce, total)  # its work outlives the group (base.py)
            torch.testing.assert_close(total, g_ref[i], **TOL64)
        for got, want in zip(grads[3:], g_ref[3:]):  # input_scale, γ, β, mix: per sample
            torch.testing.assert_close(got, want[mine], **TOL64)
        for got, want in zip(running, run_ref):
            torch.testing.assert_close(got, want, **TOL64)
    finally:
        for name, fn in launchers.items():
            setattr(sync_bn, name, fn)


@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
def test_sync_op_equals_whole_batch(mixed):
    """Plain and with input scale, FiLM and ReLU; a branch on both ranks, on one, on none."""
    _spawn(_op_worker, [(mixed, extras, placement) for extras in (False, True)
                        for placement in ("spread", "one_rank", "none")])


def test_sync_op_one_value_per_plane():
    """1×1 maps and [N, C] inputs (a ResNet's last stage at 8×8 inputs): one value per plane,
    with a branch that only one rank holds, twice; plain and with the extras."""
    _spawn(_op_worker, [(False, extras, "two_on_one_rank", spatial)
                        for extras in (False, True) for spatial in ((1, 1), ())])


# (mixed, extras, placement, spatial[, channels_last, C]), in two groups of four
_TRITON_CASES = {
    "plain_and_small": [(False, False, "one_rank", (5, 4)), (False, True, "spread", (5, 4)),
                        (True, False, "one_rank", (5, 4)), (False, True, "two_on_one_rank",
                                                            (1, 1))],
    "mixed_extras": [(True, True, "none", (5, 4)), (True, True, "spread", ()),
                     (True, True, "one_rank", (3, 3), True),
                     (True, True, "spread", (2, 2), False, 20)],
}


@pytest.mark.parametrize("group", list(_TRITON_CASES))
def test_sync_op_through_triton_kernels(group):
    """The synchronized op through the Triton kernels (CUDA's path: 3 launches and the
    all-reduce each way) equals the single-process op on the whole batch: forward, every
    gradient, running statistics and counters. channels_last and [N, C] inputs take the
    kernels' channel tiles (BLOCK_C > 1, masked at C=3); at 20 channels the backward's d mix
    sums two channel blocks (16 and a masked 4)."""
    cases = []
    for case in _TRITON_CASES[group]:
        mixed, extras, placement, spatial, cl, channels = case + (False, 3)[len(case) - 4:]
        cases.append((mixed, extras, placement, spatial, "triton", cl, channels))
    _spawn(_op_worker, cases)


def _node_worker(rank, store, backend):
    """The synchronized op is one C++ autograd node (the registered op sync_multi_bn's), with
    no Python autograd.Function in its graph; a double backward is refused with its error."""
    _init(rank, store)
    try:
        from fastrobust import backends
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.rand(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
        s = torch.rand(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
        with backends.use(backend):
            y = D.sync_multi_batch_norm(x, torch.tensor([0, 1, 1, 0]), w, None, num_branches=2,
                                        input_scale=s)
        assert "SyncMultiBn" in y.grad_fn.name(), y.grad_fn.name()
        seen, todo = [], [y.grad_fn]
        while todo:  # every node of the graph: C++ nodes only (leaves' AccumulateGrad)
            node = todo.pop()
            seen.append(node)
            todo += [n for n, _ in node.next_functions if n is not None]
        assert not any(isinstance(n, torch.autograd.function.BackwardCFunction) for n in seen)
        assert {n.name() for n in seen} == {y.grad_fn.name(),
                                            "torch::autograd::AccumulateGrad"}
        with backends.use(backend), pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
        assert x.grad is None and w.grad is None
        if backend is None:
            # torch.compile (fullgraph, AOT autograd): the trace holds the op's halves around
            # torch's out-of-place functional all-reduce; y and every gradient equal the eager
            # call's
            def f(x, w, s):
                return D.sync_multi_batch_norm(x, torch.tensor([0, 1, 1, 0]), w, None,
                                               num_branches=2, input_scale=s)
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, s)]
            y_eager = f(*leaves)
            g_eager = torch.autograd.grad(y_eager.square().sum(), leaves)
            y_comp = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
            g_comp = torch.autograd.grad(y_comp.square().sum(), leaves)
            torch.testing.assert_close(y_comp, y_eager, **TOL64)
            for got, want in zip(g_comp, g_eager):
                torch.testing.assert_close(got, want, **TOL64)
        # opcheck of the composite: its autograd registration (the schema, fake and AOT
        # checks stop at torch's own collective, whose in-place all_reduce_ cannot be
        # functionalized and whose wait_tensor returns its input unannotated; the halves
        # have the full opcheck: tests/test_batch_norm_sync.py)
        rm, rv = torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
        with backends.use(backend):
            torch.library.opcheck(
                torch.ops.fastrobust.sync_multi_bn.default,
                (x, torch.tensor([0, 1, 1, 0]), None, w, None, rm, rv, None, s, None, None, 2,
                 0.1, False, 1e-5, True, rank, WORLD, dist.group.WORLD.group_name),
                test_utils="test_autograd_registration")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [None, "eager", "triton"])
def test_sync_op_is_one_cpp_autograd_node(backend):
    _spawn(_node_worker, backend)


def _module_worker(rank, store):
    _init(rank, store)
    try:
        torch.manual_seed(0)
        # Convs without bias, as before a BN in a ResNet: a bias there has gradient exactly 0
        # in exact arithmetic (the BN subtracts it again), so fp32 leaves only its rounding
        # noise (~3e-5 whole-batch, ~1e-4 once summed over the ranks), which no tolerance of
        # the comparison below can tell from a wrong value.
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
                                    MultiBatchNorm2d(4, 2), torch.nn.ReLU(),
                                    torch.nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                    MixedBatchNorm2d(4, 2))
        sync = convert_sync_multi_bn(copy.deepcopy(model))
        assert isinstance(sync[1], SyncMultiBatchNorm2d) and isinstance(sync[4],
                                                                        SyncMixedBatchNorm2d)
        x = torch.randn(8, 3, 6, 6)
        branch = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1])
        mix = torch.rand(8, 2)
        mine = slice(rank * 4, rank * 4 + 4)

        def fwd(m, sl):
            h = m[2](m[1](m[0](x[sl]), branch=branch[sl]))
            return m[4](m[3](h), mix=mix[sl])

        ref = fwd(model, slice(None))
        ref.square().sum().backward()
        with AllReduceCounter() as c:
            out = fwd(sync, mine)
            out.square().sum().backward()
        assert c.n == 4  # two layers: one all-reduce each forward, one each backward
        torch.testing.assert_close(out, ref[mine], rtol=1e-4, atol=1e-5)  # fp32
        for p_ref, p in zip(model.parameters(), sync.parameters()):
            total = p.grad.clone()
            _collective(dist.all_reduce, total)  # its work outlives the group (base.py)
            torch.testing.assert_close(total, p_ref.grad, rtol=1e-4, atol=1e-4)
        for b_ref, b in zip(model.buffers(), sync.buffers()):
            torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6)
        sync.eval()  # eval: running statistics, no collective
        with AllReduceCounter() as c, torch.no_grad():
            fwd(sync, mine)
        assert c.n == 0
    finally:
        dist.destroy_process_group()


def test_sync_modules_and_conversion():
    _spawn(_module_worker)


def _variance_worker(rank, store, backend):
    """Each rank holds half of x = c + 0.01·randn: the running_var the synchronized op writes
    (momentum 1) against the fp64 variance of the whole batch."""
    _init(rank, store)
    try:
        import variance_error as ve
        from fastrobust import backends
        for dtype in (torch.float32, torch.float64):
            for mixed in (False, True):
                for ratio in (1e3, 1e5):
                    x = ve.make_x(ratio, (16, 4, 6, 6), dtype, "nchw")
                    M = torch.ones(16, 1, dtype=torch.float64)
                    ref = ve.reference_running_var(x, M)[0]
                    bound = max(10 * ve.relative_error(x, "F.batch_norm"),
                                4 * torch.finfo(dtype).eps)
                    mine = x[rank * 8:(rank + 1) * 8]
                    rm, rv = torch.zeros(1, 4, dtype=dtype), torch.ones(1, 4, dtype=dtype)
                    with backends.use(backend):
                        if mixed:
                            D.sync_mixed_batch_norm(mine, torch.ones(8, 1, dtype=dtype), None,
                                                    None, rm, rv, momentum=1.0)
                        else:
                            D.sync_multi_batch_norm(mine, torch.zeros(8, dtype=torch.long),
                                                    None, None, rm, rv, momentum=1.0)
                    err = ((rv[0].double() - ref).abs() / ref).max().item()
                    assert err <= bound, (dtype, mixed, ratio, err, bound)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [None, "triton"], ids=["plain", "triton"])
def test_sync_variance_exact_when_mean_dominates(backend):
    """Issue 37: the ranks' moments merge exactly (Chan's update with its cross term); fp64
    sums Σu, Σu² lost the variance to E[u²] − E[u]² (~1e-16·(mean/std)² relative) and each
    rank's fp32 plane means their rounding."""
    _spawn(_variance_worker, backend)


def test_single_process_falls_back_to_the_plain_op():
    """Without an initialized process group the synchronized module is the plain one."""
    assert not D.sync_active()
    torch.manual_seed(0)
    plain = MultiBatchNorm2d(3, 2).train()
    sync = convert_sync_multi_bn(torch.nn.Sequential(MultiBatchNorm2d(3, 2)))[0]
    x, branch = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.equal(sync(x, branch=branch), plain(x, branch=branch))


def _trainer_worker(rank, store, out, widths, steps, batches, width):
    _init(rank, store)
    try:
        from fastrobust.nn import SyncMultiBatchNorm2d
        from fastrobust.trainers.oat import OATConfig, OATTrainer

        def cfg(sub):
            return OATConfig(dataset="digits", arch="resnet18", width=width, epochs=1,
                             batch_size=64, max_train_batches=batches, steps=steps, eps=0.3,
                             alpha=0.1, random_start=False, widths=widths,
                             out=os.path.join(out, sub))
        ddp = OATTrainer(cfg("ddp"), progress=False)
        assert (ddp.rank, ddp.world) == (rank, WORLD)
        assert any(isinstance(m, SyncMultiBatchNorm2d) for m in ddp.model.modules())
        with AllReduceCounter() as c:
            ddp.fit(log=lambda *a: None)
        assert c.n > 0
        if rank == 0:  # the same steps in one process on the global batches
            ref = OATTrainer(cfg("single"), progress=False, distributed=False)
            assert ref.world == 1
            ref.fit(log=lambda *a: None)
            assert len(ddp.history[0]["losses"]) == batches
            torch.testing.assert_close(ddp.history[0]["losses"], ref.history[0]["losses"],
                                       rtol=1e-5, atol=1e-6)
            want = ref.model.state_dict()
            for k, v in ddp.model.state_dict().items():
                # fp32: the same sums in another order (measured ~1e-6 after three steps)
                torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-5,
                                           msg=lambda m, k=k: f"{k}: {m}")
            assert os.path.exists(os.path.join(out, "ddp", "last.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("widths, steps, batches, width", [
    ((), 0, 2, 4), ((0.5, 1.0), 0, 1, 8), ((), 2, 1, 4)],
    ids=["oat", "oats", "oat_pgd2_one_step"])
def test_ddp_training_steps_equal_single_process(tmp_path, widths, steps, batches, width):
    """OAT (and OATS) steps on two ranks with synchronized BN give the weights, running stats
    and per-step losses of one process on the same global batches. The attack starts from the
    clean input (random starts are per rank by design). Over several steps the attack is off
    (x_adv = x, still through the adversarial branch): PGD's sign(∇) turns the last-bit
    differences of a reordered sum into whole α steps on a few pixels, so trajectories with an
    attack part after a step or two on any two machines; one PGD-2 step is compared. The tiny
    models' BNs on 1×1 maps see a handful of values per branch, where fp32 rounding differences
    grow by ~10× a step and more: measured in NCHW with one thread on an AVX2 machine (the same
    before and after the memory-format guard), OAT differs by 6e-6 after two steps and 4e-3
    after three, OATS by 3e-6 after one step and 1e-2 after two; so two OAT steps and one OATS
    step are compared."""
    _spawn(_trainer_worker, str(tmp_path), widths, steps, batches, width)


@pytest.mark.parametrize("method", ["oat", "afa", "awnet"])
def test_torchrun_command_line(tmp_path, method):
    """`torchrun --nproc-per-node=2 -m fastrobust train oat|afa|awnet ...` trains
    data-parallel, and rank 0 alone checkpoints, evaluates and writes the results."""
    import subprocess
    import sys

    out = tmp_path / "run"
    extra = {"oat": ["--epochs", "1"],
             "afa": ["--epochs", "1", "--epochs2", "1", "--max-eps", "0.3"],
             "awnet": ["--epochs", "1", "--teacher-epochs", "1", "--eps", "0.3"]}[method]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node=2", "-m", "fastrobust", "train", method, "--width", "4",
           "--batch-size", "64", "--steps", "1", "--max-train-batches", "2",
           "--eval-steps", "1", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "2 ranks (DDP, global batch 64)" in r.stdout
    logged = [line for line in r.stdout.splitlines() if "epoch   1/1" in line]
    # rank 0 logs, rank 1 stays quiet (AFA: two stages; AW-Net: two teachers and the student)
    assert len(logged) == {"oat": 1, "afa": 2, "awnet": 3}[method]
    assert (out / "last.pt").exists() and (out / "results.json").exists()
    ck = torch.load(out / "last.pt", weights_only=False)
    assert len(ck["rng"]["attack_per_rank"]) == 2


def _afa_worker(rank, store, out):
    _init(rank, store)
    try:
        from fastrobust.trainers.afa import AFAConfig, AFATrainer

        def cfg(sub):
            return AFAConfig(width=4, epochs=1, epochs2=1, batch_size=64, max_train_batches=2,
                             steps=0, max_eps=0.3, random_start=False, lr2=0.1,
                             out=os.path.join(out, sub))
        ddp = AFATrainer(cfg("ddp"), progress=False)
        assert ddp.world == WORLD
        ddp.fit(log=lambda *a: None)
        if rank == 0:
            ref = AFATrainer(cfg("single"), progress=False, distributed=False)
            ref.fit(log=lambda *a: None)
            for h, g in zip(ddp.history, ref.history):
                torch.testing.assert_close(h["losses"], g["losses"], rtol=1e-5, atol=1e-6)
            want = ref.model.state_dict()
            for k, v in ddp.model.state_dict().items():
                torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-5,
                                           msg=lambda m, k=k: f"{k}: {m}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_afa_both_stages_equal_single_process(tmp_path):
    """AFA's stage I (batched K-way pass, the generator outside DDP) and stage II (DDP over the
    generator alone, its BNs synchronized too) on two ranks give one process's weights and
    losses; attack steps off, as for the OAT trainer above."""
    _spawn(_afa_worker, str(tmp_path))


def _awnet_worker(rank, store, out):
    _init(rank, store)
    try:
        from fastrobust.models import resnet18
        from fastrobust.trainers.awnet import AWNetConfig, AWNetTrainer

        torch.manual_seed(0)
        if rank == 0:
            torch.save(resnet18(10, 4, 1).eval(), os.path.join(out, "nat.pt"))
            torch.save(resnet18(10, 4, 1).eval(), os.path.join(out, "adv.pt"))
        dist.barrier()

        def cfg(sub):
            return AWNetConfig(width=4, epochs=1, batch_size=64, max_train_batches=1, steps=0,
                               eps=0.3, random_start=False, teacher_nat=os.path.join(out, "nat.pt"),
                               teacher_adv=os.path.join(out, "adv.pt"),
                               out=os.path.join(out, sub))
        ddp = AWNetTrainer(cfg("ddp"), progress=False, log=lambda *a: None)
        assert ddp.world == WORLD
        ddp.fit(log=lambda *a: None)
        if rank == 0:
            ref = AWNetTrainer(cfg("single"), progress=False, log=lambda *a: None,
                               distributed=False)
            ref.fit(log=lambda *a: None)
            assert ddp.history[0]["loss"] == pytest.approx(ref.history[0]["loss"], rel=1e-5)
            want = ref.model.state_dict()
            for k, v in ddp.model.state_dict().items():
                torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-5,
                                           msg=lambda m, k=k: f"{k}: {m}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_awnet_equals_single_process(tmp_path):
    """An AW-Net step on two ranks (MixBN synchronized, MTARD's balance from the global
    losses) gives one process's weights; attack steps off, as above. One step: from the second
    on, the signal heads' (tanh + 1)^4 carries the last-bit differences of reordered sums into
    ω about fifty-fold a step (measured: 1e-4 apart on conv1 after two steps)."""
    _spawn(_awnet_worker, str(tmp_path))
