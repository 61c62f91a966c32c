"""Entity-level micro F1 (seqeval, conlleval-compatible, IOB2) and the Table 1 report.

    python evaluate.py runs/mini                          # every result.json below -> table1.md/.csv/.png
    python evaluate.py --score runs/mini/finetune/s4/hi/seed1/predictions.conll   # re-score one file

A cell is mean +- sample std (ddof=1) over fine-tuning seeds, with the paper's value and our delta.
The average column averages the targets within each seed, then over seeds; its paper value averages
the paper's numbers for the same targets.
"""
import argparse
import csv
import glob
import json
import math
import os
import statistics
import sys

from seqeval.metrics import f1_score, precision_score, recall_score

SETTINGS = {1: "Full FT", 2: "HT", 3: "AT", 4: "Meta Priming -> AT", 5: "FT Priming -> AT",
            6: "MP [MAML Loop] -> AT", 7: "MP [1 Inner Step] -> AT"}
TARGETS = ["hi", "af", "az", "lt", "et", "nl"]
PAPER = {  # Table 1 of Gheini, Ma & May: entity-level F1 (mBERT, full WikiAnn data)
    1: [86.73, 91.29, 87.70, 89.43, 90.88, 91.47], 2: [72.71, 79.11, 74.24, 78.34, 81.23, 78.90],
    3: [77.76, 84.10, 81.08, 83.00, 85.13, 83.89], 4: [81.25, 88.23, 83.29, 86.30, 87.18, 88.97],
    5: [79.55, 87.78, 82.28, 85.79, 86.56, 88.82], 6: [80.18, 85.82, 81.47, 85.73, 85.86, 88.13],
    7: [80.23, 86.46, 80.35, 84.43, 86.14, 88.49]}
PAPER = {s: dict(zip(TARGETS, v)) for s, v in PAPER.items()}


def entity_scores(gold, pred):
    """Micro precision/recall/F1 (in %) over entities; gold and pred are lists of IOB2 tag lists."""
    assert len(gold) == len(pred) and all(len(g) == len(p) for g, p in zip(gold, pred)), "length mismatch"
    kw = {"zero_division": 0}  # no entity predicted (or none in gold): 0, silently
    return {"precision": 100 * precision_score(gold, pred, **kw), "recall": 100 * recall_score(gold, pred, **kw),
            "f1": 100 * f1_score(gold, pred, **kw)}


def read_predictions(path):
    """(gold, pred) tag lists from `token gold pred` lines, blank line between sentences."""
    gold, pred, g, p = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.split()
            if cols:
                g.append(cols[-2])
                p.append(cols[-1])
            elif g:
                gold.append(g)
                pred.append(p)
                g, p = [], []
    if g:
        gold.append(g)
        pred.append(p)
    return gold, pred


def collect(run_dir):
    """{(setting, lang): {seed: test_f1}} from every result.json under run_dir."""
    cells = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "**", "result.json"), recursive=True)):
        with open(path) as f:
            r = json.load(f)
        cells.setdefault((int(r["setting"]), r["lang"]), {})[r["seed"]] = r["test_f1"]
    return cells


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarize(cells):
    """Rows [(setting, name, {lang: (mean, std, n, paper)})] incl. "avg", for the settings and
    targets present."""
    langs = [l for l in TARGETS if any(k[1] == l for k in cells)] + sorted({k[1] for k in cells} - set(TARGETS))
    rows = []
    for s in sorted({k[0] for k in cells}):
        row = {}
        for lang in langs:
            seeds = cells.get((s, lang))
            if seeds:
                row[lang] = (*mean_std(list(seeds.values())), len(seeds), PAPER.get(s, {}).get(lang))
        # average over the targets within each seed that has all of them; none if a target is missing
        common = set.intersection(*(set(cells[(s, l)]) for l in row)) if row else set()
        if len(langs) > 1 and len(row) == len(langs) and common:
            per_seed = [statistics.mean(cells[(s, l)][seed] for l in row) for seed in sorted(common)]
            paper = [PAPER.get(s, {}).get(l) for l in row]
            row["avg"] = (*mean_std(per_seed), len(per_seed), None if None in paper else statistics.mean(paper))
        rows.append((s, SETTINGS.get(s, f"setting {s}"), row))
    return langs + (["avg"] if len(langs) > 1 else []), rows


def fmt_cell(cell):
    if cell is None:
        return "-"
    mean, std, n, paper = cell
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if not math.isnan(std) else "")
    return text + (f" ({paper:.2f}, {mean - paper:+.2f})" if paper is not None else "")


def write_reports(run_dir, cols, rows):
    md = ["Entity-level test F1, mean ± std over fine-tuning seeds (paper value, our delta).", "",
          "| # | setting | " + " | ".join(cols) + " | seeds |", "|---" * (len(cols) + 3) + "|"]
    for s, name, row in rows:
        seeds = max(c[2] for c in row.values())
        md.append(f"| {s} | {name} | " + " | ".join(fmt_cell(row.get(c)) for c in cols) + f" | {seeds} |")
    with open(os.path.join(run_dir, "table1.md.tmp"), "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(os.path.join(run_dir, "table1.md.tmp"), os.path.join(run_dir, "table1.md"))
    with open(os.path.join(run_dir, "table1.csv.tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "name", "lang", "mean_f1", "std_f1", "n_seeds", "paper_f1", "delta"])
        for s, name, row in rows:
            for c in cols:
                if c in row:
                    mean, std, n, paper = row[c]
                    w.writerow([s, name, c, f"{mean:.2f}", "" if math.isnan(std) else f"{std:.2f}", n,
                                "" if paper is None else f"{paper:.2f}", "" if paper is None else f"{mean - paper:+.2f}"])
    os.replace(os.path.join(run_dir, "table1.csv.tmp"), os.path.join(run_dir, "table1.csv"))
    return "\n".join(md)


def plot(run_dir, cols, rows):
    """Grouped bars (ours, with seed std) and the paper's values as black ticks."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 4.5))
    width = 0.8 / len(rows)
    for k, (s, name, row) in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i, c in enumerate(cols) if c in row]
        cells = [row[c] for c in cols if c in row]
        ax.bar(xs, [c[0] for c in cells], width, yerr=[0 if math.isnan(c[1]) else c[1] for c in cells],
               label=f"{s} {name}", capsize=2)
        paper = [(x, c[3]) for x, c in zip(xs, cells) if c[3] is not None]
        ax.scatter([x for x, _ in paper], [v for _, v in paper], marker="_", color="black", s=60, zorder=3,
                   label="paper" if k == 0 and paper else None)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("entity F1")
    lows = [c[0] for _, _, row in rows for c in row.values()]
    ax.set_ylim(max(0, min(lows) - 10), 100)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path = os.path.join(run_dir, "table1.png")
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="directory searched recursively for result.json files")
    p.add_argument("--score", metavar="CONLL", help="score a `token gold pred` predictions file instead")
    args = p.parse_args()
    if args.score:
        print(json.dumps(entity_scores(*read_predictions(args.score))))
        return
    if not args.run_dir:
        p.error("give RUN_DIR or --score FILE")
    cells = collect(args.run_dir)
    if not cells:
        print(f"evaluate.py: error: no result.json under {args.run_dir}", file=sys.stderr)
        sys.exit(2)
    cols, rows = summarize(cells)
    print(write_reports(args.run_dir, cols, rows))
    png = plot(args.run_dir, cols, rows)
    print(f"wrote {os.path.join(args.run_dir, 'table1.md')}, table1.csv" + (", table1.png" if png else ""))


if __name__ == "__main__":
    main()
