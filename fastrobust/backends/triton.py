"""The Triton backend: fastrobust/kernels (one file per op family). The CUDA key's kernel is C++
(csrc/plans.cpp), which launches these kernels from plans it records through their Python
launchers once per call signature. CPU tensors run under TRITON_INTERPRET=1 (Triton's
interpreter, for tests) when this backend is forced with `fastrobust.backends.use("triton")`."""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

from ._schema import checked as _checked, implementations as _implementations

NAME = "triton"
SERVES = ("cuda", "cpu")
_modules: dict = {}


_why: list = []


def missing() -> str | None:
    """Why triton cannot be used at all (None: it can): not installed, or failing to import
    (the error is reported, never swallowed: `fastrobust info` prints it, and an op on CUDA
    then warns once that it runs the eager kernels)."""
    if not _why:
        if importlib.util.find_spec("triton") is None:
            _why.append("triton is not installed")
        else:
            try:
                import triton  # noqa: F401
                _why.append(None)
            except Exception as e:  # a broken install must be reported, not fatal
                _why.append(f"triton failed to import ({type(e).__name__}: {e})")
    return _why[0]


def reasons(op: str, device: torch.device) -> list[str]:
    why = missing()
    out = [why] if why else []
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        out.append("CPU tensors need TRITON_INTERPRET=1 (the interpreter, for tests)")
    elif device.type not in ("cpu", "cuda"):
        out.append(f"no Triton support for {device.type} tensors")
    return out


def _kernels(name: str):
    mod = _modules.get(name)
    if mod is None:
        try:
            mod = _modules[name] = importlib.import_module(f"fastrobust.kernels.{name}")
        except Exception as e:  # the CUDA key is Triton's: say why it cannot run
            raise RuntimeError(f"fastrobust: the Triton kernels fastrobust.kernels.{name} "
                               f"failed to import ({type(e).__name__}: {e})") from e
    return mod


def implementations() -> dict:
    impls = _implementations(lambda: _kernels("multi_bn"), lambda: _kernels("pgd"),
                             lambda: _kernels("film"))
    impls.update(_checked({"add_relu": lambda a, b: _kernels("elementwise").add_relu(a, b)}))

    def sync(name):
        return lambda *args: getattr(_kernels("sync_bn"), name)(*args)
    impls.update(_checked({name: sync(name) for name in (
        "sync_bn_stats", "sync_bn_apply", "sync_bn_grad_sums", "sync_bn_dx")}))
    return impls


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
    """What serves CUDA tensors: these kernels, or where triton is missing the eager ones,
    with a warning."""
    why = missing()
    if why is None:
        return implementations()
    from . import eager
    return {name: _warn_once(fn, why) for name, fn in eager.implementations().items()}
