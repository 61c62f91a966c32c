"""meta.py, every inner-loop variant for every PE method (adapter, LoRA, BitFit) against the independent reference of
tests/reference.py (issue M), and the flag matrix of prime.py: every combination primes or is refused at parse time.
Tiny random BERT; dropout off unless a test is about dropout."""
import contextlib
import copy
import itertools
import json
import math
import os

import pytest
import torch

import data
import meta
import model
import pe
import prime
import reference as ref

METHODS = ("adapter", "lora", "bitfit")
CONFIGS = {"adapter": pe.config("adapter", 8), "lora": pe.config("lora", lora_rank=4, lora_alpha=8), "bitfit": pe.config("bitfit")}


def tagger_with(tiny_dir, method, seed=0):
    """The tiny tagger with `method`, dropout off, its PE parameters moved away from their start (a new adapter's up
    and a new LoRA's B are zero: from there some parameters would get no gradient, and a check would lose its teeth)."""
    torch.manual_seed(seed)
    tagger, tokenizer, _ = model.load_tagger(tiny_dir, data.LABELS, adapter_dim=0, pe_config=CONFIGS[method])
    tagger.eval()
    with torch.no_grad():
        for n, p in tagger.named_parameters():
            if n in ("adapter.up.weight",) or ".lora_B." in n:
                p.normal_(0, 0.05)
    return tagger, tokenizer


def tasks_of(tokenizer, support=4, query=5, n_langs=2, rule="mean"):
    """Meta-batches of synthetic sentences; with the default rule (mean) ~70% of the tiny BERT's words span several
    sub-words, so the pooling runs in every reference test (reference.pad builds its own pooling matrix)."""
    by_lang = {lang: data.encode(data.load_split(lang, "train", synthetic=True, limit=60), tokenizer, 48, rule)
               for lang in ("en", "es", "de")[:n_langs]}
    return next(data.meta_batches(by_lang, support, query, seed=0))


def inner_names(tagger, scope="pe"):
    return list(model.named_group_params(tagger, meta.INNER_GROUPS[scope]))


# Reptile's "gradient" theta - phi is a difference of weights: near 1 (LayerNorm) float32 resolves it only to 1.2e-7
# (one ulp) per inner step, and two correct summation orders differ by that (CI failed once on atol=1e-7): a few ulps.
REPTILE_TOL = {"rtol": 1e-4, "atol": 1e-6}


def assert_grads(tagger, expected, rtol=1e-5, atol=1e-7):
    for n, p in tagger.named_parameters():
        if n in ref.HEAD:
            assert p.grad is None, n  # the head gets no meta-gradient
        else:
            got = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(got, expected[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("method", METHODS)
def test_inner_loop_adapts_exactly_the_methods_parameters_and_head(tiny_dir, method):
    tagger, tokenizer = tagger_with(tiny_dir, method)
    before = {n: p.detach().clone() for n, p in tagger.named_parameters()}
    names = inner_names(tagger)
    assert sorted(names) == sorted(ref.PE[method] + ref.HEAD)  # the names, written out in reference.py
    support = data.collate(tasks_of(tokenizer)[0][0], tokenizer.pad_token_id)
    fast, losses = meta.fast_adapt(tagger, support, names, 5, 0.03)
    assert all(torch.equal(p, before[n]) for n, p in tagger.named_parameters())  # the model itself is untouched
    assert set(fast) == set(names) and all(not torch.equal(w, before[n]) for n, w in fast.items())
    assert len(losses) == 5 and losses[-1] < losses[0]


@pytest.mark.parametrize("method, support_pass", [("adapter", "cached"), ("adapter", "plain"), ("adapter", "cached-eval"),
                                                  ("lora", "plain"), ("lora", "cached-eval"), ("bitfit", "plain"),
                                                  ("bitfit", "cached-eval")])
def test_first_order_meta_gradient_equals_reference(tiny_dir, method, support_pass):
    tagger, tokenizer = tagger_with(tiny_dir, method)
    tasks = tasks_of(tokenizer)
    expected, head = ref.first_order(tagger, tasks, tokenizer.pad_token_id, ref.PE[method], 5, 0.03)
    stats, first_head = meta.meta_gradients(tagger, tasks, tokenizer.pad_token_id, inner_names(tagger), 5, 0.03,
                                            support_pass=support_pass)
    assert len(stats) == 2 and all(len(s["support_loss"]) == 5 for s in stats)
    assert_grads(tagger, expected)
    for n in ref.HEAD:
        torch.testing.assert_close(first_head[n], head[n], rtol=1e-5, atol=1e-7)
    assert all(expected[n].abs().sum() > 0 for n in ref.PE[method])  # every PE parameter has a gradient


@pytest.mark.parametrize("support_pass", ["cached", "plain"])
def test_first_order_meta_gradient_equals_reference_on_one_sub_word_per_word(tiny_dir, support_pass):
    """--word-position first-content: no pooling matrix, each word read at one sub-word."""
    tagger, tokenizer = tagger_with(tiny_dir, "adapter")
    tasks = tasks_of(tokenizer, rule="first-content")
    assert "pool" not in data.collate(tasks[0][0], tokenizer.pad_token_id)
    expected, _ = ref.first_order(tagger, tasks, tokenizer.pad_token_id, ref.PE["adapter"], 5, 0.03)
    meta.meta_gradients(tagger, tasks, tokenizer.pad_token_id, inner_names(tagger), 5, 0.03, support_pass=support_pass)
    assert_grads(tagger, expected)


def test_maml_loop_meta_gradient_equals_reference(tiny_dir):
    tagger, tokenizer = tagger_with(tiny_dir, "adapter")
    tasks = tasks_of(tokenizer)
    everything = [n for n, _ in tagger.named_parameters() if n not in ref.HEAD]
    expected, _ = ref.first_order(tagger, tasks, tokenizer.pad_token_id, everything, 3, 0.03)
    meta.meta_gradients(tagger, tasks, tokenizer.pad_token_id, inner_names(tagger, "all"), 3, 0.03)
    assert_grads(tagger, expected)


@pytest.mark.parametrize("method", METHODS)
def test_second_order_meta_gradient_equals_reference(tiny_dir, method):
    """Regression (M2): LoRA and BitFit crashed (no double backward for the default attention kernel)."""
    tagger, tokenizer = tagger_with(tiny_dir, method)
    tasks = tasks_of(tokenizer)
    expected = ref.second_order(tagger, tasks, tokenizer.pad_token_id, ref.PE[method], 3, 0.03)
    meta.meta_gradients(tagger, tasks, tokenizer.pad_token_id, inner_names(tagger), 3, 0.03, adapt=meta.fast_adapt_second_order)
    assert_grads(tagger, expected, rtol=1e-4)
    first, _ = ref.first_order(tagger, tasks, tokenizer.pad_token_id, ref.PE[method], 3, 0.03)
    assert not torch.allclose(expected[ref.PE[method][-1]], first[ref.PE[method][-1]], rtol=1e-3, atol=1e-6)  # it matters


def test_second_order_from_a_fresh_head_equals_reference(tiny_dir):
    """--meta-grad second --inner-head fresh: each task's unrolled inner loop starts from a new head draw (N(0, 0.02)
    weights as the tiny config's initializer_range, zero bias; drawn here the same way from the same seed)."""
    tagger, tokenizer = tagger_with(tiny_dir, "lora")
    tasks = tasks_of(tokenizer)
    torch.manual_seed(5)
    w, b = tagger.head.weight, tagger.head.bias
    heads = [{"head.weight": torch.randn(w.shape) * tagger.body.config.initializer_range, "head.bias": torch.zeros(b.shape)}
             for _ in tasks]
    expected = ref.second_order(tagger, tasks, tokenizer.pad_token_id, ref.PE["lora"], 3, 0.03, heads=heads)
    torch.manual_seed(5)
    meta.meta_gradients(tagger, tasks, tokenizer.pad_token_id, inner_names(tagger), 3, 0.03, inner_head="fresh",
                        adapt=meta.fast_adapt_second_order)
    assert_grads(tagger, expected, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_reptile_pe_analogue_equals_reference(tiny_dir, method):
    """Regression (M1): with BitFit, whose biases are body parameters, Reptile ran its plain form (the inner loop also
    trained on the query batch, the other body weights got no gradient)."""
    tagger, tokenizer = tagger_with(tiny_dir, method)
    tasks = tasks_of(tokenizer)
    expected = ref.reptile(tagger, tasks, tokenizer.pad_token_id, ref.PE[method], 3, 0.1)
    stats, _ = meta.reptile_gradients(tagger, tasks, tokenizer.pad_token_id, inner_names(tagger), 3, 0.1)
    assert all(len(s["support_loss"]) == 3 and "query_loss" in s for s in stats)
    assert_grads(tagger, expected, **REPTILE_TOL)
    assert all(expected[n].abs().sum() > 0 for n in expected)  # every body weight moves, adapted or not


@pytest.mark.parametrize("method", METHODS)
def test_plain_reptile_equals_reference(tiny_dir, method):
    tagger, tokenizer = tagger_with(tiny_dir, method)
    tasks = tasks_of(tokenizer)
    expected = ref.reptile(tagger, tasks, tokenizer.pad_token_id, None, 2, 0.1, plain=True)
    stats, _ = meta.reptile_gradients(tagger, tasks, tokenizer.pad_token_id, inner_names(tagger, "all"), 2, 0.1)
    assert all("loss" in s for s in stats)
    assert_grads(tagger, expected, **REPTILE_TOL)


@pytest.mark.parametrize("method", METHODS)
def test_adamw_inner_loop_equals_torch_adamw_over_two_tasks(tiny_dir, method):
    """A new AdamW state per task: the second task must not inherit the first's moments."""
    tagger, tokenizer = tagger_with(tiny_dir, method)
    tasks = tasks_of(tokenizer)
    expected, head = ref.first_order(tagger, tasks, tokenizer.pad_token_id, ref.PE[method], 4, 1e-2, optimizer="adamw")
    _, first_head = meta.meta_gradients(tagger, tasks, tokenizer.pad_token_id, inner_names(tagger), 4, 1e-2,
                                        adapt=meta.fast_adapt_adamw)
    assert_grads(tagger, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(first_head["head.weight"], head["head.weight"], rtol=1e-4, atol=1e-6)


def test_support_batches_are_taken_in_turn(tiny_dir):
    """K=2 support batches of a task's 8 support sentences and S=4: the steps use batches 1, 2, 1, 2."""
    tagger, tokenizer = tagger_with(tiny_dir, "adapter")
    tasks = tasks_of(tokenizer, support=8)
    expected, _ = ref.first_order(tagger, tasks, tokenizer.pad_token_id, ref.ADAPTER, 4, 0.03, support_batches=2)
    meta.meta_gradients(tagger, tasks, tokenizer.pad_token_id, inner_names(tagger), 4, 0.03, support_batches=2)
    assert_grads(tagger, expected)
    one_batch, _ = ref.first_order(tagger, tasks, tokenizer.pad_token_id, ref.ADAPTER, 4, 0.03)
    assert not torch.allclose(one_batch["adapter.up.weight"], expected["adapter.up.weight"])  # K matters


@pytest.mark.parametrize("method", METHODS)
def test_fresh_head_starts_each_task_from_its_own_draw(tiny_dir, method):
    """--inner-head fresh: task k's inner loop starts from a head drawn N(0, initializer_range), zero bias, in task
    order from the global RNG (the reference draws its own with torch.randn)."""
    tagger, tokenizer = tagger_with(tiny_dir, method)
    tasks = tasks_of(tokenizer)
    torch.manual_seed(5)
    heads = [(torch.randn(tagger.head.weight.shape) * 0.02, torch.zeros(len(data.LABELS))) for _ in tasks]
    expected, head = ref.first_order(tagger, tasks, tokenizer.pad_token_id, ref.PE[method], 5, 0.03, heads=heads)
    torch.manual_seed(5)
    _, first_head = meta.meta_gradients(tagger, tasks, tokenizer.pad_token_id, inner_names(tagger), 5, 0.03, inner_head="fresh")
    assert_grads(tagger, expected)
    torch.testing.assert_close(first_head["head.weight"], head["head.weight"], rtol=1e-5, atol=1e-7)
    carried, _ = ref.first_order(tagger, tasks, tokenizer.pad_token_id, ref.PE[method], 5, 0.03)
    assert not torch.allclose(carried[ref.PE[method][0]], expected[ref.PE[method][0]])  # the start matters


class ModeRecorder:
    """Records, per body forward, whether the body ran in train mode."""

    def __init__(self, tagger):
        self.modes = []
        tagger.body.register_forward_pre_hook(lambda module, args: self.modes.append(module.training))


@pytest.mark.parametrize("method", ["lora", "bitfit"])
@pytest.mark.parametrize("support_pass", ["cached-eval", "plain"])
def test_inner_loop_through_the_body_honours_the_support_pass(tiny_dir, method, support_pass):
    """Regression (M4): LoRA/BitFit silently kept dropout in the inner loop with cached-eval. Now cached-eval runs the
    S inner forwards in eval mode and the query forward in train mode; plain keeps train mode throughout; cached is
    refused (the function and prime.py's flags)."""
    tagger, tokenizer = tagger_with(tiny_dir, method)
    tagger.train()
    recorder = ModeRecorder(tagger)
    meta.meta_gradients(tagger, tasks_of(tokenizer)[:1], tokenizer.pad_token_id, inner_names(tagger), 3, 0.03,
                        support_pass=support_pass)
    assert recorder.modes == [support_pass == "plain"] * 3 + [True] and tagger.body.training
    with pytest.raises(ValueError, match="runs through the body"):
        meta.meta_gradients(tagger, tasks_of(tokenizer)[:1], tokenizer.pad_token_id, inner_names(tagger), 3, 0.03,
                            support_pass="cached")


def test_second_order_support_features_honour_cached_eval(tiny_dir):
    """Regression (M3): with --meta-grad second, cached-eval support features kept dropout."""
    tagger, tokenizer, _ = model.load_tagger(tiny_dir, data.LABELS, adapter_dim=8)  # dropout on
    tagger.train()
    support = [data.collate(tasks_of(tokenizer)[0][0], tokenizer.pad_token_id)]
    features = lambda support_pass: meta.support_features(tagger, support, support_pass, contextlib.nullcontext, with_graph=True)[0]
    without = model.body_output(tagger, support[0], dropout=False)
    torch.testing.assert_close(features("cached-eval").detach(), without)
    assert features("cached-eval").requires_grad and tagger.body.training
    assert not torch.allclose(features("cached").detach(), without)  # "cached" samples dropout


def plain_loss(m, batch):
    return model.tagging_loss(m(batch["input_ids"], batch["attention_mask"], batch.get("pool")), batch["labels"])


def test_reptile_update_equals_its_formula(tiny_dir):
    """Hand-checkable: with S=1 the adapted weights are phi = theta - alpha g, so Reptile's outer "gradient"
    theta - phi is alpha times the support gradient, summed over tasks. PE analogue (--inner-scope pe): that for
    adapter (+ head discarded), while the body takes the first-order query gradient at phi. Plain Reptile
    (--inner-scope all, S=2 over support then query): theta - phi = alpha (g_s(theta) + g_q(theta - alpha g_s))."""
    tagger, tokenizer = tagger_with(tiny_dir, "adapter")
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
                if model.group_of(n) in ("adapter", "head"):
                    p.sub_(alpha * gi)
                    want[n] += alpha * gi
        gq = torch.autograd.grad(plain_loss(phi, q), [p for n, p in phi.named_parameters() if model.group_of(n) == "body"])
        for (n, _), gi in zip([(n, p) for n, p in phi.named_parameters() if model.group_of(n) == "body"], gq):
            want[n] += gi
    names = list(model.named_group_params(tagger, meta.INNER_GROUPS["pe"]))
    tagger.zero_grad(set_to_none=True)
    stats, head = meta.reptile_gradients(tagger, tasks, pad, names, 1, alpha)
    for n, p in tagger.named_parameters():
        if model.group_of(n) == "head":
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-7, msg=n)

    support, query = tasks[0]
    s, q = data.collate(support, pad), data.collate(query, pad)
    m = copy.deepcopy(tagger)
    gs = torch.autograd.grad(plain_loss(m, s), list(m.parameters()))
    with torch.no_grad():
        for p, gi in zip(m.parameters(), gs):
            p.sub_(alpha * gi)
    gq = torch.autograd.grad(plain_loss(m, q), list(m.parameters()))
    tagger.zero_grad(set_to_none=True)
    every = list(model.named_group_params(tagger, meta.INNER_GROUPS["all"]))
    meta.reptile_gradients(tagger, [tasks[0]], pad, every, 2, alpha)
    for (n, p), a, b in zip(tagger.named_parameters(), gs, gq):
        if model.group_of(n) != "head":
            torch.testing.assert_close(p.grad, alpha * (a + b), msg=n, **REPTILE_TOL)


# ----------------------------------------------------------------------------- the flag matrix of prime.py
MATRIX = {"pe": METHODS, "mode": ("meta", "reptile"), "meta_grad": ("first", "second"), "inner_optimizer": ("sgd", "adamw"),
          "inner_head": ("carry", "fresh"), "inner_scope": ("pe", "all")}


def refused(flags):
    """The documented refusals: second order differentiates through SGD steps of Algorithm 1 only."""
    return flags["meta_grad"] == "second" and (flags["inner_optimizer"] == "adamw" or flags["mode"] == "reptile")


def test_every_flag_combination_primes_or_is_refused_with_one_line(tiny_nodrop_dir, tmp_path, capsys):
    """--pe x --mode x --meta-grad x --inner-optimizer x --inner-head x --inner-scope (96 combinations): each primes
    the tiny BERT for 2 meta-steps (finite losses, a checkpoint naming its variant and PE method) or is refused at
    parse time with one line. No third outcome."""
    outcomes = {}
    for k, values in enumerate(itertools.product(*MATRIX.values())):
        flags = dict(zip(MATRIX, values))
        argv = ["--model", tiny_nodrop_dir, "--synthetic", "--train-size", "16", "--support-size", "4", "--query-size", "4",
                "--max-steps", "2", "--max-len", "32", "--device", "cpu", "--inner-steps", "2"]
        argv += ["--word-position", "mean"] * (k % 2)  # every other one pools each word's sub-words (issue P)
        argv += [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", v)]
        if flags["mode"] == "reptile" and flags["inner_scope"] == "all" and flags["inner_optimizer"] == "adamw":
            argv += ["--vocab-rows", "all"]  # the exact choice there (used rows: refused, next test)
        out = str(tmp_path / "-".join(values))
        capsys.readouterr()  # the progress bars of earlier runs
        try:
            args = prime.parse_args(argv + ["--out", out])
        except SystemExit as e:
            err = capsys.readouterr().err.strip().splitlines()
            assert e.code == 2 and ": error: " in err[-1] and sum(": error: " in line for line in err) == 1, (flags, err)
            outcomes[values] = "refused"
            continue
        prime.main(args)
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        info = json.load(open(os.path.join(out, "checkpoint.json")))
        assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log), flags
        assert info["pe"]["method"] == flags["pe"] and info["variant"] == prime.variant(args), flags
        outcomes[values] = "primed"
    assert {v for v, o in outcomes.items() if o == "refused"} == {v for v in outcomes if refused(dict(zip(MATRIX, v)))}
    assert len(outcomes) == 96 and list(outcomes.values()).count("primed") == 60


@pytest.mark.parametrize("flags", [["--pe", "lora"], ["--pe", "bitfit"], ["--inner-scope", "all"]])
def test_a_cached_support_pass_through_the_body_is_refused(flags, capsys):
    with pytest.raises(SystemExit):
        prime.parse_args(["--out", "x", "--support-pass", "cached", *flags])
    assert "runs through the body" in capsys.readouterr().err
    assert prime.parse_args(["--out", "x", *flags]).support_pass == "plain"  # their default
    assert prime.parse_args(["--out", "x"]).support_pass == "cached"  # the adapter's


def test_variant_names_and_flag_checks():
    name = lambda *flags: prime.variant(prime.parse_args(["--out", "x", *flags]))
    assert name("--inner-head", "fresh") == "meta(inner_head=fresh)"
    assert name("--inner-optimizer", "adamw", "--inner-lr", "3e-3", "--inner-steps", "50") == \
        "meta(inner_steps=50, inner_optimizer=adamw)"
    assert name("--mode", "reptile") == "reptile()" and name("--meta-grad", "second") == "meta(meta_grad=second)"
    for bad in (["--meta-grad", "second", "--inner-optimizer", "adamw"], ["--meta-grad", "second", "--mode", "reptile"],
                ["--support-batches", "0"], ["--mode", "ft", "--inner-steps", "1"]):
        with pytest.raises(SystemExit):
            prime.parse_args(["--out", "x", *bad])


@pytest.mark.parametrize("flags, says", [
    (["--inner-steps", "1", "--support-batches", "2"], "--inner-steps 1 < the inner loop's 2 batches (--support-batches)"),
    (["--mode", "reptile", "--inner-scope", "all", "--inner-steps", "2", "--support-batches", "2"],
     "--inner-steps 2 < the inner loop's 3 batches (--support-batches + the query batch of plain Reptile)"),
    (["--mode", "reptile", "--inner-scope", "all", "--inner-optimizer", "adamw"], "pass --vocab-rows all"),
    (["--max-steps", "0"], "--max-steps: '0'"),
    (["--support-size", "0"], "--support-size: '0'"), (["--query-size", "0"], "--query-size: '0'"),
    (["--pe", "lora", "--lora-rank", "0"], "--lora-rank 0: must be >= 1"), (["--adapter-dim", "0"], "--adapter-dim 0: must be >= 1"),
])
def test_flags_that_leave_data_unused_or_sizes_empty_are_refused_in_one_line(flags, says, capsys):
    """Support batches (or plain Reptile's query batch) that S steps would never reach, a --vocab-rows used that would
    not be exact, and empty sizes: refused at parse time, not run or crashed."""
    with pytest.raises(SystemExit) as e:
        prime.parse_args(["--out", "x", *flags])
    assert e.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]
    prime.parse_args(["--out", "x", "--mode", "reptile", "--inner-scope", "all", "--inner-optimizer", "adamw", "--vocab-rows", "all"])


@pytest.mark.parametrize("method", METHODS)
def test_second_order_primes_under_bf16_through_the_body(tiny_nodrop_dir, tmp_path, method):
    """--meta-grad second with the inner loop through the body (LoRA, BitFit; the adapter with --inner-scope all) under
    bf16 autocast: finite losses (torch.func.grad failed there with the math attention kernel)."""
    out = str(tmp_path / method)
    prime.main(prime.parse_args(["--model", tiny_nodrop_dir, "--synthetic", "--train-size", "16", "--support-size", "4",
                                 "--query-size", "4", "--max-steps", "2", "--max-len", "32", "--device", "cpu", "--bf16",
                                 "--meta-grad", "second", "--pe", method, "--out", out]
                                + (["--inner-scope", "all"] if method == "adapter" else [])))
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
