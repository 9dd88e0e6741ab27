"""The fused PGD steps (DESIGN §2.5) on every CPU-capable backend against the reference, the
torchattacks bitwise check, and property tests of the projection."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrobust import backends, reference
from fastrobust import functional as F
from baselines import torchattacks_mifgsm_step
from baselines import torchattacks_step as torchattacks_linf
from conftest import opcheck_utils


def make(shape=(6, 3, 5, 7), dtype=torch.float32, lo=0.0, hi=1.0, eps=8 / 255, layout="contig"):
    x = (lo + (hi - lo) * torch.rand(shape, dtype=torch.float64)).to(dtype)
    adv = (x + eps * (2 * torch.rand(shape, dtype=dtype) - 1)).clamp(lo, hi)
    g = torch.randn(shape, dtype=dtype)
    g.view(-1)[::5] = 0  # exact zeros: sign 0, no step
    if layout == "channels_last":
        x, adv, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, adv, g))
    elif layout == "sliced":  # every other sample of a larger batch: not dense
        x, adv, g = (torch.stack([t, t], 1)[:, 0] for t in (x, adv, g))
    return adv, g, x


def per_sample(n, dtype, scale=8 / 255, zeros=True):
    v = scale * torch.rand(n, dtype=dtype)
    if zeros:
        v[::3] = 0
    return v


def bcast(v, x):
    return v.view((-1,) + (1,) * (x.dim() - 1)) if isinstance(v, torch.Tensor) else v


# --- torchattacks bitwise -------------------------------------------------------------------

@pytest.mark.parametrize("eps_kind", ["float", "per_sample"])
@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_linf_is_bitwise_torchattacks(backend, eps_kind, layout):
    adv, _, x = make(layout=layout)
    eps = 8 / 255 if eps_kind == "float" else per_sample(x.shape[0], torch.float32)
    ours, theirs = adv.clone(), adv.clone()
    for _ in range(3):  # a few chained steps with fresh gradients
        g = torch.randn_like(x)
        F.pgd_step_(ours, g, x, eps, 2 / 255)
        theirs = torchattacks_linf(theirs, g, x, bcast(eps, x), 2 / 255)
        assert torch.equal(ours, theirs)


# --- against the reference ------------------------------------------------------------------

CLIPS = [(0.0, 1.0), (-1.0, 2.0), (-0.5, 0.25)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("eps_kind", ["float", "per_sample"])
@pytest.mark.parametrize("alpha_kind", ["float", "per_sample"])
@pytest.mark.parametrize("clip", CLIPS, ids=str)
def test_step_matches_reference(backend, dtype, norm, eps_kind, alpha_kind, clip):
    lo, hi = clip
    scale = 8 / 255 if norm == "linf" else 0.5
    adv, g, x = make(dtype=dtype, lo=lo, hi=hi, eps=scale)
    eps = scale if eps_kind == "float" else per_sample(x.shape[0], dtype, scale)
    alpha = scale / 4 if alpha_kind == "float" else per_sample(x.shape[0], dtype, scale, False)
    want = reference.pgd_step(adv, g, x, eps, alpha, norm, lo, hi)
    got = F.pgd_step_(adv.clone(), g, x, eps, alpha, norm=norm, clip_min=lo, clip_max=hi)
    if norm == "linf":  # the same operations in the same order: exact
        assert torch.equal(got, want)
    else:
        # The kernels scale g by α/‖g‖ and sum the norms in another order: a few ulps of the
        # values' magnitude (|x| <= 2 here).
        tol = 4e-7 if dtype == torch.float32 else 1e-15
        torch.testing.assert_close(got, want, atol=2 * 4 * tol, rtol=0)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "2d", "3d_spatial"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_layouts(backend, layout, norm):
    shape = {"2d": (5, 11), "3d_spatial": (3, 2, 3, 4, 5)}.get(layout, (4, 3, 5, 6))
    adv, g, x = make(shape, layout=layout if layout in ("channels_last", "sliced") else "contig")
    want = reference.pgd_step(adv, g, x, 0.05, 0.02, norm)
    got = adv.clone(memory_format=torch.preserve_format) if layout != "sliced" else adv.clone()
    strides, ptr = got.stride(), got.data_ptr()
    F.pgd_step_(got, g, x, 0.05, 0.02, norm=norm)
    assert got.stride() == strides and got.data_ptr() == ptr  # in place, layout kept
    torch.testing.assert_close(got, want, atol=3e-7 if norm == "l2" else 0, rtol=0)
    if layout == "sliced":  # x_adv itself a non-dense view: updated through the view
        base = torch.stack([adv.clone(), adv.clone()], 1)
        view = base[:, 1]
        F.pgd_step_(view, g, x, 0.05, 0.02, norm=norm)
        torch.testing.assert_close(base[:, 1], want, atol=3e-7 if norm == "l2" else 0, rtol=0)
        assert torch.equal(base[:, 0], adv)  # the other half untouched


def test_mixed_layouts_of_inputs(backend):
    """grad contiguous while x_adv is channels_last (autograd may return either)."""
    adv, g, x = make(layout="channels_last")
    want = reference.pgd_step(adv, g, x, 0.05, 0.02)
    got = adv.clone()
    F.pgd_step_(got, g.contiguous(), x.contiguous(), 0.05, 0.02)
    assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_eps_leaves_samples_clean(backend, norm):
    adv, g, x = make()
    eps = torch.full((x.shape[0],), 0.1)
    eps[1::2] = 0
    got = F.pgd_step_(adv.clone(), g, x, eps, 0.05, norm=norm)
    assert torch.equal(got[1::2], x[1::2])
    assert not torch.equal(got[::2], x[::2])


def test_l2_zero_gradient(backend):
    """A sample with an all-zero gradient takes no step (no 0/0), and is still projected."""
    adv, g, x = make(eps=0.3)
    g[0] = 0
    g[1] = 0
    far = adv.clone()
    far[1] = (x[1] + 0.3).clamp(0, 1)  # outside a 0.05 ball: projected back onto it
    got = F.pgd_step_(far.clone(), g, x, 0.05, 0.1, norm="l2")
    assert torch.isfinite(got).all()
    want = reference.pgd_step(far, g, x, 0.05, 0.1, "l2")
    torch.testing.assert_close(got, want, atol=3e-7, rtol=0)
    assert (got[1] - x[1]).norm() <= 0.05 * (1 + 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay", [1.0, 0.5])
@pytest.mark.parametrize("eps_kind", ["float", "per_sample"])
def test_mifgsm_matches_reference(backend, dtype, decay, eps_kind):
    adv, g, x = make(dtype=dtype)
    g[2] = 0  # all-zero gradient: adds nothing to the momentum
    buf = torch.randn_like(x)
    eps = 8 / 255 if eps_kind == "float" else per_sample(x.shape[0], dtype)
    want_x, want_b = reference.mifgsm_step(adv, g, buf, x, eps, 2 / 255, decay)
    got_x, got_b = adv.clone(), buf.clone()
    F.mifgsm_step_(got_x, g, got_b, x, eps, 2 / 255, decay)
    # g/mean(|g|): the mean's summation order differs, a few ulps of the momentum
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(got_b, want_b, atol=tol, rtol=tol)
    torch.testing.assert_close(got_x, want_x, atol=0, rtol=0)
    assert torch.isfinite(got_b).all()


@pytest.fixture
def split_kernels(monkeypatch):
    """The Triton l2 / MI-FGSM steps in their split form: each sample's sums in chunks (on a
    GPU: fewer than MIN_PROGRAMS / 2 samples, chunks of BLOCK=1024; here chunks of 16 of the
    105 values of a sample)."""
    from fastrobust.ops.pgd import triton as kernels
    monkeypatch.setattr(kernels, "BLOCK", 16)
    with backends.use("triton"):
        yield kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps_kind", ["float", "per_sample"])
@pytest.mark.parametrize("clip", CLIPS[:2], ids=str)
def test_split_l2_matches_reference(split_kernels, dtype, eps_kind, clip):
    """‖δ‖² from Σd², Σd·g and Σg² of one pass: within the same few ulps as the direct sum;
    samples that are projected, that are not, with ε = 0 and with an all-zero gradient."""
    lo, hi = clip
    adv, g, x = make(dtype=dtype, lo=lo, hi=hi, eps=0.5)
    g[1] = 0
    assert split_kernels._split(x.shape[0], x[0].numel())[0] == 7
    eps = 0.5 if eps_kind == "float" else per_sample(x.shape[0], dtype, 0.5)
    want = reference.pgd_step(adv, g, x, eps, 0.125, "l2", lo, hi)
    got = F.pgd_step_(adv.clone(), g, x, eps, 0.125, norm="l2", clip_min=lo, clip_max=hi)
    tol = 4e-7 if dtype == torch.float32 else 1e-15
    torch.testing.assert_close(got, want, atol=2 * 4 * tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_mifgsm_matches_reference(split_kernels, dtype):
    adv, g, x = make(dtype=dtype)
    g[2] = 0
    buf = torch.randn_like(x)
    eps = per_sample(x.shape[0], dtype)
    want_x, want_b = reference.mifgsm_step(adv, g, buf, x, eps, 2 / 255, 0.5)
    got_x, got_b = adv.clone(), buf.clone()
    F.mifgsm_step_(got_x, g, got_b, x, eps, 2 / 255, 0.5)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(got_b, want_b, atol=tol, rtol=tol)
    torch.testing.assert_close(got_x, want_x, atol=0, rtol=0)


@pytest.mark.parametrize("momentum", [False, True], ids=["l2", "mifgsm"])
def test_split_of_large_samples_at_many_samples(split_kernels, monkeypatch, momentum):
    """At any N a sample longer than MAX_CHUNK_BLOCKS blocks is split (on a GPU: 256 samples
    of 3x224x224, 10 chunks each; here 140 samples of 105 values, chunks of 2 blocks of 16):
    the same results as the reference, with per-sample ε and zero gradients."""
    monkeypatch.setattr(split_kernels, "MAX_CHUNK_BLOCKS", 2)
    adv, g, x = make(shape=(140, 3, 5, 7), eps=0.5)
    g[1] = 0
    assert split_kernels._split(140, 105) == (4, 32)  # without the cap: (1, 112)
    eps = per_sample(x.shape[0], torch.float32, 0.5)
    if momentum:
        buf = torch.randn_like(x)
        want_x, want_b = reference.mifgsm_step(adv, g, buf, x, eps, 2 / 255, 0.5)
        got_x, got_b = adv.clone(), buf.clone()
        F.mifgsm_step_(got_x, g, got_b, x, eps, 2 / 255, 0.5)
        torch.testing.assert_close(got_b, want_b, atol=1e-6, rtol=1e-6)  # as above
        torch.testing.assert_close(got_x, want_x, atol=0, rtol=0)
    else:
        want = reference.pgd_step(adv, g, x, eps, 0.125, "l2", 0.0, 1.0)
        got = F.pgd_step_(adv.clone(), g, x, eps, 0.125, norm="l2", clip_min=0.0, clip_max=1.0)
        torch.testing.assert_close(got, want, atol=2 * 4 * 4e-7, rtol=0)  # as above (fp32)


def test_mifgsm_nan_gradient_stays_nan(backend):
    """Only an all-zero gradient is special-cased; a NaN one is not hidden as a zero."""
    adv, g, x = make()
    g[1, 0, 0, 0] = float("nan")
    buf = torch.zeros_like(x)
    F.mifgsm_step_(adv.clone(), g, buf, x, 8 / 255, 2 / 255, 1.0)
    assert torch.isnan(buf[1]).all() and torch.isfinite(buf[0]).all()


def test_mifgsm_is_torchattacks_mifgsm(backend):
    """Three MI-FGSM steps against torchattacks' update, written in eager PyTorch."""
    adv, _, x = make()
    ours, theirs = adv.clone(), adv.clone()
    buf, momentum = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(3):
        g = torch.randn_like(x)
        F.mifgsm_step_(ours, g, buf, x, 8 / 255, 2 / 255, 1.0)
        theirs, momentum = torchattacks_mifgsm_step(theirs, g, momentum, x, 8 / 255, 2 / 255)
        torch.testing.assert_close(buf, momentum, atol=1e-5, rtol=1e-6)
        assert torch.equal(ours, theirs)


# --- random start -------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_init_reproducible_and_in_ball(backend, norm):
    x = torch.rand(8, 3, 6, 6)
    eps = 8 / 255 if norm == "linf" else 0.5
    a = F.pgd_init(x, eps, norm=norm, generator=torch.Generator().manual_seed(3))
    b = F.pgd_init(x, eps, norm=norm, generator=torch.Generator().manual_seed(3))
    c = F.pgd_init(x, eps, norm=norm, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    if norm == "linf":
        assert (a - x).abs().max() <= eps * (1 + 1e-6)
    else:
        assert ((a - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
    # The same generator state gives the same start on every backend.
    with backends.use("eager"):
        e = F.pgd_init(x, eps, norm=norm, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, e, atol=3e-7 if norm == "l2" else 0, rtol=0)


def test_init_distribution(backend):
    """Far from the clip bounds: linf is U(−ε, ε) per element; l2 radii are ε·u^(1/d)."""
    x = torch.full((64, 3, 8, 8), 0.5)
    d = (F.pgd_init(x, 0.1, generator=torch.Generator().manual_seed(0)) - x) / 0.1
    assert d.abs().max() <= 1 + 1e-5
    assert abs(d.mean()) < 0.02  # 12288 draws: std of the mean 0.005
    assert abs((d < -0.5).float().mean() - 0.25) < 0.02
    r = (F.pgd_init(x, 0.2, norm="l2", generator=torch.Generator().manual_seed(0)) - x)
    radius = r.flatten(1).norm(dim=1) / 0.2
    # P(u^(1/192) < 0.98) = 0.98^192 ≈ 0.02: almost every radius is near ε
    assert (radius <= 1 + 1e-5).all() and (radius > 0.98).float().mean() > 0.9
    dirs = r.flatten(1) / r.flatten(1).norm(dim=1, keepdim=True)
    assert dirs.mean(0).norm() < 0.3  # 64 random unit vectors in 192-d: no common direction


def test_init_per_sample_eps_zero(backend):
    x = torch.rand(6, 2, 4, 4)
    eps = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.0, 0.05])
    for norm in ("linf", "l2"):
        a = F.pgd_init(x, eps, norm=norm, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a[::2], x[::2])
        assert not torch.equal(a[1::2], x[1::2])


# --- properties --------------------------------------------------------------------------

@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 4), s=st.integers(1, 40), eps=st.floats(0, 0.5),
       alpha=st.floats(0, 1), lo=st.floats(-1, 0.5), width=st.floats(0, 2),
       norm=st.sampled_from(["linf", "l2"]), steps=st.integers(1, 3),
       seed=st.integers(0, 2 ** 31 - 1))
def test_projection_properties(backend, n, s, eps, alpha, lo, width, norm, steps, seed):
    """Whatever the gradient, the result stays in the ε-ball around x_nat and in the clip
    range (x_nat inside the clip range)."""
    hi = lo + width
    gen = torch.Generator().manual_seed(seed)
    x = lo + width * torch.rand(n, s, generator=gen)
    adv = F.pgd_init(x, eps, norm=norm, clip_min=lo, clip_max=hi, generator=gen)
    for _ in range(steps):
        g = torch.randn(n, s, generator=gen) * 10 ** torch.randint(-6, 6, (1,), generator=gen)
        F.pgd_step_(adv, g, x, eps, alpha, norm=norm, clip_min=lo, clip_max=hi)
    assert adv.min() >= lo and adv.max() <= hi
    # fp32 rounding of x_nat + δ: half an ulp of the values (|x| <= 2.5) per element
    ulp = 2.5 * torch.finfo(torch.float32).eps
    if norm == "linf":
        assert (adv - x).abs().max() <= eps + ulp
    else:
        assert ((adv - x).norm(dim=1) <= eps * (1 + 1e-5) + s ** 0.5 * ulp).all()


# --- op registration, compile, errors -----------------------------------------------------

def test_opcheck(backend):
    adv, g, x = make(shape=(3, 2, 3, 3))
    e = torch.tensor([0.0, 0.1, 0.2])
    for l2 in (False, True):
        torch.library.opcheck(torch.ops.fastrobust.pgd_step.default,
                              (adv.clone(), g, x, e, 0.0, None, 0.05, l2, 0.0, 1.0),
                              test_utils=opcheck_utils(backend))
    torch.library.opcheck(torch.ops.fastrobust.mifgsm_step.default,
                          (adv.clone(), g, torch.zeros_like(x), x, None, 0.1, None, 0.05, 1.0,
                           0.0, 1.0),
                          test_utils=opcheck_utils(backend))
    torch.library.opcheck(torch.ops.fastrobust.pgd_init.default,
                          (torch.rand_like(x) * 2 - 1, x, None, 0.1, None, False, 0.0, 1.0),
                          test_utils=opcheck_utils(backend))


def test_compiles_fullgraph():
    """A compiled graph calls the registered op, which the dispatcher sends to the device's
    kernel (the C++ one here); `backends.use` forces eager calls only (torch.compile does not
    trace under a dispatch mode), so this runs without one."""
    adv, g, x = make()

    def attack_steps(adv, g, x):
        for _ in range(2):
            F.pgd_step_(adv, g, x, 0.03, 0.01)
        return adv

    want = attack_steps(adv.clone(), g, x)
    got = torch.compile(attack_steps, fullgraph=True)(adv.clone(), g, x)
    assert torch.equal(got, want)


def test_leaf_that_requires_grad():
    adv, g, x = make()
    adv.requires_grad_(True)
    F.pgd_step_(adv, g, x, 0.03, 0.01)
    assert adv.is_leaf and adv.requires_grad and adv.grad is None


def test_in_place_update_is_seen_by_autograd():
    """A graph that saved x_adv refuses to backpropagate after the in-place step, as for any
    in-place torch op (the version counter moves)."""
    adv, g, x = make()
    w = torch.ones_like(adv, requires_grad=True)
    loss = (w * adv).sum()  # saves adv for w's gradient
    F.pgd_step_(adv, g, x, 0.03, 0.01)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
    buf, w2 = torch.zeros_like(x), torch.ones_like(x, requires_grad=True)
    loss = (w2 * buf).sum()
    F.mifgsm_step_(adv, g, buf, x, 0.03, 0.01)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_empty_batch(backend):
    x = torch.rand(0, 3, 4, 4)
    F.pgd_step_(x.clone(), x, x, 0.1, 0.1)
    F.pgd_step_(x.clone(), x, x, 0.1, 0.1, norm="l2")
    assert F.pgd_init(x, 0.1).shape == x.shape


def test_errors():
    adv, g, x = make()
    with pytest.raises(ValueError, match="shape"):
        F.pgd_step_(adv, g[:2], x, 0.1, 0.1)
    with pytest.raises(TypeError, match="float64"):
        F.pgd_step_(adv, g.double(), x, 0.1, 0.1)
    with pytest.raises(ValueError, match="norm"):
        F.pgd_step_(adv, g, x, 0.1, 0.1, norm="l1")
    with pytest.raises(ValueError, match="non-negative"):
        F.pgd_step_(adv, g, x, -0.1, 0.1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        F.pgd_step_(adv, g, x, torch.tensor([0.1, -0.1, 0, 0, 0, 0]), 0.1)
    with pytest.raises(ValueError, match=r"per sample, shape \[N\]"):
        F.pgd_step_(adv, g, x, torch.ones(3), 0.1)
    with pytest.raises(ValueError, match="clip_min"):
        F.pgd_step_(adv, g, x, 0.1, 0.1, clip_min=1.0, clip_max=0.0)
    with pytest.raises(ValueError, match="finite"):
        F.pgd_step_(adv, g, x, float("nan"), 0.1)
    with pytest.raises(TypeError, match="integer|floating"):
        F.pgd_step_(adv.long(), g, x, 0.1, 0.1)
    with pytest.raises(ValueError, match="momentum_buf"):
        F.mifgsm_step_(adv, g, torch.zeros(2), x, 0.1, 0.1)
    with pytest.raises(ValueError, match="norm"):
        F.pgd_init(x, 0.1, norm="linf2")
