"""LoRA and BitFit beside the adapter (pe.py): a new PE method is the identity, each method trains exactly its
parameters, the inner loop of priming touches only that method's copies + head, the first-order meta-gradient
equals an independent reference for every method, a LoRA round-trips through the peft library, and a checkpoint
primed for one method refuses another. Tiny random BERT, dropout off."""
import copy
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
from bench import naive_meta_gradients
from conftest import ROOT
from model import group_of, load_tagger

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


def nonzero_lora_b(tagger):
    """A LoRA away from its zero start (as after priming), so that A gets a gradient too."""
    with torch.no_grad():
        for n, p in tagger.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)


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


def test_bitfit_trains_exactly_the_bias_count_model_check_prints(tiny_dir):
    out = subprocess.run([sys.executable, "model.py", "--check", tiny_dir, "--lora-rank", "4"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
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


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_inner_loop_changes_only_the_methods_copies_and_head(tiny_dir, method):
    tagger, tokenizer = tagger_with(tiny_dir, method)
    nonzero_lora_b(tagger)  # from B = 0, A's first updates are below float32 resolution
    support, _ = tasks_of(tokenizer)[0]
    before = {n: p.detach().clone() for n, p in tagger.named_parameters()}
    names = list(prime.named_group_params(tagger, prime.INNER_GROUPS["pe"]))
    fast, losses = prime.fast_adapt(tagger, data.collate(support, tokenizer.pad_token_id), names, 5, 0.03)
    assert all(torch.equal(p, before[n]) for n, p in tagger.named_parameters())  # the model itself is untouched
    expected = {n for n in before if pe.is_pe(n, method)} | {"head.weight", "head.bias"}
    assert set(fast) == expected and {n for n, w in fast.items() if not torch.equal(w, before[n])} == expected
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["lora", "bitfit"])
@pytest.mark.parametrize("support_pass", ["cached", "plain"])
def test_meta_gradient_equals_reference(tiny_dir, method, support_pass):
    """First-order meta-gradient for body and PE parameters (the BitFit biases are both) against deep copies
    taking S plain SGD steps on the method's parameters + head (bench.naive_meta_gradients). The cached support
    pass cannot apply inside the body; asking for it must still give the exact result."""
    tagger, tokenizer = tagger_with(tiny_dir, method)
    nonzero_lora_b(tagger)
    tasks = tasks_of(tokenizer)
    ref = copy.deepcopy(tagger)
    ref_head = naive_meta_gradients(ref, tasks, tokenizer.pad_token_id, 5, 0.03, "pe")
    names = list(prime.named_group_params(tagger, prime.INNER_GROUPS["pe"]))
    stats, head = prime.meta_gradients(tagger, tasks, tokenizer.pad_token_id, names, 5, 0.03, support_pass=support_pass)
    assert len(stats) == 2 and len(stats[0]["support_loss"]) == 5
    for (n, p), r in zip(tagger.named_parameters(), ref.parameters()):
        if group_of(n) == "head":
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-7, msg=n)
    for n, w in ref_head.items():
        torch.testing.assert_close(head[n], w, rtol=1e-5, atol=1e-7)
    pe_grads = [p.grad for n, p in tagger.named_parameters() if pe.is_pe(n, method)]
    assert pe_grads and all(g.abs().sum() > 0 for g in pe_grads)


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
    argv = ["finetune.py", "--setting", "4", "--init", primed_lora, "--lang", "hi", "--synthetic", "--out", str(tmp_path)]
    for other in ("bitfit", "adapter"):
        r = subprocess.run([sys.executable, *argv, "--pe", other], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"was primed for PE method 'lora', not for --pe {other}" in r.stderr


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
