"""Compact markdown table of a pytest-benchmark JSON written by these benchmarks: one row per
group with the fused kernel's median, GB/s and its speedup over each baseline.

    python benchmarks/summarize.py results/cpu-2026-11-21b.json
"""
import json
import sys

def main(path):
    data = json.load(open(path))
    # Every baseline any fused row was compared with, in order of first appearance.
    BASELINES = list(dict.fromkeys(k for b in data["benchmarks"]
                                   for k in b["extra_info"].get("speedup_vs", {})))
    print("| group | fused ms | GB/s | of same-size copy | of 256 MB copy | "
          + " | ".join(f"vs {b}" for b in BASELINES) + " |")
    print("|---" * (5 + len(BASELINES)) + "|")
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if not info.get("fused"):
            continue
        vs = info.get("speedup_vs", {})
        cells = [f"{vs[k]:.2f}x" if k in vs else "" for k in BASELINES]
        print(f"| {b['group']} | {b['stats']['median'] * 1e3:.3f} | {info.get('GBps', '-')} | "
              f"{info.get('frac_of_copy', '-')} | {info.get('frac_of_dram_copy', '-')} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
