"""The ops, one folder per family (batch_norm, film, pgd, add_relu), each with its schema side
(schema.py: fakes, argument struct), its eager implementation (eager.py) and its Triton kernels
(triton.py). The schemas, the CPU kernels and the one autograd are C++ (csrc/ops.cpp).

Importing this package registers, once: the fakes (meta implementations, with the C++ argument
checks), the eager kernels for CompositeExplicitAutograd (every device without a kernel of its
own), the differentiable backward of multi_bn for second derivatives, and the hook through
which the CUDA key's C++ kernel (csrc/plans.cpp) runs an op's Triton launcher for a call
signature it has not seen. Every call, eager or traced by torch.compile, takes the same path:
the dispatcher's Autograd kernel (one C++ node per call), then the device's kernel.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from . import _common, _triton
from ._common import BNGrad, PgdMode, acc_dtype, needs  # noqa: F401 - the ops' shared names
from ._triton import plan
from .add_relu import eager as add_relu_eager
from .batch_norm import eager as bn_eager, schema as bn_schema, sync_eager
from .film import eager as film_eager, schema as film_schema
from .pgd import eager as pgd_eager, schema as pgd_schema

_C = _common._C

# The schema ops of each family (csrc/ops.cpp), by the family's backend name.
SCHEMAS = {"multi_bn": ("multi_bn", "multi_bn_backward", "sync_bn_stats", "sync_bn_apply",
                        "sync_bn_grad_sums", "sync_bn_dx"),
           "film": ("film", "film_backward"),
           "add_relu": ("add_relu",), "pgd": ("pgd_step", "pgd_init", "mifgsm_step")}
FAMILY = {name: fam for fam, names in SCHEMAS.items() for name in names}
# The module of each family's implementations: eager ones, then Triton's (imported when asked).
_EAGER = {"multi_bn": bn_eager, "multi_bn_backward": bn_eager, "film": film_eager,
          "film_backward": film_eager, "add_relu": add_relu_eager, "pgd_step": pgd_eager,
          "pgd_init": pgd_eager, "mifgsm_step": pgd_eager,
          **{name: sync_eager for name in SCHEMAS["multi_bn"][2:]}}
_TRITON = {"multi_bn": "batch_norm.triton", "multi_bn_backward": "batch_norm.triton_backward",
           "film": "film.triton", "film_backward": "film.triton",
           "add_relu": "add_relu.triton", "pgd_step": "pgd.triton", "pgd_init": "pgd.triton",
           "mifgsm_step": "pgd.triton",
           **{name: "batch_norm.sync_triton" for name in SCHEMAS["multi_bn"][2:]}}


def checked(impls: dict) -> dict:
    """Each function runs the op's argument checks (csrc/checks.h, the ones the C++ kernels
    run) before anything else: also the values of a per-sample eps on CPU tensors (a check
    on the host that makes no data for the kernels, so it does not stop a recorded plan)."""
    def wrap(name, fn):
        qual = f"fastrobust::{name}"

        def run(*args):
            with plan.host_check():
                _C._check(qual, *args)
            return fn(*args)
        run.__name__ = name
        return run
    return {name: wrap(name, fn) for name, fn in impls.items()}


def eager_implementations() -> dict:
    """{op name: its eager kernel, with the op's schema and checks}."""
    return checked({name: getattr(mod, name) for name, mod in _EAGER.items()})


def _triton_module(path: str):
    try:
        return importlib.import_module(f"{__name__}.{path}")
    except Exception as e:  # the CUDA key is Triton's: say why it cannot run
        raise RuntimeError(f"fastrobust: the Triton kernels {__name__}.{path} failed to import "
                           f"({type(e).__name__}: {e})") from e


def triton_implementations() -> dict:
    """{op name: its Triton launcher, with the op's schema and checks}; each family's kernels
    are imported at a call's first use (so the package works where triton is missing)."""
    def lazy(name, path):
        return lambda *args: getattr(_triton_module(path), name)(*args)
    return checked({name: lazy(name, path) for name, path in _TRITON.items()})


_warned: list = []


def _warn_once(fn, why: str):
    """fn, saying once per process that CUDA tensors get the eager kernels (never silent)."""
    def run(*args, **kwargs):
        if not _warned:
            _warned.append(True)
            warnings.warn(f"fastrobust: {why}; the ops run their slow eager kernels on CUDA "
                          "tensors (`fastrobust info` shows the backends)", RuntimeWarning,
                          stacklevel=2)
        return fn(*args, **kwargs)
    return run


def cuda_implementations() -> dict:
    """What serves CUDA tensors: the Triton launchers, or where triton is missing the eager
    kernels, with a warning."""
    why = _triton.missing()
    if why is None:
        return triton_implementations()
    return {name: _warn_once(fn, why) for name, fn in eager_implementations().items()}


# --- registration, once, at import -------------------------------------------------------------

# (the fakes run the kernels' argument checks: a bad call fails as it would in eager, where
# every kernel checks; an argument on the meta device among real ones raises instead of tracing)
for _name, _fn in checked({**bn_schema.FAKES, **film_schema.FAKES,
                           **pgd_schema.FAKES}).items():
    torch.library.register_fake(f"fastrobust::{_name}", _fn)
torch.library.impl("fastrobust::multi_bn_grads_with_graph", "CompositeImplicitAutograd")(
    bn_eager.grads_with_graph)
_lib = torch.library.Library("fastrobust", "IMPL")
for _name, _fn in eager_implementations().items():
    if _name != "add_relu":  # (its composite is C++)
        _lib.impl(_name, _fn, "CompositeExplicitAutograd")
_C._set_plan_hook(plan.cpp_hook(cuda_implementations, lambda: _triton.missing() is None))
