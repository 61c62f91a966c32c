"""Algorithm 1 against an independent reference (bench.naive_meta_gradients: a deep copy of the
model per task, S plain torch.optim.SGD steps, the query gradient at the adapted weights), and
the cached support pass against the plain one."""
import contextlib
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


VARIANT_FLAGS = {"meta": [], "ft": ["--mode", "ft"], "maml": ["--inner-scope", "all"], "one-step": ["--inner-steps", "1"]}


def one_reference_step(tiny_dir, variant, seed=1):
    """An independent reference of prime.py's first meta-step for one variant, dropout off: the same initial
    weights (torch seed, then load) and meta-batch, then bench.naive_meta_gradients (deep copies, plain SGD)
    or one plain gradient (ft), and one AdamW step; the head as the variant sets it."""
    torch.manual_seed(seed)
    tagger, tokenizer, _ = load_tagger(tiny_dir, data.LABELS)
    by_lang = {lang: data.encode(data.load_split(lang, "train", synthetic=True, limit=64), tokenizer, 128) for lang in ("en", "es")}
    tasks = next(data.meta_batches(by_lang, 8, 8, seed=seed * 1000))
    if variant == "ft":
        batch = data.collate([ex for s, q in tasks for ex in s + q], tokenizer.pad_token_id)
        tagging_loss(tagger(batch["input_ids"], batch["attention_mask"]), batch["labels"]).backward()
        torch.optim.AdamW(tagger.parameters(), lr=5e-5, weight_decay=0.01).step()
        return tagger
    scope, steps = ("all", 5) if variant == "maml" else ("pe", 1 if variant == "one-step" else 5)
    head = naive_meta_gradients(tagger, tasks, tokenizer.pad_token_id, steps, 0.03, scope)
    torch.optim.AdamW([p for n, p in tagger.named_parameters() if group_of(n) != "head"], lr=5e-5, weight_decay=0.01).step()
    with torch.no_grad():
        for n, p in tagger.named_parameters():
            if group_of(n) == "head":
                p.copy_(head[n])
    return tagger


@pytest.mark.parametrize("name", list(VARIANT_FLAGS))
def test_prime_script_runs_each_variant_as_its_reference(tiny_nodrop_dir, tmp_path, name):
    """prime.py with each variant's flags: the checkpoint after one meta-step equals that variant's reference
    and differs from every other variant's (so swapped variants fail), it records its variant, and the log
    shows the variant's inner loop (5, 1 or no support losses per task) and the step's own learning rate."""
    out = str(tmp_path / "primed")
    prime.main(prime.parse_args(["--model", tiny_nodrop_dir, "--synthetic", "--train-size", "64", "--support-size", "8",
                                 "--query-size", "8", "--max-steps", "1", "--out", out, "--device", "cpu"] + VARIANT_FLAGS[name]))
    primed, _, info = load_tagger(out, data.LABELS)
    assert info["variant"] == name and info["base_model"] == tiny_nodrop_dir and info["groups"] == ["body", "pe", "head"]
    got = primed.state_dict()
    for other in VARIANT_FLAGS:
        ref = one_reference_step(tiny_nodrop_dir, other).state_dict()
        same = all(torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-7) for k in ref)
        assert same == (other == name), (name, other)
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert len(log) == 1 and log[0]["lr"] == 5e-5  # the rate step 1 used (not the next step's, 0 here)
    inner = [len(t.get("support_loss", [])) for t in log[0]["tasks"]]
    assert inner == {"meta": [5, 5], "maml": [5, 5], "one-step": [1, 1], "ft": [0]}[name]


def test_prime_script_writes_checkpoint_config_and_log(tiny_dir, tmp_path):
    out = str(tmp_path / "primed")
    prime.main(prime.parse_args(["--model", tiny_dir, "--synthetic", "--train-size", "64", "--support-size", "8",
                                 "--query-size", "8", "--epochs", "2", "--out", out, "--device", "cpu", "--warmup-ratio", "0.25"]))
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == list(range(1, 9))  # 64 // 16 = 4 steps per epoch, 2 epochs
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # 2 warm-up steps, then linear decay to 0 at step 9: the rate each step used
    assert [r["lr"] for r in log] == pytest.approx([0, 2.5e-5, 5e-5, 4.1667e-5, 3.3333e-5, 2.5e-5, 1.6667e-5, 8.333e-6], rel=1e-3)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["steps"] == 8 and config["variant"] == "meta"


def test_variant_names():
    name = lambda *flags: prime.variant(prime.parse_args(["--out", "x", *flags]))
    assert [name(*f) for f in VARIANT_FLAGS.values()] == list(VARIANT_FLAGS)
    assert name("--inner-lr", "0.1") == "meta" and name("--mode", "ft", "--inner-steps", "1") == "ft"
    assert name("--inner-scope", "all", "--inner-steps", "1") == "meta(inner_scope=all, inner_steps=1)"


class RecordAutocast:
    """Autocast (bf16, CPU) that records whether any gradient is taken inside it."""
    inside, grads_inside = False, []

    def __init__(self):
        self.ctx = torch.autocast("cpu", dtype=torch.bfloat16)

    def __enter__(self):
        RecordAutocast.inside = True
        return self.ctx.__enter__()

    def __exit__(self, *exc):
        RecordAutocast.inside = False
        return self.ctx.__exit__(*exc)


@pytest.mark.parametrize("flags", [[], ["--support-pass", "plain"], ["--inner-scope", "all"], ["--mode", "ft"]])
def test_bf16_backward_runs_outside_autocast(tiny, tmp_path, monkeypatch, flags):
    """Regression: with --bf16 the backward passes (inner torch.autograd.grad and the query backward) ran inside
    the autocast context. Forward passes must run inside it, every gradient outside."""
    tagger, tokenizer = tiny
    calls = []
    real_grad, real_backward = torch.autograd.grad, torch.Tensor.backward
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(RecordAutocast.inside) or real_grad(*a, **k))
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: calls.append(RecordAutocast.inside) or real_backward(self, *a, **k))
    forwards = []
    tagger.head.register_forward_hook(lambda *_: forwards.append(torch.is_autocast_enabled("cpu")))
    monkeypatch.setattr(prime, "precision", lambda device, bf16: RecordAutocast() if bf16 else contextlib.nullcontext())
    args = prime.parse_args(["--out", str(tmp_path), "--model", "x", "--device", "cpu", "--bf16"] + flags)
    optimizer, schedule = prime.make_optimizer(tagger, args, total_steps=10)
    prime.prime_step(tagger, optimizer, schedule, make_tasks(tokenizer), args, tokenizer.pad_token_id)
    assert calls and not any(calls)
    assert forwards and all(forwards)


@pytest.mark.parametrize("support_pass", ["cached", "plain"])
def test_dropout_on_meta_gradient_equals_reference(tiny_dir, support_pass):
    """The dropout-on path (train mode, as prime.py runs): an independent reference on a deep copy with the same
    RNG stream gives the same meta-gradients. cached: ONE dropout mask for the S steps (the body runs once on the
    support batch); plain: the body runs at every step. Both differ from the dropout-off gradients."""
    tagger, tokenizer, _ = load_tagger(tiny_dir, data.LABELS, adapter_dim=8)
    assert tagger.body.config.hidden_dropout_prob > 0
    tasks, pad = make_tasks(tokenizer), tokenizer.pad_token_id
    names = list(prime.named_group_params(tagger, prime.INNER_GROUPS["pe"]))
    ref = copy.deepcopy(tagger)
    ref.train()
    torch.manual_seed(7)
    for support, query in tasks:
        m = copy.deepcopy(ref)
        sgd = torch.optim.SGD(list(m.adapter.parameters()) + list(m.head.parameters()), lr=0.03)
        s, q = data.collate(support, pad), data.collate(query, pad)
        for step in range(5):
            if step == 0 or support_pass == "plain":
                with torch.no_grad():
                    h = m.body(input_ids=s["input_ids"], attention_mask=s["attention_mask"]).last_hidden_state
            sgd.zero_grad()
            tagging_loss(m.head(m.adapter(h)), s["labels"]).backward()
            sgd.step()
        m.zero_grad()
        tagging_loss(m(q["input_ids"], q["attention_mask"]), q["labels"]).backward()
        for (n, p), c in zip(ref.named_parameters(), m.parameters()):
            if group_of(n) != "head":
                p.grad = c.grad if p.grad is None else p.grad + c.grad
    grads = {}
    for mode in ("train", "eval"):
        getattr(tagger, mode)()
        tagger.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        prime.meta_gradients(tagger, tasks, pad, names, 5, 0.03, support_pass=support_pass)
        grads[mode] = {n: p.grad for n, p in tagger.named_parameters() if p.grad is not None}
    for n, p in ref.named_parameters():
        if group_of(n) != "head":
            torch.testing.assert_close(grads["train"][n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert not torch.allclose(grads["train"]["adapter.down.weight"], grads["eval"]["adapter.down.weight"])


def test_prime_script_primes_with_dropout_on(tiny_dir, tmp_path):
    """Regression guard: prime.py trains with dropout (train mode). Its first meta-step equals the dropout-on
    reference (same seed: the same initial weights, then the same dropout masks), not the dropout-off one."""
    out = str(tmp_path / "primed")
    prime.main(prime.parse_args(["--model", tiny_dir, "--synthetic", "--train-size", "64", "--support-size", "8",
                                 "--query-size", "8", "--max-steps", "1", "--out", out, "--device", "cpu"]))
    got = load_tagger(out, data.LABELS)[0].state_dict()
    for dropout in (True, False):
        torch.manual_seed(1)
        tagger, tokenizer, _ = load_tagger(tiny_dir, data.LABELS)
        tagger.train(dropout)
        by_lang = {l: data.encode(data.load_split(l, "train", synthetic=True, limit=64), tokenizer, 128) for l in ("en", "es")}
        args = prime.parse_args(["--out", "-", "--model", "x", "--device", "cpu"])
        optimizer, schedule = prime.make_optimizer(tagger, args, total_steps=1)
        prime.prime_step(tagger, optimizer, schedule, next(data.meta_batches(by_lang, 8, 8, seed=1000)), args, tokenizer.pad_token_id)
        ref = tagger.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref) == dropout


@pytest.mark.parametrize("flags", [[], ["--mode", "ft"], ["--inner-scope", "all"]])
def test_used_vocab_rows_prime_the_same_checkpoint(tiny_nodrop_dir, tmp_path, flags):
    """--vocab-rows used (default) and all end with the same checkpoint, unused rows included (they decay)."""
    states = {}
    for rows in ("used", "all"):
        out = str(tmp_path / rows)
        prime.main(prime.parse_args(["--model", tiny_nodrop_dir, "--synthetic", "--train-size", "64", "--support-size", "8",
                                     "--query-size", "8", "--max-steps", "3", "--out", out, "--device", "cpu",
                                     "--vocab-rows", rows, "--weight-decay", "0.5", "--lr", "1e-3"] + flags))
        states[rows] = load_tagger(out, data.LABELS)[0].state_dict()
    for k, v in states["all"].items():
        torch.testing.assert_close(states["used"][k], v, rtol=1e-5, atol=1e-6, msg=k)
