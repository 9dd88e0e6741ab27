"""Explicit forward and backward passes of the per-sample affine family (docs/math.md), in plain
torch ops.

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

Here are the pieces every eager implementation shares: the tiny per-(branch, channel) math and
the torch passes over the activation. batch_norm/eager.py and film/eager.py put them together;
batch_norm/triton.py and the C++ kernels implement the same algorithm in their own kernels (on
CUDA the tiny math runs inside two per-channel-block Triton kernels).
"""
from __future__ import annotations

import torch
from torch import Tensor


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


# --- per-(branch, channel) statistics and coefficients --------------------------------------

def branch_sums(M, centre, r, q, S, scale):
    """Per-(k, c) sums of u = scale·x about one centre per (k, c), from the planes' sums
    of x about their own centres (`plane_moments`: c, r = Σ(x − c),
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

def branch_stats(M, centre, r, q, S, scale):
    """Per-(k, c) mean, biased variance and weighted value count m_k = S·Σ_n M_nk, from
    the planes' sums about their centres (see `branch_sums`): mean = C_k + R_k/m_k,
    M2 = Q_k − R_k²/m_k."""
    ck, R, Q, m = branch_sums(M, centre, r, q, S, scale)
    mz = _nonzero(m)[:, None]
    return ck + R / mz, ((Q - R * R / mz) / mz).clamp_min(0), m

def single_value_branches(M, S, batch_stats):
    """[K, 1] bool: branches whose batch statistics come from one value (one sample, 1x1
    maps), where x̂ is exactly 0: the output is exactly the bias, the input gradient 0."""
    return (((M != 0).sum(0) == 1) & (S == 1) & batch_stats)[:, None]

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



# --- the passes over the activation, in plain torch ops (clear, not fast) ---------------------

def _b(t: Tensor, nd: int) -> Tensor:
    """[N, C] → [N, C, 1, ...] broadcastable against an nd-dim activation."""
    return t.reshape(*t.shape, *([1] * (nd - 2)))


def plane_moments(x, acc):
    """Each plane's sums about its centre c (its mean as rounded, a constant): (c, r, q)
    [N, C] with r = Σ(x − c), q = Σ(x − c)². r is what the rounding of c left out (zero
    for an exact mean), the cross term of an exact merge (`branch_stats`)."""
    xs = x.to(acc).flatten(2) if x.dim() > 2 else x.to(acc)[:, :, None]
    c = (xs.mean(2) if xs.shape[2] else xs.sum(2)).detach()
    dev = xs - c[:, :, None]
    return c, dev.sum(2), dev.square().sum(2)

def grad_sums(dy, x, center, mask, acc):
    g = dy.to(acc)
    nd = x.dim()
    if mask is not None:
        A, D = mask
        g = torch.where(_b(A, nd) * x.to(acc) + _b(D, nd) <= 0, 0.0, g)
    dims = tuple(range(2, nd))
    xc = x.to(acc) - _b(center, nd)
    return (g.sum(dims), (g * xc).sum(dims)) if dims else (g.clone(), g * xc)

def affine(x, A, D, relu):
    nd = x.dim()
    f = _b(A, nd) * x.to(A.dtype) + _b(D, nd)
    if relu:
        f = torch.where(f <= 0, 0.0, f)
    return f.to(x.dtype)

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

