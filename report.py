"""The reports beyond Table 1's text, and the command line of `python evaluate.py`: Table 1's figure, the data-size
curve (curve.csv/.png), --sweep, --spread, --compare, --ablation, --priming. It stands on evaluate.py (scoring, reading
runs, Table 1's md/csv); evaluate.py imports nothing of ours, and its `__main__` forwards here, so imports go one way.
Run it as `python evaluate.py ...` (the commands: evaluate.py's docstring, `python evaluate.py --help`).
"""
import argparse
import csv
import glob
import json
import math
import os
import statistics
import sys

import evaluate
from evaluate import (PAPER, PE_NAMES, SETTINGS, TARGETS, EvalError, cell, collect, entity_scores, late_peaks, pe_methods,
                      read_json, read_jsonl, read_predictions, run_flag, runs, score, setting_name, summarize, task_of,
                      metric_of, write_reports)


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
    ax.set_ylabel("entity F1" if metric_of(run_dir) == "f1" else "token accuracy")
    lows = [c["mean"] for _, _, row in rows for c in row.values() if c["mean"] is not None] or [0]
    ax.set_ylim(max(0, min(lows) - 10), 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the axes, not on the bars
    fig.tight_layout()
    path = os.path.join(run_dir, "table1.png")
    fig.savefig(path + ".tmp.png", dpi=120, bbox_inches="tight")
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return path

def curve_cells(run_dir):
    """The data-size curve: ({(setting, lang, training sentences): {seed: test F1}}, {(setting, lang): sentences of
    the full-size runs}) from run_dir/curve/ and the full-size runs of run_dir (settings 2-5 that also have curve
    runs). One run per key, as in collect; a curve run on as many sentences as the full-size run repeats it (a
    --curve point at or above a target's training-set size): the full-size run is kept."""
    cells, where, full = {}, {}, {}
    for is_full, found in ((True, runs(run_dir)), (False, runs(run_dir, curve=True))):
        for path, r in found.items():
            if score(r) is None or "sizes" not in r:
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
            cells.setdefault(key[:3], {})[key[3]] = score(r)
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
            paper = PAPER.get(s, {}) if task_of(run_dir) == "ner" else {}
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
        ax.set_ylabel(("entity F1" if metric_of(run_dir) == "f1" else "token accuracy") + " (test)")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[len(panels):]:
        ax.axis("off")
    axes[len(panels)].legend(handles, labels, fontsize=8, loc="center")
    fig.tight_layout()
    path = os.path.join(run_dir, "curve.png")
    fig.savefig(path + ".tmp.png", dpi=110, bbox_inches="tight")
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


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
        dev = {lang: statistics.mean(score(r, "dev") for (l, _), r in done.items() if l == lang) for lang, _ in done}
        complete = set(done) == wanted[group]
        tested = [score(r) for r in done.values() if score(r) is not None]  # --no-test: dev only
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
        cols, rows = summarize(collect(d), task=task_of(d))
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
    cols, rows = summarize(collect(run_dir), methods, task_of(run_dir))
    for s, _, row in rows:
        if s == setting and "avg" in row and row["avg"]["mean"] is not None:
            return dict(row["avg"], targets=tuple(cols[:-1]), method=methods.get(s, "adapter"), task=task_of(run_dir))
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
        langs = targets.pop() if len(targets) == 1 and {c["task"] for c in found_all} <= {"ner"} else ()
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


def main(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py", description=evaluate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = p.parse_args(argv)

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
    cols, rows = summarize(cells, pe_methods(args.run_dir), task_of(args.run_dir))
    print(write_reports(args.run_dir, cols, rows))
    png = plot(args.run_dir, cols, rows)
    print(f"wrote {os.path.join(args.run_dir, 'table1.md')}, table1.csv" + (", table1.png" if png else ""))
    for line in late_peaks(args.run_dir):
        print(line)
    if curve(args.run_dir):
        print(f"wrote {os.path.join(args.run_dir, 'curve.csv')}, curve.png (the data-size curve)")


def cli():
    """`python evaluate.py ...`: main, with an EvalError as one line and exit code 2."""
    try:
        main()
    except EvalError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
