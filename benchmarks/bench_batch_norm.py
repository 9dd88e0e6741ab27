"""multi_batch_norm against what users run today, at CIFAR ResNet shapes (N=128).

Baselines (same routing, same training-mode semantics, running stats updated):
  bn_floor       one nn.BatchNorm2d over the whole batch: no routing at all, the floor
  oat_dual       the OAT repository's dual BN: batch sorted clean-first, slice, two BNs, cat (K=2)
  compiled_oat_dual  torch.compile of oat_dual
  eager_kway     K nn.BatchNorm2d, index_select per branch, index_copy back
  compiled_kway  torch.compile of eager_kway
  fused          fastrobust.functional.multi_batch_norm (default backend: the C++ kernel on CPU)
The per-branch indices of the K-way baselines are computed outside the timed region (in real
training they cost a nonzero() and a host sync per step on top).

Byte model (ideal traffic, fp32): forward reads x and writes y (2·|x|); forward+backward adds
reading x and dy and writing dx (5·|x|). GB/s = bytes / median time.

The summary also prints one table per (K, mode) with the fused op's passes over x-sized
tensors (forward: the statistics read x, the affine pass reads x and writes y, 3·|x|; the
backward: the gradient sums read dy and x, the dx pass reads dy and x and writes dx, 5·|x|),
the GB/s of those passes, their fraction of the copy bandwidth measured in the same run (a
copy of x's size, and of 256 MB), and the other implementations' medians over the fused op's.
"""
import pytest
import torch
from torch import nn

from fastrobust import functional as F
from baselines import eager_kway_bn, oat_dual_bn
from conftest import QUICK, SUMMARIES, record

# (C, H=W) along a CIFAR ResNet-18; C=64 at 16x16 is the target shape.
SHAPES = [(64, 16)] if QUICK else [(64, 32), (64, 16), (128, 16), (256, 8), (512, 4)]
N = 128


def _routing(K):
    if K == 2:  # OAT: clean half then adversarial half
        return torch.cat([torch.zeros(N // 2), torch.ones(N // 2)]).long()
    return torch.randint(0, K, (N,))


_compiled = {}


def _compile(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def make_impl(impl, C, K, branch):
    """A zero-argument callable for `impl` on x; returns (fn_of_x, parameters)."""
    if impl == "fused":
        w, b = torch.ones(K, C, requires_grad=True), torch.zeros(K, C, requires_grad=True)
        rm, rv = torch.zeros(K, C), torch.ones(K, C)
        nbt = torch.zeros(K, dtype=torch.long)
        return lambda x: F.multi_batch_norm(x, branch, w, b, rm, rv, training=True,
                                            num_batches_tracked=nbt)
    if impl == "bn_floor":
        bn = nn.BatchNorm2d(C)
        return bn
    if impl in ("oat_dual", "compiled_oat_dual"):
        bn0, bn1 = nn.BatchNorm2d(C), nn.BatchNorm2d(C)
        n_clean = int((branch == 0).sum())
        fn = oat_dual_bn if impl == "oat_dual" else _compile(oat_dual_bn)
        return lambda x: fn(x, n_clean, bn0, bn1)
    bns = nn.ModuleList(nn.BatchNorm2d(C) for _ in range(K))
    indices = [(branch == k).nonzero().flatten() for k in range(K)]
    fn = eager_kway_bn if impl == "eager_kway" else _compile(eager_kway_bn)
    return lambda x: fn(x, indices, bns)


IMPLS = ["fused", "bn_floor", "oat_dual", "compiled_oat_dual", "eager_kway", "compiled_kway"]
# Passes over x-sized tensors the fused op makes (see the docstring).
FUSED_PASSES = {"fwd": 3, "fwd+bwd": 8}
SUMMARY_VS = ["bn_floor", "oat_dual", "compiled_oat_dual", "compiled_kway"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", [2, 5])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("C,H", SHAPES, ids=[f"C{c}_{h}x{h}" for c, h in SHAPES])
def test_multi_bn(benchmark, impl, K, mode, C, H):
    if impl in ("oat_dual", "compiled_oat_dual") and K != 2:
        pytest.skip("the OAT dual BN has two branches")
    torch._dynamo.reset()
    branch = _routing(K)
    fn = make_impl(impl, C, K, branch)
    x = torch.randn(N, C, H, H, requires_grad=(mode == "fwd+bwd"))
    gy = torch.randn_like(x)
    benchmark.group = f"multi_bn N{N} C{C} {H}x{H} K{K} {mode}"
    nbytes = x.numel() * 4 * (2 if mode == "fwd" else 5)
    record(benchmark, impl=impl, nbytes=nbytes, tensor_bytes=x.numel() * 4,
           fused=(impl == "fused"))
    benchmark.extra_info.update(shape=f"{C} × {H}²", K=K, mode=mode,
                                pass_bytes=x.numel() * 4 * FUSED_PASSES[mode])

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(x)
    else:
        def run():
            x.grad = None
            fn(x).backward(gy)
    run()  # warm-up (compiles the torch.compile baseline outside the timing)
    benchmark(run)


def summary(groups):
    """The fused op per shape, one table per (K, mode): its passes' GB/s against the copy
    bandwidths of the same run, and each baseline's median over the fused op's."""
    tables = {}
    for entries in groups.values():
        fused = [(med, info) for med, info in entries if info["fused"] and "pass_bytes" in info]
        if not fused:
            continue
        med, info = fused[0]
        others = {i["impl"]: i.get("fused_speedup") for _, i in entries if not i["fused"]}
        gbps = info["pass_bytes"] / med / 1e9
        tables.setdefault((info["K"], info["mode"]), []).append(
            f"| {info['shape']} | {med * 1e3:.3f} ms | {gbps:.1f} | "
            f"{gbps / info['copy_GBps']:.0%} | {gbps / info['copy_GBps_dram']:.0%} | "
            + " | ".join(f"{others[b]}×" if others.get(b) else "-" for b in SUMMARY_VS) + " |")
    lines = []
    for (K, mode), rows in sorted(tables.items()):
        passes = FUSED_PASSES[mode]
        lines += [f"multi_bn N{N} K{K} {mode}: fused op's {passes} passes of x against the "
                  "copy bandwidth of this run",
                  f"| C × H×W | fused | GB/s ({passes} passes of x) | of same-size copy | "
                  "of 256 MB copy | " + " | ".join(f"vs {b}" for b in SUMMARY_VS) + " |",
                  "|---" * (5 + len(SUMMARY_VS)) + "|"] + rows + [""]
    return lines


SUMMARIES.append(summary)
