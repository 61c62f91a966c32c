"""Fine-tune on one target language under one of the seven settings of Table 1; pick the epoch by
validation F1, report test F1.

    python finetune.py --setting 3 --lang hi af --seed 1 2 3 --out runs/ft/s3   # adapter tuning (mBERT, hub data)
    python finetune.py --setting 4 --init runs/prime/meta --lang hi --out runs/ft/s4
    python finetune.py --setting full --model multilingual-e5-small --data-dir ../shared/wikiann --lang af --out runs/x
    python finetune.py --setting 3 --pe lora --lang hi --out runs/ft/s3-lora    # LoRA tuning (--pe bitfit: BitFit)

Settings: 1/full = body+head; 2/ht = head; 3/at = adapter+head on a new adapter (--pe: that method + head);
4-7 (meta, ft-priming, maml, one-step) = the same on a primed checkpoint (--init) of the setting's variant.
The head is always new; the body is frozen in 2-7 (but for LoRA's branches and BitFit's biases). Each run
writes OUT/<lang>/seed<N>/{result.json, predictions.conll (`token gold pred`), log.jsonl}; a run whose
result.json exists is skipped, so a rerun resumes. A NaN/inf training loss
stops that run: diverged.json instead of result.json, the other runs go on, exit code 3 at the end.

Fine-tuning hyper-parameters are not in the paper. Defaults: AdamW, linear decay after 10% warm-up,
batch 32, dev-selected epoch; full FT lr 5e-5 for 5 epochs (the usual BERT recipe); head and adapter
tuning lr 1e-3 for 10 epochs (~100k new parameters learn slowly at BERT's lr). 3-7 share one recipe.
"""
import argparse
import itertools
import json
import os
import sys
import time

import torch
from tqdm import tqdm

import pe
import tasks
from data import DataError, add_data_args, positive_int, batch_indices, collate, encode, load_split, unscored_words
from evaluate import SETTINGS, setting_name
from features import FEATURE_CACHE_VERSION, stored_word_features, word_features  # noqa: F401 (also finetune.X for others)
from model import (Diverged, ModelError, add_runtime_args, body_fingerprint, body_output, check_max_len, same_model, decay_unused_rows, in_groups,
                   is_checkpoint, keep_used_rows, load_tagger, named_group_params, precision, read_json, read_recipe, restore_vocab,
                   save_checkpoint, set_trainable, tagging_loss, versions, atomic_write, write_json)
from records import RUN_IGNORES, init_priming, is_done, mark_diverged, recorded_config, run_identity  # noqa: F401 (the same)

ALIASES = {"full": 1, "ht": 2, "head": 2, "at": 3, "adapter": 3, "meta": 4, "ft-priming": 5, "maml": 6, "one-step": 7}
TRAINABLE = {1: ("body", "head"), 2: ("head",), **{s: ("pe", "head") for s in range(3, 8)}}  # "pe": the --pe method's
RECIPES = {"full": {"lr": 5e-5, "epochs": 5}, "pe": {"lr": 1e-3, "epochs": 10}}  # see the docstring
PRIMING = {4: "meta", 5: "ft", 6: "maml", 7: "one-step"}  # the priming variant each primed setting starts from


def recipe_group(setting, pe_method):
    """The fine-tuning group whose recipe (lr, epochs) a setting uses: full FT, the head, or the PE method (3-7)."""
    return {1: "full", 2: "head"}.get(setting, pe_method)
DEFAULT_MODEL = "bert-base-multilingual-cased"


def setting_number(text):
    if text.isdigit() and int(text) in SETTINGS:
        return int(text)
    if text.lower() in ALIASES:
        return ALIASES[text.lower()]
    raise argparse.ArgumentTypeError(f"unknown setting {text!r}: use 1-7 or {', '.join(ALIASES)}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", type=setting_number, required=True, help="1-7 or a name (full, ht, at, meta, ...)")
    p.add_argument("--lang", nargs="+", required=True, help="target language(s)")
    p.add_argument("--out", required=True, help="output directory: OUT/<lang>/seed<N>/ per run")
    p.add_argument("--model", default=None, help=f"pretrained encoder (default {DEFAULT_MODEL}; for 4-7, "
                                                  "checked against the primed checkpoint's base model)")
    p.add_argument("--init", default=None, help="primed checkpoint directory (settings 4-7)")
    p.add_argument("--allow-any-priming", action="store_true",
                   help="settings 4-7: accept a checkpoint primed with another variant than the setting's (experiments)")
    p.add_argument("--seed", type=int, nargs="+", default=[1], help="one run per seed")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 5e-5 full FT, 1e-3 head/adapter)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: 5 full FT, 10 head/adapter)")
    p.add_argument("--recipe", metavar="RECIPES_JSON", default=None,
                   help="take --lr and --epochs from the recipe that recipe.py chose on dev F1 for this setting's group "
                        "(full, head, or the --pe method); refused when it was chosen under other flags")
    p.add_argument("--no-test", action="store_true",
                   help="never load or score the test split (recipe.py's grid: a choice made on dev F1 alone); "
                        "result.json then has no test F1")
    p.add_argument("--min-steps", type=int, default=0,
                   help="train at least this many optimizer steps: the epochs are raised to reach it, so that a small "
                        "training set gets as many updates as a large one (the data-size curve; default 0: off)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--eval-batch-size", type=positive_int, default=128)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-len", type=positive_int, default=128, help="max sub-words per sentence (longer: extra words predicted O in NER, counted wrong in other tasks)")
    p.add_argument("--train-size", type=positive_int, default=None, help="first N training sentences (all)")
    p.add_argument("--dev-size", type=positive_int, default=None, help="first N validation sentences (all)")
    p.add_argument("--test-size", type=positive_int, default=None, help="first N test sentences (all)")
    p.add_argument("--save-model", action="store_true", help="also save the trained groups (safetensors)")
    p.add_argument("--feature-cache", metavar="DIR", default=None,
                   help="settings 2, and 3-7 with the adapter (a frozen body): keep the body's outputs in DIR, keyed by a hash of the body, "
                        "for other runs on the same body and data (e.g. settings 2 and 3, a grid)")
    p.add_argument("--vocab-rows", choices=["used", "all"], default="used",
                   help="setting 1: train only the word-embedding rows of ids in the language's data (exact, faster with a "
                        "large vocabulary; model.UsedRows), or all")
    p.add_argument("--cache-whole-split", action="store_true",
                   help="with --feature-cache and --train-size N: keep the body's outputs for the WHOLE training split "
                        "and train on its first N, so that one body pass serves every training size (the data-size "
                        "curve): the same numbers as a pass over the N alone in our checks (tiny BERT; multilingual-"
                        "e5-small, hi), though the outputs come from other batches")
    p.add_argument("--cache-body", action="store_true",
                   help="settings 2, and 3-7 with the adapter (a frozen body): run it once, in eval mode (no dropout in the body), and train "
                        "adapter+head on its cached outputs for every epoch and seed")
    pe.add_args(p)  # setting 3 draws this method new; 4-7 take the checkpoint's (its method must be --pe)
    add_data_args(p)
    add_runtime_args(p)
    args = p.parse_args(argv)
    caching = [flag for flag, on in (("--cache-body", args.cache_body), ("--feature-cache", args.feature_cache),
                                     ("--cache-whole-split", args.cache_whole_split)) if on]
    if caching and (args.setting == 1 or (args.setting >= 3 and args.pe != "adapter")):  # the body trains: never frozen
        p.error(f"{' '.join(caching)} keep(s) a frozen body's outputs, but the body trains in setting {args.setting}"
                + (f" with --pe {args.pe}" if args.setting > 1 else "") + ": drop the flag(s)")
    if args.cache_whole_split and not (args.feature_cache and args.cache_body):
        p.error("--cache-whole-split keeps the training split's body outputs in --feature-cache: it needs --feature-cache "
                "and --cache-body")
    if args.setting < 4 and args.allow_any_priming:
        p.error(f"--allow-any-priming is for settings 4-7 (a primed --init); setting {args.setting} is not primed")
    if args.setting != 1 and args.vocab_rows != p.get_default("vocab_rows"):
        p.error(f"--vocab-rows is for setting 1, the only one that trains the embeddings (not setting {args.setting})")
    primed = read_json(os.path.join(args.init, "checkpoint.json")) if args.init and args.setting >= 4 else None
    pe.check_args(p, args, has_pe=args.setting >= 3, primed=(primed or {}).get("pe") if isinstance(primed, dict) else None)
    if args.recipe:
        given = [flag for flag, v in (("--lr", args.lr), ("--epochs", args.epochs)) if v is not None]
        if given:
            p.error(f"--recipe sets --lr and --epochs: drop {' '.join(given)}, or drop --recipe")
        try:
            config = recorded_config(args)  # settings 4-7 without --model: the encoder their priming started from
            config["model"] = args.model or (primed.get("base_model") if isinstance(primed, dict) else None)
            chosen = read_recipe(args.recipe, recipe_group(args.setting, args.pe), config)
        except ModelError as e:
            p.error(str(e))
        args.lr, args.epochs = float(chosen["lr"]), int(chosen["epochs"])
    recipe = RECIPES["full" if args.setting == 1 else "pe"]
    args.lr = args.lr if args.lr is not None else recipe["lr"]
    args.epochs = args.epochs if args.epochs is not None else recipe["epochs"]
    return args


def checkpoint_task(info):
    """The task a checkpoint (its checkpoint.json) was made for; those made before --task existed were NER."""
    return info.get("task") or (info.get("priming") or {}).get("task") or "ner"


def build_model(args):
    """(model, tokenizer, info) for the setting: pretrained body (1-3) or primed body+adapter (4-7);
    no adapter for 1-2. New groups (head; adapter of 3) are drawn per seed by `reset_new_groups`."""
    labels = tasks.get(args.task).labels
    if args.setting >= 4:
        if not args.init or not is_checkpoint(args.init):
            raise ModelError(f"setting {args.setting} needs --init DIR, a primed checkpoint from prime.py (got {args.init})")
        primed_for = checkpoint_task(read_json(os.path.join(args.init, "checkpoint.json")) or {})
        if primed_for != args.task:
            raise ModelError(f"--init {args.init} was primed for --task {primed_for}, not --task {args.task}: its head "
                             "has that task's tags; prime for this task (prime.py --task)")
        model, tokenizer, info = load_tagger(args.init, labels)
        if args.model and not same_model(args.model, info["base_model"]):
            raise ModelError(f"--init {args.init} was primed from {info['base_model']!r}, not from --model {args.model!r}")
        if (info["pe"] or {}).get("method") != args.pe:
            raise ModelError(f"--init {args.init} was primed for PE method {(info['pe'] or {}).get('method')!r}, "
                             f"not for --pe {args.pe}; tune it with the method it was primed for")
        primed_as, expected = info.get("variant", "unknown"), PRIMING[args.setting]
        if primed_as != expected:
            if not args.allow_any_priming:
                raise ModelError(f"--init {args.init} was primed as {primed_as!r}, but setting {args.setting} "
                                 f"({setting_name(args.setting, args.pe)}) starts from {expected!r} priming; pass --allow-any-priming to use it anyway")
            print(f"finetune.py: note: setting {args.setting} starts from {primed_as!r} priming (--allow-any-priming)", file=sys.stderr)
        return model, tokenizer, info
    if args.init:
        raise ModelError(f"setting {args.setting} starts from the pretrained --model; --init is for settings 4-7")
    return load_tagger(args.model or DEFAULT_MODEL, labels, adapter_dim=0, pe_config=pe.from_args(args) if args.setting == 3 else None)


def reset_new_groups(model, setting, seed):
    torch.manual_seed(seed)
    if setting == 3:
        pe.reset(model)
    model.reset_head()


@torch.no_grad()
def predict(model, examples, pad_id, batch_size=128, bf16=False, cache=None, labels=tasks.NER_TAGS):
    """Word-level tags (`labels`: the task's) per sentence; words without a sub-word position are tagged O in NER
    (no entity), "-" in other tasks (no tag: counted wrong). With `cache` (from word_features) only adapter+head run."""
    model.eval()
    device = next(model.parameters()).device
    preds = [[tasks.unscored_tag(labels)] * len(ex["tokens"]) for ex in examples]
    for idx in batch_indices(examples, batch_size):
        if cache is None:
            batch = collate([examples[i] for i in idx], pad_id, device)
            with precision(device, bf16):
                best = model(batch["input_ids"], batch["attention_mask"], batch.get("pool")).argmax(-1).tolist()
            rows = [[best[row][pos] for pos, _ in examples[i]["first"]] for row, i in enumerate(idx)]
        else:  # adapter+head on the cached body outputs, in fp32
            best = model(features=torch.cat([cache["features"][i] for i in idx]).float()).argmax(-1).tolist()
            ends = list(itertools.accumulate(len(examples[i]["first"]) for i in idx))
            rows = [best[e - len(examples[i]["first"]):e] for e, i in zip(ends, idx)]
        for i, row in zip(idx, rows):
            for (_, w), label in zip(examples[i]["first"], row):
                preds[i][w] = labels[label]
    return preds


def score(model, examples, args, pad_id, cache=None):
    """The task's metric (tasks.scores: {"f1", "precision", "recall"} or {"accuracy"}) and the predicted tags."""
    task = tasks.get(args.task)
    preds = predict(model, examples, pad_id, args.eval_batch_size, args.bf16, cache, task.labels)
    return tasks.scores(task, [ex["tags"] for ex in examples], preds), preds


def batch_loss(model, examples, idx, args, pad_id, frozen_body, cache=None):
    """Mean loss over the labelled words of the batch `idx`: from cached body outputs, from a
    no-grad body pass (frozen body), or through the whole model."""
    if cache is not None:  # adapter+head only: fp32 (bf16 autocast would only add casts to these small products)
        logits = model(features=torch.cat([cache["features"][i] for i in idx]).float())
        return tagging_loss(logits, torch.cat([cache["labels"][i] for i in idx]))
    batch = collate([examples[i] for i in idx], pad_id, args.device)
    if frozen_body:
        with precision(args.device, args.bf16):
            h = body_output(model, batch)
        logits = model(features=h.float())
    else:
        with precision(args.device, args.bf16):
            logits = model(batch["input_ids"], batch["attention_mask"], batch.get("pool"))
    return tagging_loss(logits, batch["labels"])


def train_epoch(model, optimizer, schedule, examples, args, pad_id, seed, cache=None, desc=None):
    """One epoch over shuffled length-bucketed batches; trains what requires grad. Returns the mean loss."""
    model.train()  # dropout on, in the frozen body too (as a standard HF loop), unless --cache-body
    params = [p for p in model.parameters() if p.requires_grad]
    frozen_body = not any(p.requires_grad for p in model.body.parameters())
    losses = []
    for idx in tqdm(batch_indices(examples, args.batch_size, shuffle=True, seed=seed), desc=desc, leave=False, disable=desc is None):
        loss = batch_loss(model, examples, idx, args, pad_id, frozen_body, cache)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        decay_unused_rows(model, optimizer)
        schedule.step()
        losses.append(loss.detach())
    losses = torch.stack(losses)
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):  # checked once per epoch: no device sync per step
        k = bad[0].item()
        raise Diverged(f"loss {losses[k].item()} at step {k + 1} of the epoch")
    return losses.mean().item()


def train_one(args, lang, seed, model, tokenizer, info, data, out, caches=None, identity=None):
    """Train the setting's groups from the model as given; write OUT/{result.json, predictions.conll, log.jsonl}.
    caches: word_features of the splits, for a frozen body ("train" only with --cache-body)."""
    if "body" in TRAINABLE[args.setting] and args.vocab_rows == "used":
        keep_used_rows(model, [ex for examples in data.values() for ex in examples])
    try:
        return train_groups(args, lang, seed, model, tokenizer, info, data, out, caches, identity)
    finally:
        restore_vocab(model)


def train_groups(args, lang, seed, model, tokenizer, info, data, out, caches, identity=None):
    start = time.time()
    caches = caches or {}
    pad_id = tokenizer.pad_token_id
    groups = TRAINABLE[args.setting]
    trainable, total = set_trainable(model, groups)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    per_epoch = -(-len(data["train"]) // args.batch_size)
    epochs = max(args.epochs, -(-args.min_steps // per_epoch))  # --min-steps raises the epochs of a small training set
    steps = epochs * per_epoch
    from transformers import get_linear_schedule_with_warmup
    schedule = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * steps), steps)
    metric = tasks.get(args.task).metric  # f1 (NER) or accuracy: the epoch is chosen on it, and it is reported
    best, trainable_names = {metric: -1.0}, {n for n, p in model.named_parameters() if p.requires_grad}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "log.jsonl"), "w") as log:
        for epoch in range(1, epochs + 1):
            try:
                train_loss = train_epoch(model, optimizer, schedule, data["train"], args, pad_id, seed * 1000 + epoch,
                                         caches.get("train"), desc=f"s{args.setting} {lang} seed{seed} ep{epoch}")
            except Diverged as e:
                raise Diverged(f"finetune.py: setting {args.setting} {lang} seed {seed} diverged in epoch {epoch}: {e}") from None
            dev, _ = score(model, data["validation"], args, pad_id, caches.get("validation"))
            log.write(json.dumps({"epoch": epoch, "train_loss": train_loss, "dev": dev,
                                  "elapsed_s": round(time.time() - start, 1)}) + "\n")
            log.flush()
            if dev[metric] > best[metric]:
                best = {metric: dev[metric], "epoch": epoch, "dev": dev,  # (and the unused embedding rows, decayed so far)
                        "state": {n: t.clone() for n, t in model.state_dict().items()
                                  if n.endswith("word_embeddings.full") or n in trainable_names}}
            print(f"s{args.setting} {lang} seed{seed} epoch {epoch}: train loss {train_loss:.4f} dev {NAMES[metric]} {dev[metric]:.2f}")
    model.load_state_dict(best["state"], strict=False)
    test = dict.fromkeys(best["dev"])  # --no-test: the split is never read
    if "test" in data:
        test, preds = score(model, data["test"], args, pad_id, caches.get("test"))
        def write_predictions(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                for ex, pred in zip(data["test"], preds):
                    f.write("".join(f"{t} {g} {p}\n" for t, g, p in zip(ex["tokens"], ex["tags"], pred)) + "\n")
        atomic_write(os.path.join(out, "predictions.conll"), write_predictions)
    if args.save_model:
        restore_vocab(model)
        save_checkpoint(out, model, tokenizer, groups, info["base_model"], tasks.get(args.task).labels,
                        init=None if "body" in groups else (args.init or args.model or DEFAULT_MODEL), extra={"task": args.task})
        if model.pe and model.pe["method"] == "lora":  # peft loads it on top of the body it was tuned from
            pe.export_peft(model.body, model.pe, os.path.join(out, "peft-lora"),
                           os.path.join(args.init, "peft-body") if args.init else (args.model or DEFAULT_MODEL))
    result = {"setting": args.setting, "setting_name": SETTINGS[args.setting], "lang": lang, "seed": seed,
              **{f"test_{k}": v for k, v in test.items()}, f"dev_{metric}": best[metric], **task_keys(args.task),
              "best_epoch": best["epoch"], "epochs": epochs, "trainable_params": trainable, "total_params": total,
              "trainable_percent": 100 * trainable / total, "pe": model.pe, "base_model": info["base_model"], "init": args.init,
              "sizes": {k: len(v) for k, v in data.items()},
              "unscored_test_words": unscored_words(data["test"]) if "test" in data else None,
              "config": {**recorded_config(args), "lang": lang, "seed": seed}, "identity": identity or run_identity(args),
              "versions": versions(),
              "wall_time_s": round(time.time() - start, 1)}
    write_json(os.path.join(out, "result.json"), result)  # last: marks the run as done
    print(f"s{args.setting} {lang} seed{seed}: " + (f"test {NAMES[metric]} {test[metric]:.2f} " if test[metric] is not None else "")
          + f"(dev {best[metric]:.2f}, epoch {best['epoch']})")
    return result


def task_keys(task):
    """result.json's task keys: none for NER, so its files read as before --task existed (metric f1: test_f1, dev_f1)."""
    return {} if task == "ner" else {"task": task, "metric": tasks.get(task).metric}


NAMES = {"f1": "F1", "accuracy": "accuracy"}


def main(args):
    """Run every (lang, seed) not done yet (is_done). Raises Diverged at the end if any run diverged."""
    run_dir = lambda lang, seed: os.path.join(args.out, lang, f"seed{seed}")
    identity = run_identity(args)
    runs = {lang: [s for s in args.seed if not is_done(run_dir(lang, s), args, identity)] for lang in args.lang}
    if not any(runs.values()):
        print(f"{args.out}: all runs done")
        return
    if args.init and not is_checkpoint(args.init) and os.path.isfile(os.path.join(args.init, "diverged.json")):
        for lang, seeds in runs.items():  # priming failed: so do these cells, until it succeeds
            for seed in seeds:
                mark_diverged(run_dir(lang, seed), args, lang, seed, f"finetune.py: setting {args.setting} {lang} seed {seed}: "
                              f"its priming diverged (see {args.init}/diverged.json)", identity, from_priming=True)
        raise Diverged(f"finetune.py: --init {args.init}: priming diverged; setting {args.setting} marked diverged")
    model, tokenizer, info = build_model(args)
    check_max_len(model.body, args.max_len)
    model.to(args.device)
    groups = TRAINABLE[args.setting]
    start_state = {n: t.clone() for n, t in model.state_dict().items() if in_groups(model, n, groups)}
    body_trains = any(n.startswith("body.") for n in named_group_params(model, groups))  # full FT, LoRA, BitFit
    sizes = {"train": args.train_size, "validation": args.dev_size, **({} if args.no_test else {"test": args.test_size})}
    task = tasks.get(args.task)
    diverged, body_key = [], None
    for lang, seeds in runs.items():
        if not seeds:
            continue
        # tokenized once for all seeds; --cache-whole-split: the whole training split (its cache entry serves every size)
        whole = lambda split: args.cache_whole_split and args.feature_cache and split == "train"
        full = {split: encode(load_split(lang, split, args.data_dir, args.synthetic, None if whole(split) else n, task),
                              tokenizer, args.max_len, args.word_position, task.labels) for split, n in sizes.items()}
        data = {split: examples[:sizes[split]] if sizes[split] else examples for split, examples in full.items()}
        for split, examples in data.items():
            if n := unscored_words(examples):
                print(f"{lang} {split}: {n} words lie beyond --max-len {args.max_len} "
                      "(or have no sub-word); " + ("they are predicted O and still scored" if tasks.unscored_tag(task.labels) == "O"
                                                     else "they get no tag and count as errors"))
        caches = {}
        if not body_trains:  # a frozen body gives the same outputs to every epoch and seed
            cached = [split for split in ("validation", "test") if split in data] + (["train"] if args.cache_body else [])
            body_key = body_key or (body_fingerprint(model.body, whole=True) if args.feature_cache else None)
            caches = {split: stored_word_features(model, data[split], args, tokenizer.pad_token_id, body_key, full[split])
                      for split in cached}
        for seed in seeds:
            model.load_state_dict(start_state, strict=False)  # each run starts from the same body/adapter
            reset_new_groups(model, args.setting, seed)
            try:
                train_one(args, lang, seed, model, tokenizer, info, data, run_dir(lang, seed), caches, identity)
            except Diverged as e:
                mark_diverged(run_dir(lang, seed), args, lang, seed, str(e), identity)
                diverged.append(f"{lang}/seed{seed}")
    if diverged:
        raise Diverged(f"finetune.py: setting {args.setting}: {len(diverged)} run(s) diverged: {' '.join(diverged)}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DataError, ModelError) as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(e, file=sys.stderr)
        sys.exit(3)
