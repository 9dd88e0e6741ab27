"""Triton kernels, one file per op family (imported lazily by fastrobust.backends, so the
package works where triton is missing)."""
import contextlib

import torch


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
