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


def _bn_fn(mixed, extras, training, route, rm, rv):
    op = F.mixed_batch_norm if mixed else F.multi_batch_norm

    def fn(x, *rest):
        if mixed:
            route_, rest = rest[0], rest[1:]
        else:
            route_ = route
        w, b, *ext = rest
        kw = dict(input_scale=ext[0], film_gamma=ext[1], film_beta=ext[2],
                  activation="relu") if extras else {}
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


def test_registered_op_double_backward():
    """The registered op (what torch.compile traces) gives the same second derivative."""
    g = torch.Generator().manual_seed(5)
    x, route, w, b, ext, rm, rv = _bn_inputs(False, True, g)

    def fn(x, w, b, s, ga, be):
        return torch.ops.fastrobust.multi_bn(x, route, None, w, b, None, None, None, s, ga, be,
                                             2, True, 0.1, False, 1e-5, True)[0]
    assert torch.autograd.gradgradcheck(fn, (x, w, b, *ext), **GG)
