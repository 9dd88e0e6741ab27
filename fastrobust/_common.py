"""Small helpers shared by the package and its ground truth (`fastrobust.reference`): the
accumulation dtype, the value checks of the routing inputs and the running-statistics update
rule (docs/math.md). Imports nothing from the package."""
from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(x: Tensor) -> torch.dtype:
    """Statistics accumulate in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def kernel_checks(device: torch.device) -> bool:
    """True where the kernels check value ranges themselves (CUDA, and meta tensors, which
    stand in for CUDA when launches are counted): a bad value poisons its sample with NaN
    there instead of a device assert's extra launches."""
    return device.type in ("cuda", "meta")


def check_branch_values(branch: Tensor, num_branches: int,
                        op: str = "multi_batch_norm") -> None:
    """Out-of-range branch ids are an error: raised at once on CPU, asserted asynchronously on
    the device elsewhere (no host sync). ``op``: the public function, for the message."""
    in_range = ((branch >= 0) & (branch < num_branches)).all()
    if branch.device.type == "cpu":
        if not bool(in_range):  # the first one, in the C++ kernels' words
            n = int(((branch < 0) | (branch >= num_branches)).nonzero()[0, 0])
            raise ValueError(f"{op}: branch id {int(branch[n])} at sample {n} is out of range "
                             f"[0, {num_branches})")
    else:
        torch._assert_async(in_range,
                            f"{op}: branch id out of range [0, {num_branches})")


def check_mix_values(mix: Tensor, op: str = "mixed_batch_norm") -> None:
    """Mix-weighted statistics need non-negative weights (a negative one can make a variance
    negative): raised at once on CPU, asserted asynchronously on the device elsewhere.
    ``op``: the public function, for the message."""
    ok = (mix >= 0).all()
    if mix.device.type == "cpu":
        if not bool(ok):
            raise ValueError(f"{op}: mix weights must be >= 0 when the statistics "
                             "are mix-weighted (training, or no running statistics); smallest "
                             f"is {mix.min().item()}")
    else:
        torch._assert_async(ok, f"{op}: mix weights must be >= 0 with batch statistics")


@torch.no_grad()
def updated_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                          momentum: float, cumulative: bool):
    """New (running_mean, running_var, num_batches_tracked): r ← (1-m)·r + m·stat for branches
    with count ≥ 2; other branches keep their stats and counter. Cumulative (momentum=None)
    uses m = 1/(batches seen by that branch). Without a counter, the third is empty."""
    valid = count >= 2  # [K]
    if cumulative:
        m = 1.0 / (num_batches_tracked + 1).to(mean.dtype)
    else:
        m = torch.full_like(count, momentum, dtype=mean.dtype)
    m = m[:, None]
    unbiased = var * (count / (count - 1).clamp_min(1))[:, None]
    rm, rv = running_mean.to(mean.dtype), running_var.to(mean.dtype)
    new_mean = torch.where(valid[:, None], (1 - m) * rm + m * mean, rm)
    new_var = torch.where(valid[:, None], (1 - m) * rv + m * unbiased, rv)
    if num_batches_tracked is None:
        new_count = count.new_empty(0, dtype=torch.long)
    else:
        new_count = num_batches_tracked + valid.to(num_batches_tracked.dtype)
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype), new_count


def no_running_update(x: Tensor):
    """The three empty tensors a forward returns when it updates no running stats."""
    return (x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=torch.long))
