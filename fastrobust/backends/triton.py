"""The Triton backend: fastrobust/kernels (one file per op family), registered from Python for
the CUDA dispatch key. CPU tensors run under TRITON_INTERPRET=1 (Triton's interpreter, for
tests) when this backend is forced with `fastrobust.backends.use("triton")`."""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from ._schema import implementations as _implementations

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
    impls["add_relu"] = lambda a, b: _kernels("elementwise").add_relu(a, b)
    return impls
