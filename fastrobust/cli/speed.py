"""`fastrobust speed`: dual BN in a small ResNet against the OAT repository's eager form,
timed on this machine."""
from __future__ import annotations

import statistics
import time

import torch

from ..models import resnet18
from ..models.oat_eager import oat_dual_bn, to_eager_dual_bn
from ..nn import DualBatchNorm2d, MultiBatchNorm2d, convert_multi_bn, routing


def _median_ms(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def speed(args) -> int:
    """Converts a small ResNet to dual BN, trains it a few steps on clean and perturbed halves of
    a batch, and compares the step time with the OAT-style eager dual BN."""
    torch.manual_seed(0)
    B, width = args.batch, args.width
    print(f"\n1. A CIFAR ResNet-18 (width {width}) with nn.BatchNorm2d, converted to dual BN")
    model = resnet18(width=width)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model = convert_multi_bn(model, num_branches=2)
    n_dual = sum(isinstance(m, MultiBatchNorm2d) for m in model.modules())
    print(f"   {n_bn} nn.BatchNorm2d -> {n_dual} MultiBatchNorm2d (2 branches: clean, adv)")

    # Clean images and a perturbed copy (a stand-in for adversarial examples: ±8/255 noise).
    x = torch.rand(B, 3, 32, 32)
    y = torch.randint(0, 10, (B,))
    x_adv = (x + 8 / 255 * torch.randn_like(x).sign()).clamp(0, 1)
    batch = torch.cat([x, x_adv])
    branch = torch.cat([torch.full((B,), DualBatchNorm2d.CLEAN),
                        torch.full((B,), DualBatchNorm2d.ADV)])
    target = torch.cat([y, y])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def fused_step():
        with routing(model, branch=branch):
            loss = torch.nn.functional.cross_entropy(model(batch), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    print(f"\n2. Training steps on a batch of {B} clean + {B} perturbed 32x32 images")
    for step in range(args.steps):
        loss = fused_step()
        print(f"   step {step + 1}/{args.steps}  loss {loss.item():.4f}")
    bn = model.bn1
    gap = (bn.running_var[1] - bn.running_var[0]).abs().mean().item()
    print(f"   first BN: clean and adv branches keep their own statistics "
          f"(mean |running_var gap| {gap:.2e}; counters {bn.num_batches_tracked.tolist()})")

    print("\n3. Speed (median ms, this machine)")
    eager = to_eager_dual_bn(resnet18(width=width))
    for m in eager.modules():
        if hasattr(m, "n_clean"):
            m.n_clean = B
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)

    def eager_step():
        loss = torch.nn.functional.cross_entropy(eager(batch), target)
        opt_e.zero_grad(set_to_none=True)
        loss.backward()
        opt_e.step()

    rows = []
    t_fused = _median_ms(fused_step, args.timing_steps)
    t_eager = _median_ms(eager_step, args.timing_steps)
    rows.append((f"ResNet-18 w{width} train step, batch {2 * B}", t_eager, t_fused))

    N, C, H = 128, 64, 16
    xb = torch.randn(N, C, H, H, requires_grad=True)
    gy = torch.randn_like(xb)
    br = torch.cat([torch.zeros(N // 2), torch.ones(N // 2)]).long()
    bns = [torch.nn.BatchNorm2d(C), torch.nn.BatchNorm2d(C)]
    dual = DualBatchNorm2d(C)

    def bn_eager():
        xb.grad = None
        oat_dual_bn(xb, N // 2, *bns).backward(gy)

    def bn_fused():
        xb.grad = None
        dual(xb, branch=br).backward(gy)

    rows.append((f"dual BN fwd+bwd, {N}x{C}x{H}x{H}", _median_ms(bn_eager, 20),
                 _median_ms(bn_fused, 20)))
    print(f"   {'':<40}{'OAT-style eager':>16}{'fastrobust':>12}{'speedup':>9}")
    for name, te, tf in rows:
        print(f"   {name:<40}{te:>16.2f}{tf:>12.2f}{te / tf:>8.2f}x")
    print("\n   (the ResNet step is dominated by convolutions; the BN row isolates the op)")
    return 0
