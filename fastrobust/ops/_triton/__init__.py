"""What the Triton kernels of every family share: the launch plans (plan.py), the tile and
launch helpers (tiles.py), and, importable without triton, whether triton can run at all."""
from __future__ import annotations

import contextlib
import importlib.util

import torch

from .._common import forced

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


def serves_by_default(device: torch.device) -> bool:
    """Whether the dispatcher sends a call on `device` to the Triton kernels: CUDA, where
    triton imports."""
    return device.type == "cuda" and missing() is None


def serves(device: torch.device) -> bool:
    """Whether the Triton kernels serve a call on `device` in this thread (forced by
    `fastrobust.backends.use`, or the dispatcher's choice)."""
    name = forced()
    return name == "triton" if name is not None else serves_by_default(device)


def on_device(t: torch.Tensor):
    """Launches go to the tensor's device, not the current one (cuda:1 tensors from a
    cuda:0 context)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis x (y and z: 65,535)


def tiles_grid(what: str, *blocks: int) -> tuple[int]:
    """The 1-D grid of a kernel whose programs decode their (sample, block, ...) from axis x:
    the product of `blocks`, which must fit CUDA's axis-x limit."""
    tiles = 1
    for b in blocks:
        tiles *= b
    if tiles > MAX_GRID_X:
        raise ValueError(f"fastrobust: {what} has {tiles} tiles, more than the {MAX_GRID_X} "
                         "one Triton launch can address; split the batch")
    return (max(tiles, 1),)
