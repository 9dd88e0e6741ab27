"""fastrobust.backends: the choice per device, forcing, and the reasons given."""
import pytest
import torch

from fastrobust import backends, functional as F

PROBE = (torch.empty(0),)


def test_every_backend_explains_itself():
    rows = backends.table()
    assert {r["device"] for r in rows} >= {"cpu"}
    for row in rows:
        assert row["backend"] in backends.BACKENDS
        assert set(row["others"]) == set(backends.BACKENDS) - {row["backend"]}
        assert all(isinstance(w, str) and w for why in row["others"].values() for w in why)
    text = backends.describe()
    assert "multi_bn" in text and "cuda" in text


def test_cpu_prefers_the_extension_then_eager():
    ext, why = backends.extension()
    chosen = backends.choose("multi_bn", "cpu", PROBE)
    if ext is None:
        assert chosen == "eager" and "not built" in why
    else:
        assert chosen == "cpu"
    # The CPU kernel does not take half precision: the eager path serves it, and says why.
    half = (torch.empty(0, dtype=torch.bfloat16),)
    assert backends.choose("multi_bn", "cpu", half) == "eager"
    assert any("float32 or float64" in r
               for r in backends.not_supported_reasons("cpu", "multi_bn", "cpu", half))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = backends.not_supported_reasons("triton", "multi_bn", "cpu", PROBE)
    assert any("TRITON_INTERPRET=1" in r for r in reasons)


def test_cuda_backend_reasons_on_cpu():
    reasons = backends.not_supported_reasons("cuda", "multi_bn", "cpu", PROBE)
    assert "serves CUDA tensors only" in reasons


def test_forcing_a_backend_that_cannot_serve_raises(monkeypatch):
    with backends.use("cuda"):
        with pytest.raises(RuntimeError, match="forced but cannot run"):
            F.multi_batch_norm(torch.randn(2, 3, 2, 2), torch.zeros(2, dtype=torch.long),
                               num_branches=1, training=True)
    monkeypatch.setenv("FASTROBUST_BACKEND", "eager")
    assert backends.choose("multi_bn", "cpu", PROBE) == "eager"
    monkeypatch.setenv("FASTROBUST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="not one of"):
        backends.choose("multi_bn", "cpu", PROBE)
    with pytest.raises(ValueError, match="unknown backend"):
        with backends.use("bogus"):
            pass


def test_bf16_input_is_served_with_fp32_statistics():
    x = torch.randn(6, 3, 4, 4, dtype=torch.bfloat16)
    br = torch.tensor([0, 1, 0, 1, 1, 0])
    y = F.multi_batch_norm(x, br, torch.ones(2, 3), torch.zeros(2, 3), training=True)
    assert y.dtype == torch.bfloat16
    y32 = F.multi_batch_norm(x.float(), br, torch.ones(2, 3), torch.zeros(2, 3), training=True)
    torch.testing.assert_close(y.float(), y32, rtol=1.6e-2, atol=1.6e-2)  # bf16: 8-bit mantissa


def test_package_works_without_the_extension():
    """FASTROBUST_NO_EXT=1: no fastrobust._C; the package imports, says why, and computes on
    the reference."""
    import os
    import subprocess
    import sys

    code = ("import torch, fastrobust\n"
            "from fastrobust import backends, functional as F\n"
            "print(backends.choose('multi_bn', 'cpu', (torch.empty(0),)))\n"
            "print(backends.not_supported_reasons('cpu', 'multi_bn', 'cpu'))\n"
            "y = F.multi_batch_norm(torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 0, 1]),\n"
            "                       num_branches=2, training=True)\n"
            "print(float(y.mean(dim=(0, 2, 3)).abs().max()) < 1e-6)\n")
    env = {**os.environ, "FASTROBUST_NO_EXT": "1"}
    env.pop("FASTROBUST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "eager"
    assert "FASTROBUST_NO_EXT=1" in out[1]
    assert out[2] == "True"


def test_deterministic_and_independent_of_thread_count(backend):
    """No atomics, fixed reduction order: bitwise-equal results across runs and thread counts."""
    x = torch.randn(32, 8, 6, 6, requires_grad=True)
    br = torch.randint(0, 3, (32,))
    w = torch.rand(3, 8, requires_grad=True)
    gy = torch.randn_like(x)

    def run():
        y = F.multi_batch_norm(x, br, w, training=True)
        return (y, *torch.autograd.grad(y, (x, w), gy))

    first = run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, run(), single):
        assert torch.equal(a, b) and torch.equal(a, c)
