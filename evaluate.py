"""Entity-level micro F1 (seqeval, conlleval-compatible, IOB2) and the Table 1 report.

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
"""
import argparse
import csv
import glob
import json
import math
import os
import statistics
import sys

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


def entity_scores(gold, pred):
    """Micro precision/recall/F1 (in %) over entities; gold and pred are lists of IOB2 tag lists."""
    from seqeval.metrics.sequence_labeling import precision_recall_fscore_support  # ~1.5 s of imports (scikit-learn)
    assert len(gold) == len(pred) and all(len(g) == len(p) for g, p in zip(gold, pred)), "length mismatch"
    # one pass over the entities (seqeval's precision_score, recall_score and f1_score each make the same pass; one
    # call halved the scoring time of 2000 sentences here); no entity predicted or in gold: 0, silently
    p, r, f, _ = precision_recall_fscore_support(gold, pred, average="micro", zero_division=0)
    return {"precision": 100 * p, "recall": 100 * r, "f1": 100 * f}


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


def collect(run_dir):
    """{(setting, lang): {seed: test_f1, or None for a run that diverged}} from every result.json
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
        if path.endswith("result.json") and r.get("test_f1") is None:
            raise EvalError(f"{run} was run with --no-test (a recipe grid's run): it has no test F1 for a table")
        if path.endswith("result.json") or key not in cells.get(key[:2], {}):  # a result wins over a divergence marker
            cells.setdefault(key[:2], {})[key[2]] = r.get("test_f1")
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


def summarize(cells, methods=None):
    """(columns, rows): rows are (setting, name, {column: cell}) and a cell is a dict with mean, std
    (NaN for one seed), n (finished seeds), diverged (seeds) and paper (its value, or None: the paper tuned
    an adapter, so settings 3-7 with another PE method (`methods`: {setting: method}) have none). The
    "avg" column averages the targets within each seed that finished all of them."""
    methods = methods or {}
    langs = [l for l in TARGETS if any(k[1] == l for k in cells)] + sorted({k[1] for k in cells} - set(TARGETS))
    cols = langs + (["avg"] if len(langs) > 1 else [])
    rows = []
    for s in sorted({k[0] for k in cells}):
        paper = PAPER.get(s, {}) if methods.get(s, "adapter") == "adapter" else {}
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


def curve_cells(run_dir):
    """The data-size curve: ({(setting, lang, training sentences): {seed: test F1}}, {(setting, lang): sentences of
    the full-size runs}) from run_dir/curve/ and the full-size runs of run_dir (settings 2-5 that also have curve
    runs). One run per key, as in collect; a curve run on as many sentences as the full-size run repeats it (a
    --curve point at or above a target's training-set size): the full-size run is kept."""
    cells, where, full = {}, {}, {}
    for is_full, found in ((True, runs(run_dir)), (False, runs(run_dir, curve=True))):
        for path, r in found.items():
            if "test_f1" not in r or "sizes" not in r:
                continue
            key = (int(r["setting"]), r["lang"], r["sizes"]["train"], r["seed"])
            if key in where and where[key][0] and not is_full:  # a --curve repeat of the full-size run
                continue
            if where.get(key, (None, os.path.dirname(path)))[1] != os.path.dirname(path):
                raise EvalError(f"two runs of setting {key[0]} {key[1]} on {key[2]} sentences, seed {key[3]}: "
                                f"{where[key][1]} and {os.path.dirname(path)}")
            where[key] = (is_full, os.path.dirname(path))
            if is_full:
                full[key[:2]] = key[2]
            cells.setdefault(key[:3], {})[key[3]] = r["test_f1"]
    curved = {(s, lang) for (s, lang, n) in runs_keys(run_dir)}
    return {k: v for k, v in cells.items() if k[:2] in curved}, {k: n for k, n in full.items() if k in curved}


def runs_keys(run_dir):
    return {(int(r["setting"]), r["lang"], r["sizes"]["train"]) for r in runs(run_dir, curve=True).values() if "sizes" in r}


def curve(run_dir):
    """Writes run_dir/curve.csv (setting, lang, training sentences, mean, std, seeds; "avg": the targets' average per
    seed, at each size step where every target has it in a shared seed) and curve.png: test F1 against training
    sentences (log scale), one panel per target and one for the average, mean ± std bands over seeds, the paper's full-data mBERT F1 as a
    marker at the full size. Returns the CSV rows."""
    cells, full = curve_cells(run_dir)
    if not cells:
        return []
    settings = sorted({k[0] for k in cells})
    langs = [l for l in TARGETS if any(k[1] == l for k in cells)] + sorted({k[1] for k in cells} - set(TARGETS))
    sizes = {lang: sorted({k[2] for k in cells if k[1] == lang}) for lang in langs}
    rows = []
    for s in settings:
        for lang in langs:
            for n in sizes[lang]:
                if (s, lang, n) in cells:
                    c = cell(list(cells[(s, lang, n)].values()), None, 0)
                    rows.append([s, lang, n, c["mean"], c["std"], c["n"]])
        shared = set.intersection(*({n for n in sizes[lang] if n != full.get((s, lang))} for lang in langs))
        steps = [[(s, lang, n) for lang in langs] for n in sorted(shared)]  # the curve's sizes every target has
        steps += [[(s, lang, full.get((s, lang))) for lang in langs]]  # each target's full set
        for keys in steps:  # the average over targets
            common = set.intersection(*(set(cells[key]) for key in keys)) if all(key in cells for key in keys) else ()
            if common:  # a size whose targets share no finished seed (a partial or diverged curve) has no average
                c = cell([statistics.mean(cells[key][seed] for key in keys) for seed in sorted(common)], None, 0)
                rows.append([s, "avg", round(statistics.mean(key[2] for key in keys)), c["mean"], c["std"], c["n"]])
    with open(os.path.join(run_dir, "curve.csv.tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "lang", "train_sentences", "mean_f1", "std_f1", "n_seeds"])
        w.writerows([s, lang, n, f"{m:.2f}", "" if math.isnan(sd) else f"{sd:.2f}", k] for s, lang, n, m, sd, k in rows)
    os.replace(os.path.join(run_dir, "curve.csv.tmp"), os.path.join(run_dir, "curve.csv"))
    plot_curve(run_dir, rows, settings, langs + ["avg"], langs)
    return rows


def plot_curve(run_dir, rows, settings, panels, langs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cols = min(4, len(panels) + 1)  # rows of 4 panels; the first free slot holds the legend
    rows_n = -(-(len(panels) + 1) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.0 * cols, 2.9 * rows_n), sharey=True, squeeze=False)
    axes = axes.ravel()
    for ax, lang in zip(axes, panels):
        for k, s in enumerate(settings):
            pts = sorted((n, m, 0 if math.isnan(sd) else sd) for s2, l2, n, m, sd, _ in rows if s2 == s and l2 == lang)
            if not pts:
                continue
            color = f"C{k}"
            xs, ms, sds = zip(*pts)
            ax.plot(xs, ms, marker="o", ms=3, color=color, label=f"{s} {SETTINGS.get(s, s)}")
            ax.fill_between(xs, [m - d for m, d in zip(ms, sds)], [m + d for m, d in zip(ms, sds)], color=color, alpha=0.2)
            paper = PAPER.get(s, {})
            value = paper.get(lang) if lang != "avg" else (  # the paper's average over the same targets
                statistics.mean(paper[l] for l in langs) if all(l in paper for l in langs) else None)
            if value is not None:
                ax.scatter([xs[-1]], [value], marker="*", s=70, color=color, edgecolor="black", linewidth=0.5, zorder=3)
        ax.scatter([], [], marker="*", s=70, color="white", edgecolor="black", label="paper, all data (mBERT)")
        ax.set_xscale("log")
        ax.set_title(lang)
        ax.set_xlabel("training sentences")
        ax.grid(alpha=0.3)
    for ax in axes[::cols]:
        ax.set_ylabel("entity F1 (test)")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[len(panels):]:
        ax.axis("off")
    axes[len(panels)].legend(handles, labels, fontsize=8, loc="center")
    fig.tight_layout()
    path = os.path.join(run_dir, "curve.png")
    fig.savefig(path + ".tmp.png", dpi=110, bbox_inches="tight")
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


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
        md = ["", f"Recipes chosen on dev F1 ({path}): {rec['rule']}", "",
              "| group | settings | chosen | its dev F1 | best cell | cells tried | targets |", "|---" * 7 + "|"]
        for name in [g for g in RECIPE_GROUPS if g in groups] + sorted(set(groups) - set(RECIPE_GROUPS)):
            g, settings = groups[name], sorted(int(s) for s in groups[name]["settings"])
            span = len(settings) > 2 and settings == list(range(settings[0], settings[-1] + 1))
            chosen, best = g.get("chosen"), g.get("best")
            why = f" ({chosen['why']})" if chosen and chosen.get("why") else ""
            picked = f"{recipe(chosen)}{why} | {chosen['dev_f1']:.2f}" if chosen else f"grid unfinished ({len(g['cells'])} cells) | -"
            tried = str(len(g["cells"])) + "".join(f"; {e}" for e in g.get("extensions") or [])
            md.append(f"| {name} | {f'{settings[0]}-{settings[-1]}' if span else ', '.join(map(str, settings))} | {picked} | "
                      + (f"{recipe(best)} ({best['dev_f1']:.2f})" if best else "-") + f" | {tried} | {' '.join(g['targets'])}"
                      + (f" (seed {g['seed']})" if "seed" in g else "") + " |")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise EvalError(f"{path}: damaged ({type(e).__name__}: {e}); rewrite it or delete it") from None
    return md


def write_reports(run_dir, cols, rows):
    rules = {"first": "its first sub-word", "first-content": "its first sub-word that is not a bare word-boundary marker"}
    scored = " or ".join(f"{rules.get(r, r)} (--word-position {r})" for r in word_positions(run_dir))
    md = ["Entity-level test F1, mean ± std over fine-tuning seeds (paper value, our delta). "
          f"A word is scored on {scored}." + (" The paper tuned an adapter only: rows of another PE method have no paper value."
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
        w.writerow(["setting", "name", "lang", "mean_f1", "std_f1", "n_seeds", "diverged", "paper_f1", "delta"])
        for s, name, row in rows:
            for col in cols:
                if col in row:
                    c = row[col]
                    delta = None if c["mean"] is None or c["paper"] is None else c["mean"] - c["paper"]
                    w.writerow([s, name, col, fmt(c["mean"], ".2f"), fmt(c["std"], ".2f"), c["n"], c["diverged"],
                                fmt(c["paper"], ".2f"), fmt(delta, "+.2f")])
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
        shown = [(i + (k - (len(rows) - 1) / 2) * width, row[c]) for i, c in enumerate(cols)
                 if c in row and row[c]["mean"] is not None]
        ax.bar([x for x, _ in shown], [c["mean"] for _, c in shown], width, label=f"{s} {name}", capsize=2,
               yerr=[0 if math.isnan(c["std"]) else c["std"] for _, c in shown])
        paper = [(x, c["paper"]) for x, c in shown if c["paper"] is not None]
        ax.scatter([x for x, _ in paper], [v for _, v in paper], marker="_", color="black", s=60, zorder=3,
                   label="paper" if k == 0 and paper else None)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("entity F1")
    lows = [c["mean"] for _, _, row in rows for c in row.values() if c["mean"] is not None] or [0]
    ax.set_ylim(max(0, min(lows) - 10), 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the axes, not on the bars
    fig.tight_layout()
    path = os.path.join(run_dir, "table1.png")
    fig.savefig(path + ".tmp.png", dpi=120, bbox_inches="tight")
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return path


def sweep(run_dir):
    """A hyper-parameter sweep: one row per configuration (a directory below run_dir that holds <lang>/seed<N>/ runs,
    named by its path), mean dev F1 per target over seeds and its average over targets (test F1 beside it); the best
    configuration per setting and PE method by average dev F1 is starred. A configuration missing a run (target, seed)
    that another of its group has, or with a diverged run, gets no average and no star; one mixing settings or PE
    methods is refused. Writes sweep.md and returns it."""
    configs = {}
    for path, r in runs(run_dir).items():  # (a result wins over a divergence marker: runs lists it later)
        parts = os.path.relpath(path, run_dir).split(os.sep)
        if parts[-3:-1] != [r["lang"], f"seed{r['seed']}"]:
            raise EvalError(f"{path}: not in a <lang>/seed<N> directory of a configuration (lang {r['lang']}, seed {r['seed']})")
        group = (int(r["setting"]), (r.get("pe") or {}).get("method") or run_flag(r, "pe", "adapter"))
        name = os.path.join(*parts[:-3]) if len(parts) > 3 else "."
        config = configs.setdefault(name, (group, {}))
        if config[0] != group:
            raise EvalError(f"{os.path.join(run_dir, name)} mixes settings or PE methods (setting {config[0][0]} "
                            f"{config[0][1]} and setting {group[0]} {group[1]}); one configuration per directory")
        config[1][(r["lang"], r["seed"])] = r if path.endswith("result.json") else None  # None: diverged
    rows = [(group, name, found) for name, (group, found) in sorted(configs.items())]
    wanted = {}
    for group, _, found in rows:
        wanted.setdefault(group, set()).update(found)
    table = []
    for group, name, found in rows:
        done = {k: r for k, r in found.items() if r is not None}
        dev = {lang: statistics.mean(r["dev_f1"] for (l, _), r in done.items() if l == lang) for lang, _ in done}
        complete = set(done) == wanted[group]
        tested = [r["test_f1"] for r in done.values() if r.get("test_f1") is not None]  # --no-test: dev only
        test = statistics.mean(tested) if tested else None
        table.append((group, name, dev, statistics.mean(dev.values()) if complete else None, test,
                      {lang for lang, _ in found} - set(dev), len(found) - len(done)))
    langs = sorted({lang for row in rows for lang, _ in row[2]}, key=lambda l: (l not in TARGETS, TARGETS.index(l) if l in TARGETS else l))
    best = {g: max((r[3] for r in table if r[0] == g and r[3] is not None), default=None) for g in wanted}
    mixed = {s for s, _ in wanted if sum(s == s2 for s2, _ in wanted) > 1}  # settings tuned with several PE methods
    md = ["Dev F1 per configuration (mean over seeds); * = best average dev F1 of its setting"
          + (" and PE method." if mixed else "."), "",
          "| setting | configuration | " + " | ".join(langs) + " | avg dev | avg test |", "|---" * (len(langs) + 4) + "|"]
    for (setting, method), name, dev, avg, test, failed, diverged in table:
        note = f" ({diverged} diverged)" if diverged else "" if avg is not None else " (runs missing)"
        label = f"{setting} {PE_NAMES.get(method, method)}" if setting in mixed else setting
        md.append(f"| {label} | {name}{' *' if avg is not None and avg == best[(setting, method)] else ''}{note} | " + " | ".join(
            f"{dev[l]:.2f}" if l in dev else "diverged" if l in failed else "-" for l in langs)
                  + f" | {'-' if avg is None else f'{avg:.2f}'} | {'-' if test is None else f'{test:.2f}'} |")
    with open(os.path.join(run_dir, "sweep.md.tmp"), "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(os.path.join(run_dir, "sweep.md.tmp"), os.path.join(run_dir, "sweep.md"))
    return "\n".join(md)


def spread(run_dirs):
    """Priming-seed spread: run_dirs are the same grid primed with different seeds. Per setting, each
    run's average over targets (mean +- std over fine-tuning seeds), then the mean +- sample std of
    those averages across runs. Returns a markdown table."""
    avgs = {}
    for d in run_dirs:
        cols, rows = summarize(collect(d))
        for s, name, row in rows:
            if "avg" in row and row["avg"]["mean"] is not None:
                avgs.setdefault((s, name), {})[d] = row["avg"]
    md = ["Average test F1 over targets per priming run (mean ± std over fine-tuning seeds), and across runs.", "",
          "| # | setting | " + " | ".join(run_dirs) + " | across runs |", "|---" * (len(run_dirs) + 3) + "|"]
    for (s, name), per_run in sorted(avgs.items()):
        means = [c["mean"] for c in per_run.values()]
        across = f"{statistics.mean(means):.2f}" + (f" ± {statistics.stdev(means):.2f}" if len(means) > 1 else "")
        md.append(f"| {s} | {name} | " + " | ".join(
            "-" if d not in per_run else f"{per_run[d]['mean']:.2f}" + (
                "" if math.isnan(per_run[d]["std"]) else f" ± {per_run[d]['std']:.2f}") for d in run_dirs)
                  + f" | {across} (n={len(means)}) |")
    return "\n".join(md)


def averages(run_dir, setting):
    """The setting's average over targets in run_dir (a cell: mean ± std over fine-tuning seeds, with the
    `targets` averaged and the PE `method` tuned), or None."""
    methods = pe_methods(run_dir)
    cols, rows = summarize(collect(run_dir), methods)
    for s, _, row in rows:
        if s == setting and "avg" in row and row["avg"]["mean"] is not None:
            return dict(row["avg"], targets=tuple(cols[:-1]), method=methods.get(s, "adapter"))
    return None


def across(cells):
    means = [c["mean"] for c in cells]
    return f"{statistics.mean(means):.2f}" + (f" ± {statistics.stdev(means):.2f}" if len(means) > 1 else "") + f" (n={len(means)})"


def compare(columns):
    """Per setting, each column's average over its targets (columns: (label, [run dirs]); several dirs = the same
    grid primed with other seeds: mean ± sample std of their averages) beside the paper's average over the same
    targets; "-" for the paper where the columns average different targets or tune another PE method."""
    md = ["| # | setting | paper (mBERT, full data) | " + " | ".join(label for label, _ in columns) + " |",
          "|---" * (len(columns) + 3) + "|"]
    for s, name in SETTINGS.items():
        cells, found_all = [], []
        for _, dirs in columns:
            found = [c for c in (averages(d, s) for d in dirs) if c]
            cells.append(across(found) if found else "-")
            found_all += found
        methods = {c["method"] for c in found_all} or {"adapter"}
        targets = {c["targets"] for c in found_all} or {tuple(TARGETS)}
        if len(methods) == 1:
            name = setting_name(s, methods.pop())
        elif s >= 3:
            name = "PE tuning" if s == 3 else name.replace("-> AT", "-> PE")
        langs = targets.pop() if len(targets) == 1 else ()
        paper = (f"{statistics.mean(PAPER[s][t] for t in langs):.2f}"
                 if name == SETTINGS[s] and langs and all(t in PAPER[s] for t in langs) else "-")
        md.append(f"| {s} | {name} | {paper} | " + " | ".join(cells) + " |")
    return "\n".join(md)


def ablation(rows):
    """Rows (label, setting, [run dirs]): the setting's average over targets per run dir (one per priming seed),
    mean ± sample std across them, trainable parameters, and the priming run's wall time (mean over the dirs'
    priming runs of that setting, from prime/*/config.json when the dir holds it)."""
    width = max(len(dirs) for _, _, dirs in rows)
    md = ["| row | setting | trainable params | " + " | ".join(f"run {k + 1}" for k in range(width)) +
          " | across runs | priming time |", "|---" * (width + 5) + "|"]
    for label, setting, dirs in rows:
        cells = [averages(d, setting) for d in dirs]
        results = [(d, read_json(p)) for d in dirs for p in glob.glob(os.path.join(d, "**", "result.json"), recursive=True)]
        trainable = {r["trainable_params"] for _, r in results if r["setting"] == setting}
        inits = {(d, os.path.basename(os.path.normpath(r["init"]))) for d, r in results
                 if r["setting"] == setting and r.get("init")}
        configs = [os.path.join(d, "prime", name, "config.json") for d, name in sorted(inits)]
        primings = [t for t in (read_json(p).get("wall_time_s") for p in configs if os.path.isfile(p)) if t]
        md.append(f"| {label} | {setting} | {', '.join(f'{t:,}' for t in sorted(trainable)) or '-'} | " + " | ".join(
            "-" if c is None else f"{c['mean']:.2f}" + ("" if math.isnan(c["std"]) else f" ± {c['std']:.2f}") for c in cells)
            + " | -" * (width - len(cells)) + f" | {across([c for c in cells if c]) if any(cells) else '-'} | "
            + (f"{statistics.mean(primings) / 60:.1f} min" if primings else "-") + " |")
    return "\n".join(md)


def priming_report(prime_dirs):
    """Checks on priming runs from their log.jsonl (and model.safetensors when present): the outer loss
    (query loss; the training loss for --mode ft) over the first and last 5 meta-steps, the inner loop's
    support loss at its first and last step (mean over tasks), and the norm of the adapter's up-projection,
    which starts at zero and is changed only by outer (meta-)updates. Returns a markdown table."""
    md = ["| priming run | steps | outer loss, first 5 steps | last 5 steps | inner loop: support loss at step 1 | "
          "at step S | adapter up-projection norm |", "|---" * 7 + "|"]
    for d in prime_dirs:
        log = read_jsonl(os.path.join(d, "log.jsonl"))
        if not log:  # a run that has not finished its first meta-step yet
            md.append(f"| {d} | 0 |" + " - |" * 5)
            continue
        first, last = (statistics.mean(r["loss"] for r in part) for part in (log[:5], log[-5:]))
        support = [t["support_loss"] for r in log for t in r["tasks"] if t.get("support_loss")]
        inner = [f"{statistics.mean(s[i] for s in support):.3f}" if support else "-" for i in (0, -1)]
        norm = "-"
        if os.path.exists(os.path.join(d, "model.safetensors")):
            from safetensors import safe_open
            with safe_open(os.path.join(d, "model.safetensors"), "pt") as ckpt:
                if "adapter.up.weight" in ckpt.keys():  # LoRA and BitFit checkpoints have no adapter
                    norm = f"{ckpt.get_tensor('adapter.up.weight').norm().item():.4f}"
        md.append(f"| {d} | {len(log)} | {first:.3f} | {last:.3f} | {inner[0]} | {inner[1]} | {norm} |")
    return "\n".join(md)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="directory searched recursively for result.json files")
    p.add_argument("--score", metavar="CONLL", help="score a `token gold pred` predictions file instead")
    p.add_argument("--sweep", action="store_true", help="every directory below RUN_DIR holding <lang>/seed<N>/ runs "
                                                        "is a configuration: compare their dev F1 (writes RUN_DIR/sweep.md)")
    p.add_argument("--spread", nargs="+", metavar="RUN_DIR", help="the same grid primed with different seeds: "
                                                                  "per-run averages and their spread (printed)")
    p.add_argument("--priming", nargs="+", metavar="PRIME_DIR", help="summarize priming runs (printed)")
    p.add_argument("--compare", nargs="+", metavar="LABEL=DIR[,DIR...]",
                   help="per-setting averages beside the paper's, one column per LABEL (several dirs: priming seeds)")
    p.add_argument("--ablation", nargs="+", metavar="LABEL=DIR[,DIR...]:SETTING",
                   help="one row per LABEL: the SETTING's average in each DIR (priming seeds) and across them")
    args = p.parse_args()

    def labelled(arg, setting):  # LABEL=DIR[,DIR...] (with setting: ...:SETTING) -> (label, dirs, setting)
        label, _, dirs = arg.partition("=")
        dirs, _, number = dirs.rpartition(":") if setting else (dirs, "", "")
        dirs = [d for d in dirs.split(",") if d]
        if not label or not dirs or (setting and not number.isdigit()):
            p.error(f"{arg!r}: expected LABEL=DIR[,DIR...]" + (":SETTING" if setting else ""))
        for d in dirs:
            if not os.path.isdir(d):
                p.error(f"{arg!r}: no directory {d}")
        return label, dirs, int(number) if setting else None
    if args.compare:
        print(compare([labelled(c, False)[:2] for c in args.compare]))
        return
    if args.ablation:
        print(ablation([(label, setting, dirs) for label, dirs, setting in (labelled(a, True) for a in args.ablation)]))
        return
    if args.priming:
        print(priming_report(args.priming))
        return
    if args.spread:
        print(spread(args.spread))
        return
    if args.score:
        print(json.dumps(entity_scores(*read_predictions(args.score))))
        return
    if not args.run_dir:
        p.error("give RUN_DIR or --score FILE")
    if args.sweep:
        print(sweep(args.run_dir))
        return
    cells = collect(args.run_dir)
    if not cells:
        print(f"evaluate.py: error: no result.json under {args.run_dir}", file=sys.stderr)
        sys.exit(2)
    cols, rows = summarize(cells, pe_methods(args.run_dir))
    print(write_reports(args.run_dir, cols, rows))
    png = plot(args.run_dir, cols, rows)
    print(f"wrote {os.path.join(args.run_dir, 'table1.md')}, table1.csv" + (", table1.png" if png else ""))
    for line in late_peaks(args.run_dir):
        print(line)
    if curve(args.run_dir):
        print(f"wrote {os.path.join(args.run_dir, 'curve.csv')}, curve.png (the data-size curve)")


if __name__ == "__main__":
    try:
        main()
    except EvalError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
