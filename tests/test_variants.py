"""Priming that simulates fine-tuning more faithfully (prime.py --inner-head fresh, --inner-optimizer adamw,
--support-batches K, long inner loops), exact second-order MAML, and Reptile, each against an independent
reference on a tiny random BERT with dropout off."""
import copy
import json
import os

import pytest
import torch

import data
import prime
from model import group_of, load_tagger, tagging_loss


@pytest.fixture
def tagger(tiny_dir):
    torch.manual_seed(0)
    t, tokenizer, _ = load_tagger(tiny_dir, data.LABELS, adapter_dim=8)
    t.eval()
    with torch.no_grad():  # an adapter away from its identity start, so every part of it has a gradient
        t.adapter.up.weight.normal_(0, 0.05)
    return t, tokenizer


def tasks_of(tokenizer, support=4, query=5):
    by_lang = {lang: data.encode(data.load_split(lang, "train", synthetic=True, limit=60), tokenizer, 48) for lang in ("en", "es")}
    return next(data.meta_batches(by_lang, support, query, seed=0))


def pe_params(m):
    return [p for n, p in m.named_parameters() if group_of(n) in ("adapter", "head")]


def plain_loss(m, batch):
    return tagging_loss(m(batch["input_ids"], batch["attention_mask"]), batch["labels"])


def sum_grads(into, source, skip_head=True):
    for (n, p), c in zip(into.named_parameters(), source.parameters()):
        if c.grad is not None and not (skip_head and group_of(n) == "head"):
            p.grad = c.grad.clone() if p.grad is None else p.grad + c.grad


def test_adamw_inner_loop_equals_torch_adamw_on_a_deep_copy(tagger):
    tagger, tokenizer = tagger
    support = data.collate(tasks_of(tokenizer)[0][0], tokenizer.pad_token_id)
    names = list(prime.named_group_params(tagger, prime.INNER_GROUPS["pe"]))
    ref = copy.deepcopy(tagger)
    adamw = torch.optim.AdamW(pe_params(ref), lr=1e-2, weight_decay=0.01)
    for _ in range(6):
        adamw.zero_grad()
        plain_loss(ref, support).backward()
        adamw.step()
    features = prime.body_output(tagger, support, dropout=False)
    for f in (None, features):  # plain and cached support pass
        fast, losses = prime.fast_adapt_adamw(tagger, support, names, 6, 1e-2, f)
        for n, p in ref.named_parameters():
            if n in fast:
                torch.testing.assert_close(fast[n], p, rtol=1e-5, atol=1e-6, msg=n)
    sgd, _ = prime.fast_adapt(tagger, support, names, 6, 1e-2, features)
    assert not torch.allclose(sgd["adapter.up.weight"], fast["adapter.up.weight"])  # not SGD in disguise


def test_support_batches_are_taken_in_turn(tagger):
    """K=2 support batches and S=4: the steps use batches 1, 2, 1, 2 (reference: SGD on a deep copy)."""
    tagger, tokenizer = tagger
    support, _ = tasks_of(tokenizer, support=8)[0]
    supports, _ = prime.task_batches(support, support[:1], tokenizer.pad_token_id, None, support_batches=2)
    assert [len(b["input_ids"]) for b in supports] == [4, 4]
    ref = copy.deepcopy(tagger)
    sgd = torch.optim.SGD(pe_params(ref), lr=0.03)
    for k in range(4):
        sgd.zero_grad()
        plain_loss(ref, supports[k % 2]).backward()
        sgd.step()
    names = list(prime.named_group_params(tagger, prime.INNER_GROUPS["pe"]))
    features = [prime.body_output(tagger, s, dropout=False) for s in supports]
    fast, losses = prime.fast_adapt(tagger, supports, names, 4, 0.03, features)
    for n, p in ref.named_parameters():
        if n in fast:
            torch.testing.assert_close(fast[n], p, rtol=1e-5, atol=1e-7, msg=n)


def test_fresh_head_starts_each_task_from_a_new_head(tagger, monkeypatch):
    """--inner-head fresh: each task's inner loop starts from its own newly drawn head (not the carried one); the
    meta-gradients equal a reference that starts each task's deep copy from the same draws; the model's head
    then becomes the first task's adapted head, as the paper sets it."""
    tagger, tokenizer = tagger
    tasks = tasks_of(tokenizer)
    carried = tagger.head.weight.detach().clone()
    starts, real = [], prime.fast_adapt

    def spy(model, support, names, steps, lr, features=None, amp=None, start=None):
        starts.append({n: t.clone() for n, t in start.items()})
        return real(model, support, names, steps, lr, features, amp, start)

    monkeypatch.setattr(prime, "INNER_LOOPS", {**prime.INNER_LOOPS, "sgd": spy})
    args = prime.parse_args(["--out", "-", "--model", "x", "--device", "cpu", "--inner-head", "fresh"])
    optimizer, schedule = prime.make_optimizer(tagger, args, 10)
    ref = copy.deepcopy(tagger)
    torch.manual_seed(5)
    prime.prime_step(tagger, optimizer, schedule, tasks, args, tokenizer.pad_token_id)
    assert len(starts) == 2 and not torch.equal(starts[0]["head.weight"], starts[1]["head.weight"])
    assert not any(torch.equal(s["head.weight"], carried) for s in starts) and not starts[0]["head.bias"].any()
    torch.manual_seed(5)
    draws = [prime.fresh_head(ref) for _ in tasks]
    assert all(torch.equal(d["head.weight"], s["head.weight"]) for d, s in zip(draws, starts))
    first_head = None
    for (support, query), draw in zip(tasks, draws):
        m = copy.deepcopy(ref)
        with torch.no_grad():
            m.head.weight.copy_(draw["head.weight"])
            m.head.bias.copy_(draw["head.bias"])
        s, q = data.collate(support, tokenizer.pad_token_id), data.collate(query, tokenizer.pad_token_id)
        sgd = torch.optim.SGD(pe_params(m), lr=0.03)
        for _ in range(5):
            sgd.zero_grad()
            plain_loss(m, s).backward()
            sgd.step()
        m.zero_grad()
        plain_loss(m, q).backward()
        sum_grads(ref, m)
        first_head = first_head or {n: p.detach().clone() for n, p in m.named_parameters() if group_of(n) == "head"}
    torch.optim.AdamW([p for n, p in ref.named_parameters() if group_of(n) != "head"], lr=5e-5, weight_decay=0.01).step()
    for n, p in tagger.named_parameters():
        expected = first_head[n] if group_of(n) == "head" else dict(ref.named_parameters())[n]
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("support_pass", ["cached", "plain"])
def test_second_order_meta_gradient_equals_unrolled_autograd(tagger, support_pass):
    """Exact MAML for the PE scope: a reference that unrolls S SGD steps on a deep copy with create_graph=True
    (the body re-run at every step) and backpropagates the query loss through them. First-order differs."""
    tagger, tokenizer = tagger
    tasks = tasks_of(tokenizer)
    ref = copy.deepcopy(tagger)
    for support, query in tasks:
        s, q = data.collate(support, tokenizer.pad_token_id), data.collate(query, tokenizer.pad_token_id)
        fast = {n: p for n, p in ref.named_parameters() if group_of(n) in ("adapter", "head")}
        for _ in range(3):
            loss = tagging_loss(torch.func.functional_call(ref, fast, (s["input_ids"], s["attention_mask"])), s["labels"])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: w - 0.03 * g for (n, w), g in zip(fast.items(), grads)}
        tagging_loss(torch.func.functional_call(ref, fast, (q["input_ids"], q["attention_mask"])), q["labels"]).backward()
    names = list(prime.named_group_params(tagger, prime.INNER_GROUPS["pe"]))
    grads = {}
    for adapt in (prime.fast_adapt_second_order, prime.fast_adapt):
        tagger.zero_grad(set_to_none=True)
        prime.meta_gradients(tagger, tasks, tokenizer.pad_token_id, names, 3, 0.03, support_pass=support_pass, adapt=adapt)
        grads[adapt.__name__] = {n: None if p.grad is None else p.grad.clone() for n, p in tagger.named_parameters()}
    second, first = grads["fast_adapt_second_order"], grads["fast_adapt"]
    for n, p in ref.named_parameters():
        if group_of(n) == "head":
            assert second[n] is None  # no meta-gradient for the head
        else:
            torch.testing.assert_close(second[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    for n in ("adapter.down.weight", "adapter.up.weight", "body.embeddings.word_embeddings.weight",
              "body.encoder.layer.0.attention.self.query.weight"):
        assert not torch.allclose(second[n], first[n], rtol=1e-3, atol=1e-6), n  # the second-order terms matter


def test_reptile_update_equals_its_formula(tagger):
    """Hand-checkable: with S=1 the adapted weights are phi = theta - alpha g, so Reptile's outer "gradient"
    theta - phi is alpha times the support gradient, summed over tasks. PE analogue (--inner-scope pe): that for
    adapter (+ head discarded), while the body takes the first-order query gradient at phi. Plain Reptile
    (--inner-scope all, S=2 over support then query): theta - phi = alpha (g_s(theta) + g_q(theta - alpha g_s))."""
    tagger, tokenizer = tagger
    tasks, pad = tasks_of(tokenizer), tokenizer.pad_token_id
    alpha = 0.1
    want = {n: torch.zeros_like(p) for n, p in tagger.named_parameters()}
    for support, query in tasks:
        s, q = data.collate(support, pad), data.collate(query, pad)
        m = copy.deepcopy(tagger)
        g = torch.autograd.grad(plain_loss(m, s), list(m.parameters()))
        phi = copy.deepcopy(m)
        with torch.no_grad():
            for (n, p), gi in zip(phi.named_parameters(), g):
                if group_of(n) in ("adapter", "head"):
                    p.sub_(alpha * gi)
                    want[n] += alpha * gi
        gq = torch.autograd.grad(plain_loss(phi, q), [p for n, p in phi.named_parameters() if group_of(n) == "body"])
        for (n, _), gi in zip([(n, p) for n, p in phi.named_parameters() if group_of(n) == "body"], gq):
            want[n] += gi
    names = list(prime.named_group_params(tagger, prime.INNER_GROUPS["pe"]))
    tagger.zero_grad(set_to_none=True)
    stats, head = prime.reptile_gradients(tagger, tasks, pad, names, 1, alpha)
    for n, p in tagger.named_parameters():
        if group_of(n) == "head":
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-7, msg=n)

    support, query = tasks[0]
    s, q = data.collate(support, pad), data.collate(query, pad)
    m = copy.deepcopy(tagger)
    theta = [p.detach().clone() for p in m.parameters()]
    gs = torch.autograd.grad(plain_loss(m, s), list(m.parameters()))
    with torch.no_grad():
        for p, gi in zip(m.parameters(), gs):
            p.sub_(alpha * gi)
    gq = torch.autograd.grad(plain_loss(m, q), list(m.parameters()))
    tagger.zero_grad(set_to_none=True)
    every = list(prime.named_group_params(tagger, prime.INNER_GROUPS["all"]))
    prime.reptile_gradients(tagger, [tasks[0]], pad, every, 2, alpha)
    for (n, p), a, b in zip(tagger.named_parameters(), gs, gq):
        if group_of(n) != "head":
            torch.testing.assert_close(p.grad, alpha * (a + b), rtol=1e-4, atol=1e-7, msg=n)


def test_variant_names_and_flag_checks():
    name = lambda *flags: prime.variant(prime.parse_args(["--out", "x", *flags]))
    assert name("--inner-head", "fresh") == "meta(inner_head=fresh)"
    assert name("--inner-optimizer", "adamw", "--inner-lr", "3e-3", "--inner-steps", "50") == \
        "meta(inner_steps=50, inner_optimizer=adamw)"
    assert name("--mode", "reptile") == "reptile()" and name("--meta-grad", "second") == "meta(meta_grad=second)"
    for bad in (["--meta-grad", "second", "--inner-optimizer", "adamw"], ["--meta-grad", "second", "--mode", "reptile"],
                ["--support-batches", "0"]):
        with pytest.raises(SystemExit):
            prime.parse_args(["--out", "x", *bad])


@pytest.mark.parametrize("flags", [["--inner-head", "fresh", "--inner-optimizer", "adamw", "--inner-lr", "3e-3",
                                    "--inner-steps", "20", "--support-batches", "2"],
                                   ["--meta-grad", "second"], ["--mode", "reptile"], ["--mode", "reptile", "--inner-scope", "all"]])
def test_prime_script_runs_each_variant(tiny_dir, tmp_path, flags):
    out = str(tmp_path / "primed")
    prime.main(prime.parse_args(["--model", tiny_dir, "--synthetic", "--train-size", "64", "--support-size", "8",
                                 "--query-size", "8", "--max-steps", "2", "--out", out, "--device", "cpu"] + flags))
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert load_tagger(out, data.LABELS)[2]["variant"] == prime.variant(prime.parse_args(["--out", "x", *flags]))
