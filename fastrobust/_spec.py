"""What every implementation of the ops agrees on, declared once in csrc/spec.h and read from
the extension: the order of the BN family's gradients (the `needs` flags of
multi_bn_backward) and the modes of the PGD update kernels."""
from __future__ import annotations

import enum

from ._common import acc_dtype  # noqa: F401 - re-exported

try:
    from . import _C
except ImportError as e:  # the schemas and CPU kernels live in the extension
    raise ImportError(
        "fastrobust._C, the compiled extension that defines the fastrobust ops, is not built "
        f"or not importable ({e}); build it with `pip install --no-build-isolation -e .` "
        "against the torch you run") from e

BNGrad = enum.IntEnum("BNGrad", {name.upper(): i for i, name in enumerate(_C.BN_GRADS)})
PgdMode = enum.IntEnum("PgdMode", dict(_C.PGD_MODES))
FILM_GRADS = ("x", "gamma", "beta")  # film_backward's needs and results


def needs(**flags: bool) -> list[bool]:
    """The `needs` list of multi_bn_backward, by name: needs(x=True, weight=True)."""
    unknown = set(flags) - set(_C.BN_GRADS)
    if unknown:
        raise TypeError(f"needs: unknown gradient(s) {sorted(unknown)}; "
                        f"known: {_C.BN_GRADS}")
    return [bool(flags.get(name, False)) for name in _C.BN_GRADS]
