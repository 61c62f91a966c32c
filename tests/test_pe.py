"""LoRA and BitFit beside the adapter (pe.py): a new PE method is the identity, each method trains exactly its
parameters, a LoRA round-trips through the peft library, and a checkpoint primed for one method refuses another.
(Priming each method against an independent reference: tests/test_meta.py.) Tiny random BERT, dropout off."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import finetune
import model
import pe
import prime
from conftest import ROOT
from model import load_tagger

METHODS = {"lora": pe.config("lora", lora_rank=4, lora_alpha=8), "bitfit": pe.config("bitfit"), "adapter": pe.config("adapter", 8)}


def tagger_with(tiny_dir, method, seed=0):
    torch.manual_seed(seed)
    tagger, tokenizer, _ = load_tagger(tiny_dir, data.LABELS, adapter_dim=0, pe_config=METHODS[method])
    tagger.eval()
    return tagger, tokenizer


def tasks_of(tokenizer, n_langs=2):
    by_lang = {lang: data.encode(data.load_split(lang, "train", synthetic=True, limit=40), tokenizer, 48)
               for lang in ["en", "es", "de"][:n_langs]}
    return next(data.meta_batches(by_lang, 4, 5, seed=0))


def test_new_lora_is_the_identity(tiny_dir):
    plain, tokenizer = tagger_with(tiny_dir, "bitfit")  # BitFit adds nothing: the plain tagger
    lora, _ = tagger_with(tiny_dir, "lora")
    lora.head.load_state_dict(plain.head.state_dict())
    batch = data.collate(tasks_of(tokenizer)[0][0], tokenizer.pad_token_id)
    assert torch.equal(lora(batch["input_ids"], batch["attention_mask"]), plain(batch["input_ids"], batch["attention_mask"]))
    layers = [n for n, _ in lora.body.named_modules() if hasattr(_, "lora_A")]
    assert len(layers) == 2 * lora.body.config.num_hidden_layers and all(n.endswith(("query", "value")) for n in layers)
    with torch.no_grad():  # and the branch does act once B moves
        next(m for m in lora.body.modules() if hasattr(m, "lora_B")).lora_B.weight.fill_(0.1)
    assert not torch.equal(lora(batch["input_ids"], batch["attention_mask"]), plain(batch["input_ids"], batch["attention_mask"]))


def test_bitfit_trains_exactly_the_bias_count_model_check_prints(tiny_dir, capsys):
    model.main(["--check", tiny_dir, "--lora-rank", "4"])
    out = capsys.readouterr().out
    printed = {m: int(re.search(rf"{m} tuning +trains +([\d,]+) of.*{m} ([\d,]+) \+ head", out).group(2).replace(",", ""))
               for m in pe.METHODS}
    tagger, _ = tagger_with(tiny_dir, "bitfit")
    biases = sum(p.numel() for n, p in tagger.body.named_parameters() if n.endswith(".bias"))
    trainable, _ = model.set_trainable(tagger, ("pe", "head"))
    assert printed["bitfit"] == biases == trainable - sum(p.numel() for p in tagger.head.parameters())
    assert {n for n, p in tagger.named_parameters() if p.requires_grad} == \
        {n for n, _ in tagger.named_parameters() if n.endswith(".bias") and n.startswith("body.")} | {"head.weight", "head.bias"}
    lora, _ = tagger_with(tiny_dir, "lora")
    hidden, layers = lora.body.config.hidden_size, lora.body.config.num_hidden_layers
    assert printed["lora"] == layers * 2 * (4 * hidden + hidden * 4) == model.param_counts(lora)["pe"]


@pytest.fixture(scope="module")
def primed_lora(tiny_nodrop_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("primed-lora"))
    prime.main(prime.parse_args(["--model", tiny_nodrop_dir, "--synthetic", "--train-size", "64", "--support-size", "8",
                                 "--query-size", "8", "--max-steps", "2", "--out", out, "--device", "cpu", "--pe", "lora"]))
    return out


def peft_logits(body_dir, lora_dir, head, batch):
    from peft import PeftModel
    from transformers import AutoModel
    body = PeftModel.from_pretrained(AutoModel.from_pretrained(body_dir), lora_dir).eval()
    return head(body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state)


def test_a_large_lora_round_trips_through_peft(tiny_nodrop_dir, tmp_path):
    """export_peft + save_plain_body: peft's PeftModel computes our logits, for a LoRA whose effect (LoRA on vs off)
    is thousands of times the comparison's tolerance, so a lost or misplaced branch cannot pass."""
    tagger, tokenizer = tagger_with(tiny_nodrop_dir, "lora")
    batch = data.collate(tasks_of(tokenizer)[0][1], tokenizer.pad_token_id)
    plain = tagger(batch["input_ids"], batch["attention_mask"]).detach()  # B = 0: the LoRA is the identity
    with torch.no_grad():
        for n, p in tagger.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.5)
    ours = tagger(batch["input_ids"], batch["attention_mask"]).detach()
    assert (ours - plain).abs().max() > 1e4 * 1e-6  # the effect, against atol 1e-6 below
    pe.save_plain_body(tagger.body, tokenizer, str(tmp_path / "body"))
    pe.export_peft(tagger.body, tagger.pe, str(tmp_path / "lora"), str(tmp_path / "body"))
    torch.testing.assert_close(peft_logits(str(tmp_path / "body"), str(tmp_path / "lora"), tagger.head, batch), ours,
                               rtol=1e-5, atol=1e-6)


def test_primed_and_tuned_lora_load_in_peft_with_the_same_logits(tiny_nodrop_dir, primed_lora, tmp_path):
    primed, tokenizer, info = load_tagger(primed_lora, data.LABELS)
    primed.eval()
    assert info["pe"]["method"] == "lora" and info["variant"] == "meta"
    assert any(".lora_B." in n and p.abs().sum() > 0 for n, p in primed.named_parameters())  # priming moved B
    batch = data.collate(tasks_of(tokenizer)[0][1], tokenizer.pad_token_id)
    ours = primed(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(peft_logits(os.path.join(primed_lora, "peft-body"), os.path.join(primed_lora, "peft-lora"),
                                           primed.head, batch), ours, rtol=1e-5, atol=1e-6)
    out = tmp_path / "tuned"
    finetune.main(finetune.parse_args(["--setting", "4", "--pe", "lora", "--init", primed_lora, "--lang", "hi", "--synthetic",
                                       "--train-size", "40", "--dev-size", "20", "--test-size", "20", "--epochs", "1",
                                       "--lr", "1e-2", "--save-model", "--out", str(out), "--device", "cpu"]))
    run = out / "hi" / "seed1"
    tuned, _, tuned_info = load_tagger(str(run), data.LABELS)
    tuned.eval()
    assert tuned_info["groups"] == ["pe", "head"] and tuned_info["init"] == primed_lora
    config = json.loads((run / "peft-lora" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == ["query", "value"]
    torch.testing.assert_close(peft_logits(os.path.join(primed_lora, "peft-body"), str(run / "peft-lora"), tuned.head, batch),
                               tuned(batch["input_ids"], batch["attention_mask"]), rtol=1e-5, atol=1e-6)
    result = json.loads((run / "result.json").read_text())
    assert result["pe"]["method"] == "lora"
    assert result["trainable_params"] == model.param_counts(tuned)["pe"] + model.param_counts(tuned)["head"]


def test_checkpoint_primed_for_one_method_refuses_another(tiny_nodrop_dir, primed_lora, tmp_path):
    argv = ["--setting", "4", "--init", primed_lora, "--lang", "hi", "--synthetic", "--out", str(tmp_path)]
    with pytest.raises(model.ModelError, match="was primed for PE method 'lora', not for --pe adapter"):
        finetune.main(finetune.parse_args(argv + ["--pe", "adapter"]))
    r = subprocess.run([sys.executable, "finetune.py", *argv, "--pe", "bitfit"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr  # the script: one line, exit 2
    assert "was primed for PE method 'lora', not for --pe bitfit" in r.stderr


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_pe_tuning_trains_the_method_from_a_new_start(tiny_dir, tmp_path, method):
    """Setting 3 with --pe: a new LoRA (B = 0) or the pretrained biases; only the method + head move."""
    args = finetune.parse_args(["--setting", "3", "--pe", method, "--lang", "hi", "--model", tiny_dir, "--synthetic",
                                "--train-size", "40", "--dev-size", "20", "--test-size", "20", "--epochs", "1", "--lr", "1e-2",
                                "--batch-size", "8", "--out", str(tmp_path), "--device", "cpu"])
    tagger, tokenizer, info = finetune.build_model(args)
    finetune.reset_new_groups(tagger, 3, seed=1)
    assert tagger.pe["method"] == method and all(not p.any() for n, p in tagger.named_parameters() if ".lora_B." in n)
    before = {n: p.detach().clone() for n, p in tagger.named_parameters()}
    examples = {s: data.encode(data.load_split("hi", s, synthetic=True, limit=n), tokenizer, 64)
                for s, n in {"train": 40, "validation": 20, "test": 20}.items()}
    result = finetune.train_one(args, "hi", 1, tagger, tokenizer, info, examples, str(tmp_path / "run"))
    moved = {n for n, p in tagger.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n in before if pe.is_pe(n, method)} | {"head.weight", "head.bias"}
    assert result["trainable_params"] == sum(before[n].numel() for n in moved) and result["pe"] == info["pe"]


@pytest.mark.parametrize("script, argv, says", [
    ("prime", ["--pe", "adapter", "--lora-rank", "4"], "--lora-rank do(es) not apply to --pe adapter"),
    ("prime", ["--pe", "bitfit", "--adapter-dim", "32"], "--adapter-dim do(es) not apply to --pe bitfit"),
    ("finetune", ["--setting", "3", "--pe", "lora", "--adapter-dim", "32"], "--adapter-dim do(es) not apply to --pe lora"),
    ("finetune", ["--setting", "1", "--pe", "lora"], "--pe: this setting has no PE method"),
    ("finetune", ["--setting", "2", "--adapter-dim", "32"], "--adapter-dim: this setting has no PE method"),
    ("finetune", ["--setting", "4", "--adapter-dim", "32"], "--adapter-dim 32 (primed with 8)"),
])
def test_pe_flags_that_would_be_ignored_are_refused_in_one_line(tmp_path, capsys, script, argv, says):
    """A PE flag is honoured or refused: another method's values, PE values for settings 1-2, and values that differ
    from those a primed checkpoint was made with (settings 4-7 tune the method as primed)."""
    (tmp_path / "checkpoint.json").write_text(json.dumps({"pe": {"method": "adapter", "dim": 8}}))
    parse = {"prime": prime.parse_args, "finetune": finetune.parse_args}[script]
    common = ["--out", str(tmp_path / "o")] + (["--lang", "hi", "--init", str(tmp_path)] if script == "finetune" else [])
    with pytest.raises(SystemExit) as e:
        parse(argv + common)
    assert e.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]
    if script == "finetune":  # the primed value itself is fine
        assert parse(["--setting", "4", "--adapter-dim", "8"] + common).adapter_dim == 8


def test_lora_targets_the_body_lacks_are_refused_by_name(tiny_dir):
    for targets in (["query", "valeu"], ["LayerNorm"]):  # a typo beside a real name; a layer that is not linear
        with pytest.raises(model.ModelError, match=f"--lora-targets {targets[-1]}: no linear layer .* key query value"):
            load_tagger(tiny_dir, data.LABELS, pe_config=pe.config("lora", lora_targets=targets))


def test_an_interrupted_peft_export_leaves_no_complete_checkpoint(tiny_nodrop_dir, tmp_path, monkeypatch):
    """checkpoint.json marks a complete priming: it is written after the peft export, so a run killed while exporting
    is primed again by the same command, not reported as done without its peft directories."""
    argv = ["--model", tiny_nodrop_dir, "--synthetic", "--train-size", "64", "--support-size", "8", "--query-size", "8",
            "--max-steps", "1", "--out", str(tmp_path), "--device", "cpu", "--pe", "lora"]
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pe, "export_peft", killed)
    with pytest.raises(KeyboardInterrupt):
        prime.main(prime.parse_args(argv))
    assert not (tmp_path / "checkpoint.json").exists()
    monkeypatch.undo()
    prime.main(prime.parse_args(argv))
    assert (tmp_path / "checkpoint.json").exists() and (tmp_path / "peft-lora" / "adapter_model.safetensors").exists()
