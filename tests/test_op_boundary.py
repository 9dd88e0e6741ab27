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

from op_table import OPS

ops = torch.ops.fastrobust
ERRORS = (TypeError, ValueError, RuntimeError, IndexError)
META = torch.empty(0, device="meta")
# (op, argument, bad value, words the message must contain); the valid call each row
# changes is the op's row in tests/op_table.py
BAD = [
    ("multi_bn", "x", lambda a: a["x"].long(), "x must be floating point"),
    ("multi_bn", "x", lambda a: a["x"][0, 0, 0], "x must be [N, C"),
    ("multi_bn", "branch", lambda a: a["branch"].float(), "branch must be int64"),
    ("multi_bn", "branch", lambda a: a["branch"][:3], "branch must have shape"),
    ("multi_bn", "mix", lambda a: torch.rand(4, 2), "exactly one of branch and mix"),
    ("multi_bn", "weight", lambda a: a["weight"].long(), "weight must be floating"),
    ("multi_bn", "weight", lambda a: torch.ones(2, 4), "weight must have shape"),
    ("multi_bn", "weight", lambda a: torch.ones(2, 3, device="meta"), "weight is on meta"),
    ("multi_bn", "bias", lambda a: torch.ones(3, 3), "bias must have shape"),
    ("multi_bn", "running_var", lambda a: None, "both running_mean and running_var"),
    ("multi_bn", "running_mean", lambda a: torch.zeros(3, 2), "running_mean must have"),
    ("multi_bn", "num_batches_tracked", lambda a: torch.zeros(2),
     "num_batches_tracked must be int64"),
    ("multi_bn", "num_batches_tracked", lambda a: torch.zeros(3, dtype=torch.long),
     "num_batches_tracked must have shape"),
    # the Triton kernels advance the counters at stride 1: a strided [K] would be misread
    ("multi_bn", "num_batches_tracked", lambda a: torch.zeros(4, dtype=torch.long)[::2],
     "num_batches_tracked must be contiguous"),
    ("multi_bn", "input_scale", lambda a: torch.ones(3), "input_scale must have shape"),
    ("multi_bn", "film_gamma", lambda a: a["film_gamma"].int(), "film_gamma must be"),
    ("multi_bn", "film_beta", lambda a: torch.ones(4, 3, dtype=torch.float64,
                                                        device="meta"), "film_beta is on meta"),
    ("multi_bn", "num_branches", lambda a: 0, "num_branches must be >= 1"),
    ("multi_bn", "momentum", lambda a: 5.0, "momentum must be in [0, 1]"),
    ("multi_bn", "eps", lambda a: -1e-5, "eps must be a finite number > 0"),
    ("multi_bn", "eps", lambda a: float("nan"), "eps must be a finite number > 0"),
    ("multi_bn", "cumulative", lambda a: True, None),  # needs num_batches_tracked:
    ("multi_bn_backward", "dy", lambda a: a["dy"][:1],
     "dy (the gradient of y) must have shape"),
    ("multi_bn_backward", "dy", lambda a: a["dy"].long(), "dy (the gradient"),
    ("multi_bn_backward", "mean", lambda a: a["mean"][:1], "mean must have"),
    ("multi_bn_backward", "invstd", lambda a: a["invstd"].long(),
     "invstd must be floating"),
    ("multi_bn_backward", "needs", lambda a: [True] * 3, None),
    ("film", "x", lambda a: a["x"].long(), "film: x must be floating point"),
    ("film", "gamma", lambda a: torch.ones(5), "gamma must have shape"),
    ("film", "beta", lambda a: torch.ones(3, dtype=torch.long), "beta must be floating"),
    ("film_backward", "dy", lambda a: torch.ones(1, 3, 2, 2),
     "dy (the gradient of y) must have shape"),
    ("film_backward", "per_channel", lambda a: [False, False],
     "per_channel[0] must say whether gamma is [C]"),
    ("add_relu", "b", lambda a: torch.randn(3), "same shape"),
    ("pgd_step", "x_adv", lambda a: (a["x_adv"] * 100).long(), "x_adv must be floating"),
    ("pgd_step", "grad", lambda a: torch.randn(1, 2, 4, 4), "grad has shape"),
    ("pgd_step", "x_nat", lambda a: a["x_nat"].double(), "x_nat is torch.float64"),
    ("pgd_step", "eps_t", lambda a: torch.full((2,), 0.03), "eps must have shape"),
    ("pgd_step", "eps_t", lambda a: torch.full((3,), 0.03, device="meta"),
     "eps is on meta"),
    ("pgd_step", "eps_t", lambda a: torch.tensor([0.03, -0.01, 0.03]), "eps must be >= 0"),
    # issue 37: a NaN compares false with 0 both ways; the minimum's check let it through and
    # the CPU step moved the sample unbounded (the functional API refused it)
    ("pgd_step", "eps_t", lambda a: torch.tensor([0.03, float("nan"), 0.03]),
     "eps must be >= 0, got nan at sample 1"),
    ("mifgsm_step", "eps_t", lambda a: torch.tensor([float("nan"), 0.03, 0.03]),
     "eps must be >= 0, got nan at sample 0"),
    ("pgd_init", "eps_t", lambda a: torch.tensor([0.03, 0.03, float("nan")]),
     "eps must be >= 0, got nan at sample 2"),
    ("pgd_step", "eps", lambda a: -0.1, "eps must be a finite number >= 0"),
    ("pgd_step", "clip_min", lambda a: 2.0, "clip_min (2) must be <= clip_max (1)"),
    ("mifgsm_step", "momentum", lambda a: torch.zeros(3, 2, 4, 5),
     "momentum_buf has shape"),
    ("mifgsm_step", "decay", lambda a: float("inf"), "decay must be finite"),
    ("pgd_init", "noise", lambda a: torch.rand(3, 2, 4, 4).half(), "noise is"),
    ("pgd_init", "l2", lambda a: True, "the l2 start needs radius"),
    ("sync_bn_stats", "rank", lambda a: 2, "rank must be in [0, world_size)"),
    ("sync_bn_apply", "payload", lambda a: torch.zeros(2, 5, dtype=torch.float64),
     "payload must have shape"),
    ("sync_bn_grad_sums", "dy", lambda a: a["dy"][:1], "dy (the gradient of y) must have shape"),
    ("sync_bn_dx", "payload", lambda a: a["payload"].float(), "payload must be float64"),
]


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
