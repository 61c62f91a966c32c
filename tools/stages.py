"""Where a run_table1.sh grid's time went: OUT/times.tsv (one line per unit: end, unit, seconds, exit code, --jobs) by
stage, and for fine-tuning units the part outside training and scoring (the unit's seconds minus its runs' wall_time_s
from result.json: imports, model loading, caching body outputs). With --jobs N, N units run at once, so the wall time
is about the unit-minutes / N.

    python tools/stages.py results/mini-v2
"""
import glob
import json
import os
import sys

STAGES = [("priming", "prime-"), ("recipe grids", "recipe-"), ("setting 1: full FT", "s1"), ("setting 2: head", "s2"),
          ("setting 3: PE tuning", "s3"), ("settings 4-7: primed PE tuning", ("s4", "s5", "s6", "s7"))]


def units(out):
    """[(unit, seconds)] and the --jobs of OUT/times.tsv's first line."""
    with open(os.path.join(out, "times.tsv")) as f:
        lines = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [(unit, int(sec)) for _, unit, sec, *_ in lines], lines[0][-1]


def runs_seconds(out, unit):
    """The wall_time_s of a fine-tuning unit's finished runs (unit sS-LANG, sS-LANG+LANG... or sS), or None."""
    setting, _, langs = unit.partition("-")
    if not setting[1:].isdigit():
        return None
    files = [f for lang in (langs.split("+") if langs else ["*"])
             for f in glob.glob(os.path.join(out, "finetune", setting, lang, "seed*", "result.json"))]
    return sum(json.load(open(f))["wall_time_s"] for f in files) if files else None


def main(out):
    rows, jobs = units(out)
    print(f"{out}: {len(rows)} units, {sum(sec for _, sec in rows) / 60:.1f} unit-min (--jobs {jobs})")
    for name, prefix in STAGES:
        mine = [(u, s) for u, s in rows if u.startswith(prefix)]
        if not mine:
            continue
        other = [s - r for s, r in ((s, runs_seconds(out, u)) for u, s in mine) if r is not None]
        line = f"  {name}: {len(mine)} units, {sum(s for _, s in mine) / 60:.1f} unit-min"
        if other:
            line += f"; outside training and scoring {sum(other) / 60:.1f} unit-min ({sum(other) / len(other):.1f} s per unit)"
        print(line)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isfile(os.path.join(sys.argv[1], "times.tsv")):
        sys.exit("usage: python tools/stages.py OUT (a run_table1.sh output directory with times.tsv)")
    main(sys.argv[1])
