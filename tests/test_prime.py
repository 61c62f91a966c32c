"""prime.py: the outer step (AdamW on the summed meta-gradients of tests/reference.py, the head set to the first
task's adapted head), each variant's script run against its reference, the cached support pass, dropout, bf16,
the vocabulary lever. The meta-gradients themselves: tests/test_meta.py."""
import contextlib
import copy
import json
import os

import pytest
import torch

import data
import meta
import model
import prime
import reference as ref
from model import group_of, load_tagger, tagging_loss


def make_tasks(tokenizer, n_langs=2, support=4, query=5, seed=0):
    by_lang = {lang: data.encode(data.load_split(lang, "train", synthetic=True, limit=40), tokenizer, 48)
               for lang in ["en", "es", "de"][:n_langs]}
    return next(data.meta_batches(by_lang, support, query, seed))


def snapshot(tagger):
    return {n: p.detach().clone() for n, p in tagger.named_parameters()}


def test_cached_support_pass_equals_plain_without_dropout(tiny):
    """Dropout off: running the body once per task gives the same adapted weights and meta-gradients
    as running it at every inner step."""
    tagger, tokenizer = tiny
    tasks = make_tasks(tokenizer)
    names = list(model.named_group_params(tagger, meta.INNER_GROUPS["pe"]))
    support = data.collate(tasks[0][0], tokenizer.pad_token_id)
    plain, plain_losses = meta.fast_adapt(tagger, support, names, 5, 0.03)
    features = model.body_output(tagger, support, dropout=False)
    cached, cached_losses = meta.fast_adapt(tagger, support, names, 5, 0.03, features)
    assert cached_losses == pytest.approx(plain_losses, rel=1e-6)
    for n in names:
        torch.testing.assert_close(cached[n], plain[n], rtol=1e-6, atol=1e-7)
    grads = {}
    for support_pass in ("plain", "cached", "cached-eval"):
        tagger.zero_grad(set_to_none=True)
        meta.meta_gradients(tagger, tasks, tokenizer.pad_token_id, names, 5, 0.03, support_pass=support_pass)
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
    a = model.body_output(tagger, support, dropout=True)
    b = model.body_output(tagger, support, dropout=True)
    assert not torch.equal(a, b)  # dropout is on in train mode
    assert torch.equal(model.body_output(tagger, support, dropout=False), model.body_output(tagger, support, dropout=False))
    assert tagger.body.training  # the body's mode is restored


VARIANT_FLAGS = {"meta": [], "ft": ["--mode", "ft"], "maml": ["--inner-scope", "all"], "one-step": ["--inner-steps", "1"]}


def reference_gradients(tagger, tasks, pad_id, variant):
    """tests/reference.py's gradients of one meta-batch for a variant of settings 4-7 (ft: one plain gradient of the
    union of the tasks' sentences), and the head the variant leaves (None for ft: AdamW trains it)."""
    if variant == "ft":
        m = copy.deepcopy(tagger)
        ref.loss(m, ref.pad([ex for s, q in tasks for ex in s + q], pad_id)).backward()
        return {n: p.grad for n, p in m.named_parameters()}, None
    every = [n for n, _ in tagger.named_parameters() if n not in ref.HEAD]
    names, steps = {"meta": (ref.ADAPTER, 5), "maml": (every, 5), "one-step": (ref.ADAPTER, 1)}[variant]
    return ref.first_order(tagger, tasks, pad_id, names, steps, 0.03)


@pytest.mark.parametrize("variant", list(VARIANT_FLAGS))
def test_prime_step_applies_adamw_to_the_reference_gradients(tiny, variant):
    """One outer step: the gradients it leaves equal the reference's (body + adapter; ft: everything), AdamW (lr 5e-5,
    wd 0.01) applied to them gives the new weights, the head becomes the first task's adapted head (meta variants),
    and the schedule decays linearly. (AdamW's first step is about -lr * sign(g): weights computed from two separately
    summed gradients can differ where g is ~0, so gradients are compared before AdamW, not weights after it.)"""
    tagger, tokenizer = tiny
    args = prime.parse_args(["--out", "-", "--model", "x", "--device", "cpu"] + VARIANT_FLAGS[variant])
    tasks = make_tasks(tokenizer)
    expected, head = reference_gradients(tagger, tasks, tokenizer.pad_token_id, variant)
    before, start = copy.deepcopy(tagger), snapshot(tagger)
    optimizer, schedule = prime.make_optimizer(tagger, args, total_steps=10)
    prime.prime_step(tagger, optimizer, schedule, tasks, args, tokenizer.pad_token_id)
    params = dict(before.named_parameters())
    for n, p in tagger.named_parameters():
        if head is not None and n in ref.HEAD:
            torch.testing.assert_close(p, head[n], rtol=1e-5, atol=1e-7, msg=n)
            continue
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7, msg=n)
        params[n].grad = p.grad.clone()
    adamw = [params[n] for n, _ in tagger.named_parameters() if head is None or n not in ref.HEAD]
    torch.optim.AdamW(adamw, lr=5e-5, weight_decay=0.01).step()
    for n, p in tagger.named_parameters():
        if head is None or n not in ref.HEAD:
            torch.testing.assert_close(p, params[n], rtol=1e-6, atol=1e-9, msg=n)
    moved = {n for n, p in tagger.named_parameters() if not torch.equal(p, start[n])}
    assert moved >= {n for n, g in expected.items() if g.any()} | (set(ref.HEAD) if head else set())  # all that had a gradient
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-5 * 9 / 10)  # linear decay, no warm-up


def first_step_in_process(tiny_dir, flags, seed=1):
    """prime.py's first meta-step computed in this process with prime_step: the same initial weights (torch seed,
    then load), the same first meta-batch (the script's seed * 1000 epoch seed), dropout off."""
    torch.manual_seed(seed)
    tagger, tokenizer, _ = load_tagger(tiny_dir, data.LABELS)
    by_lang = {lang: data.encode(data.load_split(lang, "train", synthetic=True, limit=64), tokenizer, 128) for lang in ("en", "es")}
    tasks = next(data.meta_batches(by_lang, 8, 8, seed=seed * 1000))
    args = prime.parse_args(["--out", "-", "--model", "x", "--device", "cpu"] + flags)
    optimizer, schedule = prime.make_optimizer(tagger, args, total_steps=1)
    tagger.train()
    prime.prime_step(tagger, optimizer, schedule, tasks, args, tokenizer.pad_token_id)
    return tagger


@pytest.mark.parametrize("name", list(VARIANT_FLAGS))
def test_prime_script_runs_each_variant(tiny_nodrop_dir, tmp_path, name):
    """prime.py with each variant's flags: the checkpoint after one meta-step is that variant's prime_step (checked
    against the reference above) and no other variant's (so swapped variants fail), it records its variant, and the
    log shows the variant's inner loop (5, 1 or no support losses per task) and the step's own learning rate."""
    out = str(tmp_path / "primed")
    prime.main(prime.parse_args(["--model", tiny_nodrop_dir, "--synthetic", "--train-size", "64", "--support-size", "8",
                                 "--query-size", "8", "--max-steps", "1", "--out", out, "--device", "cpu"] + VARIANT_FLAGS[name]))
    primed, _, info = load_tagger(out, data.LABELS)
    assert info["variant"] == name and info["base_model"] == tiny_nodrop_dir and info["groups"] == ["body", "pe", "head"]
    got = primed.state_dict()
    for other, flags in VARIANT_FLAGS.items():
        expected = first_step_in_process(tiny_nodrop_dir, flags).state_dict()
        same = all(torch.allclose(got[k], expected[k], rtol=1e-6, atol=1e-9) for k in expected)
        assert same == (other == name), (name, other)
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert len(log) == 1 and log[0]["lr"] == 5e-5  # the rate step 1 used (not the next step's, 0 here)
    inner = [len(t.get("support_loss", [])) for t in log[0]["tasks"]]
    assert inner == {"meta": [5, 5], "maml": [5, 5], "one-step": [1, 1], "ft": [0]}[name]


def test_prime_script_writes_checkpoint_config_and_log(tiny_dir, tmp_path):
    out = str(tmp_path / "primed")
    prime.main(prime.parse_args(["--model", tiny_dir, "--synthetic", "--train-size", "64", "--support-size", "8",
                                 "--query-size", "8", "--epochs", "2", "--out", out, "--device", "cpu", "--warmup-ratio", "0.25",
                                 "--max-steps", "100"]))  # stops after 2 epochs, the first of the two limits
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
    assert name("--inner-lr", "0.1") == "meta"
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
    forwards = []  # the body's forward passes run inside autocast (adapter+head on cached body outputs run in fp32)
    tagger.body.register_forward_hook(lambda *_: forwards.append(torch.is_autocast_enabled("cpu")))
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
    names = list(model.named_group_params(tagger, meta.INNER_GROUPS["pe"]))
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
                    h = torch.bmm(s["pool"], h)  # each word's sub-words averaged (the default --word-position mean)
            sgd.zero_grad()
            tagging_loss(m.head(m.adapter(h)), s["labels"]).backward()
            sgd.step()
        m.zero_grad()
        tagging_loss(m(q["input_ids"], q["attention_mask"], q["pool"]), q["labels"]).backward()
        for (n, p), c in zip(ref.named_parameters(), m.parameters()):
            if group_of(n) != "head":
                p.grad = c.grad if p.grad is None else p.grad + c.grad
    grads = {}
    for mode in ("train", "eval"):
        getattr(tagger, mode)()
        tagger.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        meta.meta_gradients(tagger, tasks, pad, names, 5, 0.03, support_pass=support_pass)
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


def test_prime_refuses_an_interrupted_priming_with_other_flags(tiny_dir, tmp_path, monkeypatch, capsys):
    """Regression: without --resume, an OUT holding an interrupted priming (resume.pt + log.jsonl, no checkpoint yet)
    made with other flags had its log truncated and its resume.pt overwritten. It is refused with or without --resume,
    both files left as they are; the same flags without --resume start it over, and say so."""
    argv = lambda *extra: prime.parse_args(["--model", tiny_dir, "--synthetic", "--train-size", "64", "--support-size", "8",
                                            "--query-size", "8", "--max-steps", "3", "--save-every", "1", "--out",
                                            str(tmp_path), "--device", "cpu", *extra])
    real_step, calls = prime.prime_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # during step 3: resume.pt holds step 2
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(prime, "prime_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prime.main(argv())
    monkeypatch.setattr(prime, "prime_step", real_step)
    files = {name: (tmp_path / name).read_bytes() for name in ("resume.pt", "log.jsonl")}
    assert len(files["log.jsonl"].splitlines()) == 2 and not (tmp_path / "checkpoint.json").exists()
    for extra in ([], ["--resume"]):
        with pytest.raises(model.ModelError, match=r"resume.pt was written with other flags \(--inner_lr: 0.03 -> 0.1\)"):
            prime.main(argv("--inner-lr", "0.1", *extra))
        assert {name: (tmp_path / name).read_bytes() for name in files} == files
    prime.main(argv())
    assert "holds an interrupted priming (meta-step 2) with these flags; starting it over" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.json").exists() and not (tmp_path / "resume.pt").exists()
