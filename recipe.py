"""Recipes chosen on dev F1 (dev accuracy for --task pos): the grid behind `run_table1.sh --recipe auto`. The paper gives no fine-tuning recipe,
and a guessed one can under-train the unprimed baselines (flattering priming), so each fine-tuning group tries a
grid of learning rate x epoch budget on the UNPRIMED body, and each inner-loop priming a grid of inner learning rates,
on the first targets with one seed; test sets are never read (finetune.py --no-test).

    python recipe.py --group adapter --out runs/x --targets hi af az --finetune-flags "--model multilingual-e5-small \
        --data-dir ../shared/wikiann --train-size 1000 --dev-size 500 --cache-body --feature-cache runs/x/features"
    python recipe.py --group inner-lr-maml --out runs/x --targets hi af az \
        --finetune-flags "--model multilingual-e5-small --data-dir ../shared/wikiann ... --recipe runs/x/recipes.json" \
        --prime-flags "--model multilingual-e5-small --data-dir ../shared/wikiann --train-size 4000 --epochs 1"
    python finetune.py --setting 3 --recipe runs/x/recipes.json ...       # then: lr and epochs from the chosen cell
    python prime.py --inner-scope all --recipe runs/x/recipes.json ...    # the inner lr of the chosen cell

Groups: full (setting 1), head (2), adapter | lora | bitfit (3, and 4-7 tuned from a priming), and inner-lr-meta |
inner-lr-maml | inner-lr-one-step (the inner lr alpha of settings 4, 6, 7, each cell a priming followed by the PE
tuning of its setting on the same targets, judged by that tuning's dev F1). Cells live in OUT/recipes/<group>/, the
choice in OUT/recipes.json: every cell with its per-target and average dev F1 and best epoch, the best, the chosen
cell and why. A rerun with the same settings reuses the finished cells; a group chosen under other settings is
refused (one line), never mixed.

The rule (RULE below): a fine-tuning group takes the cheapest cell (fewest epochs) within --tolerance average dev F1
of the best; an inner-lr group the best, but the paper's alpha 0.03 while no other beats it by more than --tolerance.
Where the best cell sits on an edge of what was tried (smallest or largest lr or alpha, largest epoch budget), one
more cell past that edge is tried (lr and alpha one step of the 1-3-10 ladder, epochs doubled), in at most
--max-extensions rounds, before choosing. A cell whose run diverged on any target has no average and is never chosen.
"""
import argparse
import contextlib
import fcntl
import math
import os
import shlex
import statistics
import sys

import finetune
import prime
from data import DataError
from model import Diverged, ModelError, check_same, read_json, recipe_flags, write_json

GRIDS = {  # each fine-tuning group's first grid: learning rates x epoch budgets (our choice; the rule extends it)
    "full": ([3e-5, 1e-4, 3e-4], [2, 4, 8]),
    "head": ([1e-3, 3e-3, 1e-2, 3e-2], [10, 20, 40]),
    "adapter": ([1e-3, 3e-3, 1e-2, 3e-2], [10, 20, 40]),
    "lora": ([1e-3, 3e-3, 1e-2], [2, 4, 8]),
    "bitfit": ([1e-3, 3e-3, 1e-2], [2, 4, 8]),
}
ALPHAS = [0.003, 0.01, 0.03, 0.1]  # the inner-lr groups' first grid; the paper's alpha is 0.03
PAPER_ALPHA = 0.03
SETTING_OF = {"full": 1, "head": 2, "adapter": 3, "lora": 3, "bitfit": 3}
VARIANTS = {"meta": (4, []), "maml": (6, ["--inner-scope", "all"]), "one-step": (7, ["--inner-steps", "1"])}
RULE = ("fine-tuning: the cheapest cell (fewest epochs) within the tolerance of the best average dev score (the task's "
        "metric: F1 for NER, accuracy for POS); inner lr: the "
        "best, but the paper's 0.03 while no alpha beats it by more than the tolerance; a best cell on an edge of the grid "
        "(smallest or largest lr or alpha, largest epoch budget) is first extended one step past it, at most twice")
EPS = 1e-9  # "within 0.5" includes 0.5 itself, whatever the float rounding


class RecipeError(Exception):
    """A grid that cannot choose (one line for the user; exit code 2)."""


def groups():
    return list(GRIDS) + [f"inner-lr-{v}" for v in VARIANTS]


def ladder(value, up):
    """One step of the 1-3-10 ladder from `value` (1e-3 -> 3e-3 -> 1e-2; 0.03 -> 0.01 down)."""
    rung = round(2 * math.log10(value)) + (1 if up else -1)  # rung k is 10**(k/2), written 1 or 3 x a power of 10
    return float(f"{1 if rung % 2 == 0 else 3}e{rung // 2}")


def choose(cells, tolerance, alpha=False):
    """(best, chosen) of the finished cells (dicts with lr/epochs or inner_lr, and dev: the targets' average, None
    where a run diverged). Fine-tuning: the cheapest within `tolerance` of the best; ties: the higher dev F1, then the
    smaller lr. Inner lr: the best (ties: the smaller alpha), or the paper's alpha within `tolerance` of it."""
    done = [c for c in cells if c["dev"] is not None]
    if not done:
        raise RecipeError("no cell of the grid finished on every target (all diverged?): no recipe to choose")
    if alpha:
        best = max(done, key=lambda c: (c["dev"], -c["inner_lr"]))
        paper = [c for c in done if c["inner_lr"] == PAPER_ALPHA and c["dev"] >= best["dev"] - tolerance - EPS]
        return best, paper[0] if paper else best
    best = max(done, key=lambda c: (c["dev"], -c["epochs"], -c["lr"]))
    near = [c for c in done if c["dev"] >= best["dev"] - tolerance - EPS]
    return best, min(near, key=lambda c: (c["epochs"], -c["dev"], c["lr"]))


def past_edges(cells, best, alpha=False):
    """The cells one step past each edge of the tried grid that `best` sits on: [(key, why)], key (lr, epochs) or
    (alpha,); none already tried."""
    tried = {key(c, alpha) for c in cells}
    rates = [c["inner_lr" if alpha else "lr"] for c in cells]
    rate = best["inner_lr" if alpha else "lr"]
    name = "inner lr" if alpha else "lr"
    new = []
    for up, edge, word in ((False, min(rates), "smallest"), (True, max(rates), "largest")):
        if rate == edge:
            stepped = ladder(rate, up)
            new.append(((stepped,) if alpha else (stepped, best["epochs"]), f"{name} {stepped:g}: the best sat at the {word} {name}"))
    if not alpha and best["epochs"] == max(c["epochs"] for c in cells):
        new.append(((rate, 2 * best["epochs"]), f"{2 * best['epochs']} epochs: the best sat at the largest epoch budget"))
    return [(k, why) for k, why in new if k not in tried]


def key(cell, alpha=False):
    return (cell["inner_lr"],) if alpha else (cell["lr"], cell["epochs"])


def cell_dir(out, group, k):
    name = f"alpha{k[0]:g}" if len(k) == 1 else f"lr{k[0]:g}-ep{k[1]}"
    return os.path.join(out, "recipes", group, name)


def read_cell(path, targets, seed, k, rnd):
    """A cell's record from its runs' result.json (dev only): per-target dev F1 and best epoch, their average (None
    when a run diverged or is missing) and the grid's cost (wall time of its runs, and of its priming)."""
    per, best_epoch, seconds, metric = {}, {}, 0.0, "f1"
    for lang in targets:
        r = read_json(os.path.join(path, lang, f"seed{seed}", "result.json"))
        if isinstance(r, dict):
            metric = r.get("metric", "f1")  # the task's (finetune.task_keys): f1 or accuracy
            per[lang], best_epoch[lang] = r[f"dev_{metric}"], r["best_epoch"]
            seconds += r.get("wall_time_s", 0)
    priming = read_json(os.path.join(path, "prime", "config.json"))
    seconds += (priming or {}).get("wall_time_s", 0)
    cell = {"inner_lr": k[0]} if len(k) == 1 else {"lr": k[0], "epochs": k[1]}
    if len(k) == 1:  # the tuning recipe the primings were judged by
        r = read_json(os.path.join(path, targets[0], f"seed{seed}", "result.json")) or {}
        cell.update(lr=r.get("config", {}).get("lr"), epochs=r.get("config", {}).get("epochs"))
    dev = statistics.mean(per.values()) if len(per) == len(targets) else None
    return {**cell, "dev": dev, f"dev_{metric}": dev, "metric": metric,
            "per_target": per, "best_epoch": best_epoch, "round": rnd, "wall_time_s": round(seconds, 1),
            "dir": os.path.relpath(path, os.path.dirname(os.path.dirname(os.path.dirname(path))))}


def run_cell(args, group, k):
    """Train one cell (its runs are skipped where finished, refused where made with other settings)."""
    path = cell_dir(args.out, group, k)
    common = ["--lang", *args.targets, "--seed", str(args.seed), "--no-test", "--out", path] + args.finetune_argv
    try:
        if group.startswith("inner-lr-"):
            setting, flags = VARIANTS[group[len("inner-lr-"):]]
            prime.main(prime.parse_args(args.prime_argv + flags + ["--inner-lr", f"{k[0]:g}", "--resume",
                                                                   "--out", os.path.join(path, "prime")]))
            finetune.main(finetune.parse_args(["--setting", str(setting), "--init", os.path.join(path, "prime")] + common))
        else:
            finetune.main(finetune.parse_args(["--setting", str(SETTING_OF[group]), "--lr", f"{k[0]:g}",
                                               "--epochs", str(k[1])] + pe_flag(group) + common))
    except Diverged as e:  # marked by the scripts (diverged.json): the cell has no average and is never chosen
        print(f"recipe.py: {group} {k}: {e}", file=sys.stderr)
    return path


def pe_flag(group):
    return ["--pe", group] if SETTING_OF.get(group) == 3 else []


def flags_of(args, group):
    """The finetune.py (and prime.py) flags the group's choice is made under, as finetune.py --recipe and prime.py
    --recipe compare them (model.recipe_flags)."""
    alpha = group.startswith("inner-lr-")
    setting = VARIANTS[group[len("inner-lr-"):]][0] if alpha else SETTING_OF[group]
    init = ["--init", "-"] if setting >= 4 else []
    ft = finetune.recorded_config(finetune.parse_args(["--setting", str(setting), "--lang", *args.targets, "--out", "-"]
                                                      + init + (["--lr", "1", "--epochs", "1"] if not alpha else [])
                                                      + pe_flag(group) + args.finetune_argv))
    flags = {"finetune": recipe_flags(ft)}
    if alpha:
        flags["prime"] = recipe_flags(prime.recorded_args(prime.parse_args(args.prime_argv + VARIANTS[group[len("inner-lr-"):]][1]
                                                                           + ["--out", "-"])), "prime")
    return flags


@contextlib.contextmanager
def locked(out):
    """Read-modify-write of OUT/recipes.json, one process at a time (run_table1.sh --jobs N runs groups at once)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".recipes.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield os.path.join(out, "recipes.json")


def save_group(out, group, record):
    with locked(out) as path:
        recipes = read_json(path) or {}
        recipes = {"version": 1, "rule": RULE, "groups": {**recipes.get("groups", {}), group: record}}
        write_json(path, recipes)


def identity(record):
    """What a group's choice depends on: compared with a recipes.json's record before its cells are reused."""
    return {"targets": record["targets"], "seed": record["seed"], "tolerance": record["tolerance"],
            "max_extensions": record["max_extensions"], "grid": record["grid"], **{
                f"{script}.{k}": v for script, flags in record["flags"].items() for k, v in flags.items()}}


def run_group(args, group):
    """Run the group's grid (first grid, then up to --max-extensions rounds past an edge), choose, write recipes.json."""
    alpha = group.startswith("inner-lr-")
    if alpha and not args.prime_argv:
        raise RecipeError(f"--group {group} primes: give the priming's flags with --prime-flags")
    lrs, budgets = GRIDS.get(group, (None, None))
    grid = {"inner_lr": args.alphas or ALPHAS} if alpha else {"lr": args.lrs or lrs, "epochs": args.epochs or budgets}
    settings = [VARIANTS[group[len("inner-lr-"):]][0]] if alpha else [SETTING_OF[group]] + ([4, 5, 6, 7] if SETTING_OF[group] == 3 else [])
    record = {"settings": settings, "targets": args.targets, "seed": args.seed, "tolerance": args.tolerance,
              "max_extensions": args.max_extensions, "grid": grid, "flags": flags_of(args, group)}
    before = ((read_json(os.path.join(args.out, "recipes.json")) or {}).get("groups") or {}).get(group)
    if isinstance(before, dict):
        check_same(os.path.join(args.out, "recipes.json"), f"{group} grid", identity(before), identity(record),
                   "use another --out, or delete that group's cells (OUT/recipes/" + group + ") and its entry to redo it")
    keys = [(a,) for a in grid["inner_lr"]] if alpha else [(lr, ep) for ep in grid["epochs"] for lr in grid["lr"]]
    cells, extensions = [], []
    for rnd in range(args.max_extensions + 1):
        for k in keys:
            cells.append(read_cell(run_cell(args, group, k), args.targets, args.seed, k, rnd))
            save_group(args.out, group, {**record, "cells": cells, "extensions": extensions})  # progress, unchosen
        best, chosen = choose(cells, args.tolerance, alpha)
        if rnd == args.max_extensions or not (new := past_edges(cells, best, alpha)):
            break
        keys = [k for k, _ in new]
        extensions += [f"round {rnd + 1}: {why}" for _, why in new]
    why = (("the paper's alpha, within the tolerance of the best" if chosen is not best else "the best average dev score")
           if alpha else "the best average dev score" if chosen is best else "the cheapest within the tolerance of the best")
    record.update(cells=cells, extensions=extensions, best=best, chosen={**chosen, "why": why},
                  wall_time_s=round(sum(c["wall_time_s"] for c in cells), 1))
    save_group(args.out, group, record)
    shown = f"inner lr {chosen['inner_lr']:g}" if alpha else f"lr {chosen['lr']:g} x {chosen['epochs']} epochs"
    print(f"recipe.py: {group}: {shown} (dev {chosen['metric']} {chosen['dev']:.2f}; best {best['dev']:.2f}; {len(cells)} cells, "
          f"{record['wall_time_s'] / 60:.1f} min) -> {os.path.join(args.out, 'recipes.json')}")
    return record


def number_list(cast):
    def parse(text):
        try:
            values = [cast(v) for v in text.split(",") if v]
        except ValueError:
            values = []
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive numbers")
        return sorted(set(values))
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", nargs="+", required=True, choices=groups(), help="the group(s) to choose a recipe for")
    p.add_argument("--out", required=True, help="OUT/recipes.json and the cells in OUT/recipes/<group>/")
    p.add_argument("--targets", nargs="+", required=True, help="the grid's target languages (run_table1.sh: the first K)")
    p.add_argument("--seed", type=int, default=1, help="fine-tuning seed of every cell")
    p.add_argument("--lrs", type=number_list(float), help="the first grid's learning rates (default: the group's, GRIDS)")
    p.add_argument("--epochs", type=number_list(int), help="the first grid's epoch budgets (default: the group's)")
    p.add_argument("--alphas", type=number_list(float), help=f"inner-lr groups: the first grid (default {ALPHAS})")
    p.add_argument("--tolerance", type=float, default=0.5, help="average dev score (F1, accuracy) a cheaper cell may lose (default 0.5)")
    p.add_argument("--max-extensions", type=int, default=2, help="rounds of cells past an edge (default 2)")
    p.add_argument("--finetune-flags", default="", help="finetune.py flags of every cell (one string): model, data, sizes, ...")
    p.add_argument("--prime-flags", default="", help="inner-lr groups: prime.py flags of every priming (one string)")
    args = p.parse_args(argv)
    owned = {"--finetune-flags": {"--lr", "--epochs", "--setting", "--lang", "--seed", "--out", "--no-test", "--init"},
             "--prime-flags": {"--out", "--inner-lr", "--recipe", "--resume"}}  # set per cell
    args.finetune_argv, args.prime_argv = shlex.split(args.finetune_flags), shlex.split(args.prime_flags)
    for name, argv_ in (("--finetune-flags", args.finetune_argv), ("--prime-flags", args.prime_argv)):
        if taken := [a for a in argv_ if a.split("=")[0] in owned[name]]:
            p.error(f"{name}: {' '.join(taken)} is set by recipe.py per cell; drop it")
    fine = [g for g in args.group if not g.startswith("inner-lr-")]
    if (args.lrs or args.epochs) and len(fine) != 1 or args.alphas and len(args.group) - len(fine) != 1:
        p.error("--lrs/--epochs (--alphas) set one group's grid: give one fine-tuning (inner-lr) --group with them")
    if args.max_extensions < 0 or args.tolerance < 0:
        p.error("--max-extensions and --tolerance are >= 0")
    if fine and (given := [a for a in args.finetune_argv if a.split("=")[0] in ("--recipe", "--pe")]):
        p.error(f"--finetune-flags {' '.join(given)}: a fine-tuning group's grid sets lr/epochs, and the group names its "
                "PE method (--recipe and --pe are for the inner-lr groups' PE tuning)")
    return args


if __name__ == "__main__":
    args = parse_args()
    try:
        for g in args.group:
            run_group(args, g)
    except (DataError, ModelError, RecipeError) as e:
        print(f"recipe.py: error: {e}", file=sys.stderr)
        sys.exit(2)
