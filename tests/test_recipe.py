"""recipe.py: the selection rule (cheapest within the tolerance, edge extension, ties), the grid on the tiny BERT
without a test file in sight, resume and refusal of recipes.json, and finetune.py / prime.py --recipe."""
import json
import os
import subprocess
import sys

import pytest

import data
import finetune
import model
import prime
import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cell(lr, epochs, f1):
    return {"lr": lr, "epochs": epochs, "dev": f1}


def test_ladder_steps_one_rung_of_1_3_10():
    assert [recipe.ladder(x, True) for x in (1e-3, 3e-3, 1e-2, 0.03, 3e-5)] == [3e-3, 1e-2, 3e-2, 0.1, 1e-4]
    assert [recipe.ladder(x, False) for x in (1e-3, 3e-3, 0.03, 0.1)] == [3e-4, 1e-3, 0.01, 0.03]


def test_choose_takes_the_cheapest_within_the_tolerance_and_breaks_ties():
    cells = [cell(1e-3, 10, 40.0), cell(3e-3, 10, 49.4), cell(3e-3, 20, 49.9), cell(1e-2, 40, 50.0), cell(3e-3, 40, None)]
    best, chosen = recipe.choose(cells, 0.5)
    assert (best["lr"], best["epochs"]) == (1e-2, 40)
    assert (chosen["lr"], chosen["epochs"]) == (3e-3, 20)  # 49.4 is 0.6 below: out; 49.9 within
    _, chosen = recipe.choose(cells, 0.6)  # the tolerance's own edge is in: 50.0 - 0.6 = 49.4
    assert (chosen["lr"], chosen["epochs"]) == (3e-3, 10)
    _, chosen = recipe.choose(cells, 0.0)
    assert (chosen["lr"], chosen["epochs"]) == (1e-2, 40)
    ties = [cell(3e-2, 10, 45.0), cell(1e-2, 10, 45.0), cell(3e-3, 10, 44.9)]  # same cost: the higher F1, then the smaller lr
    assert recipe.choose(ties, 0.5)[1]["lr"] == 1e-2
    best, _ = recipe.choose([cell(1e-2, 20, 45.0), cell(1e-2, 10, 45.0)], 0.0)  # best ties: the cheaper one
    assert best["epochs"] == 10
    with pytest.raises(recipe.RecipeError):
        recipe.choose([cell(1e-3, 10, None)], 0.5)


def test_choose_inner_lr_keeps_the_papers_alpha_within_the_tolerance():
    alphas = lambda *pairs: [{"inner_lr": a, "dev": f} for a, f in pairs]
    assert recipe.choose(alphas((0.01, 60.3), (0.03, 60.0), (0.1, 55.0)), 0.5, alpha=True)[1]["inner_lr"] == 0.03
    assert recipe.choose(alphas((0.01, 60.6), (0.03, 60.0), (0.1, 55.0)), 0.5, alpha=True)[1]["inner_lr"] == 0.01
    assert recipe.choose(alphas((0.01, 60.0), (0.1, 60.0)), 0.5, alpha=True)[1]["inner_lr"] == 0.01  # no 0.03: best, smaller


def test_past_edges_steps_past_each_edge_the_best_sits_on():
    grid = [cell(lr, ep, 0.0) for lr in (1e-3, 3e-3, 1e-2) for ep in (10, 20)]
    keys = lambda best: sorted(k for k, _ in recipe.past_edges(grid, best))
    assert keys(cell(1e-2, 20, 1)) == [(1e-2, 40), (3e-2, 20)]  # largest lr and budget
    assert keys(cell(1e-3, 10, 1)) == [(3e-4, 10)]  # smallest lr; the smallest budget is no edge
    assert keys(cell(3e-3, 10, 1)) == []
    assert recipe.past_edges(grid + [cell(3e-2, 20, 0)], cell(1e-2, 20, 1)) == [((1e-2, 40), "40 epochs: the best sat at the largest epoch budget")]


def fake_grid(monkeypatch, surface, calls):
    """run_cell writes each target's result.json with dev F1 surface(lr, epochs) (as finetune.py --no-test would)."""
    def run_cell(args, group, k):
        calls.append(k)
        path = recipe.cell_dir(args.out, group, k)
        for lang in args.targets:
            os.makedirs(os.path.join(path, lang, "seed1"), exist_ok=True)
            with open(os.path.join(path, lang, "seed1", "result.json"), "w") as f:
                json.dump({"dev_f1": surface(*k), "best_epoch": k[1], "wall_time_s": 1.0, "test_f1": None}, f)
        return path
    monkeypatch.setattr(recipe, "run_cell", run_cell)


def grid_args(out, *extra):
    return recipe.parse_args(["--group", "head", "--out", str(out), "--targets", "hi", "af", "--lrs", "1e-3,3e-3",
                              "--epochs", "1,2", "--finetune-flags", "--synthetic --device cpu", *extra])


def test_the_grid_extends_past_an_edge_at_most_twice(monkeypatch, tmp_path, tiny_dir):
    calls = []
    fake_grid(monkeypatch, lambda lr, ep: 10 * ep + 1000 * lr, calls)  # better with more epochs and a larger lr, always
    record = recipe.run_group(grid_args(tmp_path, "--finetune-flags", f"--model {tiny_dir} --synthetic"), "head")
    assert calls[:4] == [(1e-3, 1), (3e-3, 1), (1e-3, 2), (3e-3, 2)]
    assert sorted(calls[4:6]) == [(3e-3, 4), (1e-2, 2)]  # round 1: past the largest lr and budget of (3e-3, 2)
    assert calls[6:] == [(3e-3, 8)]  # round 2: the best (3e-3, 4: 43 > 30) sits on the budget edge only; then stop
    assert (record["best"]["lr"], record["best"]["epochs"]) == (3e-3, 8)
    assert len(record["extensions"]) == 3 and [c["round"] for c in record["cells"]] == [0] * 4 + [1] * 2 + [2]
    saved = json.load(open(tmp_path / "recipes.json"))["groups"]["head"]
    assert saved["chosen"]["lr"] == 3e-3 and saved["chosen"]["epochs"] == 8 and len(saved["cells"]) == 7
    assert {"lr", "epochs", "dev_f1", "per_target", "best_epoch"} <= set(saved["cells"][0])
    calls.clear()  # a plateau inside the grid: no extension
    fake_grid(monkeypatch, lambda lr, ep: 50.0 - abs(ep - 1) - 100 * abs(lr - 3e-3) if lr <= 3e-3 else 0.0, calls)
    record = recipe.run_group(grid_args(tmp_path / "b", "--lrs", "1e-3,3e-3,1e-2", "--finetune-flags", f"--model {tiny_dir} --synthetic"), "head")
    assert len(calls) == 6 and record["extensions"] == [] and record["chosen"]["lr"] == 3e-3 and record["chosen"]["epochs"] == 1


def write_split(path, sentences):
    with open(path, "w") as f:
        f.write("\n\n".join("\n".join(f"{t}\t{g}" for t, g in zip(tokens, tags)) for tokens, tags in sentences) + "\n")


@pytest.fixture(scope="module")
def dev_only_data(tmp_path_factory):
    """hi and af with train and validation files and NO test file: a grid that read a test split would fail."""
    root = tmp_path_factory.mktemp("wikiann-no-test")
    for lang in ("hi", "af"):
        os.makedirs(root / lang)
        for split, n in (("train", 60), ("validation", 30)):
            write_split(root / lang / f"{split}.tsv", data.load_split(lang, split, synthetic=True, limit=n))
    return str(root)


def test_grid_on_the_tiny_bert_never_reads_a_test_file_and_resumes(tiny_dir, dev_only_data, tmp_path, monkeypatch):
    flags = f"--model {tiny_dir} --data-dir {dev_only_data} --cache-body --feature-cache {tmp_path}/features --device cpu"
    args = recipe.parse_args(["--group", "adapter", "--out", str(tmp_path), "--targets", "hi", "af", "--lrs", "1e-2,3e-2",
                              "--epochs", "1", "--max-extensions", "1", "--finetune-flags", flags])
    record = recipe.run_group(args, "adapter")
    assert {(c["lr"], c["epochs"]) for c in record["cells"]} >= {(1e-2, 1), (3e-2, 1)}
    assert all(set(c["per_target"]) == {"hi", "af"} and c["dev_f1"] == c["dev"] is not None for c in record["cells"])
    result = json.load(open(tmp_path / "recipes" / "adapter" / "lr0.01-ep1" / "hi" / "seed1" / "result.json"))
    assert result["test_f1"] is None and result["config"]["no_test"] and result["pe"]["method"] == "adapter"
    with pytest.raises(data.DataError, match="no test"):  # the check has teeth: a scored run needs the test file
        finetune.main(finetune.parse_args(["--setting", "3", "--lang", "hi", "--lr", "1e-2", "--epochs", "1",
                                           "--out", str(tmp_path / "scored")] + flags.split()))
    trained = []  # resume: a rerun with the same settings trains nothing and chooses the same cell
    monkeypatch.setattr(finetune, "train_one", lambda *a, **k: trained.append(a))
    again = recipe.run_group(args, "adapter")
    assert trained == [] and again["chosen"] == record["chosen"]
    other = recipe.parse_args(["--group", "adapter", "--out", str(tmp_path), "--targets", "hi", "af", "--lrs", "1e-2,3e-2",
                               "--epochs", "1", "--max-extensions", "1", "--finetune-flags", flags + " --dev-size 20"])
    with pytest.raises(model.ModelError, match="adapter grid made with other settings.*dev-size"):
        recipe.run_group(other, "adapter")  # never mixed with a grid of other settings
    assert trained == []


def test_finetune_recipe_takes_the_chosen_cell_and_refuses_other_flags(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["finetune.py"])
    out = tmp_path / "o"
    flags = ["--model", tiny_dir, "--synthetic", "--train-size", "40", "--dev-size", "20", "--device", "cpu"]
    chosen = {"lr": 0.02, "epochs": 3, "dev_f1": 1.0}
    config = finetune.recorded_config(finetune.parse_args(["--setting", "3", "--lang", "hi", "--out", "-"] + flags))
    os.makedirs(out)
    with open(out / "recipes.json", "w") as f:
        json.dump({"version": 1, "groups": {"adapter": {"chosen": chosen, "flags": {"finetune": model.recipe_flags(config)}}}}, f)
    recipes = str(out / "recipes.json")
    for setting in ("3", "4"):  # the PE group serves settings 3-7
        init = ["--init", str(tmp_path)] if setting == "4" else []
        args = finetune.parse_args(["--setting", setting, "--lang", "af", "--seed", "2", "--out", "-", "--recipe", recipes,
                                    "--train-size", "10"] + init + flags[:3] + flags[5:])  # the curve's sizes may differ
        assert (args.lr, args.epochs) == (0.02, 3)
    primed = tmp_path / "primed"  # settings 4-7 without --model: the encoder their checkpoint was primed from
    primed.mkdir()
    (primed / "checkpoint.json").write_text(json.dumps({"base_model": tiny_dir, "pe": {"method": "adapter", "dim": 64}}))
    args = finetune.parse_args(["--setting", "5", "--lang", "hi", "--out", "-", "--recipe", recipes, "--init", str(primed)]
                               + flags[2:])
    assert (args.lr, args.epochs) == (0.02, 3)
    (primed / "checkpoint.json").write_text(json.dumps({"base_model": "other-model", "pe": {"method": "adapter", "dim": 64}}))
    with pytest.raises(SystemExit):
        finetune.parse_args(["--setting", "5", "--lang", "hi", "--out", "-", "--recipe", recipes, "--init", str(primed)] + flags[2:])
    assert "--model: " in capsys.readouterr().err
    refused = {"--lr 1e-3": "drop --lr", "--dev-size 30": "dev-size: 20 -> 30", "--pe lora": "no chosen recipe for 'lora'",
               "--word-position first": "word-position"}
    for extra, message in refused.items():
        with pytest.raises(SystemExit) as exit:
            finetune.parse_args(["--setting", "3", "--lang", "hi", "--out", "-", "--recipe", recipes] + flags + extra.split())
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit.value.code == 2 and message in err and err.startswith("finetune.py: error: "), (extra, err)


def test_prime_recipe_takes_the_variants_inner_lr(tmp_path):
    base = ["--model", "m", "--synthetic", "--train-size", "40", "--epochs", "1"]
    groups = {}
    for variant, flags in (("meta", []), ("maml", ["--inner-scope", "all"])):
        config = prime.recorded_args(prime.parse_args(base + flags + ["--out", "-"]))
        groups[f"inner-lr-{variant}"] = {"chosen": {"inner_lr": 0.01 if variant == "meta" else 0.1},
                                         "flags": {"prime": model.recipe_flags(config, "prime")}}
    path = tmp_path / "recipes.json"
    path.write_text(json.dumps({"version": 1, "groups": groups}))
    assert prime.parse_args(base + ["--out", "-", "--recipe", str(path)]).inner_lr == 0.01
    assert prime.parse_args(base + ["--inner-scope", "all", "--out", "-", "--recipe", str(path), "--seed", "2"]).inner_lr == 0.1
    assert prime.parse_args(base + ["--out", "-"]).inner_lr == 0.03  # the paper's, without a recipe
    for extra in (["--inner-lr", "0.1"], ["--inner-steps", "1"], ["--train-size", "80"], ["--mode", "ft"]):
        with pytest.raises(SystemExit):
            prime.parse_args(base + ["--out", "-", "--recipe", str(path)] + extra)


def run_sh(*flags):
    return subprocess.run(["bash", os.path.join(ROOT, "run_table1.sh"), *flags], capture_output=True, text=True)



def test_run_table1_paper_dry_run_prints_the_recipe_step():
    r = run_sh("--preset", "paper", "--dry-run", "--out", "runs/x", "--settings", "1,2,4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    grid = [l for l in lines if "recipe.py" in l]
    assert [l.split("--group ")[1].split()[0] for l in grid] == ["full", "head", "adapter"]
    assert all("--targets hi af az" in l for l in grid)
    s2 = next(l for l in lines if "--setting 2" in l)
    assert "--recipe runs/x/recipes.json" in s2 and "--lr" not in s2
    assert lines.index(grid[-1]) < lines.index(s2)


@pytest.mark.parametrize("flags, message", [
    (["--settings", "1,8"], "--settings: '8' is not a setting"), (["--settings", "2,,3"], "empty item"),
    (["--seeds", "1,x"], "--seeds: 'x'"), (["--curve", "100,0"], "--curve: '0'"),
    (["--targets", "hi,zz"], "no language 'zz'"), (["--inner-lr", "6=fast"], "--inner-lr: '6=fast'"),
    (["--recipe", "nowhere.json"], "no file 'nowhere.json'"), (["--recipe-targets", "3"], "only 2 target(s)"),
    (["--prime-seed", "one"], "--prime-seed: 'one'")])
def test_run_table1_checks_every_list_argument_before_any_work(flags, message, tmp_path, dev_only_data):
    r = run_sh("--preset", "mini", "--data-dir", dev_only_data, "--targets", "hi,af", "--sources", "hi", *flags, "--out", str(tmp_path / "o"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "o").exists()  # nothing started
