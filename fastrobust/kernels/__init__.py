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
