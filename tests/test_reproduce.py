"""benchmarks/reproduce.py and its pieces (reproduce_afa, reproduce_awnet) at tiny size: the
runs give every row of their tables, the claims are judged from the numbers, the plots are
written, and bad options are one line naming the flag."""
from __future__ import annotations

import json

import pytest
import torch

import reproduce
import reproduce_afa
import reproduce_awnet
from fastrobust.trainers.afa import AFAConfig, AFATrainer

TINY_AFA = dict(width=4, epochs=1, epochs2=1, batch_size=32, steps=1, eval_steps=1,
                max_train_batches=2)
TINY_AWNET = dict(width=4, epochs=1, teacher_epochs=1, batch_size=32, steps=1, eval_steps=1,
                  max_train_batches=2)


def test_afa_run_table_and_plot(tmp_path):
    r = reproduce_afa.run_seed(0, str(tmp_path), progress=False, log=lambda *a: None,
                               **TINY_AFA)
    assert r["eps"] == pytest.approx([0.2 * f for f in AFAConfig.eval_fracs])  # digits' ε
    assert set(r["acc"]) == set(reproduce_afa.MODELS)
    for accs in r["acc"].values():
        assert len(accs) == len(r["eps"]) and all(0 <= a <= 1 for a in accs)
    assert len(r["W1"]) == len(r["eps"]) and -1 <= r["rank_correlation"] <= 1
    text = reproduce_afa.table([r])
    assert len(text.splitlines()) == 2 + len(reproduce_afa.MODELS) + 1
    assert "mean W1 (AFA)" in text and "ε=0.2" in text
    reproduce_afa.plot([r, {**r, "seed": 1}], str(tmp_path / "afa.png"))
    assert (tmp_path / "afa.png").stat().st_size > 10_000


def test_afa_branch_accuracy_is_stage2_with_the_generator_pinned(tmp_path):
    """Through BN_{K-1} only (stage I's adversarial branch) is what stage II gives when the
    generator puts all the weight there (W0 = 0); and the model is left in stage II."""
    cfg = AFAConfig(out=str(tmp_path), **TINY_AFA)
    tr = AFATrainer(cfg, progress=False)
    tr.fit(log=lambda *a: None)
    model, test = tr.model.eval(), tr.data.test
    K = cfg.num_branches
    adv = reproduce_afa.branch_accuracy(model, test, cfg, K - 1, 2)
    assert model.stage == 2
    with torch.no_grad():
        model.generator.head[-1].weight.zero_()
        model.generator.head[-1].bias.fill_(-200.0)  # W0 = sigmoid(-200) = 0
    pinned = reproduce_afa.evaluate_afa(model, test, cfg, progress=False, steps=2,
                                        adaptive_weights=())
    pgd = [row for row in pinned["rows"] if row["attack"].startswith("PGD")]
    assert [row["W1"] for row in pgd] == pytest.approx([1.0] * len(pgd))
    # clean: the same predictions; attacked: other random starts, so within a few samples
    assert pgd[0]["acc"] == adv[0]
    assert [row["acc"] for row in pgd] == pytest.approx(adv, abs=0.05)


def test_afa_verdict_reads_the_numbers():
    ra = reproduce_afa
    r = {"acc": {ra.BNADV: [0.80, 0.5, 0.30], ra.PGDAT: [0.70, 0.4, 0.40],
                 ra.AFA: [0.90, 0.6, 0.29]}, "W1": [0.2, 0.5, 0.8], "rank_correlation": 0.7}
    v = ra.verdict(r)
    assert v["clean_up"] and v["robust_kept"] and v["w1_rises"] and v["clean_up_at"]
    assert not v["robust_kept_at"]  # 29 % against PGD-AT's 40 %
    assert v["clean_gain"] == pytest.approx(0.10) and v["robust_change"] == pytest.approx(-0.01)
    r["acc"][ra.AFA] = [0.79, 0.5, 0.20]
    r["rank_correlation"] = -0.1
    v = ra.verdict(r)
    assert not (v["clean_up"] or v["robust_kept"] or v["w1_rises"])


def test_awnet_run_table_and_plot(tmp_path):
    r = reproduce_awnet.run_seed(0, str(tmp_path), progress=False, log=lambda *a: None,
                                 **TINY_AWNET)
    assert list(r["rows"]) == list(reproduce_awnet.ROWS) and r["config"]["eps"] == 0.2
    for name, row in r["rows"].items():
        assert row["W-robust"] == pytest.approx(0.5 * row["SA"] + 0.5 * row[r["pgd"]])
        assert ("detector" in row) == (name in reproduce_awnet.ROWS[:3])
    # the one-BN run reused the first run's teachers
    assert (tmp_path / "awnet-seed0" / "teacher_adv.pt").exists()
    assert not (tmp_path / "awnet-single-seed0" / "teacher_adv.pt").exists()
    text = reproduce_awnet.table([r])
    assert len(text.splitlines()) == 2 + len(reproduce_awnet.ROWS)
    reproduce_awnet.plot([r], str(tmp_path / "awnet.png"))
    assert (tmp_path / "awnet.png").stat().st_size > 10_000


def test_awnet_verdict_reads_the_numbers():
    def result(*w):
        return {"rows": {n: {"W-robust": v} for n, v in zip(reproduce_awnet.ROWS, w)}}
    v = reproduce_awnet.verdict(result(0.4, 0.6, 0.7, 0.65, 0.5))
    assert v["ablation_order"] and v["above_teacher"]
    v = reproduce_awnet.verdict(result(0.6, 0.5, 0.7, 0.75, 0.5))
    assert not v["ablation_order"] and not v["above_teacher"]


@pytest.mark.parametrize("argv, flag", [(["afa", "--threads", "0"], "--threads must be >= 1"),
                                        (["awnet", "--seeds", "-1"], "--seeds must be >= 0"),
                                        (["oat2"], "invalid choice: 'oat2'")])
def test_bad_options_are_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        reproduce.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and flag in err[0]


def test_from_json_redraws_without_training(tmp_path, capsys):
    rows = {n: {"SA": 0.9, "PGD-10": 0.3, "W-robust": 0.6, "FGSM": 0.5, "CW-inf": 0.2}
            for n in reproduce_awnet.ROWS}
    saved = {"results": [{"seed": 0, "rows": rows, "pgd": "PGD-10", "config": {"eps": 0.2}}]}
    (tmp_path / "awnet.json").write_text(json.dumps(saved))
    png = tmp_path / "redrawn.png"
    assert reproduce.main(["awnet", "--from-json", str(tmp_path / "awnet.json"),
                           "--plot", str(png)]) == 0
    assert "| 0 | + type head (AW-Net) | 90.0 | 50.0 | 30.0 | 20.0 | 60.0 | - |" in \
        capsys.readouterr().out
    assert png.stat().st_size > 10_000
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["awnet", "--from-json", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--from-json:" in err[0]
