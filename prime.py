"""Priming (Algorithm 1 of Gheini, Ma & May): first-order MAML whose inner loop simulates parameter-efficient
fine-tuning. This is the script around meta.py, where Algorithm 1 and its variants read top to bottom: flags, the outer
AdamW step (gradients summed over the meta-batch's tasks, linear schedule, the head set to the FIRST task's adapted
head; fine-tuning re-initialises it anyway), resume and torchrun.

    python prime.py --out runs/prime/meta                          # setting 4 (mBERT, hub WikiAnn, en+es)
    python prime.py --inner-scope all --out runs/prime/maml        # setting 6: the inner loop updates the body too
    python prime.py --inner-steps 1 --out runs/prime/one-step      # setting 7
    python prime.py --mode ft --out runs/prime/ft                  # setting 5: plain fine-tuning, same examples
    python prime.py --model multilingual-e5-small --data-dir ../shared/wikiann --train-size 1000 --out runs/p
    python prime.py --pe lora --meta-grad second --out runs/p2     # LoRA (or bitfit), exact MAML; --mode reptile, ...

Writes OUT/{model.safetensors, checkpoint.json, tokenizer files} (body+PE+head), OUT/config.json and OUT/log.jsonl
(one line per meta-step); OUT/resume.pt every --save-every steps, from which --resume continues exactly. A NaN/inf
loss stops with exit code 3 and OUT/diverged.json. An OUT holding this priming is left as it is; one made with
other settings (or its interrupted resume.pt) is refused. `torchrun --nproc_per_node N prime.py ...`: rank r takes
tasks r, r+N, ... (ft: sentences), the gradients are summed before the one AdamW step, rank 0's head (the first task's)
is broadcast, rank 0 writes.
"""
import argparse
import itertools
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import dist
import pe
import tasks
from data import DataError, add_data_args, positive_int, encode, load_split, meta_batches, steps_per_epoch
from meta import INNER_GROUPS, INNER_LOOPS, SUPPORT_PASSES, fast_adapt_second_order, ft_gradients, meta_gradients, reptile_gradients
from model import (Diverged, ModelError, add_runtime_args, atomic_write, check_max_len, check_same, decay_unused_rows, keep_used_rows, load_tagger,
                   named_group_params, portable, precision, priming_identity, read_json, read_recipe, restore_vocab, safetensors_complete,
                   save_checkpoint, versions, write_json)


PAPER_INNER_LR = 0.03


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (the primed checkpoint)")
    p.add_argument("--model", default="bert-base-multilingual-cased", help="pretrained encoder (name or path)")
    p.add_argument("--mode", choices=["meta", "ft", "reptile"], default="meta",
                   help="meta: Algorithm 1; ft: plain fine-tuning priming; reptile: move towards the adapted weights")
    p.add_argument("--inner-scope", choices=["pe", "all"], default="pe",
                   help="pe: inner loop updates the PE method (--pe) + head only (paper); all: also the body (MAML loop)")
    p.add_argument("--inner-steps", type=positive_int, default=5, help="S, SGD steps per task (paper: 5)")
    p.add_argument("--inner-lr", type=float, default=None, help=f"alpha, inner learning rate (paper: {PAPER_INNER_LR}, SGD)")
    p.add_argument("--recipe", metavar="RECIPES_JSON", default=None,
                   help="take --inner-lr from the one recipe.py chose on dev F1 for this variant (group inner-lr-VARIANT); "
                        "refused when it was chosen under other flags")
    p.add_argument("--inner-optimizer", choices=list(INNER_LOOPS), default="sgd",
                   help="sgd (paper) or adamw (from a zero state per task, as adapter tuning; pair it with its --inner-lr)")
    p.add_argument("--inner-head", choices=["carry", "fresh"], default="carry",
                   help="carry: start each task from the head the last meta-step left (paper); fresh: from a new draw")
    p.add_argument("--support-batches", type=positive_int, default=1,
                   help="K: a task's support set is K batches of --support-size, taken in turn by the S steps")
    p.add_argument("--meta-grad", choices=["first", "second"], default="first",
                   help="first: first-order meta-gradient (paper); second: differentiate through the inner loop (SGD only)")
    p.add_argument("--support-pass", choices=SUPPORT_PASSES, default=None,
                   help="cached: the body once per task (default with the adapter); plain: at every step (default when the "
                        "inner loop runs through the body); cached-eval: no dropout there (docs/choices.md)")
    p.add_argument("--lr", type=float, default=5e-5, help="beta, outer AdamW learning rate (paper: 5e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not in the paper)")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="linear schedule warm-up fraction (not in the paper)")
    p.add_argument("--sources", nargs="+", default=["en", "es"], help="source languages, one task each per meta-batch")
    p.add_argument("--train-size", type=positive_int, default=None, help="use the first N training sentences per source (all)")
    p.add_argument("--support-size", type=positive_int, default=32, help="sentences in a task's support batch (not in the paper)")
    p.add_argument("--query-size", type=positive_int, default=32, help="sentences in a task's query batch (not in the paper)")
    p.add_argument("--epochs", type=positive_int, default=3, help="passes over the source data (not in the paper)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many meta-steps (or after --epochs passes, whichever comes first)")
    p.add_argument("--max-len", type=positive_int, default=128, help="max sub-words per sentence")
    p.add_argument("--vocab-rows", choices=["used", "all"], default="used",
                   help="used: train only the embedding rows the data uses (exact, faster; model.UsedRows); all: every row")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--save-every", type=int, default=100, help="write OUT/resume.pt every N meta-steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/resume.pt if an interrupted run left one")
    pe.add_args(p)
    add_data_args(p)
    add_runtime_args(p)
    args = p.parse_args(argv)
    pe.check_args(p, args)
    if args.mode == "ft":  # no inner loop: its flags would be ignored, so they are refused
        inner = [f"--{k.replace('_', '-')}" for k in ALGORITHM_FLAGS[1:] + ("inner_lr", "support_pass", "recipe")
                 if getattr(args, k) != p.get_default(k)]
        if inner:
            p.error(f"--mode ft has no inner loop; {' '.join(inner)} do(es) not apply")
        args.inner_lr = PAPER_INNER_LR  # recorded as before the flag could be left unset
        return args
    if args.meta_grad == "second" and (args.inner_optimizer != "sgd" or args.mode != "meta"):
        p.error("--meta-grad second differentiates through SGD steps: it needs --inner-optimizer sgd and --mode meta")
    plain_reptile = args.mode == "reptile" and args.inner_scope == "all"  # its inner loop also trains on the query
    if args.inner_steps < args.support_batches + plain_reptile:
        p.error(f"--inner-steps {args.inner_steps} < the inner loop's {args.support_batches + plain_reptile} batches "
                f"(--support-batches{' + the query batch of plain Reptile' if plain_reptile else ''}): the steps take them "
                "in turn, so some would never be used")
    if plain_reptile and args.inner_optimizer == "adamw" and args.vocab_rows == "used":
        # AdamW's weight decay moves every row in the inner loop, and theta - phi carries it
        p.error("--vocab-rows used is not exact for plain Reptile with --inner-optimizer adamw (its inner weight decay "
                "moves the unused embedding rows too): pass --vocab-rows all")
    through_body = args.inner_scope == "all" or args.pe != "adapter"
    if through_body and args.support_pass == "cached":
        why = "--inner-scope all" if args.inner_scope == "all" else f"--pe {args.pe}"
        p.error(f"--support-pass cached runs the body once per task, outside the inner loop; with {why} the inner loop "
                "runs through the body: use plain or cached-eval")
    args.support_pass = args.support_pass or ("plain" if through_body else "cached")  # recorded resolved
    if args.recipe:
        if args.inner_lr is not None:
            p.error("--recipe sets --inner-lr: drop one of them")
        try:
            args.inner_lr = float(read_recipe(args.recipe, f"inner-lr-{variant(args)}", recorded_args(args), "prime")["inner_lr"])
        except ModelError as e:
            p.error(str(e))
    args.inner_lr = PAPER_INNER_LR if args.inner_lr is None else args.inner_lr
    return args


def prime_step(model, optimizer, schedule, tasks, args, pad_id):
    """One outer step on one meta-batch: Algorithm 1 (mode meta) or plain fine-tuning (mode ft).
    Returns per-task stats and the learning rate this step used.
    Under torchrun, each process computes its share (tasks rank, rank+W, ...; ft: sentences), the gradients
    are summed over the processes and every process takes rank 0's head: the first task is always rank 0's."""
    optimizer.zero_grad(set_to_none=True)
    rank, world = dist.rank_world()
    amp = lambda: precision(args.device, args.bf16)  # forward passes only: backward runs outside autocast
    if args.mode in ("meta", "reptile"):
        inner = named_group_params(model, INNER_GROUPS[args.inner_scope])
        adapt = fast_adapt_second_order if args.meta_grad == "second" else INNER_LOOPS[args.inner_optimizer]
        outer = meta_gradients if args.mode == "meta" else reptile_gradients
        stats, first_head = outer(model, tasks[rank::world], pad_id, list(inner), args.inner_steps, args.inner_lr,
                                  args.device, args.support_pass, amp, adapt, args.inner_head, args.support_batches)
    else:
        stats = ft_gradients(model, tasks, pad_id, args.device, amp, rank, world)
    if world > 1:
        dist.sum_gradients([p for group in optimizer.param_groups for p in group["params"]])
        stats = dist.gather_stats(stats, summed=args.mode == "ft")
    lr = schedule.get_last_lr()[0]  # the rate of this step (after schedule.step() it would be the next one's)
    optimizer.step()
    decay_unused_rows(model, optimizer)
    schedule.step()
    if args.mode != "ft":
        head = named_group_params(model, ("head",))
        with torch.no_grad():  # theta_h = theta_h^1: the head takes the first task's adapted head
            for n, p in head.items():
                if first_head is not None:  # None: a process with no task in this meta-batch
                    p.copy_(first_head[n])
        dist.broadcast(head.values())  # the first task is rank 0's
    return stats, lr


def make_optimizer(model, args, total_steps):
    """AdamW + linear schedule on body+PE (meta) or body+PE+head (ft)."""
    groups = ("body", "pe", "head") if args.mode == "ft" else ("body", "pe")
    optimizer = torch.optim.AdamW(named_group_params(model, groups).values(), lr=args.lr, weight_decay=args.weight_decay)
    from transformers import get_linear_schedule_with_warmup
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)


VARIANTS = {"meta": {}, "ft": {"mode": "ft"}, "maml": {"inner_scope": "all"}, "one-step": {"inner_steps": 1}}
ALGORITHM_FLAGS = ("mode", "inner_scope", "inner_steps", "inner_head", "inner_optimizer", "support_batches", "meta_grad")
# what makes a variant; learning rates and sizes do not


def variant(args):
    """The priming variant's name (settings 4-7: meta, ft, maml, one-step), recorded in the checkpoint so that
    finetune.py can check it against the setting; other flag combinations are named by their differences."""
    if args.mode == "ft":
        return "ft"
    defaults = vars(parse_args(["--out", "-"]))
    for name, flags in VARIANTS.items():
        if all(getattr(args, k) == {**defaults, **flags}[k] for k in ALGORITHM_FLAGS):
            return name
    return args.mode + "(" + ", ".join(f"{k}={getattr(args, k)}" for k in ALGORITHM_FLAGS[1:] if getattr(args, k) != defaults[k]) + ")"


def recorded_args(args):
    return {**vars(args), "data_dir": portable(args.data_dir)}


RESUME_IGNORES = ("resume", "save_every", "device", "recipe")  # flags that may differ between a run and its resumption


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
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    dist.barrier()


def read_state(path, args):
    """OUT/resume.pt's state for --resume, or None (none, damaged, or started over without --resume). One written with
    other flags is refused (one line naming them) with or without --resume; under --resume, so is one written by
    another number of processes."""
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location=args.device, weights_only=True)
        state["model"], state["args"], state["step"]
    except Exception as e:  # truncated or corrupt (a crash, a full disk): the run starts over, nothing half-read is used
        if args.resume and dist.rank_world()[0] == 0:
            print(f"prime.py: {path} is damaged ({type(e).__name__}); starting this priming over", file=sys.stderr)
        return None
    changed = {k: (v, vars(args).get(k)) for k, v in state["args"].items() if vars(args).get(k) != v}
    if changed:
        raise ModelError(f"{path} was written with other flags ({', '.join(f'--{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                         "rerun with the same flags, or delete it to start over")
    if not args.resume:
        if dist.rank_world()[0] == 0:
            print(f"prime.py: {args.out} holds an interrupted priming (meta-step {state['step']}) with these flags; "
                  "starting it over (--resume continues it)", file=sys.stderr)
        return None
    if (written := state.get("world_size", 1)) != (world := dist.rank_world()[1]):
        raise ModelError(f"{path} was written by {written} process(es), not {world}; resume it with "
                         f"{'torchrun --nproc_per_node %d' % written if written > 1 else 'python'} prime.py, or delete it to start over")
    return state


def load_state(state, model, optimizer, schedule):
    """Restore what save_state wrote (read by read_state); returns the step to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    rng = state["rng"][dist.rank_world()[0]]
    torch.set_rng_state(rng["cpu"].cpu())
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    dist.barrier()
    return state["step"]


def truncate_log(path, step):
    """Keep the log lines of steps <= step (a resumed run rewrites the rest; a line a crash cut short is dropped)."""
    if os.path.isfile(path):
        with open(path) as f:
            kept = [line if line.endswith("\n") else line + "\n" for line in f if logged_step(line) <= step]

        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(kept)
        atomic_write(path, write)


def logged_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # not a complete record: never kept


def existing(args, rank):
    """True when OUT holds this priming, complete (its resume.pt, if any, is removed). A checkpoint or diverged.json
    made with other settings is refused (one line naming the differences); this priming's diverged.json stops here
    (exit 3; delete it to retry); a damaged checkpoint is primed again."""
    identity = priming_identity({"variant": variant(args), "priming": recorded_args(args)})
    for name in ("checkpoint.json", "diverged.json"):
        path = os.path.join(args.out, name)
        if not os.path.isfile(path):
            continue
        record = read_json(path)
        if isinstance(record, dict):
            check_same(args.out, "priming", priming_identity(record) if name == "checkpoint.json" else
                       record.get("identity", identity), identity)
            if name == "diverged.json":
                raise Diverged(f"prime.py: {args.out} diverged earlier (at meta-step {record.get('step')}); delete {path} to retry")
            if safetensors_complete(os.path.join(args.out, "model.safetensors")):
                if rank == 0 and os.path.exists(os.path.join(args.out, "resume.pt")):
                    os.remove(os.path.join(args.out, "resume.pt"))
                return True
        if rank == 0:
            print(f"prime.py: {path} or its weights are damaged; priming again", file=sys.stderr)
        dist.barrier()
        if rank == 0:
            os.remove(path)
    return False


def main(args):
    start = time.time()
    rank, world, args.device = dist.setup(args.device)
    if existing(args, rank):
        if rank == 0:
            print(f"primed: {args.out} (exists)")
        return dist.teardown()
    state_path, log_path = os.path.join(args.out, "resume.pt"), os.path.join(args.out, "log.jsonl")
    state = read_state(state_path, args)  # before any work: one made with other flags is refused
    torch.manual_seed(args.seed)  # the same initial weights on every process
    task = tasks.get(args.task)
    model, tokenizer, info = load_tagger(args.model, task.labels, pe_config=pe.from_args(args))
    check_max_len(model.body, args.max_len)
    model.to(args.device)
    if rank > 0:  # under torchrun: each process its own dropout stream (rank 0, like a plain run, keeps the seed's)
        torch.manual_seed(1000 * args.seed + rank)
    sources = {lang: encode(load_split(lang, "train", args.data_dir, args.synthetic, args.train_size, task), tokenizer,
                            args.max_len, args.word_position, task.labels)
               for lang in args.sources}
    support_size = args.support_size * args.support_batches  # a task's support sentences, cut into K batches
    per_epoch = steps_per_epoch(sources, support_size, args.query_size)
    if per_epoch == 0:
        raise DataError(f"too few source sentences for one task of {args.support_size}+{args.query_size}")
    total = min(args.max_steps or math.inf, args.epochs * per_epoch)
    if args.vocab_rows == "used":
        keep_used_rows(model, [ex for examples in sources.values() for ex in examples])
    optimizer, schedule = make_optimizer(model, args, total)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    done = 0
    if state is not None:
        done = load_state(state, model, optimizer, schedule)
        del state
        if rank == 0:
            print(f"prime.py: resuming {args.out} at meta-step {done} of {total}")
    config = {"script": "prime.py", "variant": variant(args), "args": recorded_args(args), "base_model": info["base_model"],
              "steps": total, "steps_per_epoch": per_epoch, "versions": versions(), "processes": world}
    if rank == 0:  # only rank 0 writes files
        truncate_log(log_path, done)
        write_json(os.path.join(args.out, "config.json"), config)

    model.train()  # dropout on everywhere, in the inner loop too (not in the paper)
    batches = (tasks for epoch in itertools.count() for tasks in
               meta_batches(sources, support_size, args.query_size, seed=args.seed * 1000 + epoch))
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
                               {"script": "prime.py", "variant": name, "step": step + 1, "loss": loss, "support_losses": support,
                                "identity": priming_identity({"variant": variant(args), "priming": recorded_args(args)})})
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
    if model.pe["method"] == "lora":  # for the peft library: the body as a standard HF model + the LoRA as a peft adapter
        pe.save_plain_body(model.body, tokenizer, os.path.join(args.out, "peft-body"))
        pe.export_peft(model.body, model.pe, os.path.join(args.out, "peft-lora"), "peft-body")
    save_checkpoint(args.out, model, tokenizer, ("body", "pe", "head"), info["base_model"], task.labels,  # last: marks it complete
                    extra={"variant": variant(args), "priming": recorded_args(args)})
    if os.path.exists(state_path):
        os.remove(state_path)  # the checkpoint is complete; the resume state is no longer needed
    write_json(os.path.join(args.out, "config.json"), {**config, "wall_time_s": round(time.time() - start, 1)})
    print(f"primed checkpoint: {args.out} ({total} steps, {time.time() - start:.0f}s)")


if __name__ == "__main__":
    code = 0
    try:
        main(parse_args())
    except (DataError, ModelError, Diverged) as e:  # under torchrun every process raises it at the same point
        if dist.is_main_process():  # rank 0 says why
            print(e if isinstance(e, Diverged) else f"prime.py: error: {e}", file=sys.stderr)
        dist.teardown()  # all leave the process group together
        code = 3 if isinstance(e, Diverged) else 2
    dist.end_process(code)  # under torchrun without interpreter finalization (a gloo race: see dist.end_process)
