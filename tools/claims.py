"""The paper's claims (a)-(d), read per target on a Table 1 grid and the same grid primed with other seeds: each
claim's average gap (mean over fine-tuning seeds, then over targets), per priming run and across runs, and on how many
(target, priming run) pairs it holds. Settings 1-3 are not primed, so they come from the first directory that has them.

    python tools/claims.py results/mini-v3 results/mini-v3-prime2 results/mini-v3-prime3

(a) meta priming (4) > adapter tuning (3); (b) 4 > FT priming (5); (c) 4 > one inner step (7) and 4 > MAML loop (6);
(d) full FT (1) the best and head tuning (2) the worst of the settings run.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import collect, summarize, task_of  # noqa: E402

PAIRS = [("(a)", 4, 3), ("(b)", 4, 5), ("(c)", 4, 7), ("(c)", 4, 6)]


def target_means(run_dir):
    """{setting: {lang: mean test score over fine-tuning seeds}} (targets only; no average column)."""
    cols, rows = summarize(collect(run_dir), task=task_of(run_dir))
    return {s: {lang: c["mean"] for lang, c in row.items() if lang != "avg" and c["mean"] is not None}
            for s, _, row in rows}


def claims(run_dirs):
    """Markdown lines: one row per claim, then (d)."""
    grids = [target_means(d) for d in run_dirs]
    unprimed = {s: next((g[s] for g in grids if s in g), None) for s in (1, 2, 3)}
    per_run = [{**{s: v for s, v in unprimed.items() if v}, **{s: g[s] for s in (4, 5, 6, 7) if s in g}} for g in grids]
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    md = ["| claim | gap | " + " | ".join(names) + " | across runs | pairs where it holds |", "|---" * (len(names) + 4) + "|"]
    for claim, a, b in PAIRS:
        gaps, wins, n = [], 0, 0
        cells = []
        for g in per_run:
            if a not in g or b not in g:
                cells.append("-")
                continue
            langs = sorted(set(g[a]) & set(g[b]))
            diffs = [g[a][l] - g[b][l] for l in langs]
            gap = statistics.mean(diffs)
            gaps.append(gap)
            wins, n = wins + sum(d > 0 for d in diffs), n + len(diffs)
            cells.append(f"{gap:+.2f} ({sum(d > 0 for d in diffs)}/{len(diffs)})")
        across = "-" if not gaps else f"{statistics.mean(gaps):+.2f}" + (f" ± {statistics.stdev(gaps):.2f}" if len(gaps) > 1 else "")
        md.append(f"| {claim} | {a} - {b} | " + " | ".join(cells) + f" | {across} | {wins} of {n} |")
    top = bottom = n = 0
    for g in per_run:
        if 1 not in g or 2 not in g:
            continue
        for lang in g[1]:
            scores = {s: g[s][lang] for s in g if lang in g[s]}
            n += 1
            top += max(scores, key=scores.get) == 1
            bottom += min(scores, key=scores.get) == 2
    md += ["", f"(d) full FT (1) the best of the settings run on {top} of {n} (target, priming run) pairs; "
               f"head tuning (2) the worst on {bottom} of {n}."]
    return md


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="Table 1 grids: the first with settings 1-3, the others primed with other seeds")
    args = ap.parse_args()
    for d in args.run_dirs:
        if not os.path.isdir(d):
            sys.exit(f"claims.py: {d} is not a directory")
    print("\n".join(claims(args.run_dirs)))
