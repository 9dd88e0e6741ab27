"""A launch as a plan writes it down (`Launch`, its parameters' `Slot`s), and the model of
Triton's specialization that says which parameters a compiled kernel takes, of which type
(`layout`); on a GPU it is checked against the compiled kernel's own signature
(`_check_compiled`), and benchmarks/plan_layout_check.py checks it against kernels compiled for
sm_90 without a GPU."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# slot kinds (csrc/launch/plans.cpp reads the same numbers)
INPUT, ALLOC, NULL, INT, FLOAT, ARG = 0, 1, 2, 3, 4, 5


@dataclass
class Slot:
    kind: int
    index: int = -1       # INPUT / ALLOC / ARG: which
    offset: int = 0       # INPUT / ALLOC: bytes from its first element; ARG: the part
    value: float = 0      # INT / FLOAT (ARG: the recorded value)
    dtype: torch.dtype | None = None  # a pointer's element type


@dataclass
class Launch:
    kernel: object        # the JITFunction (InterpretedFunction under the interpreter)
    compiled: object      # Triton's CompiledKernel (None under the interpreter)
    grid: tuple
    params: list          # (name, Slot or a constexpr value, constexpr?) in the kernel's order
    num_warps: int = 4


def _name(kernel) -> str:
    return getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None),
                                                        "__name__", str(kernel))


_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.int16: "i16",
          torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def layout(L: Launch):
    """[(name, Slot, Triton type)] of the parameters the compiled kernel takes, in order: this
    module's model of Triton's specialization (a constexpr, a None and an int equal to 1 are
    compiled in, not passed; ints are i32 within its range, else i64; floats fp32; tensors
    pointers to their element type). A str: why the launch has no replay."""
    out = []
    for name, v, const in L.params:
        if const:
            continue
        if v.kind == NULL and v.dtype is None:  # None: a constexpr for Triton
            continue
        if v.kind in (INPUT, ALLOC, NULL):
            ty = "*" + _TYPES.get(v.dtype, "?")
            if ty == "*?":
                return f"{_name(L.kernel)}: parameter {name} points to {v.dtype}"
        elif v.kind == INT:
            iv = int(v.value)
            if iv == 1:
                continue
            if -2**31 <= iv < 2**31:
                ty = "i32"
            elif -2**63 <= iv < 2**63:
                ty = "i64"
            else:
                return f"{_name(L.kernel)}: parameter {name} = {iv} is past int64"
        else:  # FLOAT, ARG
            ty = "fp32"
        out.append((name, v, ty))
    return out


def _check_compiled(L: Launch, c, model) -> str | None:
    """The model against what Triton compiled (None: they agree)."""
    names = [name for name, _, _ in L.params]
    compiled = []
    for key, ty in c.src.signature.items():
        name = names[key] if isinstance(key, int) else key
        if ty != "constexpr":
            compiled.append((name, ty))
    mine = [(name, ty) for name, _, ty in model]
    if compiled != mine:
        return (f"{_name(L.kernel)}: Triton compiled the parameters {compiled}, the plan "
                f"model says {mine}")
    meta = c.metadata
    extra = [k for k in ("global_scratch_size", "profile_scratch_size") if getattr(meta, k, 0)]
    if (getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid", False)
            or getattr(meta, "launch_pdl", False) or extra):
        return (f"{_name(L.kernel)} needs a launch option the replay lacks (clusters, "
                f"cooperative grid, PDL or scratch: {extra})")
    return None
