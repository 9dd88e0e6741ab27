"""The static memory-order check (benchmarks/memory_order_check.py): every Triton kernel of the
package passes it, and it catches the bug class on small kernels written like the 858ad8d
statistics kernel (a store, then a load of the same buffer in a jit helper the kernel calls,
with its arguments mapped to the helper's parameters)."""
import textwrap

import memory_order_check as moc


def _check(tmp_path, src: str, name: str = "k.py"):
    (tmp_path / name).write_text(textwrap.dedent(src))
    findings, kernels = moc.check([tmp_path])
    return findings, kernels


HEADER = """
import triton
import triton.language as tl
"""


def test_the_package_kernels_pass():
    findings, kernels = moc.check()
    assert not findings, "\n".join(map(str, findings))
    names = {k.rsplit(".", 1)[1] for k in kernels}
    # every launched kernel is among the roots checked (helpers are followed from them)
    assert {"_bn_stats_kernel", "_affine_kernel", "_bn_grads_kernel", "_dx_kernel",
            "_sync_apply_kernel", "_sync_dx_kernel", "_film_grad_kernel", "_linf_kernel",
            "_l2_kernel", "_mifgsm_kernel", "_l2_split_kernel"} <= names


def test_store_then_load_in_a_helper_is_found(tmp_path):
    """858ad8d's pattern: the kernel stores mean, a helper loads it back through its own
    parameter name."""
    findings, _ = _check(tmp_path, HEADER + """
@triton.jit
def _coefficients(cs, m_ptr, r_ptr):
    return tl.load(m_ptr + cs), tl.load(r_ptr + cs)

@triton.jit
def _tail(cs, mean_ptr, invstd_ptr, mean, r):
    tl.store(mean_ptr + cs, mean)
    tl.store(invstd_ptr + cs, r)
    mu, rr = _coefficients(cs, mean_ptr, invstd_ptr)
    return mu * rr

@triton.jit
def _stats_kernel(x_ptr, mean_ptr, invstd_ptr, out_ptr, BLOCK: tl.constexpr):
    cs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + cs)
    a = _tail(cs, mean_ptr, invstd_ptr, tl.sum(v, 0) + cs * 0.0, v)
    tl.store(out_ptr + cs, a)
""")
    assert {(f.kernel.rsplit(".", 1)[1], f.buffer) for f in findings} == {
        ("_stats_kernel", "mean_ptr"), ("_stats_kernel", "invstd_ptr")}
    assert "_stats_kernel -> _tail -> _coefficients" in str(findings[0])


def test_a_barrier_orders_the_store_and_the_load(tmp_path):
    findings, _ = _check(tmp_path, HEADER + """
@triton.jit
def _kernel(x_ptr, buf_ptr, out_ptr, BLOCK: tl.constexpr):
    cs = tl.arange(0, BLOCK)
    tl.store(buf_ptr + cs, tl.load(x_ptr + cs))
    tl.debug_barrier()
    tl.store(out_ptr + cs, tl.load(buf_ptr + BLOCK - 1 - cs))
""")
    assert findings == []


def test_the_same_address_in_the_same_iteration_is_still_a_race(tmp_path):
    """Same offsets, but the threads that load are not the threads that stored."""
    findings, _ = _check(tmp_path, HEADER + """
@triton.jit
def _kernel(x_ptr, buf_ptr, out_ptr, BLOCK: tl.constexpr):
    cs = tl.arange(0, BLOCK)
    tl.store(buf_ptr + cs, tl.sum(tl.load(x_ptr + cs), 0) + cs * 0.0)
    tl.store(out_ptr + cs, tl.load(buf_ptr + cs))
""")
    assert [f.buffer for f in findings] == ["buf_ptr"]


def test_a_store_in_one_iteration_and_a_load_in_the_next_is_found(tmp_path):
    findings, _ = _check(tmp_path, HEADER + """
@triton.jit
def _kernel(buf_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n):
        acc += tl.load(buf_ptr + tl.arange(0, BLOCK))
        tl.store(buf_ptr + i * BLOCK + tl.arange(0, BLOCK), acc)
""")
    assert [f.buffer for f in findings] == ["buf_ptr"]


def test_read_modify_write_blocks_of_a_loop_pass(tmp_path):
    """The PGD kernels' loops: each iteration reads and writes its own block."""
    findings, _ = _check(tmp_path, HEADER + """
@triton.jit
def _apply(buf_ptr, g_ptr, base, start, end, BLOCK: tl.constexpr):
    for s0 in range(start, end, BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        b = tl.load(buf_ptr + base + o) + tl.load(g_ptr + base + o)
        tl.store(buf_ptr + base + o, b)

@triton.jit
def _kernel(buf_ptr, g_ptr, S, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    _apply(buf_ptr, g_ptr, n * S, 0, S, BLOCK)
""")
    assert findings == []


def test_a_store_in_one_branch_counts(tmp_path):
    findings, _ = _check(tmp_path, HEADER + """
@triton.jit
def _kernel(buf_ptr, out_ptr, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    cs = tl.arange(0, BLOCK)
    if FLAG:
        tl.store(buf_ptr + cs, cs * 1.0)
    else:
        tl.store(out_ptr + cs, cs * 2.0)
    tl.store(out_ptr + cs, tl.load(buf_ptr + BLOCK - 1 - cs))
""")
    assert [f.buffer for f in findings] == ["buf_ptr"]


def test_helpers_imported_from_another_module_are_followed(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "common.py").write_text(textwrap.dedent(HEADER + """
@triton.jit
def _reload(p_ptr, cs):
    return tl.load(p_ptr + cs)
"""))
    findings, kernels = _check(tmp_path, HEADER + """
from .common import _reload

@triton.jit
def _kernel(buf_ptr, out_ptr, BLOCK: tl.constexpr):
    cs = tl.arange(0, BLOCK)
    tl.store(buf_ptr + cs, cs * 1.0)
    tl.store(out_ptr + cs, _reload(buf_ptr, BLOCK - 1 - cs))
""", name="bn.py")
    assert [f.buffer for f in findings] == ["buf_ptr"]
    assert not any(k.endswith("_reload") for k in kernels)  # a helper, not a root


def test_main_exits_1_on_a_finding(tmp_path, capsys):
    (tmp_path / "k.py").write_text(textwrap.dedent(HEADER + """
@triton.jit
def _kernel(buf_ptr, BLOCK: tl.constexpr):
    cs = tl.arange(0, BLOCK)
    tl.store(buf_ptr + cs, cs * 1.0)
    tl.store(buf_ptr + cs, tl.load(buf_ptr + BLOCK - 1 - cs) + 1.0)
"""))
    assert moc.main([str(tmp_path)]) == 1
    assert "loads from buf_ptr after a store" in capsys.readouterr().out
    assert moc.main([]) == 0
