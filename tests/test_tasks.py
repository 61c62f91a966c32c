"""--task: NER, part-of-speech tagging and a user's own tag file; each task's tags, metric and checks."""
import json
import os
import re
import shlex
import subprocess

import pytest

import data
import finetune
import model
import prime
import report
import tasks
from conftest import ROOT

SMALL = ["--train-size", "40", "--dev-size", "20", "--test-size", "20", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]


def test_a_tag_file_is_a_task_scored_by_f1_when_iob2_else_accuracy(tmp_path):
    iob, plain, bad = tmp_path / "iob.txt", tmp_path / "plain.txt", tmp_path / "bad.txt"
    iob.write_text("# chunks\nO\nB-NP\nI-NP\n\n")
    plain.write_text("N\nV\nADJ\n")
    bad.write_text("N\nN\n")
    assert tasks.get(str(iob)).labels == ["O", "B-NP", "I-NP"] and tasks.get(str(iob)).metric == "f1"
    assert tasks.get(str(plain)).metric == "accuracy" and tasks.get("pos").metric == "accuracy"
    assert tasks.get("ner").labels == data.LABELS and len(tasks.get("pos").labels) == 17
    for name in (str(bad), str(tmp_path / "missing.txt"), "chunking"):
        with pytest.raises(tasks.TaskError):
            tasks.get(name)


def test_token_accuracy_counts_every_word():
    gold = [["NOUN", "VERB", "PUNCT"], ["DET", "NOUN"]]
    pred = [["NOUN", "NOUN", "PUNCT"], ["DET", "-"]]  # "-": a word with no sub-word position (finetune.predict)
    assert tasks.scores(tasks.get("pos"), gold, pred) == {"accuracy": 60.0}
    ner = tasks.scores(tasks.get("ner"), [["B-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]])
    assert ner["f1"] == 100.0 and set(ner) == {"f1", "precision", "recall"}


def test_synthetic_pos_data_uses_upos_tags_on_the_ner_sentences():
    ner, pos = (data.load_split("hi", "train", synthetic=True, limit=50, task=tasks.get(t)) for t in ("ner", "pos"))
    assert [tokens for tokens, _ in ner] == [tokens for tokens, _ in pos]
    assert {t for _, tags in pos for t in tags} <= set(tasks.UPOS_TAGS) and len({t for _, tags in pos for t in tags}) >= 4
    assert all((n != "O") <= (p == "PROPN" or p == "NOUN") for (_, nt), (_, pt) in zip(ner, pos) for n, p in zip(nt, pt))


@pytest.mark.parametrize("task, tags", [("pos", "O"), ("ner", "NOUN")])
def test_a_tag_the_task_does_not_know_is_refused_in_one_line_naming_file_and_tag(task, tags, tmp_path, tiny_dir):
    (tmp_path / "hi").mkdir()
    for split in data.SPLITS:
        (tmp_path / "hi" / f"{split}.tsv").write_text(f"bo\t{tags}\nka\t{tags}\n")
    args = finetune.parse_args(["--setting", "2", "--task", task, "--lang", "hi", "--data-dir", str(tmp_path),
                                "--model", tiny_dir, "--out", str(tmp_path / "o")] + SMALL)
    with pytest.raises(data.DataError) as error:  # the scripts print it as one line and exit 2
        finetune.main(args)
    assert str(error.value).startswith(f"{tmp_path}/hi/train.tsv:1: unknown tag '{tags}'; allowed: ")
    assert "\n" not in str(error.value) and "--task" in str(error.value)


def test_a_priming_for_one_task_is_refused_for_another(tiny_dir, tmp_path):
    pos = str(tmp_path / "pos")
    prime.main(prime.parse_args(["--model", tiny_dir, "--synthetic", "--task", "pos", "--train-size", "64", "--support-size",
                                 "8", "--query-size", "8", "--max-steps", "2", "--device", "cpu", "--out", pos]))
    assert json.load(open(os.path.join(pos, "checkpoint.json")))["labels"] == tasks.UPOS_TAGS
    ner = str(tmp_path / "ner")  # a priming made before --task existed: NER, no task recorded
    tagger, tokenizer, _ = model.load_tagger(tiny_dir, data.LABELS)
    model.save_checkpoint(ner, tagger, tokenizer, ("body", "pe", "head"), tiny_dir, data.LABELS,
                          extra={"variant": "meta", "priming": {"model": tiny_dir}})
    for init, task, primed in ((pos, "ner", "pos"), (ner, "pos", "ner")):
        args = finetune.parse_args(["--setting", "4", "--init", init, "--task", task, "--lang", "hi", "--synthetic",
                                    "--out", str(tmp_path / "o")] + SMALL)
        with pytest.raises(model.ModelError, match=f"primed for --task {primed}, not --task {task}"):
            finetune.build_model(args)
    args = finetune.parse_args(["--setting", "4", "--init", pos, "--task", "pos", "--lang", "hi", "--synthetic",
                                "--out", str(tmp_path / "s4")] + SMALL)
    finetune.main(args)
    result = json.load(open(tmp_path / "s4" / "hi" / "seed1" / "result.json"))
    assert result["task"] == "pos" and result["metric"] == "accuracy" and 0 <= result["test_accuracy"] <= 100
    assert "test_f1" not in result and result["identity"]["task"] == "pos"
    assert result["identity"]["priming.task"] == "pos"


def test_ner_runs_record_no_task_so_older_runs_resume(tiny_dir, tmp_path):
    """--task ner is the identity of a run made before --task existed: result.json reads as before (test_f1, no task
    key), and an older run (no task in its config) counts as done, not as made with other settings."""
    args = finetune.parse_args(["--setting", "2", "--lang", "hi", "--synthetic", "--model", tiny_dir, "--out", str(tmp_path)] + SMALL)
    finetune.main(args)
    path = tmp_path / "hi" / "seed1" / "result.json"
    result = json.load(open(path))
    assert "task" not in result and "task" not in result["identity"] and {"test_f1", "dev_f1"} <= set(result)
    del result["config"]["task"], result["identity"]  # as written before --task existed
    path.write_text(json.dumps(result))
    assert finetune.is_done(str(path.parent), args, finetune.run_identity(args))


def test_the_docs_example_of_a_users_own_tags_runs(tiny_dir, tmp_path):
    """docs/usage.md's commands for a user's own tags, run as written (in-process; the tiny model for the encoder)."""
    usage = open(os.path.join(ROOT, "docs", "usage.md")).read()
    block = re.search(r"```bash\n(python finetune.py --setting 3 --task docs/example-task.*?)```", usage, re.S).group(1)
    block = block.replace("multilingual-e5-small", tiny_dir).replace("runs/example", str(tmp_path / "example"))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for command in block.replace("\\\n", " ").strip().splitlines():
            script, *argv = shlex.split(command)[1:]
            if script == "finetune.py":
                finetune.main(finetune.parse_args(argv))
            else:
                assert script == "evaluate.py"
                report.main(argv)
    finally:
        os.chdir(cwd)
    result = json.load(open(tmp_path / "example" / "s3" / "xx" / "seed1" / "result.json"))
    assert result["metric"] == "f1" and result["task"].endswith("docs/example-task/tags.txt") and "test_f1" in result
    assert "| 3 | AT | " in (tmp_path / "example" / "table1.md").read_text()


def test_run_table1_pos_smoke_end_to_end(tmp_path, tiny_dir):
    out = tmp_path / "pos"
    r = subprocess.run(["bash", os.path.join(ROOT, "run_table1.sh"), "--task", "pos", "--preset", "smoke", "--settings", "2",
                        "--targets", "hi,af", "--recipe", "preset", "--model", tiny_dir, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "table1.md").read_text()
    assert table.startswith("Test token accuracy (--task pos)") and "| 2 | HT |" in table  # POS priming: test above
    assert "(77.42" not in table  # no paper value: the paper's numbers are NER F1
    assert "mean_accuracy" in (out / "table1.csv").read_text().splitlines()[0]


def dry_run(*argv):
    return subprocess.run(["bash", os.path.join(ROOT, "run_table1.sh"), "--dry-run", *argv], capture_output=True, text=True, timeout=60)


def test_run_table1_pos_mini_runs_on_the_committed_pos_recipes(tmp_path):
    """--task pos --preset mini tunes on the recipes --recipe auto chose for POS (results/pos-mini/recipes.json), no grid;
    a PE method without a measured POS recipe is refused in one line."""
    chosen = {g: v["chosen"] for g, v in json.load(open(os.path.join(ROOT, "results", "pos-mini", "recipes.json")))["groups"].items()}
    r = dry_run("--task", "pos", "--preset", "mini", "--out", str(tmp_path / "pos"))
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line)[2:] for line in r.stdout.splitlines() if line.startswith("+ python")]
    assert not [c for c in commands if c[0].endswith("recipe.py")]
    for setting, group in (("1", "full"), ("2", "head"), ("3", "adapter"), ("7", "adapter")):
        argv = next(c[1:] for c in commands if c[0].endswith("finetune.py") and c[2] == setting)
        args = finetune.parse_args(argv)
        assert (args.lr, args.epochs, args.recipe) == (chosen[group]["lr"], chosen[group]["epochs"], None), setting
    r = dry_run("--task", "pos", "--preset", "mini", "--pe", "lora", "--out", str(tmp_path / "lora"))
    assert r.returncode != 0 and "no measured lora recipe for --task pos" in r.stderr and len(r.stderr.splitlines()) == 1


def test_run_table1_pos_mini_chooses_its_recipes_on_a_smaller_full_ft_grid(tmp_path):
    """--task pos --preset mini --recipe auto: recipes chosen on dev accuracy of af eu hu (the first 3 POS targets), full FT's
    first grid cut to 2 x 2 and not extended (4 epochs cap it); every command it would run parses."""
    r = dry_run("--task", "pos", "--preset", "mini", "--recipe", "auto", "--out", str(tmp_path / "pos"))
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line)[2:] for line in r.stdout.splitlines() if line.startswith("+ python")]
    grids = {c[c.index("--group") + 1]: c for c in commands if c[0].endswith("recipe.py")}
    assert sorted(grids) == ["adapter", "full", "head"] and all(c[c.index("--targets") + 1:][:3] == ["af", "eu", "hu"] for c in grids.values())
    assert grids["full"][grids["full"].index("--lrs"):][:6] == ["--lrs", "1e-4,3e-4", "--epochs", "2,4", "--max-extensions", "0"]
    assert "--lrs" not in grids["head"] and "--lrs" not in grids["adapter"]
    primings = [c[1:] for c in commands if c[0].endswith("prime.py")]
    tunings = [c[1:] for c in commands if c[0].endswith("finetune.py")]
    assert len(primings) == 4 and len(tunings) == 6 + 6 * 2  # --jobs 2: full FT per target, then 2 units per setting
    # the grids write: not parsed here
    for argv in primings:
        args = prime.parse_args(argv)
        assert args.task == "pos" and args.word_position == "mean" and args.sources == ["en", "fi"]
    assert all(argv[argv.index("--task") + 1] == "pos" and "--recipe" in argv and "--word-position" not in argv for argv in tunings)


def test_a_pos_word_without_a_sub_word_is_an_error_and_the_log_says_so(tiny_dir, tmp_path, capsys):
    """A word the tokenizer drops (a zero-width space) has no position to predict from: NER predicts it O, POS gives it
    no tag, so it counts as an error; the log line said "predicted O" for POS too."""
    (tmp_path / "hi").mkdir()
    for split in data.SPLITS:
        (tmp_path / "hi" / f"{split}.tsv").write_text("bo\tNOUN\n\u200b\tPUNCT\nka\tVERB\n\nbo\tNOUN\n")
    finetune.main(finetune.parse_args(["--setting", "2", "--task", "pos", "--lang", "hi", "--data-dir", str(tmp_path),
                                       "--model", tiny_dir, "--out", str(tmp_path / "o")] + SMALL))
    out = capsys.readouterr().out
    assert "hi test: 1 words lie beyond --max-len 128 (or have no sub-word); they get no tag and count as errors" in out
    assert "predicted O" not in out
    result = json.load(open(tmp_path / "o" / "hi" / "seed1" / "result.json"))
    assert result["unscored_test_words"] == 1 and result["test_accuracy"] <= 75.0
    gold, pred = report.read_predictions(tmp_path / "o" / "hi" / "seed1" / "predictions.conll")
    assert gold[0][1] == "PUNCT" and pred[0][1] == "-"
