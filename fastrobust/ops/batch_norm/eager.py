"""The routed / mixed batch norm in plain PyTorch (fastrobust/ops/_eager.py derives the math):
the eager kernels of multi_bn and multi_bn_backward, and the same forward as differentiable
torch ops for second derivatives (`grads_with_graph`, the op multi_bn_grads_with_graph)."""
from __future__ import annotations

import torch

from .._common import acc_dtype, check_branch_values, check_mix_values, no_running_update, \
    updated_running_stats
from .._eager import affine, backward_affine, branch_stats, coefficients, grad_sums, \
    plane_mean_m2, plane_moments, plane_size, routing_weights, single_value_branches, \
    to_branches, to_planes, _nonzero
from .schema import BnArgs, backward_needs


@torch.no_grad()
def forward(a: BnArgs):
    """Returns (y, mean, invstd, new_running_mean, new_running_var,
    new_num_batches_tracked, plane_moments); plane_moments is [2, N, C] (x's per-plane
    mean and M2, for the mix gradient) for a mixed op with batch statistics, else empty."""
    x, mix, K = a.x, a.mix, a.num_branches
    if a.branch is not None:
        check_branch_values(a.branch, K)
    elif a.batch_stats:
        check_mix_values(mix)
    acc = acc_dtype(x)
    M = routing_weights(a.branch, mix, K, acc)
    s, gamma, beta = (None if t is None else t.to(acc)
                      for t in (a.input_scale, a.film_gamma, a.film_beta))
    new_running = no_running_update(x)
    planes = x.new_empty(0, dtype=acc)
    if a.batch_stats:
        S = plane_size(x)
        pc, pr, pq = plane_moments(x, acc)
        mean, var, count = branch_stats(M, pc, pr, pq, S, s)
        if a.updates_running:
            new_running = updated_running_stats(a.running_mean, a.running_var,
                                                a.num_batches_tracked, mean, var, count,
                                                a.momentum, a.cumulative)
        if mix is not None:  # each plane's mean and M2, for the mix gradient
            planes = torch.stack(plane_mean_m2(pc, pr, pq, S))
    else:
        mean, var = a.running_mean.to(acc, copy=True), a.running_var.to(acc)
    invstd = torch.rsqrt(var + a.eps)
    single = single_value_branches(M, plane_size(x), a.batch_stats)
    *_, A, D = coefficients(M, a.weight, a.bias, mean, invstd, s, gamma, beta, single)
    y = affine(x, A, D, a.relu)
    return (y, mean, invstd, *new_running, planes)


def multi_bn(*args):
    """fastrobust::multi_bn: (y, mean, invstd, planes); the running stats updated in place."""
    a = BnArgs(*args)
    y, mean, invstd, new_mean, new_var, new_nbt, planes = forward(a)
    if a.updates_running and a.running_var is not None:
        a.running_mean.copy_(new_mean)
        a.running_var.copy_(new_var)
        if a.num_batches_tracked is not None and new_nbt.numel():
            a.num_batches_tracked.copy_(new_nbt)
    return y, mean, invstd, planes


def multi_bn_backward(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
                      film_gamma, film_beta, num_branches, batch_stats, relu, needs):
    """fastrobust::multi_bn_backward: (dx, dmix, dweight, dbias, dscale, dgamma, dbeta), an
    unneeded one empty."""
    needs = backward_needs(needs, mix, input_scale, film_gamma, film_beta)
    grads = backward(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
                     film_gamma, film_beta, num_branches, batch_stats, relu, needs)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)

@torch.no_grad()
def backward(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
                film_gamma, film_beta, num_branches, batch_stats, relu, needs):
    """needs = (x, mix, weight, bias, input_scale, film_gamma, film_beta) flags. Returns
    (dx, dmix, dweight, dbias, dscale, dgamma, dbeta); an unneeded one is empty."""
    need_x, need_mix, need_w, need_b, need_s, need_g, need_be = needs
    K, C = mean.shape
    acc = mean.dtype
    S = plane_size(x)
    M = routing_weights(branch, mix, K, acc)
    s, gamma, beta = (None if t is None else t.to(acc)
                      for t in (input_scale, film_gamma, film_beta))
    single = single_value_branches(M, S, batch_stats)
    a, d, Ap, Dp, A, D = coefficients(M, weight, bias, mean, invstd, s, gamma, beta,
                                           single)
    # Centre of the Σg·x sums, in x's units: the plane's mixture of branch means.
    cu = to_planes(M, mean) / _nonzero(M.sum(1))[:, None]
    c = cu if s is None else torch.where(s != 0, cu / _nonzero(s), 0.0)
    G1, G2 = grad_sums(dy, x, c, (A, D) if relu else None, acc)
    sG2, sc = (G2, c) if s is None else (s * G2, s * c)
    Z1, Z2 = (G1, sG2) if gamma is None else (gamma * G1, gamma * sG2)
    Zu = Z2 + sc * Z1  # Σ_s dz·u per plane
    T1 = to_branches(M, Z1)
    T2 = invstd * (to_branches(M, Zu) - mean * T1)
    # A branch whose batch statistics come from one value has x̂ ≡ 0, hence a constant
    # output: exactly zero dweight and input gradient, which the sums above (scaled by
    # r = 1/sqrt(eps)) would only reach up to rounding.
    T2 = torch.where(single, 0.0, T2)
    def empty():  # a fresh one each time: the op's outputs must not alias each other
        return x.new_empty(0, dtype=acc)

    dweight = T2 if need_w else empty()
    dbias = T1 if need_b else empty()
    dbeta = G1 if need_be else empty()
    dgamma = Ap * (sG2 + sc * G1) + Dp * G1 if need_g else empty()
    # ∂L/∂u = (γ·α)·g + β·u + δ, α = Ap.
    P = Ap if gamma is None else Ap * gamma
    if batch_stats:
        W = M.sum(0)
        m = _nonzero(W * S)[:, None]
        a_in = torch.where(single, 0.0, a)
        P = to_planes(M, a_in) if gamma is None else to_planes(M, a_in) * gamma
        Q = to_planes(M, -a_in * invstd * T2 / m)
        R = to_planes(M, a_in * (invstd * T2 * mean - T1) / m)
        if s is not None:
            Q = Q * s
    else:
        Q, R = None, torch.zeros_like(P)
    dx, dot = x.new_empty(0), None
    if need_x or need_s:
        dx, dot = backward_affine(dy, x, P, Q, R, s, (A, D) if relu else None,
                                              need_s, acc)
        if not need_x:
            dx = x.new_empty(0)
    dscale = dot if need_s else empty()
    dmix = empty()
    if need_mix:
        dmix = Zu @ a.T + Z1 @ d.T  # Σ_c,s dz·BN_k(u): the direct term
        if batch_stats:  # and the path through the mix-weighted statistics
            pmean, pm2 = planes[0], planes[1]
            um, um2 = (pmean, pm2) if s is None else (s * pmean, s * s * pm2)
            _, var, _ = branch_stats(M, pmean, torch.zeros_like(pm2), pm2, S, s)
            W = _nonzero(M.sum(0))[:, None]  # [K, 1]
            du = um[:, None, :] - mean[None]  # [N, K, C]
            q = um2[:, None, :] / max(S, 1) + du.square()
            dmix = dmix - ((a * T1 / W)[None] * du
                           + (0.5 * a * invstd * T2 / W)[None] * (q - var[None])).sum(2)
    return dx, dmix, dweight, dbias, dscale, dgamma, dbeta



# --- the differentiable composite: second derivatives --------------------------------------------

def bn_composite(x, branch, mix, weight, bias, mean, invstd, input_scale, film_gamma, film_beta,
                 num_branches, batch_stats, eps, relu):
    """y of the BN family in plain, differentiable torch ops: the forward math of
    `bn_forward` over `TorchLeaves`, recorded by autograd. With ``batch_stats`` the
    statistics are recomputed from x (so their dependence on x, the mix and the input scale is
    in the graph); otherwise ``mean`` and ``invstd`` (the running statistics the forward used)
    are constants. Serves the backward of every backend when a second derivative is asked for
    (``create_graph=True``), see `bn_grads_with_graph`."""
    acc = acc_dtype(x)
    M = routing_weights(branch, mix, num_branches, acc)
    s, gamma, beta = (None if t is None else t.to(acc)
                      for t in (input_scale, film_gamma, film_beta))
    if batch_stats:
        mean, var, _ = branch_stats(M, *plane_moments(x, acc),
                                           plane_size(x), s)
        invstd = torch.rsqrt(var + eps)
    stats = (mean.to(acc), invstd.to(acc), s, gamma, beta)
    # The plain math, not the forward's exact bias for one-value branches (`single`): that
    # shortcut has the right value but cuts the derivatives through a, which are not all zero
    # (a mix weight of 0 next to a one-value branch's only sample moves its mean).
    *_, A, D = coefficients(M, weight, bias, *stats)
    if relu:  # the ReLU's mask must be the forward's: its values, the math's derivatives
        single = single_value_branches(M, plane_size(x), batch_stats)
        *_, A1, D1 = coefficients(M, weight, bias, *stats, single)
        A, D = A + (A1 - A).detach(), D + (D1 - D).detach()
    return affine(x, A, D, relu)


def bn_grads_with_graph(dy, x, route, weight, bias, mean, invstd, input_scale, film_gamma,
                        film_beta, num_branches, batch_stats, eps, relu, mixed, needs):
    """The BN family's input gradients as a differentiable function of the inputs and ``dy``
    (for gradient penalties: ``torch.autograd.grad(..., create_graph=True)``). ``needs``: the
    (x, mix, weight, bias, input_scale, film_gamma, film_beta) flags; returns those seven,
    None where not needed. Every backend's backward calls this when grad mode is on during the
    backward, so second derivatives are exact on all of them."""
    args = (x, route if mixed else None, weight, bias, input_scale, film_gamma, film_beta)
    # a gradient asked for an argument that is None is none (as in the kernels' backward)
    needs = [bool(n) and t is not None for t, n in zip(args, needs)]
    wanted = [t for t, n in zip(args, needs) if n]
    with torch.enable_grad():
        # One graph input per argument (a view keeps the link to the caller's graph, which the
        # second derivative needs; the same tensor passed twice gets two gradients).
        leaves = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_()
                  for t in wanted]
        it = iter(leaves)
        x_, mix_, w_, b_, s_, g_, be_ = (next(it) if n else t for t, n in zip(args, needs))
        y = bn_composite(x_, None if mixed else route, mix_, w_, b_, mean, invstd, s_, g_, be_,
                         num_branches, batch_stats, eps, relu)
        grads = torch.autograd.grad(y, leaves, dy, create_graph=True, allow_unused=True)
    out = iter(grads)
    result = []
    for t, n in zip(args, needs):
        g = next(out) if n else None
        if n and g is None:
            g = torch.zeros_like(t)
        result.append(g)
    return result



def grads_with_graph(dy, x, branch, mix, weight, bias, mean, invstd, input_scale, film_gamma,
                     film_beta, num_branches, batch_stats, eps, relu, needs):
    """fastrobust::multi_bn_grads_with_graph (CompositeImplicitAutograd): what the C++
    autograd calls for a backward under create_graph=True."""
    grads = bn_grads_with_graph(dy, x, mix if mix is not None else branch, weight, bias, mean,
                                invstd, input_scale, film_gamma, film_beta, num_branches,
                                batch_stats, eps, relu, mix is not None, tuple(needs))
    return [x.new_empty(0) if g is None else g for g in grads]

