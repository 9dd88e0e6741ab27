"""Every op on every device this machine has, through its default dispatch (CPU tensors: the
C++ kernels; CUDA tensors: the Triton kernels), against the fp64 reference on the CPU: forward,
running statistics and every gradient. Here (no GPU) the cuda cases skip and the cpu cases
check the tests themselves; on a GPU, `benchmarks/gpu_validate.sh` runs this file with
TRITON_INTERPRET=0, so the compiled kernels are what is checked."""
from __future__ import annotations

import pytest
import torch

from fastrobust import functional as F, reference

# fp32: the kernels reduce a few hundred values per (branch, channel) in another order than
# the reference (≈ sqrt(n)·2^-24 relative), and on a GPU fp32 division is div.full (≈ 2 ulp)
# and multiply-adds fuse: 1e-4 relative on values of order 1, 2e-5 absolute near zero.
F32 = dict(rtol=1e-4, atol=2e-5)
# bf16 output: one rounding to 8 significant bits (2^-8 relative) of a value computed in fp32.
BF16 = dict(rtol=2 ** -7, atol=2 ** -7)


def _leaf(t, device):
    return t.detach().to(device).requires_grad_()


def _check_bn(device, mixed, channels_last, extras):
    N, C, K = 8, 16, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, 6, 6, generator=g, dtype=torch.float64) * 2 + 1
    route = (torch.rand(N, K, generator=g, dtype=torch.float64) if mixed
             else torch.randint(0, K, (N,), generator=g))
    w = torch.rand(K, C, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(K, C, generator=g, dtype=torch.float64)
    ext = [torch.rand(N, C, generator=g, dtype=torch.float64) + 0.5 for _ in range(3)]
    dy = torch.randn(N, C, 6, 6, generator=g, dtype=torch.float64)
    rm0 = torch.randn(K, C, generator=g, dtype=torch.float64)
    rv0 = torch.rand(K, C, generator=g, dtype=torch.float64) + 0.5

    def run(dev, dtype):
        xs = x.to(dtype)
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        leaves = [_leaf(t.to(dtype), dev) for t in (xs, w, b)]
        xe = [_leaf(t.to(dtype), dev) for t in ext] if extras else []
        r = _leaf(route.to(dtype), dev) if mixed else route.to(dev)
        rm, rv = (t.to(dtype).to(dev, copy=True) for t in (rm0, rv0))  # updated in place
        nbt = torch.zeros(K, dtype=torch.long, device=dev)
        kw = dict(training=True, momentum=0.1, num_batches_tracked=nbt)
        if extras:
            kw.update(input_scale=xe[0], film_gamma=xe[1], film_beta=xe[2],
                      activation="relu")
        lib = reference if dtype == torch.float64 else F
        if mixed:
            y = lib.mixed_batch_norm(leaves[0], r, leaves[1], leaves[2], rm, rv, **kw)
        else:
            y = lib.multi_batch_norm(leaves[0], r, leaves[1], leaves[2], rm, rv,
                                     num_branches=K, **kw)
        inputs = leaves + xe + ([r] if mixed else [])
        grads = torch.autograd.grad(y, inputs, dy.to(dtype).to(dev))
        return [t.cpu().double() for t in (y, rm, rv, *grads)] + [nbt.cpu()]

    want = run("cpu", torch.float64)
    got = run(device, torch.float32)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    for i, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, **F32, msg=lambda m: f"output {i}: {m}")


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "scale_film_relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
def test_bn_on_device(device, mixed, channels_last, extras):
    _check_bn(device, mixed, channels_last, extras)


def test_bn_bf16_forward_on_device(device):
    """bf16 in and out, statistics in fp32: the output within one bf16 rounding of the fp64
    reference on the same (bf16) values."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 8, 5, 5, generator=g) * 2 + 1).bfloat16()
    branch = torch.randint(0, 2, (16,), generator=g)
    w, b = torch.rand(2, 8, generator=g) + 0.5, torch.randn(2, 8, generator=g)
    y = F.multi_batch_norm(x.to(device), branch.to(device), w.to(device), b.to(device),
                           training=True, num_branches=2)
    assert y.dtype == torch.bfloat16
    want = reference.multi_batch_norm(x.double(), branch, w.double(), b.double(),
                                      training=True, num_branches=2)
    torch.testing.assert_close(y.cpu().double(), want, **BF16)


@pytest.mark.parametrize("per_channel", [False, True], ids=["NxC", "C"])
def test_film_on_device(device, per_channel):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 5, 5, generator=g, dtype=torch.float64)
    shape = (6,) if per_channel else (4, 6)
    gamma, beta = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    dy = torch.randn_like(x)

    def run(dev, dtype, fn):
        leaves = [_leaf(t.to(dtype), dev) for t in (x, gamma, beta)]
        y = fn(*leaves)
        return [t.cpu().double() for t in (y, *torch.autograd.grad(y, leaves,
                                                                   dy.to(dtype).to(dev)))]

    want = run("cpu", torch.float64, reference.film)
    for a, e in zip(run(device, torch.float32, F.film), want):
        torch.testing.assert_close(a, e, **F32)


@pytest.mark.parametrize("per_sample", [False, True], ids=["float_eps", "per_sample_eps"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_on_device(device, norm, per_sample):
    """linf: torchattacks' order of operations, bitwise (α·sign(g) is exact, so a fused
    multiply-add rounds the same); l2: per-sample norms reduced in another order, 1e-6."""
    g = torch.Generator().manual_seed(3)
    x_nat = torch.rand(4, 3, 16, 16, generator=g)
    x_adv = (x_nat + 0.02 * torch.randn(x_nat.shape, generator=g)).clamp(0, 1)
    grad = torch.randn(x_nat.shape, generator=g)
    eps = torch.tensor([0.0, 0.01, 0.03, 0.1]) if per_sample else 0.03
    alpha = 0.01 if norm == "linf" else 0.5
    want = reference.pgd_step(x_adv, grad, x_nat, eps, alpha, norm=norm)
    e = eps.to(device) if per_sample else eps
    got = F.pgd_step_(x_adv.to(device), grad.to(device), x_nat.to(device), e, alpha,
                      norm=norm)
    tol = dict(rtol=0, atol=0) if norm == "linf" else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.cpu(), want, **tol)


def test_mifgsm_step_on_device(device):
    g = torch.Generator().manual_seed(4)
    x_nat = torch.rand(4, 3, 16, 16, generator=g)
    x_adv = (x_nat + 0.02 * torch.randn(x_nat.shape, generator=g)).clamp(0, 1)
    grad, buf = torch.randn(x_nat.shape, generator=g), torch.randn(x_nat.shape, generator=g)
    want_x, want_buf = reference.mifgsm_step(x_adv, grad, buf, x_nat, 0.03, 0.01, 1.0)
    bd = buf.to(device)
    got = F.mifgsm_step_(x_adv.to(device), grad.to(device), bd, x_nat.to(device), 0.03, 0.01)
    # the momentum: a per-sample mean of |g| reduced in another order (fp32, 1e-6); the step
    # takes its sign, so x_adv is exact except where the buffer is within that of 0 (none here)
    torch.testing.assert_close(bd.cpu(), want_buf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.cpu(), want_x, rtol=0, atol=0)


def test_add_relu_on_device(device):
    """relu(a + b) bitwise, its gradient the mask (one rounding, no reduction)."""
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(4, 8, 5, 5, generator=g) for _ in range(2))
    dy = torch.randn(4, 8, 5, 5, generator=g)
    la, lb = _leaf(a, device), _leaf(b, device)
    y = F.add_relu(la, lb)
    ga, gb = torch.autograd.grad(y, (la, lb), dy.to(device))
    ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = torch.relu(ra + rb)
    wa, wb = torch.autograd.grad(want, (ra, rb), dy)
    for got, exp in ((y, want), (ga, wa), (gb, wb)):
        torch.testing.assert_close(got.cpu(), exp, rtol=0, atol=0)
