"""Does torch.compile pay on this CPU? Issue P's lever, measured where the body runs: full fine-tuning steps (forward +
backward + AdamW, the tagger of finetune.py setting 1, length-bucketed batches of 32 as finetune.py builds them) on
the first N hi training sentences, eager and compiled (mode default and max-autotune-no-cudagraphs, dynamic shapes),
fp32 and bf16 autocast. Prints per case: the first pass (compilation included), then a second pass over the same
batches (steady state). Run it alone on a quiet machine, from the repository root:

    OMP_NUM_THREADS=1 python tools/compile_probe.py                 # 1 thread, as run_table1.sh --jobs 2 units run
    OMP_NUM_THREADS=1 python tools/compile_probe.py --sentences 320 --modes default
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import batch_indices, collate, encode, load_split  # noqa: E402
from model import decay_unused_rows, keep_used_rows, load_tagger, precision, tagging_loss  # noqa: E402
from tasks import TASKS  # noqa: E402


def one_pass(model, optimizer, examples, order, pad_id, bf16):
    start = time.perf_counter()
    for idx in order:
        batch = collate([examples[i] for i in idx], pad_id)
        with precision(torch.device("cpu"), bf16):
            logits = model(batch["input_ids"], batch["attention_mask"], batch.get("pool"))
        loss = tagging_loss(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay_unused_rows(model, optimizer)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="multilingual-e5-small")
    p.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "wikiann"))
    p.add_argument("--sentences", type=int, default=320)
    p.add_argument("--modes", default="eager,default,max-autotune-no-cudagraphs")
    p.add_argument("--precisions", default="fp32,bf16")
    args = p.parse_args()
    labels = TASKS["ner"].labels
    sentences = load_split("hi", "train", args.data_dir, limit=args.sentences)
    for bf16 in [name == "bf16" for name in args.precisions.split(",")]:
        for mode in args.modes.split(","):
            torch.manual_seed(0)
            torch._dynamo.reset()
            model, tokenizer, _ = load_tagger(args.model, labels, adapter_dim=0)
            examples = encode(sentences, tokenizer, 128, labels=labels)
            order = list(batch_indices(examples, 32, shuffle=True, seed=1))
            keep_used_rows(model, examples)  # finetune.py's default --vocab-rows used
            model.train()
            optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-4)
            if mode != "eager":
                model.forward = torch.compile(model.forward, mode=mode, dynamic=True)
            first = one_pass(model, optimizer, examples, order, tokenizer.pad_token_id, bf16)
            second = one_pass(model, optimizer, examples, order, tokenizer.pad_token_id, bf16)
            print(f"{'bf16' if bf16 else 'fp32'} {mode}: {len(order)} steps; first pass {first:.1f} s (compilation "
                  f"included), second pass {second:.1f} s ({1000 * second / len(order):.0f} ms per step)", flush=True)


if __name__ == "__main__":
    main()
