"""Explicit forward and backward passes of the per-sample affine family (docs/math.md), written once over a small set of "leaves" (the passes over the activation).

Every op of the family is y = act(A[n,c]·x + D[n,c]) with per-plane coefficients (a plane is
one (n, c)), so one elementwise pass serves them all:

    routed BN   sample n uses branch k = branch[n]        (routing weights M = one-hot)
    mixed BN    y_n = Σ_k mix[n,k]·BN_k(x)_n                (routing weights M = mix)
    extras      u = input_scale·x before statistics; f = γ·BN(u) + β after; y = relu(f)
    film        y = γ·x + β

Forward:  per-plane moments of x (one pass) → per-(branch, channel) statistics from the
          routing weights (tiny [N, K, C] math) → coefficients A, D → one affine pass.
Backward: per-plane Σg and Σg·(x - c) (one pass; g = dy masked by the ReLU, recomputed from x)
          → tiny math → one pass writing dx = s·(P·g + Q·x + R) and, when the input scale
          needs a gradient, Σ x·(P·g + Q·x + R) per plane alongside.
Neither the scaled input, nor the pre-FiLM or pre-ReLU tensor is ever written to memory.

The derivation (weighted statistics; sums over n, s; m_k = S·Σ_n M_nk; a = w·r):
    ∂L/∂u = Σ_k M_nk·a_k·[dz - (T1_k + x̂_k·T2_k)/m_k],   dz = γ·g
    T1_k = Σ M_nk·dz = dbias_k,   T2_k = Σ M_nk·dz·x̂_k = dweight_k
    ∂L/∂M_nk = Σ_c,s dz·(a_k·(u - μ_k) + b_k)
               - Σ_c a_k·[T1_k·(ū_nc - μ_k) + ½·r_k·T2_k·(Q_nkc/S - σ²_k)]/W_k   (training)
with ū, Q_nkc = M2_u + S·(ū - μ_k)² the plane's mean and centred sum of squares.

The eager backend runs this with torch leaves (`eager`). The Triton backend
(`fastrobust.kernels.multi_bn`) and the C++ backend implement the same algorithm in their own
kernels (on CUDA the tiny math runs inside two per-channel-block Triton kernels).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._spec import PgdMode
from ._common import acc_dtype, check_branch_values, check_mix_values, no_running_update, \
    updated_running_stats


# --- tiny [N, K, C] helpers (NaN-safe: a zero routing weight times a NaN is zero) -------------

def routing_weights(branch: Tensor | None, mix: Tensor | None, K: int, acc) -> Tensor:
    """[N, K] routing weights: the mix itself, or the one-hot of branch (no host sync)."""
    if mix is not None:
        return mix.to(acc)
    return (branch[:, None] == torch.arange(K, device=branch.device)).to(acc)


class _StrongZeroMul(torch.autograd.Function):
    """a·b (broadcasting) in which 0 times anything, NaN and inf included, is exactly 0.

    A sample's NaN must not spread to the branches it is not routed to, neither through the
    values (0·NaN) nor through the gradients of a backward taken with create_graph=True
    (0·NaN again, with a NaN upstream gradient). Masking the product where a factor is zero
    (``where(M != 0, M·t, 0)``) does the first but makes the derivative in that factor 0 at 0
    instead of the other factor: second derivatives with respect to a zero mix weight came out
    wrong. Here the derivatives are the product's own, ∂/∂a = g·b and ∂/∂b = g·a, each again
    a strong-zero product, so derivatives of every order are exact wherever the factors are
    finite and still contain a NaN."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.where((a == 0) | (b == 0), 0.0, a * b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = strong_zero_mul(g, b).sum_to_size(a.shape)
        if ctx.needs_input_grad[1]:
            gb = strong_zero_mul(g, a).sum_to_size(b.shape)
        return ga, gb


def strong_zero_mul(a: Tensor, b: Tensor) -> Tensor:
    """a·b with 0·x = 0 for every x (NaN, inf), in value and in derivatives of every order."""
    return _StrongZeroMul.apply(a, b)


def _masked(M: Tensor, t: Tensor) -> Tensor:
    """M[n, k]·t[n, k, c], with exact zeros where M is zero (whatever t holds there)."""
    return strong_zero_mul(M[:, :, None], t)


def to_branches(M: Tensor, t: Tensor) -> Tensor:
    """Σ_n M[n,k]·t[n,(k,)c] → [K, C]; t is [N, C] or [N, K, C]."""
    return _masked(M, t if t.dim() == 3 else t[:, None, :]).sum(0)


def to_planes(M: Tensor, t: Tensor) -> Tensor:
    """Σ_k M[n,k]·t[k,c] → [N, C]."""
    return _masked(M, t[None]).sum(1)


def _nonzero(t: Tensor) -> Tensor:
    return torch.where(t != 0, t, torch.ones_like(t))


def plane_mean_m2(c: Tensor, r: Tensor, q: Tensor, S: int) -> tuple[Tensor, Tensor]:
    """A plane's mean and M2 from its S values' sums about a centre c: r = Σ(x − c),
    q = Σ(x − c)² (Chan's cross term: M2 = q − r²/S)."""
    Sz = max(S, 1)
    return c + r / Sz, q - r * r / Sz


def plane_size(x: Tensor) -> int:
    S = 1
    for d in x.shape[2:]:
        S *= d
    return S


class Engine:
    """The explicit passes over a set of leaves (see the module docstring)."""

    def __init__(self, leaves):
        self.leaves = leaves

    # -- statistics and coefficients --------------------------------------------------------

    @staticmethod
    def branch_sums(M, centre, r, q, S, scale):
        """Per-(k, c) sums of u = scale·x about one centre per (k, c), from the planes' sums
        of x about their own centres (`TorchLeaves.plane_moments`: c, r = Σ(x − c),
        q = Σ(x − c)²): (C_k, R_k, Q_k, m_k) with C_k the weighted mean of the planes'
        centres (a constant), d = c_u − C_k and
            R_k = Σ_n M·(r_u + S·d) = Σ(u − C_k),   Q_k = Σ_n M·(q_u + 2·d·r_u + S·d²),
        m_k = S·Σ_n M_nk. Chan's merge with its cross terms: nothing assumes a centre is the
        exact mean, so no rounding of one is lost (issue 37: the plane means' rounding once
        cost 50-500× F.batch_norm's error when |mean| ≫ std). Planes given as (mean, M2)
        are the case r = 0."""
        uc, ur, uq = (centre, r, q) if scale is None else \
            (scale * centre, scale * r, scale * scale * q)
        W = M.sum(0)
        with torch.no_grad():  # a constant: the statistics do not depend on it
            ck = to_branches(M, uc) / _nonzero(W)[:, None]
        d = uc[:, None, :] - ck[None]  # [N, K, C]
        ur3 = ur[:, None, :]
        R = to_branches(M, ur3 + S * d)
        # Products as strong-zero ones: the (n, k) pairs a sample does not use get a zero
        # gradient even where its plane holds a NaN (2·NaN·0 would spread it to branch k).
        Q = to_branches(M, uq[:, None, :] + 2 * strong_zero_mul(ur3, d)
                        + S * strong_zero_mul(d, d))
        return ck, R, Q, W * S

    @staticmethod
    def branch_stats(M, centre, r, q, S, scale):
        """Per-(k, c) mean, biased variance and weighted value count m_k = S·Σ_n M_nk, from
        the planes' sums about their centres (see `branch_sums`): mean = C_k + R_k/m_k,
        M2 = Q_k − R_k²/m_k."""
        ck, R, Q, m = Engine.branch_sums(M, centre, r, q, S, scale)
        mz = _nonzero(m)[:, None]
        return ck + R / mz, ((Q - R * R / mz) / mz).clamp_min(0), m

    @staticmethod
    def single_value_branches(M, S, batch_stats):
        """[K, 1] bool: branches whose batch statistics come from one value (one sample, 1x1
        maps), where x̂ is exactly 0: the output is exactly the bias, the input gradient 0."""
        return (((M != 0).sum(0) == 1) & (S == 1) & batch_stats)[:, None]

    @staticmethod
    def coefficients(M, weight, bias, mean, invstd, scale, gamma, beta, single=None):
        """Ap, Dp: the BN part, z = Ap·u + Dp; A, D: the whole op, f = A·x + D. ``single``
        ([K, 1]): those branches' planes use a = 0, d = b (exactly the bias, where a·x + d
        with a = w/sqrt(eps) would round); a and d stay the true per-branch values."""
        acc = mean.dtype
        a = invstd if weight is None else invstd * weight.to(acc)
        d = -mean * a if bias is None else bias.to(acc) - mean * a
        if single is not None:
            b = torch.zeros_like(d) if bias is None else bias.to(acc).expand_as(d)
            Ap = to_planes(M, torch.where(single, 0.0, a))
            Dp = to_planes(M, torch.where(single, b, d))
        else:
            Ap, Dp = to_planes(M, a), to_planes(M, d)
        A = Ap if scale is None else Ap * scale
        D = Dp
        if gamma is not None:
            A, D = A * gamma, D * gamma
        if beta is not None:
            D = D + beta
        return a, d, Ap, Dp, A, D

    # -- the BN family -----------------------------------------------------------------------

    @torch.no_grad()
    def bn_forward(self, x, branch, mix, weight, bias, running_mean, running_var,
                   num_batches_tracked, input_scale, film_gamma, film_beta, num_branches,
                   training, momentum, cumulative, eps, relu):
        """Returns (y, mean, invstd, new_running_mean, new_running_var,
        new_num_batches_tracked, plane_moments); plane_moments is [2, N, C] (x's per-plane
        mean and M2, for the mix gradient) for a mixed op with batch statistics, else empty."""
        K = num_branches
        if branch is not None:
            check_branch_values(branch, K)
        elif training or running_mean is None:
            check_mix_values(mix)
        acc = acc_dtype(x)
        M = routing_weights(branch, mix, K, acc)
        s, gamma, beta = (None if t is None else t.to(acc)
                          for t in (input_scale, film_gamma, film_beta))
        new_running = no_running_update(x)
        planes = x.new_empty(0, dtype=acc)
        if training or running_mean is None:
            S = plane_size(x)
            pc, pr, pq = self.leaves.plane_moments(x, acc)
            mean, var, count = self.branch_stats(M, pc, pr, pq, S, s)
            if training and running_mean is not None:
                new_running = updated_running_stats(running_mean, running_var,
                                                    num_batches_tracked, mean, var, count,
                                                    momentum, cumulative)
            if mix is not None:  # each plane's mean and M2, for the mix gradient
                planes = torch.stack(plane_mean_m2(pc, pr, pq, S))
        else:
            mean, var = running_mean.to(acc, copy=True), running_var.to(acc)
        invstd = torch.rsqrt(var + eps)
        single = self.single_value_branches(M, plane_size(x), training or running_mean is None)
        *_, A, D = self.coefficients(M, weight, bias, mean, invstd, s, gamma, beta, single)
        y = self.leaves.affine(x, A, D, relu)
        return (y, mean, invstd, *new_running, planes)

    @torch.no_grad()
    def bn_backward(self, dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
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
        single = self.single_value_branches(M, S, batch_stats)
        a, d, Ap, Dp, A, D = self.coefficients(M, weight, bias, mean, invstd, s, gamma, beta,
                                               single)
        # Centre of the Σg·x sums, in x's units: the plane's mixture of branch means.
        cu = to_planes(M, mean) / _nonzero(M.sum(1))[:, None]
        c = cu if s is None else torch.where(s != 0, cu / _nonzero(s), 0.0)
        G1, G2 = self.leaves.grad_sums(dy, x, c, (A, D) if relu else None, acc)
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
            dx, dot = self.leaves.backward_affine(dy, x, P, Q, R, s, (A, D) if relu else None,
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
                _, var, _ = self.branch_stats(M, pmean, torch.zeros_like(pm2), pm2, S, s)
                W = _nonzero(M.sum(0))[:, None]  # [K, 1]
                du = um[:, None, :] - mean[None]  # [N, K, C]
                q = um2[:, None, :] / max(S, 1) + du.square()
                dmix = dmix - ((a * T1 / W)[None] * du
                               + (0.5 * a * invstd * T2 / W)[None] * (q - var[None])).sum(2)
        return dx, dmix, dweight, dbias, dscale, dgamma, dbeta

    # -- FiLM / channel scale ----------------------------------------------------------------

    @staticmethod
    def _film_coefficient(t, x, fill):
        """γ or β as [N, C] in the accumulation type (a [C] one broadcast over the batch)."""
        acc = acc_dtype(x)
        N, C = x.shape[:2]
        if t is None:
            return torch.full((N, C), fill, dtype=acc, device=x.device)
        return t.to(acc).expand(N, C)

    @torch.no_grad()
    def film_forward(self, x, gamma, beta):
        """y = γ·x + β with [N, C] or [C] γ, β (either may be None)."""
        return self.leaves.affine(x, self._film_coefficient(gamma, x, 1.0),
                                  self._film_coefficient(beta, x, 0.0), False)

    @torch.no_grad()
    def film_backward(self, dy, x, gamma, need_x, need_gamma, need_beta,
                      per_channel_gamma=False, per_channel_beta=False):
        """Returns (dx, dgamma, dbeta); an unneeded one is empty. dgamma (dbeta) is [C],
        summed over the batch, when per_channel_gamma (per_channel_beta), else [N, C]."""
        acc = acc_dtype(x)
        N, C = x.shape[:2]
        dx, dgamma, dbeta = (x.new_empty(0, dtype=dt) for dt in (x.dtype, acc, acc))
        if need_x:
            A = self._film_coefficient(gamma, x, 1.0)
            dx = self.leaves.affine(dy, A, torch.zeros_like(A), False)
            dx = dx.to(x.dtype)
        if need_gamma or need_beta:
            G1, G2 = self.leaves.grad_sums(dy, x, torch.zeros(N, C, dtype=acc, device=x.device),
                                           None, acc)
            dgamma = (G2.sum(0) if per_channel_gamma else G2) if need_gamma else dgamma
            dbeta = (G1.sum(0) if per_channel_beta else G1) if need_beta else dbeta
        return dx, dgamma, dbeta


# --- the differentiable composite: double backward --------------------------------------------

def bn_composite(x, branch, mix, weight, bias, mean, invstd, input_scale, film_gamma, film_beta,
                 num_branches, batch_stats, eps, relu):
    """y of the BN family in plain, differentiable torch ops: the forward math of
    `Engine.bn_forward` over `TorchLeaves`, recorded by autograd. With ``batch_stats`` the
    statistics are recomputed from x (so their dependence on x, the mix and the input scale is
    in the graph); otherwise ``mean`` and ``invstd`` (the running statistics the forward used)
    are constants. Serves the backward of every backend when a second derivative is asked for
    (``create_graph=True``), see `bn_grads_with_graph`."""
    acc = acc_dtype(x)
    M = routing_weights(branch, mix, num_branches, acc)
    s, gamma, beta = (None if t is None else t.to(acc)
                      for t in (input_scale, film_gamma, film_beta))
    if batch_stats:
        mean, var, _ = Engine.branch_stats(M, *TorchLeaves.plane_moments(x, acc),
                                           plane_size(x), s)
        invstd = torch.rsqrt(var + eps)
    stats = (mean.to(acc), invstd.to(acc), s, gamma, beta)
    # The plain math, not the forward's exact bias for one-value branches (`single`): that
    # shortcut has the right value but cuts the derivatives through a, which are not all zero
    # (a mix weight of 0 next to a one-value branch's only sample moves its mean).
    *_, A, D = Engine.coefficients(M, weight, bias, *stats)
    if relu:  # the ReLU's mask must be the forward's: its values, the math's derivatives
        single = Engine.single_value_branches(M, plane_size(x), batch_stats)
        *_, A1, D1 = Engine.coefficients(M, weight, bias, *stats, single)
        A, D = A + (A1 - A).detach(), D + (D1 - D).detach()
    return TorchLeaves.affine(x, A, D, relu)


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


# --- torch leaves: the eager backend -----------------------------------------------------------

def _b(t: Tensor, nd: int) -> Tensor:
    """[N, C] → [N, C, 1, ...] broadcastable against an nd-dim activation."""
    return t.reshape(*t.shape, *([1] * (nd - 2)))


class TorchLeaves:
    """The passes in plain PyTorch (clear, not fast)."""

    @staticmethod
    def plane_moments(x, acc):
        """Each plane's sums about its centre c (its mean as rounded, a constant): (c, r, q)
        [N, C] with r = Σ(x − c), q = Σ(x − c)². r is what the rounding of c left out (zero
        for an exact mean), the cross term of an exact merge (`Engine.branch_stats`)."""
        xs = x.to(acc).flatten(2) if x.dim() > 2 else x.to(acc)[:, :, None]
        c = (xs.mean(2) if xs.shape[2] else xs.sum(2)).detach()
        dev = xs - c[:, :, None]
        return c, dev.sum(2), dev.square().sum(2)

    @staticmethod
    def grad_sums(dy, x, center, mask, acc):
        g = dy.to(acc)
        nd = x.dim()
        if mask is not None:
            A, D = mask
            g = torch.where(_b(A, nd) * x.to(acc) + _b(D, nd) <= 0, 0.0, g)
        dims = tuple(range(2, nd))
        xc = x.to(acc) - _b(center, nd)
        return (g.sum(dims), (g * xc).sum(dims)) if dims else (g.clone(), g * xc)

    @staticmethod
    def affine(x, A, D, relu):
        nd = x.dim()
        f = _b(A, nd) * x.to(A.dtype) + _b(D, nd)
        if relu:
            f = torch.where(f <= 0, 0.0, f)
        return f.to(x.dtype)

    @staticmethod
    def backward_affine(dy, x, P, Q, R, out_scale, mask, want_dot, acc):
        nd = x.dim()
        g = dy.to(acc)
        xa = x.to(acc)
        if mask is not None:
            A, D = mask
            g = torch.where(_b(A, nd) * xa + _b(D, nd) <= 0, 0.0, g)
        v = _b(P, nd) * g + _b(R, nd)
        if Q is not None:
            v = v + _b(Q, nd) * xa
        dot = None
        if want_dot:
            dims = tuple(range(2, nd))
            dot = (xa * v).sum(dims) if dims else xa * v
        dx = v if out_scale is None else _b(out_scale, nd) * v
        return dx.to(x.dtype), dot


eager = Engine(TorchLeaves())


# --- the PGD family in torch ops: the eager backend of pgd_step / pgd_init / mifgsm_step -------

def _per_sample_view(t: Tensor | None, v: float, x: Tensor):
    """A per-sample [N] tensor as [N, 1, ..., 1] in x's dtype, else the float."""
    return v if t is None else t.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))


def _sample_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm as [N, 1, ..., 1], accumulated in the accumulation dtype."""
    return t.to(acc_dtype(t)).flatten(1).norm(dim=1).view((-1,) + (1,) * (t.dim() - 1))


class PgdEngine:
    """pgd_update / mifgsm_update with the signatures of the compiled kernels
    (csrc/cpu/pgd.h), in torch ops, written into place."""

    @staticmethod
    @torch.no_grad()
    def pgd_update(out, x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, mode, clip_min,
                   clip_max) -> None:
        e, a = _per_sample_view(eps_t, eps, x_adv), _per_sample_view(alpha_t, alpha, x_adv)
        if mode == PgdMode.LINF_SIGN:
            direction = grad.sign()
        elif mode == PgdMode.LINF_RAW:
            direction = grad
        elif mode == PgdMode.L2:
            direction = (grad.to(acc_dtype(grad)) / _sample_norm(grad).clamp_min(1e-12)
                         ).to(x_adv.dtype)
        else:
            raise ValueError(f"unknown PGD mode {mode}")
        delta = x_adv + a * direction - x_nat
        if mode == PgdMode.L2:  # onto the l2 ball: δ·min(1, ε/‖δ_n‖)
            dn = _sample_norm(delta)
            e_acc = e.to(dn.dtype) if isinstance(e, Tensor) else e
            factor = torch.where(dn > e_acc, e_acc / dn.clamp_min(1e-30), 1.0)
            delta = delta * factor.to(x_adv.dtype)
        elif isinstance(e, Tensor):
            delta = torch.minimum(torch.maximum(delta, -e), e)
        else:
            delta = torch.clamp(delta, min=-e, max=e)
        result = torch.clamp(x_nat + delta, min=clip_min, max=clip_max)
        if isinstance(e, Tensor) and e.device.type == "cuda":  # as the Triton kernels do
            result = torch.where(e < 0, float("nan"), result)
        out.copy_(result)

    @staticmethod
    @torch.no_grad()
    def mifgsm_update(x_adv, grad, buf, x_nat, eps_t, eps, alpha_t, alpha, decay, clip_min,
                      clip_max) -> None:
        mean_abs = grad.to(acc_dtype(grad)).abs().flatten(1).mean(dim=1)
        mean_abs = mean_abs.view((-1,) + (1,) * (grad.dim() - 1))
        buf.copy_((grad / torch.where(mean_abs == 0, 1.0, mean_abs)).to(grad.dtype)
                  + buf * decay)
        PgdEngine.pgd_update(x_adv, x_adv, buf, x_nat, eps_t, eps, alpha_t, alpha,
                             PgdMode.LINF_SIGN, clip_min, clip_max)


pgd_eager = PgdEngine()
