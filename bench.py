"""Side-by-side cost of priming and fine-tuning, in one process, on real WikiAnn batches.

    python bench.py                                   # packaged MiniLM on the CPU, ../shared/wikiann
    python bench.py --device cuda --bf16 --model bert-base-multilingual-cased

1. Meta-step time at S=5 on the same meta-batches (2 tasks of 32 support + 32 query sentences):
   ours (meta.meta_gradients, body run once per task on the support batch), a naive first-order
   reference (deepcopy of the model per task, S full forward+backward steps), and the limit (per task
   one no-grad body forward on the support batch + one forward+backward on the query batch). Gradient
   computation only: the AdamW update, the same for all three, is timed on its own line.
2. One epoch of adapter tuning vs one epoch of full fine-tuning on the same sentences; adapter tuning
   without and with --cache-body (first epoch builds the cache, later epochs reuse it).
3. Peak memory of a priming step vs a plain fine-tuning step (one AdamW step on a 32-sentence batch),
   each measured in a fresh subprocess after one warm-up step: the rise of the resident set's high-water
   mark (VmHWM, reset through /proc/self/clear_refs) above the resident set before the step; on CUDA,
   torch.cuda.max_memory_allocated.
4. PE methods (adapter, LoRA, BitFit): the meta-step against its limit, (S+1) forward+backward passes with
   gradients for that method's parameters only (issue F).
5. Inner-loop variants against the paper's S=5 SGD step: S=50, AdamW with a fresh head, second order,
   Reptile (issue G). Run: python bench.py --parts 4,5 --repeats 3
6. fp32 against bf16 autocast, side by side (issue I): body forward, forward+backward, meta-step, full fine-tuning
   step, adapter step on cached outputs. Run: python bench.py --parts 6 --model multilingual-e5-small
Each time is the min and median of --repeats runs. (One concern at ~460 lines: six side-by-side measurements sharing
their timing, data and model helpers; each part is a function of its own.)
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import finetune
import pe
import meta
import prime
from data import LABELS, add_data_args, collate, encode, load_split, meta_batches
from model import (PACKAGED_MINILM, body_output, group_of, in_groups, load_tagger, named_group_params, portable, precision,
                   set_trainable, tagging_loss)

HERE = os.path.dirname(os.path.abspath(__file__))


def fwd_bwd(model, batch, amp=contextlib.nullcontext):
    """A forward+backward through the whole model; amp() wraps the forward pass only, as in prime.py and finetune.py."""
    with amp():
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("pool"))
    tagging_loss(logits, batch["labels"]).backward()


def naive_meta_gradients(model, tasks, pad_id, steps, lr, scope="pe", device=None, amp=contextlib.nullcontext):
    """Textbook first-order MAML: a deep copy of the model per task, S optimizer steps of full
    forward+backward passes, the query gradient of the copy summed into the original's .grad.
    Returns the first task's adapted head (the reference for tests/test_prime.py)."""
    first_head = None
    for support, query in tasks:
        m = copy.deepcopy(model)
        inner = [p for n, p in m.named_parameters() if scope == "all" or in_groups(m, n, ("pe", "head"))]
        sgd = torch.optim.SGD(inner, lr=lr)
        s, q = collate(support, pad_id, device), collate(query, pad_id, device)
        for _ in range(steps):
            sgd.zero_grad()
            fwd_bwd(m, s, amp)
            sgd.step()
        m.zero_grad()
        fwd_bwd(m, q, amp)
        for (n, p), c in zip(model.named_parameters(), m.parameters()):
            if group_of(n) != "head":
                p.grad = c.grad if p.grad is None else p.grad + c.grad
        if first_head is None:
            first_head = {n: p.detach().clone() for n, p in m.named_parameters() if group_of(n) == "head"}
    return first_head


def limit_gradients(model, tasks, pad_id, device=None, amp=contextlib.nullcontext):
    """The least a frozen-body first-order step must do: no-grad body on support, fwd+bwd on query."""
    for support, query in tasks:
        s, q = collate(support, pad_id, device), collate(query, pad_id, device)
        with torch.no_grad(), amp():
            model.features(s["input_ids"], s["attention_mask"], s.get("pool"))
        fwd_bwd(model, q, amp)


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def ratio(a, b):
    """Median of the per-run ratios a_k / b_k: runs k share their batches, so batch-to-batch
    differences in length cancel."""
    return statistics.median(x / y for x, y in zip(a, b))


def line(name, times, ratio=None, of=None):
    note = f"   {ratio:5.2f}x {of}" if ratio else ""
    print(f"  {name:46s} min {min(times) * 1000:8.1f} ms   median {statistics.median(times) * 1000:8.1f} ms{note}")
    return statistics.median(times)


def source_data(args, tokenizer):
    return {lang: encode(load_split(lang, "train", args.data_dir, args.synthetic, args.sentences), tokenizer, 128,
                         args.word_position) for lang in ("en", "es")}


def amp_of(args):
    """prime.py's context for forward passes through the body (--bf16: bf16 autocast); meta.py keeps adapter+head on
    cached body outputs and backward passes outside it."""
    return lambda: precision(args.device, args.bf16)


def where(args):
    return args.device + (" bf16" if args.bf16 else "")


def bench_priming(args, model, tokenizer):
    print(f"1. meta-step at S={args.inner_steps}, 2 tasks x ({args.task_size} support + {args.task_size} query), {where(args)}")
    pad, amp = tokenizer.pad_token_id, amp_of(args)
    metas = list(meta_batches(source_data(args, tokenizer), args.task_size, args.task_size, seed=0))[:args.repeats + 1]
    inner = list(named_group_params(model, meta.INNER_GROUPS["pe"]))
    every = list(named_group_params(model, meta.INNER_GROUPS["all"]))
    runs = {"ours (cached support pass)": lambda t: meta.meta_gradients(model, t, pad, inner, args.inner_steps, 0.03, args.device,
                                                                        amp=amp),
            "naive (deepcopy, S full fwd+bwd)": lambda t: naive_meta_gradients(model, t, pad, args.inner_steps, 0.03,
                                                                               device=args.device, amp=amp),
            "limit (support fwd + query fwd+bwd)": lambda t: limit_gradients(model, t, pad, args.device, amp),
            "plain support pass (body at every step)": lambda t: meta.meta_gradients(model, t, pad, inner, args.inner_steps, 0.03,
                                                                                       args.device, support_pass="plain", amp=amp),
            "MAML loop (--inner-scope all), for reference": lambda t: meta.meta_gradients(model, t, pad, every, args.inner_steps,
                                                                                            0.03, args.device, amp=amp)}
    times = {name: [] for name in runs}
    optimizer = torch.optim.AdamW(named_group_params(model, ("body", "adapter")).values(), lr=5e-5)
    adamw = []
    model.train()
    for k, tasks in enumerate(metas):  # the first meta-batch warms up and is not counted
        for name, run in runs.items():
            model.zero_grad(set_to_none=True)
            t = timed(lambda: run(tasks), args.device)
            if k:
                times[name].append(t)
        t = timed(optimizer.step, args.device)
        if k:
            adamw.append(t)
    limit = times["limit (support fwd + query fwd+bwd)"]
    for name, ts in times.items():
        line(name, ts, ratio=ratio(ts, limit), of="the limit")
    line("AdamW update of body+adapter (same for all)", adamw)
    ours, naive = times["ours (cached support pass)"], times["naive (deepcopy, S full fwd+bwd)"]
    print(f"  naive / ours = {ratio(naive, ours):.2f}x (target >= 4)   ours / limit = {ratio(ours, limit):.2f}x (target <= 1.3)"
          "   (medians over meta-batches of per-batch ratios)")
    profile(model, metas[1:], pad, inner, args)
    return {"naive_over_ours": ratio(naive, ours), "ours_over_limit": ratio(ours, limit)}


def profile(model, metas, pad, inner, args):
    """Where a task's time goes (medians over the support batches): naive = deepcopy + (S+1) full
    fwd+bwd; ours = one no-grad body fwd + S adapter+head steps + one fwd+bwd."""
    parts = {"deepcopy of the model": [], "body forward, no grad": [], "forward+backward, all parameters": [],
             "adapter+head SGD step on cached body output": []}
    amp = amp_of(args)
    for support in (s for tasks in metas for s, _ in tasks):
        batch = collate(support, pad, args.device)
        parts["deepcopy of the model"].append(timed(lambda: copy.deepcopy(model), args.device))
        parts["body forward, no grad"].append(timed(lambda: meta.support_features(model, [batch], "cached", amp), args.device))
        h = meta.support_features(model, [batch], "cached", amp)[0]
        model.zero_grad(set_to_none=True)
        parts["forward+backward, all parameters"].append(timed(lambda: fwd_bwd(model, batch, amp), args.device))
        parts["adapter+head SGD step on cached body output"].append(  # fp32, as meta.py runs it
            timed(lambda: meta.fast_adapt(model, batch, inner, 1, 0.03, h), args.device))
    print(f"  profile of one task, {len(parts['deepcopy of the model'])} support batches:")
    med = {name: line("  " + name, ts) for name, ts in parts.items()}
    copy_, fwd, fb, top = med.values()
    naive, ours = copy_ + (args.inner_steps + 1) * fb, fwd + args.inner_steps * top + fb
    print(f"  => naive ~ deepcopy + {args.inner_steps + 1} fwd+bwd = {naive * 1000:.0f} ms; ours ~ fwd + {args.inner_steps} "
          f"steps + fwd+bwd = {ours * 1000:.0f} ms; naive / ours ~ {naive / ours:.2f}x: with ours at the limit, this is the "
          f"ceiling, set by fwd+bwd / fwd = {fb / fwd:.2f} on this machine")


def bench_finetuning(args, tokenizer):
    print(f"2. one fine-tuning epoch on {args.ft_sentences} {args.ft_lang} sentences, batch 32")
    examples = encode(load_split(args.ft_lang, "train", args.data_dir, args.synthetic, args.ft_sentences), tokenizer, 128,
                      args.word_position)
    ft_args = finetune.parse_args(["--setting", "1", "--lang", args.ft_lang, "--out", "-", "--device", args.device]
                                  + (["--bf16"] if args.bf16 else []))
    pad = tokenizer.pad_token_id
    times = {}
    for name, setting in [("full fine-tuning", 1), ("adapter tuning", 3), ("adapter tuning --cache-body", 3)]:
        torch.manual_seed(0)
        model, _, _ = load_tagger(args.model, LABELS, 0 if setting == 1 else 64)
        model.to(args.device)
        set_trainable(model, finetune.TRAINABLE[setting])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        cached = name.endswith("--cache-body")
        first, later = [], []
        for r in range(args.repeats if setting != 1 else max(2, args.repeats // 2)):
            cache = None

            def epoch():
                nonlocal cache
                if cached and cache is None:  # the first epoch pays for the body pass over the data
                    cache = finetune.word_features(model, examples, pad, 128, args.bf16)
                finetune.train_epoch(model, optimizer, schedule, examples, ft_args, pad, seed=r, cache=cache)

            first.append(timed(epoch, args.device))
            if cached:
                later.append(timed(epoch, args.device))
        times[name] = line(name + (", first epoch" if cached else ", any epoch"), first)
        if cached:
            times[name + " later"] = line(name + ", later epoch", later)
    full = times["full fine-tuning"]
    at, first, later = times["adapter tuning"], times["adapter tuning --cache-body"], times["adapter tuning --cache-body later"]
    print(f"  adapter / full: {at / full:.3f} (target <= 0.4); with --cache-body first epoch {first / full:.3f}, "
          f"later epochs {later / full:.4f} (target <= 0.1)   (ratios of medians)")
    return {"at_over_full": at / full, "cached_first_over_full": first / full, "cached_later_over_full": later / full}


def pe_limit_gradients(model, tasks, pad, steps, device=None, amp=contextlib.nullcontext):
    """The limit of a meta-step for a PE method inside the body: per task (S+1) forward+backward passes that
    compute gradients for the PE parameters (+ head) only."""
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    set_trainable(model, ("pe", "head"))
    for support, query in tasks:
        for batch in [collate(support, pad, device)] * steps + [collate(query, pad, device)]:
            fwd_bwd(model, batch, amp)
    for n, p in model.named_parameters():
        p.requires_grad_(trainable[n])


def bench_pe_methods(args):
    """F: a meta-step for each PE method against its limit, on the same meta-batches."""
    print(f"4. meta-step per PE method at S={args.inner_steps} (first-order, the method + head in the inner loop), {where(args)}")
    out, times, amp = {}, {}, amp_of(args)
    for method in pe.METHODS:
        torch.manual_seed(0)
        model, tokenizer, _ = load_tagger(args.model, LABELS, 0, pe.config(method, 64))
        model.to(args.device).train()
        pad = tokenizer.pad_token_id
        metas = list(meta_batches(source_data(args, tokenizer), args.task_size, args.task_size, seed=0))[:args.repeats + 1]
        inner = list(named_group_params(model, meta.INNER_GROUPS["pe"]))
        runs = {"ours": lambda t: meta.meta_gradients(model, t, pad, inner, args.inner_steps, 0.03, args.device, amp=amp),
                "limit": lambda t: pe_limit_gradients(model, t, pad, args.inner_steps, args.device, amp),
                "second": lambda t: meta.meta_gradients(model, t, pad, inner, args.inner_steps, 0.03, args.device, amp=amp,
                                                        adapt=meta.fast_adapt_second_order)}
        times[method] = {name: [] for name in runs}
        for k, tasks in enumerate(metas):
            for name, run in runs.items():
                model.zero_grad(set_to_none=True)
                t = timed(lambda: run(tasks), args.device)
                if k:
                    times[method][name].append(t)
        ours, limit = times[method]["ours"], times[method]["limit"]
        line(f"{method}: ours", ours, ratio=ratio(ours, limit), of="its limit")
        line(f"{method}: limit, (S+1) fwd+bwd, PE grads only", limit)
        line(f"{method}: second order (--meta-grad second" + ("" if method == "adapter" else "; math attention kernel") + ")",
             times[method]["second"], ratio=ratio(times[method]["second"], ours), of="first order")
        out[f"{method}_ours_over_limit"] = ratio(ours, limit)
        out[f"{method}_second_over_first"] = ratio(times[method]["second"], ours)
    print("  (adapter: the body runs once per support batch (cached), so ours is below the limit of (S+1) passes; "
          "LoRA and BitFit live inside the body: every inner step is a forward+backward through it, and the query "
          "pass computes the body's gradient too)")
    return out


def bench_variants(args, model, tokenizer):
    """G: inner-loop variants (adapter scope, cached support pass) against the paper's S=5 SGD first-order step."""
    print(f"5. inner-loop variants, meta-step of 2 tasks x ({args.task_size} support + {args.task_size} query), {where(args)}")
    pad, amp = tokenizer.pad_token_id, amp_of(args)
    metas = list(meta_batches(source_data(args, tokenizer), args.task_size, args.task_size, seed=0))[:args.repeats + 1]
    inner = list(named_group_params(model, meta.INNER_GROUPS["pe"]))
    every = list(named_group_params(model, meta.INNER_GROUPS["all"]))
    variants = {"S=5 SGD first-order (paper)": dict(steps=5),
                "S=50 SGD first-order": dict(steps=50),
                "S=50 AdamW, fresh head": dict(steps=50, adapt=meta.fast_adapt_adamw, inner_head="fresh"),
                "S=5 second-order (--meta-grad second)": dict(steps=5, adapt=meta.fast_adapt_second_order),
                "Reptile, PE analogue, S=5": dict(steps=5, outer=meta.reptile_gradients),
                "Reptile, --inner-scope all, S=5": dict(steps=5, outer=meta.reptile_gradients, names=every)}
    times = {name: [] for name in variants}
    model.train()
    for k, tasks in enumerate(metas):
        for name, v in variants.items():
            v = dict(v)
            outer, names, steps = v.pop("outer", meta.meta_gradients), v.pop("names", inner), v.pop("steps")
            model.zero_grad(set_to_none=True)
            t = timed(lambda: outer(model, tasks, pad, names, steps, 0.03, args.device, amp=amp, **v), args.device)
            if k:
                times[name].append(t)
    base = times["S=5 SGD first-order (paper)"]
    for name, ts in times.items():
        line(name, ts, ratio=ratio(ts, base), of="the paper's step")
    s50, second = ratio(times["S=50 SGD first-order"], base), ratio(times["S=5 second-order (--meta-grad second)"], base)
    print(f"  S=50 / S=5 = {s50:.2f}x (target <= 1.5)   second-order / first-order = {second:.2f}x")
    return {"s50_over_s5": s50, "second_over_first": second}


def bench_precision(args):
    """Issue I: fp32 against bf16 autocast (--bf16) on this device, side by side in one process on the same batches:
    the frozen body's forward (a no-grad pass of 128 sentences, as word_features runs it), a forward+backward of the
    whole model (32 sentences), one meta-step (Algorithm 1, 2 tasks), one full fine-tuning step (fwd+bwd+AdamW), and one
    adapter+head step on cached body outputs (which finetune.py keeps in fp32)."""
    print(f"6. fp32 vs bf16 autocast, {args.device}: median ms and bf16 / fp32")
    torch.manual_seed(0)
    model, tokenizer, _ = load_tagger(args.model, LABELS, 64)
    model.to(args.device).train()
    pad = tokenizer.pad_token_id
    metas = list(meta_batches(source_data(args, tokenizer), args.task_size, args.task_size, seed=0))[:args.repeats + 1]
    big = [collate([ex for s, q in tasks for ex in s + q], pad, args.device) for tasks in metas]  # 128 sentences
    small = [collate(tasks[0][0], pad, args.device) for tasks in metas]  # 32
    inner = list(named_group_params(model, meta.INNER_GROUPS["pe"]))
    set_trainable(model, ("body", "pe", "head"))
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def full_ft_step(batch, amp):
        adamw.zero_grad(set_to_none=True)
        fwd_bwd(model, batch, amp)
        adamw.step()

    def body_pass(batch, amp):
        with amp():
            body_output(model, batch, dropout=False)

    def adapter_step(batch, amp, h):
        with amp():
            meta.fast_adapt(model, batch, inner, 1, 0.03, h)

    cached = [body_output(model, b, dropout=False) for b in small]
    runs = {"body forward, no grad, 128 sentences": lambda k, amp: body_pass(big[k], amp),
            "forward+backward, 32 sentences": lambda k, amp: fwd_bwd(model, small[k], amp),
            "meta-step, 2 tasks x (32 + 32)": lambda k, amp: meta.meta_gradients(
                model, metas[k], pad, inner, args.inner_steps, 0.03, args.device, amp=amp),
            "full fine-tuning step (fwd+bwd+AdamW), 32": lambda k, amp: full_ft_step(small[k], amp),
            "adapter+head step on cached body output": lambda k, amp: adapter_step(small[k], amp, cached[k])}
    amps = {"fp32": lambda: precision(args.device, False), "bf16": lambda: precision(args.device, True)}
    out = {}
    for name, run in runs.items():
        times = {p: [] for p in amps}
        for k in range(len(metas)):
            for p, amp in amps.items():
                model.zero_grad(set_to_none=True)
                t = timed(lambda: run(k, amp), args.device)
                if k:
                    times[p].append(t)
        r = ratio(times["bf16"], times["fp32"])
        print(f"  {name:46s} fp32 {statistics.median(times['fp32']) * 1000:8.1f} ms   bf16 "
              f"{statistics.median(times['bf16']) * 1000:8.1f} ms   {r:5.2f}x")
        out[f"bf16_over_fp32: {name}"] = r
    return out


def memory_child(args, which):
    """Run in a fresh process: one warm-up step, then the measured step. Prints JSON."""
    torch.manual_seed(0)
    model, tokenizer, _ = load_tagger(args.model, LABELS, 64)
    model.to(args.device).train()
    pad = tokenizer.pad_token_id
    metas = list(meta_batches(source_data(args, tokenizer), args.task_size, args.task_size, seed=0))[:2]
    p_args = prime.parse_args(["--out", "-", "--device", args.device, "--inner-steps", str(args.inner_steps)]
                              + (["--bf16"] if args.bf16 else []))
    optimizer, schedule = prime.make_optimizer(model, p_args if which == "priming" else
                                               prime.parse_args(["--out", "-", "--mode", "ft"]), total_steps=10)

    def step(tasks):
        if which == "priming":
            prime.prime_step(model, optimizer, schedule, tasks, p_args, pad)
        else:  # one plain fine-tuning step on the first task's query batch (32 sentences)
            optimizer.zero_grad(set_to_none=True)
            fwd_bwd(model, collate(tasks[0][1], pad, args.device), amp_of(args))
            optimizer.step()

    step(metas[0])  # warm-up: allocates the AdamW state
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(metas[1])
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = vm("VmRSS")
        step(metas[1])
        peak, how = vm("VmHWM"), "VmHWM (peak RSS)"
    print(json.dumps({"base": base, "peak": peak, "how": how}))


def vm(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))


def bench_memory(args):
    print("3. peak memory of one step, fresh process each, after a warm-up step")
    out = {}
    for which in ("priming", "fine-tuning"):
        cmd = [sys.executable, os.path.join(HERE, "bench.py"), "--memory-child", which] + sys.argv[1:]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        out[which] = r["peak"] - r["base"]
        print(f"  {which:12s} step: {r['how']} {r['peak'] / 2**20:8.0f} MiB = {r['base'] / 2**20:.0f} MiB before "
              f"+ {out[which] / 2**20:.0f} MiB for the step")
    print(f"  priming / fine-tuning step memory = {out['priming'] / out['fine-tuning']:.2f} (target <= 1.25)")
    return {"priming_over_ft_memory": out["priming"] / out["fine-tuning"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=PACKAGED_MINILM)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast where prime.py and finetune.py use it (parts 1-5)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--task-size", type=int, default=32, help="support = query = this many sentences")
    p.add_argument("--sentences", type=int, default=1000, help="source sentences per language to draw tasks from")
    p.add_argument("--ft-lang", default="nl")
    p.add_argument("--ft-sentences", type=int, default=500)
    p.add_argument("--parts", default="1,2,3,4,5", help="which parts to run (4: PE methods, 5: inner-loop variants, "
                                                          "6: fp32 vs bf16)")
    p.add_argument("--memory-child", choices=["priming", "fine-tuning"], help=argparse.SUPPRESS)
    add_data_args(p)
    args = p.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set("123456"):
        p.error(f"--parts is a comma-separated list of 1-6, not '{args.parts}'")
    if args.bf16 and "6" in parts:
        p.error("--bf16 does not apply to part 6, which times fp32 and bf16 side by side: run part 6 without it")
    if args.task != "ner":
        p.error(f"--task {args.task}: bench.py times NER batches (a task changes only the head's size and the data)")
    if not args.data_dir and not args.synthetic and os.path.isdir(os.path.join(HERE, "..", "shared", "wikiann")):
        args.data_dir = os.path.join(HERE, "..", "shared", "wikiann")
    if args.memory_child:
        return memory_child(args, args.memory_child)
    print(f"bench.py: {args.model} on {where(args)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, data {'synthetic' if args.synthetic else portable(args.data_dir) or 'hub'}")
    summary = {}
    if "1" in parts:
        torch.manual_seed(0)
        model, tokenizer, _ = load_tagger(args.model, LABELS, 64)
        summary.update(bench_priming(args, model.to(args.device), tokenizer))
    if "2" in parts:
        summary.update(bench_finetuning(args, load_tagger(args.model, LABELS, 0)[1]))
    if "3" in parts:
        summary.update(bench_memory(args))
    if "4" in parts:
        summary.update(bench_pe_methods(args))
    if "5" in parts:
        torch.manual_seed(0)
        model, tokenizer, _ = load_tagger(args.model, LABELS, 64)
        summary.update(bench_variants(args, model.to(args.device), tokenizer))
    if "6" in parts:
        summary.update(bench_precision(args))
    print("summary: " + json.dumps({k: round(v, 3) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
