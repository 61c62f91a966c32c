"""The seven settings train exactly their groups; outputs are complete and re-scorable; --init is checked."""
import json
import os

import pytest
import torch

import data
import finetune
import model
from evaluate import entity_scores, read_predictions

SMALL = ["--synthetic", "--train-size", "40", "--dev-size", "20", "--test-size", "20", "--epochs", "1",
         "--batch-size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def primed_dir(tiny_dir, tmp_path_factory):
    """A stand-in primed checkpoint: the tiny model with every weight moved, adapter included."""
    tagger, tokenizer, _ = model.load_tagger(tiny_dir, data.LABELS, adapter_dim=8)
    with torch.no_grad():
        for p in tagger.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("primed"))
    model.save_checkpoint(path, tagger, tokenizer, ("body", "adapter", "head"), tiny_dir, data.LABELS)
    return path


def args_for(setting, tiny_dir, primed_dir, out, extra=()):
    init = ["--init", primed_dir] if setting >= 4 else []
    return finetune.parse_args(["--setting", str(setting), "--lang", "hi", "--model", tiny_dir, "--out", str(out)]
                               + init + SMALL + list(extra))


@pytest.mark.parametrize("setting", range(1, 8))
def test_settings_train_exactly_their_groups(setting, tiny_dir, primed_dir, tmp_path):
    args = args_for(setting, tiny_dir, primed_dir, tmp_path)
    tagger, tokenizer, info = finetune.build_model(args)
    finetune.reset_new_groups(tagger, setting, seed=1)
    assert (tagger.adapter is None) == (setting <= 2)
    primed, _, _ = model.load_tagger(primed_dir, data.LABELS)
    if setting >= 4:  # primed body and adapter, new head
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
    assert moved == set(finetune.TRAINABLE[setting])
    counts = model.param_counts(tagger)
    assert result["trainable_params"] == sum(counts[g] for g in finetune.TRAINABLE[setting])
    assert result["total_params"] == sum(counts.values())


def test_outputs_rescore_and_rerun_skips(tiny_dir, primed_dir, tmp_path):
    args = args_for(3, tiny_dir, primed_dir, tmp_path, ["--seed", "1", "2", "--epochs", "2"])
    finetune.main(args)
    run = tmp_path / "hi" / "seed2"
    with open(run / "result.json") as f:
        result = json.load(f)
    assert result["setting"] == 3 and result["lang"] == "hi" and result["seed"] == 2
    assert result["best_epoch"] in (1, 2) and result["sizes"] == {"train": 40, "validation": 20, "test": 20}
    gold, pred = read_predictions(run / "predictions.conll")
    assert gold == [tags for _, tags in data.load_split("hi", "test", synthetic=True, limit=20)]
    assert entity_scores(gold, pred)["f1"] == pytest.approx(result["test_f1"])
    with open(run / "log.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]
    stamp = os.path.getmtime(run / "result.json")
    finetune.main(args)  # everything done: nothing is rerun
    assert os.path.getmtime(run / "result.json") == stamp


def test_seeds_in_one_process_match_separate_runs(tiny_dir, primed_dir, tmp_path):
    """Each seed restarts from the same primed body/adapter, whatever ran before it in the process."""
    finetune.main(args_for(4, tiny_dir, primed_dir, tmp_path / "both", ["--seed", "1", "2"]))
    finetune.main(args_for(4, tiny_dir, primed_dir, tmp_path / "alone", ["--seed", "2"]))
    read = lambda d: json.load(open(tmp_path / d / "hi" / "seed2" / "result.json"))
    assert read("both")["test_f1"] == read("alone")["test_f1"] and read("both")["dev_f1"] == read("alone")["dev_f1"]
    assert open(tmp_path / "both/hi/seed2/predictions.conll").read() == open(tmp_path / "alone/hi/seed2/predictions.conll").read()


def test_init_is_required_checked_and_refused(tiny_dir, primed_dir, tmp_path):
    with pytest.raises(model.ModelError, match="needs --init"):
        finetune.build_model(finetune.parse_args(["--setting", "meta", "--lang", "hi", "--out", str(tmp_path)]))
    with pytest.raises(model.ModelError, match="--init is for settings 4-7"):
        finetune.build_model(args_for(2, tiny_dir, primed_dir, tmp_path, ["--init", primed_dir]))
    args = args_for(4, "other-bert", primed_dir, tmp_path)
    with pytest.raises(model.ModelError, match=f"primed from '{tiny_dir}', not from --model 'other-bert'"):
        finetune.build_model(args)


def test_setting_names_and_recipes():
    assert [finetune.setting_number(s) for s in ["1", "full", "HT", "at", "meta", "ft-priming", "maml", "one-step"]] \
        == [1, 1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(Exception):
        finetune.setting_number("8")
    a = finetune.parse_args(["--setting", "1", "--lang", "hi", "--out", "x"])
    b = finetune.parse_args(["--setting", "4", "--lang", "hi", "--out", "x"])
    assert (a.lr, a.epochs, b.lr, b.epochs) == (5e-5, 5, 1e-3, 10)


@pytest.fixture(scope="module")
def tiny_nodrop_dir(tmp_path_factory):
    return model.make_tiny_bert(str(tmp_path_factory.mktemp("tiny-nodrop")), dropout=0.0)


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
    assert plain_w.keys() == cached_w.keys() and {k.split(".")[0] for k in plain_w} == set(finetune.TRAINABLE[setting])
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
