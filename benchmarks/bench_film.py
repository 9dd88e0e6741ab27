"""FiLM and the fused extras of the BN ops against what users run today (N=128).

Groups:
  bn_film_relu   OAT's block tail. fused: multi_batch_norm with dual routing (K=2), FiLM γ, β
                 and ReLU in one op. Baselines: eager_bn_film_relu (one nn.BatchNorm2d → FiLM
                 expression → ReLU: three modules, no routing at all), oat_dual_film_relu (the
                 OAT dual BN → FiLM → ReLU), and torch.compile of each.
  scaled_bn      AW-Net's filter scaling before a dual BN. fused: multi_batch_norm with
                 input_scale=ω. Baselines: eager_scaled_bn (conv output × ω written, then the
                 OAT dual BN), and its torch.compile.
  film           the standalone op: fused film against the broadcasting expression and its
                 torch.compile.
Byte model (fp32): forward 2·|x|, forward+backward 5·|x| (see bench_batch_norm.py).
"""
import pytest
import torch
from torch import nn

from fastrobust import functional as F
from baselines import eager_bn_film_relu, eager_film, eager_scaled_bn, oat_dual_bn
from conftest import QUICK, record

SHAPES = [(64, 16)] if QUICK else [(64, 32), (64, 16), (128, 16), (256, 8)]
N = 128


def _dual_bn(C):
    bn0, bn1 = nn.BatchNorm2d(C), nn.BatchNorm2d(C)
    return lambda x: oat_dual_bn(x, N // 2, bn0, bn1)


def _oat_dual_film_relu(x, dual, gamma, beta):
    return torch.relu(eager_film(dual(x), gamma, beta))


def make_impl(group, impl, C):
    """fn(x, a, b): a, b are γ, β (bn_film_relu, film) or ω, unused (scaled_bn)."""
    branch = torch.cat([torch.zeros(N // 2), torch.ones(N // 2)]).long()
    w, b0 = torch.ones(2, C, requires_grad=True), torch.zeros(2, C, requires_grad=True)
    rm, rv, nbt = torch.zeros(2, C), torch.ones(2, C), torch.zeros(2, dtype=torch.long)
    compiled = impl.startswith("compiled_")
    name = impl.removeprefix("compiled_")
    if group == "bn_film_relu":
        if name == "fused":
            return lambda x, g, b: F.multi_batch_norm(
                x, branch, w, b0, rm, rv, training=True, num_batches_tracked=nbt,
                film_gamma=g, film_beta=b, activation="relu")
        if name == "eager_bn_film_relu":
            bn = nn.BatchNorm2d(C)
            fn = torch.compile(eager_bn_film_relu) if compiled else eager_bn_film_relu
            return lambda x, g, b: fn(x, bn, g, b)
        dual = _dual_bn(C)
        fn = torch.compile(_oat_dual_film_relu) if compiled else _oat_dual_film_relu
        return lambda x, g, b: fn(x, dual, g, b)
    if group == "scaled_bn":
        if name == "fused":
            return lambda x, om, _: F.multi_batch_norm(x, branch, w, b0, rm, rv, training=True,
                                                       num_batches_tracked=nbt, input_scale=om)
        dual = _dual_bn(C)
        fn = torch.compile(eager_scaled_bn) if compiled else eager_scaled_bn
        return lambda x, om, _: fn(x, om, dual)
    if name == "fused":
        return F.film
    return torch.compile(eager_film) if compiled else eager_film


IMPLS = {
    "bn_film_relu": ["fused", "eager_bn_film_relu", "oat_dual_film_relu",
                     "compiled_eager_bn_film_relu", "compiled_oat_dual_film_relu"],
    "scaled_bn": ["fused", "eager_scaled_bn", "compiled_eager_scaled_bn"],
    "film": ["fused", "eager_film", "compiled_eager_film"],
}
CASES = [(g, i) for g, impls in IMPLS.items() for i in impls]


@pytest.mark.parametrize("group,impl", CASES, ids=[f"{g}-{i}" for g, i in CASES])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("C,H", SHAPES, ids=[f"C{c}_{h}x{h}" for c, h in SHAPES])
def test_film_family(benchmark, group, impl, mode, C, H):
    torch._dynamo.reset()
    fn = make_impl(group, impl, C)
    grad = mode == "fwd+bwd"
    x = torch.randn(N, C, H, H, requires_grad=grad)
    a = (torch.rand(N, C) + 0.5).requires_grad_(grad)
    b = torch.randn(N, C, requires_grad=grad)
    gy = torch.randn_like(x)
    benchmark.group = f"{group} N{N} C{C} {H}x{H} {mode}"
    record(benchmark, impl=impl, nbytes=x.numel() * 4 * (5 if grad else 2),
           tensor_bytes=x.numel() * 4, fused=(impl == "fused"))

    if grad:
        def run():
            x.grad = a.grad = b.grad = None
            fn(x, a, b).backward(gy)
    else:
        def run():
            with torch.no_grad():
                return fn(x, a, b)
    run()  # warm-up (compiles the torch.compile baselines outside the timing)
    benchmark(run)
