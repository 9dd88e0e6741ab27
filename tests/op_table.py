"""One row per registered op (`torch.ops.fastrobust.*`): a valid call on small CPU tensors,
which of its arguments it writes and which its autograd differentiates. The tests that apply
to every op (tests/test_every_op.py: checks, launch plans, devices, second derivatives) and
tests/test_op_boundary.py take their cases from here, so a new op adds one row."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ops = torch.ops.fastrobust


@dataclass(frozen=True)
class Op:
    name: str
    family: str  # its fastrobust.backends family (backends.SCHEMAS)
    call: Callable[..., dict]  # (_Make) -> the named arguments of a valid call
    differentiable: tuple[str, ...] = ()  # the inputs its autograd node differentiates
    kernel: bool = True  # has a kernel per backend (False: a composite of other ops)
    needs_group: bool = False  # needs an initialized process group

    def args(self, seed: int = 0, dtype: torch.dtype = torch.float32,
             device: str = "cpu") -> dict:
        """The row's valid call (the ops a row's arguments come from run on `device` too)."""
        return self.call(_Make(torch.Generator().manual_seed(seed), dtype, device))


class _Make:
    """Random and fixed tensors of a row's call: drawn on the CPU from one generator (the same
    values on every device), then put in `dtype` (floats) on `device`."""

    def __init__(self, g: torch.Generator, dtype: torch.dtype, device: str):
        self.g, self.dtype, self.device = g, dtype, device

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g).to(self.dtype).to(self.device)

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.g).to(self.dtype).to(self.device)

    def t(self, t: torch.Tensor):
        return t.to(self.dtype if t.is_floating_point() else t.dtype).to(self.device)


def bn(m: _Make, N=4, C=3, K=2):
    return dict(x=m.randn(N, C, 2, 2), branch=m.t(torch.tensor([0, 1, 0, 1][:N])), mix=None,
                weight=m.rand(K, C) + .5, bias=m.randn(K, C), running_mean=m.t(torch.zeros(K, C)),
                running_var=m.t(torch.ones(K, C)),
                num_batches_tracked=m.t(torch.zeros(K, dtype=torch.long)),
                input_scale=m.rand(N, C) + .5, film_gamma=m.randn(N, C), film_beta=m.randn(N, C),
                num_branches=K, training=True, momentum=0.1, cumulative=False, eps=1e-5,
                relu=True)


def bn_backward(m):
    f = bn(m)
    _, mean, invstd, planes = ops.multi_bn(*f.values())
    return dict(dy=m.randn(*f["x"].shape), x=f["x"], branch=f["branch"], mix=None,
                weight=f["weight"], bias=f["bias"], mean=mean, invstd=invstd, planes=planes,
                input_scale=f["input_scale"], film_gamma=f["film_gamma"],
                film_beta=f["film_beta"], num_branches=2, batch_stats=True, relu=True,
                needs=[True] * 7)


def bn_grads_with_graph(m):
    b = bn_backward(m)
    del b["planes"]
    return dict(list(b.items())[:-2] + [("eps", 1e-5), ("relu", True),
                                        ("needs", [True] * 7)])


def sync_stats(m):
    f = bn(m)
    return dict(x=f["x"], branch=f["branch"], mix=None, input_scale=f["input_scale"],
                num_batches_tracked=f["num_batches_tracked"], num_branches=2, cumulative=True,
                rank=1, world_size=2)


def sync_apply(m):
    f = bn(m)
    payload, _, old = ops.sync_bn_stats(*dict(sync_stats(m), x=f["x"]).values())
    a = {k: f[k] for k in ("x", "branch", "mix", "weight", "bias", "running_mean",
                           "running_var", "num_batches_tracked", "input_scale", "film_gamma",
                           "film_beta")}
    return dict(a, payload=payload, old=old, num_branches=2, momentum=0.0, cumulative=True,
                eps=1e-5, relu=True)


def sync_grad_sums(m):
    a = sync_apply(m)
    _, mean, invstd = ops.sync_bn_apply(*a.values())
    return dict(dy=m.randn(*a["x"].shape), x=a["x"], branch=a["branch"], mix=None,
                weight=a["weight"], bias=a["bias"], mean=mean, invstd=invstd,
                input_scale=a["input_scale"], film_gamma=a["film_gamma"],
                film_beta=a["film_beta"], num_branches=2, relu=True, needs=[True] * 7)


def sync_dx(m):
    s = sync_grad_sums(m)
    payload, planes, _ = ops.sync_bn_stats(*dict(sync_stats(m), x=s["x"]).values())
    sums, parts, _, _ = ops.sync_bn_grad_sums(*s.values())
    a = dict(list(s.items())[:8])
    a["planes"] = planes
    a.update((k, s[k]) for k in ("input_scale", "film_gamma", "film_beta"))
    return dict(a, sums=sums, parts=parts, payload=payload, num_branches=2, relu=True,
                needs=[True] * 7)


def sync_multi_bn(m):
    a = bn(m)
    del a["training"]
    return dict(a, rank=0, world_size=1, group_name="0")


def film(m):
    return dict(x=m.randn(4, 3, 2, 2), gamma=m.randn(4, 3), beta=m.randn(3))


def film_backward(m):
    return dict(dy=m.randn(4, 3, 2, 2), x=m.randn(4, 3, 2, 2), gamma=m.randn(3),
                needs=[True, True, True], per_channel=[True, False])


def add_relu(m):
    return dict(a=m.randn(4, 8, 3, 3), b=m.randn(4, 8, 3, 3))


def pgd(m):
    xn = m.rand(3, 2, 4, 4)
    return dict(x_adv=xn.clone(), grad=m.randn(3, 2, 4, 4), x_nat=xn,
                eps_t=m.t(torch.full((3,), 0.03)), eps=0.03, alpha_t=None, alpha=0.01,
                l2=False, clip_min=0.0, clip_max=1.0)


def mifgsm(m):
    p = pgd(m)
    return dict(x_adv=p["x_adv"], grad=p["grad"], momentum=torch.zeros_like(p["x_adv"]),
                x_nat=p["x_nat"], eps_t=p["eps_t"], eps=0.03, alpha_t=None, alpha=0.01,
                decay=1.0, clip_min=0.0, clip_max=1.0)


def pgd_init(m):
    return dict(noise=m.rand(3, 2, 4, 4) * 2 - 1, x_nat=m.rand(3, 2, 4, 4), eps_t=None,
                eps=0.03, radius=None, l2=False, clip_min=0.0, clip_max=1.0)


_BN_DIFF = ("x", "weight", "bias", "input_scale", "film_gamma", "film_beta")
OPS: dict[str, Op] = {op.name: op for op in [
    Op("multi_bn", "multi_bn", bn, differentiable=_BN_DIFF),
    Op("multi_bn_backward", "multi_bn", bn_backward),
    Op("multi_bn_grads_with_graph", "multi_bn", bn_grads_with_graph, kernel=False),
    Op("sync_bn_stats", "multi_bn", sync_stats),
    Op("sync_bn_apply", "multi_bn", sync_apply),
    Op("sync_bn_grad_sums", "multi_bn", sync_grad_sums),
    Op("sync_bn_dx", "multi_bn", sync_dx),
    Op("sync_multi_bn", "multi_bn", sync_multi_bn, kernel=False, needs_group=True),
    Op("film", "film", film, differentiable=("x", "gamma", "beta")),
    Op("film_backward", "film", film_backward),
    Op("add_relu", "add_relu", add_relu, differentiable=("a", "b")),
    Op("pgd_step", "pgd", pgd),
    Op("mifgsm_step", "pgd", mifgsm),
    Op("pgd_init", "pgd", pgd_init),
]}


META = torch.empty(0, device="meta")
# Bad arguments, a row each: (op, argument, bad value, words the message must contain); the
# valid call each row changes is the op's row above (tests/test_op_boundary.py runs them, and
# tests/test_every_op.py wants at least one for every op with a kernel)
BAD = [
    ("multi_bn", "x", lambda a: a["x"].long(), "x must be floating point"),
    ("multi_bn", "x", lambda a: a["x"][0, 0, 0], "x must be [N, C"),
    ("multi_bn", "branch", lambda a: a["branch"].float(),
     "branch must be an integer tensor (int64)"),
    ("multi_bn", "branch", lambda a: a["branch"][:3], "branch must have shape"),
    ("multi_bn", "mix", lambda a: torch.rand(4, 2), "exactly one of branch and mix"),
    ("multi_bn", "weight", lambda a: a["weight"].long(), "weight must be a floating-point"),
    ("multi_bn", "weight", lambda a: torch.ones(3, 3), "weight must have shape"),
    ("multi_bn", "weight", lambda a: torch.ones(2, 4),
     "x has 3 channels but weight is [num_branches, C] = [2, 4]"),
    ("multi_bn", "weight", lambda a: torch.ones(2, 3, device="meta"), "weight is on meta"),
    ("multi_bn", "bias", lambda a: torch.ones(3, 3), "bias must have shape"),
    ("multi_bn", "running_var", lambda a: None, "both running_mean and running_var"),
    ("multi_bn", "running_mean", lambda a: torch.zeros(3, 2), "running_mean must have"),
    ("multi_bn", "num_batches_tracked", lambda a: torch.zeros(2),
     "num_batches_tracked must be int64"),
    ("multi_bn", "num_batches_tracked", lambda a: torch.zeros(3, dtype=torch.long),
     "num_batches_tracked must have shape"),
    # the Triton kernels advance the counters at stride 1: a strided [K] would be misread
    ("multi_bn", "num_batches_tracked", lambda a: torch.zeros(4, dtype=torch.long)[::2],
     "num_batches_tracked must be contiguous"),
    ("multi_bn", "input_scale", lambda a: torch.ones(3), "input_scale must have shape"),
    ("multi_bn", "film_gamma", lambda a: a["film_gamma"].int(), "film_gamma must be"),
    ("multi_bn", "film_beta", lambda a: torch.ones(4, 3, dtype=torch.float64,
                                                        device="meta"), "film_beta is on meta"),
    ("multi_bn", "num_branches", lambda a: 0, "num_branches must be >= 1"),
    ("multi_bn", "momentum", lambda a: 5.0, "momentum must be in [0, 1]"),
    ("multi_bn", "eps", lambda a: -1e-5, "eps must be a finite number > 0"),
    ("multi_bn", "eps", lambda a: float("nan"), "eps must be a finite number > 0"),
    ("multi_bn", "cumulative", lambda a: True, None),  # needs num_batches_tracked:
    ("multi_bn_backward", "dy", lambda a: a["dy"][:1],
     "dy (the gradient of y) must have shape"),
    ("multi_bn_backward", "dy", lambda a: a["dy"].long(), "dy (the gradient"),
    ("multi_bn_backward", "mean", lambda a: a["mean"][:1], "mean must have"),
    ("multi_bn_backward", "invstd", lambda a: a["invstd"].long(),
     "invstd must be a floating-point tensor"),
    ("multi_bn_backward", "needs", lambda a: [True] * 3, None),
    ("film", "x", lambda a: a["x"].long(), "film: x must be floating point"),
    ("film", "gamma", lambda a: torch.ones(5), "gamma must have shape"),
    ("film", "beta", lambda a: torch.ones(3, dtype=torch.long), "beta must be a floating-point tensor"),
    ("film_backward", "dy", lambda a: torch.ones(1, 3, 2, 2),
     "dy (the gradient of y) must have shape"),
    ("film_backward", "per_channel", lambda a: [False, False],
     "per_channel[0] must say whether gamma is [C]"),
    ("add_relu", "b", lambda a: torch.randn(3), "same shape"),
    ("pgd_step", "x_adv", lambda a: (a["x_adv"] * 100).long(), "x_adv must be floating"),
    ("pgd_step", "grad", lambda a: torch.randn(1, 2, 4, 4), "grad has shape"),
    ("pgd_step", "x_nat", lambda a: a["x_nat"].double(), "x_nat is torch.float64"),
    ("pgd_step", "eps_t", lambda a: torch.full((2,), 0.03),
     "a tensor eps must be per sample, shape [N] = [3], got [2]"),
    ("pgd_step", "eps_t", lambda a: torch.full((3,), 0.03, device="meta"),
     "eps is on meta"),
    ("pgd_step", "eps_t", lambda a: torch.tensor([0.03, -0.01, 0.03]), "eps must be >= 0"),
    # issue 37: a NaN compares false with 0 both ways; the minimum's check let it through and
    # the CPU step moved the sample unbounded (the functional API refused it)
    ("pgd_step", "eps_t", lambda a: torch.tensor([0.03, float("nan"), 0.03]),
     "eps must be >= 0, got nan at sample 1"),
    ("mifgsm_step", "eps_t", lambda a: torch.tensor([float("nan"), 0.03, 0.03]),
     "eps must be >= 0, got nan at sample 0"),
    ("pgd_init", "eps_t", lambda a: torch.tensor([0.03, 0.03, float("nan")]),
     "eps must be >= 0, got nan at sample 2"),
    ("pgd_step", "eps", lambda a: -0.1, "eps must be a finite non-negative number"),
    ("pgd_step", "clip_min", lambda a: 2.0, "clip_min (2) must be <= clip_max (1)"),
    ("mifgsm_step", "momentum", lambda a: torch.zeros(3, 2, 4, 5),
     "momentum_buf has shape"),
    ("mifgsm_step", "decay", lambda a: float("inf"), "decay must be finite"),
    ("pgd_init", "noise", lambda a: torch.rand(3, 2, 4, 4).half(), "noise is"),
    ("pgd_init", "l2", lambda a: True, "the l2 start needs radius"),
    ("sync_bn_stats", "rank", lambda a: 2, "rank must be in [0, world_size)"),
    ("sync_bn_apply", "payload", lambda a: torch.zeros(2, 5, dtype=torch.float64),
     "payload must have shape"),
    ("sync_bn_grad_sums", "dy", lambda a: a["dy"][:1], "dy (the gradient of y) must have shape"),
    ("sync_bn_dx", "payload", lambda a: a["payload"].float(), "payload must be float64"),
]


def registered() -> set[str]:
    """The names of every op the extension registers under torch.ops.fastrobust."""
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
            if n.startswith("fastrobust::")}


def run(name: str, args: dict):
    """Calls op `name` with the named arguments (positionally, in schema order)."""
    return getattr(ops, name)(*args.values())


def tensors(out, args: dict) -> list[torch.Tensor]:
    """What a call left: its results and every tensor argument (the in-place ops' results)."""
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [t for t in outs + list(args.values()) if isinstance(t, torch.Tensor)]


def cloned(args: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}

