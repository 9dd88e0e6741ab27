"""AFA: the K-way model and its weight generator, stage I's batched schedule against the
paper's sequential one, stage II's freezing, resume, the command line, and the method's
phenomenon on the embedded digits (the generator's W1 rises with the attack strength)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from fastrobust.models import afa_resnet18
from fastrobust.nn import MultiBatchNorm2d
from fastrobust.trainers.afa import (AFAConfig, AFATrainer, evaluate_afa, rank_correlation,
                                     stage1_loss)


def tiny_cfg(out, **kw):
    base = dict(width=4, epochs=1, epochs2=1, batch_size=32, max_eps=0.3, steps=2,
                max_train_batches=2, eval_steps=2, out=str(out))
    base.update(kw)
    return AFAConfig(**base)


def test_model_routing_and_mixing():
    m = afa_resnet18(10, 4, in_channels=1, num_branches=5).train()
    x = torch.rand(6, 1, 8, 8)
    assert m(x, branch=torch.tensor([0, 1, 2, 3, 4, 0])).shape == (6, 10)
    gen = {id(b) for b in m.generator.modules()}
    bns = [b for b in m.modules() if isinstance(b, MultiBatchNorm2d) and id(b) not in gen]
    assert len(bns) == 20 and all(b.num_branches == 5 for b in bns)
    with pytest.raises(RuntimeError, match="stage 2"):
        m(x, branch=0, return_weight=True)
    gen_params = m.freeze_for_stage2()
    assert {id(p) for p in gen_params} == {id(p) for p in m.generator.parameters()}
    assert not any(p.requires_grad for n, p in m.named_parameters()
                   if not n.startswith("generator."))
    m.train()
    assert all(not b.training for b in bns) and m.generator.training  # base frozen in eval
    logits, w0 = m(x, return_weight=True)
    assert logits.shape == (6, 10) and w0.shape == (6,) and ((w0 > 0) & (w0 < 1)).all()
    mix = m.mix_of(w0)
    assert torch.equal(mix[:, 1:4], torch.zeros(6, 3)) and torch.allclose(mix.sum(1),
                                                                        torch.ones(6))
    # W0 = 1 is BN_0 alone: the stage-II forward equals the stage-I forward through branch 0
    with torch.no_grad():
        m.eval()
        m.generator.head[-1].bias.fill_(1e4)
        m.generator.head[-1].weight.zero_()
        both = m(x)
        m.stage = 1
        torch.testing.assert_close(both, m(x, branch=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adv_loss", ["pgd", "trades"])
def test_batched_stage1_equals_sequential_schedule(adv_loss):
    """One attack with per-sample ε and one pass over the K copies gives the paper's
    sequential schedule's loss, gradients and running statistics (per-branch batch statistics
    are the same; the random starts come from one generator stream in the same order)."""
    cfg = AFAConfig(width=4, max_eps=0.3, steps=2, adv_loss=adv_loss)
    torch.manual_seed(0)
    a = afa_resnet18(10, 4, in_channels=1).train()
    b = copy.deepcopy(a)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    la = stage1_loss(a, x, y, cfg, torch.Generator().manual_seed(3), "batched")
    lb = stage1_loss(b, x, y, cfg, torch.Generator().manual_seed(3), "sequential")
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)  # fp32, sums in another order
    la.backward()
    lb.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    for (n, s), t in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-6, msg=n)


def test_stage2_trains_only_the_generator(tmp_path):
    tr = AFATrainer(tiny_cfg(tmp_path), progress=False)
    tr.model.freeze_for_stage2()
    before = copy.deepcopy(tr.model.state_dict())
    x, y = tr.data.train.x[:16], tr.data.train.y[:16]
    tr.model.train()
    tr.step2(x.contiguous(memory_format=tr.memory_format), y)
    after = tr.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("generator.") for k in changed), changed


def test_resume_is_exact_across_the_stages(tmp_path):
    full = AFATrainer(tiny_cfg(tmp_path / "full", epochs2=2), progress=False)
    full.fit(log=lambda *a: None)
    part = AFATrainer(tiny_cfg(tmp_path / "part", epochs2=2), progress=False)
    part.cfg.epochs2 = 1  # interrupted after stage I and one stage-II epoch
    part.fit(log=lambda *a: None)
    resumed = AFATrainer(tiny_cfg(tmp_path / "part", epochs2=2), resume=True, progress=False)
    assert (resumed.epoch1, resumed.epoch2, resumed.model.stage) == (1, 1, 2)
    resumed.fit(log=lambda *a: None)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_rank_correlation():
    a = torch.tensor([0.0, 1, 2, 3, 4])
    assert rank_correlation(a, a * 2 + 1) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)


def test_cli_train_afa(tmp_path, capsys):
    from fastrobust.cli import main

    out = tmp_path / "afa"
    assert main(["train", "afa", "--width", "4", "--epochs", "1", "--epochs2", "1",
                 "--batch-size", "32", "--steps", "1",
                 "--max-train-batches", "2", "--eval-steps", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "W1 vs eps rank correlation" in text
    assert "strengths [0, 0.05, 0.1, 0.15, 0.2]" in text  # the digits' default max-eps
    ck = torch.load(out / "last.pt", weights_only=False)
    assert (ck["config"]["max_eps"], ck["config"]["lr"], ck["config"]["lr2"]) == (0.2, 0.1, 0.1)
    res = json.loads((out / "results.json").read_text())
    assert {r["attack"].split()[0] for r in res["rows"]} >= {"PGD-1", "FGSM", "CW-inf",
                                                            "adaptive"}
    assert (out / "w1_vs_eps.png").stat().st_size > 0 and (out / "last.pt").exists()


@pytest.mark.parametrize("dataset, eps, lr, lr2", [("digits", 0.2, 0.1, 0.1),
                                                  ("cifar10", 8 / 255, 0.1, 0.01),
                                                  ("svhn", 8 / 255, 0.01, 0.001)])
def test_defaults_follow_the_dataset_and_a_given_value_wins(tmp_path, dataset, eps, lr, lr2):
    """ε (and with it the K strengths and the evaluation's ε set) and both learning rates are
    the data set's unless given: CIFAR-10 and SVHN the paper's, the digits 0.2 (8/255 moves
    no digit pixel to another grey level)."""
    root = None if dataset == "digits" else str(tmp_path)  # validate reads no data
    cfg = AFAConfig(dataset=dataset, data_root=root, out=str(tmp_path))
    cfg.validate()
    assert (cfg.max_eps, cfg.lr, cfg.lr2) == (eps, lr, lr2)
    assert cfg.strengths().tolist() == pytest.approx([eps * k / 4 for k in range(5)])
    given = AFAConfig(dataset=dataset, data_root=root, out=str(tmp_path), max_eps=0.1, lr=0.3,
                      lr2=0.05)
    given.validate()
    assert (given.max_eps, given.lr, given.lr2) == (0.1, 0.3, 0.05)


def test_help_shows_the_per_dataset_defaults(capsys):
    from fastrobust.cli import main

    with pytest.raises(SystemExit):
        main(["train", "afa", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "strongest ε (default 0.2 on digits, 8/255 on cifar10 and svhn)" in text
    assert "(default 0.1 on digits, 0.01 on cifar10, 0.001 on svhn)" in text


@pytest.mark.slow
def test_w1_rises_with_attack_strength(tmp_path):
    """The paper's Fig. 6 at small scale: after stage I (5 epochs) and stage II (4 epochs) on
    digits, the generator puts more weight on the adversarial branch the stronger the attack
    (rank correlation of W1 with ε over every test sample; 0.79 and 0.77 on seeds 0 and 1)."""
    cfg = AFAConfig(width=8, epochs=5, epochs2=4, batch_size=64, lr=0.05, lr2=0.1,
                    max_eps=0.3, steps=3, eval_steps=5, out=str(tmp_path))
    tr = AFATrainer(cfg, progress=False)
    tr.fit(log=lambda *a: None)
    r = evaluate_afa(tr.model, tr.data.test, cfg, progress=False, adaptive_weights=())
    assert r["w1_eps_rank_correlation"] > 0
    pgd = [row for row in r["rows"] if row["attack"].startswith("PGD")]
    assert pgd[-1]["W1"] > pgd[0]["W1"]  # strongest attack vs clean
