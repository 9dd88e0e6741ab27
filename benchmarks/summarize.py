"""Summaries of pytest-benchmark JSON written by these benchmarks.

    python benchmarks/summarize.py RAW.json                  # markdown table to stdout
    python benchmarks/summarize.py RAW.json --family multi_bn --out benchmarks/results

With ``--out``, writes ``<family>.md`` (the table) and ``<family>.json`` (the medians and the
extra figures of every row, no per-round data) for the groups whose name starts with one of
the ``--family`` prefixes: benchmarks/results keeps one current summary per family; older runs
live in git history.
"""
import argparse
import json
import os


def rows(data, prefixes=None):
    for b in data["benchmarks"]:
        if prefixes and b["group"].split()[0] not in prefixes:
            continue
        yield b


def table(data, prefixes=None) -> str:
    """One row per group: the fused kernel's median, GB/s and its speedup over each baseline."""
    picked = list(rows(data, prefixes))
    baselines = list(dict.fromkeys(k for b in picked
                                   for k in b["extra_info"].get("speedup_vs", {})))
    out = ["| group | fused ms | GB/s | of same-size copy | of 256 MB copy | "
           + " | ".join(f"vs {b}" for b in baselines) + " |",
           "|---" * (5 + len(baselines)) + "|"]
    for b in picked:
        info = b["extra_info"]
        if not info.get("fused"):
            continue
        vs = info.get("speedup_vs", {})
        cells = [f"{vs[k]:.2f}x" if k in vs else "" for k in baselines]
        out.append(f"| {b['group']} | {b['stats']['median'] * 1e3:.3f} | "
                   f"{info.get('GBps', '-')} | {info.get('frac_of_copy', '-')} | "
                   f"{info.get('frac_of_dram_copy', '-')} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def compact(data, prefixes=None) -> dict:
    m = data.get("machine_info", {})
    return {"datetime": data.get("datetime"),
            "machine": {"cpu": m.get("cpu", {}).get("brand_raw"), "node": m.get("node"),
                        "python": m.get("python_version")},
            "rows": [{"group": b["group"], "name": b["name"],
                      "median_ms": round(b["stats"]["median"] * 1e3, 4),
                      "iqr_ms": round(b["stats"]["iqr"] * 1e3, 4),
                      "rounds": b["stats"]["rounds"], "extra_info": b["extra_info"]}
                     for b in rows(data, prefixes)]}


def write_compact(obj: dict, path: str) -> None:
    """The summary as JSON with one benchmark row per line."""
    head = {k: v for k, v in obj.items() if k != "rows"}
    with open(path, "w") as f:
        f.write("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()))
        f.write(', "rows": [\n' + ",\n".join(json.dumps(r) for r in obj["rows"]) + "\n]}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--family", action="append", help="group-name prefix (repeatable)")
    p.add_argument("--name", help="file name of the summary (default: the first family)")
    p.add_argument("--out", help="directory for <name>.md and <name>.json")
    p.add_argument("--title", default="", help="first line of the markdown summary")
    args = p.parse_args(argv)
    data = json.load(open(args.raw))
    text = table(data, args.family)
    if not args.out:
        print(text)
        return
    name = args.name or (args.family[0] if args.family else "summary")
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write((args.title + "\n\n" if args.title else "") + text + "\n")
    write_compact(compact(data, args.family), os.path.join(args.out, f"{name}.json"))


if __name__ == "__main__":
    main()
