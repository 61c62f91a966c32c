"""Entity-level F1 on hand-checked cases; the Table 1 aggregation on hand-made result files."""
import csv
import json
import os
import random
import subprocess
import sys

import pytest

import evaluate
from conftest import ROOT


@pytest.mark.parametrize("gold, pred, expected", [
    # PER matches; LOC predicted as ORG: 1 TP, 1 FP, 1 FN -> P = R = F = 50
    ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]], (50.0, 50.0, 50.0)),
    # a boundary error is a miss and a false alarm: no credit for partial spans
    ([["B-ORG", "I-ORG", "I-ORG"]], [["B-ORG", "I-ORG", "O"]], (0.0, 0.0, 0.0)),
    # conlleval: an I- tag after O starts an entity, so I-PER I-PER equals B-PER I-PER
    ([["O", "I-PER", "I-PER", "O"]], [["O", "B-PER", "I-PER", "O"]], (100.0, 100.0, 100.0)),
    # micro average over sentences: gold LOC PER ORG, predicted LOC ORG PER(spurious) -> 2/3, 2/3
    ([["B-LOC", "O", "B-PER"], ["B-ORG", "I-ORG"], ["O"]], [["B-LOC", "O", "O"], ["B-ORG", "I-ORG"], ["B-PER"]],
     (200 / 3, 200 / 3, 200 / 3)),
    # 2 gold entities, 1 predicted and right: P = 100, R = 50, F = 66.67
    ([["B-PER", "O", "B-LOC", "I-LOC"]], [["B-PER", "O", "O", "O"]], (100.0, 50.0, 200 / 3)),
])
def test_entity_f1_hand_checked(gold, pred, expected):
    s = evaluate.entity_scores(gold, pred)
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx(expected)


def test_entity_scores_equal_seqeval_separate_metrics():
    """One pass (precision_recall_fscore_support) gives exactly what seqeval's three metric functions give, on random
    IOB2 sequences, including ones with no entity in gold or in the prediction."""
    from seqeval.metrics import f1_score, precision_score, recall_score
    rng = random.Random(0)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    for n in range(40):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 9))] for _ in range(rng.randint(1, 30))]
        pred = [[rng.choice(tags if n % 5 else ["O"]) for _ in g] for g in gold]  # every 5th: nothing predicted
        s = evaluate.entity_scores(gold, pred)
        assert s == {"precision": 100 * precision_score(gold, pred, zero_division=0),
                     "recall": 100 * recall_score(gold, pred, zero_division=0), "f1": 100 * f1_score(gold, pred, zero_division=0)}


def test_read_predictions(tmp_path):
    p = tmp_path / "p.conll"
    p.write_text("Anna B-PER B-PER\nsings O O\n\nin O O\nOslo B-LOC O\n")
    assert evaluate.read_predictions(p) == ([["B-PER", "O"], ["O", "B-LOC"]], [["B-PER", "O"], ["O", "O"]])


def test_embedded_paper_table_matches_the_paper_csv():
    path = os.path.join(ROOT, "..", "shared", "paper", "table1.csv")
    if not os.path.exists(path):
        pytest.skip("../shared/paper/table1.csv not present")
    with open(path) as f:
        for row in csv.DictReader(f):
            s = int(row["setting"])
            assert evaluate.SETTINGS[s] == row["name"]
            assert evaluate.PAPER[s] == {lang: float(row[lang]) for lang in evaluate.TARGETS}


def write_result(run_dir, setting, lang, seed, f1, init=None, pe=None):
    d = os.path.join(run_dir, "finetune", f"s{setting}", lang, f"seed{seed}")
    os.makedirs(d)
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump({"setting": setting, "lang": lang, "seed": seed, "test_f1": f1, "trainable_params": 100, "init": init,
                   **({"pe": pe} if pe else {})}, f)


def test_table_mean_std_average_and_paper_delta(tmp_path):
    for seed, (hi, af) in {1: (80.0, 88.0), 2: (82.0, 90.0)}.items():
        write_result(str(tmp_path), 4, "hi", seed, hi)
        write_result(str(tmp_path), 4, "af", seed, af)
    write_result(str(tmp_path), 3, "hi", 1, 70.0)
    write_result(str(tmp_path), 5, "hi", 1, 60.0)
    write_result(str(tmp_path), 5, "hi", 2, 62.0)
    write_result(str(tmp_path), 5, "af", 1, 70.0)  # a partial grid: af's seed 2 not run yet
    out = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    with open(tmp_path / "table1.csv") as f:
        rows = {(r["setting"], r["lang"]): r for r in csv.DictReader(f)}
    assert rows[("4", "hi")]["mean_f1"] == "81.00" and rows[("4", "hi")]["std_f1"] == "1.41"
    assert rows[("4", "hi")]["paper_f1"] == "81.25" and rows[("4", "hi")]["delta"] == "-0.25"
    # average: per seed (80+88)/2 = 84 and (82+90)/2 = 86 -> 85 +- 1.41; paper (81.25+88.23)/2 = 84.74
    assert (rows[("4", "avg")]["mean_f1"], rows[("4", "avg")]["std_f1"], rows[("4", "avg")]["paper_f1"]) == ("85.00", "1.41", "84.74")
    assert rows[("3", "hi")]["std_f1"] == "" and rows[("3", "hi")]["n_seeds"] == "1"
    assert ("3", "af") not in rows and ("3", "avg") not in rows  # no result for af: no average either
    md = (tmp_path / "table1.md").read_text()
    assert "| 4 | Meta Priming -> AT | 81.00 ± 1.41 (81.25, -0.25) | 89.00 ± 1.41 (88.23, +0.77) | 85.00 ± 1.41 (84.74, +0.26) | 2 |" in md
    assert "| 3 | AT | 70.00 (77.76, -7.76) | not run | not run | 1 |" in md
    # the average takes seed 1 only, the one both targets have (paper (79.55+87.78)/2 = 83.665, printed 83.66); the
    # seeds column says the cells differ
    assert "| 5 | FT Priming -> AT | 61.00 ± 1.41 (79.55, -18.55) | 70.00 (87.78, -17.78) | 65.00 (83.66, -18.66) | 1-2 |" in md
    assert md in out.replace("\r", "")


def test_lora_and_bitfit_rows_are_named_and_have_no_paper_value(tmp_path):
    """The paper tuned an adapter: settings 3-7 tuned with LoRA or BitFit are named for it and get no paper value;
    settings 1-2 (no PE method) keep theirs; one directory mixing two methods in a setting is refused."""
    lora, bitfit = tmp_path / "lora", tmp_path / "bitfit"
    write_result(str(lora), 2, "hi", 1, 60.0, pe=None)
    write_result(str(lora), 3, "hi", 1, 70.0, pe={"method": "lora", "rank": 8})
    write_result(str(lora), 5, "hi", 1, 75.0, pe={"method": "lora", "rank": 8})
    out = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(lora)],
                         capture_output=True, text=True, check=True).stdout
    md = (lora / "table1.md").read_text()
    assert "| 2 | HT | 60.00 (72.71, -12.71) | 1 |" in md
    assert "| 3 | LoRA tuning | 70.00 | 1 |" in md and "| 5 | FT Priming -> LoRA | 75.00 | 1 |" in md
    assert "rows of another PE method have no paper value" in md and md in out.replace("\r", "")
    write_result(str(bitfit), 4, "af", 1, 80.0, pe={"method": "bitfit"})
    subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(bitfit)], capture_output=True, check=True)
    assert "| 4 | Meta Priming -> BitFit | 80.00 | 1 |" in (bitfit / "table1.md").read_text()
    write_result(str(lora), 3, "af", 1, 71.0, pe={"method": "adapter", "dim": 64})  # setting 3: LoRA and adapter
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(lora)], capture_output=True, text=True)
    assert r.returncode == 2 and "mixes PE methods in setting 3 (adapter and lora" in r.stderr


def test_sweep_compares_configurations_by_dev_f1(tmp_path):
    for config, devs in {"s3-lr1e-3": (40.0, 50.0), "s3-lr1e-2": (60.0, 44.0), "s1-lr1e-4": (70.0, 70.0)}.items():
        for seed, dev in enumerate(devs, 1):
            d = tmp_path / config / "hi" / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps({"setting": int(config[1]), "lang": "hi", "seed": seed,
                                                       "dev_f1": dev, "test_f1": dev - 1}))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--sweep", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "| 3 | s3-lr1e-2 * | 52.00 | 52.00 | 51.00 |" in out  # (60+44)/2 beats (40+50)/2
    assert "| 3 | s3-lr1e-3 | 45.00 | 45.00 | 44.00 |" in out
    assert "| 1 | s1-lr1e-4 * | 70.00 |" in out
    assert (tmp_path / "sweep.md").read_text().strip() == out.strip()


def test_spread_across_priming_runs(tmp_path):
    # run a: setting 4 per-seed averages (80+90)/2=85 and (82+92)/2=87 -> 86 +- 1.41; run b: 84 (one seed)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for seed, (hi, af) in {1: (80.0, 90.0), 2: (82.0, 92.0)}.items():
        write_result(a, 4, "hi", seed, hi)
        write_result(a, 4, "af", seed, af)
    write_result(b, 4, "hi", 1, 78.0)
    write_result(b, 4, "af", 1, 90.0)
    write_result(b, 5, "hi", 1, 70.0)  # no af: no average, so no row for 5
    out = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--spread", a, b],
                         capture_output=True, text=True, check=True).stdout
    assert f"| 4 | Meta Priming -> AT | 86.00 ± 1.41 | 84.00 | 85.00 ± 1.41 (n=2) |" in out  # mean, std of 86 and 84
    assert "| 5 |" not in out


def test_priming_report_from_log_and_checkpoint(tmp_path):
    import torch
    from safetensors.torch import save_file
    meta, ft = tmp_path / "meta", tmp_path / "ft"
    meta.mkdir()
    ft.mkdir()
    with open(meta / "log.jsonl", "w") as f:
        for step in range(6):  # outer loss 2.0 ... 1.5; inner loop 1.0 -> 0.5 and 3.0 -> 2.0
            tasks = [{"support_loss": [1.0, 0.7, 0.5], "query_loss": 0.0}, {"support_loss": [3.0, 2.0], "query_loss": 0.0}]
            f.write(json.dumps({"step": step + 1, "loss": 2.0 - 0.1 * step, "tasks": tasks}) + "\n")
    (ft / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.25, "tasks": [{"loss": 1.25}]}) + "\n")
    save_file({"adapter.up.weight": torch.tensor([[3.0, 4.0]])}, str(meta / "model.safetensors"))
    started = tmp_path / "started"  # a run still before its first logged meta-step
    started.mkdir()
    (started / "log.jsonl").write_text("")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--priming", str(meta), str(ft), str(started)],
                         capture_output=True, text=True, check=True).stdout
    # first 5 steps: mean(2.0 .. 1.6) = 1.8; last 5: mean(1.9 .. 1.5) = 1.7; support (1+3)/2 = 2 -> (0.5+2)/2 = 1.25
    assert f"| {meta} | 6 | 1.800 | 1.700 | 2.000 | 1.250 | 5.0000 |" in out
    assert f"| {ft} | 1 | 1.250 | 1.250 | - | - | - |" in out
    assert f"| {started} | 0 | - | - | - | - | - |" in out


def test_compare_and_ablation_tables(tmp_path):
    """--compare: per-setting averages beside the paper's (several dirs: mean ± std across them); --ablation: one
    row per label with each dir's average, the spread across dirs, trainable parameters and the priming time."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for d, (hi, af) in {a: (80.0, 90.0), b: (78.0, 88.0)}.items():
        for lang, f1 in (("hi", hi), ("af", af)):
            write_result(d, 4, lang, 1, f1, init=os.path.join("runs", "x", "prime", "meta"))
        os.makedirs(os.path.join(d, "prime", "meta"))
        with open(os.path.join(d, "prime", "meta", "config.json"), "w") as f:
            json.dump({"wall_time_s": 120.0 if d == a else 240.0}, f)
    write_result(a, 3, "hi", 1, 70.0)
    write_result(a, 3, "af", 1, 80.0)
    run = lambda *argv: subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *argv],
                                       capture_output=True, text=True, check=True).stdout
    out = run("--compare", f"ours={a},{b}")
    assert "| 3 | AT | 80.93 | 75.00 (n=1) |" in out  # the paper's average over the same targets, hi and af
    assert "| 4 | Meta Priming -> AT | 84.74 | 84.00 ± 1.41 (n=2) |" in out
    assert "| 5 | FT Priming -> AT | 85.13 | - |" in out  # no column has it: the paper's 6 targets
    out = run("--ablation", f"AT={a}:3", f"meta={a},{b}:4")
    assert "| AT | 3 | 100 | 75.00 | - | 75.00 (n=1) | - |" in out
    assert "| meta | 4 | 100 | 85.00 | 83.00 | 84.00 ± 1.41 (n=2) | 3.0 min |" in out


def test_data_size_curve_from_hand_made_runs(tmp_path):
    """OUT/curve/nN holds settings on the first N sentences; the full-size runs are OUT/finetune's. The curve's CSV has
    mean ± std over seeds per (setting, target, size) and the targets' average per size step; Table 1 ignores the curve."""
    def put(where, setting, lang, seed, n, f1):
        d = tmp_path.joinpath(*where, f"s{setting}", lang, f"seed{seed}")
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"setting": setting, "lang": lang, "seed": seed, "test_f1": f1,
                                                   "sizes": {"train": n, "validation": 10, "test": 10}}))
    for seed, bump in ((1, 0.0), (2, 2.0)):
        for lang, full in (("hi", 5000), ("af", 6000)):
            put(("finetune",), 3, lang, seed, full, 80.0 + bump)
            put(("curve", "n100", "finetune"), 3, lang, seed, 100, 40.0 + bump + (lang == "af") * 10)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| 3 | AT | 81.00 ± 1.41 (77.76, +3.24) | 81.00 ± 1.41 (84.10, -3.10) |" in r.stdout  # no curve run in Table 1
    rows = list(csv.DictReader(open(tmp_path / "curve.csv")))
    got = {(row["lang"], row["train_sentences"]): (row["mean_f1"], row["std_f1"], row["n_seeds"]) for row in rows}
    assert got == {("hi", "100"): ("41.00", "1.41", "2"), ("hi", "5000"): ("81.00", "1.41", "2"),
                   ("af", "100"): ("51.00", "1.41", "2"), ("af", "6000"): ("81.00", "1.41", "2"),
                   ("avg", "100"): ("46.00", "1.41", "2"), ("avg", "5500"): ("81.00", "1.41", "2")}
    assert (tmp_path / "curve.png").stat().st_size > 10000


def test_settings_that_peak_in_their_last_epoch_are_named(tmp_path):
    def run(setting, lang, best, epochs):
        d = tmp_path / f"s{setting}" / lang
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"setting": setting, "lang": lang, "seed": 1, "test_f1": 50.0,
                                                   "best_epoch": best, "epochs": epochs}))
    run(3, "hi", 10, 10), run(3, "af", 10, 10), run(3, "az", 7, 10)  # 2 of 3 at the last epoch: named
    run(2, "hi", 10, 10), run(2, "af", 4, 10)                        # 1 of 2: not a majority
    run(1, "hi", 1, 1)                                               # one epoch: nothing to say
    lines = evaluate.late_peaks(str(tmp_path))
    assert len(lines) == 1 and "setting 3:" in lines[0] and "2 of 3 runs" in lines[0]


def write_diverged(run_dir, setting, lang, seed, identity):
    d = os.path.join(run_dir, "finetune", f"s{setting}", lang, f"seed{seed}")
    os.makedirs(d)
    with open(os.path.join(d, "diverged.json"), "w") as f:  # finetune.py's marker: the flags are in its identity
        json.dump({"setting": setting, "lang": lang, "seed": seed, "message": "diverged", "identity": identity}, f)


def test_diverged_runs_keep_their_method_rule_and_count(tmp_path):
    """A diverged run of a LoRA grid is a LoRA run with its own --word-position; "[k diverged]" counts runs, also in
    the average; an average over no seed that finished every target is "-", not "diverged"."""
    lora = str(tmp_path / "lora")
    for seed in (1, 2, 3):
        write_result(lora, 3, "af", seed, 70.0 + seed, pe={"method": "lora"})
    write_result(lora, 3, "hi", 1, 60.0, pe={"method": "lora"})
    for seed in (2, 3):
        write_diverged(lora, 3, "hi", seed, {"pe": "lora", "word_position": "first"})
    out = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), lora], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "lora" / "table1.md").read_text()
    assert "| 3 | LoRA tuning | 60.00 [2 diverged] | 72.00 ± 1.00 | 65.50 [2 diverged] | 1-3 |" in md  # avg: seed 1 only
    assert "(--word-position first)." in md and "first-content" not in md
    apart = str(tmp_path / "apart")  # hi has seed 1 only, af seed 2 only: no seed for an average
    write_result(apart, 3, "hi", 1, 60.0)
    write_result(apart, 3, "af", 2, 70.0)
    subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), apart], capture_output=True, check=True)
    assert "| 3 | AT | 60.00 (77.76, -17.76) | 70.00 (84.10, -14.10) | - | 1 |" in (tmp_path / "apart" / "table1.md").read_text()


def test_curve_averages_sizes_by_value_and_keeps_the_full_run_over_its_repeat(tmp_path):
    """The curve's average pairs equal sizes only (hi lacks n=1000: no average there, not hi's full size with af's 1000);
    a --curve point as large as the full training set repeats the full-size run: kept once, no error."""
    def put(where, lang, n, f1):
        d = tmp_path.joinpath(*where, "s3", lang, "seed1")
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"setting": 3, "lang": lang, "seed": 1, "test_f1": f1,
                                                   "sizes": {"train": n, "validation": 10, "test": 10}}))
    for lang in ("hi", "af"):
        put(("finetune",), lang, 5000, 80.0)
        put(("curve", "n100", "finetune"), lang, 100, 20.0)
        put(("curve", "n5000", "finetune"), lang, 5000, 81.0)  # = the full run's size: the full run is kept
    put(("curve", "n1000", "finetune"), "af", 1000, 50.0)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = {(row["lang"], row["train_sentences"]): row["mean_f1"] for row in csv.DictReader(open(tmp_path / "curve.csv"))}
    assert got == {("hi", "100"): "20.00", ("hi", "5000"): "80.00", ("af", "100"): "20.00", ("af", "1000"): "50.00",
                   ("af", "5000"): "80.00", ("avg", "100"): "20.00", ("avg", "5000"): "80.00"}


def test_sweep_gives_no_average_or_star_to_a_configuration_with_a_diverged_or_missing_run(tmp_path):
    def put(config, lang, dev, name="result.json"):
        d = tmp_path / config / "s3" / lang / "seed1"
        d.mkdir(parents=True)
        (d / name).write_text(json.dumps({"setting": 3, "lang": lang, "seed": 1, "dev_f1": dev, "test_f1": dev}))
    put("lr1e-3", "hi", 70.0), put("lr1e-3", "af", 50.0)
    put("lr1e-1", "hi", 65.0), put("lr1e-1", "af", None, "diverged.json")
    put("lr3e-1", "hi", 90.0)  # af not run
    out = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--sweep", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "| 3 | lr1e-1/s3 (1 diverged) | 65.00 | diverged | - | 65.00 |" in out
    assert "| 3 | lr1e-3/s3 * | 70.00 | 50.00 | 60.00 | 60.00 |" in out
    assert "| 3 | lr3e-1/s3 (runs missing) | 90.00 | - | - | 90.00 |" in out


def test_compare_averages_the_paper_over_the_same_targets_and_names_the_pe_method(tmp_path):
    at, lora = str(tmp_path / "at"), str(tmp_path / "lora")
    for lang in ("hi", "af"):
        write_result(at, 3, lang, 1, 80.0)
        write_result(lora, 3, lang, 1, 80.0, pe={"method": "lora"})
    run = lambda *argv: subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *argv], capture_output=True, text=True)
    assert "| 3 | AT | 80.93 | 80.00 (n=1) |" in run("--compare", f"at={at}").stdout  # (77.76 + 84.10) / 2
    assert "| 3 | LoRA tuning | - | 80.00 (n=1) |" in run("--compare", f"lora={lora}").stdout
    assert "| 3 | PE tuning | - | 80.00 (n=1) | 80.00 (n=1) |" in run("--compare", f"at={at}", f"lora={lora}").stdout
    for argv in (["--compare", at], ["--compare", f"x={tmp_path / 'none'}"], ["--ablation", f"x={at}"], ["--ablation", f"x={at}:a"]):
        r = run(*argv)
        assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith("evaluate.py: error: "), (argv, r.stderr)


def put_sweep_run(root, config, lang, dev, setting=3, pe=None, seed=1):
    d = root.joinpath(*config.split("/"), lang, f"seed{seed}")
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"setting": setting, "lang": lang, "seed": seed, "dev_f1": dev,
                                               "test_f1": dev - 1, **({"pe": {"method": pe}} if pe else {})}))


def test_sweep_finds_nested_configurations_and_stars_each_pe_method(tmp_path):
    """--sweep DIR with lora/ and bitfit/ below it: every configuration (the directory holding <lang>/seed<N>) is a row
    named by its path, with its own numbers; the star goes to the best of each (setting, PE method)."""
    for pe, devs in {"lora": {"s3-lr1e-3": (40.0, 50.0), "s3-lr3e-3": (60.0, 70.0)},
                     "bitfit": {"s3-lr1e-3": (30.0, 32.0), "s3-lr3e-3": (20.0, 22.0)}}.items():
        for config, (hi, af) in devs.items():
            put_sweep_run(tmp_path, f"{pe}/{config}", "hi", hi, pe=pe)
            put_sweep_run(tmp_path, f"{pe}/{config}", "af", af, pe=pe)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--sweep", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 3")]
    assert len(rows) == 4
    assert any("| bitfit/s3-lr1e-3 * | 30.00 | 32.00 | 31.00 | 30.00 |" in line for line in rows)
    assert any("| bitfit/s3-lr3e-3 | 20.00 | 22.00 | 21.00 | 20.00 |" in line for line in rows)
    assert any("| lora/s3-lr1e-3 | 40.00 | 50.00 | 45.00 | 44.00 |" in line for line in rows)
    assert any("| lora/s3-lr3e-3 * | 60.00 | 70.00 | 65.00 | 64.00 |" in line for line in rows)


@pytest.mark.parametrize("other", [dict(setting=4), dict(pe="lora")])
def test_sweep_refuses_a_configuration_mixing_settings_or_pe_methods(tmp_path, other):
    put_sweep_run(tmp_path, "ok", "hi", 50.0)
    put_sweep_run(tmp_path, "mixed", "hi", 50.0)
    put_sweep_run(tmp_path, "mixed", "af", 60.0, **other)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--sweep", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "mixed" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "sweep.md").exists()


def test_curve_size_whose_targets_share_no_seed_has_no_average_and_no_crash(tmp_path):
    """At n=100 hi has seed 1 only and af seed 2 only (a partial or diverged curve): no average row there, no crash."""
    def put(where, lang, seed, n, f1):
        d = tmp_path.joinpath(*where, "s3", lang, f"seed{seed}")
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"setting": 3, "lang": lang, "seed": seed, "test_f1": f1,
                                                   "sizes": {"train": n, "validation": 10, "test": 10}}))
    for lang in ("hi", "af"):
        put(("finetune",), lang, 1, 5000, 80.0)
    put(("curve", "n100", "finetune"), "hi", 1, 100, 20.0)
    put(("curve", "n100", "finetune"), "af", 2, 100, 30.0)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = {(row["lang"], row["train_sentences"]): row["mean_f1"] for row in csv.DictReader(open(tmp_path / "curve.csv"))}
    assert got == {("hi", "100"): "20.00", ("hi", "5000"): "80.00", ("af", "100"): "30.00", ("af", "5000"): "80.00",
                   ("avg", "5000"): "80.00"}


RECIPES = {"version": 1, "rule": "the cheapest cell within 0.5 dev F1 of the best", "tolerance": 0.5, "groups": {
    "head": {"settings": [2], "targets": ["hi", "af", "az"], "seed": 1,
             "cells": [{"lr": 0.003, "epochs": 40, "dev_f1": 51.36, "per_target": {"hi": 49.39, "af": 50.1, "az": 53.0},
                        "best_epoch": {"hi": 33, "af": 20, "az": 40}, "round": 0},
                       {"lr": 0.03, "epochs": 80, "dev_f1": 51.8, "per_target": {}, "best_epoch": {}, "round": 1}],
             "best": {"lr": 0.03, "epochs": 80, "dev_f1": 51.8},
             "chosen": {"lr": 0.003, "epochs": 40, "dev_f1": 51.36, "why": "cheapest within 0.5 of the best"},
             "extensions": ["lr 1e-1 (the best sat at the largest lr)"]},
    "adapter": {"settings": [3, 4, 5, 6, 7], "targets": ["hi", "af", "az"], "seed": 1,
                "cells": [{"lr": 0.001, "epochs": 20, "dev_f1": 60.5, "per_target": {}, "round": 0}]},
    "inner-lr-meta": {"settings": [4], "targets": ["hi", "af", "az"], "seed": 1,
                      "cells": [{"inner_lr": 0.01, "lr": 0.003, "epochs": 40, "dev_f1": 60.2, "per_target": {}, "round": 0}],
                      "best": {"inner_lr": 0.01, "lr": 0.003, "epochs": 40, "dev_f1": 60.2},
                      "chosen": {"inner_lr": 0.01, "lr": 0.003, "epochs": 40, "dev_f1": 60.2, "why": "the best"},
                      "extensions": []}}}


def test_recipes_are_reported_under_the_table(tmp_path):
    """OUT/recipes.json (how each group's lr and epochs were chosen on dev F1) is printed under Table 1 and appended to
    table1.md: one row per group with the chosen cell, its dev F1, the best cell and the cells tried; a damaged one
    is an EvalError naming it."""
    write_result(str(tmp_path), 3, "hi", 1, 70.0)
    (tmp_path / "recipes.json").write_text(json.dumps(RECIPES))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "table1.md").read_text()
    assert md.index("| 3 | AT | 70.00") < md.index(f"Recipes chosen on dev F1 ({tmp_path / 'recipes.json'}): "
                                                  "the cheapest cell within 0.5 dev F1 of the best")
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ") and "|---" not in line}
    assert rows["head"] == ("| head | 2 | lr 0.003 x 40 epochs (cheapest within 0.5 of the best) | 51.36 | lr 0.03 x 80 epochs "
                            "(51.80) | 2; lr 1e-1 (the best sat at the largest lr) | hi af az (seed 1) |")
    assert "| adapter | 3-7 | grid unfinished (1 cells) | - |" in rows["adapter"]
    assert "| inner-lr-meta | 4 | inner lr 0.01, lr 0.003 x 40 epochs (the best) | 60.20 |" in rows["inner-lr-meta"]
    assert md in r.stdout.replace("\r", "")
    (tmp_path / "recipes.json").write_text(json.dumps({"version": 1, "groups": {"head": {"cells": 3}}}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "recipes.json" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr, r.stderr


def test_claims_per_target_across_priming_runs(tmp_path):
    """tools/claims.py: gaps and (target, priming run) counts on hand-made runs; settings 1-3 of the first directory
    serve the second (not primed), 4-7 come from each."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for s, (hi, af) in {1: (90, 80), 2: (50, 60), 3: (55, 58), 4: (70, 75), 5: (65, 76), 6: (71, 70), 7: (69, 74)}.items():
        write_result(a, s, "hi", 1, float(hi))
        write_result(a, s, "af", 1, float(af))
    for s, (hi, af) in {4: (72, 74), 5: (66, 70), 6: (60, 65), 7: (70, 73)}.items():
        write_result(b, s, "hi", 1, float(hi))
        write_result(b, s, "af", 1, float(af))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "claims.py"), a, b],
                         capture_output=True, text=True, check=True).stdout
    assert "| (a) | 4 - 3 | +16.00 (2/2) | +16.50 (2/2) | +16.25 ± 0.35 | 4 of 4 |" in out  # hi 15 17, af 17 16
    assert "| (b) | 4 - 5 | +2.00 (1/2) | +5.00 (2/2) | +3.50 ± 2.12 | 3 of 4 |" in out  # af -1 in a
    assert "| (c) | 4 - 7 | +1.00 (2/2) | +1.50 (2/2) | +1.25 ± 0.35 | 4 of 4 |" in out
    assert "| (c) | 4 - 6 | +2.00 (1/2) | +10.50 (2/2) | +6.25 ± 6.01 | 3 of 4 |" in out
    # full FT tops both targets in both runs; af's worst is AT (58), not head tuning (60)
    assert "full FT (1) the best of the settings run on 4 of 4 (target, priming run) pairs; head tuning (2) the worst on 2 of 4." in out
    # a primed run alone (no settings 1-3 anywhere): (a) has no pair, said as "-", not a crash; a missing directory: one line
    alone = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "claims.py"), b], capture_output=True, text=True)
    assert alone.returncode == 0 and "| (a) | 4 - 3 | - | - | 0 of 0 |" in alone.stdout, alone.stderr
    gone = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "claims.py"), str(tmp_path / "c")], capture_output=True, text=True)
    assert gone.returncode == 1 and gone.stderr.strip() == f"claims.py: {tmp_path / 'c'} is not a directory"
