"""mixed_batch_norm against what users run today, at CIFAR ResNet shapes (N=128).

Baselines:
  eager_mix      K nn.BatchNorm2d over the whole batch and Σ_k mix[:, k]·BN_k(x) (AW-Net's
                 MixBN, AFA's generator mixing as written today; in training each BN uses the
                 whole batch's statistics, not mix-weighted ones: the form users write)
  compiled_mix   torch.compile of eager_mix
  multi_bn       the fused routed op at the same K (training only): the issue's bound,
                 mixed ≤ 1.3× multi_bn
  fused          fastrobust.functional.mixed_batch_norm (default backend: C++ on CPU)
fwd+bwd computes the gradients of x and mix (an attack through a MixBN model, AFA's
generator training).

Byte model (fp32): forward 2·|x|, forward+backward 5·|x| (see bench_batch_norm.py).
"""
import pytest
import torch
from torch import nn

from fastrobust import functional as F
from baselines import eager_mixed_bn
from conftest import QUICK, record

SHAPES = [(64, 16)] if QUICK else [(64, 32), (64, 16), (128, 16), (256, 8)]
N = 128
_compiled = {}


def make_impl(impl, C, K, training):
    if impl in ("fused", "multi_bn"):
        w, b = torch.ones(K, C, requires_grad=True), torch.zeros(K, C, requires_grad=True)
        rm, rv = torch.zeros(K, C), torch.ones(K, C) + torch.rand(K, C)
        nbt = torch.zeros(K, dtype=torch.long)
        if impl == "multi_bn":
            branch = torch.randint(0, K, (N,))
            return lambda x, mix: F.multi_batch_norm(x, branch, w, b, rm, rv, training=training,
                                                     num_batches_tracked=nbt)
        return lambda x, mix: F.mixed_batch_norm(x, mix, w, b, rm, rv, training=training,
                                                 num_batches_tracked=nbt)
    bns = nn.ModuleList(nn.BatchNorm2d(C) for _ in range(K)).train(training)
    if impl == "eager_mix":
        return lambda x, mix: eager_mixed_bn(x, mix, bns)
    fn = _compiled.setdefault("fn", torch.compile(eager_mixed_bn))
    return lambda x, mix: fn(x, mix, bns)


@pytest.mark.parametrize("impl", ["fused", "multi_bn", "eager_mix", "compiled_mix"])
@pytest.mark.parametrize("K", [2, 5])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("C,H", SHAPES, ids=[f"C{c}_{h}x{h}" for c, h in SHAPES])
def test_mixed_bn(benchmark, impl, K, training, mode, C, H):
    if impl == "multi_bn" and not training:
        pytest.skip("the routed op is the reference point for training mode")
    if not training and K != 2:
        pytest.skip("eval: K=2 (AW-Net's MixBN, AFA's two kept branches)")
    torch._dynamo.reset()
    _compiled.clear()
    fn = make_impl(impl, C, K, training)
    grad = mode == "fwd+bwd"
    x = torch.randn(N, C, H, H, requires_grad=grad)
    mix = torch.rand(N, K).requires_grad_(grad)
    gy = torch.randn_like(x)
    benchmark.group = (f"mixed_bn N{N} C{C} {H}x{H} K{K} {'train' if training else 'eval'} "
                       f"{mode}")
    record(benchmark, impl=impl, nbytes=x.numel() * 4 * (5 if grad else 2),
           tensor_bytes=x.numel() * 4, fused=(impl == "fused"))

    if grad:
        def run():
            x.grad = mix.grad = None
            fn(x, mix).backward(gy)
    else:
        def run():
            with torch.no_grad():
                return fn(x, mix)
    run()  # warm-up (compiles the torch.compile baseline outside the timing)
    benchmark(run)
