"""Bad input to the ops and modules: each call raises the listed exception with a message that
names the argument, and leaves every tensor it was given unchanged. Legal but unusual input
(non-contiguous small tensors, numpy integers) works."""
import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import fastrobust.distributed as D
import fastrobust.functional as F
from fastrobust.nn import (MixedBatchNorm2d, MultiBatchNorm1d, MultiBatchNorm2d,
                           SyncMultiBatchNorm2d, convert_multi_bn, routing)


def _bn_state(K=2, C=3):
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(4, C, 3, 3, generator=g), branch=torch.tensor([0, 1, 1, 0]),
                mix=torch.rand(4, K, generator=g), w=torch.rand(K, C, generator=g) + 0.5,
                b=torch.randn(K, C, generator=g), rm=torch.randn(K, C, generator=g),
                rv=torch.rand(K, C, generator=g) + 0.5)


def _multi(s, **kw):
    return F.multi_batch_norm(s["x"], s["branch"], s["w"], s["b"], s["rm"], s["rv"],
                              **{"training": True, **kw})


def _mixed(s, **kw):
    return F.mixed_batch_norm(s["x"], s["mix"], s["w"], s["b"], s["rm"], s["rv"],
                              **{"training": True, **kw})


def _pgd(s, **kw):
    x = s["x"]
    return F.pgd_step_(s["xa"], s["g"], x, **{"eps": 0.1, "alpha": 0.01, **kw})


# (name, call, exception, fragment of the message)
CASES = [
    ("eps zero", lambda s: _multi(s, eps=0.0), ValueError, "eps must be a finite number > 0"),
    ("eps negative", lambda s: _multi(s, eps=-1e-5), ValueError, "eps must be"),
    ("eps nan", lambda s: _mixed(s, eps=float("nan")), ValueError, "eps must be"),
    ("eps string", lambda s: _multi(s, eps="1e-5"), TypeError, "eps must be a number"),
    ("momentum string", lambda s: _multi(s, momentum="0.1"), TypeError,
     "momentum must be a number"),
    ("momentum > 1", lambda s: _mixed(s, momentum=2.0), ValueError, "momentum must be in [0, 1]"),
    ("momentum tensor", lambda s: _multi(s, momentum=torch.tensor(0.1)), TypeError,
     "momentum must be a number"),
    ("x channels", lambda s: F.multi_batch_norm(s["x"][:, :2], s["branch"], s["w"], s["b"]),
     ValueError, "x has 2 channels but weight is [num_branches, C] = [2, 3]"),
    ("weight shape", lambda s: F.multi_batch_norm(s["x"], s["branch"], s["w"][:, :2],
                                                  s["b"][:1]),
     ValueError, "x has 3 channels but weight"),
    ("input_scale length", lambda s: _multi(s, input_scale=torch.ones(5)), ValueError,
     "input_scale must have shape [N, C] = [4, 3] or [C] = [3], got [5]"),
    ("branch float", lambda s: F.multi_batch_norm(s["x"], s["branch"].float(), s["w"], s["b"]),
     TypeError, "branch must be an integer tensor"),
    ("mix shape", lambda s: F.mixed_batch_norm(s["x"], s["mix"][:3], s["w"], s["b"]),
     ValueError, "mix must have shape [N, K]"),
    ("negative mix eval, no running stats",
     lambda s: F.mixed_batch_norm(s["x"], s["mix"] - 1, s["w"], s["b"]), ValueError,
     "(training, or no running statistics)"),
    ("pgd eps string", lambda s: _pgd(s, eps="0.1"), TypeError, "eps must be a float"),
    ("pgd alpha string", lambda s: _pgd(s, alpha="0.01"), TypeError, "alpha must be a float"),
    ("pgd eps negative", lambda s: _pgd(s, eps=-0.1), ValueError, "eps must be a finite"),
    ("pgd eps bool", lambda s: _pgd(s, eps=True), TypeError, "eps must be a float"),
    ("mifgsm decay string", lambda s: F.mifgsm_step_(s["xa"], s["g"], torch.zeros_like(s["x"]),
                                                     s["x"], 0.1, 0.01, decay="1"),
     TypeError, "decay must be a float"),
    ("module channels", lambda s: MultiBatchNorm2d(4)(s["x"], branch=0), ValueError,
     "MultiBatchNorm2d(4): x has 3 channels"),
    ("module dims", lambda s: MultiBatchNorm2d(3)(s["x"][:, :, 0], branch=0), ValueError,
     "expects 4D input"),
    ("module branch float", lambda s: MultiBatchNorm2d(3)(s["x"], branch=1.0), TypeError,
     "branch must be an int"),
    ("module branch out of range", lambda s: MultiBatchNorm2d(3)(s["x"], branch=np.int64(2)),
     ValueError, "branch 2 is out of range"),
    # Each message names the function the user called and that function's argument.
    ("momentum 2-D tensor", lambda s: _multi(s, momentum=torch.ones(2, 2)), TypeError,
     "multi_batch_norm: momentum must be a number, got Tensor of shape [2, 2]"),
    ("weight wrong K", lambda s: F.multi_batch_norm(s["x"], s["branch"], s["w"].repeat(2, 1),
                                                    num_branches=2),
     ValueError, "multi_batch_norm: weight must have shape [num_branches, C] = [2, 3], got "
                 "[4, 3]"),
    ("num_branches string", lambda s: F.multi_batch_norm(s["x"], s["branch"], num_branches="2"),
     TypeError, "multi_batch_norm: num_branches must be an int, got str '2'"),
    ("num_batches_tracked list", lambda s: _mixed(s, momentum=None, num_batches_tracked=[0, 0]),
     TypeError, "mixed_batch_norm: num_batches_tracked must be an int64 [2] Tensor or None, "
                "got list"),
    ("weight list", lambda s: F.mixed_batch_norm(s["x"], s["mix"], s["w"].tolist()), TypeError,
     "mixed_batch_norm: weight must be a Tensor or None, got list"),
    ("channel_scale shape", lambda s: F.channel_scale(s["x"], torch.ones(5)), ValueError,
     "channel_scale: scale must have shape [N, C] = [4, 3] or [C] = [3], got [5]"),
    ("channel_scale list", lambda s: F.channel_scale(s["x"], [1.0, 2.0, 3.0]), TypeError,
     "channel_scale: scale must be a Tensor, got list"),
    ("channel_scale int", lambda s: F.channel_scale(s["x"], torch.ones(3, dtype=torch.long)),
     TypeError, "channel_scale: scale must be a floating-point tensor, got torch.int64"),
    ("channel_scale device", lambda s: F.channel_scale(s["x"], torch.ones(3, device="meta")),
     ValueError, "channel_scale: scale is on meta but x is on cpu"),
    ("scale_filters int weight",
     lambda s: F.scale_filters(torch.ones(3, 2, dtype=torch.long), torch.ones(3)), TypeError,
     "scale_filters: weight must be floating point, got torch.int64"),
    ("scale_filters int omega",
     lambda s: F.scale_filters(torch.ones(3, 2), torch.ones(3, dtype=torch.long)), TypeError,
     "scale_filters: omega must be a floating-point tensor, got torch.int64"),
    ("scale_filters omega list", lambda s: F.scale_filters(torch.ones(3, 2), [1.0] * 3),
     TypeError, "scale_filters: omega must be a Tensor, got list"),
    ("scale_filters device",
     lambda s: F.scale_filters(torch.ones(3, 2), torch.ones(3, device="meta")), ValueError,
     "scale_filters: omega is on meta but weight is on cpu"),
    ("pgd eps device", lambda s: _pgd(s, eps=torch.ones(4, device="meta")), ValueError,
     "pgd_step_: eps is on meta but x_adv is on cpu"),
    ("pgd_init eps device",
     lambda s: F.pgd_init(s["x"], torch.ones(4, device="meta")), ValueError,
     "pgd_init: eps is on meta but x_nat is on cpu"),
    ("pgd clip string", lambda s: _pgd(s, clip_min="0"), TypeError,
     "pgd_step_: clip_min must be a number, got str '0'"),
    ("module mix list", lambda s: MultiBatchNorm2d(3)(s["x"], mix=[[1.0, 0.0]] * 4), TypeError,
     "MultiBatchNorm2d: mix must be a Tensor [N, 2], got list"),
    ("mixed module mix shape",
     lambda s: MixedBatchNorm2d(3)(s["x"], mix=torch.ones(4, 3) / 3), ValueError,
     "MixedBatchNorm2d: mix must be [N, 2] = [4, 2], got [4, 3]"),
    ("module branch shape",
     lambda s: MultiBatchNorm2d(3)(s["x"], branch=torch.zeros(3, dtype=torch.long)),
     ValueError, "MultiBatchNorm2d: branch must be an int or an int64 [N] = [4] tensor, got "
                 "shape [3]"),
    ("module branch float tensor", lambda s: MultiBatchNorm2d(3)(s["x"], branch=s["mix"][:, 0]),
     TypeError, "MultiBatchNorm2d: branch must be an int or an int64 [N] tensor, got "
                "torch.float32 tensor"),
    ("routing mix list", lambda s: _routed(MultiBatchNorm2d(3), s["x"], mix=[[1.0, 0.0]] * 4),
     TypeError, "routing(): mix must be a Tensor [N, K], got list"),
    ("sync momentum string",
     lambda s: D.sync_multi_batch_norm(s["x"], s["branch"], s["w"], s["b"], momentum="0.1"),
     TypeError, "sync_multi_batch_norm: momentum must be a number, got str '0.1'"),
    # issue 37: a module's errors name its class, also those its op raises
    ("module branch tensor out of range",
     lambda s: MultiBatchNorm2d(3)(s["x"], branch=torch.tensor([0, 2, 1, 0])), ValueError,
     "MultiBatchNorm2d: branch id 2 at sample 1 is out of range [0, 2)"),
    ("module branch tensor out of range in a routing",
     lambda s: _routed(MixedBatchNorm2d(3), s["x"], branch=torch.tensor([0, 1, 5, 0])),
     ValueError, "MixedBatchNorm2d: branch id 5 at sample 2 is out of range [0, 2)"),
    ("mixed module negative mix",
     lambda s: MixedBatchNorm2d(3).train()(s["x"], mix=s["mix"] - 1), ValueError,
     "MixedBatchNorm2d: mix weights must be >= 0"),
    ("module zero branches", lambda s: MultiBatchNorm2d(3, 0), ValueError,
     "MultiBatchNorm2d: num_branches must be >= 1, got 0"),
    ("dual module through the base class", lambda s: MixedBatchNorm2d(3, num_branches=-1),
     ValueError, "MixedBatchNorm2d: num_branches must be >= 1, got -1"),
    ("convert zero branches",
     lambda s: convert_multi_bn(nn.Sequential(nn.BatchNorm2d(3)), num_branches=0), ValueError,
     "convert_multi_bn: num_branches must be >= 1, got 0"),
    ("convert float branches",
     lambda s: convert_multi_bn(nn.Sequential(nn.BatchNorm2d(3)), num_branches=2.0), TypeError,
     "convert_multi_bn: num_branches must be an int, got float"),
]


def _routed(model, x, **route):
    with routing(model, **route):
        return model(x)


@pytest.mark.parametrize("name, call, exc, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_call(name, call, exc, fragment):
    s = _bn_state()
    s["xa"] = s["x"].clone()
    s["g"] = torch.randn_like(s["x"])
    before = {k: v.clone() for k, v in s.items()}
    with pytest.raises(exc) as info:
        call(s)
    assert fragment in str(info.value), str(info.value)
    assert "\n" not in str(info.value), str(info.value)  # one line
    for k, v in s.items():
        assert torch.equal(v, before[k]), f"{name}: {k} changed"


def test_non_contiguous_small_tensors_are_accepted(backend):
    """weight, bias, mix and the running statistics as transposed views: the same result as
    contiguous ones, and the caller's running statistics updated in place."""
    s = _bn_state(K=3, C=3)
    wt, bt = s["w"].t().contiguous().t(), s["b"].t().contiguous().t()
    rmt, rvt = s["rm"].t().contiguous().t(), s["rv"].t().contiguous().t()
    mixt = s["mix"].new_empty(3, 4).copy_(torch.rand(4, 3).t()).t()
    assert not any(t.is_contiguous() for t in (wt, bt, rmt, rvt, mixt))
    rm_ptr = rmt.data_ptr()
    branch = torch.tensor([0, 2, 2, 0])
    rm, rv = s["rm"].clone(), s["rv"].clone()
    want = F.multi_batch_norm(s["x"], branch, s["w"], s["b"], rm, rv, training=True)
    got = F.multi_batch_norm(s["x"], branch, wt, bt, rmt, rvt, training=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rmt, rm) and torch.testing.assert_close(rvt, rv)
    assert rmt.data_ptr() == rm_ptr and not torch.equal(rmt, s["rm"].t().contiguous().t())
    y1 = F.mixed_batch_norm(s["x"], mixt, wt, bt, training=True)
    y2 = F.mixed_batch_norm(s["x"], mixt.contiguous(), s["w"], s["b"], training=True)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mixed", [False, True], ids=["routed", "mixed"])
def test_a_one_value_branch_gives_exactly_its_bias(backend, mixed):
    x = torch.tensor([[0.3], [5.0], [-2.0]])  # [N=3, C=1], S = 1
    w, b = torch.tensor([[2.0], [3.0]]), torch.tensor([[0.5], [-0.25]])
    if mixed:
        y = F.mixed_batch_norm(x, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), w, b,
                               training=True)
    else:
        y = F.multi_batch_norm(x, torch.tensor([1, 0, 1]), w, b, training=True)
    assert y[1, 0].item() == 0.5  # branch 0 saw one value: exactly its bias


def test_numpy_integers_route_like_ints():
    bn = MultiBatchNorm2d(3).eval()
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(bn(x, branch=np.int64(1)), bn(x, branch=1))
    with routing(bn, branch=np.int32(1)):
        torch.testing.assert_close(bn(x), bn(x, branch=1))


def test_copies_drop_an_active_route():
    model = nn.Sequential(MultiBatchNorm2d(3)).eval()
    with routing(model, branch=1):
        clone = copy.deepcopy(model)
        pickled = pickle.loads(pickle.dumps(model))
        assert model[0]._routing is not None
    for m in (clone, pickled):
        with pytest.raises(RuntimeError, match="no routing"):
            m(torch.randn(2, 3, 2, 2))


def test_state_dict_mismatch_names_the_key():
    model = nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5))
    multi = convert_multi_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("1.")}
    with pytest.raises(RuntimeError, match=r"size mismatch for 1\.weight"):
        multi.load_state_dict(sd, strict=False)


def test_convert_multi_bn_covers_every_bn_kind():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.SyncBatchNorm(6))
    with torch.no_grad():
        model[1].running_mean.fill_(0.25)
    conv = convert_multi_bn(model, num_branches=3)
    assert type(conv[1]) is MultiBatchNorm1d and isinstance(conv[2], SyncMultiBatchNorm2d)
    assert torch.equal(conv[1].running_mean, torch.full((3, 6), 0.25))
    x = torch.randn(5, 6)
    ref = nn.BatchNorm1d(6).eval()
    ref.running_mean.fill_(0.25)
    conv[1].eval()
    torch.testing.assert_close(conv[1](x, branch=2), ref(x))
    torch.testing.assert_close(conv[1](x[:, :, None], branch=0), ref(x[:, :, None]))
    with pytest.raises(TypeError, match=r"LazyBatchNorm2d \(1\) has not seen an input"):
        convert_multi_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d()))
    with pytest.raises(TypeError, match="BatchNorm3d is not supported"):
        convert_multi_bn(nn.BatchNorm3d(4))


def test_mixed_module_checks_channels():
    with pytest.raises(ValueError, match="MixedBatchNorm2d\\(4\\): x has 3 channels"):
        MixedBatchNorm2d(4)(torch.randn(2, 3, 2, 2), mix=torch.ones(2, 2) / 2)


def test_the_functions_give_their_ops_errors():
    """One check layer (csrc/<family>/checks.h, #36): a bad tensor argument of a public function
    is refused by its op, with the op's own message, which names the function the user called;
    the function only rewords what the op cannot word (a non-tensor, an extra's [C] form)."""
    s = _bn_state()
    w = s["w"].repeat(2, 1)  # [4, 3] for K = 2
    with pytest.raises(ValueError) as via_op:
        torch.ops.fastrobust.multi_bn.default(s["x"], s["branch"], None, w, None, None, None,
                                              None, None, None, None, 2, False, 0.1, False,
                                              1e-5, False)
    with pytest.raises(ValueError) as via_function:
        F.multi_batch_norm(s["x"], s["branch"], w, num_branches=2)
    assert str(via_function.value) == str(via_op.value)
    assert str(via_op.value).startswith("multi_batch_norm: weight must have shape")
    with pytest.raises(TypeError) as via_op:
        torch.ops.fastrobust.film.default(s["x"], torch.ones(3, dtype=torch.long), None)
    with pytest.raises(TypeError) as via_function:
        F.channel_scale(s["x"], torch.ones(3, dtype=torch.long))
    assert str(via_function.value) == str(via_op.value).replace("film: gamma",
                                                                "channel_scale: scale")


def test_a_refused_random_start_draws_no_random_numbers():
    """pgd_init runs its op's checks before it draws the noise: a refused call leaves the
    generator where it was."""
    x = torch.rand(4, 3, 2, 2)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(ValueError, match=r"pgd_init: a tensor eps must be per sample"):
        F.pgd_init(x, torch.full((3,), 0.1), generator=g)
    assert torch.equal(g.get_state(), state)
    torch.testing.assert_close(F.pgd_init(x, 0.1, generator=g),
                               F.pgd_init(x, 0.1, generator=torch.Generator().manual_seed(0)))
