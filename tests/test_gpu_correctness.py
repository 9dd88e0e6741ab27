"""The BN family on a GPU at training shapes, against the fp64 reference, each call repeated and
compared bitwise. They skip without CUDA; `benchmarks/gpu_validate.sh` runs them with the
compiled kernels (TRITON_INTERPRET=0) on every backend that serves CUDA tensors.

Why these shapes: on an H200 the 858ad8d statistics kernel loaded mean / invstd right after other
threads of its program stored them. The results were right for K=5 and for 256×512×4×4, and
wrong (up to inf/NaN, different on every call) for K=2, 3 at 8×16×6×6 ... 256×64×32×32 and for
the mixed BN at C=24 and 40: the Triton interpreter, which runs a program as one vector
operation, never showed it. A race shows as results that change between identical calls, so
every case runs three times and the three must agree bit for bit.

Tolerances, by dtype: fp32 statistics over up to 256·32·32 values per (branch, channel), summed
in another order than the fp64 reference: ≈ sqrt(n)·2^-24 relative, so the norm-relative error
‖out − ref‖/‖ref‖ of each result must be ≤ 1e-5 and no element may be off by more than 1e-3 of
the result's largest magnitude (a race puts whole channels off by O(1)). bf16 outputs carry one
rounding to 8 significant bits (2^-8 relative), their gradients in bf16 the same plus the fp32
error above: 1e-2 norm-relative, 2^-6 of the largest magnitude per element.
"""
from __future__ import annotations

import pytest
import torch

from conftest import cuda_skip_reason
from fastrobust import backends, functional as F, reference

pytestmark = pytest.mark.skipif(cuda_skip_reason() is not None,
                                reason=cuda_skip_reason() or "")

N = 256
# (C, H·W): every C ∈ {24, 64, 256, 512} at 32², 8² and 4² (the stages of a CIFAR ResNet and
# the widths between), with the spatial size as a square.
SHAPES = [(C, hw) for C in (24, 64, 256, 512) for hw in (32, 8, 4)]
TOL = {torch.float32: (1e-5, 1e-3), torch.bfloat16: (1e-2, 2 ** -6)}


def _backends(op: str = "multi_bn"):
    """The dispatcher's own path on CUDA ("default"), and each other backend that can serve
    CUDA tensors in this build, called through `backends.use`."""
    names = [None]
    if cuda_skip_reason() is None:
        chosen = backends.choose(op, "cuda")
        names += [b for b in ("triton",)
                  if b != chosen and not backends.not_supported_reasons(b, op, "cuda")]
    return [pytest.param(b, id=b or "default") for b in names]


def _routing(kind: str, K: int, gen) -> torch.Tensor:
    """halves: contiguous equal blocks (OAT's clean / adversarial halves for K=2); random;
    empty: random over branches 0..K-2, so branch K-1 sees no sample."""
    if kind == "halves":
        return torch.arange(N) * K // N
    if kind == "random":
        return torch.randint(0, K, (N,), generator=gen)
    return torch.randint(0, K - 1, (N,), generator=gen)


def _close(name, got, want, dtype):
    rel_norm, rel_max = TOL[dtype]
    got, want = got.double(), want.double().to(got.device)  # compared on the GPU
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = want.abs().max().clamp_min(1e-30)
    err = (got - want).norm() / want.norm().clamp_min(1e-30)
    assert err <= rel_norm, f"{name}: ‖out − ref‖/‖ref‖ = {err:.3g} > {rel_norm}"
    worst = (got - want).abs().max() / scale
    assert worst <= rel_max, f"{name}: max |out − ref| = {worst:.3g} of max |ref| > {rel_max}"


def _run_bn(x, route, mixed, w, b, rm0, rv0, dy, training, extras=(), repeats=3):
    """`repeats` identical calls (forward, running stats, gradients); returns the first and
    asserts the others equal it bitwise."""
    runs = []
    for _ in range(repeats):
        xs = x.detach().requires_grad_()
        ws, bs = (t.detach().requires_grad_() for t in (w, b))
        ext = [t.detach().requires_grad_() for t in extras]
        rm, rv = rm0.clone(), rv0.clone()
        kw = dict(training=training, momentum=0.1)
        if ext:
            kw.update(input_scale=ext[0], film_gamma=ext[1], film_beta=ext[2],
                      activation="relu")
        r = route.detach().requires_grad_() if mixed else route
        fn = F.mixed_batch_norm if mixed else F.multi_batch_norm
        if not mixed:
            kw["num_branches"] = w.shape[0]
        y = fn(xs, r, ws, bs, rm, rv, **kw)
        inputs = [xs, ws, bs, *ext] + ([r] if mixed else [])
        grads = torch.autograd.grad(y, inputs, dy)
        runs.append([y, rm, rv, *grads])
    for i, run in enumerate(runs[1:], 2):
        for j, (a, e) in enumerate(zip(run, runs[0])):
            assert torch.equal(a, e), f"call {i} differs from call 1 in result {j} (a race)"
    return runs[0]


def _reference(x, route, mixed, w, b, rm0, rv0, dy, training, extras=()):
    d = torch.float64
    xs = x.detach().to(d).requires_grad_()
    ws, bs = (t.detach().to(d).requires_grad_() for t in (w, b))
    ext = [t.detach().to(d).requires_grad_() for t in extras]
    rm, rv = rm0.to(d), rv0.to(d)
    kw = dict(training=training, momentum=0.1)
    if ext:
        kw.update(input_scale=ext[0], film_gamma=ext[1], film_beta=ext[2], activation="relu")
    r = route.detach().to(d).requires_grad_() if mixed else route
    if mixed:
        y = reference.mixed_batch_norm(xs, r, ws, bs, rm, rv, **kw)
    else:
        y = reference.multi_batch_norm(xs, r, ws, bs, rm, rv, num_branches=w.shape[0], **kw)
    inputs = [xs, ws, bs, *ext] + ([r] if mixed else [])
    return [y, rm, rv, *torch.autograd.grad(y, inputs, dy.to(d))]


def _inputs(C, hw, K, dtype, channels_last, gen):
    x = torch.randn(N, C, hw, hw, generator=gen) * 2 + 1
    dy = torch.randn(N, C, hw, hw, generator=gen)
    w = torch.rand(K, C, generator=gen) + 0.5
    b = torch.randn(K, C, generator=gen)
    rm = torch.randn(K, C, generator=gen)
    rv = torch.rand(K, C, generator=gen) + 0.5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, dy = (t.to("cuda", dtype).contiguous(memory_format=fmt) for t in (x, dy))
    return x, dy, *(t.cuda() for t in (w, b, rm, rv))


def _names(mixed, extras):
    return (["y", "running_mean", "running_var", "dx", "dweight", "dbias"]
            + (["dscale", "dgamma", "dbeta"] if extras else []) + (["dmix"] if mixed else []))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("routing", ["halves", "random", "empty"])
@pytest.mark.parametrize("K", [2, 3, 5])
@pytest.mark.parametrize("C,hw", SHAPES, ids=[f"C{c}-{h}x{h}" for c, h in SHAPES])
def test_routed_bn_training_shapes(C, hw, K, routing, layout, backend):
    gen = torch.Generator().manual_seed(C * 1000 + hw * 10 + K)
    x, dy, w, b, rm, rv = _inputs(C, hw, K, torch.float32, layout == "channels_last", gen)
    branch = _routing(routing, K, gen).cuda()
    with backends.use(backend):
        got = _run_bn(x, branch, False, w, b, rm, rv, dy, True)
    want = _reference(x, branch, False, w, b, rm, rv, dy, True)
    for name, g, e in zip(_names(False, False), got, want):
        _close(name, g, e, torch.float32)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
@pytest.mark.parametrize("C", [24, 40, 64])
def test_extras_training_shapes(C, mixed, training, backend):
    """Input scale, FiLM and ReLU fused (OAT's BN → FiLM → ReLU; AW-Net's scaled input), K=2,
    and the mixed BN at widths that are not a multiple of 32."""
    gen = torch.Generator().manual_seed(C + 7 * mixed + 3 * training)
    x, dy, w, b, rm, rv = _inputs(C, 16, 2, torch.float32, False, gen)
    ext = [(torch.rand(N, C, generator=gen) + 0.5).cuda() for _ in range(3)]
    route = (torch.rand(N, 2, generator=gen).cuda() if mixed
             else _routing("halves", 2, gen).cuda())
    with backends.use(backend):
        got = _run_bn(x, route, mixed, w, b, rm, rv, dy, training, ext)
    want = _reference(x, route, mixed, w, b, rm, rv, dy, training, ext)
    for name, g, e in zip(_names(mixed, True), got, want):
        _close(name, g, e, torch.float32)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("C", [24, 40, 1100])
def test_mixed_bn_widths(C, training, layout, backend):
    """Soft mixing, K=2, at widths that are not a multiple of 32 (the H200 found every
    channel off by up to 18 at C=24 and 40) and one past a thousand."""
    gen = torch.Generator().manual_seed(C + training)
    x, dy, w, b, rm, rv = _inputs(C, 8, 2, torch.float32, layout == "channels_last", gen)
    mix = torch.rand(N, 2, generator=gen).cuda()
    with backends.use(backend):
        got = _run_bn(x, mix, True, w, b, rm, rv, dy, training)
    want = _reference(x, mix, True, w, b, rm, rv, dy, training)
    for name, g, e in zip(_names(True, False), got, want):
        _close(name, g, e, torch.float32)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
@pytest.mark.parametrize("C,hw", [(64, 32), (256, 8), (512, 4)], ids=["C64", "C256", "C512"])
def test_bf16_inputs_fp32_parameters(C, hw, mixed, layout, backend):
    """What autocast gives a BN: bf16 activations, fp32 parameters and statistics."""
    gen = torch.Generator().manual_seed(C + mixed)
    x, dy, w, b, rm, rv = _inputs(C, hw, 2, torch.bfloat16, layout == "channels_last", gen)
    route = (torch.rand(N, 2, generator=gen).cuda() if mixed
             else _routing("halves", 2, gen).cuda())
    with backends.use(backend):
        got = _run_bn(x, route, mixed, w, b, rm, rv, dy, True)
    assert got[0].dtype == torch.bfloat16 and got[4].dtype == torch.float32
    want = _reference(x, route, mixed, w, b, rm, rv, dy, True)
    for name, g, e in zip(_names(mixed, False), got, want):
        _close(name, g, e, torch.bfloat16 if name in ("y", "dx") else torch.float32)


@pytest.mark.parametrize("backend", _backends("film"))
@pytest.mark.parametrize("per_channel", [False, True], ids=["NxC", "C"])
def test_film_training_shape(per_channel, backend):
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(N, 64, 32, 32, generator=gen)).cuda()
    dy = torch.randn(N, 64, 32, 32, generator=gen).cuda()
    shape = (64,) if per_channel else (N, 64)
    gamma, beta = (torch.randn(shape, generator=gen).cuda() for _ in range(2))
    runs = []
    for _ in range(3):
        leaves = [t.detach().requires_grad_() for t in (x, gamma, beta)]
        with backends.use(backend):
            y = F.film(*leaves)
            runs.append([y, *torch.autograd.grad(y, leaves, dy)])
    for run in runs[1:]:
        assert all(torch.equal(a, e) for a, e in zip(run, runs[0])), "calls differ (a race)"
    leaves = [t.detach().double().requires_grad_() for t in (x, gamma, beta)]
    y = reference.film(*leaves)
    want = [y, *torch.autograd.grad(y, leaves, dy.double())]
    for name, g, e in zip(["y", "dx", "dgamma", "dbeta"], runs[0], want):
        _close(name, g, e, torch.float32)


def test_no_python_frame_inside_the_op_on_cuda():
    """In a CUDA build the CUDA key's kernel is C++ (csrc/launch/plans.cpp): after the first call
    of a signature, which records its plan, no Python frame is entered while an op runs: the
    calls were replayed."""
    import host_frames

    from fastrobust import _C
    assert _C.CUDA_LAUNCH_PATH, "a CUDA torch builds the C++ launch path (setup.py)"
    with torch.no_grad():
        for name, fn in host_frames.cases("cuda").items():
            fn()
            replays = _C._plan_stats()["replayed_calls"]
            c = host_frames.FrameCounter.count(fn)
            assert c.inside == 0, (name, c.inside_names, _C._plan_refusals())
            if "F.batch_norm" not in name:
                assert _C._plan_stats()["replayed_calls"] > replays, name


@pytest.mark.parametrize("steps", [2, 7])
def test_graphed_pgd_takes_every_step(steps):
    """PGD on CUDA inputs replays a captured step (the default): the same adversarial examples
    as the eager attack, step for step (858ad8d's graphed attack ran one step too few)."""
    from fastrobust.attacks import PGD
    from fastrobust.models import resnet18
    from fastrobust.nn import convert_multi_bn
    torch.manual_seed(0)
    model = convert_multi_bn(resnet18(num_classes=10, width=16), 2).cuda().eval()
    x = torch.rand(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    runs = [PGD(model, steps=steps, cuda_graph=g,
                generator=torch.Generator(device="cuda").manual_seed(1))(x, y, branch=1)
            for g in (False, None)]
    assert torch.equal(runs[0], runs[1])
    one_less = PGD(model, steps=steps - 1, cuda_graph=False,
                   generator=torch.Generator(device="cuda").manual_seed(1))(x, y, branch=1)
    assert not torch.equal(one_less, runs[1])


def test_a_kept_attack_graph_replays_new_inputs():
    """The second call of a graphed PGD with the same signature replays the kept graph on its
    own inputs (copied into the static ones): the eager attack's result, bitwise."""
    from fastrobust.attacks import PGD
    from fastrobust.models import resnet18
    from fastrobust.nn import convert_multi_bn
    torch.manual_seed(0)
    model = convert_multi_bn(resnet18(num_classes=10, width=16), 2).cuda().eval()
    graphed = PGD(model, steps=3, generator=torch.Generator(device="cuda").manual_seed(1))
    eager = PGD(model, steps=3, cuda_graph=False,
                generator=torch.Generator(device="cuda").manual_seed(1))
    for _ in range(3):
        x = torch.rand(16, 3, 32, 32, device="cuda")
        y = torch.randint(0, 10, (16,), device="cuda")
        branch = torch.randint(0, 2, (16,), device="cuda")
        assert torch.equal(graphed(x, y, branch=branch), eager(x, y, branch=branch))
    assert len(graphed._graphs) == 1
