"""An independent reference for the priming algorithms (issue M): plain autograd and torch.optim on deep copies, with
its own batching, loss, loops and parameter names written out. It shares nothing with meta.py or prime.py; only the
model's forward is common. For the tiny random BERT of conftest (2 layers)."""
import copy
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

LAYERS = 2
HEAD = ["head.weight", "head.bias"]
ADAPTER = ["adapter.down.weight", "adapter.down.bias", "adapter.up.weight", "adapter.up.bias"]
LORA = [f"body.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight" for i in range(LAYERS) for m in ("query", "value")
        for ab in "AB"]
BITFIT = ["body.embeddings.LayerNorm.bias"] + [f"body.encoder.layer.{i}.{m}.bias" for i in range(LAYERS) for m in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")]
PE = {"adapter": ADAPTER, "lora": LORA, "bitfit": BITFIT}


def pad(examples, pad_id):
    """(ids, mask, labels, pool) of a list of encoded sentences, padded on the right. pool (--word-position mean, when
    the sentences carry "pieces"): per sentence a [width, width] matrix whose row at a word's labelled position
    averages that word's sub-word positions, every other row the identity; else None."""
    width = max(len(e["input_ids"]) for e in examples)
    fill = lambda xs, v: xs + [v] * (width - len(xs))
    pool = None
    if "pieces" in examples[0]:
        pool = torch.stack([torch.eye(width) for _ in examples])
        for i, e in enumerate(examples):
            for (pos, _), positions in zip(e["first"], e["pieces"]):
                pool[i, pos] = torch.zeros(width).index_fill(0, torch.tensor(positions), 1 / len(positions))
    return (torch.tensor([fill(e["input_ids"], pad_id) for e in examples]),
            torch.tensor([fill([1] * len(e["input_ids"]), 0) for e in examples]),
            torch.tensor([fill(e["labels"], -100) for e in examples]), pool)


def loss(model, batch, params=None):
    """Mean cross-entropy over the labelled positions; `params` replaces some of the model's (functional)."""
    ids, mask, labels, pool = batch
    logits = model(ids, mask, pool) if params is None else functional_call(model, params, (ids, mask, pool))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def split(support, k):
    size = math.ceil(len(support) / k)
    return [support[i:i + size] for i in range(0, len(support), size)]


def adapt(m, names, batches, steps, lr, optimizer="sgd"):
    """S steps of torch.optim SGD (or AdamW from a new state) on the parameters `names` of the copy m; the batches
    in turn."""
    params = dict(m.named_parameters())
    chosen = [params[n] for n in names]
    opt = torch.optim.SGD(chosen, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(chosen, lr=lr, weight_decay=0.01)
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        m.zero_grad(set_to_none=True)
        loss(m, batches[k % len(batches)]).backward()
        opt.step()


def start_head(m, head):
    if head is not None:
        with torch.no_grad():
            m.head.weight.copy_(head[0])
            m.head.bias.copy_(head[1])


def first_order(model, tasks, pad_id, names, steps, lr, optimizer="sgd", heads=None, support_batches=1):
    """Algorithm 1's first-order meta-gradient: per task a deep copy adapts `names` + head for S steps on its support
    batches, then the query loss at the adapted copy gives every parameter's gradient; summed over tasks (head left
    out). Returns ({name: gradient}, the first task's adapted head). heads: per task a (weight, bias) start."""
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n not in HEAD}
    first_head = None
    for k, (support, query) in enumerate(tasks):
        m = copy.deepcopy(model)
        start_head(m, heads[k] if heads else None)
        adapt(m, names + HEAD, [pad(s, pad_id) for s in split(support, support_batches)], steps, lr, optimizer)
        m.zero_grad(set_to_none=True)
        loss(m, pad(query, pad_id)).backward()
        for n, p in m.named_parameters():
            if n in grads and p.grad is not None:
                grads[n] += p.grad
        first_head = first_head or {n: p.detach().clone() for n, p in m.named_parameters() if n in HEAD}
    return grads, first_head


def second_order(model, tasks, pad_id, names, steps, lr, heads=None):
    """Exact MAML: S SGD steps unrolled with create_graph on the model's own parameters `names` + head, the query
    loss backpropagated through them; summed over tasks (head left out). Math attention: it has a double backward.
    heads: per task, the head tensors to start from (a fresh head) instead of the model's."""
    ref = copy.deepcopy(model)
    with sdpa_kernel(SDPBackend.MATH):
        for k, (support, query) in enumerate(tasks):
            fast = {n: p for n, p in ref.named_parameters() if n in names + HEAD}
            if heads:
                fast.update({n: t.clone().requires_grad_() for n, t in heads[k].items()})
            s = pad(support, pad_id)
            for _ in range(steps):
                g = torch.autograd.grad(loss(ref, s, fast), list(fast.values()), create_graph=True)
                fast = {n: w - lr * gi for (n, w), gi in zip(fast.items(), g)}
            loss(ref, pad(query, pad_id), fast).backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in ref.named_parameters() if n not in HEAD}


def reptile(model, tasks, pad_id, names, steps, lr, plain=False):
    """Reptile's outer "gradient" theta - phi for the adapted parameters (not the head), summed over tasks. plain: the
    copy adapts every parameter on the support batch then the query batch in turn. Else (the PE analogue) it adapts
    `names` + head on the support batch, and every other parameter takes the query gradient at the adapted copy."""
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n not in HEAD}
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    for support, query in tasks:
        m = copy.deepcopy(model)
        adapted = [n for n, _ in m.named_parameters()] if plain else names + HEAD
        adapt(m, adapted, [pad(support, pad_id)] + ([pad(query, pad_id)] if plain else []), steps, lr)
        if not plain:
            m.zero_grad(set_to_none=True)
            loss(m, pad(query, pad_id)).backward()
        for n, p in m.named_parameters():
            if n in HEAD:
                continue
            if n in adapted:
                grads[n] += theta[n] - p.detach()
            elif p.grad is not None:
                grads[n] += p.grad
    return grads
