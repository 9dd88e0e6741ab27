"""`from_oat_repo`: checkpoints of the OAT repository's models load into fastrobust's OAT models
and give the same logits, input gradients and running-statistics updates, in train and eval
mode, for ResNet34OAT, WRN16_8OAT, WRN40_2OAT and the slimmable ResNet34 at each width.

The repository's layers are rebuilt here from its facts (structure, parameter names, the
order of BN, FiLM and ReLU, `idx2BN` routing, the pooling), randomly initialised, and saved as
its OAT.py saves them: ``{'model': DataParallel state dict, 'optimizer', ...}`` and
``rand_otho_mat.npy``."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastrobust.models import S1, from_oat_repo

# --- the repository's layers, from its facts ---------------------------------------------


class Widths:
    """The width multipliers of a slimmable reference model and the one in use."""

    def __init__(self, mults=None):
        self.mults, self.i = mults, (len(mults) - 1 if mults else 0)

    def ch(self, c: int) -> int:
        return int(c * self.mults[self.i]) if self.mults else c


class RefConv(nn.Conv2d):
    def __init__(self, w: Widths, cin, cout, k, stride=1, padding=0):
        super().__init__(cin, cout, k, stride, padding, bias=False)
        self.w = [w]

    def forward(self, x):
        weight = self.weight[:self.w[0].ch(self.out_channels), :x.shape[1]]
        return F.conv2d(x, weight, None, self.stride, self.padding)


class RefFiLM(nn.Module):
    """MLP = Linear(d, 2C) → LeakyReLU → Linear(2C, 2C); γ, β = leaky_relu of the halves
    (slimmable: the first 2·C_w hidden units and outputs at width w)."""

    def __init__(self, w: Widths, c: int, d: int):
        super().__init__()
        self.MLP = nn.Sequential(nn.Linear(d, 2 * c), nn.LeakyReLU(inplace=True),
                                 nn.Linear(2 * c, 2 * c))
        self.w, self.c = [w], c

    def forward(self, x, code):
        c = x.shape[1]
        first, _, last = self.MLP
        h = F.leaky_relu(F.linear(code, first.weight[:2 * c], first.bias[:2 * c]))
        out = F.linear(h, last.weight[:2 * c, :2 * c], last.bias[:2 * c])
        g, b = F.leaky_relu(out[:, :c]), F.leaky_relu(out[:, c:])
        return x * g[:, :, None, None] + b[:, :, None, None]


def dual(x, idx, bn_c, bn_a):
    """The repository's DualBN2d: the first idx samples through BN_c, the rest BN_a."""
    if idx == 0:
        return bn_a(x)
    if idx == x.shape[0]:
        return bn_c(x)
    return torch.cat([bn_c(x[:idx]), bn_a(x[idx:])])


class RefDualBN(nn.Module):
    def __init__(self, w: Widths, c: int):
        super().__init__()
        if w.mults:  # SwitchableDualBN2d: one pair per width
            self.BN_c = nn.ModuleList(nn.BatchNorm2d(int(c * m)) for m in w.mults)
            self.BN_a = nn.ModuleList(nn.BatchNorm2d(int(c * m)) for m in w.mults)
        else:
            self.BN_c, self.BN_a = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.w = [w]

    def forward(self, x, idx):
        if self.w[0].mults:
            i = self.w[0].i
            return dual(x, idx, self.BN_c[i], self.BN_a[i])
        return dual(x, idx, self.BN_c, self.BN_a)


class RefResBlock(nn.Module):
    def __init__(self, w, cin, cout, stride, d):
        super().__init__()
        self.conv1 = RefConv(w, cin, cout, 3, stride, 1)
        self.bn1 = RefDualBN(w, cout)
        self.conv2 = RefConv(w, cout, cout, 3, 1, 1)
        self.bn2 = RefDualBN(w, cout)
        self.mismatch = stride != 1 or cin != cout
        if self.mismatch:
            self.conv_sc = RefConv(w, cin, cout, 1, stride)
            self.bn_sc = RefDualBN(w, cout)
        self.film1, self.film2 = RefFiLM(w, cout, d), RefFiLM(w, cout, d)

    def forward(self, x, code, idx):
        out = F.relu(self.film1(self.bn1(self.conv1(x), idx), code))
        out = self.film2(self.bn2(self.conv2(out), idx), code)
        out = out + (self.bn_sc(self.conv_sc(x), idx) if self.mismatch else x)
        return F.relu(out)


class RefResNet34OAT(nn.Module):
    """ResNet34OAT (``mults``: SlimmableResNet34OAT): conv → BN → FiLM → ReLU, bundles of
    3, 4, 6, 3 blocks, avg_pool2d(4), ``linear``."""

    def __init__(self, d=128, mults=None, width=64, in_channels=3, num_classes=10):
        super().__init__()
        self.widths = w = Widths(mults)
        self.conv1 = RefConv(w, in_channels, width, 3, 1, 1)
        self.bn1, self.film1 = RefDualBN(w, width), RefFiLM(w, width, d)
        cin = width
        for b, n in enumerate((3, 4, 6, 3)):
            cout = width * 2 ** b
            blocks = []
            for i in range(n):
                blocks.append(RefResBlock(w, cin, cout, 2 if b and not i else 1, d))
                cin = cout
            setattr(self, f"bundle{b + 1}", nn.ModuleList(blocks))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x, code, idx):
        out = F.relu(self.film1(self.bn1(self.conv1(x), idx), code))
        for b in range(1, 5):
            for block in getattr(self, f"bundle{b}"):
                out = block(out, code, idx)
        out = F.avg_pool2d(out, 4).flatten(1)
        return F.linear(out, self.linear.weight[:, :out.shape[1]], self.linear.bias)


class RefWideBlock(nn.Module):
    def __init__(self, w, cin, cout, stride, d, drop):
        super().__init__()
        self.bn1, self.film1 = RefDualBN(w, cin), RefFiLM(w, cin, d)
        self.conv1 = RefConv(w, cin, cout, 3, stride, 1)
        self.bn2, self.film2 = RefDualBN(w, cout), RefFiLM(w, cout, d)
        self.conv2 = RefConv(w, cout, cout, 3, 1, 1)
        self.drop, self.equal = drop, cin == cout
        self.convShortcut = None if self.equal else RefConv(w, cin, cout, 1, stride)

    def forward(self, x, code, idx):
        out = F.relu(self.film1(self.bn1(x, idx), code))
        sc = x if self.equal else self.convShortcut(out)
        out = F.relu(self.film2(self.bn2(self.conv1(out), idx), code))
        out = F.dropout(out, self.drop, self.training)
        return sc + self.conv2(out)


class RefWideResNetOAT(nn.Module):
    """WideResNetOAT: conv1, three bundles of (depth-4)/6 blocks, dual BN → ReLU (no FiLM),
    avg_pool2d(``pool``), ``fc``; WRN16_8OAT (pool 8, SVHN) and WRN40_2OAT (pool 24,
    STL-10's 96×96) drop 0.3."""

    def __init__(self, depth, widen, pool, d=128, drop=0.3):
        super().__init__()
        w, n = Widths(), (depth - 4) // 6
        chans = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = RefConv(w, 3, 16, 3, 1, 1)
        cin = 16
        for b in range(3):
            blocks = []
            for i in range(n):
                blocks.append(RefWideBlock(w, cin, chans[b + 1], 2 if b and not i else 1, d,
                                           drop))
                cin = chans[b + 1]
            setattr(self, f"bundle{b + 1}", nn.ModuleList(blocks))
        self.bn1, self.fc, self.pool = RefDualBN(w, cin), nn.Linear(cin, 10), pool

    def forward(self, x, code, idx):
        out = self.conv1(x)
        for b in range(1, 4):
            for block in getattr(self, f"bundle{b}"):
                out = block(out, code, idx)
        out = F.avg_pool2d(F.relu(self.bn1(out, idx)), self.pool)
        return self.fc(out.view(out.shape[0], -1))


def randomize(model, seed=0):
    """Random BN affine and running statistics (the rest keeps nn's initialisation), so a
    swapped BN, branch or statistic shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 100, (1,), generator=g)))
    return model


def save_like_oat_py(model, folder, dim=128, seed=0):
    """OAT.py's files: latest.pth ({'model': DataParallel state dict, ...}) and the encoding
    matrix rand_otho_mat.npy."""
    rng = np.random.RandomState(seed)
    q, _ = np.linalg.qr(rng.randn(dim, dim))
    np.save(folder / "rand_otho_mat.npy", q)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 200)
    torch.save({"epoch": 3, "model": nn.DataParallel(model).state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "best_TA": {0.0: 0.5}, "best_ATA": {0.0: 0.1}, "training_loss": [2.3],
                "val_TA": {}, "val_ATA": {}}, folder / "latest.pth")
    return folder / "latest.pth", folder / "rand_otho_mat.npy", q


# --- the round trip -----------------------------------------------------------------------

LAM = [0.0, 0.0, 0.1, 1.0]  # the repository's order: λ = 0 first, idx2BN = 2


def compare(ref, ours, q, x, lam=LAM, train=True, at_width=None, seed=0):
    """Logits, input gradients (and, in training, the running statistics the caller checks)
    of the repository's model and ours on one batch, both in fp64: PyTorch's own fp32 BN
    backward is 3e-3 (relative to the largest entry) off its fp64 result on ResNet34OAT with
    one BN branch of 6 samples, where fastrobust's fused BN is 8e-7 off, so fp32 could only
    be compared loosely. The codes are rounded to fp32 first, as OAT.py feeds them."""
    idx2bn = sum(v == 0 for v in lam)
    codes = torch.from_numpy(q[[S1.index(v) for v in lam]]).float().double()
    ref.train(train)
    ours.train(train)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout masks
    out_r = ref(xr, codes, idx2bn)
    torch.manual_seed(seed)
    if at_width is None:
        out_o = ours(xo, torch.tensor(lam))
    else:
        with ours.at_width(at_width):
            out_o = ours(xo, torch.tensor(lam))
    assert (out_o - out_r).abs().max() / out_r.abs().max() < 1e-9
    w = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    (out_r * w).sum().backward()
    (out_o * w).sum().backward()
    gscale = xr.grad.abs().max()
    assert gscale > 0 and (xo.grad - xr.grad).abs().max() / gscale < 1e-9


def check_running_stats(ref, ours, q):
    """Every BN's running statistics after the forward, BN_c against branch 0 and BN_a
    against branch 1 (the stem's and one block's named here, the rest through a second
    load, whose mapping the logits above already pinned)."""
    mine = ours.bn if hasattr(ours, "blocks") else ours.bn1  # the WRN's last BN is its bn1
    torch.testing.assert_close(mine.running_mean[0], ref.bn1.BN_c.running_mean)
    torch.testing.assert_close(mine.running_var[1], ref.bn1.BN_a.running_var)
    again = from_oat_repo({"model": ref.state_dict()}, q)  # fp32: the reload rounds
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow  # full-size networks in fp64: 20-100 s each on 2 shared cores
def test_resnet34oat_round_trip(tmp_path):
    torch.manual_seed(0)
    ref = randomize(RefResNet34OAT())
    ckpt, npy, q = save_like_oat_py(ref, tmp_path)
    ours = from_oat_repo(str(ckpt), str(npy))
    assert ours.oat_repo_arch == "ResNet34OAT" and not ours.training
    ref, ours = ref.double(), ours.double()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    compare(ref, ours, q, x, train=False)
    compare(ref, ours, q, x, train=True)
    check_running_stats(ref, ours, q)
    assert ours.bn1.num_batches_tracked.tolist() == [ref.bn1.BN_c.num_batches_tracked.item(),
                                                     ref.bn1.BN_a.num_batches_tracked.item()]
    compare(ref, ours, q, x, lam=[0.0] * 4, train=True)     # idx2BN = N: BN_c only
    compare(ref, ours, q, x, lam=[0.3, 1.0] * 2, train=True)  # idx2BN = 0: BN_a only
    check_running_stats(ref, ours, q)


@pytest.mark.slow  # full-size networks in fp64: 20-100 s each on 2 shared cores
@pytest.mark.parametrize("depth,widen,pool,size", [(16, 8, 8, 32), (40, 2, 24, 96)],
                         ids=["WRN16_8OAT", "WRN40_2OAT"])
def test_wide_resnet_round_trip(tmp_path, depth, widen, pool, size):
    torch.manual_seed(0)
    ref = randomize(RefWideResNetOAT(depth, widen, pool))
    ckpt, npy, q = save_like_oat_py(ref, tmp_path)
    bare = {k: v for k, v in ref.state_dict().items()}  # a bare state dict, no module.
    ours = from_oat_repo(bare, np.load(npy), arch=f"WRN{depth}_{widen}OAT")
    assert ours.oat_repo_arch == f"WRN{depth}_{widen}OAT"
    ref, ours = ref.double(), ours.double()
    x = torch.rand(4, 3, size, size, dtype=torch.float64)
    compare(ref, ours, q, x, train=False)
    compare(ref, ours, q, x, train=True, seed=3)  # dropout 0.3 with the same masks
    check_running_stats(ref, ours, q)


@pytest.mark.slow  # full-size networks in fp64: 20-100 s each on 2 shared cores
def test_slimmable_resnet34oat_round_trip_at_each_width(tmp_path):
    torch.manual_seed(0)
    mults = [0.5, 0.75, 1.0]
    ref = randomize(RefResNet34OAT(mults=mults))
    ckpt, npy, q = save_like_oat_py(ref, tmp_path)
    ours = from_oat_repo(torch.load(ckpt, weights_only=True), str(npy))
    assert ours.oat_repo_arch == "SlimmableResNet34OAT" and ours.width_mults == tuple(mults)
    ref, ours = ref.double(), ours.double()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    for i, m in enumerate(mults):
        ref.widths.i = i
        compare(ref, ours, q, x, train=False, at_width=m)
        compare(ref, ours, q, x, train=True, at_width=m)
    for i, m in enumerate(mults):  # each width's own BNs were updated, and only by it
        torch.testing.assert_close(ours.bn1.bns[i].running_mean[0],
                                   ref.bn1.BN_c[i].running_mean)
        torch.testing.assert_close(ours.bn1.bns[i].running_var[1], ref.bn1.BN_a[i].running_var)


# --- bad input: one line naming what does not fit ----------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A ResNet34OAT-shaped checkpoint of width 8 (the repository's names, fast to build)."""
    folder = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    ref = randomize(RefResNet34OAT(width=8, in_channels=1))
    return ref, save_like_oat_py(ref, folder)


def one_line(e):
    return "\n" not in str(e.value)


def test_small_checkpoint_loads_and_encodes_only_its_set(small):
    ref, (ckpt, npy, q) = small
    model = from_oat_repo(ckpt, npy)
    assert "width 8" in model.oat_repo_arch
    assert torch.equal(model.encoding.codes, torch.from_numpy(q[:6]).float())
    with pytest.raises(ValueError, match=r"λ 0.25 is not in this model's set") as e:
        model(torch.rand(2, 1, 32, 32), 0.25)
    assert one_line(e)


def test_bad_inputs_name_what_does_not_fit(small, tmp_path):
    from fastrobust.models import oat_resnet18

    ref, (ckpt, npy, q) = small
    cases = [
        (dict(checkpoint=oat_resnet18(10, 8).state_dict(), encoding_matrix=npy),
         "checkpoint: not a state dict of an OAT repository model"),
        (dict(checkpoint={"model": {"weight": torch.zeros(2)}}, encoding_matrix=npy),
         "checkpoint: not a state dict"),
        (dict(checkpoint=ckpt, encoding_matrix=q[:, :64]),
         r"encoding_matrix: shape \(128, 64\) does not fit"),
        (dict(checkpoint=ckpt, encoding_matrix=q[:3]), r"6 λ values need 6 rows"),
        (dict(checkpoint=ckpt, encoding_matrix=npy, arch="WRN16_8OAT"),
         "arch: 'WRN16_8OAT' given, but the checkpoint holds an OAT-repository ResNet"),
        (dict(checkpoint=ckpt, encoding_matrix=npy, arch="resnet"), "arch: must be one of"),
        (dict(checkpoint=ckpt, encoding_matrix=npy, lambdas=(0.0, 0.1, 0.1)),
         "lambdas: must be distinct"),
        (dict(checkpoint=str(tmp_path / "none.pth"), encoding_matrix=npy),
         "checkpoint: .*none.pth cannot be read"),
        (dict(checkpoint=ckpt, encoding_matrix=str(tmp_path / "none.npy")),
         "encoding_matrix: .*none.npy cannot be read"),
    ]
    sd = {k: v for k, v in ref.state_dict().items()}
    sd["bundle1.0.extra.weight"] = torch.zeros(1)
    cases.append((dict(checkpoint=sd, encoding_matrix=npy),
                  "checkpoint: 'bundle1.0.extra.weight' has no place in"))
    sd = {k: v for k, v in ref.state_dict().items() if k != "bundle2.0.bn_sc.BN_a.bias"}
    cases.append((dict(checkpoint=sd, encoding_matrix=npy),
                  "checkpoint: no 'bundle2.0.bn_sc.BN_a.bias'"))
    sd = dict(ref.state_dict(), **{"bundle1.1.conv2.weight": torch.zeros(8, 8, 5, 5)})
    cases.append((dict(checkpoint=sd, encoding_matrix=npy),
                  r"'bundle1.1.conv2.weight' has shape \(8, 8, 5, 5\)"))
    for kw, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            from_oat_repo(**kw)
        assert one_line(e), str(e.value)


# --- the command line ---------------------------------------------------------------------

def test_cli_eval_from_oat_repo(small, tmp_path, capsys):
    """SA / RA per λ of a repository checkpoint; SA at λ = 0 equals the loaded model's
    accuracy computed here."""
    import json

    from fastrobust.cli import main
    from fastrobust.data import load

    ref, (ckpt, npy, q) = small
    out = tmp_path / "eval"
    assert main(["eval", "--from-oat-repo", str(ckpt), "--encoding-matrix", str(npy),
                 "--dataset", "digits", "--steps", "1", "--eps", "0.2", "--lambdas", "0", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "OAT-repository ResNet" in printed and "PGD-1" in printed
    rows = json.load(open(out / "results.json"))["sweep"][""]
    assert [r["lambda"] for r in rows] == [0.0, 1.0]
    assert (out / "tradeoff.png").stat().st_size > 0
    model = from_oat_repo(ckpt, npy)
    test = load("digits").test
    with torch.no_grad():
        sa = (model(test.x, 0.0).argmax(1) == test.y).float().mean()
    assert rows[0]["SA"] == pytest.approx(float(sa))
    assert all(r["RA"] <= r["SA"] for r in rows)


def test_cli_eval_from_oat_repo_bad_input(small, tmp_path, capsys):
    from fastrobust.cli import main

    ref, (ckpt, npy, q) = small
    np.save(tmp_path / "small.npy", q[:, :32])
    base = ["eval", "--from-oat-repo", str(ckpt), "--encoding-matrix", str(npy)]
    cases = [
        (["eval", "--from-oat-repo", str(ckpt), "--encoding-matrix",
          str(tmp_path / "small.npy"), "--dataset", "digits"],
         "--encoding-matrix: shape (128, 32) does not fit"),
        (base + ["--dataset", "digits", "--lambdas", "0.25"],
         "--lambdas 0.25 is not in the model's set"),
        (base + ["--dataset", "digits", "--arch", "WRN40_2OAT"],
         "--arch: 'WRN40_2OAT' given, but the checkpoint holds"),
        (base, "--dataset is needed"),
        (base + ["--dataset", "cifar10", "--data-root", str(tmp_path)], "cifar"),
        (["eval", str(ckpt), "--from-oat-repo", str(ckpt)], "either CHECKPOINT"),
        (["eval", str(ckpt), "--encoding-matrix", str(npy)],
         "--encoding-matrix goes with --from-oat-repo"),
        (["eval"], "give a CHECKPOINT"),
    ]
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err, (argv, err)
        assert err.startswith("fastrobust eval: error:") and fragment in err, (argv, err)
    assert not (ckpt.parent / "results.json").exists()  # nothing evaluated, nothing written
