"""Algorithm 1 against an independent reference (bench.naive_meta_gradients: a deep copy of the
model per task, S plain torch.optim.SGD steps, the query gradient at the adapted weights), and
the cached support pass against the plain one."""
import copy
import json
import os

import pytest
import torch

import data
import prime
from bench import naive_meta_gradients
from model import group_of, load_tagger, tagging_loss


def make_tasks(tokenizer, n_langs=2, support=4, query=5, seed=0):
    by_lang = {lang: data.encode(data.load_split(lang, "train", synthetic=True, limit=40), tokenizer, 48)
               for lang in ["en", "es", "de"][:n_langs]}
    return next(data.meta_batches(by_lang, support, query, seed))


def snapshot(tagger):
    return {n: p.detach().clone() for n, p in tagger.named_parameters()}


@pytest.mark.parametrize("scope", ["pe", "all"])
def test_inner_loop_updates_only_its_scope(tiny, scope):
    tagger, tokenizer = tiny
    support, _ = make_tasks(tokenizer)[0]
    before = snapshot(tagger)
    names = list(prime.named_group_params(tagger, prime.INNER_GROUPS[scope]))
    fast, losses = prime.fast_adapt(tagger, data.collate(support, tokenizer.pad_token_id), names, 5, 0.03)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert all(torch.equal(p, before[n]) for n, p in tagger.named_parameters())  # the model itself is untouched
    expected = {"pe": {"adapter", "head"}, "all": {"body", "adapter", "head"}}[scope]
    assert {group_of(n) for n in fast} == expected
    moved = {group_of(n) for n, w in fast.items() if not torch.equal(w, before[n])}
    assert moved == expected  # every group in scope moved; nothing outside it is even copied


def reference(tagger, tasks, pad_id, steps, scope):
    """(summed first-order meta-gradients of body+adapter, first task's adapted head) from the naive path."""
    ref = copy.deepcopy(tagger)
    first_head = naive_meta_gradients(ref, tasks, pad_id, steps, 0.03, scope)
    return {n: p.grad for n, p in ref.named_parameters() if group_of(n) != "head"}, first_head


@pytest.mark.parametrize("scope, steps, support_pass", [("pe", 5, "cached"), ("pe", 5, "plain"), ("pe", 1, "cached"),
                                                        ("all", 3, "cached")])
def test_meta_gradient_equals_reference(tiny, scope, steps, support_pass):
    tagger, tokenizer = tiny
    tasks = make_tasks(tokenizer)
    ref_grads, ref_head = reference(tagger, tasks, tokenizer.pad_token_id, steps, scope)
    tagger.zero_grad(set_to_none=True)
    names = list(prime.named_group_params(tagger, prime.INNER_GROUPS[scope]))
    stats, first_head = prime.meta_gradients(tagger, tasks, tokenizer.pad_token_id, names, steps, 0.03,
                                             support_pass=support_pass)
    assert len(stats) == 2
    for n, p in tagger.named_parameters():
        if group_of(n) == "head":
            assert p.grad is None  # no meta-gradient for the head
        else:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    for n, w in ref_head.items():
        torch.testing.assert_close(first_head[n], w, rtol=1e-5, atol=1e-7)


def test_cached_support_pass_equals_plain_without_dropout(tiny):
    """Dropout off: running the body once per task gives the same adapted weights and meta-gradients
    as running it at every inner step."""
    tagger, tokenizer = tiny
    tasks = make_tasks(tokenizer)
    names = list(prime.named_group_params(tagger, prime.INNER_GROUPS["pe"]))
    support = data.collate(tasks[0][0], tokenizer.pad_token_id)
    plain, plain_losses = prime.fast_adapt(tagger, support, names, 5, 0.03)
    features = prime.body_output(tagger, support, dropout=False)
    cached, cached_losses = prime.fast_adapt(tagger, support, names, 5, 0.03, features)
    assert cached_losses == pytest.approx(plain_losses, rel=1e-6)
    for n in names:
        torch.testing.assert_close(cached[n], plain[n], rtol=1e-6, atol=1e-7)
    grads = {}
    for support_pass in ("plain", "cached", "cached-eval"):
        tagger.zero_grad(set_to_none=True)
        prime.meta_gradients(tagger, tasks, tokenizer.pad_token_id, names, 5, 0.03, support_pass=support_pass)
        grads[support_pass] = {n: p.grad.clone() for n, p in tagger.named_parameters() if p.grad is not None}
    for support_pass in ("cached", "cached-eval"):
        for n, g in grads["plain"].items():
            torch.testing.assert_close(grads[support_pass][n], g, rtol=1e-5, atol=1e-7)


def test_body_output_dropout_modes(tiny_dir):
    """The cached support pass samples dropout ("cached") or not ("cached-eval"), and restores the mode."""
    tagger, tokenizer, _ = load_tagger(tiny_dir, data.LABELS, adapter_dim=8)
    support = data.collate(make_tasks(tokenizer)[0][0], tokenizer.pad_token_id)
    tagger.train()
    torch.manual_seed(0)
    a = prime.body_output(tagger, support, dropout=True)
    b = prime.body_output(tagger, support, dropout=True)
    assert not torch.equal(a, b)  # dropout is on in train mode
    assert torch.equal(prime.body_output(tagger, support, dropout=False), prime.body_output(tagger, support, dropout=False))
    assert tagger.body.training  # the body's mode is restored


def test_prime_step_adamw_on_body_adapter_and_head_reset(tiny, tmp_path):
    tagger, tokenizer = tiny
    args = prime.parse_args(["--out", str(tmp_path), "--model", "x", "--device", "cpu"])
    tasks = make_tasks(tokenizer)
    ref = copy.deepcopy(tagger)  # the reference outer step: AdamW(5e-5) on the naive summed gradients
    ref_head = naive_meta_gradients(ref, tasks, tokenizer.pad_token_id, 5, 0.03)
    torch.optim.AdamW([p for n, p in ref.named_parameters() if group_of(n) != "head"], lr=5e-5, weight_decay=0.01).step()

    optimizer, schedule = prime.make_optimizer(tagger, args, total_steps=10)
    before = snapshot(tagger)
    prime.prime_step(tagger, optimizer, schedule, tasks, args, tokenizer.pad_token_id)
    for n, p in tagger.named_parameters():
        expected = ref_head[n] if group_of(n) == "head" else dict(ref.named_parameters())[n]
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-7, msg=n)
        assert not torch.equal(p, before[n]), n  # body, adapter and head all moved
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-5 * 9 / 10)  # linear decay, no warm-up


def test_ft_priming_trains_everything_on_the_same_examples(tiny, tmp_path):
    tagger, tokenizer = tiny
    args = prime.parse_args(["--out", str(tmp_path), "--model", "x", "--mode", "ft", "--device", "cpu"])
    tasks = make_tasks(tokenizer)
    optimizer, schedule = prime.make_optimizer(tagger, args, total_steps=10)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(p.numel() for p in tagger.parameters())
    ref = copy.deepcopy(tagger)
    batch = data.collate([ex for s, q in tasks for ex in s + q], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 * (4 + 5)
    tagging_loss(ref(batch["input_ids"], batch["attention_mask"]), batch["labels"]).backward()
    prime.prime_step(tagger, optimizer, schedule, tasks, args, tokenizer.pad_token_id)
    for n, p in tagger.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[n].grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("flags", [[], ["--mode", "ft"], ["--inner-scope", "all"], ["--inner-steps", "1"]])
def test_prime_script_writes_checkpoint_config_and_log(tiny_dir, tmp_path, flags):
    out = str(tmp_path / "primed")
    prime.main(prime.parse_args(["--model", tiny_dir, "--synthetic", "--train-size", "64", "--support-size", "8",
                                 "--query-size", "8", "--epochs", "2", "--out", out, "--device", "cpu"] + flags))
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == list(range(1, 9))  # 64 // 16 = 4 steps per epoch, 2 epochs
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["steps"] == 8
    primed, _, info = load_tagger(out, data.LABELS)
    assert info["base_model"] == tiny_dir and info["groups"] == ["body", "adapter", "head"]
    original, _, _ = load_tagger(tiny_dir, data.LABELS)
    assert not torch.equal(primed.body.embeddings.word_embeddings.weight, original.body.embeddings.word_embeddings.weight)
