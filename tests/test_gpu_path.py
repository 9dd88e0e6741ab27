"""The GPU path, checked without a GPU (docs/backends.md): the launch budget of every op on
CUDA (counted on meta tensors, benchmarks/launch_counts.py) and int64 sample offsets in the
Triton kernels (on their compiled TTIR, benchmarks/aot_compile.py)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import launch_counts as lc
import op_table

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.skipif(
    __import__("fastrobust").backends.triton.missing() is not None, reason="triton missing")

# docs/backends.md and the GPU-path issue: partial statistics → finalize → apply.
BN_BUDGET = 3


@pytest.mark.parametrize("kind", ["routed", "mixed"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "scale+film+relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("K", [2, 5])
def test_bn_launch_budget(kind, extras, training, K):
    fwd, bwd = lc.measure_bn(kind, K=K, extras=extras, training=training)
    assert len(fwd) <= BN_BUDGET, fwd
    assert len(bwd) <= BN_BUDGET, bwd
    assert all(name.startswith("triton.") for name in fwd + bwd), fwd + bwd


@pytest.mark.parametrize("shape", [(8, 16), (2, 4, 1, 1), (8, 16, 8, 8)], ids=str)
def test_bn_launch_budget_shapes(shape):
    """2-D inputs and one-value planes (statistics read from x) keep the budget too."""
    x = torch.empty(shape, device="meta").requires_grad_()
    w = torch.empty(3, shape[1], device="meta").requires_grad_()
    b = torch.empty(3, shape[1], device="meta").requires_grad_()
    branch = torch.zeros(shape[0], dtype=torch.long, device="meta")
    from fastrobust import functional as F
    with lc.counting() as c:
        y = F.multi_batch_norm(x, branch, w, b, training=True, num_branches=3)
    assert len(c.launches) <= BN_BUDGET, c.launches
    with lc.counting() as c:
        y.backward(torch.empty_like(y))
    assert len(c.launches) <= BN_BUDGET, c.launches


# The synchronized BN (fastrobust.distributed) on CUDA: the BN's budget and one all-reduce
# each way (backward: grad sums -> this rank's T1, T2 -> all-reduce -> dx with the per-plane
# results worked out from the global sums).


@pytest.mark.parametrize("kind", ["routed", "mixed"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "scale+film+relu"])
def test_sync_bn_launch_budget(kind, extras):
    fwd, bwd, fwd_reduces, bwd_reduces = lc.measure_sync(kind, K=5 if kind == "routed" else 2,
                                                         extras=extras)
    assert (fwd_reduces, bwd_reduces) == (1, 1)
    assert len(fwd) <= BN_BUDGET, fwd
    assert len(bwd) <= BN_BUDGET, bwd
    assert all(name.startswith("triton.") for name in fwd + bwd), fwd + bwd


@pytest.mark.parametrize("gamma,beta", [("NC", "NC"), ("C", "C"), ("C", "NC"), ("NC", "C"),
                                        ("C", None), (None, "C"), ("NC", None)])
@pytest.mark.parametrize("shape,channels_last", [((8, 16, 8, 8), False), ((8, 16, 8, 8), True),
                                                 ((256, 64), False), ((2, 4, 64, 64), False)],
                         ids=["nchw", "channels_last", "2d", "few-planes"])
def test_film_launch_budget(gamma, beta, shape, channels_last):
    """1 launch forward, ≤ 2 backward, per-channel ([C]) γ, β included: no copy of a
    broadcast γ forward, its gradient summed over the batch by the kernels' second launch."""
    fwd, bwd = lc.measure_film(gamma, beta, shape=shape, channels_last=channels_last)
    assert fwd == ["triton._affine_kernel"]
    assert len(bwd) <= 2, bwd
    assert bwd[0] == "triton._film_grad_kernel", bwd


@pytest.mark.parametrize("per_sample", [False, True], ids=["float", "per-sample"])
@pytest.mark.parametrize("norm,budget", [("linf", 1), ("l2", 2)])
def test_pgd_launch_budget(norm, budget, per_sample):
    launches = lc.measure_pgd(norm, per_sample)
    assert len(launches) <= budget, launches


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_strided_pgd_tensors_cost_no_launch(norm):
    """x_adv a strided view, grad channels_last, x_nat a slice: the same launches as
    contiguous tensors (no copy in or out)."""
    assert lc.measure_pgd(norm, layouts=True) == lc.measure_pgd(norm)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_running_statistics_cost_no_launch(training):
    """Running statistics that are [K, C] views of [C, K] tensors: the contiguous ones'
    launches (no copy, no copy back)."""
    assert lc.measure_bn("routed", K=5, training=training, strided_running=True) == \
        lc.measure_bn("routed", K=5, training=training)


def test_add_relu_launch_budget():
    """One fused pass forward (not add + relu), ATen's one masked pass backward."""
    fwd, bwd = lc.measure_add_relu()
    assert fwd == ["triton._add_relu_kernel"]
    assert len(bwd) <= 1, bwd


@pytest.mark.parametrize("name,launches", lc.measure_ops(), ids=[n for n, _ in lc.measure_ops()])
def test_every_op_launch_budget(name, launches):
    """Each registered op's own call (its row of tests/op_table.py): at most 3 launches, a PGD
    step at most 2 (one, or the split's partial sums then the update)."""
    budget = 2 if op_table.OPS[name].family == "pgd" else 3
    assert 1 <= len(launches) <= budget, launches


def test_mifgsm_launch_budget():
    assert len(lc.measure_pgd(momentum=True)) <= 2


@pytest.mark.parametrize("momentum", [False, True], ids=["l2", "mifgsm"])
def test_large_samples_are_split_at_any_batch_size(momentum):
    """256 CIFAR samples: one program per sample (one launch, enough programs, small
    re-reads); 256 samples of 3x224x224: chunks of at most MAX_CHUNK_BLOCKS blocks in two
    launches (one program per such sample reads 147 blocks three times)."""
    from fastrobust.ops.pgd import triton as kernels
    one = "triton._mifgsm_kernel" if momentum else "triton._l2_kernel"
    split = "triton._mifgsm_split_kernel" if momentum else "triton._l2_split_kernel"
    assert lc.measure_pgd("l2", momentum=momentum, shape=(256, 3, 32, 32)) == [one]
    assert lc.measure_pgd("l2", momentum=momentum, shape=(256, 3, 224, 224)) == [
        "triton._sample_sums_kernel", split]
    T, chunk = kernels._split(256, 3 * 224 * 224)
    assert (T, chunk) == (10, 15 * kernels.BLOCK)  # 147 blocks: 10 chunks of <= 16 blocks
    assert kernels._split(256, 3 * 32 * 32) == (1, 3 * kernels.BLOCK)


# CUDA's grid limits: axis x 2³¹ − 1 programs, y and z 65,535 each.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def _big_cases():
    """Calls whose old grids passed axis y's limit (shapes on meta tensors, nothing
    allocated): NCHW with C = 70,000 (one channel per program on y), a channels_last
    1500 x 1500 map (70,313 spatial blocks on y), a PGD sample of 147 M values."""
    from fastrobust import functional as F

    def bn(shape, cl):
        x = lc._t(*shape, requires_grad=True, channels_last=cl)
        C = shape[1]
        w, b = lc._t(2, C, requires_grad=True), lc._t(2, C, requires_grad=True)
        s = lc._t(shape[0], C, requires_grad=True)
        branch = torch.zeros(shape[0], dtype=torch.long, device="meta")
        y = F.multi_batch_norm(x, branch, w, b, training=True, num_branches=2, input_scale=s,
                               film_gamma=s, film_beta=s, activation="relu")
        y.backward(torch.empty_like(y))
        F.film(x, s, s[0]).backward(torch.empty_like(y))

    def sync(shape, cl):
        from fastrobust import distributed as D
        x = lc._t(*shape, requires_grad=True, channels_last=cl)
        w = lc._t(2, shape[1], requires_grad=True)
        with lc._one_rank():
            y = D.sync_multi_batch_norm(x, torch.zeros(shape[0], dtype=torch.long,
                                                       device="meta"), w, w)
            y.backward(torch.empty_like(y))

    def pgd():
        t = lc._t(1, 3, 7000, 7000)
        F.pgd_step_(t, t, t, 0.1, 0.01, norm="linf")

    return {"nchw-C70000": lambda: bn((2, 70000, 2, 2), False),
            "channels_last-1500x1500": lambda: bn((1, 64, 1500, 1500), True),
            "sync-nchw-C70000": lambda: sync((2, 70000, 2, 2), False),
            "sync-channels_last-1500x1500": lambda: sync((1, 64, 1500, 1500), True),
            "pgd-147M": pgd}


@pytest.mark.parametrize("case", list(_big_cases()))
def test_grids_within_cuda_limits(case):
    """No launch asks for more programs on an axis than CUDA allows (sample, channel and
    spatial blocks share axis x; splits, bounded by MIN_PROGRAMS, use y)."""
    with lc.counting() as c:
        _big_cases()[case]()
    assert c.grids, "no launch recorded"
    for name, grid in c.grids:
        assert all(g <= lim for g, lim in zip(grid, GRID_LIMITS)), (name, grid)
        assert all(g >= 1 for g in grid), (name, grid)


def test_counter_sees_torch_ops():
    """The counter is not blind: plain torch arithmetic on meta tensors is counted."""
    x = torch.empty(4, 4, device="meta")
    with lc.counting() as c:
        (x * 2 + 1).sum()
    assert c.launches == ["aten.mul", "aten.add", "aten.sum"]


_IR_CHECK = textwrap.dedent("""
    import os, sys, torch, triton, triton.language as tl
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, sys.argv[1])
    import aot_compile as aot
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def narrow(x_ptr, out_ptr, sxn, BLOCK: tl.constexpr):  # the bug: n * sxn in int32
        n = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + n * sxn + offs, tl.load(x_ptr + n * sxn + offs))

    k = triton.compile(ASTSource(narrow, {"x_ptr": "*fp32", "out_ptr": "*fp32", "sxn": "i32",
                                          "BLOCK": "constexpr"}, {"BLOCK": 64}),
                       target=GPUTarget("cuda", 90, 32))
    assert aot.int32_offsets(k.asm["ttir"]), "the check missed an int32 product"

    def cases():
        from fastrobust import functional as F
        x = torch.empty(4, 8, 4, 4, device="meta").requires_grad_()
        s = torch.empty(4, 8, device="meta").requires_grad_()
        w = torch.empty(3, 8, device="meta").requires_grad_()
        for mix in (None, torch.empty(4, 3, device="meta").requires_grad_()):
            kw = dict(training=True, input_scale=s, film_gamma=s, film_beta=s,
                      activation="relu")
            y = (F.mixed_batch_norm(x, mix, w, w, **kw) if mix is not None else
                 F.multi_batch_norm(x, torch.zeros(4, dtype=torch.long, device="meta"), w, w,
                                    num_branches=3, **kw))
            y.backward(torch.empty_like(y))
        F.film(x, s, s).backward(torch.empty_like(x))
        c = torch.empty(8, device="meta").requires_grad_()  # [C]: partials summed over n
        F.film(x, c, s).backward(torch.empty_like(x))
        big = torch.empty(2, 3, 32, 32, device="meta")  # 2 samples: the split l2 / MI-FGSM
        for t in (x.detach(), big):
            for norm in ("linf", "l2"):
                F.pgd_step_(t, t, t, 0.1, 0.01, norm=norm)
            F.mifgsm_step_(t, t, t.clone(), t, 0.1, 0.01)

    sync = [(torch.float32, aot._sync_case(4, 8, 4, False, 3, True, mixed, torch.float32))
            for mixed in (False, True)]
    found = aot.record([(torch.float32, cases)] + sync)
    names = set()
    for name, fn, sig, cons, attrs, options, dt in found.values():
        k = triton.compile(ASTSource(fn, sig, cons, attrs), target=GPUTarget("cuda", 90, 32))
        bad = aot.int32_offsets(k.asm["ttir"])
        assert not bad, (name, bad[:3])
        names.add(name)
    print(" ".join(sorted(names)))
""")


def test_sample_offsets_are_int64(tmp_path):
    """Every kernel computes sample (and split) offsets in int64: no i32 product of a program
    id and a stride in the compiled TTIR. The check itself must catch `n * stride` in i32."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = tmp_path / "ir_check.py"  # triton.jit needs its kernels' source in a file
    script.write_text(_IR_CHECK)
    r = subprocess.run([sys.executable, str(script), str(BENCH)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    names = set(r.stdout.split())
    assert {"_moments_kernel", "_bn_stats_kernel", "_affine_kernel", "_grad_sums_kernel",
            "_bn_grads_kernel", "_dx_kernel", "_linf_kernel", "_l2_kernel",
            "_mifgsm_kernel", "_sync_apply_kernel", "_sync_dx_kernel", "_sample_sums_kernel",
            "_l2_split_kernel", "_mifgsm_split_kernel", "_film_grad_kernel",
            "_film_reduce_kernel"} <= names, names
