"""The CUDA BN kernels (csrc/cuda/multi_bn.cu) without a GPU: their bodies
(csrc/cuda/multi_bn_body.h) and the binding that prepares their arguments
(csrc/cuda/bn_binding.h) run on the host, index by index in launch order
(fastrobust._C._emulated_cuda_bn_*), and are compared with the CPU kernels on the cases where
the algorithms differ: chunked plane moments, 1x1 maps with a single-sample branch, strided and
channels_last layouts, every extra, training/eval, and the in-kernel NaN poisoning that
replaces the CPU's errors. float64 agrees to rounding; float32 runs the GPU's fp32 statistics
against the CPU's double ones."""
from __future__ import annotations

import itertools

import pytest
import torch

from fastrobust import _C

OPS = torch.ops.fastrobust
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10),
       # fp32 statistics on the GPU path vs double on the CPU: a few ulps of the [K, C] math,
       # amplified by invstd (inputs are O(1), eps 1e-5)
       torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _inputs(shape, K, mixed, dtype, layout, extras, training, running, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[0], shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other sample of a larger batch
        big = torch.randn((2 * N,) + tuple(shape[1:]), generator=g, dtype=dtype)
        x = big[::2]
    kw = {}
    if mixed:
        mix = torch.rand(N, K, generator=g, dtype=dtype) * 2
        mix[:, K - 1] = 0  # a branch nobody uses
        kw.update(branch=None, mix=mix)
    else:
        branch = torch.randint(0, K, (N,), generator=g)
        if N:
            branch[0] = K - 1
        kw.update(branch=branch, mix=None)
    kw["weight"] = torch.randn(K, C, generator=g, dtype=dtype)
    kw["bias"] = torch.randn(K, C, generator=g, dtype=dtype)
    if running:
        kw["running_mean"] = torch.randn(K, C, generator=g, dtype=dtype)
        kw["running_var"] = torch.rand(K, C, generator=g, dtype=dtype) + 0.5
        kw["num_batches_tracked"] = torch.arange(K, dtype=torch.int64)
    else:
        kw.update(running_mean=None, running_var=None, num_batches_tracked=None)
    kw["input_scale"] = (torch.rand(N, C, generator=g, dtype=dtype) + 0.5) \
        if "scale" in extras else None
    kw["film_gamma"] = torch.randn(N, C, generator=g, dtype=dtype) if "gamma" in extras \
        else None
    kw["film_beta"] = torch.randn(N, C, generator=g, dtype=dtype) if "beta" in extras else None
    return x, kw


_ORDER = ("branch", "mix", "weight", "bias", "running_mean", "running_var",
          "num_batches_tracked", "input_scale", "film_gamma", "film_beta")


def _clone(kw):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _forward(fn, x, kw, K, training, cumulative, relu):
    return fn(x, *(kw[k] for k in _ORDER), K, training, 0.1, cumulative, 1e-5, relu)


def _backward(fn, dy, x, kw, K, mean, invstd, planes, batch_stats, relu, needs):
    return fn(dy, x, kw["branch"], kw["mix"], kw["weight"], kw["bias"], mean, invstd, planes,
              kw["input_scale"], kw["film_gamma"], kw["film_beta"], K, batch_stats, relu, needs)


def _compare(shape, K, mixed, dtype, layout, extras, training, running, relu, cumulative=False,
             needs=(True,) * 7, inputs=None):
    x, kw = inputs or _inputs(shape, K, mixed, dtype, layout, extras, training, running)
    kw_cpu, kw_emu = _clone(kw), _clone(kw)
    ref = _forward(OPS.multi_bn, x, kw_cpu, K, training, cumulative, relu)
    out = _forward(_C._emulated_cuda_bn_forward, x, kw_emu, K, training, cumulative, relu)
    tol = TOL[dtype]
    for name, a, b in zip(("y", "mean", "invstd", "planes"), out, ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert out[0].stride() == ref[0].stride() or layout == "strided"
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        if kw[k] is not None:
            torch.testing.assert_close(kw_emu[k], kw_cpu[k], **tol, msg=lambda m, n=k: f"{n}: {m}")
    batch_stats = training or not running
    dy = torch.randn_like(x)
    present = (True, mixed, True, True, "scale" in extras, "gamma" in extras, "beta" in extras)
    needs = [n and p for n, p in zip(needs, present)]  # as the autograd asks
    g_ref = _backward(OPS.multi_bn_backward, dy, x, kw, K, ref[1], ref[2], ref[3], batch_stats,
                      relu, needs)
    g_out = _backward(_C._emulated_cuda_bn_backward, dy, x, kw, K, ref[1], ref[2], ref[3],
                      batch_stats, relu, needs)
    names = ("dx", "dmix", "dweight", "dbias", "dscale", "dgamma", "dbeta")
    for name, a, b, need in zip(names, g_out, g_ref, needs):
        if not need or b.numel() == 0:
            assert a.numel() == 0 or not need, name
            continue
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")
    return out, g_out


SHAPES = {"4d": (6, 3, 12, 12),   # 144 values a plane: 3 chunks (the merge)
          "small": (5, 4, 3, 3),  # one chunk
          "2d": (7, 5),           # S = 1
          }


LAYOUTS = [(shape, layout) for shape in SHAPES
           for layout in ("contiguous", "channels_last", "strided")
           if not (layout == "channels_last" and shape == "2d")]  # channels_last is 4-D


@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=[f"{s}-{l}" for s, l in LAYOUTS])
@pytest.mark.parametrize("mode", ["train", "eval", "no_running"])
def test_matches_cpu_kernels(mixed, shape, layout, mode):
    for extras, relu in ((("scale", "gamma", "beta"), True), ((), False)):
        _compare(SHAPES[shape], 3, mixed, torch.float64, layout, extras, mode == "train",
                 mode != "no_running", relu)


@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
@pytest.mark.parametrize("extras", [(), ("scale",), ("gamma",), ("beta",)])
def test_each_extra_fp32(mixed, extras):
    _compare(SHAPES["4d"], 3, mixed, torch.float32, "contiguous", extras, True, True,
             relu=bool(extras))


def test_cumulative_momentum_and_counter():
    _compare(SHAPES["small"], 3, False, torch.float64, "contiguous", (), True, True, False,
             cumulative=True)


@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
def test_single_value_branch(mixed):
    """1x1 maps, one sample in branch 0: x̂ ≡ 0, the output exactly the bias, dx exactly 0."""
    shape, K = (6, 4, 1, 1), 3
    x, kw = _inputs(shape, K, mixed, torch.float64, "contiguous", ("gamma", "beta"), True, True)
    if mixed:
        kw["mix"][:] = 0
        kw["mix"][0, 0] = 0.7
        kw["mix"][1:, 1] = 1.0
        kw["mix"][1:4, 2] = 0.5
    else:
        kw["branch"][:] = 1
        kw["branch"][0] = 0
    out, g = _compare(shape, K, mixed, torch.float64, "contiguous", ("gamma", "beta"), True,
                      True, relu=True, inputs=(x, kw))
    assert torch.equal(g[0][0], torch.zeros_like(g[0][0]))  # dx of the lone sample
    w0 = 0.7 if mixed else 1.0  # the lone sample's weight in branch 0
    y0 = ((w0 * kw["bias"][0]) * kw["film_gamma"][0] + kw["film_beta"][0]).clamp_min(0)
    assert torch.equal(out[0][0].flatten(), y0)  # exactly the bias, through FiLM and ReLU


def test_eval_dx_only():
    """An attack's backward in eval mode: dx alone (one launch on a GPU)."""
    _compare(SHAPES["4d"], 3, False, torch.float64, "channels_last", ("scale", "gamma"), False,
             True, True, needs=(True, False, False, False, False, False, False))


def test_poisoned_samples():
    """What the CPU kernels reject at once, the device kernels turn into NaN samples (no host
    sync); the other samples are unaffected."""
    shape, K = (5, 3, 4, 4), 3
    x, kw = _inputs(shape, K, False, torch.float64, "contiguous", (), True, False)
    kw["branch"][2] = K  # out of range
    out = _forward(_C._emulated_cuda_bn_forward, x, _clone(kw), K, True, False, False)
    assert torch.isnan(out[0][2]).all() and not torch.isnan(out[0][[0, 1, 3, 4]]).any()
    with pytest.raises(ValueError, match="out of range"):
        _forward(OPS.multi_bn, x, _clone(kw), K, True, False, False)
    x, kw = _inputs(shape, K, True, torch.float64, "contiguous", (), True, False)
    kw["mix"][1, 0] = -0.5
    out = _forward(_C._emulated_cuda_bn_forward, x, _clone(kw), K, True, False, False)
    assert torch.isnan(out[0][1]).all() and not torch.isnan(out[0][[0, 2, 3, 4]]).any()
    with pytest.raises(ValueError, match=">= 0"):
        _forward(OPS.multi_bn, x, _clone(kw), K, True, False, False)


def test_rejects_device_types_it_cannot_emulate():
    x, kw = _inputs(SHAPES["small"], 2, False, torch.float64, "contiguous", (), True, False)
    with pytest.raises(ValueError, match="float32/float64 CPU"):
        _forward(_C._emulated_cuda_bn_forward, x.half(), kw, 2, True, False, False)


def test_planes_ordering_covers_both_index_orders():
    """The elementwise launches order their index space by layout (runs along S, or channels
    fastest): every element is written exactly once either way."""
    for layout, shape in itertools.product(("contiguous", "channels_last"),
                                           ((3, 5, 7, 3), (2, 1, 9, 9))):
        x, kw = _inputs(shape, 2, False, torch.float64, layout, (), True, False)
        out = _forward(_C._emulated_cuda_bn_forward, x, _clone(kw), 2, True, False, False)
        ref = _forward(OPS.multi_bn, x, _clone(kw), 2, True, False, False)
        torch.testing.assert_close(out[0], ref[0], **TOL[torch.float64])


def test_counter_advances_with_fewer_elements_than_branches():
    """The apply launch advances num_batches_tracked from its first K indices: it covers at
    least K even when the batch has fewer runs (2 values, 3 branches)."""
    x, kw = _inputs((2, 1), 3, True, torch.float64, "contiguous", (), True, True)
    kw["mix"][:] = 1.0
    kw_emu, kw_cpu = _clone(kw), _clone(kw)
    _forward(_C._emulated_cuda_bn_forward, x, kw_emu, 3, True, False, False)
    _forward(OPS.multi_bn, x, kw_cpu, 3, True, False, False)
    assert torch.equal(kw_emu["num_batches_tracked"], kw_cpu["num_batches_tracked"])
    assert torch.equal(kw_emu["num_batches_tracked"], kw["num_batches_tracked"] + 1)


def test_empty_batch():
    x, kw = _inputs((0, 3, 4, 4), 2, False, torch.float64, "contiguous", (), True, False)
    out = _forward(_C._emulated_cuda_bn_forward, x, kw, 2, True, False, False)
    assert out[0].shape == x.shape
