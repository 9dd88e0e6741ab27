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
    call: Callable[..., dict]  # (generator, dtype) -> the named arguments of a valid call
    differentiable: tuple[str, ...] = ()  # the inputs its autograd node differentiates
    kernel: bool = True  # has a kernel per backend (False: a composite of other ops)
    needs_group: bool = False  # needs an initialized process group

    def args(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
        return self.call(torch.Generator().manual_seed(seed), dtype)


def _r(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def _u(g, *shape, dtype=torch.float32):
    return torch.rand(*shape, generator=g).to(dtype)


def bn(g, dtype, N=4, C=3, K=2):
    return dict(x=_r(g, N, C, 2, 2, dtype=dtype), branch=torch.tensor([0, 1, 0, 1][:N]),
                mix=None, weight=_u(g, K, C, dtype=dtype) + .5, bias=_r(g, K, C, dtype=dtype),
                running_mean=torch.zeros(K, C, dtype=dtype),
                running_var=torch.ones(K, C, dtype=dtype),
                num_batches_tracked=torch.zeros(K, dtype=torch.long),
                input_scale=_u(g, N, C, dtype=dtype) + .5, film_gamma=_r(g, N, C, dtype=dtype),
                film_beta=_r(g, N, C, dtype=dtype), num_branches=K, training=True,
                momentum=0.1, cumulative=False, eps=1e-5, relu=True)


def bn_backward(g, dtype):
    f = bn(g, dtype)
    _, mean, invstd, planes = ops.multi_bn(*f.values())
    return dict(dy=_r(g, *f["x"].shape, dtype=dtype), x=f["x"], branch=f["branch"], mix=None,
                weight=f["weight"], bias=f["bias"], mean=mean, invstd=invstd, planes=planes,
                input_scale=f["input_scale"], film_gamma=f["film_gamma"],
                film_beta=f["film_beta"], num_branches=2, batch_stats=True, relu=True,
                needs=[True] * 7)


def bn_grads_with_graph(g, dtype):
    b = bn_backward(g, dtype)
    del b["planes"]
    return dict(list(b.items())[:-2] + [("eps", 1e-5), ("relu", True),
                                        ("needs", [True] * 7)])


def sync_stats(g, dtype):
    f = bn(g, dtype)
    return dict(x=f["x"], branch=f["branch"], mix=None, input_scale=f["input_scale"],
                num_batches_tracked=f["num_batches_tracked"], num_branches=2, cumulative=True,
                rank=1, world_size=2)


def sync_apply(g, dtype):
    f = bn(g, dtype)
    payload, _, old = ops.sync_bn_stats(*sync_stats(g, dtype).values())
    a = {k: f[k] for k in ("x", "branch", "mix", "weight", "bias", "running_mean",
                           "running_var", "num_batches_tracked", "input_scale", "film_gamma",
                           "film_beta")}
    return dict(a, payload=payload, old=old, num_branches=2, momentum=0.0, cumulative=True,
                eps=1e-5, relu=True)


def sync_grad_sums(g, dtype):
    a = sync_apply(g, dtype)
    _, mean, invstd = ops.sync_bn_apply(*a.values())
    return dict(dy=_r(g, *a["x"].shape, dtype=dtype), x=a["x"], branch=a["branch"], mix=None,
                weight=a["weight"], bias=a["bias"], mean=mean, invstd=invstd,
                input_scale=a["input_scale"], film_gamma=a["film_gamma"],
                film_beta=a["film_beta"], num_branches=2, relu=True, needs=[True] * 7)


def sync_dx(g, dtype):
    s = sync_grad_sums(g, dtype)
    payload, planes, _ = ops.sync_bn_stats(*sync_stats(g, dtype).values())
    sums, parts, _, _ = ops.sync_bn_grad_sums(*s.values())
    a = dict(list(s.items())[:8])
    a["planes"] = planes
    a.update((k, s[k]) for k in ("input_scale", "film_gamma", "film_beta"))
    return dict(a, sums=sums, parts=parts, payload=payload, num_branches=2, relu=True,
                needs=[True] * 7)


def sync_multi_bn(g, dtype):
    a = bn(g, dtype)
    del a["training"]
    return dict(a, rank=0, world_size=1, group_name="0")


def film(g, dtype):
    return dict(x=_r(g, 4, 3, 2, 2, dtype=dtype), gamma=_r(g, 4, 3, dtype=dtype),
                beta=_r(g, 3, dtype=dtype))


def film_backward(g, dtype):
    return dict(dy=_r(g, 4, 3, 2, 2, dtype=dtype), x=_r(g, 4, 3, 2, 2, dtype=dtype),
                gamma=_r(g, 3, dtype=dtype), needs=[True, True, True],
                per_channel=[True, False])


def add_relu(g, dtype):
    return dict(a=_r(g, 4, 8, 3, 3, dtype=dtype), b=_r(g, 4, 8, 3, 3, dtype=dtype))


def pgd(g, dtype):
    xn = _u(g, 3, 2, 4, 4, dtype=dtype)
    return dict(x_adv=xn.clone(), grad=_r(g, 3, 2, 4, 4, dtype=dtype), x_nat=xn,
                eps_t=torch.full((3,), 0.03, dtype=dtype), eps=0.03, alpha_t=None, alpha=0.01,
                l2=False, clip_min=0.0, clip_max=1.0)


def mifgsm(g, dtype):
    p = pgd(g, dtype)
    return dict(x_adv=p["x_adv"], grad=p["grad"], momentum=torch.zeros_like(p["x_adv"]),
                x_nat=p["x_nat"], eps_t=p["eps_t"], eps=0.03, alpha_t=None, alpha=0.01,
                decay=1.0, clip_min=0.0, clip_max=1.0)


def pgd_init(g, dtype):
    return dict(noise=_u(g, 3, 2, 4, 4, dtype=dtype) * 2 - 1,
                x_nat=_u(g, 3, 2, 4, 4, dtype=dtype), eps_t=None, eps=0.03, radius=None,
                l2=False, clip_min=0.0, clip_max=1.0)


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

