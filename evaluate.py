"""Reading runs and Table 1 (table1.md/.csv): entity-level micro F1 for NER (seqeval, conlleval-compatible, IOB2),
token accuracy for part-of-speech tagging (--task pos: tasks.py), as each run recorded.

    python evaluate.py runs/mini                          # every result.json below -> table1.md/.csv/.png
    python evaluate.py runs/full                          # + curve.csv/.png when runs/full/curve holds a data-size curve
                                                          # (+ the recipes of runs/full/recipes.json under the table)
    python evaluate.py --score runs/mini/finetune/s4/hi/seed1/predictions.conll   # re-score one file
    python evaluate.py --sweep runs/grid                  # each directory holding <lang>/seed<N>/: dev F1 table
    python evaluate.py --spread runs/mini runs/mini-prime2   # the same grid primed with other seeds
    python evaluate.py --priming runs/mini/prime/*        # what priming did: losses, adapter movement

A cell is mean +- sample std (ddof=1) over fine-tuning seeds, with the paper's value and our delta;
"diverged" where every seed diverged (a diverged.json instead of a result.json), "[k diverged]" where
k runs did. The average column averages the targets within each seed that finished all of them, then over
seeds ("-" where no seed did); its paper value averages the paper's numbers for the same targets.

The figures, the curve, the other modes and the command line are in report.py, which imports this file (never the
reverse: this file imports only tasks.py); `python evaluate.py` forwards to it.
"""
import csv
import glob
import json
import math
import os
import statistics

from tasks import entity_scores  # noqa: F401 (evaluate.entity_scores: scoring NER predictions)

SETTINGS = {1: "Full FT", 2: "HT", 3: "AT", 4: "Meta Priming -> AT", 5: "FT Priming -> AT",
            6: "MP [MAML Loop] -> AT", 7: "MP [1 Inner Step] -> AT"}
PE_NAMES = {"adapter": "AT", "lora": "LoRA", "bitfit": "BitFit"}  # settings 3-7 tune the PE method of --pe
TARGETS = ["hi", "af", "az", "lt", "et", "nl"]
PAPER = {  # Table 1 of Gheini, Ma & May: entity-level F1 (mBERT, full WikiAnn data)
    1: [86.73, 91.29, 87.70, 89.43, 90.88, 91.47], 2: [72.71, 79.11, 74.24, 78.34, 81.23, 78.90],
    3: [77.76, 84.10, 81.08, 83.00, 85.13, 83.89], 4: [81.25, 88.23, 83.29, 86.30, 87.18, 88.97],
    5: [79.55, 87.78, 82.28, 85.79, 86.56, 88.82], 6: [80.18, 85.82, 81.47, 85.73, 85.86, 88.13],
    7: [80.23, 86.46, 80.35, 84.43, 86.14, 88.49]}
PAPER = {s: dict(zip(TARGETS, v)) for s, v in PAPER.items()}


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


class EvalError(Exception):
    """Results that cannot be tabulated as asked (one line for the user; exit code 2)."""


def read_json(path):
    """A result file, or EvalError naming it when it is damaged (truncated by a crash, a full disk, a bad copy)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: damaged ({e}); delete it and rerun the command that made it "
                        "(run_table1.sh and finetune.py redo a run without a result.json)") from None


def read_jsonl(path):
    """The records of a log (one JSON object per line). A crash can leave the last line half-written: it is
    left out; a damaged line before the end is an EvalError naming the file and line."""
    try:
        with open(path) as f:
            lines = [line for line in f.read().split("\n") if line.strip()]
    except OSError as e:
        raise EvalError(f"{path}: cannot read ({e.strerror})") from None
    records = []
    for k, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if k < len(lines):
                raise EvalError(f"{path}:{k}: damaged line; delete the run's directory and rerun it") from None
    return records


def runs(run_dir, curve=False):
    """{path: record} of every result.json and finetune diverged.json under run_dir: those of Table 1, or with
    `curve` those of the data-size curve (below run_dir/curve/, kept out of Table 1). The recipe grids' runs
    (run_dir/recipes/, recipe.py) are never in either."""
    found = {}
    for name in ("diverged.json", "result.json"):
        for path in sorted(glob.glob(os.path.join(run_dir, "**", name), recursive=True)):
            top = os.path.relpath(path, run_dir).split(os.sep)[0]
            if top == "recipes" or (top == "curve") != curve:
                continue
            r = read_json(path)
            if "setting" in r:  # prime.py's diverged.json has no cell
                found[path] = r
    return found


def score(r, split="test"):
    """A run's test (or dev) score in its task's metric: F1 (NER; runs before --task) or accuracy."""
    return r.get(f"{split}_{r.get('metric', 'f1')}")


def task_of(run_dir):
    """The task of the runs under run_dir (runs made before --task were NER); a directory mixing tasks is refused."""
    found = {r.get("task") or run_flag(r, "task", "ner") for r in runs(run_dir).values()} or {"ner"}
    if len(found) > 1:
        raise EvalError(f"{run_dir} mixes tasks ({', '.join(sorted(found))}); tabulate each task's grid on its own")
    return found.pop()


def metric_of(run_dir):
    """The metric the runs under run_dir report (f1 or accuracy; one per directory, as its task)."""
    found = {r.get("metric", "f1") for r in runs(run_dir).values() if "lang" in r} or {"f1"}
    if len(found) > 1:
        raise EvalError(f"{run_dir} mixes metrics ({', '.join(sorted(found))}); tabulate each task's grid on its own")
    return found.pop()


def collect(run_dir):
    """{(setting, lang): {seed: test score, or None for a run that diverged}} from every result.json
    (and diverged.json) under run_dir. One run per (setting, lang, seed): a directory holding several grids
    (e.g. two primings side by side) is refused with the conflicting paths; tabulate each grid on its own."""
    cells, where = {}, {}
    for path, r in runs(run_dir).items():
        key = (int(r["setting"]), r["lang"], r["seed"])
        run = os.path.dirname(path)
        if key in where and where[key] != run:
            raise EvalError(f"{run_dir} holds two runs of setting {key[0]} {key[1]} seed {key[2]}: {where[key]} and {run}; "
                            "give one grid's directory (e.g. runs/mini, not runs)")
        where[key] = run
        if path.endswith("result.json") and score(r) is None:
            raise EvalError(f"{run} was run with --no-test (a recipe grid's run): it has no test score for a table")
        if path.endswith("result.json") or key not in cells.get(key[:2], {}):  # a result wins over a divergence marker
            cells.setdefault(key[:2], {})[key[2]] = score(r)
    return cells


def late_peaks(run_dir):
    """One line per setting where most runs had their best dev F1 in their LAST epoch (more epochs would likely
    help: the recipe is under-trained there), else nothing. Curve runs are left out (their recipes scale by steps)."""
    last = {}
    for r in runs(run_dir).values():
        if r.get("epochs", 1) > 1 and "best_epoch" in r:
            last.setdefault(int(r["setting"]), []).append(r["best_epoch"] == r["epochs"])
    return [f"evaluate.py: setting {s}: the best dev epoch was the last one in {sum(v)} of {len(v)} runs: under-trained? "
            "try more --epochs (docs/usage.md)" for s, v in sorted(last.items()) if 2 * sum(v) > len(v)]


def run_flag(r, name, default):
    """A run's flag: from result.json's config, or a diverged.json's identity; runs made before the flag had `default`."""
    return (r.get("config") or r.get("identity") or {}).get(name, default)


def word_positions(run_dir):
    """The --word-position rules of the runs under run_dir (runs made before the flag existed used "first")."""
    return sorted({run_flag(r, "word_position", "first") for r in runs(run_dir).values()})


def pe_methods(run_dir):
    """{setting: PE method} of settings 3-7 under run_dir (runs made before --pe existed tuned the adapter); one
    method per setting: a directory mixing them is refused."""
    methods = {}
    for path, r in runs(run_dir).items():
        setting, method = int(r["setting"]), (r.get("pe") or {}).get("method") or run_flag(r, "pe", "adapter")
        if setting >= 3 and methods.setdefault(setting, method) != method:
            raise EvalError(f"{run_dir} mixes PE methods in setting {setting} ({methods[setting]} and {method}, "
                            f"e.g. {path}); tabulate each method's grid on its own")
    return methods


def setting_name(setting, method="adapter"):
    """Table 1's name of a setting; settings 3-7 with LoRA or BitFit in place of the adapter say so."""
    name = SETTINGS.get(setting, f"setting {setting}")
    if setting < 3 or method == "adapter":
        return name
    return f"{PE_NAMES[method]} tuning" if setting == 3 else name.replace("-> AT", f"-> {PE_NAMES[method]}")


def summarize(cells, methods=None, task="ner"):
    """(columns, rows): rows are (setting, name, {column: cell}) and a cell is a dict with mean, std
    (NaN for one seed), n (finished seeds), diverged (seeds) and paper (its value, or None: the paper tuned
    an adapter on NER, so settings 3-7 with another PE method (`methods`: {setting: method}) and other tasks have
    none). The "avg" column averages the targets within each seed that finished all of them."""
    methods = methods or {}
    langs = [l for l in TARGETS if any(k[1] == l for k in cells)] + sorted({k[1] for k in cells} - set(TARGETS))
    cols = langs + (["avg"] if len(langs) > 1 else [])
    rows = []
    for s in sorted({k[0] for k in cells}):
        paper = PAPER.get(s, {}) if methods.get(s, "adapter") == "adapter" and task == "ner" else {}
        row = {lang: cell([v for v in cells[(s, lang)].values() if v is not None], paper.get(lang),
                          sum(v is None for v in cells[(s, lang)].values())) for lang in langs if (s, lang) in cells}
        if "avg" in cols and len(row) == len(langs):
            common = set.intersection(*({k for k, v in cells[(s, l)].items() if v is not None} for l in langs))
            per_seed = [statistics.mean(cells[(s, l)][seed] for l in langs) for seed in sorted(common)]
            paper_avg = None if any(l not in paper for l in langs) else statistics.mean(paper[l] for l in langs)
            row["avg"] = cell(per_seed, paper_avg, sum(c["diverged"] for c in row.values()))
        rows.append((s, setting_name(s, methods.get(s, "adapter")), row))
    return cols, rows


def cell(values, paper, diverged):
    mean = statistics.mean(values) if values else None
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": mean, "std": std, "n": len(values), "paper": paper, "diverged": diverged}


def fmt_cell(c):
    if c is None:
        return "not run"
    if c["mean"] is None:  # no seed finished (avg: no seed finished every target)
        return "diverged" if c["diverged"] else "-"
    text = f"{c['mean']:.2f}" + (f" ± {c['std']:.2f}" if not math.isnan(c["std"]) else "")
    text += f" ({c['paper']:.2f}, {c['mean'] - c['paper']:+.2f})" if c["paper"] is not None else ""
    return text + (f" [{c['diverged']} diverged]" if c["diverged"] else "")


RECIPE_GROUPS = ["full", "head", "adapter", "lora", "bitfit", "inner-lr-meta", "inner-lr-maml", "inner-lr-one-step"]


def recipes_report(run_dir):
    """Markdown lines on run_dir/recipes.json (how each fine-tuning group's lr and epochs were chosen on dev F1): the
    rule, then one row per group: its settings, the chosen cell and its dev F1, the best cell, the cells tried (and
    the grid's extensions), the targets. [] without a recipes.json; a damaged one is an EvalError naming it."""
    path = os.path.join(run_dir, "recipes.json")
    if not os.path.exists(path):
        return []
    rec = read_json(path)
    recipe = lambda c: (f"inner lr {c['inner_lr']:g}, " if "inner_lr" in c else "") + f"lr {c['lr']:g} x {c['epochs']} epochs"
    try:
        if rec["version"] != 1:
            raise ValueError(f"version {rec['version']}, expected 1")
        groups = rec["groups"]
        metric = "accuracy" if any(c.get("metric") == "accuracy" for g in groups.values() for c in g["cells"]) else "F1"
        md = ["", f"Recipes chosen on dev {metric} ({path}): {rec['rule']}", "",
              f"| group | settings | chosen | its dev {metric} | best cell | cells tried | targets |", "|---" * 7 + "|"]
        for name in [g for g in RECIPE_GROUPS if g in groups] + sorted(set(groups) - set(RECIPE_GROUPS)):
            g, settings = groups[name], sorted(int(s) for s in groups[name]["settings"])
            span = len(settings) > 2 and settings == list(range(settings[0], settings[-1] + 1))
            chosen, best = g.get("chosen"), g.get("best")
            why = f" ({chosen['why']})" if chosen and chosen.get("why") else ""
            dev = lambda c: c.get("dev", c.get("dev_f1"))  # the task's dev metric ("dev_f1": before --task)
            picked = f"{recipe(chosen)}{why} | {dev(chosen):.2f}" if chosen else f"grid unfinished ({len(g['cells'])} cells) | -"
            tried = str(len(g["cells"])) + "".join(f"; {e}" for e in g.get("extensions") or [])
            md.append(f"| {name} | {f'{settings[0]}-{settings[-1]}' if span else ', '.join(map(str, settings))} | {picked} | "
                      + (f"{recipe(best)} ({dev(best):.2f})" if best else "-") + f" | {tried} | {' '.join(g['targets'])}"
                      + (f" (seed {g['seed']})" if "seed" in g else "") + " |")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise EvalError(f"{path}: damaged ({type(e).__name__}: {e}); rewrite it or delete it") from None
    return md


def write_reports(run_dir, cols, rows):
    rules = {"first": "its first sub-word", "first-content": "its first sub-word that is not a bare word-boundary marker",
             "mean": "the mean of all its sub-words' body outputs"}
    scored = " or ".join(f"{rules.get(r, r)} (--word-position {r})" for r in word_positions(run_dir))
    task, metric = task_of(run_dir), metric_of(run_dir)
    title = "Entity-level test F1" if metric == "f1" else "Test token accuracy"
    md = [f"{title}{'' if task == 'ner' else f' (--task {task})'}, mean ± std over fine-tuning seeds"
          + (" (paper value, our delta)" if task == "ner" else "") + f". A word is scored on {scored}." + (" The paper tuned an adapter only: rows of another PE method have no paper value."
                                              if any(name != SETTINGS.get(s) for s, name, _ in rows) else ""), "",
          "| # | setting | " + " | ".join(cols) + " | seeds |", "|---" * (len(cols) + 3) + "|"]
    for s, name, row in rows:
        ns = sorted({c["n"] for col, c in row.items() if col != "avg"})  # "2-3": a partial grid, whose average uses the seeds all targets have
        seeds = f"{ns[0]}-{ns[-1]}" if len(ns) > 1 else ns[0]
        md.append(f"| {s} | {name} | " + " | ".join(fmt_cell(row.get(c)) for c in cols) + f" | {seeds} |")
    md += recipes_report(run_dir)
    with open(os.path.join(run_dir, "table1.md.tmp"), "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(os.path.join(run_dir, "table1.md.tmp"), os.path.join(run_dir, "table1.md"))
    fmt = lambda x, spec: "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
    with open(os.path.join(run_dir, "table1.csv.tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "name", "lang", f"mean_{metric}", f"std_{metric}", "n_seeds", "diverged", f"paper_{metric}", "delta"])
        for s, name, row in rows:
            for col in cols:
                if col in row:
                    c = row[col]
                    delta = None if c["mean"] is None or c["paper"] is None else c["mean"] - c["paper"]
                    w.writerow([s, name, col, fmt(c["mean"], ".2f"), fmt(c["std"], ".2f"), c["n"], c["diverged"],
                                fmt(c["paper"], ".2f"), fmt(delta, "+.2f")])
    os.replace(os.path.join(run_dir, "table1.csv.tmp"), os.path.join(run_dir, "table1.csv"))
    return "\n".join(md)


if __name__ == "__main__":  # the command line lives in report.py, which imports this file (as `evaluate`): no cycle
    import report

    report.cli()
