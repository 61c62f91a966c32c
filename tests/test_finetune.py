"""The seven settings train exactly their groups; outputs are complete and re-scorable; --init is checked."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import evaluate
import finetune
import model
import prime

SMALL = ["--synthetic", "--train-size", "40", "--dev-size", "20", "--test-size", "20", "--epochs", "1",
         "--batch-size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def primed_dirs(tiny_dir, tmp_path_factory):
    """Stand-in primed checkpoints, one per variant (meta, ft, maml, one-step): the tiny model with every
    weight moved (differently per variant), adapter included, recording its variant as prime.py does."""
    dirs = {}
    for k, variant in enumerate(finetune.PRIMING.values()):
        tagger, tokenizer, _ = model.load_tagger(tiny_dir, data.LABELS, adapter_dim=8)
        torch.manual_seed(k)
        with torch.no_grad():
            for p in tagger.parameters():
                p.add_(0.05 * torch.randn_like(p))
        dirs[variant] = str(tmp_path_factory.mktemp(f"primed-{variant}"))
        model.save_checkpoint(dirs[variant], tagger, tokenizer, ("body", "adapter", "head"), tiny_dir, data.LABELS,
                              extra={"variant": variant})
    return dirs


def args_for(setting, tiny_dir, primed_dirs, out, extra=()):
    init = ["--init", primed_dirs[finetune.PRIMING[setting]]] if setting >= 4 else []
    return finetune.parse_args(["--setting", str(setting), "--lang", "hi", "--model", tiny_dir, "--out", str(out)]
                               + init + SMALL + list(extra))


@pytest.mark.parametrize("setting", range(1, 8))
def test_settings_train_exactly_their_groups(setting, tiny_dir, primed_dirs, tmp_path):
    args = args_for(setting, tiny_dir, primed_dirs, tmp_path)
    tagger, tokenizer, info = finetune.build_model(args)
    finetune.reset_new_groups(tagger, setting, seed=1)
    assert (tagger.adapter is None) == (setting <= 2)
    if setting >= 4:  # its own variant's primed body and adapter, new head
        primed, _, primed_info = model.load_tagger(primed_dirs[finetune.PRIMING[setting]], data.LABELS)
        assert info["variant"] == primed_info["variant"] == finetune.PRIMING[setting]
        assert torch.equal(tagger.adapter.up.weight, primed.adapter.up.weight)
        assert torch.equal(tagger.body.embeddings.word_embeddings.weight, primed.body.embeddings.word_embeddings.weight)
        assert not torch.equal(tagger.head.weight, primed.head.weight)
    if setting == 3:
        assert not tagger.adapter.up.weight.any()  # a new (identity) adapter
    before = {n: p.detach().clone() for n, p in tagger.named_parameters()}
    splits = {"train": 40, "validation": 20, "test": 20}
    examples = {s: data.encode(data.load_split("hi", s, synthetic=True, limit=n), tokenizer, 64) for s, n in splits.items()}
    result = finetune.train_one(args, "hi", 1, tagger, tokenizer, info, examples, str(tmp_path / "run"))
    moved = {model.group_of(n) for n, p in tagger.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {1: {"body", "head"}, 2: {"head"}}.get(setting, {"adapter", "head"})
    counts = model.param_counts(tagger)
    assert result["trainable_params"] == sum(counts[g] for g in moved)
    assert result["total_params"] == sum(counts[g] for g in model.GROUPS)


def test_outputs_rescore_and_rerun_skips(tiny_dir, primed_dirs, tmp_path):
    args = args_for(3, tiny_dir, primed_dirs, tmp_path, ["--seed", "1", "2", "--epochs", "2"])
    finetune.main(args)
    run = tmp_path / "hi" / "seed2"
    with open(run / "result.json") as f:
        result = json.load(f)
    assert result["setting"] == 3 and result["lang"] == "hi" and result["seed"] == 2
    assert result["best_epoch"] in (1, 2) and result["sizes"] == {"train": 40, "validation": 20, "test": 20}
    gold, pred = evaluate.read_predictions(run / "predictions.conll")
    assert gold == [tags for _, tags in data.load_split("hi", "test", synthetic=True, limit=20)]
    assert evaluate.entity_scores(gold, pred)["f1"] == pytest.approx(result["test_f1"])
    with open(run / "log.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]
    stamp = os.path.getmtime(run / "result.json")
    finetune.main(args)  # everything done: nothing is rerun
    assert os.path.getmtime(run / "result.json") == stamp


def test_seeds_in_one_process_match_separate_runs(tiny_dir, primed_dirs, tmp_path):
    """Each seed restarts from the same primed body/adapter, whatever ran before it in the process."""
    finetune.main(args_for(4, tiny_dir, primed_dirs, tmp_path / "both", ["--seed", "1", "2"]))
    finetune.main(args_for(4, tiny_dir, primed_dirs, tmp_path / "alone", ["--seed", "2"]))
    read = lambda d: json.load(open(tmp_path / d / "hi" / "seed2" / "result.json"))
    assert read("both")["test_f1"] == read("alone")["test_f1"] and read("both")["dev_f1"] == read("alone")["dev_f1"]
    assert open(tmp_path / "both/hi/seed2/predictions.conll").read() == open(tmp_path / "alone/hi/seed2/predictions.conll").read()


def test_init_is_required_checked_and_refused(tiny_dir, primed_dirs, tmp_path):
    with pytest.raises(model.ModelError, match="needs --init"):
        finetune.build_model(finetune.parse_args(["--setting", "meta", "--lang", "hi", "--out", str(tmp_path)]))
    with pytest.raises(model.ModelError, match="--init is for settings 4-7"):
        finetune.build_model(args_for(2, tiny_dir, primed_dirs, tmp_path, ["--init", primed_dirs["meta"]]))
    args = args_for(4, "other-bert", primed_dirs, tmp_path)
    with pytest.raises(model.ModelError, match=f"primed from '{tiny_dir}', not from --model 'other-bert'"):
        finetune.build_model(args)


@pytest.mark.parametrize("setting", [4, 5, 6, 7])
def test_primed_settings_refuse_another_variant(setting, tiny_dir, primed_dirs, tmp_path):
    """Regression: settings 4-7 accepted any primed checkpoint. Each refuses the other three variants (one
    line, exit 2 from the script), unless --allow-any-priming."""
    for variant, path in primed_dirs.items():
        argv = ["--setting", str(setting), "--lang", "hi", "--model", tiny_dir, "--out", str(tmp_path), "--init", path]
        if variant == finetune.PRIMING[setting]:
            finetune.build_model(finetune.parse_args(argv))
            continue
        with pytest.raises(model.ModelError, match=f"primed as '{variant}', but setting {setting} "
                           + re.escape(f"({evaluate.SETTINGS[setting]})") + " starts from "
                                                    f"'{finetune.PRIMING[setting]}' priming; pass --allow-any-priming"):
            finetune.build_model(finetune.parse_args(argv))
        assert finetune.build_model(finetune.parse_args(argv + ["--allow-any-priming"]))[2]["variant"] == variant
    if setting == 4:  # the script says it in one line, exit 2 (once: the path is the same for 5-7)
        r = subprocess.run([sys.executable, "finetune.py", *argv[:-1], primed_dirs["ft"], "--synthetic"],
                           capture_output=True, text=True, cwd=os.path.dirname(finetune.__file__))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pass --allow-any-priming" in r.stderr


def write_split(path, sentences):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join("".join(f"{t}\t{g}\n" for t, g in zip(*s)) for s in sentences))


@pytest.mark.parametrize("cache", [True, False])
def test_sentences_without_a_scorable_word_train_and_score(tiny_dir, tmp_path, cache):
    """Regression: a sentence whose every word has zero sub-words (here zero-width and soft-hyphen characters,
    which BERT's tokenizer drops) crashed adapter tuning with --cache-body (its empty label tensor was float);
    a batch of only such sentences would give a 0/0 loss. They must train, and score: predicted O, a gold
    entity among them counts as a miss."""
    empty = [(["\u200b", "\u00ad"], ["O", "O"]), (["\u200b"], ["B-PER"])]
    for split, n in [("train", 40), ("validation", 10), ("test", 10)]:
        sentences = data.load_split("hi", split, synthetic=True, limit=n)
        write_split(str(tmp_path / "data" / "hi" / f"{split}.tsv"), sentences[:3] + empty * 3 + sentences[3:])
    argv = ["--setting", "3", "--lang", "hi", "--model", tiny_dir, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
            "--epochs", "2", "--batch-size", "4", "--device", "cpu"] + (["--cache-body"] if cache else [])
    finetune.main(finetune.parse_args(argv))
    result = json.load(open(tmp_path / "o" / "hi" / "seed1" / "result.json"))
    assert result["sizes"]["train"] == 46 and result["unscored_test_words"] == 9
    gold, pred = evaluate.read_predictions(tmp_path / "o" / "hi" / "seed1" / "predictions.conll")
    assert len(gold) == 16 and pred[3:9] == [["O", "O"], ["O"]] * 3 and gold[4] == ["B-PER"]
    loss = model.tagging_loss(torch.zeros(2, 3, 7, requires_grad=True), torch.full((2, 3), -100))
    assert loss.item() == 0.0


def test_results_record_paths_relative_to_the_repo(tiny_dir, tmp_path):
    """Regression: result.json recorded the absolute data_dir of the machine (/work/main/../shared/wikiann)."""
    repo = os.path.dirname(os.path.abspath(finetune.__file__))
    assert model.portable(os.path.join(repo, "..", "shared", "wikiann")) == os.path.join("..", "shared", "wikiann")
    assert model.portable(os.path.join(repo, "runs", "x")) == os.path.join("runs", "x")
    assert model.portable("/elsewhere/data") == "/elsewhere/data" and model.portable(None) is None


def test_setting_names_and_recipes():
    assert [finetune.setting_number(s) for s in ["1", "full", "HT", "at", "meta", "ft-priming", "maml", "one-step"]] \
        == [1, 1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(Exception):
        finetune.setting_number("8")
    a = finetune.parse_args(["--setting", "1", "--lang", "hi", "--out", "x"])
    b = finetune.parse_args(["--setting", "4", "--lang", "hi", "--out", "x"])
    assert (a.lr, a.epochs, b.lr, b.epochs) == (5e-5, 5, 1e-3, 10)


@pytest.mark.parametrize("setting", [2, 3])
def test_cached_body_equals_plain_path_without_dropout(tiny_nodrop_dir, tmp_path, setting):
    """Dropout off, training on cached body outputs ends with the same weights and F1 as running the body."""
    from safetensors.torch import load_file
    runs = {}
    for cache in (False, True):
        out = tmp_path / f"cache{cache}"
        finetune.main(finetune.parse_args(["--setting", str(setting), "--lang", "hi", "--model", tiny_nodrop_dir,
                                           "--out", str(out), "--save-model", "--lr", "1e-2"] + SMALL + ["--epochs", "3"]
                                          + (["--cache-body"] if cache else [])))
        with open(out / "hi" / "seed1" / "result.json") as f:
            runs[cache] = json.load(f), load_file(str(out / "hi" / "seed1" / "model.safetensors"))
    (plain, plain_w), (cached, cached_w) = runs[False], runs[True]
    assert plain_w.keys() == cached_w.keys() and {k.split(".")[0] for k in plain_w} == {2: {"head"}, 3: {"adapter", "head"}}[setting]
    for k in plain_w:
        torch.testing.assert_close(cached_w[k], plain_w[k], rtol=1e-5, atol=1e-6)
    assert (cached["dev_f1"], cached["test_f1"], cached["best_epoch"]) == (plain["dev_f1"], plain["test_f1"], plain["best_epoch"])


def test_predict_from_cached_features_equals_full_forward(tiny, tiny_dir):
    tagger, tokenizer = tiny
    with torch.no_grad():  # a non-trivial adapter and head
        for p in list(tagger.adapter.parameters()) + list(tagger.head.parameters()):
            p.add_(0.5 * torch.randn_like(p))
    examples = data.encode(data.load_split("az", "test", synthetic=True, limit=50), tokenizer, 24)  # some truncated
    assert data.unscored_words(examples) > 0
    cache = finetune.word_features(tagger, examples, tokenizer.pad_token_id, batch_size=16)
    plain = finetune.predict(tagger, examples, tokenizer.pad_token_id, batch_size=16)
    assert finetune.predict(tagger, examples, tokenizer.pad_token_id, batch_size=16, cache=cache) == plain
    assert len({t for sent in plain for t in sent}) > 2  # the comparison is not between all-O outputs


def test_used_vocab_rows_full_finetuning_is_the_same(tiny_nodrop_dir, tmp_path):
    """Setting 1 with --vocab-rows used (default) and all: same F1, epoch and saved weights."""
    runs = {}
    for rows in ("used", "all"):
        out = tmp_path / rows
        finetune.main(finetune.parse_args(["--setting", "1", "--lang", "hi", "--model", tiny_nodrop_dir, "--out", str(out),
                                           "--save-model", "--lr", "1e-3", "--vocab-rows", rows] + SMALL + ["--epochs", "3"]))
        with open(out / "hi" / "seed1" / "result.json") as f:
            runs[rows] = json.load(f), model.load_tagger(str(out / "hi" / "seed1"), data.LABELS)[0].state_dict()
    (a, wa), (b, wb) = runs["used"], runs["all"]
    assert (a["test_f1"], a["dev_f1"], a["best_epoch"], a["trainable_params"]) == (b["test_f1"], b["dev_f1"], b["best_epoch"], b["trainable_params"])
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_feature_cache_is_shared_by_runs_on_the_same_body(tiny_dir, primed_dirs, tmp_path):
    """Settings 2 and 3 share the pretrained body: with --feature-cache the second run loads the body outputs the
    first stored (3 files: train, validation, test) and its results equal a run without the cache; a primed body
    gets files of its own."""
    cache = tmp_path / "features"
    results = {}
    for setting, flag in [(2, True), (3, True), (3, False), (4, True)]:
        out = tmp_path / f"s{setting}-{flag}"
        extra = ["--cache-body"] + (["--feature-cache", str(cache)] if flag else [])
        finetune.main(args_for(setting, tiny_dir, primed_dirs, out, extra))
        results[setting, flag] = json.load(open(out / "hi" / "seed1" / "result.json"))
        if setting == 2:
            files = {p.name: p.stat().st_mtime for p in cache.iterdir()}
            assert len(files) == 3
    assert {p.name: p.stat().st_mtime for p in cache.iterdir() if p.name in files} == files  # loaded, not rewritten
    assert len(list(cache.iterdir())) == 6  # the primed body (setting 4) has its own
    a, b = results[3, True], results[3, False]
    assert (a["test_f1"], a["dev_f1"], a["best_epoch"]) == (b["test_f1"], b["dev_f1"], b["best_epoch"])


def test_a_training_size_subset_from_the_shared_cache_equals_its_own_run(tiny_dir, tmp_path):
    """Issue I: one body pass over a split serves every training size. A run on the first 25 sentences that takes its
    features from the cache of the whole split (--cache-whole-split; built by a run on all of it) equals a run that
    computed its own (bit for bit on this tiny BERT; on a large encoder other batch shapes can move the last bits); and
    the cache serves no other body, max length or data file (each gets an entry of its own)."""
    def data_dir(name, retag_first=False):  # 80 / 20 / 20 synthetic sentences as files
        for split, n in (("train", 80), ("validation", 20), ("test", 20)):
            sentences = data.load_split("hi", split, synthetic=True, limit=n)
            if retag_first and split == "train":
                sentences[0] = (sentences[0][0], ["O"] * len(sentences[0][0]))
            write_split(str(tmp_path / name / "hi" / f"{split}.tsv"), sentences)
        return str(tmp_path / name)
    cache, files = tmp_path / "cache", data_dir("data")
    base = ["--setting", "3", "--lang", "hi", "--model", tiny_dir, "--epochs", "2", "--batch-size", "8", "--lr", "1e-2",
            "--cache-body", "--device", "cpu"]
    run = lambda name, *flags: finetune.main(finetune.parse_args(base + ["--out", str(tmp_path / name), *flags]))
    run("all", "--data-dir", files, "--feature-cache", str(cache))
    entries = set(os.listdir(cache))
    assert len(entries) == 3  # train, validation, test
    run("shared", "--data-dir", files, "--train-size", "25", "--feature-cache", str(cache), "--cache-whole-split")
    run("own", "--data-dir", files, "--train-size", "25")
    assert set(os.listdir(cache)) == entries  # served from the cache: no new entry, no second body pass
    a, b = (json.load(open(tmp_path / name / "hi" / "seed1" / "result.json")) for name in ("shared", "own"))
    assert a["sizes"]["train"] == 25 and (a["test_f1"], a["dev_f1"], a["best_epoch"]) == (b["test_f1"], b["dev_f1"], b["best_epoch"])
    assert open(tmp_path / "shared/hi/seed1/log.jsonl").read().split('"elapsed_s"')[0] == \
        open(tmp_path / "own/hi/seed1/log.jsonl").read().split('"elapsed_s"')[0]
    run("other-body", "--data-dir", files, "--feature-cache", str(cache), "--model", model.make_tiny_bert(str(tmp_path / "b2"), seed=1))
    run("other-length", "--data-dir", files, "--feature-cache", str(cache), "--max-len", "32")
    run("other-data", "--data-dir", data_dir("data2", retag_first=True), "--feature-cache", str(cache))
    assert len(os.listdir(cache)) == 3 + 3 + 3 + 1  # another body, another length: all new; another train file: train new


def test_scripts_start_without_the_heavy_libraries():
    """Start-up (H): `--help` and every process of the grid import our scripts first; they must not pull in seqeval
    (and scikit-learn), datasets, transformers, safetensors or peft, which each path imports where it needs them."""
    heavy = ("seqeval", "sklearn", "datasets", "transformers", "safetensors", "peft")
    code = ("import sys, bench, data, evaluate, finetune, model, pe, prime, dist, e5; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True).stdout
    assert out.strip() == "[]", out
    for script in ("finetune.py", "prime.py", "evaluate.py"):
        r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=root)
        assert r.returncode == 0 and "usage:" in r.stdout


@pytest.mark.parametrize("setting, flags", [("1", ["--cache-body"]), ("3", ["--pe", "lora", "--feature-cache", "c"]),
                                            ("4", ["--pe", "bitfit", "--cache-body"]), ("1", ["--feature-cache", "c"]),
                                            ("3", ["--allow-any-priming"]), ("2", ["--vocab-rows", "all"])])
def test_flags_that_would_not_act_are_refused_in_one_line(setting, flags, capsys):
    """The body's outputs can be kept only while it is frozen: full FT, LoRA and BitFit train it, so the cache flags
    would be ignored there; they are refused instead. So are --allow-any-priming without a priming and --vocab-rows
    where the embeddings do not train."""
    with pytest.raises(SystemExit) as e:
        finetune.parse_args(["--setting", setting, "--lang", "hi", "--out", "x"] + flags)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and flags[-2 if flags[-1] in ("c", "all") else -1] in line and f"setting {setting}" in line
    finetune.parse_args(["--setting", "2", "--lang", "hi", "--out", "x", "--cache-body", "--feature-cache", "c"])  # frozen: fine


@pytest.mark.parametrize("flags, says", [(["--train-size", "0"], "--train-size: '0' is not a whole number >= 1"),
                                         (["--test-size", "-5"], "--test-size: '-5'"), (["--epochs", "0"], "--epochs: '0'"),
                                         (["--batch-size", "0"], "--batch-size: '0'"), (["--max-len", "0"], "--max-len: '0'"),
                                         (["--synthetic", "--data-dir", "d"], "not allowed with argument")])
def test_counts_below_one_and_two_data_sources_are_refused_in_one_line(flags, says, capsys):
    with pytest.raises(SystemExit) as e:
        finetune.parse_args(["--setting", "3", "--lang", "hi", "--out", "x"] + flags)
    assert e.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]


def test_max_len_beyond_the_position_table_is_refused(tiny_dir, tmp_path):
    positions = json.load(open(os.path.join(tiny_dir, "config.json")))["max_position_embeddings"]
    with pytest.raises(model.ModelError, match=f"--max-len {positions + 1} exceeds the {positions} positions"):
        finetune.main(finetune.parse_args(["--setting", "3", "--lang", "hi", "--model", tiny_dir, "--out", str(tmp_path),
                                           "--max-len", str(positions + 1)] + SMALL))
    assert not os.listdir(tmp_path)


def test_save_model_on_a_finished_run_redoes_it_and_a_model_path_may_be_spelled_differently(tiny_dir, primed_dirs, tmp_path):
    finetune.main(args_for(3, tiny_dir, primed_dirs, tmp_path))
    first = json.load(open(tmp_path / "hi" / "seed1" / "result.json"))
    finetune.main(args_for(3, tiny_dir, primed_dirs, tmp_path, ["--save-model"]))  # no model saved the first time
    assert model.is_checkpoint(str(tmp_path / "hi" / "seed1"))
    again = json.load(open(tmp_path / "hi" / "seed1" / "result.json"))
    assert again["test_f1"] == first["test_f1"]
    argv = ["--setting", "4", "--lang", "hi", "--init", primed_dirs[finetune.PRIMING[4]], "--out", str(tmp_path / "s4")] + SMALL
    finetune.build_model(finetune.parse_args(argv + ["--model", tiny_dir.rstrip("/") + "/"]))  # the same directory: fine


def test_mean_word_position_trains_every_path(tiny_dir, tmp_path):
    """--word-position mean through full FT, a frozen body run per step, cached body outputs, and FT priming."""
    for setting, extra in ((1, []), (3, []), (3, ["--cache-body"]), (2, ["--cache-body"])):
        out = tmp_path / f"s{setting}{len(extra)}"
        finetune.main(finetune.parse_args(["--setting", str(setting), "--lang", "hi", "--model", tiny_dir, "--out", str(out),
                                           "--word-position", "mean"] + SMALL + extra))
        result = json.load(open(out / "hi" / "seed1" / "result.json"))
        assert result["config"]["word_position"] == "mean" and 0 <= result["test_f1"] <= 100
    prime.main(prime.parse_args(["--model", tiny_dir, "--synthetic", "--mode", "ft", "--train-size", "32", "--support-size", "8",
                                 "--query-size", "8", "--max-steps", "2", "--word-position", "mean", "--device", "cpu",
                                 "--out", str(tmp_path / "ft")]))
    assert (tmp_path / "ft" / "checkpoint.json").exists()
