"""fastrobust.nn: MultiBatchNorm2d, DualBatchNorm2d, convert_multi_bn, routing, and
torch.compile of a model that uses them."""
import contextlib
import copy

import pytest
import torch
from torch import nn

from fastrobust import backends, reference
from fastrobust.nn import (DualBatchNorm2d, FiLM, MixedBatchNorm2d, MultiBatchNorm2d, ScaledConvBN,
                           convert_multi_bn, routing)

TOL32 = dict(rtol=1e-4, atol=2e-5)  # fp32, reductions in another order than eager


def small_net(C=8):
    return nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU(),
        nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 10))


def test_parameters_and_buffers_are_per_branch():
    bn = MultiBatchNorm2d(16, 5)
    assert bn.weight.shape == bn.bias.shape == (5, 16)
    assert bn.running_mean.shape == bn.running_var.shape == (5, 16)
    assert bn.num_batches_tracked.shape == (5,) and bn.num_batches_tracked.dtype == torch.long
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                    "num_batches_tracked"}
    bare = MultiBatchNorm2d(4, 3, affine=False, track_running_stats=False)
    assert bare.weight is None and bare.running_mean is None
    y = bare(torch.randn(6, 4, 2, 2), branch=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert y.shape == (6, 4, 2, 2)
    assert isinstance(DualBatchNorm2d(4), MultiBatchNorm2d) and DualBatchNorm2d(4).num_branches == 2


def test_state_dict_round_trip():
    bn = MultiBatchNorm2d(6, 3)
    bn.train()
    for _ in range(2):
        bn(torch.randn(9, 6, 4, 4), branch=torch.randint(0, 3, (9,)))
    with torch.no_grad():
        bn.weight.uniform_()
    other = MultiBatchNorm2d(6, 3)
    other.load_state_dict(bn.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    bn.eval(), other.eval()
    x, br = torch.randn(5, 6, 4, 4), torch.randint(0, 3, (5,))
    assert torch.equal(bn(x, branch=br), other(x, branch=br))


def test_plain_batch_norm_state_dict_loads_into_every_branch():
    plain = nn.BatchNorm2d(4)
    plain(torch.randn(8, 4, 3, 3) * 2 + 1)
    multi = MultiBatchNorm2d(4, 3)
    multi.load_state_dict(plain.state_dict())
    for k in range(3):
        assert torch.equal(multi.running_mean[k], plain.running_mean)
        assert torch.equal(multi.weight[k], plain.weight)
    assert multi.num_batches_tracked.tolist() == [1, 1, 1]


def _old_format(sd, version=1):
    """``sd`` as torch before 0.4.1 wrote a batch norm's: no num_batches_tracked, and every
    module's metadata at ``version`` (None: a plain dict with no metadata at all)."""
    old = type(sd)((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    if version is not None:
        old._metadata = type(sd._metadata)(
            (k, dict(m, version=version)) for k, m in sd._metadata.items())
    return dict(old) if version is None else old


def _trained(bn, *route, steps=2):
    """``bn`` (a plain or multi-branch BN) after ``steps`` training batches."""
    bn.train()
    with torch.no_grad():
        for _ in range(steps):
            bn(torch.randn(8, bn.num_features, 6, 6) * 2 + 1, *route)
    return bn


@pytest.mark.parametrize("version", [1, None], ids=["version1", "no_metadata"])
@pytest.mark.parametrize("cls", [MultiBatchNorm2d, DualBatchNorm2d, MixedBatchNorm2d])
def test_state_dict_without_num_batches_tracked_loads_as_in_batch_norm(cls, version):
    """The old state-dict format (no num_batches_tracked), in a plain BN's [C] form and in the
    module's own [K, C] form, loads as nn.BatchNorm2d loads it: the counters keep their value,
    0 on a new module; from version 2 on, a missing counter is still a missing key."""
    plain = _trained(nn.BatchNorm2d(4))
    ref = nn.BatchNorm2d(4)
    ref.load_state_dict(_old_format(plain.state_dict(), version))
    multi = cls(4)
    multi.load_state_dict(_old_format(plain.state_dict(), version))
    for k in range(2):
        assert torch.equal(multi.running_mean[k], plain.running_mean)
        assert torch.equal(multi.running_var[k], plain.running_var)
    assert multi.num_batches_tracked.tolist() == [ref.num_batches_tracked.item()] * 2 == [0, 0]

    own = _trained(cls(4), torch.tensor([0, 1] * 4))
    assert own.num_batches_tracked.tolist() == [2, 2]
    fresh = cls(4)
    fresh.load_state_dict(_old_format(own.state_dict(), version))
    assert torch.equal(fresh.running_var, own.running_var)
    assert fresh.num_batches_tracked.tolist() == [0, 0]
    # A module that has counted batches keeps its counters (nn.BatchNorm2d keeps its own).
    _trained(ref).load_state_dict(_old_format(plain.state_dict(), version))
    own.load_state_dict(_old_format(plain.state_dict(), version))
    assert own.num_batches_tracked.tolist() == [ref.num_batches_tracked.item()] * 2 == [2, 2]

    current = _old_format(plain.state_dict(), 2)
    for m in (nn.BatchNorm2d(4), cls(4)):
        with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
            m.load_state_dict(current)


@pytest.mark.parametrize("version", [1, None], ids=["version1", "no_metadata"])
def test_converted_resnet_loads_an_old_state_dict(version):
    """A ResNet converted with convert_multi_bn loads its plain original's state dict in the
    old format: every branch gets the statistics and parameters, counters 0, and every branch
    computes what the original computes."""
    from fastrobust.models.resnet import resnet18
    torch.manual_seed(1)
    orig = resnet18(width=4).train()
    with torch.no_grad():
        orig(torch.randn(8, 3, 8, 8))
    multi = convert_multi_bn(resnet18(width=4), 2)
    multi.load_state_dict(_old_format(orig.state_dict(), version))
    pairs = [(m, o) for m, o in zip(multi.modules(), orig.modules())
             if isinstance(o, nn.BatchNorm2d)]
    assert len(pairs) == 20 and all(isinstance(m, MultiBatchNorm2d) for m, _ in pairs)
    for m, o in pairs:
        for k in range(2):
            assert torch.equal(m.running_mean[k], o.running_mean)
            assert torch.equal(m.weight[k], o.weight)
        assert m.num_batches_tracked.tolist() == [0, 0]
    orig.eval(), multi.eval()
    x = torch.randn(4, 3, 8, 8)
    for k in range(2):
        with routing(multi, branch=k):
            torch.testing.assert_close(multi(x), orig(x), **TOL32)


def test_convert_copies_into_every_branch_and_matches_original():
    net = small_net()
    net.train()
    for _ in range(2):  # non-trivial statistics and parameters
        net(torch.randn(16, 3, 8, 8))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    orig = copy.deepcopy(net)
    multi = convert_multi_bn(net, 3)
    bns = [m for m in multi.modules() if isinstance(m, MultiBatchNorm2d)]
    assert len(bns) == 2 and not any(type(m) is nn.BatchNorm2d for m in multi.modules())
    obn = [m for m in orig.modules() if isinstance(m, nn.BatchNorm2d)]
    for m, o in zip(bns, obn):
        for k in range(3):
            assert torch.equal(m.weight[k], o.weight)
            assert torch.equal(m.running_var[k], o.running_var)
        assert m.num_batches_tracked.tolist() == [2, 2, 2]
    x = torch.randn(6, 3, 8, 8)
    for mode in ("eval", "train"):
        getattr(orig, mode)(), getattr(multi, mode)()
        for k in range(3):  # every branch starts as the original BN
            with routing(multi, branch=k):
                torch.testing.assert_close(multi(x), orig(x), **TOL32)


def test_convert_a_bare_batch_norm_returns_a_new_module():
    bn = nn.BatchNorm2d(5, momentum=None, eps=1e-3, affine=False).eval()
    m = convert_multi_bn(bn, 2)
    assert isinstance(m, MultiBatchNorm2d) and not m.training
    assert m.momentum is None and m.eps == 1e-3 and not m.affine


def test_routing_context_and_explicit_branch():
    net = convert_multi_bn(small_net(), 2).train()
    x = torch.randn(8, 3, 8, 8)
    branch = torch.tensor([0, 1] * 4)
    with pytest.raises(RuntimeError, match="no routing"):
        net(x)
    state = copy.deepcopy(net.state_dict())
    with routing(net, branch=branch):
        y1 = net(x)
    net.load_state_dict(state)
    bn = net[1]
    h = net[0](x)
    y_bn = bn(h, branch=branch)  # explicit routing, same result as the context for this BN
    net.load_state_dict(state)
    with routing(net, branch=branch):
        torch.testing.assert_close(net[1](h), y_bn, rtol=0, atol=0)
    assert bn._routing is None  # restored
    with routing(net, branch=1):
        with routing(net, branch=0):
            assert bn._routing == ("branch", 0)
        assert bn._routing == ("branch", 1)
    assert y1.shape == (8, 10)
    with pytest.raises(ValueError, match="convert it first"):
        with routing(small_net(), branch=0):
            pass
    with pytest.raises(ValueError, match="out of range"):
        bn(h, branch=2)


def test_routing_contexts_exited_out_of_order():
    """Issue 37: enter a, enter b, exit a, exit b (an ExitStack may do this) left the model
    routed with a's branch after the last exit, and the next call used it silently. Each
    exit removes its own routing: b holds until b exits, then the model is unrouted."""
    net = convert_multi_bn(small_net(), 2).eval()
    bn = net[1]
    a, b = routing(net, branch=0), routing(net, branch=1)
    a.__enter__()
    b.__enter__()
    assert bn._routing == ("branch", 1)
    a.__exit__(None, None, None)
    assert bn._routing == ("branch", 1)  # b is still open
    b.__exit__(None, None, None)
    assert bn._routing is None
    with pytest.raises(RuntimeError, match="no routing"):
        net(torch.randn(2, 3, 8, 8))
    with contextlib.ExitStack() as stack:  # and in order, through an ExitStack
        stack.enter_context(routing(net, branch=1))
        stack.enter_context(routing(net, mix=torch.ones(2, 2) / 2))
        assert bn._routing[0] == "mix"
    assert bn._routing is None


def test_per_branch_statistics_are_separate():
    """Clean and adversarial halves keep their own running statistics."""
    bn = DualBatchNorm2d(3, momentum=None)
    clean = torch.randn(8, 3, 4, 4)
    adv = torch.randn(8, 3, 4, 4) * 3 + 5
    bn(torch.cat([clean, adv]), branch=torch.tensor([0] * 8 + [1] * 8))
    torch.testing.assert_close(bn.running_mean[0], clean.mean((0, 2, 3)), **TOL32)
    torch.testing.assert_close(bn.running_mean[1], adv.mean((0, 2, 3)), **TOL32)
    torch.testing.assert_close(bn.running_var[1], adv.var((0, 2, 3)), **TOL32)


def test_module_rejects_non_4d_input():
    with pytest.raises(ValueError, match="4D"):
        MultiBatchNorm2d(3, 1)(torch.randn(2, 3, 4))


class RoutedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = convert_multi_bn(small_net(), 2)

    def forward(self, x, branch):
        with routing(self.net, branch=branch):
            return self.net(x)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = RoutedNet().train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 3, 8, 8)
    branch = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    y_c, y_e = compiled(x, branch), eager(x, branch)
    torch.testing.assert_close(y_c, y_e, **TOL32)
    y_c.square().sum().backward()
    y_e.square().sum().backward()
    for (name, p_c), p_e in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, **TOL32, msg=name)
    for (name, b_c), b_e in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b_c, b_e, **TOL32, msg=name)


def test_module_matches_reference_in_double():
    bn = MultiBatchNorm2d(3, 4, momentum=0.2).double()
    x = torch.randn(10, 3, 5, 5, dtype=torch.float64)
    br = torch.randint(0, 4, (10,))
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(x, branch=br)
    y_ref = reference.multi_batch_norm(x, br, bn.weight, bn.bias, rm, rv, training=True,
                                       momentum=0.2)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(bn.running_var, rv)


# --- MixedBatchNorm2d, FiLM, ScaledConvBN -------------------------------------------------------

def test_mixed_module_soft_and_hard_routing():
    bn = MixedBatchNorm2d(3).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    p = torch.rand(6, dtype=torch.float64)
    mix = torch.stack([1 - p, p], 1)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(x, mix=mix)
    y_ref = reference.mixed_batch_norm(x, mix, bn.weight, bn.bias, rm, rv, training=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(bn.running_mean, rm)
    bn.eval()  # AW-Net at test time: soft mixing with running statistics
    torch.testing.assert_close(bn(x, mix=mix), (1 - p)[:, None, None, None] * bn(x, branch=0)
                               + p[:, None, None, None] * bn(x, branch=1))
    with pytest.raises(ValueError, match="not both"):
        bn(x, branch=0, mix=mix)
    with pytest.raises(ValueError, match=r"mix must be \[N, 2\]"):
        bn(x, mix=torch.rand(6, 3, dtype=torch.float64))


def test_routing_context_with_mix():
    net = convert_multi_bn(small_net(), 2).eval()
    x = torch.randn(4, 3, 8, 8)
    with routing(net, branch=0):
        y0 = net(x)
    with routing(net, branch=1):
        y1 = net(x)
    with routing(net, mix=torch.tensor([[1.0, 0.0]] * 4)):
        torch.testing.assert_close(net(x), y0, **TOL32)
    with routing(net, mix=torch.tensor([[0.0, 1.0]] * 4)):
        torch.testing.assert_close(net(x), y1, **TOL32)
    with pytest.raises(ValueError, match="exactly one"):
        with routing(net, branch=0, mix=torch.ones(4, 2)):
            pass


def test_film_module():
    film = FiLM(3, cond_dim=5, identity_init=True)
    x = torch.randn(4, 3, 2, 2)
    cond = torch.randn(4, 5)
    torch.testing.assert_close(film(x, cond), x)  # identity at init (asked for: issue 38)
    film = FiLM(3, cond_dim=5, identity_init=False)
    g, b = film.gamma_beta(cond)
    assert g.shape == b.shape == (4, 3)
    torch.testing.assert_close(film(x, cond), x * g[:, :, None, None] + b[:, :, None, None],
                               **TOL32)
    film(x, cond).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in film.parameters())
    g1, _ = film.gamma_beta(cond[0])  # one condition for the whole batch: [C]
    assert g1.shape == (3,)
    index = torch.tensor([2, 0, 2, 2, 1, 3])  # distinct conditions gathered per sample
    gi, bi = film.gamma_beta(cond, index)
    assert torch.equal(gi, g[index]) and torch.equal(bi, b[index])
    with pytest.raises(ValueError, match="condition of size 5"):
        film(x, torch.randn(4, 4))


def test_film_gathered_gradient_is_the_same_every_time():
    """The gather of γ, β from distinct conditions (OAT's λ set) has a deterministic backward:
    ``out[index]``'s CPU backward added the [128, 256] rows with float atomics from several
    threads, and the MLP's gradient changed in its last bits from call to call (#31)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the parallel path (xdist workers run one thread)
    try:
        film = FiLM(128, cond_dim=16, identity_init=False)
        cond, index = torch.randn(6, 16), torch.randint(6, (128,))
        dg, db = torch.randn(128, 128), torch.randn(128, 128)

        def grads():
            gamma, beta = film.gamma_beta(cond, index)
            return torch.autograd.grad((gamma * dg + beta * db).sum(), list(film.parameters()))

        first = grads()
        for _ in range(10):
            assert all(torch.equal(a, b) for a, b in zip(first, grads()))
    finally:
        torch.set_num_threads(threads)


def test_fused_bn_film_relu_module_path_matches_three_modules():
    """OAT's BN → FiLM → ReLU through the module's fused arguments equals the three eager
    modules (forward, gradients of x, BN parameters and the FiLM MLP)."""
    torch.manual_seed(0)
    bn = DualBatchNorm2d(4).double()
    film = FiLM(4, cond_dim=3, identity_init=False).double()
    bn_e, film_e = copy.deepcopy(bn), copy.deepcopy(film)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    x_e = x.detach().clone().requires_grad_()
    branch = torch.tensor([0, 0, 0, 1, 1, 1])
    cond = torch.randn(6, 3, dtype=torch.float64)
    g, b = film.gamma_beta(cond)
    y = bn(x, branch=branch, film_gamma=g, film_beta=b, activation="relu")
    y_e = torch.relu(film_e(bn_e(x_e, branch=branch), cond))
    torch.testing.assert_close(y, y_e)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_e.backward(gy)
    torch.testing.assert_close(x.grad, x_e.grad)
    for p, p_e in zip(list(bn.parameters()) + list(film.parameters()),
                      list(bn_e.parameters()) + list(film_e.parameters())):
        torch.testing.assert_close(p.grad, p_e.grad)


def test_scaled_conv_bn_equals_per_sample_scaled_filters():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    block = ScaledConvBN(conv, MixedBatchNorm2d(4).double())
    ref_bn = copy.deepcopy(block.bn)
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    omega = (torch.rand(5, 4, dtype=torch.float64) + 0.5).requires_grad_()
    mix = torch.rand(5, 2, dtype=torch.float64)
    y = block(x, omega, mix=mix)
    scaled = torch.cat([nn.functional.conv2d(x[n:n + 1], omega[n][:, None, None, None]
                                             * conv.weight, padding=1) for n in range(5)])
    y_ref = ref_bn(scaled, mix=mix)
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, omega, gy)
    (g_ref,) = torch.autograd.grad(y_ref, omega, gy)
    torch.testing.assert_close(g, g_ref)
    with pytest.raises(ValueError, match="bias-free"):
        ScaledConvBN(nn.Conv2d(3, 4, 3), MixedBatchNorm2d(4))


class FiLMNet(nn.Module):
    """A block in the OAT form: conv → dual BN → FiLM → ReLU, and a soft-mixed BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = DualBatchNorm2d(4)
        self.film = FiLM(4, cond_dim=2, identity_init=False)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.mbn = MixedBatchNorm2d(4)

    def forward(self, x, branch, cond, mix, omega):
        g, b = self.film.gamma_beta(cond)
        h = self.bn(self.conv(x), branch=branch, film_gamma=g, film_beta=b, activation="relu")
        return self.mbn(self.conv2(h), mix=mix, input_scale=omega).mean((2, 3))


def test_compile_fullgraph_fused_extras_and_mix():
    torch._dynamo.reset()
    model = FiLMNet().train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    args = (torch.randn(6, 3, 6, 6), torch.tensor([0, 1, 0, 1, 1, 0]), torch.randn(6, 2),
            torch.rand(6, 2), torch.rand(6, 4) + 0.5)
    y_c, y_e = compiled(*args), eager(*args)
    torch.testing.assert_close(y_c, y_e, **TOL32)
    y_c.square().sum().backward()
    y_e.square().sum().backward()
    for (name, p_c), p_e in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, **TOL32, msg=name)
    for (name, b_c), b_e in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b_c, b_e, **TOL32, msg=name)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_add_relu_matches_plain_ops(fmt):
    """The residual junction relu(a + b): the fused node gives the plain ops' bits, forward and
    both gradients (a and b may alias, as an identity shortcut's input does); broadcasting
    shapes take the plain ops."""
    from fastrobust.ops.add_relu import add_relu

    a0 = torch.randn(5, 4, 6, 6).contiguous(memory_format=fmt)
    b0 = torch.randn(5, 4, 6, 6).contiguous(memory_format=fmt)
    dy = torch.randn(5, 4, 6, 6)
    results = []
    for fn in (add_relu, lambda a, b: torch.relu(a + b)):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = fn(a, b)
        results.append((y, *torch.autograd.grad(y, (a, b), dy)))
    for got, want in zip(*results):
        assert torch.equal(got, want)
    assert results[0][0].is_contiguous(memory_format=fmt)
    assert "AddRelu" in results[0][0].grad_fn.name()  # the fused node ran
    x = a0.clone().requires_grad_()  # both inputs the same tensor
    gx, = torch.autograd.grad(add_relu(x, x), x, dy)
    assert torch.equal(gx, 2 * torch.where(2 * a0 > 0, dy, 0.0))
    c = torch.randn(4, 1, 1)  # broadcast: the plain ops
    assert torch.equal(add_relu(a0, c), torch.relu(a0 + c))
