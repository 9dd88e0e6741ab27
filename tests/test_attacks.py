"""fastrobust.attacks: torchattacks-equivalent results, the bookkeeping promises (eval mode,
no parameter gradients, per-sample eps, conditioning) and evaluation on a trained model."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastrobust import functional as FF
from fastrobust.attacks import (FGSM, MIFGSM, PGD, accuracy, attack_suite, batches_of, cw_loss,
                                evaluate, robust_accuracy, weighted_robust_accuracy)
from baselines import torchattacks_mifgsm_step, torchattacks_pgd
from fastrobust.nn import MultiBatchNorm2d, convert_multi_bn


def small_cnn(in_ch=3, classes=10):
    return nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, classes))


def data(n=12, shape=(3, 10, 10)):
    return torch.rand(n, *shape), torch.randint(0, 10, (n,))


def test_pgd_is_torchattacks_pgd(backend):
    """Same start, same model: the whole attack is bitwise torchattacks' loop (the model sees
    x's own layout, so its gradients are the eager ones)."""
    model = small_cnn().eval()
    x, y = data()
    atk = PGD(model, 8 / 255, 2 / 255, 5, generator=torch.Generator().manual_seed(0),
              memory_format=torch.preserve_format)
    got = atk(x, y)
    start = FF.pgd_init(x, 8 / 255, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, torchattacks_pgd(model, x, y, 8 / 255, 2 / 255, 5, start))


def test_channels_last_attack_keeps_layout_and_strength():
    """The default CPU layout (channels_last for the model) changes only rounding: the result
    is in x's layout, inside the ball, and as strong as the eager-layout attack."""
    model = small_cnn().eval()
    x, y = data(32)
    fast = PGD(model, 8 / 255, 2 / 255, 5, random_start=False)(x, y)
    ref = PGD(model, 8 / 255, 2 / 255, 5, random_start=False,
              memory_format=torch.preserve_format)(x, y)
    assert fast.is_contiguous() and (fast - x).abs().max() <= 8 / 255 + 1e-7
    # a gradient's sign can flip where it is ~0, so a few elements may differ by a step
    assert (fast != ref).float().mean() < 0.05


def test_fgsm_is_torchattacks_fgsm(backend):
    model = small_cnn().eval()
    x, y = data()
    got = FGSM(model, 8 / 255, memory_format=torch.preserve_format)(x, y)
    xr = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)[0]
    want = torch.clamp(x + 8 / 255 * grad.sign(), 0, 1)
    # x + clamp((x + ε·s) − x, ±ε) rounds to x + ε·s up to one ulp of x
    torch.testing.assert_close(got, want, atol=1.2e-7, rtol=0)


def test_mifgsm_is_torchattacks_mifgsm(backend):
    model = small_cnn().eval()
    x, y = data()
    got = MIFGSM(model, 8 / 255, 2 / 255, 4, memory_format=torch.preserve_format)(x, y)
    adv, momentum = x.clone(), torch.zeros_like(x)
    for _ in range(4):
        adv.requires_grad = True
        grad = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)[0]
        adv, momentum = torchattacks_mifgsm_step(adv, grad, momentum, x, 8 / 255, 2 / 255)
    # the per-sample mean is summed in another order; a sign can only flip at ~0 momentum
    assert (got != adv).float().mean() < 1e-3


def test_l2_pgd_stays_in_ball():
    model = small_cnn().eval()
    x, y = data()
    x_adv = PGD(model, 0.5, 0.2, 5, norm="l2")(x, y)
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.5 * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_modes_restored_and_eval_during_attack():
    model = small_cnn()
    model.train()
    model[1].eval()  # a user's frozen BN stays frozen
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(m.training))
             for m in model.modules()]
    before = [m.training for m in model.modules()]
    rm = model[1].running_mean.clone()
    PGD(model, steps=2)(*data())
    assert seen and not any(seen)
    assert [m.training for m in model.modules()] == before
    assert torch.equal(model[1].running_mean, rm)
    for h in hooks:
        h.remove()


def test_no_parameter_gradients():
    model = small_cnn()
    model[0].bias.requires_grad_(False)  # a user's frozen parameter stays frozen
    computed, seen = [], []
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(lambda g: computed.append(g))
    model.register_forward_hook(
        lambda m, i, o: seen.append(any(p.requires_grad for p in m.parameters())))
    for atk in (PGD(model, steps=2), FGSM(model), MIFGSM(model, steps=2)):
        atk(*data())
    assert computed == [] and seen and not any(seen)  # not even computed inside
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, False] + [True] * 6


def test_per_sample_eps_zero_leaves_clean(backend):
    model = small_cnn().eval()
    x, y = data()
    eps = torch.linspace(0, 8 / 255, 4).repeat(3)  # 0, 1/3, 2/3, 1 of 8/255, three times
    for atk in (PGD(model, eps, 2 / 255, 3), FGSM(model, eps), MIFGSM(model, eps, 2 / 255, 3),
                PGD(model, eps * 40, 0.2, 3, norm="l2")):
        x_adv = atk(x, y)
        assert torch.equal(x_adv[::4], x[::4])
        assert not torch.equal(x_adv[3::4], x[3::4])
    # a call may override eps
    x_adv = PGD(model, 8 / 255, 2 / 255, 2)(x, y, eps=torch.zeros(12))
    assert torch.equal(x_adv, x)


def test_routing_and_context_reach_the_model():
    model = convert_multi_bn(small_cnn(), 2).eval()
    bn = next(m for m in model.modules() if isinstance(m, MultiBatchNorm2d))
    routes = []
    bn.register_forward_pre_hook(lambda m, i: routes.append(m._routing))
    x, y = data()
    PGD(model, steps=2)(x, y, branch=1)
    assert routes and all(r == ("branch", 1) for r in routes)
    assert bn._routing is None  # restored
    mix = torch.rand(12, 2)
    routes.clear()
    PGD(model, steps=1)(x, y, mix=mix)
    assert all(r[0] == "mix" and r[1] is mix for r in routes)

    entered = []

    @contextlib.contextmanager
    def condition():
        entered.append("in")
        yield
        entered.append("out")

    PGD(model, steps=3)(x, y, branch=0, context=condition())
    assert entered == ["in", "out"]  # once around the attack, not per step


def test_forward_kwargs():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def forward(self, x, temperature=1.0):
            return self.net(x) / temperature

    model = Scaled().eval()
    x, y = data()
    calls = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    PGD(model, steps=2)(x, y, temperature=2.0)
    assert calls == [{"temperature": 2.0}] * 2


def test_cw_loss():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    # sample 0: margin 2 (correct, loss −2); sample 1: margin −2 (wrong, clamped at 0)
    assert cw_loss(logits, y).item() == pytest.approx(-1.0)
    assert cw_loss(logits, y, kappa=5.0).item() == pytest.approx(0.0)


def test_cuda_graph_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        PGD(small_cnn(), steps=3, cuda_graph=True)(*data())
    with pytest.raises(TypeError, match="cuda_graph must be None, True or False"):
        PGD(small_cnn(), cuda_graph="yes")


def test_the_default_runs_cpu_inputs_eagerly():
    """cuda_graph=None (the default) graphs CUDA inputs only: on the CPU it is the eager
    attack, bitwise."""
    model, (x, y) = small_cnn(), data()
    a = PGD(model, steps=3, generator=torch.Generator().manual_seed(0))(x, y)
    b = PGD(model, steps=3, cuda_graph=False, generator=torch.Generator().manual_seed(0))(x, y)
    assert torch.equal(a, b)


def test_attack_errors():
    model = small_cnn()
    with pytest.raises(ValueError, match="norm"):
        PGD(model, norm="l1")
    with pytest.raises(ValueError, match="loss"):
        PGD(model, loss="hinge")
    with pytest.raises(ValueError, match="steps"):
        PGD(model, steps=-1)
    with pytest.raises(ValueError, match="y must be"):
        PGD(model)(torch.rand(4, 3, 8, 8), torch.zeros(3, dtype=torch.long))


# --- evaluation on a trained model (scikit-learn's digits) --------------------------------

@pytest.fixture(scope="module")
def digits_model():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 16, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(300):
        i = torch.randint(0, len(tr), (128,), generator=g)
        loss = F.cross_entropy(model(x[tr][i]), y[tr][i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, batches_of(x[te], y[te], 128)


def test_trained_model_robustness(digits_model):
    model, loader = digits_model
    sa = accuracy(model, loader, progress=False)
    ra7 = robust_accuracy(model, loader, PGD(model, 0.1, 0.025, 7, random_start=False),
                          progress=False)
    ra20 = robust_accuracy(model, loader, PGD(model, 0.1, 0.025, 20, random_start=False),
                           progress=False)
    assert sa > 0.9  # the model has learned the task
    assert ra7 < sa - 0.1  # an undefended model loses accuracy under attack
    assert ra20 <= ra7  # more steps never make this attack weaker here


def test_evaluate_report(digits_model):
    model, loader = digits_model
    suite = attack_suite(model, eps=0.1, alpha=0.025, pgd_steps=(7,))
    report = evaluate(model, loader, suite, progress=False)
    assert set(report["RA"]) == {"FGSM", "PGD-7", "MI-FGSM", "CW-inf"}
    assert report["n"] == 397
    assert report["SA"] == pytest.approx(accuracy(model, loader, progress=False))
    for name, ra in report["RA"].items():
        assert 0 <= ra < report["SA"], name
        assert report["WRA"][name] == pytest.approx(weighted_robust_accuracy(report["SA"], ra))
    assert report["RA"]["PGD-7"] <= report["RA"]["FGSM"]


class _StepsAsCalls:
    """PGD's captured-step API with the step itself as the "graph": what a replay of the
    captured step computes, on the CPU (the CUDA graphs run in tests/test_gpu_correctness)."""
    captures = 0

    @staticmethod
    def eager(step):
        step()

    @classmethod
    def capture(cls, step):
        cls.captures += 1
        return step

    @staticmethod
    def replay(graph):
        graph()


def test_a_captured_attack_step_is_kept_per_signature(monkeypatch):
    """The captured step is reused by the next call with the same signature (its inputs
    copied into the static ones): every call gives bitwise the eager attack, and only a new
    signature (shape, float eps, routing kind) captures again; at most MAX_GRAPHS are kept."""
    from fastrobust.attacks import attacks as A
    monkeypatch.setattr(PGD, "_graphed", lambda self, *a: self._graph_steps(*a, _StepsAsCalls))
    monkeypatch.setattr(_StepsAsCalls, "captures", 0)
    model = convert_multi_bn(small_cnn(), 2).eval()
    graphed = PGD(model, steps=3, cuda_graph=True, generator=torch.Generator().manual_seed(0))
    eager = PGD(model, steps=3, cuda_graph=False, generator=torch.Generator().manual_seed(0))
    calls = [(data(), dict(branch=torch.tensor([0, 1] * 6))),
             (data(), dict(branch=torch.tensor([1, 1, 0] * 4))),  # same signature
             (data(), dict(branch=1)),                             # an int: a new one
             (data(), dict(branch=torch.tensor([0, 1] * 6), eps=4 / 255)),  # another eps
             (data(), dict(branch=torch.tensor([0, 1] * 6)))]     # the first one, again
    captures = []
    for (x, y), kw in calls:
        want = eager(x, y, **kw)
        got = graphed(x, y, **kw)
        assert torch.equal(got, want)
        captures.append(_StepsAsCalls.captures)
    assert captures == [1, 1, 2, 3, 4]  # the first signature was dropped (MAX_GRAPHS = 2)
    assert len(graphed._graphs) == A.MAX_GRAPHS
    x, y = data()  # a call with a context is never cached, even of a kept signature
    assert torch.equal(graphed(x, y, branch=torch.tensor([0, 1] * 6),
                               context=contextlib.nullcontext()),
                       eager(x, y, branch=torch.tensor([0, 1] * 6)))
    assert _StepsAsCalls.captures == 5 and len(graphed._graphs) == A.MAX_GRAPHS
