"""The ops, one folder per family (batch_norm, film, pgd, add_relu), each with its schema side
(schema.py: fakes, argument struct), its eager implementation (eager.py) and its Triton kernels
(triton.py), each declaring in its __init__ what is registered for it. The schemas, CPU
kernels, argument checks and autograd nodes are C++, in csrc/<family>/.

Importing this package registers, once: the fakes (meta implementations, with the C++ argument
checks), the eager kernels for CompositeExplicitAutograd (every device without a kernel of its
own), the differentiable backward of multi_bn for second derivatives, and the hook through
which the CUDA key's C++ kernel (csrc/launch/plans.cpp) runs an op's Triton launcher for a call
signature it has not seen. Every call, eager or traced by torch.compile, takes the same path:
the dispatcher's Autograd kernel (one C++ node per call), then the device's kernel.
"""
from __future__ import annotations

import importlib
import pkgutil
import types
import warnings

import torch

from . import _common, _triton
from ._common import BNGrad, PgdMode, acc_dtype, needs  # noqa: F401 - the ops' shared names
from ._triton import plan

_C = _common._C

# The op families: every sub-package not named with an underscore. Each declares what is
# registered for it (KEY, OPS, FAKES, EAGER, TRITON; IMPLICIT, CPP_COMPOSITE where it has some),
# so a new family is its folder and nothing here.
FAMILIES = [importlib.import_module(f"{__name__}.{m.name}")
            for m in pkgutil.iter_modules(__path__) if m.ispkg and not m.name.startswith("_")]
# The ops with a kernel per backend, by family (the family's name in fastrobust.backends).
SCHEMAS = {fam.KEY: fam.OPS for fam in FAMILIES}
FAMILY = {name: fam for fam, names in SCHEMAS.items() for name in names}
_EAGER = {name: kernel for fam in FAMILIES for name, kernel in fam.EAGER.items()}
_TRITON = {name: f"{fam.__name__.rsplit('.', 1)[1]}.{mod}" for fam in FAMILIES
           for name, mod in fam.TRITON.items()}


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
    return checked({name: getattr(k, name) if isinstance(k, types.ModuleType) else k
                    for name, k in _EAGER.items()})


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
for _name, _fn in checked({k: v for fam in FAMILIES for k, v in fam.FAKES.items()}).items():
    torch.library.register_fake(f"fastrobust::{_name}", _fn)
for _fam in FAMILIES:
    for _name, _fn in getattr(_fam, "IMPLICIT", {}).items():
        torch.library.impl(f"fastrobust::{_name}", "CompositeImplicitAutograd")(_fn)
_lib = torch.library.Library("fastrobust", "IMPL")
_cpp_composite = {n for fam in FAMILIES for n in getattr(fam, "CPP_COMPOSITE", ())}
for _name, _fn in eager_implementations().items():
    if _name not in _cpp_composite:
        _lib.impl(_name, _fn, "CompositeExplicitAutograd")
_C._set_plan_hook(plan.cpp_hook(cuda_implementations, lambda: _triton.missing() is None))
