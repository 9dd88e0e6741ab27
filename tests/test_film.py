"""film, channel_scale and scale_filters: every backend against the reference and against
the plain PyTorch expressions, [N, C] and [C] forms, layouts, gradients, gradcheck, opcheck,
errors."""
from __future__ import annotations

import pytest
import torch

from fastrobust import functional as F, reference
from test_batch_norm import TOL
from conftest import opcheck_utils

LAYOUTS = ["contiguous", "channels_last", "batch_slice", "no_spatial"]


def _x(layout, dtype):
    if layout == "no_spatial":
        return torch.randn(6, 5, dtype=dtype)
    if layout == "batch_slice":
        return torch.randn(12, 5, 4, 3, dtype=dtype)[::2]
    x = torch.randn(6, 5, 4, 3, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("form", ["NC", "C", "gamma_only", "beta_only", "C_gamma", "C_beta"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_film_matches_reference(backend, layout, form, dtype):
    x = _x(layout, dtype).requires_grad_()
    N, C = x.shape[:2]
    shapes = {"C": ((C,), (C,)), "C_gamma": ((C,), (N, C)), "C_beta": ((N, C), (C,))}
    g_shape, b_shape = shapes.get(form, ((N, C), (N, C)))
    gamma = None if form == "beta_only" else torch.randn(g_shape, dtype=dtype).requires_grad_()
    beta = None if form == "gamma_only" else torch.randn(b_shape, dtype=dtype).requires_grad_()
    y = F.film(x, gamma, beta)
    y_ref = reference.film(x, gamma, beta)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert y.shape == x.shape and y.dtype == x.dtype
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    gy = torch.randn_like(y)
    inputs = [t for t in (x, gamma, beta) if t is not None]
    for g, g_ref, t in zip(torch.autograd.grad(y, inputs, gy),
                           torch.autograd.grad(y_ref, inputs, gy), inputs):
        assert g.shape == t.shape
        torch.testing.assert_close(g, g_ref, **TOL[dtype])


@pytest.mark.parametrize("form", ["NC", "C", "C_gamma"])
def test_film_split_planes(backend, form):
    """Planes long enough that the Triton backward splits each one over S (3 partial sums per
    plane, summed by its second launch); [C] γ, β are summed over the batch as well."""
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, requires_grad=True)
    g = torch.randn((3,) if form != "NC" else (2, 3), dtype=torch.float64, requires_grad=True)
    b = torch.randn((3,) if form == "C" else (2, 3), dtype=torch.float64, requires_grad=True)
    y, y_ref = F.film(x, g, b), reference.film(x, g, b)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    gy = torch.randn_like(y)
    for d, d_ref in zip(torch.autograd.grad(y, (x, g, b), gy),
                        torch.autograd.grad(y_ref, (x, g, b), gy)):
        assert d.shape == d_ref.shape
        torch.testing.assert_close(d, d_ref, **TOL[torch.float64])


def test_film_plain_expression(backend):
    """Against the broadcasting expression users write."""
    x = torch.randn(4, 3, 5, 5)
    g, b = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(F.film(x, g, b), x * g[:, :, None, None] + b[:, :, None, None],
                               **TOL[torch.float32])


@pytest.mark.parametrize("form", ["NC", "C"])
def test_channel_scale(backend, form):
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.randn((4, 3) if form == "NC" else (3,), dtype=torch.float64,
                        requires_grad=True)
    y = F.channel_scale(x, scale)
    sb = scale[:, :, None, None] if form == "NC" else scale[None, :, None, None]
    y_ref = x * sb
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    gy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, (x, scale), gy),
                        torch.autograd.grad(y_ref, (x, scale), gy)):
        torch.testing.assert_close(g, g_ref, **TOL[torch.float64])


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (8, 16), (8,)])
def test_scale_filters(backend, shape):
    """Filter m times ω[m]; conv with scaled filters equals the scaled conv output."""
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    omega = torch.rand(8, dtype=torch.float64, requires_grad=True)
    ws = F.scale_filters(w, omega)
    ws_ref = w * omega.reshape(8, *([1] * (w.dim() - 1)))
    torch.testing.assert_close(ws, ws_ref, **TOL[torch.float64])
    gy = torch.randn_like(ws)
    for g, g_ref in zip(torch.autograd.grad(ws, (w, omega), gy),
                        torch.autograd.grad(ws_ref, (w, omega), gy)):
        torch.testing.assert_close(g, g_ref, **TOL[torch.float64])
    if len(shape) == 4:
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(
            torch.nn.functional.conv2d(x, ws.detach()),
            F.channel_scale(torch.nn.functional.conv2d(x, w.detach()), omega.detach()),
            **TOL[torch.float64])


def test_film_gradcheck_fp64(backend):
    x = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(F.film, (x, g, b), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(F.scale_filters, (x[0].detach().requires_grad_(),
                                                      b), eps=1e-6, atol=1e-6)


def test_film_opcheck(backend):
    from torch.library import opcheck

    for layout in ("contiguous", "channels_last"):
        x = _x(layout, torch.float32)
        g, b, gc, bc = torch.randn(6, 5), torch.randn(6, 5), torch.randn(5), torch.randn(5)
        for gamma, beta in ((g, b), (g, None), (None, b), (gc, bc), (gc, b), (None, bc)):
            opcheck(torch.ops.fastrobust.film.default, (x, gamma, beta),
                    test_utils=opcheck_utils(backend))
        for gamma, per_channel in ((g, [False, False]), (gc, [True, True]), (gc, [True, False]),
                                   (g, [False, True])):
            opcheck(torch.ops.fastrobust.film_backward.default,
                    (torch.randn_like(x), x, gamma, [True, True, True], per_channel),
                    test_utils=opcheck_utils(backend))


def test_film_backward_per_channel_must_match_gamma(backend):
    """The op refuses a per_channel flag that contradicts gamma's shape (no silently wrong
    gradient shape)."""
    x = torch.randn(4, 3, 2, 2)
    for gamma, flag in ((torch.randn(3), False), (torch.randn(4, 3), True)):
        with pytest.raises(RuntimeError, match="per_channel"):
            torch.ops.fastrobust.film_backward(x, x, gamma, [True, True, True], [flag, False])


def test_film_errors():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"\[N, C\] = \[4, 3\] or \[C\]"):
        F.film(x, torch.ones(4, 2))
    with pytest.raises(TypeError, match="floating-point"):
        F.film(x, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, C, \*spatial\]"):
        F.film(torch.randn(3), torch.ones(3))
    with pytest.raises(ValueError, match="omega must have shape"):
        F.scale_filters(torch.randn(4, 3, 3, 3), torch.ones(3))
