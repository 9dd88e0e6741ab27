"""The CUDA C++ backend: fastrobust._C's CUDA kernels (csrc/cuda), built when torch has CUDA
and a toolkit is present. Selectable with `backends.use("cuda")`; not the default, which stays
Triton until a GPU has measured both. Serves the BN family (multi_bn, multi_bn_backward) and
the PGD / MI-FGSM steps (not yet pgd_init, nor film and add_relu)."""
from __future__ import annotations

import torch

from .. import _C
from ._schema import checked

NAME = "cuda"
SERVES = ("cuda",)
_OPS = {"multi_bn": ("multi_bn", "multi_bn_backward"), "pgd": ("pgd_step", "mifgsm_step")}


def reasons(op: str, device: torch.device) -> list[str]:
    """Why this backend cannot run `op` on `device` (empty: it can)."""
    why = []
    if not getattr(_C, "CUDA_KERNELS", False):
        why.append("fastrobust._C was built without CUDA kernels (a CPU torch, or no CUDA "
                   "toolkit at build time)")
    if device.type != "cuda":
        why.append("serves CUDA tensors only")
    if op not in _OPS:
        why.append(f"no CUDA C++ kernels for {op} yet")
    return why


def implementations() -> dict:
    """The schema ops this backend implements (empty when the build has no CUDA kernels);
    pgd_init is not among them, so a forced "cuda" backend refuses it."""
    if not getattr(_C, "CUDA_KERNELS", False):
        return {}

    def pgd_step(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, l2, clip_min, clip_max):
        _C._cuda_pgd_step(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, l2, clip_min,
                          clip_max)

    def mifgsm_step(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha, decay,
                    clip_min, clip_max):
        _C._cuda_mifgsm_step(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha, decay,
                             clip_min, clip_max)

    def multi_bn_backward(*args):
        *rest, needs = args
        return _C._cuda_multi_bn_backward(*rest, list(needs))

    return checked({"multi_bn": _C._cuda_multi_bn, "multi_bn_backward": multi_bn_backward,
                    "pgd_step": pgd_step, "mifgsm_step": mifgsm_step})
