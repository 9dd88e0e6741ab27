"""`fastrobust demo` and its plot: dedicated models at λ = 0 and 1 beside OAT, and λ labels
that never cover each other."""
import json

import pytest
import torch

from fastrobust.trainers.oat import OATConfig


def test_labels_of_clustered_points_do_not_overlap():
    """The demo's points at λ 0.05-0.2 and 0.9-1 lie within a pixel or two of each other:
    every label gets a box of its own, clear of every marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastrobust.trainers.results import place_labels

    fig, ax = plt.subplots(figsize=(6, 5))
    points = [(10.0, 98.0), (10.1, 98.0), (10.2, 97.9), (10.2, 97.8), (10.3, 97.8),
              (40.0, 80.0), (40.1, 79.9), (40.1, 80.0), (25.0, 90.0)]
    ax.plot(*zip(*points), "o")
    ax.margins(0.12)
    fig.tight_layout()
    anns = place_labels(ax, points, [f"{i / 10:g}" for i in range(len(points))])
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    boxes = []
    for a in anns:  # the text's box, without its leader line
        a.update_positions(renderer)
        boxes.append(Text.get_window_extent(a, renderer))
    assert any(a.arrow_patch is not None for a in anns)  # the crowded ones are led away
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
        for x, y in (ax.transData.transform(p) for p in points):
            assert not (a.x0 <= x <= a.x1 and a.y0 <= y <= a.y1)
    plt.close(fig)


def test_dedicated_models_train_at_their_lambda(tmp_path):
    """λ = 0: clean training, no attack; λ = 1: every step attacks (PGD-AT); the rows carry
    SA and RA as the λ table does; a seeded run repeats."""
    from fastrobust.trainers import dedicated

    cfg = OATConfig(width=4, epochs=1, batch_size=64, lr=0.05, eps=0.3, steps=2,
                    eval_steps=1, max_train_batches=3, out=str(tmp_path))
    calls = []
    real = dedicated.make_attack

    def counting(*a, **k):
        atk = real(*a, **k)
        original = atk._attack

        def run(*args, **kw):
            calls.append(1)
            return original(*args, **kw)
        atk._attack = run
        return atk

    dedicated.make_attack = counting
    try:
        clean = dedicated.train_dedicated(cfg, 0.0, log=None, progress=False)
        assert calls == []
        adv = dedicated.train_dedicated(cfg, 1.0, log=None, progress=False)
        assert len(calls) == 3
    finally:
        dedicated.make_attack = real
    again = dedicated.train_dedicated(cfg, 1.0, log=None, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(adv.state_dict().values(),
                                                 again.state_dict().values()))
    from fastrobust.data import load

    row = dedicated.evaluate_dedicated(clean, load("digits").test, cfg, 0.0)
    assert set(row) == {"lambda", "seen", "SA", "RA"} and 0 <= row["RA"] <= row["SA"] <= 1
    with pytest.raises(ValueError, match="lam"):
        dedicated.train_dedicated(cfg, 1.5)


def test_demo_writes_the_dedicated_points(tmp_path, capsys):
    """The demo's run at a smoke-test size (the command itself is `fastrobust demo`, whose
    options tests/test_cli_errors.py checks)."""
    from fastrobust.demo import run_demo

    out = tmp_path / "demo"
    cfg = OATConfig(dataset="digits", width=4, epochs=1, batch_size=64, lr=0.05, eps=0.3,
                    steps=1, eval_steps=1, max_train_batches=2, eval_unseen=(0.5,),
                    out=str(out))
    assert run_demo(cfg) == 0
    res = json.load(open(out / "results.json"))
    assert [r["lambda"] for r in res["dedicated"]] == [0.0, 1.0]
    assert len(res["sweep"][""]) == 7
    assert (out / "tradeoff.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "dedicated lambda=0" in printed and "dedicated lambda=1" in printed
