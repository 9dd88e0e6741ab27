"""What a run writes besides its checkpoints: aligned text tables, JSON results, and plots
(the trade-off plot of the OAT trainers and the demo: SA against RA, one curve per label, each
point labelled with its λ where no other label or point covers it)."""
from __future__ import annotations

import json
import math
import os
from typing import Iterable

__all__ = ["format_table", "write_json", "pyplot", "save_figure", "plot_tradeoff",
           "place_labels"]


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def format_table(rows: list[dict], columns: Iterable[tuple[str, str, str]]) -> str:
    """rows of dicts → an aligned text table; columns: (key, header, format)."""
    columns = list(columns)
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-"
                      for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display); imported on the first
    plot, since matplotlib takes longer to import than the rest of a command's start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Writes ``fig`` to ``path`` (its directory made when missing) and closes it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def _candidates(w: float, h: float, s: float):
    """Lower-left corners (pixels, relative to the marker) of a w×h label: beside the
    marker first, then on rings further out (s: pixels per point)."""
    g = 7 * s  # clear of a marker's edge (markers are up to 9 points wide)
    yield from [(g, -h / 2), (g, g), (g, -h - g), (-w - g, -h / 2), (-w / 2, 1.5 * g),
                (-w / 2, -h - 1.5 * g), (-w - g, g), (-w - g, -h - g)]
    for ring in range(1, 16):
        r = (8 + 7 * ring) * s
        for k in range(24):
            a = 2 * math.pi * k / 24
            yield r * math.cos(a) - w / 2, r * math.sin(a) - h / 2


def place_labels(ax, points, texts, fontsize=7, color=None, avoid=()) -> list:
    """Annotates each of ``points`` (data coordinates) with its text at the first place
    where its box lies inside the axes and overlaps neither a label placed before, nor a
    marker, nor an artist of ``avoid`` (e.g. the legend); labels away from their point get a
    leader line. ``color``: one color, or one per point. Call it once the figure's layout is
    final. Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    s = fig.dpi / 72
    frame = ax.get_window_extent(renderer)
    markers = [tuple(ax.transData.transform(p)) for p in points]
    taken = [tuple(a.get_window_extent(renderer).extents) for a in avoid]
    gap = 4 * s  # between two labels

    def free(box):
        x0, y0, x1, y1 = box
        if x0 < frame.x0 or y0 < frame.y0 or x1 > frame.x1 or y1 > frame.y1:
            return False
        if any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap
               for b in taken):
            return False
        return not any(x0 - 6 * s <= mx <= x1 + 6 * s and y0 - 6 * s <= my <= y1 + 6 * s
                       for mx, my in markers)

    out = []
    colors = color if isinstance(color, (list, tuple)) else [color] * len(points)
    for (x, y), (mx, my), text, color in zip(points, markers, texts, colors):
        probe = ax.text(0, 0, text, fontsize=fontsize)
        ext = probe.get_window_extent(renderer)
        probe.remove()
        w, h = ext.width, ext.height
        spots = list(_candidates(w, h, s))
        dx, dy = next(((dx, dy) for dx, dy in spots
                       if free((mx + dx, my + dy, mx + dx + w, my + dy + h))), spots[0])
        taken.append((mx + dx, my + dy, mx + dx + w, my + dy + h))
        # a leader line once the label does not touch its marker
        far = math.hypot(max(dx, 0, -dx - w), max(dy, 0, -dy - h)) > 7 * s
        out.append(ax.annotate(
            text, (x, y), xytext=(dx / s, dy / s), textcoords="offset points", ha="left",
            va="bottom", fontsize=fontsize, color=color,
            arrowprops=dict(arrowstyle="-", lw=0.6, color="0.35",
                            shrinkA=0, shrinkB=3) if far else None))
    return out


def plot_tradeoff(path: str, curves: dict[str, list[dict]], title: str,
                  dedicated: dict[str, list[dict]] | None = None) -> None:
    """The SA–RA trade-off: one curve per label (e.g. per width), points labelled with λ;
    seen λ values as circles, unseen ones as stars. ``dedicated``: models trained at one λ
    each (label → rows), drawn as squares. Beside it SA and RA against λ."""
    fig, (ax, ax2) = pyplot().subplots(1, 2, figsize=(12, 5))
    points, texts, colors = [], [], []
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["lambda"])
        line, = ax.plot([r["RA"] * 100 for r in rows], [r["SA"] * 100 for r in rows], "-",
                        alpha=0.5, label=label)
        for r in rows:
            ax.plot(r["RA"] * 100, r["SA"] * 100, "o" if r["seen"] else "*",
                    color=line.get_color(), markersize=6 if r["seen"] else 9)
            points.append((r["RA"] * 100, r["SA"] * 100))
            texts.append(f"{r['lambda']:g}")
            colors.append(line.get_color())
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
            colors.append("black")
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
    place_labels(ax, points, texts, color=colors, avoid=[legend])
    save_figure(fig, path)
