"""The PGD steps' Python side of their schema (csrc/pgd/ops.cpp: pgd_step, pgd_init, mifgsm_step,
all in place): their fakes, and how each op's arguments map onto the update kernels' modes
(csrc/pgd/math.h; the same for the eager and Triton implementations)."""
from __future__ import annotations

from .._common import PgdMode


def step_mode(l2: bool) -> PgdMode:
    """The update of pgd_step: a step along the gradient's sign (linf) or its direction (l2)."""
    return PgdMode.L2 if l2 else PgdMode.LINF_SIGN


def init_args(eps_t, eps, radius, l2) -> tuple:
    """pgd_init as an update of the noise about x_nat: (eps_t, eps, alpha_t, alpha, mode);
    linf moves by the noise itself (α = ε), l2 along its direction to `radius`."""
    if l2:
        return eps_t, eps, radius, 0.0, PgdMode.L2
    return eps_t, eps, eps_t, eps, PgdMode.LINF_RAW


def _no_result(*args):
    return None


FAKES = {"pgd_step": _no_result, "pgd_init": _no_result, "mifgsm_step": _no_result}
