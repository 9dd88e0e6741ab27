"""OAT models and trainer: shapes and parameter counts, the λ encoding and routing, FiLM γ, β
computed once per condition, training, resume, divergence, and the paper's phenomena on the
embedded digits data at small scale."""
import math

import pytest
import torch
from torch import nn

from fastrobust.models import (S1, LambdaEncoding, OATWideResNet, oat_resnet18, oat_resnet34,
                               resnet18)
from fastrobust.nn import FiLM, MultiBatchNorm2d
from fastrobust.trainers.base import TrainingDiverged
from fastrobust.trainers.checkpoints import load_checkpoint
from fastrobust.trainers.oat import OATConfig, OATTrainer, oat_loss, sample_lambdas, sweep


def nparams(m):
    return sum(p.numel() for p in m.parameters())


# --- models -------------------------------------------------------------------------------

def test_resnet_shapes_and_parameter_count():
    width, dim = 16, 128
    m = oat_resnet18(10, width, in_channels=3, dim=dim)
    assert m(torch.rand(4, 3, 32, 32), torch.tensor([0.0, 0.1, 0.4, 1.0])).shape == (4, 10)
    # = the plain ResNet-18 + a second copy of every BN's affine + one FiLM MLP per block BN
    # and one after the stem BN (the OAT repository's conv → BN → FiLM → ReLU)
    plain = resnet18(10, width)
    bn = sum(2 * b.num_features for b in plain.modules() if isinstance(b, nn.BatchNorm2d))
    block_bns = [b.num_features for name, b in plain.named_modules()
                 if isinstance(b, nn.BatchNorm2d) and name.split(".")[-1] in ("bn1", "bn2")
                 and name.startswith("layers")]
    film = sum(dim * 2 * c + 2 * c + 2 * c * 2 * c + 2 * c for c in block_bns + [width])
    assert len(block_bns) == 16
    assert nparams(m) == nparams(plain) + bn + film
    # the pre-issue-38 variant: no stem FiLM
    old = oat_resnet18(10, width, in_channels=3, dim=dim, variant="identity")
    assert old.film1 is None and nparams(old) == nparams(m) - (dim * 2 * width + 2 * width
                                                               + 4 * width ** 2 + 2 * width)
    assert oat_resnet34(10, 8)(torch.rand(2, 3, 32, 32), 0.2).shape == (2, 10)


def test_wide_resnet_shapes():
    m = OATWideResNet(16, 2, 10, base=8, in_channels=1)
    assert m(torch.rand(3, 1, 8, 8), 0.5).shape == (3, 10)
    films = [x for x in m.modules() if isinstance(x, FiLM)]
    bns = [x for x in m.modules() if isinstance(x, MultiBatchNorm2d)]
    assert len(films) == 2 * 2 * 3 and len(bns) == len(films) + 1  # the final BN has no FiLM
    with pytest.raises(ValueError, match="6n"):
        OATWideResNet(15)


def test_needs_lambda():
    with pytest.raises(RuntimeError, match="needs λ"):
        oat_resnet18(10, 8)(torch.rand(2, 3, 8, 8))


# --- the OAT repository's architecture (issue 38) -----------------------------------------

def test_film_is_the_repositorys_by_default():
    """γ = leaky_relu(μ), β = leaky_relu(σ) of the MLP's output halves, nn.Linear's init (no
    identity init); the identity variant keeps the raw halves and γ = 1, β = 0 at init."""
    torch.manual_seed(0)
    film = FiLM(5, cond_dim=7)
    cond = torch.randn(4, 7)
    out = film.mlp(cond)
    g, b = film.gamma_beta(cond)
    torch.testing.assert_close(g, nn.functional.leaky_relu(out[:, :5]))
    torch.testing.assert_close(b, nn.functional.leaky_relu(out[:, 5:]))
    assert (out < 0).any() and (g != out[:, :5]).any()  # the activation did something
    assert not torch.allclose(g, torch.ones_like(g))  # not an identity at init
    ident = oat_resnet18(10, 8, variant="identity")
    gi, bi = ident.layers[0].film1.gamma_beta(cond.new_ones(3, 128))
    assert torch.equal(gi, torch.ones(3, 8)) and torch.equal(bi, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="variant must be one of"):
        oat_resnet18(10, 8, variant="paper")


def test_stem_film_is_fused_into_the_stem_bn():
    """conv → BN → FiLM → ReLU at the stem is one fused BN call with the FiLM's γ, β."""
    from fastrobust import functional as FF

    m = oat_resnet18(10, 8).train()
    lam = torch.tensor([0.0, 0.0, 0.2, 1.0])
    x = torch.rand(4, 3, 8, 8)
    calls = []
    m.bn1.register_forward_hook(lambda mod, i, o: calls.append(o))
    m(x, lam)
    codes = m.encoding(lam)
    g, b = m.film1.gamma_beta(codes)
    bn = m.bn1
    h = m.conv1(x)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    want = torch.relu(FF.multi_batch_norm(h, (lam != 0).long(), bn.weight, bn.bias, rm, rv,
                                          training=True, momentum=0.1, eps=1e-5)
                      * g[:, :, None, None] + b[:, :, None, None])
    torch.testing.assert_close(calls[0], want, rtol=1e-5, atol=1e-5)


def test_oats_film_runs_each_widths_sub_mlp():
    """At width w a FiLM of C channels runs the first 2·C_w hidden units and outputs of its
    MLP (the repository's slimmable FiLM), not a slice of the full-width γ, β; the identity
    variant slices."""
    from fastrobust.models import oats_resnet18

    m = oats_resnet18(10, 8, in_channels=1)
    film = m.layers[0].film1
    lam = torch.tensor([0.0, 0.3])
    codes = m.encoding(lam)
    with m.at_width(0.5), m.conditioned(lam):
        args = m.film_args(film, 4)
    first, _, last = film.mlp
    h = nn.functional.leaky_relu(codes @ first.weight[:8].T + first.bias[:8])
    out = nn.functional.leaky_relu(h @ last.weight[:8, :8].T + last.bias[:8])
    torch.testing.assert_close(args["film_gamma"], out[:, :4])
    torch.testing.assert_close(args["film_beta"], out[:, 4:])
    with m.conditioned(lam), m.at_width(0.5):  # conditioned first: computed on demand
        late = m.film_args(film, 4)
    torch.testing.assert_close(late["film_beta"], out[:, 4:])
    ident = oats_resnet18(10, 8, in_channels=1, variant="identity")
    with ident.at_width(0.5), ident.conditioned(lam):
        sliced = ident.film_args(ident.layers[0].film1, 4)
    full = ident.layers[0].film1.gamma_beta(ident.encoding(lam))
    torch.testing.assert_close(sliced["film_beta"], full[1][:, :4])


def test_trainer_defaults_are_the_repositorys(tmp_path):
    """PGD's α = min(1.25ε, ε + 4/255)/steps on the summed cross-entropy, and the encoding
    matrix written beside the checkpoint as rand_otho_mat.npy (row j codes λ_j)."""
    import numpy as np

    from fastrobust.attacks.attacks import _ce_sum

    cfg = OATConfig(eps=8 / 255, steps=7)
    assert cfg.step_size() == pytest.approx(1.25 * 8 / 255 / 7)  # 1.43/255, not 2/255
    assert OATConfig(eps=16 / 255, steps=10).step_size() == pytest.approx(20 / 255 / 10)
    assert OATConfig(alpha=0.01).step_size() == 0.01
    tr = OATTrainer(tiny_cfg(tmp_path, alpha=None, eps=0.3, steps=4), progress=False)
    assert tr.attack.alpha == pytest.approx(min(0.375, 0.3 + 4 / 255) / 4)
    assert tr.attack.loss is _ce_sum
    mat = np.load(tmp_path / "rand_otho_mat.npy")
    assert mat.shape == (128, 128)
    np.testing.assert_allclose(mat @ mat.T, np.eye(128), atol=1e-5)
    rows = torch.from_numpy(mat[:6]).float()
    assert torch.equal(tr.model.encoding(torch.tensor(S1)), rows)


def test_identity_variant_and_checkpoints_before_issue_38(tmp_path):
    """The pre-issue-38 form trains by option; a checkpoint whose config predates the
    variant option loads as that form."""
    from fastrobust.trainers.oat import model_from_checkpoint

    cfg = tiny_cfg(tmp_path, variant="identity", sampling="iid", attack_loss="ce", epochs=1)
    tr = OATTrainer(cfg, progress=False)
    tr.fit(log=lambda *a: None)
    assert tr.model.film1 is None
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    for key in ("variant", "sampling", "attack_loss"):
        del ck["config"][key]
    torch.save(ck, tmp_path / "old.pt")
    model, old_cfg, _ = model_from_checkpoint(str(tmp_path / "old.pt"))
    assert old_cfg.variant == "identity" and model.film1 is None
    with pytest.raises(Exception, match="variant"):
        OATConfig(variant="paper").validate()


def test_strict_encoding_refuses_unknown_lambdas():
    enc = LambdaEncoding(S1, "ro", 16, strict=True)
    enc(torch.tensor([0.0, 0.4]))
    with pytest.raises(ValueError, match=r"λ 0.25 is not in this model's set"):
        enc(torch.tensor([0.0, 0.25]))
    with pytest.raises(ValueError, match="distinct"):
        LambdaEncoding((0.0, 0.1, 0.1))


# --- λ encoding ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ro", "dct"])
def test_encoding_orthonormal_and_exact(kind):
    enc = LambdaEncoding(S1, kind, 128)
    codes = enc.codes
    torch.testing.assert_close(codes @ codes.T, torch.eye(len(S1)), atol=1e-5, rtol=0)
    lam = torch.tensor(S1)
    assert torch.equal(enc(lam), codes)  # seen values: exactly their columns
    mid = enc(torch.tensor([0.05, 0.7]))  # unseen: between the neighbours' codes
    torch.testing.assert_close(mid[0], (codes[0] + codes[1]) / 2)
    torch.testing.assert_close(mid[1], (codes[4] + codes[5]) / 2)
    if kind == "dct":  # value n ↦ column n of the orthonormal DCT-II matrix
        k = torch.arange(128, dtype=torch.float64)
        col2 = torch.cos(math.pi * k * (2 * 2 + 1) / (2 * 128)) * math.sqrt(2 / 128)
        col2[0] = math.sqrt(1 / 128)
        torch.testing.assert_close(codes[2], col2.float())


def test_encoding_none_and_state_dict():
    enc = LambdaEncoding(S1, "none")
    assert enc(torch.tensor([0.3])).tolist() == [[pytest.approx(0.3)]]
    a, b = oat_resnet18(10, 8, seed=1), oat_resnet18(10, 8, seed=2)
    assert not torch.equal(a.encoding.codes, b.encoding.codes)
    b.load_state_dict(a.state_dict())  # the matrix travels in the state dict
    assert torch.equal(a.encoding.codes, b.encoding.codes)


# --- routing and conditioning -------------------------------------------------------------

def test_dual_bn_routed_by_lambda():
    m = oat_resnet18(10, 8).train()
    m(torch.rand(6, 3, 8, 8), torch.zeros(6))
    assert m.bn1.num_batches_tracked.tolist() == [1, 0]
    m(torch.rand(6, 3, 8, 8), torch.tensor([0.1, 0.2, 1.0, 0.3, 0.4, 1.0]))
    assert m.bn1.num_batches_tracked.tolist() == [1, 1]
    routes = []
    m.bn1.register_forward_pre_hook(lambda mod, i: routes.append(mod._routing))
    m(torch.rand(3, 3, 8, 8), torch.tensor([0.0, 0.5, 0.0]))
    assert routes[-1][1].tolist() == [0, 1, 0]
    m(torch.rand(3, 3, 8, 8), 0.0)
    assert routes[-1] == ("branch", 0)
    single = oat_resnet18(10, 8, dual_bn=False)
    assert single.bn1.num_branches == 1
    single(torch.rand(3, 3, 8, 8), torch.tensor([0.0, 0.5, 1.0]))


def test_film_computed_once_per_condition():
    """An attack inside `conditioned` runs the FiLM MLPs once, not in every PGD step."""
    from fastrobust.attacks import PGD

    m = oat_resnet18(10, 8)
    calls = []
    for f in m.modules():
        if isinstance(f, FiLM):
            f.mlp.register_forward_hook(lambda *a: calls.append(1))
    lam = torch.tensor([0.1, 0.1, 1.0, 0.4])
    with m.conditioned(lam, grad=False):
        PGD(m, 0.1, 0.02, 5)(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    assert len(calls) == 17  # one MLP call per FiLM layer; the 5 steps reuse γ, β


def test_per_sample_film_matches_one_at_a_time():
    m = oat_resnet18(10, 8).eval()
    with torch.no_grad():  # make FiLM do something
        for f in m.modules():
            if isinstance(f, FiLM):
                f.mlp[2].weight.normal_(0, 0.1)
    x = torch.rand(4, 3, 8, 8)
    lam = torch.tensor([0.0, 0.1, 0.7, 1.0])
    with torch.no_grad():
        together = m(x, lam)
        alone = torch.cat([m(x[i:i + 1], float(lam[i])) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert (together[0] - together[1]).abs().max() > 1e-3


# --- training -----------------------------------------------------------------------------

def tiny_cfg(tmp_path, **kw):
    base = dict(width=4, epochs=2, batch_size=32, lr=0.05, eps=0.2, alpha=0.05, steps=2,
                out=str(tmp_path), max_train_batches=4, eval_steps=2)
    return OATConfig(**{**base, **kw})


def test_lambda_sampling():
    g = torch.Generator().manual_seed(0)
    lam = sample_lambdas(6000, OATConfig(), g)
    assert set(lam.tolist()) == set(torch.tensor(S1).tolist())
    # the OAT repository's: ⌈B/|S|⌉ zeros, first; the rest uniform over the non-zero values
    for n in (6000, 128, 7, 1):
        lam = sample_lambdas(n, OATConfig(), g)
        zeros = math.ceil(n / 6)
        assert (lam[:zeros] == 0).all() and (lam[zeros:] != 0).all()
    lam = sample_lambdas(6000, OATConfig(), g)[1000:]
    for v in S1[1:]:
        assert abs((lam == v).float().mean() - 1 / 5) < 0.02
    iid = sample_lambdas(6000, OATConfig(sampling="iid"), g)  # uniform over the set, anywhere
    assert abs((iid == 0).float().mean() - 1 / 6) < 0.02 and (iid[:1000] != 0).any()
    assert torch.equal(sample_lambdas(64, OATConfig(), torch.Generator().manual_seed(3)),
                       sample_lambdas(64, OATConfig(), torch.Generator().manual_seed(3)))
    cont = sample_lambdas(6000, OATConfig(continuous=True), g)
    assert (cont == 0).any() and len(set(cont.tolist())) > 4000


def test_steps_decrease_the_loss(tmp_path):
    tr = OATTrainer(tiny_cfg(tmp_path, lr=0.02), progress=False)
    x, y = tr.data.train.x[:64], tr.data.train.y[:64]
    lam = sample_lambdas(64, tr.cfg, torch.Generator().manual_seed(0))
    first = float(tr.step(x, y, lam))
    for _ in range(15):
        last = float(tr.step(x, y, lam))
    assert last < 0.7 * first


def test_adversarial_loss_only_for_nonzero_lambda(tmp_path):
    """λ = 0 everywhere: no attack is run and the loss is the clean cross-entropy."""
    tr = OATTrainer(tiny_cfg(tmp_path), progress=False)
    x, y = tr.data.train.x[:16], tr.data.train.y[:16]
    ran = []
    tr.attack.model.register_forward_pre_hook(lambda m, i: ran.append(m.training))
    loss = oat_loss(tr.model, tr.attack, x, y, torch.zeros(16))
    assert ran == [True]  # one forward, in train mode; no attack (those run in eval)
    with tr.model.conditioned(torch.zeros(16)):
        want = nn.functional.cross_entropy(tr.model(x), y)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_resume_is_exact(tmp_path):
    full = OATTrainer(tiny_cfg(tmp_path / "full"), progress=False)
    full.fit(log=lambda *a: None)
    part = OATTrainer(tiny_cfg(tmp_path / "part", epochs=2), progress=False)
    part.cfg.epochs = 1  # stop after one epoch, as if interrupted
    part.fit(log=lambda *a: None)
    resumed = OATTrainer(tiny_cfg(tmp_path / "part"), resume=True, progress=False)
    assert resumed.epoch == 1
    resumed.fit(log=lambda *a: None)
    assert [h["losses"] for h in resumed.history] == [h["losses"] for h in full.history]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def _assert_same_bits(a, b, where="checkpoint"):
    """a and b hold the same values, tensors bit for bit (dtype, shape and every bit)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_bits(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_bits(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), (
            f"{where} differs by up to {(a.double() - b.double()).abs().max().item():.3g}")
    else:
        assert a == b, where


@pytest.fixture
def two_threads():
    """At least two CPU threads (pytest-xdist's workers run one): torch's parallel paths are
    the ones that can reorder a sum."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def test_same_seed_gives_bitwise_equal_checkpoints(tmp_path, two_threads):
    """Two runs of the same seeded configuration in one process write the same checkpoint,
    bit for bit: model, optimizer, scheduler, random states and every step's loss (#31). At
    width 16 and batch 128 the last stages' FiLM gathers are [128, 256]: large enough (2**15
    values) for `x[index]`'s CPU backward to add rows with float atomics from several
    threads, which changed the FiLM MLPs' last layers in the last bits on every run."""
    def run(out):
        cfg = tiny_cfg(out, width=16, batch_size=128, epochs=1, steps=1, max_train_batches=1,
                       eval_steps=0)
        OATTrainer(cfg, progress=False).fit(log=lambda *a: None)
        ck = load_checkpoint(str(out / "last.pt"))
        return {"model": ck["model"], "optimizer": ck["optimizer"],
                "scheduler": ck["scheduler"], "rng": ck["rng"], "epoch": ck["epoch"],
                "losses": [h["losses"] for h in ck["history"]]}

    _assert_same_bits(run(tmp_path / "a"), run(tmp_path / "b"))


@pytest.fixture
def restore_determinism():
    mode = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(mode)


def test_deterministic_option_trains_under_torchs_mode(tmp_path, restore_determinism):
    """``deterministic=True`` turns on torch's deterministic algorithms before the model is
    built, and every op of an OAT step (fused ops, FiLM gather, attack, loss) has a
    deterministic CPU kernel, so the run trains instead of raising."""
    torch.use_deterministic_algorithms(False)
    tr = OATTrainer(tiny_cfg(tmp_path, deterministic=True, epochs=1, max_train_batches=1),
                    progress=False)
    assert torch.are_deterministic_algorithms_enabled()
    tr.fit(log=lambda *a: None)
    assert math.isfinite(tr.history[-1]["loss"])
    assert load_checkpoint(str(tmp_path / "last.pt"))["config"]["deterministic"] is True


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    tr = OATTrainer(tiny_cfg(tmp_path, epochs=3), progress=False)
    tr.cfg.epochs = 1
    tr.fit(log=lambda *a: None)
    tr.cfg.epochs = 3
    for g in tr.opt.param_groups:
        g["lr"] = 1e30  # diverges at once
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        tr.fit(log=lambda *a: None)
    ck = load_checkpoint(str(tmp_path / "last.pt"))
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_cli_train_and_eval(tmp_path, capsys):
    from fastrobust.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "oat", "--width", "4", "--epochs", "1", "--batch-size", "64",
                 "--steps", "1", "--eval-steps", "1", "--eps", "0.2", "--out", out,
                 "--lambdas", "0", "0.5", "1"]) == 0
    assert main(["eval", f"{out}/last.pt", "--lambdas", "0", "1", "--steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "SA %" in text and "results.json" in text
    import json
    res = json.load(open(f"{out}/results.json"))
    assert [r["lambda"] for r in res["sweep"][""]] == [0, 1]
    assert (tmp_path / "run" / "tradeoff.png").stat().st_size > 10_000


# --- the paper's phenomena at small scale -------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """OAT with dual BN and with one shared BN, same budget, on the digits data."""
    out = {}
    for dual in (True, False):
        # ε 0.375 on the [0, 1] digits: large enough that clean and adversarial features
        # differ as on CIFAR at 8/255 (a shared BN then loses clean accuracy)
        cfg = OATConfig(width=16, epochs=15, batch_size=64, lr=0.05, eps=0.375, alpha=0.15625,
                        steps=3,
                        dual_bn=dual, eval_steps=5,
                        out=str(tmp_path_factory.mktemp("dual" if dual else "single")))
        tr = OATTrainer(cfg, progress=False)
        tr.fit(log=lambda *a: None)
        out[dual] = {r["lambda"]: r for r in sweep(tr.model.eval(), tr.data.test, cfg,
                                                   lambdas=[0.0, 0.2, 1.0], progress=False)}
    return out


@pytest.mark.slow
def test_tradeoff_follows_lambda(trained):
    rows = trained[True]
    assert rows[0.0]["SA"] > rows[1.0]["SA"]
    assert rows[1.0]["RA"] > rows[0.0]["RA"]


@pytest.mark.slow
def test_dual_bn_keeps_clean_accuracy(trained):
    assert trained[True][0.0]["SA"] > trained[False][0.0]["SA"]
    assert math.isfinite(trained[False][1.0]["RA"])


def test_fused_step_matches_the_oat_repository_form():
    """Same weights, same batch (sorted λ = 0 first), same random start: the fused OAT loss
    and the OAT repository's eager form agree within fp32 tolerance, and so do the
    gradients."""
    import copy

    from fastrobust import functional as FF
    from fastrobust.attacks import PGD
    from baselines import eager_oat_loss

    torch.manual_seed(0)
    fused = oat_resnet18(10, 8, in_channels=1).train()
    with torch.no_grad():
        for f in fused.modules():
            if isinstance(f, FiLM):
                f.mlp[2].weight.normal_(0, 0.05)
    eager = copy.deepcopy(fused)
    x, y = torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,))
    lam = torch.tensor([0.0] * 6 + [0.1, 0.2, 0.3, 0.4, 1.0, 1.0] * 3)
    eps, alpha = 0.2, 0.05
    start = FF.pgd_init(x[6:], eps, generator=torch.Generator().manual_seed(5))
    atk = PGD(fused, eps, alpha, 3, generator=torch.Generator().manual_seed(5))
    loss_f = oat_loss(fused, atk, x, y, lam)
    loss_e = eager_oat_loss(eager, x, y, lam, eps, alpha, 3, start)
    torch.testing.assert_close(loss_f, loss_e, rtol=2e-5, atol=1e-6)
    loss_f.backward()
    loss_e.backward()
    for (name, a), b in zip(fused.named_parameters(), eager.parameters()):
        # fp32 sums in another order (fused vs sliced BNs) through ~20 layers: compared
        # relative to each gradient's largest entry (measured: at most 1.5e-5)
        err = (a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)
        assert err < 1e-4, (name, float(err))
    for (name, a), b in zip(fused.named_buffers(), eager.buffers()):
        if a.is_floating_point() and "running" in name:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# --- OATS ---------------------------------------------------------------------------------

def test_oats_width_switching():
    from fastrobust.models import oats_resnet18
    from fastrobust.models.oat import SwitchableBN

    m = oats_resnet18(10, 8, in_channels=1).train()
    assert nparams(m) > nparams(oat_resnet18(10, 8, in_channels=1))  # BNs per width
    x, lam = torch.rand(6, 1, 8, 8), torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 1.0])
    outs = {}
    for w in (0.5, 0.75, 1.0):
        with m.at_width(w):
            feats = []
            h = m.conv1.register_forward_hook(lambda mod, i, o: feats.append(o.shape[1]))
            outs[w] = m(x, lam)
            h.remove()
        assert feats == [round(8 * w)] and outs[w].shape == (6, 10)
    assert not torch.allclose(outs[0.5], outs[1.0])
    sbn = m.bn1
    assert isinstance(sbn, SwitchableBN)
    assert [b.num_batches_tracked.tolist() for b in sbn.bns] == [[1, 1]] * 3
    with m.at_width(0.5):
        m(x, torch.zeros(6))
    assert [b.num_batches_tracked.tolist() for b in sbn.bns] == [[2, 1], [1, 1], [1, 1]]
    assert m.width_mult == 1.0  # restored
    with pytest.raises(ValueError, match="not one of"):
        with m.at_width(0.6):
            pass


def test_contexts_exited_out_of_order_leave_the_model_unset():
    """Issue 37: enter a, enter b, exit a, exit b (an ExitStack may do this) of `at_width` or
    `conditioned` left a's width / condition set after the last exit. Each exit removes its
    own: b holds until b exits, then nothing is set (the widest width; λ needed again)."""
    from fastrobust.models import oats_resnet18

    m = oats_resnet18(10, 8, in_channels=1).eval()
    a, b = m.at_width(0.5), m.at_width(0.75)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert m.width_mult == 0.75  # b is still open
    b.__exit__(None, None, None)
    assert m.width_mult == 1.0
    a, b = m.conditioned(0.0), m.conditioned(1.0)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert m._state is not None and m.bn1.bns[-1]._routing == ("branch", 1)
    b.__exit__(None, None, None)
    assert m._state is None and m.bn1.bns[-1]._routing is None
    with pytest.raises(RuntimeError, match="needs λ"):
        m(torch.rand(2, 1, 8, 8))


def test_oats_accumulates_gradients_over_widths(tmp_path):
    """With lr 0 the parameters stay put and .grad keeps the step's accumulated gradient: it is
    the sum of each width's gradient (eps 0: no randomness in the attack)."""
    cfg = tiny_cfg(tmp_path, widths=(0.5, 1.0), momentum=0.0, weight_decay=0.0,
                   eps=0.0, alpha=0.0, steps=1)
    tr = OATTrainer(cfg, progress=False)
    for group in tr.opt.param_groups:  # a run's lr must be > 0; this step's is 0
        group["lr"] = 0.0
    x, y = tr.data.train.x[:16], tr.data.train.y[:16]
    lam = torch.tensor([0.0, 0.1, 0.2, 1.0] * 4)
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.step(x, y, lam)
    accumulated = {n: p.grad.clone() for n, p in tr.model.named_parameters()
                   if p.grad is not None}
    want = {}
    for w in (0.5, 1.0):
        tr.model.load_state_dict(state)  # the same BN statistics as in the step
        tr.model.zero_grad(set_to_none=True)
        with tr.model.at_width(w):
            oat_loss(tr.model, tr.attack, x, y, lam).backward()
        for n, p in tr.model.named_parameters():
            if p.grad is not None:
                want[n] = want.get(n, 0) + p.grad
    assert accumulated.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(accumulated[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    # the second half of conv1's filters is trained only by the full width
    w_half = tr.model.conv1.weight.shape[0] // 2
    assert accumulated["conv1.weight"][w_half:].abs().sum() > 0


def test_oats_calibration_touches_only_its_width(tmp_path):
    from fastrobust.trainers.oat import calibrate

    cfg = tiny_cfg(tmp_path, widths=(0.5, 1.0))
    tr = OATTrainer(cfg, progress=False)
    tr.fit(log=lambda *a: None)
    bns = tr.model.bn1.bns
    before = [b.running_mean.clone() for b in bns]
    calibrate(tr.model, tr.data.train, cfg, width=0.5, batches=3, batch_size=32)
    assert not torch.equal(bns[0].running_mean, before[0])
    assert torch.equal(bns[1].running_mean, before[1])
    # cumulative average over the calibration batches: 3 clean passes (both branches, λ
    # sampled) + 3 adversarial passes (the adversarial branch)
    assert bns[0].num_batches_tracked.tolist() == [3, 6]
    assert bns[0].momentum == tr.model.bn1.bns[1].momentum == 0.1


def test_cli_train_oats(tmp_path):
    import json

    from fastrobust.cli import main

    out = str(tmp_path / "oats")
    assert main(["train", "oats", "--width", "4", "--epochs", "1", "--batch-size", "128",
                 "--steps", "1", "--eval-steps", "1", "--eps", "0.2", "--out", out,
                 "--widths", "0.5", "1.0", "--lambdas", "0", "1"]) == 0
    res = json.load(open(f"{out}/results.json"))
    assert set(res["sweep"]) == {"width 0.5", "width 1"}


def test_bf16_precision_trains(tmp_path):
    """--precision bf16: the steps run under bf16 autocast (the BN ops get bf16 activations
    and keep fp32 parameters and statistics); the weights stay fp32 and finite."""
    from fastrobust.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "oat", "--width", "4", "--epochs", "1", "--batch-size", "64",
                 "--steps", "1", "--eval-steps", "1", "--out", out, "--lambdas", "0", "1",
                 "--max-train-batches", "2", "--precision", "bf16"]) == 0
    ck = torch.load(f"{out}/last.pt", weights_only=False)
    assert ck["config"]["precision"] == "bf16"
    weights = [v for v in ck["model"].values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)
    with pytest.raises(SystemExit):
        main(["train", "oat", "--out", out + "2", "--precision", "fp16"])
