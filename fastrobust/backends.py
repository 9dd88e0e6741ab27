"""Which implementation serves each op on each device, and why the others do not.

Each backend answers `not_supported_reasons(...)` for a call; the dispatcher takes the first
backend, in the device's preference order, with no reasons. Nothing falls back silently: a
forced backend that cannot serve a call raises with its reasons, and `describe()` prints the
whole table.

    eager   plain PyTorch (fastrobust.reference): always available, the ground truth
    cpu     C++ kernels in fastrobust._C (csrc/cpu), float32/float64
    triton  Triton kernels (fastrobust/kernels); CUDA tensors, or CPU tensors under
            TRITON_INTERPRET=1 (the interpreter: tests only)
    cuda    CUDA C++ kernels in fastrobust._C (csrc/cuda)

Force one with FASTROBUST_BACKEND=eager|cpu|triton|cuda (read at each call) or, in code,
`with fastrobust.backends.use("triton"): ...`.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from types import ModuleType

import torch

BACKENDS = ("eager", "cpu", "triton", "cuda")
OPS = ("multi_bn", "mixed_bn", "film", "pgd")
# The function each backend provides for an op (the BN ops share one engine), and the Triton
# module that holds it (one module serves the whole per-sample affine family).
_FORWARD = {"multi_bn": "bn_forward", "mixed_bn": "bn_forward", "film": "film_forward",
            "pgd": "pgd_update"}
_TRITON_MODULE = {"multi_bn": "multi_bn", "mixed_bn": "multi_bn", "film": "multi_bn",
                  "pgd": "pgd"}
# Preference per device type; the first backend with no reasons serves the call.
_PREFERENCE = {"cuda": ("cuda", "triton", "eager"), "cpu": ("cpu", "eager")}

_local = threading.local()
_loaded: dict[str, tuple[ModuleType | None, str | None]] = {}


def _load(name: str, module: str) -> tuple[ModuleType | None, str | None]:
    """Imports a backend module once, remembering why it failed."""
    if name not in _loaded:
        try:
            _loaded[name] = (importlib.import_module(module), None)
        except Exception as e:  # noqa: BLE001 - the reason is reported, not swallowed
            _loaded[name] = (None, f"{type(e).__name__}: {e}")
    return _loaded[name]


def extension() -> tuple[ModuleType | None, str | None]:
    """fastrobust._C and, when it is missing, why."""
    if os.environ.get("FASTROBUST_NO_EXT") == "1" and "ext" not in _loaded:
        return None, "fastrobust._C not built (FASTROBUST_NO_EXT=1)"
    mod, err = _load("ext", "fastrobust._C")
    if mod is None:
        return None, f"fastrobust._C not built or not importable ({err})"
    return mod, None


def _triton_module(op: str):
    _, err = _load("triton", "triton")
    if err is not None:
        return None, f"triton not installed ({err})"
    name = _TRITON_MODULE[op]
    return _load(f"triton.{name}", f"fastrobust.kernels.{name}")


def not_supported_reasons(backend: str, op: str, device: torch.device | str,
                          tensors: tuple = ()) -> list[str]:
    """Why `backend` cannot run `op` on `device` for these tensors (empty: it can)."""
    device = torch.device(device)
    reasons: list[str] = []
    if backend == "eager":
        return reasons
    if backend == "cpu":
        if device.type != "cpu":
            reasons.append("serves CPU tensors only")
        mod, why = extension()
        if mod is None:
            reasons.append(why)
        elif not hasattr(mod, _FORWARD[op]):
            reasons.append(f"fastrobust._C has no CPU kernel for {op}")
        dtypes = {t.dtype for t in tensors if t is not None and t.is_floating_point()}
        if dtypes - {torch.float32, torch.float64} or len(dtypes) > 1:
            reasons.append("the CPU kernel takes float32 or float64 tensors of one dtype, got "
                           + ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes)))
        return reasons
    if backend == "triton":
        mod, why = _triton_module(op)
        if mod is None:
            reasons.append(why)
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (the interpreter, for tests)")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"no Triton support for {device.type} tensors")
        return reasons
    if backend == "cuda":
        if device.type != "cuda":
            reasons.append("serves CUDA tensors only")
        mod, why = extension()
        if mod is None:
            reasons.append(why)
        elif not hasattr(mod, "cuda"):
            reasons.append("fastrobust._C was built without CUDA kernels "
                           "(CPU build of torch, or no CUDA toolkit at build time)")
        elif not hasattr(mod.cuda, _FORWARD[op]):
            reasons.append(f"no CUDA C++ kernel for {op} yet")
        return reasons
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


def forced() -> str | None:
    """The backend forced by `use(...)` or FASTROBUST_BACKEND, if any."""
    name = getattr(_local, "forced", None) or os.environ.get("FASTROBUST_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"FASTROBUST_BACKEND={name!r} is not one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use(name: str | None):
    """Forces a backend for the calls in the body (None: automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    old = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = old


def choose(op: str, device: torch.device | str, tensors: tuple = ()) -> str:
    """The name of the backend that serves this call."""
    device = torch.device(device)
    name = forced()
    if name is not None:
        reasons = not_supported_reasons(name, op, device, tensors)
        if reasons:
            raise RuntimeError(f"backend {name!r} was forced but cannot run {op} on "
                               f"{device.type}: " + "; ".join(reasons))
        return name
    for name in _PREFERENCE.get(device.type, ("triton", "eager")):
        if not not_supported_reasons(name, op, device, tensors):
            return name
    return "eager"


_select_cache: dict[tuple, object] = {}


def select(op: str, device: torch.device | str, tensors: tuple = ()) -> ModuleType:
    """The backend object whose functions (`bn_forward`/`bn_backward` for the BN ops,
    `film_forward`/`film_backward` for film, `pgd_update`/`mifgsm_update` for pgd) serve
    this call. The answer depends only on the op, the device, the dtypes, the forced backend
    and the environment switches, so it is cached on those (a hot op pays ~0.5 µs, not ~5)."""
    key = (op, str(device), tuple(t.dtype for t in tensors if t is not None), forced(),
           os.environ.get("TRITON_INTERPRET"), os.environ.get("FASTROBUST_NO_EXT"))
    hit = _select_cache.get(key)
    if hit is None:
        hit = _select_cache[key] = _select(op, device, tensors)
    return hit


def _select(op: str, device, tensors: tuple):
    name = choose(op, device, tensors)
    if name == "eager":
        if op == "pgd":
            from .reference import pgd_eager
            return pgd_eager
        from ._engine import eager
        return eager
    if name == "triton":
        return _triton_module(op)[0]
    if name == "cuda":
        return extension()[0].cuda  # the CUDA kernels: a submodule with the same names
    return extension()[0]


def table() -> list[dict]:
    """One row per (op, device): the backend chosen and every other backend's reasons."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for op in OPS:
        for dev in devices:
            probe = (torch.empty(0, device=dev),)
            try:
                chosen = choose(op, dev, probe)
            except RuntimeError as e:
                chosen = f"error: {e}"
            rows.append({"op": op, "device": dev, "backend": chosen,
                         "others": {b: not_supported_reasons(b, op, dev, probe) or ["available"]
                                    for b in BACKENDS if b != chosen}})
    return rows


def describe() -> str:
    """The backend table as text (printed by `fastrobust info` and the demo)."""
    lines = []
    for row in table():
        lines.append(f"{row['op']:<10} {row['device']:<5} -> {row['backend']}")
        for b, why in row["others"].items():
            lines.append(f"{'':<17}{b:<7} {'; '.join(why)}")
    if forced():
        lines.append(f"(forced: {forced()})")
    return "\n".join(lines)
