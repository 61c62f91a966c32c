"""The frozen body's outputs at each word's scored sub-word: computed once per split (settings 2, and 3-7 with the
adapter: the body does not train), and kept on disk (--feature-cache) for other processes on the same body and data.
"""
import hashlib
import json
import os
import sys

import torch

from data import batches
from model import atomic_write, body_output, precision


@torch.no_grad()
def word_features(model, examples, pad_id, batch_size=128, bf16=False):
    """The frozen body's output (eval mode: no dropout) at each word's first sub-word, per example
    ([words_i, hidden]), with the matching labels. Adapter and head act per position, so training
    and prediction can run on these alone."""
    device = next(model.parameters()).device
    feats = [None] * len(examples)
    for idx, batch in batches(examples, batch_size, pad_id, device=device):
        with precision(device, bf16):
            h = body_output(model, batch, dropout=False)
        for row, i in enumerate(idx):
            feats[i] = h[row, [pos for pos, _ in examples[i]["first"]]]
    labels = [torch.tensor([l for l in ex["labels"] if l != -100], dtype=torch.long, device=device) for ex in examples]
    return {"features": feats, "labels": labels}


FEATURE_CACHE_VERSION = 2  # bump when word_features changes what it computes: older entries are then never read


def stored_word_features(model, examples, args, pad_id, body_key, full=None):
    """word_features, kept in --feature-cache DIR: another process with the same frozen body (settings 2 and 3
    share the pretrained one; a grid shares it across recipes and seeds) loads them instead of running the body
    again. An entry is keyed by a hash of the whole body's weights (`body_key`), --max-len, --bf16 and the token ids
    and labels of `full`: the examples themselves, or (--cache-whole-split) the whole split that they are a prefix of
    (a run on the first N sentences takes the first N entries: one body pass serves every size), and records that key, so a
    different body, length, precision or data file is never served. A damaged entry is recomputed; writes are
    atomic under unique temporary names, so units computing the same entry at once do not collide."""
    if not args.feature_cache:
        return word_features(model, examples, pad_id, args.eval_batch_size, args.bf16)
    full = full if full is not None else examples
    assert full[:len(examples)] == examples, "the cached split must start with the run's examples"
    key = hashlib.sha1(json.dumps([FEATURE_CACHE_VERSION, body_key, args.max_len, bool(args.bf16),
                                   [(ex["input_ids"], ex["labels"], *([ex["pieces"]] if "pieces" in ex else [])) for ex in full]]).encode()).hexdigest()
    path = os.path.join(args.feature_cache, key[:20] + ".pt")
    cache = None
    if os.path.isfile(path):
        try:
            cache = torch.load(path, map_location=args.device, weights_only=True)
            if cache.get("key") != key or len(cache["features"]) != len(full):
                cache = None
        except Exception:  # truncated or corrupt (a crash, a full disk): rebuilt below
            print(f"finetune.py: {path} is damaged; recomputing it", file=sys.stderr)
            cache = None
    if cache is None:
        cache = {"key": key, **word_features(model, full, pad_id, args.eval_batch_size, args.bf16)}
        os.makedirs(args.feature_cache, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(cache, tmp))
    return {"features": cache["features"][:len(examples)], "labels": cache["labels"][:len(examples)]}
