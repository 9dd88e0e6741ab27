"""One model, several threads: `routing` is per thread, and concurrent attacks (or evaluations)
share the eval mode and frozen parameters and restore every module's own flags when the last
one ends. The interleavings are fixed with events and barriers, so every run checks the same
schedule."""
import threading

import pytest
import torch
from torch import nn

from fastrobust.attacks import PGD
from fastrobust.nn import MultiBatchNorm2d, routing

HANG = 60  # seconds: only so that a broken schedule fails instead of hanging


def run_threads(*fns):
    """Runs each fn in its own thread, waits for all, re-raises the first failure."""
    errors = []

    def wrap(fn):
        def body():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                errors.append(e)
        return body

    threads = [threading.Thread(target=wrap(fn), name=f"worker-{i}") for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
        assert not t.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


def wait(event: threading.Event):
    assert event.wait(HANG), "the other thread never got there"


def two_branch_bn():
    """A dual BN in eval mode whose branches give different outputs."""
    bn = MultiBatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean[1].fill_(5.0)
        bn.running_var[1].fill_(4.0)
    return bn


def test_interleaved_routing_leaves_the_model_unrouted():
    """A enters, B enters, A exits, B exits: afterwards a call without routing is refused
    (it used to keep A's routing for good, so it silently ran branch 0)."""
    model = nn.Sequential(two_branch_bn())
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with routing(model, branch=0):
            a_in.set()
            wait(b_in)
        a_out.set()

    def b():
        wait(a_in)
        with routing(model, branch=1):
            b_in.set()
            wait(a_out)

    run_threads(a, b)
    with pytest.raises(RuntimeError, match="no routing"):
        model(torch.randn(2, 3, 2, 2))


def test_each_thread_sees_its_own_routing():
    """Two threads inside `routing` of one model at once, with different branches: each
    gets its own branch's output, and a third thread outside any routing is refused."""
    bn = two_branch_bn()
    model = nn.Sequential(bn)
    x = torch.randn(4, 3, 2, 2)
    want = {k: bn(x, branch=k) for k in (0, 1)}
    assert not torch.allclose(want[0], want[1])
    inside, done = threading.Barrier(3), threading.Barrier(3)
    got = {}

    def worker(k):
        def body():
            with routing(model, branch=k):
                inside.wait(HANG)  # both contexts are open
                got[k] = model(x)
                done.wait(HANG)    # neither closes before both have run
        return body

    def outsider():
        inside.wait(HANG)
        try:
            with pytest.raises(RuntimeError, match="no routing"):
                model(x)
        finally:
            done.wait(HANG)

    run_threads(worker(0), worker(1), outsider)
    for k in (0, 1):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_nested_routing_in_threads_restores_each_threads_outer_route():
    """A opens routing 1, then 0 inside it; B opens a mix; A closes its inner context while B
    is inside, B computes, B closes, A computes: B sees its mix and A its outer branch 1
    (A's exit used to put branch 1 back for B too, and B's exit branch 0 back for A)."""
    bn = two_branch_bn()
    model = nn.Sequential(bn)
    x = torch.randn(4, 3, 2, 2)
    a_inner, b_in, a_inner_out, b_out = (threading.Event() for _ in range(4))
    got = {}

    def a():
        with routing(model, branch=1):
            with routing(model, branch=0):
                a_inner.set()
                wait(b_in)
            a_inner_out.set()
            wait(b_out)
            got["a"] = model(x)

    def b():
        wait(a_inner)
        with routing(model, mix=torch.tensor([[0.5, 0.5]]).expand(4, 2)):
            b_in.set()
            wait(a_inner_out)
            got["b"] = model(x)
        b_out.set()

    run_threads(a, b)
    torch.testing.assert_close(got["a"], bn(x, branch=1), rtol=0, atol=0)
    torch.testing.assert_close(got["b"], 0.5 * bn(x, branch=0) + 0.5 * bn(x, branch=1))


def test_a_dataparallel_replica_keeps_the_callers_routing():
    """nn.DataParallel runs its replicas in worker threads: a replica made inside `routing`
    routes as the caller's thread does (as it did when routing was a module attribute)."""
    bn = two_branch_bn()
    x = torch.randn(4, 3, 2, 2)
    with routing(bn, branch=1):
        replica = bn._replicate_for_data_parallel()
    for name, p in bn.named_parameters():  # what nn.parallel.replicate does next
        setattr(replica, name, p)
    got = {}
    run_threads(lambda: got.setdefault("y", replica(x)))
    torch.testing.assert_close(got["y"], bn(x, branch=1), rtol=0, atol=0)


class Gate(nn.Module):
    """Identity that calls ``hook()`` in every forward: the test's handle on where each
    thread's attack is."""

    def __init__(self, hook):
        super().__init__()
        self.hook = hook

    def forward(self, x):
        self.hook()
        return x


@pytest.mark.parametrize("first_ends", ["returns", "raises"])
def test_concurrent_attacks_keep_eval_mode_until_the_last_ends(first_ends):
    """Attack A starts, attack B starts on the same model from another thread, A ends
    (returns, or raises), B goes on: B's remaining steps still run in eval mode with frozen
    parameters (no running-statistics update from adversarial batches), and when B ends
    every module has exactly the mode and every parameter the requires_grad it had before."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen_after_a = []  # (module modes, parameter flags) in B's forwards after A ended

    def hook():
        name = threading.current_thread().name
        if name == "worker-0" and not a_in.is_set():
            a_in.set()
            wait(b_in)
            if first_ends == "raises":
                raise RuntimeError("attack A fails")
        elif name == "worker-1":
            if not b_in.is_set():
                b_in.set()
                wait(a_out)
            seen_after_a.append(([m.training for m in model.modules()],
                                 [p.requires_grad for p in model.parameters()]))

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), Gate(hook),
                          nn.Dropout(0.5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    model.train()
    model[3].eval()          # modes differ per module: each must come back as it was
    model[7].bias.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    stats = {k: v.clone() for k, v in model[1].state_dict().items()}
    x, y = torch.rand(6, 3, 6, 6), torch.randint(0, 3, (6,))

    def a():
        try:
            PGD(model, steps=3)(x, y)
        except RuntimeError as e:
            assert first_ends == "raises" and "attack A fails" in str(e)
        else:
            assert first_ends == "returns"
        finally:
            a_out.set()

    def b():
        wait(a_in)
        PGD(model, steps=3)(x, y)

    run_threads(a, b)
    assert len(seen_after_a) == 3  # B's three forwards, all after A ended
    for seen_modes, seen_flags in seen_after_a:
        assert not any(seen_modes) and not any(seen_flags)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, stats[k]), k  # no adversarial batch reached the statistics


def test_oat_model_condition_and_width_are_per_thread():
    """An OATS model used by two threads at once, each inside its own ``at_width`` and
    ``conditioned``: each gets the output of its own λ and width (FiLM γ, β, dual-BN branch
    and slimmed convs)."""
    from fastrobust.models import oat_resnet18

    model = oat_resnet18(10, 4, width_mults=(0.5, 1.0)).eval()
    x = torch.rand(3, 3, 8, 8)
    want = {}
    for w, lam in ((0.5, 0.0), (1.0, 1.0)):
        with model.at_width(w), model.conditioned(lam, grad=False), torch.no_grad():
            want[w] = model(x)
    inside, done = threading.Barrier(2), threading.Barrier(2)
    got = {}

    def worker(w, lam):
        def body():
            with model.at_width(w), model.conditioned(lam, grad=False), torch.no_grad():
                inside.wait(HANG)  # both threads have set their width and λ
                got[w] = model(x)
                done.wait(HANG)
        return body

    run_threads(worker(0.5, 0.0), worker(1.0, 1.0))
    for w in (0.5, 1.0):
        torch.testing.assert_close(got[w], want[w], rtol=0, atol=0)
    assert model.width_mult == 1.0 and model._state is None
