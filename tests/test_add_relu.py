"""add_relu: relu(a + b) in one pass each way; equal to the two plain ops, bitwise, in value,
gradient and second derivative, on every backend."""
import pytest
import torch

import fastrobust.functional as F


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_plain_ops(backend, dtype, layout):
    g = torch.Generator().manual_seed(0)
    a0 = torch.randn(4, 3, 5, 6, generator=g, dtype=dtype)
    b0 = torch.randn(4, 3, 5, 6, generator=g, dtype=dtype)
    if layout == "channels_last":
        a0, b0 = (t.contiguous(memory_format=torch.channels_last) for t in (a0, b0))
    dy = torch.randn(4, 3, 5, 6, generator=g, dtype=dtype)
    out = []
    for fn in (F.add_relu, lambda a, b: torch.relu(a + b)):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = fn(a, b)
        y.backward(dy)
        out.append((y, a.grad, b.grad))
    for got, want in zip(*out):
        assert torch.equal(got, want)


def test_broadcast_and_mixed_dtypes_fall_back():
    a, b = torch.randn(4, 3, 2, 2), torch.randn(3, 1, 1)
    assert torch.equal(F.add_relu(a, b), torch.relu(a + b))
    c = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert torch.equal(F.add_relu(a, c), torch.relu(a + c))


def test_gradcheck_and_gradgradcheck(backend):
    a = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(F.add_relu, (a, b))
    assert torch.autograd.gradgradcheck(F.add_relu, (a, b))


def test_bad_input():
    with pytest.raises(TypeError, match="add_relu: b must be a Tensor"):
        F.add_relu(torch.ones(2), 1.0)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "autograd"])
def test_the_op_raises_the_same_error_with_or_without_autograd(requires_grad):
    """The registered op's check is one (the add_relu family's): a call through the autograd
    node raises the ValueError the kernels raise, not an error of its own."""
    a = torch.randn(2, 3, requires_grad=requires_grad)
    with pytest.raises(ValueError, match="add_relu: a and b must have the same shape"):
        torch.ops.fastrobust.add_relu(a, torch.randn(3))


def test_opcheck():
    """The registered op: schema, fake tensors (its C++ composite serves them), autograd
    registration and torch.compile's tracing."""
    from torch.library import opcheck

    a, b = torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 4, 5, requires_grad=True)
    opcheck(torch.ops.fastrobust.add_relu.default, (a, b))
    compiled = torch.compile(F.add_relu, fullgraph=True)
    torch.testing.assert_close(compiled(a, b), torch.relu(a + b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    """bf16 / fp16 activations (autocast): ATen's one-pass _add_relu has no CPU kernel for
    them (an internal assert at 858ad8d); relu(a + b) in their dtype, bitwise."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic (numpy): bf16 on GPU only "
                    "(docs/backends.md)")
    a, b = torch.randn(4, 8, 3, 3).to(dtype), torch.randn(4, 8, 3, 3).to(dtype)
    torch.testing.assert_close(F.add_relu(a, b), torch.relu(a + b), rtol=0, atol=0)
