"""On a GPU: the CUDA C++ backend against the Triton one (the default) on CUDA tensors, for the
BN family (routed / mixed, every extra, training and eval, NCHW and channels_last, fp32 and
bf16) and the PGD steps; with --sanitize, only a few small calls (for compute-sanitizer).
Run by benchmarks/gpu_validate.sh; exits 1 on a mismatch.

    python benchmarks/gpu_cuda_vs_triton.py [--sanitize]
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from fastrobust import backends, functional as F

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4),   # fp32 statistics, different sum orders
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}  # bf16 outputs: 8 mantissa bits


def bn_case(mixed, extras, training, cl, dtype, shape=(16, 32, 8, 8), K=3):
    g = torch.Generator(device="cuda").manual_seed(0)
    N, C = shape[:2]
    x = torch.randn(shape, device="cuda", generator=g).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(K, C, device="cuda", generator=g, requires_grad=True)
    b = torch.randn(K, C, device="cuda", generator=g, requires_grad=True)
    kw = dict(training=training)
    if extras:
        kw.update(input_scale=(torch.rand(N, C, device="cuda", generator=g) + .5).to(dtype)
                  .requires_grad_(), film_gamma=torch.randn(N, C, device="cuda", generator=g)
                  .to(dtype).requires_grad_(),
                  film_beta=torch.randn(N, C, device="cuda", generator=g).to(dtype)
                  .requires_grad_(), activation="relu")
    route = (torch.rand(N, K, device="cuda", generator=g).requires_grad_() if mixed
             else torch.randint(0, K, (N,), device="cuda", generator=g))
    dy = torch.randn(shape, device="cuda", generator=g).to(dtype)

    def run():
        rm, rv = torch.zeros(K, C, device="cuda"), torch.ones(K, C, device="cuda")
        fn = F.mixed_batch_norm if mixed else F.multi_batch_norm
        y = fn(x, route, w, b, rm, rv, **kw)
        leaves = [t for t in (x, w, b, route, kw.get("input_scale"), kw.get("film_gamma"),
                              kw.get("film_beta")) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, leaves, dy)
        return [y, rm, rv, *grads]
    return run


def pgd_case(norm, dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    xn = torch.rand(16, 3, 32, 32, device="cuda", generator=g).to(dtype)
    xa0 = (xn + 0.01 * torch.randn(xn.shape, device="cuda", generator=g).to(dtype)).clamp(0, 1)
    grad = torch.randn(xn.shape, device="cuda", generator=g).to(dtype)

    def run():
        xa = xa0.clone()
        if norm == "mifgsm":
            m = torch.zeros_like(xa)
            F.mifgsm_step_(xa, grad, m, xn, 8 / 255, 2 / 255)
            return [xa, m]
        F.pgd_step_(xa, grad, xn, 8 / 255, 2 / 255, norm=norm)
        return [xa]
    return run


def compare(name, run, tol) -> bool:
    ref = run()
    with backends.use("cuda"):
        out = run()
    ok = True
    for i, (a, b) in enumerate(zip(out, ref)):
        try:
            torch.testing.assert_close(a.float(), b.float(), **tol)
        except AssertionError as e:
            print(f"MISMATCH {name} output {i}: {str(e).splitlines()[1:3]}")
            ok = False
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sanitize", action="store_true")
    args = ap.parse_args()
    if backends.not_supported_reasons("cuda", "multi_bn", "cuda"):
        print("cuda backend unavailable:", backends.not_supported_reasons("cuda", "multi_bn",
                                                                          "cuda"))
        sys.exit(1)
    if args.sanitize:
        with backends.use("cuda"):
            for run in (bn_case(False, True, True, False, torch.float32, (4, 8, 4, 4)),
                        bn_case(True, True, True, True, torch.float32, (4, 8, 4, 4)),
                        pgd_case("linf", torch.float32), pgd_case("l2", torch.float32),
                        pgd_case("mifgsm", torch.float32)):
                run()
        torch.cuda.synchronize()
        print("ok")
        return
    ok, n = True, 0
    for mixed, extras, training, cl, dtype in itertools.product(
            (False, True), (False, True), (True, False), (False, True),
            (torch.float32, torch.bfloat16)):
        name = f"bn mixed={mixed} extras={extras} training={training} cl={cl} {dtype}"
        ok &= compare(name, bn_case(mixed, extras, training, cl, dtype), TOL[dtype])
        n += 1
    for norm in ("linf", "l2", "mifgsm"):
        ok &= compare(f"pgd {norm}", pgd_case(norm, torch.float32), TOL[torch.float32])
        n += 1
    print(f"{n} cases, {'all match' if ok else 'MISMATCHES above'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
