"""Relative error of the batch variance a training step writes to running_var (momentum 1),
against an fp64 reference, when the mean is large against the spread (issue 37 item 1).

x = c + 0.01·randn (default 64×8×8×8), mean/std = c/0.01; the error is the largest over the
channels of |running_var − var_ref| / var_ref, var_ref the unbiased variance of x in fp64
(of x as given: the input's own rounding is not counted). Every CPU backend is forced in turn
(triton under TRITON_INTERPRET=1), `F.batch_norm` is the baseline:

    python benchmarks/variance_error.py                   # fp32, NCHW, routed (K=1)
    python benchmarks/variance_error.py --dtype float64 --layout channels_last --mode mixed

Routed: one branch (all samples in branch 0); mixed: a one-hot mix over two branches with
every sample in branch 0, so both op forms reduce to the same statistics as F.batch_norm.
The tests (tests/test_batch_norm.py) also use two branches: random routing, random mix weights.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

from fastrobust import backends, functional as F  # noqa: E402

RATIOS = (1e3, 1e4, 1e5)
SIGMA = 0.01


def make_x(ratio, shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (ratio * SIGMA + SIGMA * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def reference_running_var(x, M):
    """The unbiased variance per (branch, channel) in fp64, branch k's values weighted by
    M[:, k] ([N, K]; one-hot for a routed op): what momentum 1 writes to running_var."""
    xs = x.double().flatten(2) if x.dim() > 2 else x.double()[:, :, None]  # [N, C, S]
    S = xs.shape[2]
    w = M.double()                                                         # [N, K]
    W = w.sum(0) * S                                                       # [K]
    mean = torch.einsum("nk,ncs->kc", w, xs) / W[:, None]
    dev2 = (xs[:, None] - mean[None, :, :, None]).square().sum(3)        # [N, K, C]
    return (w[:, :, None] * dev2).sum(0) / (W - 1)[:, None]


def routing(mode, N, K, seed=0):
    """("branch", int64 [N]) or ("mix", [N, K]) and the weights M [N, K]. K = 1: every sample
    in branch 0 (mixed: a one-hot mix over two branches, branch 1 empty); K > 1: random
    branches, or random mix weights in [0, 1)."""
    g = torch.Generator().manual_seed(seed + 1)
    if mode == "routed":
        branch = torch.zeros(N, dtype=torch.long) if K == 1 else \
            torch.randint(0, K, (N,), generator=g)
        return ("branch", branch), torch.nn.functional.one_hot(branch, K).double()
    if K == 1:
        mix = torch.zeros(N, 2, dtype=torch.float64)
        mix[:, 0] = 1
    else:
        mix = torch.rand(N, K, generator=g, dtype=torch.float64)
    return ("mix", mix), mix


def running_var_of(x, impl, route):
    """running_var [K, C] after one training call with momentum 1; impl a backend name or
    "F.batch_norm" (one branch)."""
    C = x.shape[1]
    if impl == "F.batch_norm":
        rm, rv = torch.zeros(C, dtype=x.dtype), torch.ones(C, dtype=x.dtype)
        TF.batch_norm(x, rm, rv, training=True, momentum=1.0)
        return rv[None]
    kind, r = route
    K = r.shape[1] if kind == "mix" else int(r.max()) + 1
    rm, rv = torch.zeros(K, C, dtype=x.dtype), torch.ones(K, C, dtype=x.dtype)
    with backends.use(impl):
        if kind == "branch":
            F.multi_batch_norm(x, r, None, None, rm, rv, training=True, momentum=1.0,
                               num_branches=K)
        else:
            F.mixed_batch_norm(x, r.to(x.dtype), None, None, rm, rv, training=True,
                               momentum=1.0)
    return rv


def relative_error(x, impl, mode="routed", K=1):
    """max over (branch, channel) of |running_var − reference| / reference."""
    route, M = routing(mode, x.shape[0], K)
    if impl == "F.batch_norm":
        M = torch.ones(x.shape[0], 1, dtype=torch.float64)
    ref = reference_running_var(x, M)
    got = running_var_of(x, impl, route).double()[:ref.shape[0]]
    keep = M.sum(0) > 0  # a branch nobody uses keeps its running_var
    return ((got - ref).abs() / ref)[keep].max().item()


def available_impls():
    impls = [b for b in ("cpu", "eager", "triton")
             if not backends.not_supported_reasons(b, "multi_bn", "cpu")]
    return impls + ["F.batch_norm"]


def table(shape, dtype, layout, mode, ratios=RATIOS):
    """{ratio: {impl: relative error}}."""
    impls = available_impls()
    return {r: {i: relative_error(make_x(r, shape, dtype, layout), i, mode) for i in impls}
            for r in ratios}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="64,8,8,8")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--layout", default="nchw", choices=["nchw", "channels_last"])
    p.add_argument("--mode", default="routed", choices=["routed", "mixed"])
    a = p.parse_args()
    shape = tuple(int(s) for s in a.shape.split(","))
    t = table(shape, getattr(torch, a.dtype), a.layout, a.mode)
    impls = list(next(iter(t.values())))
    print(f"relative error of running_var, {a.dtype}, {a.layout}, {a.mode}, x {shape}")
    print("| mean / std | " + " | ".join(impls) + " |")
    print("|---" * (len(impls) + 1) + "|")
    for r, row in t.items():
        print(f"| {r:.0e} | " + " | ".join(f"{row[i]:.1e}" for i in impls) + " |")


if __name__ == "__main__":
    main()
