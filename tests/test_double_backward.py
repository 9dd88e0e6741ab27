"""Second derivatives through the BN family and film (gradient penalties: GradAlign, input
gradient regularization, LLR). With ``create_graph=True`` every backend's backward returns
gradients that carry their own graph, so a penalty such as ||d loss / dx||^2 contributes its
exact share to the parameter gradients."""
import copy

import pytest
import torch
from torch import nn

import fastrobust.functional as F
from fastrobust.nn import convert_multi_bn, routing

f64 = torch.float64
GG = dict(eps=1e-6, atol=1e-5, rtol=1e-4)  # fp64 finite differences of a backward


def gg(backend):
    """gradgradcheck options: under the Triton interpreter each forward costs ~0.1 s, so the
    check there compares one random projection of the second derivative (fast_mode) instead of
    every entry; the other backends check every entry."""
    return dict(GG, fast_mode=backend == "triton")


def _bn_inputs(mixed, extras, g):
    N, C, K = 4, 2, 2
    x = (torch.randn(N, C, 2, 1, generator=g, dtype=f64) * 2 + 1).requires_grad_()
    route = (torch.rand(N, K, generator=g, dtype=f64).add_(0.2).requires_grad_() if mixed
             else torch.tensor([0, 1, 1, 0]))
    w = torch.rand(K, C, generator=g, dtype=f64).add_(0.5).requires_grad_()
    b = torch.randn(K, C, generator=g, dtype=f64, requires_grad=True)
    ext = [torch.rand(N, C, generator=g, dtype=f64).add_(0.5).requires_grad_(),
           torch.randn(N, C, generator=g, dtype=f64, requires_grad=True),
           torch.randn(N, C, generator=g, dtype=f64, requires_grad=True)] if extras else []
    rm = torch.randn(K, C, generator=g, dtype=f64)
    rv = torch.rand(K, C, generator=g, dtype=f64) + 0.5
    return x, route, w, b, ext, rm, rv


def _bn_fn(mixed, extras, training, route, rm, rv, activation="relu"):
    op = F.mixed_batch_norm if mixed else F.multi_batch_norm

    def fn(x, *rest):
        if mixed:
            route_, rest = rest[0], rest[1:]
        else:
            route_ = route
        w, b, *ext = rest
        kw = dict(input_scale=ext[0], film_gamma=ext[1], film_beta=ext[2],
                  activation=activation) if extras else {}
        # Running stats only in eval, where they are read, never written.
        return op(x, route_, w, b, None if training else rm, None if training else rv,
                  training=training, **kw)
    return fn


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "scale_film_relu"])
@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
def test_gradgradcheck_bn(backend, mixed, extras, training):
    g = torch.Generator().manual_seed(1)
    x, route, w, b, ext, rm, rv = _bn_inputs(mixed, extras, g)
    fn = _bn_fn(mixed, extras, training, route, rm, rv)
    inputs = (x,) + ((route,) if mixed else ()) + (w, b, *ext)
    assert torch.autograd.gradgradcheck(fn, inputs, **gg(backend))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
def test_graph_gradients_equal_the_kernels(backend, mixed, training):
    """First derivatives taken with create_graph=True (the differentiable backward) equal the
    kernels' backward, for every input."""
    g = torch.Generator().manual_seed(2)
    x, route, w, b, ext, rm, rv = _bn_inputs(mixed, True, g)
    fn = _bn_fn(mixed, True, training, route, rm, rv)
    inputs = (x,) + ((route,) if mixed else ()) + (w, b, *ext)
    y = fn(*inputs)
    dy = torch.randn(y.shape, generator=g, dtype=f64)
    plain = torch.autograd.grad(y, inputs, dy, retain_graph=True)
    graph = torch.autograd.grad(y, inputs, dy, create_graph=True)
    assert graph[0].requires_grad  # dx depends on the parameters (and on x in training)
    for p, q in zip(plain, graph):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", ["per_sample", "per_channel"])
def test_gradgradcheck_film(backend, shape):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 3, generator=g, dtype=f64, requires_grad=True)
    ps = (2, 2) if shape == "per_sample" else (2,)
    gamma = torch.randn(ps, generator=g, dtype=f64, requires_grad=True)
    beta = torch.randn(ps, generator=g, dtype=f64, requires_grad=True)
    if shape == "per_sample":
        assert torch.autograd.gradgradcheck(F.film, (x, gamma, beta), **gg(backend))
    else:
        assert torch.autograd.gradgradcheck(lambda x, s: F.channel_scale(x, s), (x, gamma),
                                            **gg(backend))


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).to(f64)


def _penalized_grads(model, x, y, lam=0.5):
    """GradAlign-style: CE + lam·||d CE / dx||², its parameter gradients."""
    x = x.clone().requires_grad_()
    ce = nn.functional.cross_entropy(model(x), y)
    gx, = torch.autograd.grad(ce, x, create_graph=True)
    loss = ce + lam * gx.square().sum()
    return torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_matches_batch_norm(backend, training):
    """One branch of MultiBatchNorm2d is nn.BatchNorm2d: the same model with either gives the
    same parameter gradients of a loss that holds its own input gradient."""
    ref = _small_cnn()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial affine and running stats
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    fused = convert_multi_bn(copy.deepcopy(ref), num_branches=1)
    ref.train(training)
    fused.train(training)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(6, 3, 6, 6, generator=g, dtype=f64)
    y = torch.randint(0, 3, (6,), generator=g)
    want = _penalized_grads(ref, x, y)
    with routing(fused, branch=0):
        got = _penalized_grads(fused, x, y)
    assert len(want) == len(got)
    for a, b in zip(want, got):
        torch.testing.assert_close(b.reshape(a.shape), a, rtol=1e-9, atol=1e-11)
    # The penalty term matters here: without it the gradients differ.
    plain = torch.autograd.grad(nn.functional.cross_entropy(ref(x), y), list(ref.parameters()))
    assert max((p - q).abs().max().item() for p, q in zip(plain, want)) > 1e-6


# --- exact at zero: a zero mix weight, input scale, FiLM gamma or BN weight ----------------------

def _zeroed(t, *where):
    """t with exact zeros at the given indices, a leaf that requires grad again."""
    t = t.detach().clone()
    for i in where:
        t[i] = 0.0
    return t.requires_grad_()


def _inputs_with_zeros(mixed, seed):
    g = torch.Generator().manual_seed(seed)
    x, route, w, b, ext, rm, rv = _bn_inputs(mixed, True, g)
    if mixed:  # one zero in each column: every branch keeps some weight
        route = _zeroed(route, (1, 0), (2, 1))
    w = _zeroed(w, (1, 1))
    ext[0] = _zeroed(ext[0], (0, 1))  # input_scale
    ext[1] = _zeroed(ext[1], (3, 0))  # film_gamma
    return x, route, w, b, ext, rm, rv


@pytest.mark.parametrize("activation", [None, "relu"], ids=["affine", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
def test_gradgradcheck_with_zeros(backend, mixed, training, activation):
    """Second derivatives at exact zeros of the factors that multiply (mix, input scale,
    FiLM gamma, weight): masking a product as where(M != 0, M·t, 0) made its derivative in M
    0 at M = 0 instead of t."""
    x, route, w, b, ext, rm, rv = _inputs_with_zeros(mixed, 6)
    if mixed and training:
        # Mix-weighted statistics need mix >= 0, so finite differences cannot step across a
        # zero weight: the mix is a constant here (with its zeros), and the derivatives in it
        # are checked against the reference below.
        route = route.detach()
        fn = _bn_fn(mixed, True, training, None, rm, rv, activation)
        fn = (lambda f: lambda x, *rest: f(x, route, *rest))(fn)
    else:
        fn = _bn_fn(mixed, True, training, route, rm, rv, activation)
    inputs = (x,) + ((route,) if route.requires_grad else ()) + (w, b, *ext)
    assert torch.autograd.gradgradcheck(fn, inputs, **gg(backend))


def _derivatives(fn, inputs, seed):
    """First derivatives of fn at ``inputs`` for a random dy, taken without and with
    create_graph=True (the kernels' backward, the differentiable one), and a random
    projection of every block of second derivatives."""
    g = torch.Generator().manual_seed(seed)
    y = fn(*inputs)
    dy = torch.randn(y.shape, generator=g, dtype=f64)
    vs = [torch.randn(t.shape, generator=g, dtype=f64) for t in inputs]
    plain = torch.autograd.grad(y, inputs, dy, retain_graph=True)
    first = torch.autograd.grad(y, inputs, dy, create_graph=True)
    # (∂y/∂film_beta is dy itself: a constant, with no graph to differentiate)
    pairs = [(f, v) for f, v in zip(first, vs) if f.requires_grad]
    second = torch.autograd.grad([f for f, _ in pairs], inputs, [v for _, v in pairs],
                                 materialize_grads=True)
    return plain + first + second


@pytest.mark.parametrize("activation", [None, "relu"], ids=["affine", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_derivatives_with_zeros_match_reference(backend, training, activation):
    """The first derivatives and every second derivative (a random projection of each input's
    block) of the mixed op at zero mix weights, input scales, FiLM gammas and weights equal
    plain autograd through `fastrobust.reference` (fp64; the two differ only by rounding)."""
    import fastrobust.reference as R
    x, mix, w, b, ext, rm, rv = _inputs_with_zeros(True, 9)

    def fn(op):
        return lambda x, mix, w, b, s, ga, be: op(
            x, mix, w, b, None if training else rm, None if training else rv,
            training=training, input_scale=s, film_gamma=ga, film_beta=be,
            activation=activation)

    inputs = (x, mix, w, b, *ext)
    got = _derivatives(fn(F.mixed_batch_norm), inputs, 10)
    want = _derivatives(fn(R.mixed_batch_norm), inputs, 10)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("activation", [None, "relu"], ids=["affine", "relu"])
def test_one_value_branch_derivatives_match_reference(backend, activation):
    """1x1 planes and branch 0 weighted on one sample only (the rest of its column exactly 0):
    the forward gives that branch's planes exactly its bias, but the derivatives in the other
    samples' zero weights are not zero (they move the branch's mean). With create_graph=True
    the first and second derivatives equal plain autograd through the reference (fp64; the
    values reach ~w/sqrt(eps)³, hence the relative tolerance)."""
    import fastrobust.reference as R
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 2, generator=g, dtype=f64, requires_grad=True)
    mix = torch.tensor([[1.0, 0.3], [0.0, 0.5], [0.0, 0.7], [0.0, 0.2]], dtype=f64,
                       requires_grad=True)
    w = torch.rand(2, 2, generator=g, dtype=f64).add_(0.5).requires_grad_()
    b = torch.randn(2, 2, generator=g, dtype=f64, requires_grad=True)

    def fn(op):
        return lambda x, mix, w, b: op(x, mix, w, b, training=True, activation=activation)

    inputs = (x, mix, w, b)
    got = _derivatives(fn(F.mixed_batch_norm), inputs, 13)
    want = _derivatives(fn(R.mixed_batch_norm), inputs, 13)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9 * q.abs().max().item())
    assert got[1][1, 0].abs() > 1  # the derivative in mix[1, 0] = 0 that matters


@pytest.mark.parametrize("shape", ["per_sample", "per_channel"])
def test_gradgradcheck_film_with_zero_gamma(backend, shape):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 3, generator=g, dtype=f64, requires_grad=True)
    ps = (2, 2) if shape == "per_sample" else (2,)
    gamma = _zeroed(torch.randn(ps, generator=g, dtype=f64), (0,) if len(ps) == 1 else (0, 1))
    beta = torch.randn(ps, generator=g, dtype=f64, requires_grad=True)
    assert torch.autograd.gradgradcheck(F.film, (x, gamma, beta), **gg(backend))
    assert torch.autograd.gradgradcheck(F.channel_scale, (x, gamma), **gg(backend))


def _penalty(op, x, route, w, b, ext, rm, rv, training):
    """A gradient penalty ||d sum(sin(y)) / dx||², built with create_graph=True."""
    x = x.detach().requires_grad_()
    y = op(x, route, w, b, None if training else rm, None if training else rv,
           training=training, input_scale=ext[0], film_gamma=ext[1], film_beta=ext[2])
    gx, = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
    return gx.square().sum()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_penalty_gradient_at_a_zero_mix_weight(backend, training):
    """The gradient of a gradient penalty with respect to a mix weight that is exactly 0:
    against plain autograd through the reference and against central finite differences of
    the penalty itself (fp64, h = 1e-6: truncation ~h² and rounding ~1e-16/h, both far
    below the 1e-6 relative tolerance)."""
    import fastrobust.reference as R
    x, mix, w, b, ext, rm, rv = _inputs_with_zeros(True, 8)
    args = (w, b, ext, rm, rv, training)
    got, = torch.autograd.grad(_penalty(F.mixed_batch_norm, x, mix, *args), mix)
    want, = torch.autograd.grad(_penalty(R.mixed_batch_norm, x, mix, *args), mix)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    h = 1e-6
    for i in ((1, 0), (2, 1)):  # the zeros
        with torch.no_grad():
            lo, hi = mix.detach().clone(), mix.detach().clone()
            lo[i] -= h
            hi[i] += h
        # In training a mix weight must be >= 0: a one-sided (second-order) difference there.
        if training:
            mid = mix.detach()
            fd = (-3 * _penalty(F.mixed_batch_norm, x, mid, *args)
                  + 4 * _penalty(F.mixed_batch_norm, x, hi, *args)
                  - _penalty(F.mixed_batch_norm, x, hi + (hi - mid), *args)) / (2 * h)
        else:
            fd = (_penalty(F.mixed_batch_norm, x, hi, *args)
                  - _penalty(F.mixed_batch_norm, x, lo, *args)) / (2 * h)
        torch.testing.assert_close(got[i], fd.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
def test_a_nan_stays_in_its_branch_with_create_graph(backend, mixed):
    """A NaN in a sample of branch 0 (and a NaN upstream gradient for that sample, as a loss
    over it gives) leaves branch 1 finite when the backward keeps its graph: its samples'
    input gradients, its parameters' gradients, and the gradient of a penalty on those input
    gradients (the kernels' own backward is checked in test_batch_norm / test_batch_norm_mixed)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 2, 3, 3, generator=g, dtype=f64)
    x[1, 0, 1, 1] = float("nan")
    branch = torch.tensor([0, 0, 1, 1, 0, 1])
    route = nn.functional.one_hot(branch, 2).to(f64).requires_grad_() if mixed else branch
    w = torch.rand(2, 2, generator=g, dtype=f64).add_(0.5).requires_grad_()
    b = torch.randn(2, 2, generator=g, dtype=f64, requires_grad=True)
    x.requires_grad_()
    op = F.mixed_batch_norm if mixed else F.multi_batch_norm
    y = op(x, route, w, b, training=True)
    dy = torch.randn(y.shape, generator=g, dtype=f64)
    dy[1] = float("nan")
    inputs = (x, w, b) + ((route,) if mixed else ())
    gx, gw, gb, *gm = torch.autograd.grad(y, inputs, dy, create_graph=True)
    other = branch == 1
    assert torch.isfinite(gx[other]).all()
    assert torch.isfinite(gw[1]).all() and torch.isfinite(gb[1]).all()
    assert torch.isnan(gw[0, 0])  # the NaN's own (branch, channel) does see it
    if mixed:  # (their weight on branch 0 has a NaN derivative: BN_0 of them is NaN)
        assert torch.isfinite(gm[0][other, 1]).all()
    pw, = torch.autograd.grad(gx[other].square().sum(), w)
    assert torch.isfinite(pw[1]).all()


def test_relu_mask_of_a_one_value_branch_is_the_forwards(backend):
    """The forward gives a one-value branch's plane exactly its bias, here 0, so the ReLU
    passes no gradient there; the plain math rounds to a tiny positive value instead
    (0.7·0.1/0.7 < 0.1). The backward taken with create_graph=True uses the forward's mask:
    its first derivatives equal the kernels' backward."""
    x = torch.tensor([[0.1], [0.5], [-0.4]], dtype=f64, requires_grad=True)  # 1x1 planes
    mix = torch.tensor([[0.7, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=f64, requires_grad=True)
    w = torch.tensor([[1.5], [0.8]], dtype=f64, requires_grad=True)
    b = torch.tensor([[0.0], [0.2]], dtype=f64, requires_grad=True)
    y = F.mixed_batch_norm(x, mix, w, b, training=True, activation="relu")
    assert y[0, 0].item() == 0.0
    inputs = (x, mix, w, b)
    dy = torch.tensor([[1.0], [-0.5], [0.25]], dtype=f64)
    plain = torch.autograd.grad(y, inputs, dy, retain_graph=True)
    graph = torch.autograd.grad(y, inputs, dy, create_graph=True)
    assert plain[3][0, 0].item() == 0.0  # no gradient through the closed ReLU
    for p, q in zip(plain, graph):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
