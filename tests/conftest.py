"""Test configuration. TRITON_INTERPRET must be set before anything imports triton, so the
Triton kernels run on CPU tensors here."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
# The eager baselines users run today (torchattacks' steps, the OAT repository's forms) live
# with the benchmarks; a few tests compare against them bitwise.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pytest  # noqa: E402
import torch  # noqa: E402

from fastrobust import backends  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core (pyproject's addopts): one thread each, so the
    # workers do not compete for the cores.
    torch.set_num_threads(1)

# FASTROBUST_REQUIRE_BACKENDS=cpu,triton (CI sets it) turns a missing backend into a failure
# instead of a skip, so a broken build cannot pass as "skipped".
_REQUIRED = {b for b in os.environ.get("FASTROBUST_REQUIRE_BACKENDS", "").split(",") if b}


def cpu_backends():
    """Every backend that can serve CPU tensors on this machine, as pytest params."""
    params = []
    for name in ("eager", "cpu", "triton"):
        reasons = backends.not_supported_reasons(name, "multi_bn", "cpu")
        if reasons and name in _REQUIRED:
            raise RuntimeError(f"required backend {name!r} is unavailable: {reasons}")
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=cpu_backends())
def backend(request):
    """Runs the test body with one backend forced."""
    with backends.use(request.param):
        yield request.param


def opcheck_utils(backend: str) -> tuple[str, ...]:
    """The `torch.library.opcheck` checks for an op run with `backend` forced on CPU tensors:
    all of them for the CPU's own kernels; for another backend all but the eager-vs-traced
    gradient comparison (test_aot_dispatch_dynamic): `backends.use` forces the eager calls,
    while a traced graph's ops reach the dispatcher's kernel, so it would compare two
    backends' rounding rather than the registration."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    return checks + (("test_aot_dispatch_dynamic",) if backend == "cpu" else ())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cuda_skip_reason() -> str | None:
    """Why the CUDA cases cannot run here (None: they can): no GPU, or the Triton interpreter
    (CUDA tensors must meet the compiled kernels: run them with TRITON_INTERPRET=0, as
    benchmarks/gpu_validate.sh does)."""
    if not torch.cuda.is_available():
        return "no CUDA device here (benchmarks/gpu_validate.sh runs these on a GPU)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the CUDA cases run with the compiled kernels " \
               "(TRITON_INTERPRET=0)"
    return None


def devices():
    """cpu, and cuda where this machine has a GPU (skipped otherwise), as pytest params."""
    why = cuda_skip_reason()
    cuda = [pytest.mark.skip(reason=why)] if why else []
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=cuda, id="cuda")]


@pytest.fixture(params=devices())
def device(request):
    """The device a test's tensors live on; the ops take their default dispatch there."""
    return request.param
