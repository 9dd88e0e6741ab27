"""The eager forms users write today, the baselines of the benchmarks (and of a few tests).

These are deliberately the slow, straightforward versions: each branch's samples are sliced or
gathered out, run through their own nn.BatchNorm2d, and put back together.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from fastrobust.models.oat_eager import (EagerDualBatchNorm2d, oat_dual_bn,  # noqa: F401
                                        to_eager_dual_bn)


def eager_kway_bn(x: Tensor, indices: list[Tensor], bns) -> Tensor:
    """K-way routing with index_select / index_copy: `indices[k]` holds branch k's samples
    (computed per batch with a nonzero(), i.e. a host sync, in real code)."""
    out = torch.empty_like(x)
    for idx, bn in zip(indices, bns):
        out = out.index_copy(0, idx, bn(x.index_select(0, idx)))
    return out


def eager_mixed_bn(x: Tensor, mix: Tensor, bns) -> Tensor:
    """AW-Net's / AFA's soft mixing as written today: every BN over the whole batch, then the
    per-sample weighted sum Σ_k mix[:, k]·BN_k(x) (K full passes plus K multiply-adds)."""
    out = 0
    for k, bn in enumerate(bns):
        out = out + mix[:, k, None, None, None] * bn(x)
    return out


def eager_film(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """FiLM as a broadcasting expression (OAT's FiLM layer)."""
    return x * gamma[:, :, None, None] + beta[:, :, None, None]


def eager_bn_film_relu(x: Tensor, bn: nn.Module, gamma: Tensor, beta: Tensor) -> Tensor:
    """OAT's block tail as three modules: BN, then FiLM, then ReLU (three passes)."""
    return torch.relu(eager_film(bn(x), gamma, beta))


def eager_scaled_bn(y: Tensor, omega: Tensor, bn: nn.Module) -> Tensor:
    """AW-Net's filter scaling as written today: the conv output times ω[n, c] is written to
    memory, then normalized."""
    return bn(y * omega[:, :, None, None])


# --- the torchattacks forms of the attack steps (their order of operations, in eager PyTorch) --

def torchattacks_step(adv: Tensor, grad: Tensor, images: Tensor, eps, alpha,
                      clip_min: float = 0.0, clip_max: float = 1.0) -> Tensor:
    """torchattacks' PGD (linf) update: three temporaries and a fresh result each step. eps
    may be a per-sample [N, 1, ...] tensor (torch.clamp takes tensor bounds)."""
    adv = adv.detach() + alpha * grad.sign()
    delta = torch.clamp(adv - images, min=-eps, max=eps)
    return torch.clamp(images + delta, min=clip_min, max=clip_max).detach()


def torchattacks_l2_step(adv: Tensor, grad: Tensor, images: Tensor, eps: float,
                         alpha: float) -> Tensor:
    """torchattacks' PGDL2 update (its 1e-10 added to the gradient norm)."""
    n = adv.shape[0]
    grad_norms = torch.norm(grad.view(n, -1), p=2, dim=1) + 1e-10
    grad = grad / grad_norms.view(n, *([1] * (adv.dim() - 1)))
    adv = adv.detach() + alpha * grad
    delta = adv - images
    delta_norms = torch.norm(delta.view(n, -1), p=2, dim=1)
    factor = torch.min(eps / delta_norms, torch.ones_like(delta_norms))
    delta = delta * factor.view(-1, *([1] * (adv.dim() - 1)))
    return torch.clamp(images + delta, min=0, max=1).detach()


def torchattacks_mifgsm_step(adv: Tensor, grad: Tensor, momentum: Tensor, images: Tensor,
                             eps: float, alpha: float, decay: float = 1.0):
    """torchattacks' MIFGSM update; returns (adv, momentum)."""
    dims = tuple(range(1, adv.dim()))
    grad = grad / torch.mean(torch.abs(grad), dim=dims, keepdim=True)
    grad = grad + momentum * decay
    return torchattacks_step(adv, grad, images, eps, alpha), grad


def torchattacks_pgd(model: nn.Module, images: Tensor, labels: Tensor, eps: float = 8 / 255,
                     alpha: float = 2 / 255, steps: int = 10, start: Tensor | None = None
                     ) -> Tensor:
    """torchattacks' PGD loop in eager PyTorch (cross-entropy, input gradients with
    torch.autograd.grad). `start`: the random start, else torchattacks' own U(−ε, ε) draw."""
    images = images.detach()
    if start is None:
        start = torch.clamp(images + torch.empty_like(images).uniform_(-eps, eps), 0, 1)
    return torchattacks_loop(model, images, labels, start.detach(), eps, alpha, steps)


@contextlib.contextmanager
def attacking(model: nn.Module):
    """What attack code does around its loop, the eager way: eval mode and parameters frozen
    for the body, both restored after."""
    was = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was)


def torchattacks_loop(forward, x: Tensor, y: Tensor, start: Tensor, eps, alpha,
                      steps: int) -> Tensor:
    """torchattacks' PGD loop from ``start``: mean CE of ``forward(adv)``, one
    `torchattacks_step` per iteration."""
    adv = start.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        cost = nn.functional.cross_entropy(forward(adv), y)
        grad = torch.autograd.grad(cost, adv)[0]
        adv = torchattacks_step(adv.detach(), grad, x, eps, alpha)
    return adv


# --- OAT as the OAT repository writes it (for the training-step benchmark) ------------------

def _oat_dual_bn_f(x: Tensor, n_clean: int, bn, training: bool) -> Tensor:
    """Dual BN in the OAT repository's style over a MultiBatchNorm2d's parameters: the batch is
    sorted clean-first, each slice goes through its own batch norm, results concatenated."""
    def one(part, k):
        return nn.functional.batch_norm(part, bn.running_mean[k], bn.running_var[k],
                                        bn.weight[k], bn.bias[k], training, bn.momentum, bn.eps)
    if bn.num_branches == 1:
        return one(x, 0)
    if n_clean == 0:
        return one(x, 1)
    if n_clean == x.shape[0]:
        return one(x, 0)
    return torch.cat([one(x[:n_clean], 0), one(x[n_clean:], 1)])


def _eager_film(film, h: Tensor, codes: Tensor) -> Tensor:
    """OAT's FiLM layer: the MLP runs on the per-sample λ codes in every forward."""
    g = film.mlp(codes)
    if film.activation == "leaky_relu":  # the repository's γ = leaky_relu(μ), β = leaky_relu(σ)
        g = nn.functional.leaky_relu(g, film.negative_slope)
    c = film.num_features
    return h * g[:, :c, None, None] + g[:, c:, None, None]


def eager_oat_forward(model, x: Tensor, codes: Tensor, n_clean: int) -> Tensor:
    """The forward of an `OATResNet` computed the way the OAT repository computes it, with
    the model's own parameters: slice + two BNs + cat for every dual BN, the FiLM MLPs run on
    the per-sample codes at every call, FiLM and ReLU as separate passes."""
    tr = model.training
    relu = torch.relu
    out = _oat_dual_bn_f(model.conv1(x), n_clean, model.bn1, tr)
    if getattr(model, "film1", None) is not None:  # the official variant's stem FiLM
        out = _eager_film(model.film1, out, codes)
    out = relu(out)
    for blk in model.layers:
        o = _eager_film(blk.film1, _oat_dual_bn_f(blk.conv1(out), n_clean, blk.bn1, tr), codes)
        o = relu(o)
        o = _eager_film(blk.film2, _oat_dual_bn_f(blk.conv2(o), n_clean, blk.bn2, tr), codes)
        sc = out if blk.shortcut is None else _oat_dual_bn_f(blk.shortcut[0](out), n_clean,
                                                             blk.shortcut[1], tr)
        out = relu(o + sc)
    return model.fc(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


def oat_linf_clamp(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The OAT repository's projection: boolean masks and masked assignment (a host sync and
    extra passes on a GPU)."""
    idx = x < lo
    x[idx] = lo[idx]
    idx = x > hi
    x[idx] = hi[idx]
    return x


def oat_pgd(forward, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int,
            start: Tensor) -> Tensor:
    """The OAT repository's PGD: summed cross-entropy, x_adv += α·sign(g), mask projection
    onto the ε-ball, clamp to [0, 1]; `forward` is the (eval-mode) model call."""
    x_adv = start.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = nn.functional.cross_entropy(forward(x_adv), y, reduction="sum")
        grad = torch.autograd.grad(loss, x_adv)[0]
        with torch.no_grad():
            x_adv = x_adv.detach() + alpha * torch.sign(grad)
            x_adv = torch.clamp(oat_linf_clamp(x_adv, x - eps, x + eps), 0, 1)
    return x_adv


def eager_oat_loss(model, x: Tensor, y: Tensor, lam: Tensor, eps: float, alpha: float,
                   steps: int, start: Tensor, forward=eager_oat_forward) -> Tensor:
    """OAT's loss of a batch sorted λ = 0 first, the OAT repository's way: per-sample codes,
    the clean forward over the batch, the attack in eval mode with parameter gradients off,
    the adversarial forward over the λ > 0 part. `start`: the random start of that part;
    `forward`: eager_oat_forward or a compiled version of it."""
    n_zero = int((lam == 0).sum())
    codes = model.encoding(lam)
    lc = nn.functional.cross_entropy(forward(model, x, codes, n_zero), y, reduction="none")
    la = torch.zeros_like(lc)
    if n_zero < len(y):
        xs, ys, cs = x[n_zero:], y[n_zero:], codes[n_zero:]
        with attacking(model):
            x_adv = oat_pgd(lambda z: forward(model, z, cs.detach(), 0), xs, ys, eps, alpha,
                            steps, start)
        la_adv = nn.functional.cross_entropy(forward(model, x_adv, cs, 0), ys, reduction="none")
        la = torch.cat([la[:n_zero], la_adv])
    return ((1 - lam) * lc + lam * la).mean()


# --- AFA stage I as users write it (for the training-step benchmark) -----------------------

def _branch_bn(x: Tensor, bn, k: int, training: bool) -> Tensor:
    """Branch k of a K-way MultiBatchNorm2d as its own nn.BatchNorm2d would compute it (the
    running-stat rows are views, updated in place like a module's buffers)."""
    return nn.functional.batch_norm(x, bn.running_mean[k], bn.running_var[k], bn.weight[k],
                                    bn.bias[k], training, bn.momentum, bn.eps)


def eager_afa_forward(model, x: Tensor, k: int) -> Tensor:
    """An `AFAResNet`'s forward through branch k with plain ops: every BN its branch's
    F.batch_norm, ReLU and the residual add as separate passes."""
    tr = model.training
    out = torch.relu(_branch_bn(model.conv1(x), model.bn1, k, tr))
    for blk in model.layers:
        o = torch.relu(_branch_bn(blk.conv1(out), blk.bn1, k, tr))
        o = _branch_bn(blk.conv2(o), blk.bn2, k, tr)
        sc = out if blk.shortcut is None else _branch_bn(blk.shortcut[0](out), blk.shortcut[1],
                                                         k, tr)
        out = torch.relu(o + sc)
    return model.fc(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


def eager_afa_stage1_loss(model, x: Tensor, y: Tensor, strengths, alpha_ratio: float,
                          steps: int, starts, forward=eager_afa_forward) -> Tensor:
    """AFA's stage-I loss with the paper's sequential schedule (Algorithm 1) in eager
    PyTorch: for every strength k ≥ 1, torchattacks' PGD loop (eval mode, parameters frozen)
    through branch k from ``starts[k-1]`` and a training forward through branch k; then the
    clean forward through branch 0. CE(clean) + Σ_k CE(adv_k)."""
    total = 0.0
    for k in range(1, len(strengths)):
        eps = float(strengths[k])
        with attacking(model):
            adv = torchattacks_loop(lambda z, k=k: forward(model, z, k), x, y, starts[k - 1],
                                    eps, alpha_ratio * eps, steps)
        total = total + nn.functional.cross_entropy(forward(model, adv, k), y)
    return nn.functional.cross_entropy(forward(model, x, 0), y) + total


# --- AW-Net as it is written without fused ops (for the training-step benchmark) ----------

def _mixbn_eager(x: Tensor, bn, n_clean: int | None, mix: Tensor | None,
                 training: bool) -> Tensor:
    """MixBN over a two-branch MultiBatchNorm2d's parameters: training, the batch sorted
    clean-first, slice + two BNs + cat; otherwise the two BNs over the whole batch mixed,
    (1 − P)·BN_adv(x) + P·BN_nat(x)."""
    if mix is None:
        return _oat_dual_bn_f(x, n_clean, bn, training)
    nat = _branch_bn(x, bn, 0, False)
    adv = _branch_bn(x, bn, 1, False)
    return mix[:, 0, None, None, None] * nat + mix[:, 1, None, None, None] * adv


def eager_awnet_forward(model, x: Tensor, n_clean: int | None = None) -> Tensor:
    """An `AWNetResNet`'s forward with plain ops: every scaled conv's output multiplied by ω
    and written out, MixBN as two BNs (sliced by type when ``n_clean`` is given, the batch
    sorted clean-first; mixed by the detector's P otherwise), ReLU and the residual add apart."""
    tr = model.training
    type_logits, omegas = model.detector(x)
    mix = None if n_clean is not None else torch.softmax(type_logits, 1)

    def bn(h, m):
        return _mixbn_eager(h, m, n_clean, mix, tr)

    out = torch.relu(bn(model.conv1(x), model.bn1))
    for j, blk in enumerate(model.layers):
        w1, w2 = omegas[2 * j], omegas[2 * j + 1]
        o = torch.relu(bn(blk.sc1.conv(out) * w1[:, :, None, None], blk.sc1.bn))
        o = bn(blk.sc2.conv(o) * w2[:, :, None, None], blk.sc2.bn)
        sc = out if blk.shortcut is None else bn(blk.shortcut[0](out), blk.shortcut[1])
        out = torch.relu(o + sc)
    return model.fc(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)), type_logits


def eager_awnet_loss(model, teacher_nat, teacher_adv, x: Tensor, y: Tensor, eps: float,
                     alpha: float, steps: int, start: Tensor, balance,
                     tau: float = 1.0) -> Tensor:
    """AW-Net's training loss the eager way: torchattacks' PGD loop on the eval-mode model
    (soft MixBN), then one training forward over [x; x_adv] with MixBN sliced by type, type
    CE + balanced τ²·KL to the two teachers."""
    with attacking(model):
        adv = torchattacks_loop(lambda z: eager_awnet_forward(model, z)[0], x, y, start, eps,
                                alpha, steps)
    n = x.shape[0]
    logits, type_logits = eager_awnet_forward(model, torch.cat([x, adv]), n_clean=n)
    types = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    with torch.no_grad():
        t_nat, t_adv = teacher_nat(x), teacher_adv(adv)

    def kd(s, t):
        return tau * tau * nn.functional.kl_div(nn.functional.log_softmax(s / tau, 1),
                                                nn.functional.softmax(t / tau, 1),
                                                reduction="batchmean")
    l_nat, l_adv = kd(logits[:n], t_nat), kd(logits[n:], t_adv)
    a_adv, a_nat = balance.update(l_adv, l_nat)
    return nn.functional.cross_entropy(type_logits, types) + a_adv * l_adv + a_nat * l_nat
