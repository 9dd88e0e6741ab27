"""Compact markdown table of a pytest-benchmark JSON written by these benchmarks: one row per
group with the fused kernel's median, GB/s and its speedup over each baseline.

    python benchmarks/summarize.py results/cpu-2026-11-21.json
"""
import json
import sys

BASELINES = ["bn_floor", "oat_dual", "eager_kway", "compiled_kway"]


def main(path):
    data = json.load(open(path))
    print("| group | fused ms | GB/s | of same-size copy | of 256 MB copy | "
          + " | ".join(f"vs {b}" for b in BASELINES) + " |")
    print("|---" * (5 + len(BASELINES)) + "|")
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if not info.get("fused"):
            continue
        vs = info.get("speedup_vs", {})
        cells = [f"{vs[k]:.2f}x" if k in vs else "" for k in BASELINES]
        print(f"| {b['group']} | {b['stats']['median'] * 1e3:.3f} | {info['GBps']} | "
              f"{info['frac_of_copy']} | {info['frac_of_dram_copy']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
