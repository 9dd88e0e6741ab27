"""fastrobust.backends: the choice per device, forcing, and the reasons given."""
import pytest
import torch

from fastrobust import backends, functional as F

def test_every_backend_explains_itself():
    rows = backends.table()
    assert {r["device"] for r in rows} >= {"cpu"}
    for row in rows:
        assert row["backend"] in backends.BACKENDS
        assert set(row["others"]) == set(backends.BACKENDS) - {row["backend"]}
        assert all(isinstance(w, str) and w for why in row["others"].values() for w in why)
    text = backends.describe()
    assert "multi_bn" in text and "triton" in text


def test_dispatch_by_device():
    """The C++ kernels are the CPU key's own; half precision runs there too (in fp32)."""
    assert backends.choose("multi_bn", "cpu") == "cpu"
    assert backends.choose("pgd", "cpu") == "cpu"
    assert backends.choose("multi_bn", "meta") == "eager"  # no kernel of its own


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = backends.not_supported_reasons("triton", "multi_bn", "cpu")
    assert any("TRITON_INTERPRET=1" in r for r in reasons)


def test_cpu_backend_reasons_on_cuda():
    assert "serves CPU tensors only" in backends.not_supported_reasons("cpu", "multi_bn", "cuda")


def test_forcing_a_backend_that_cannot_serve_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backends.use("triton"):
        assert backends.forced() == "triton"
        with pytest.raises(RuntimeError, match="forced but cannot run multi_bn on cpu"):
            F.multi_batch_norm(torch.randn(2, 3, 2, 2), torch.zeros(2, dtype=torch.long),
                               num_branches=1, training=True)
        with pytest.raises(RuntimeError, match="forced but cannot run"):
            backends.choose("multi_bn", "cpu")
    assert backends.forced() is None
    with pytest.raises(ValueError, match="unknown backend"):
        with backends.use("bogus"):
            pass


def test_forcing_is_undone_on_exit():
    """A forced backend's kernels replace the CPU key's only inside the block."""
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    br = torch.tensor([0, 1, 0, 1])
    with backends.use("eager"):
        y_eager = F.multi_batch_norm(x, br, num_branches=2, training=True)
    y_cpu = F.multi_batch_norm(x, br, num_branches=2, training=True)
    # Both are the one C++ autograd node; the kernels below it differ in their last bits at
    # most (fp32 sums in another order).
    assert "MultiBn" in y_eager.grad_fn.name() and "MultiBn" in y_cpu.grad_fn.name()
    torch.testing.assert_close(y_eager, y_cpu, rtol=1e-5, atol=1e-5)


def test_bf16_input_is_served_with_fp32_statistics():
    x = torch.randn(6, 3, 4, 4, dtype=torch.bfloat16)
    br = torch.tensor([0, 1, 0, 1, 1, 0])
    y = F.multi_batch_norm(x, br, torch.ones(2, 3), torch.zeros(2, 3), training=True)
    assert y.dtype == torch.bfloat16
    y32 = F.multi_batch_norm(x.float(), br, torch.ones(2, 3), torch.zeros(2, 3), training=True)
    torch.testing.assert_close(y.float(), y32, rtol=1.6e-2, atol=1.6e-2)  # bf16: 8-bit mantissa


@pytest.mark.parametrize("shape", [(32, 8, 6, 6), (64, 64, 4, 4)], ids=["6x6", "C64_4x4"])
def test_deterministic_and_independent_of_thread_count(backend, shape):
    """No atomics, fixed reduction order: bitwise-equal results across runs and thread counts,
    two threads against one (at C64_4x4 the CPU kernels' statistics pass over x splits the
    channels into blocks that the two threads share out as they come)."""
    if backend != "cpu" and shape[2] == 4:
        pytest.skip("the channel blocks are the CPU kernels'")
    N, C = shape[:2]
    x = torch.randn(*shape, requires_grad=True)
    br = torch.randint(0, 3, (N,))
    w = torch.rand(3, C, requires_grad=True)
    gy = torch.randn_like(x)

    def run():
        y = F.multi_batch_norm(x, br, w, training=True)
        return (y, *torch.autograd.grad(y, (x, w), gy))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, again = run(), run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_there_is_no_cuda_cpp_backend():
    """One GPU implementation: the Triton kernels (launched from C++ on CUDA). The CUDA C++
    kernels are gone, and naming them is an error that lists the backends there are."""
    assert backends.BACKENDS == ("eager", "cpu", "triton")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with backends.use("cuda"):
            pass


def test_use_is_per_thread_and_registers_nothing(monkeypatch):
    """`use` is a dispatch mode of the calling thread: a thread forcing the eager backend does
    not change what serves another thread's calls (858ad8d registered over the CPU key
    process-wide: two threads crashed the process or sent multi_bn to pgd_init's kernel)."""
    import threading

    from fastrobust.ops.batch_norm import eager

    served = {}
    real = eager.multi_bn

    def counting(*args, **kwargs):
        name = threading.current_thread().name
        served[name] = served.get(name, 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(eager, "multi_bn", counting)
    x = torch.randn(8, 3, 4, 4)
    br = torch.tensor([0, 1] * 4)
    want = F.multi_batch_norm(x, br, num_branches=2, training=True)
    inside, go, errors = threading.Event(), threading.Event(), []

    def forcing():
        try:
            with backends.use("eager"):
                inside.set()
                go.wait(10)
                for _ in range(5):
                    y = F.multi_batch_norm(x, br, num_branches=2, training=True)
                    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=forcing, name="forcing")
    t.start()
    inside.wait(10)
    assert backends.forced() is None  # this thread is not forced
    go.set()
    for _ in range(5):
        y = F.multi_batch_norm(x, br, num_branches=2, training=True)
        assert torch.equal(y, want)  # the CPU kernels, bitwise as before
    t.join(10)
    assert not t.is_alive(), "the forcing thread hung"
    assert not errors, errors
    assert served == {"forcing": 5}


def test_use_none_inside_a_forced_block_is_the_dispatchers_choice(monkeypatch):
    from fastrobust.ops.batch_norm import eager

    calls = []
    real = eager.multi_bn
    monkeypatch.setattr(eager, "multi_bn",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    x, br = torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 0, 1])
    with backends.use("eager"):
        F.multi_batch_norm(x, br, num_branches=2, training=True)
        with backends.use(None):
            assert backends.forced() is None
            F.multi_batch_norm(x, br, num_branches=2, training=True)
        assert backends.forced() == "eager"
    assert calls == [1]


def test_two_threads_forcing_different_backends_get_right_results():
    import threading

    x, br = torch.randn(16, 4, 5, 5), torch.randint(0, 3, (16,))
    want = F.multi_batch_norm(x, br, num_branches=3, training=True)
    # (one Triton thread: the interpreter patches triton.language while it runs a kernel, so
    # two interpreted kernels cannot run at once; compiled ones on a GPU can)
    names = ["eager", "cpu", "eager", "cpu"] + [
        n for n in ("triton",) if not backends.not_supported_reasons(n, "multi_bn", "cpu")]
    errors = []

    def run(name):
        try:
            for _ in range(3):
                with backends.use(name):
                    y = F.multi_batch_norm(x, br, num_branches=3, training=True)
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        except Exception as e:  # noqa: BLE001
            errors.append((name, e))

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a thread hung"
    assert not errors, errors
