"""The registered ops (`torch.ops.fastrobust.*`) are public too: torch.compile, export, opcheck
and users call them without `fastrobust.functional`'s checks. Every op, on every backend that
runs here, with each bad argument: one clean error naming the argument, and every tensor as it
was (before this, 200000×2×4×4 with a 1×2×4×4 dy segfaulted the CPU backward, small ones gave
~1e18, an integer x came back int64, eps < 0 gave NaN, a meta eps_t silently did nothing). A fuzz
over shapes, strides and dtypes never crashes the process."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from op_table import BAD, OPS

ops = torch.ops.fastrobust
ERRORS = (TypeError, ValueError, RuntimeError, IndexError)


def _snapshot(args: dict):
    return {k: v.clone() for k, v in args.items()
            if isinstance(v, torch.Tensor) and v.device.type != "meta"}


@pytest.mark.parametrize("op,name,bad,words", BAD,
                         ids=[f"{b[0]}-{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_argument_is_one_clean_error_and_changes_nothing(backend, op, name, bad, words):
    args = OPS[op].args()
    args[name] = bad(args)
    if op == "multi_bn" and name == "cumulative":
        args["num_batches_tracked"] = None
        words = "needs num_batches_tracked"
    if name == "needs":  # (torch's own conversion of the schema's bool[7] says it first)
        words = "7"
    before = _snapshot(args)
    with pytest.raises(ERRORS) as info:
        getattr(ops, op)(*args.values())
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert words in message, message
    for k, v in _snapshot(args).items():
        assert _same(v, before[k]), f"{k} was changed"


def _same(a, b):
    """torch.equal, with a NaN equal to a NaN in the same place (a bad value may be one)."""
    if a.is_floating_point() and a.shape == b.shape:
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def test_a_large_mismatched_dy_no_longer_reads_out_of_bounds():
    """858ad8d: x of 200000×2×4×4 with dy of 1×2×4×4 killed the process (SIGSEGV) in the CPU
    backward."""
    x = torch.randn(200000, 2, 4, 4)
    branch = torch.zeros(200000, dtype=torch.long)
    mean, invstd = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="dy .* must have shape"):
        ops.multi_bn_backward(torch.randn(1, 2, 4, 4), x, branch, None, None, None, mean,
                              invstd, torch.empty(0), None, None, None, 1, True, False,
                              [True] * 7)


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.bool]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(N=st.integers(0, 5), C=st.integers(0, 4), H=st.integers(0, 3), K=st.integers(-1, 3),
       dtypes=st.lists(st.sampled_from(_DTYPES), min_size=6, max_size=6),
       shapes=st.lists(st.integers(0, 6), min_size=6, max_size=6),
       flags=st.lists(st.booleans(), min_size=6, max_size=6))
def test_fuzz_never_crashes(N, C, H, K, dtypes, shapes, flags):
    """Random shapes, strides and dtypes for every tensor argument: each call either raises one
    of torch's error types or returns tensors of the right shape."""
    def t(shape, dtype, transpose):
        v = torch.randn(shape).to(dtype) if dtype.is_floating_point else \
            torch.randint(0, 2, shape).to(dtype)
        return v.t() if transpose and v.dim() == 2 else v

    x = t((N, C, H, H), dtypes[0], False)
    if flags[0]:
        x = x.contiguous(memory_format=torch.channels_last)
    branch = t((shapes[0] if flags[1] else N,), dtypes[1], False)
    w = t((max(K, 0), shapes[1] if flags[2] else C), dtypes[2], flags[3])
    rm = t((max(K, 0), C), dtypes[3], False)
    rv = t((max(K, 0), shapes[2] if flags[4] else C), dtypes[4], False)
    try:
        y = ops.multi_bn(x, branch, None, w, None, rm, rv, None, None, None, None, K, flags[5],
                         0.1, False, 1e-5, False)
    except ERRORS:
        pass
    else:
        assert y[0].shape == x.shape
    xa = t((N, C, H), dtypes[5], False)
    g = t((shapes[3], C, H), dtypes[0], False)
    try:
        ops.pgd_step(xa, g, xa.clone(), None, 0.1, None, 0.01, flags[5], 0.0, 1.0)
    except ERRORS:
        pass
