"""fastrobust.nn: MultiBatchNorm2d, DualBatchNorm2d, convert_multi_bn, routing, and
torch.compile of a model that uses them."""
import copy

import pytest
import torch
from torch import nn

from fastrobust import reference
from fastrobust.nn import DualBatchNorm2d, MultiBatchNorm2d, convert_multi_bn, routing

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
            assert bn._routing == 0
        assert bn._routing == 1
    assert y1.shape == (8, 10)
    with pytest.raises(ValueError, match="convert it first"):
        with routing(small_net(), branch=0):
            pass
    with pytest.raises(ValueError, match="out of range"):
        bn(h, branch=2)


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
