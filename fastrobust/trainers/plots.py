"""The trade-off plot of the OAT trainers and the demo: SA against RA, one curve per label,
each point labelled with its λ where no other label or point covers it."""
from __future__ import annotations

import math
import os

__all__ = ["plot_tradeoff", "place_labels"]

# label offsets tried in turn (points): close around the point first, then further out
_OFFSETS = [(4, 4), (4, -10), (-14, 4), (-14, -10), (6, -3), (-18, -3), (-4, 7), (-4, -14)]
_OFFSETS += [(round(r * math.cos(a)), round(r * math.sin(a)))
             for r in (16, 24, 34, 46) for a in [i * math.pi / 6 for i in range(12)]]


def place_labels(ax, points, texts, fontsize=7, color=None, avoid=()) -> list:
    """Annotates each of ``points`` (data coordinates) with its text at the first offset
    where its box overlaps neither a label placed before, nor a marker, nor an artist of
    ``avoid`` (e.g. the legend); far offsets get a leader line. Call it once the figure's
    layout is final. Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    markers = [to_px(p) for p in points]
    placed, out = [a.get_window_extent(renderer) for a in avoid], []
    for (x, y), text in zip(points, texts):
        best = None
        for dx, dy in _OFFSETS:
            far = max(abs(dx), abs(dy)) > 15
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                              fontsize=fontsize, color=color,
                              arrowprops=dict(arrowstyle="-", lw=0.5, alpha=0.6,
                                              color="grey") if far else None)
            box = ann.get_window_extent(renderer).expanded(1.05, 1.15)
            clash = any(box.overlaps(b) for b in placed) or any(
                box.x0 - 3 <= mx <= box.x1 + 3 and box.y0 - 3 <= my <= box.y1 + 3
                for mx, my in markers)
            if not clash:
                best = (ann, box)
                break
            ann.remove()
        if best is None:  # every offset clashes: the last, furthest one
            best = (ann := ax.annotate(text, (x, y), xytext=_OFFSETS[-1],
                                       textcoords="offset points", fontsize=fontsize,
                                       color=color, arrowprops=dict(arrowstyle="-", lw=0.5)),
                    ann.get_window_extent(renderer))
        placed.append(best[1])
        out.append(best[0])
    return out


def plot_tradeoff(path: str, curves: dict[str, list[dict]], title: str,
                  dedicated: dict[str, list[dict]] | None = None) -> None:
    """The SA–RA trade-off: one curve per label (e.g. per width), points labelled with λ;
    seen λ values as circles, unseen ones as stars. ``dedicated``: models trained at one λ
    each (label → rows), drawn as squares. Beside it SA and RA against λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    points, texts = [], []
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["lambda"])
        line, = ax.plot([r["RA"] * 100 for r in rows], [r["SA"] * 100 for r in rows], "-",
                        alpha=0.5, label=label)
        for r in rows:
            ax.plot(r["RA"] * 100, r["SA"] * 100, "o" if r["seen"] else "*",
                    color=line.get_color(), markersize=6 if r["seen"] else 9)
            points.append((r["RA"] * 100, r["SA"] * 100))
            texts.append(f"{r['lambda']:g}")
        lams = [r["lambda"] for r in rows]
        ax2.plot(lams, [r["SA"] * 100 for r in rows], "o-", color=line.get_color(),
                 label=f"SA {label}")
        ax2.plot(lams, [r["RA"] * 100 for r in rows], "s--", color=line.get_color(),
                 label=f"RA {label}")
    for label, rows in (dedicated or {}).items():
        rows = sorted(rows, key=lambda r: r["lambda"])
        ax.plot([r["RA"] * 100 for r in rows], [r["SA"] * 100 for r in rows], "ks",
                markersize=7, markerfacecolor="none", label=label)
        for r in rows:
            points.append((r["RA"] * 100, r["SA"] * 100))
            texts.append(f"{label.split()[0]} λ={r['lambda']:g}")
        ax2.plot([r["lambda"] for r in rows], [r["SA"] * 100 for r in rows], "ks",
                 markerfacecolor="none", label=f"SA {label}")
        ax2.plot([r["lambda"] for r in rows], [r["RA"] * 100 for r in rows], "kD",
                 markerfacecolor="none", label=f"RA {label}")
    ax.margins(0.12)
    ax.set_xlabel("robust accuracy (%)")
    ax.set_ylabel("standard accuracy (%)")
    ax.set_title("SA–RA trade-off (o seen λ, * unseen λ)")
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=8, loc="lower left")
    ax2.set_xlabel("λ")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("accuracy against λ")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    place_labels(ax, points, texts, avoid=[legend])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
