"""The fused PGD steps and a whole PGD-10 attack against the torchattacks forms (fp32, CPU).

Groups:
  linf_step    fused: pgd_step_ in place (no allocation). Baselines: eager_torchattacks (the
               torchattacks update in eager PyTorch: three temporaries and a new result) and
               its torch.compile. Byte model: read x_adv, grad, x_nat, write x_adv = 16 B/elem.
  l2_step      fused: pgd_step_(norm="l2"); baselines torchattacks' PGDL2 update and its
               compile. Same byte model (the kernel's second read of a sample hits cache).
  mifgsm_step  fused: mifgsm_step_; baselines torchattacks' MIFGSM update and its compile.
               Byte model: read x_adv, grad, momentum, x_nat, write x_adv, momentum = 24 B/elem.
  pgd10_attack a whole PGD-10 (linf, 8/255, 2/255) on a CIFAR ResNet-18 of width 8 in eval
               mode, batch 128×3×32×32. fused: fastrobust.attacks.PGD (default: the model sees
               channels_last inputs); fused_nchw: the same attack in x's own layout (only the
               step is fused); eager_torchattacks: torchattacks' loop. Byte model: none (the
               convolutions dominate); compare the medians.
  pgd10_dual   the same attack on the dual-BN form of that ResNet (every sample through the
               adversarial branch, as OAT attacks): fused: convert_multi_bn + PGD(branch=1);
               eager_oat_dual: the OAT repository's dual BN (slice, two BNs, cat) attacked by
               torchattacks' loop.
"""
import pytest
import torch

from fastrobust import functional as F
from fastrobust.attacks import PGD
from baselines import (to_eager_dual_bn, torchattacks_l2_step,
                                  torchattacks_mifgsm_step, torchattacks_pgd, torchattacks_step)
from fastrobust.models import resnet18
from fastrobust.nn import convert_multi_bn
from conftest import QUICK, record

SHAPES = [(8, 3, 32, 32)] if QUICK else [(128, 3, 32, 32), (256, 3, 64, 64)]
EPS, ALPHA = 8 / 255, 2 / 255


def make_impl(group, impl):
    compiled = impl.startswith("compiled_")
    if group == "linf_step":
        if impl == "fused":
            return lambda adv, g, x, m: F.pgd_step_(adv, g, x, EPS, ALPHA)
        fn = torch.compile(torchattacks_step) if compiled else torchattacks_step
        return lambda adv, g, x, m: fn(adv, g, x, EPS, ALPHA)
    if group == "l2_step":
        if impl == "fused":
            return lambda adv, g, x, m: F.pgd_step_(adv, g, x, 0.5, 0.1, norm="l2")
        fn = torch.compile(torchattacks_l2_step) if compiled else torchattacks_l2_step
        return lambda adv, g, x, m: fn(adv, g, x, 0.5, 0.1)
    if impl == "fused":
        return lambda adv, g, x, m: F.mifgsm_step_(adv, g, m, x, EPS, ALPHA, 1.0)
    fn = torch.compile(torchattacks_mifgsm_step) if compiled else torchattacks_mifgsm_step
    return lambda adv, g, x, m: fn(adv, g, m, x, EPS, ALPHA)


IMPLS = ["fused", "eager_torchattacks", "compiled_eager_torchattacks"]
STEP_CASES = [(g, i) for g in ("linf_step", "l2_step", "mifgsm_step") for i in IMPLS]


@pytest.mark.parametrize("group,impl", STEP_CASES, ids=[f"{g}-{i}" for g, i in STEP_CASES])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_step(benchmark, group, impl, shape):
    torch._dynamo.reset()
    fn = make_impl(group, impl)
    x = torch.rand(shape)
    adv = (x + EPS * (2 * torch.rand(shape) - 1)).clamp(0, 1)
    g, m = torch.randn(shape), torch.randn(shape)
    benchmark.group = f"{group} {'x'.join(map(str, shape))}"
    per_elem = 24 if group == "mifgsm_step" else 16
    record(benchmark, impl=impl, nbytes=x.numel() * per_elem, tensor_bytes=x.numel() * 4,
           fused=impl == "fused")
    fn(adv, g, x, m)  # warm-up (compiles the torch.compile baselines outside the timing)
    benchmark(fn, adv, g, x, m)


ATTACK_CASES = [("pgd10_attack", i) for i in ("fused", "fused_nchw", "eager_torchattacks")] + [
    ("pgd10_dual", i) for i in ("fused", "eager_oat_dual")]


@pytest.mark.parametrize("group,impl", ATTACK_CASES, ids=[f"{g}-{i}" for g, i in ATTACK_CASES])
def test_pgd10_attack(benchmark, group, impl):
    n, width, steps = (8, 4, 2) if QUICK else (128, 8, 10)
    model = resnet18(width=width).eval()
    x, y = torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,))
    start = F.pgd_init(x, EPS, generator=torch.Generator().manual_seed(0))
    if impl.startswith("eager"):
        if group == "pgd10_dual":  # n_clean = 0: every sample through bn_adv
            model = to_eager_dual_bn(model).eval()

        def run():
            return torchattacks_pgd(model, x, y, EPS, ALPHA, steps, start)
    else:
        fmt = None if impl == "fused" else torch.preserve_format
        kw = {}
        if group == "pgd10_dual":
            model, kw = convert_multi_bn(model, 2).eval(), {"branch": 1}
        atk = PGD(model, EPS, ALPHA, steps, memory_format=fmt)

        def run():
            return atk(x, y, **kw)
    benchmark.group = f"{group} ResNet-18/w{width} {n}x3x32x32, {steps} steps"
    record(benchmark, impl=impl, nbytes=0, tensor_bytes=0, fused=impl == "fused")
    run()
    benchmark.pedantic(run, rounds=3 if QUICK else 15, iterations=1, warmup_rounds=0)
