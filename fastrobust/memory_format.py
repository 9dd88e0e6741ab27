"""Which memory format a model runs in, and a guard against a torch CPU bug.

torch 2.13.0's CPU (oneDNN) backward of a 1×1 convolution with stride > 1 on channels_last
input gives wrong weight gradients when the convolution has 2, 3, 4, 5 or 7 input channels
per group (relative error up to ~4 on AVX2-only machines) and can corrupt the heap with one
thread; NCHW gives right results. The trainers and attacks use channels_last on the CPU for
speed, so they first ask :func:`cpu_channels_last_hazard` and stay in NCHW where the bug could
bite (a conservative rule: any such convolution with fewer than 8 input channels per group).
``tests/test_memory_format.py`` runs the reproducer in a subprocess and fails if this guard is
removed while the installed torch still has the bug.
"""
from __future__ import annotations

import torch
from torch import nn

FORMATS = ("auto", "channels_last", "contiguous")
_SAFE_CHANNELS = 8  # 1x1 stride>1 convs with fewer input channels per group are refused


def _min_in_channels(module: nn.Conv2d) -> int:
    """The fewest input channels per group the conv can see. A slimmable conv (OATS) reads
    only the first channels of its weight at a smaller width, so its narrowest width counts."""
    cin = module.in_channels // module.groups
    owner = getattr(module, "_owner", None)
    mults = getattr(owner[0], "width_mults", None) if owner else None
    if mults:
        cin = min(cin, max(1, int(round(module.in_channels * min(mults)))) // module.groups)
    return max(cin, 1)


def cpu_channels_last_hazard(model: nn.Module) -> str | None:
    """Why ``model`` must not train in channels_last on the CPU (None: it may)."""
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if tuple(m.kernel_size) == (1, 1) and tuple(m.stride) != (1, 1):
            cin = _min_in_channels(m)
            if cin < _SAFE_CHANNELS:
                return (f"{name or type(m).__name__} is a 1x1 stride-{m.stride[0]} convolution "
                        f"with {cin} input channels, whose channels_last CPU backward is wrong "
                        f"in torch {torch.__version__} (fewer than {_SAFE_CHANNELS} channels)")
    return None


def choose(model: nn.Module, device: torch.device, requested: str | bool | None = "auto"
           ) -> torch.memory_format:
    """The memory format for ``model`` and its batches on ``device``.

    ``requested``: ``"auto"`` (or None) picks channels_last on the CPU, whose convolutions and
    their gradients are 10-35 % faster in it at CIFAR shapes, unless the model has a
    convolution the torch bug above could hit, and NCHW elsewhere; ``"channels_last"`` (or
    True) asks for it and raises ValueError where the bug could hit; ``"contiguous"`` (or
    False) is NCHW."""
    if requested is True:
        requested = "channels_last"
    elif requested is False:
        requested = "contiguous"
    elif requested is None:
        requested = "auto"
    if requested not in FORMATS:
        raise ValueError(f"memory_format must be one of {FORMATS}, got {requested!r}")
    if requested == "contiguous":
        return torch.contiguous_format
    hazard = cpu_channels_last_hazard(model) if torch.device(device).type == "cpu" else None
    if requested == "channels_last":
        if hazard is not None:
            raise ValueError(f"memory_format 'channels_last' is unsafe on the CPU here: "
                             f"{hazard}; use 'contiguous' or 'auto'")
        return torch.channels_last
    if torch.device(device).type == "cpu" and hazard is None:
        return torch.channels_last
    return torch.contiguous_format
