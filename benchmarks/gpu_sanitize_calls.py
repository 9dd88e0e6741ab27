"""Small calls that together launch every GPU kernel of the package once, for
compute-sanitizer (benchmarks/gpu_validate.sh runs this file under --tool memcheck, initcheck
and racecheck and fails the step on any report):

  Triton   routed / mixed BN, training and eval, with and without every extra (input scale,
           FiLM, ReLU), NCHW and channels_last, planes split along S and one-value planes
           (fp32; one case of each kind in bf16 and fp64); the synchronized BN's three kernels (an identity all-reduce:
           one process); FiLM [N, C] and [C] (direct and split reductions); add_relu; the PGD
           steps (linf, l2 and MI-FGSM, one program per sample and split), pgd_init
Run as the dispatcher runs them (the default): every call twice, so the first records its
launch plan through the Python launcher and the second is replayed from C++ (csrc/launch/plans.cpp);
`--backend triton` forces the Python launchers instead.

Sizes are small: the sanitizer runs kernels 10-100x slower. Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1
so every tensor is a fresh allocation (with the caching allocator a read of memory nothing
wrote in this call can look initialized, written by an earlier tensor there).

    python benchmarks/gpu_sanitize_calls.py [--backend default|triton]

(`TRITON_INTERPRET=1 ... --device cpu --backend triton` runs the same calls on the CPU, to
check the script itself.)
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from fastrobust import backends, functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import op_table  # noqa: E402 - the tests' table of ops (tests/op_table.py)

DEV = "cuda"


def bn_calls(dtype=torch.float32, full=True):
    """Routed (K=3) and mixed (K=2), training and eval, extras on and off (channels_last
    with them), at a spatial size the reduction splits (N·C small), one-value planes and an
    awkward 2×3×33×33; `full=False`: one case of each kind (the other dtypes)."""
    g = torch.Generator(device=DEV).manual_seed(0)
    shapes = ((8, 24, 8), (4, 40, 1), (2, 3, 33)) if full else ((8, 24, 8),)
    for mixed, training, extras, (N, C, H) in itertools.product(
            (False, True), (True, False), (False, True), shapes):
        K, cl = (2 if mixed else 3), extras
        x = torch.randn(N, C, H, H, device=DEV, generator=g).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        w = torch.randn(K, C, device=DEV, generator=g, requires_grad=True)
        b = torch.randn(K, C, device=DEV, generator=g, requires_grad=True)
        rm = torch.zeros(K, C, device=DEV)
        rv = torch.ones(K, C, device=DEV)
        nbt = torch.zeros(K, dtype=torch.long, device=DEV)
        kw = dict(training=training, num_batches_tracked=nbt, momentum=None)
        leaves = [x, w, b]
        if extras:
            ext = [(torch.rand(N, C, device=DEV, generator=g) + .5).requires_grad_()
                   for _ in range(3)]
            kw.update(input_scale=ext[0], film_gamma=ext[1], film_beta=ext[2],
                      activation="relu")
            leaves += ext
        if mixed:
            mix = torch.rand(N, K, device=DEV, generator=g).requires_grad_()
            y = F.mixed_batch_norm(x, mix, w, b, rm, rv, **kw)
            leaves.append(mix)
        else:
            br = torch.randint(0, K, (N,), device=DEV, generator=g)
            y = F.multi_batch_norm(x, br, w, b, rm, rv, num_branches=K, **kw)
        torch.autograd.grad(y, leaves, torch.randn_like(y))


def sync_calls():
    """The synchronized BN's four halves (the registered ops sync_multi_bn runs around its
    all-reduces), one rank of one: this rank's payload and sums are the all-reduced ones."""
    ops = torch.ops.fastrobust
    g = torch.Generator(device=DEV).manual_seed(1)
    for mixed, extras in itertools.product((False, True), (False, True)):
        N, C, K = 8, 24, 2
        x = torch.randn(N, C, 6, 6, device=DEV, generator=g)
        w, b = torch.randn(K, C, device=DEV, generator=g), torch.randn(K, C, device=DEV,
                                                                        generator=g)
        rm, rv = torch.zeros(K, C, device=DEV), torch.ones(K, C, device=DEV)
        nbt = torch.zeros(K, dtype=torch.long, device=DEV)
        branch = None if mixed else torch.randint(0, K, (N,), device=DEV, generator=g)
        mix = torch.rand(N, K, device=DEV, generator=g) if mixed else None
        ext = ([torch.rand(N, C, device=DEV, generator=g) + .5 for _ in range(3)]
               if extras else [None] * 3)
        pay, planes, old = ops.sync_bn_stats(x, branch, mix, ext[0], nbt, K, False, 0, 1)
        y, mean, invstd = ops.sync_bn_apply(x, branch, mix, w, b, rm, rv, nbt, *ext, pay, old,
                                            K, 0.1, False, 1e-5, extras)
        needs = (True, mixed, True, True, extras, extras, extras)
        dy = torch.randn_like(y)
        sums, parts, _, _ = ops.sync_bn_grad_sums(dy, x, branch, mix, w, b, mean, invstd,
                                                  *ext, K, extras, needs)
        ops.sync_bn_dx(dy, x, branch, mix, w, b, mean, invstd, planes, *ext, sums, parts, pay,
                       K, extras, needs)


def film_calls():
    g = torch.Generator(device=DEV).manual_seed(2)
    for (N, C, H), per_channel in itertools.product(((8, 16, 8), (2, 3, 40)), (False, True)):
        x = torch.randn(N, C, H, H, device=DEV, generator=g, requires_grad=True)
        shape = (C,) if per_channel else (N, C)
        gamma = torch.randn(shape, device=DEV, generator=g, requires_grad=True)
        beta = torch.randn(shape, device=DEV, generator=g, requires_grad=True)
        y = F.film(x, gamma, beta)
        torch.autograd.grad(y, (x, gamma, beta), torch.randn_like(y))
    a, b = (torch.randn(4, 8, 5, 5, device=DEV, generator=g) for _ in range(2))
    F.add_relu(a, b)


def pgd_calls(dtype=torch.float32, init=True):
    """One program per sample (N large) and the split forms (N small), per-sample eps."""
    g = torch.Generator(device=DEV).manual_seed(3)
    for N in (300, 4):
        xn = torch.rand(N, 3, 8, 8, device=DEV, generator=g).to(dtype)
        xa = xn.clone()
        grad = torch.randn(xn.shape, device=DEV, generator=g).to(dtype)
        eps = torch.full((N,), 8 / 255, device=DEV)
        for norm in ("linf", "l2"):
            F.pgd_step_(xa, grad, xn, eps, 2 / 255, norm=norm)
            if init:
                F.pgd_init(xn, 8 / 255, norm=norm)
        F.mifgsm_step_(xa, grad, torch.zeros_like(xa), xn, 8 / 255, 2 / 255)


def table_calls():
    """Each op's row of tests/op_table.py (every registered op, a new one with no edit here)."""
    for op in op_table.OPS.values():
        if op.kernel and not op.needs_group:
            op_table.run(op.name, op.args(0, torch.float32, device=DEV))


def run(backend: str | None):
    # the default twice: recorded, then replayed from C++ (the same signatures)
    for _ in range(2 if backend is None else 1):
        with backends.use(backend):
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                bn_calls(dtype, full=dtype == torch.float32)
                pgd_calls(dtype)
            film_calls()
            sync_calls()
            table_calls()
    if DEV == "cuda":
        torch.cuda.synchronize()


def main():
    global DEV
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="default", choices=["default", "triton"])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    DEV = args.device
    name = None if args.backend == "default" else args.backend
    why = backends.not_supported_reasons(name or "triton", "multi_bn", torch.device(DEV))
    if why:
        raise SystemExit(f"{args.backend}: cannot run ({'; '.join(why)})")
    run(name)
    if name is None and DEV == "cuda":
        from fastrobust import _C
        stats = _C._plan_stats()
        print(f"plans: {stats}; not replayed: {_C._plan_refusals()}")
    print(f"{args.backend}: every kernel launched")


if __name__ == "__main__":
    main()
