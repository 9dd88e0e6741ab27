"""What every family and implementation of the ops agrees on: the accumulation dtype, the value
checks of the routing inputs, the running-statistics update rule (docs/math.md; the ground
truth `fastrobust.reference` shares these), the order of the BN family's gradients (the `needs`
flags of multi_bn_backward) and the modes of the PGD update kernels, both declared once in
csrc/spec.h and read from the extension; and the backend a thread forces."""
from __future__ import annotations

import enum
import re
import threading

import torch
from torch import Tensor

try:
    from .. import _C
except ImportError as e:  # the schemas and CPU kernels live in the extension
    raise ImportError(
        "fastrobust._C, the compiled extension that defines the fastrobust ops, is not built "
        f"or not importable ({e}); build it with `pip install --no-build-isolation -e .` "
        "against the torch you run") from e

BNGrad = enum.IntEnum("BNGrad", {name.upper(): i for i, name in enumerate(_C.BN_GRADS)})
PgdMode = enum.IntEnum("PgdMode", dict(_C.PGD_MODES))


def needs(**flags: bool) -> list[bool]:
    """The `needs` list of multi_bn_backward, by name: needs(x=True, weight=True)."""
    unknown = set(flags) - set(_C.BN_GRADS)
    if unknown:
        raise TypeError(f"needs: unknown gradient(s) {sorted(unknown)}; "
                        f"known: {_C.BN_GRADS}")
    return [bool(flags.get(name, False)) for name in _C.BN_GRADS]


def acc_dtype(x: Tensor) -> torch.dtype:
    """Statistics accumulate in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_EXTRAS = ("input_scale", "film_gamma", "film_beta")  # the BN's [N, C] extras


def shown(v) -> str:
    """A value for a one-line message: its type, and a short repr (a tensor's or an array's
    shape instead of its multi-line repr)."""
    shape = getattr(v, "shape", None)
    if shape is not None:
        return f"{type(v).__name__} of shape {list(shape)}"
    r = " ".join(repr(v).split())
    return f"{type(v).__name__} {r if len(r) <= 40 else r[:37] + '...'}"


_SCHEMA_TYPE = re.compile(r"Expected a value of type '([^']+)' for argument '(\w+)' but "
                          r"instead found type '(\w+)'")


def in_words_of(op, err, x=None, K=None, names=None, required=()):
    """An error of the op that serves the public function ``op``, in that function's words:
    the schema parser's type error (a list for a tensor) as a TypeError naming the argument;
    the op's name and argument names (``names``: the op's → the function's) replaced; an
    extra's shape with the [C] form the function also takes. Any other error as it is."""
    msg = str(err)
    names = names or {}
    found = _SCHEMA_TYPE.search(msg)
    if found:
        want, name, got = found.groups()
        user = names.get(name, name)
        if name == "num_batches_tracked":
            want = f"an int64 [{K}] Tensor or None"
        elif want.startswith("Optional[") and user not in required:
            want = "a Tensor or None" if want == "Optional[Tensor]" else want
        else:
            want = "a Tensor" if "Tensor" in want else want
        return TypeError(f"{op}: {user} must be {want}, got {got}")
    head, sep, rest = msg.partition(": ")
    if not sep or " " in head:  # not one of the op's own messages
        return err
    for a, b in names.items():
        rest = re.sub(rf"\b{a}\b", b, rest)
    if isinstance(x, Tensor) and x.dim() >= 2:
        C = x.shape[1]
        for name in _EXTRAS:
            rest = rest.replace(f"{name} must have shape [N, C] = [{x.shape[0]}, {C}], ",
                                f"{name} must have shape [N, C] = [{x.shape[0]}, {C}] or "
                                f"[C] = [{C}], ")
    try:
        return type(err)(f"{op}: {rest}")
    except Exception:  # an exception type that takes other arguments: keep it
        return err


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


def flat_layout(t: Tensor) -> bool:
    """Dense, with each sample one block of memory (contiguous, channels_last, ...): the
    layout the PGD kernels walk as a flat [N, S] array."""
    if t.numel() == 0 or t.dim() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return t.shape[0] == 1 or t.stride(0) == t.numel() // t.shape[0]


def like(t: Tensor, ref: Tensor) -> Tensor:
    """t in ref's layout: t itself when the strides already agree, else a copy."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref).copy_(t)


# --- the backend this thread forces (fastrobust.backends.use) ---------------------------------

_local = threading.local()  # .forced: this thread's stack of `use` blocks


def forced_stack() -> list:
    """This thread's stack of backends forced by `fastrobust.backends.use` (None: the
    dispatcher's choice)."""
    if not hasattr(_local, "forced"):
        _local.forced = []
    return _local.forced


def forced() -> str | None:
    """The backend forced in this thread, if any."""
    stack = forced_stack()
    return stack[-1] if stack else None

