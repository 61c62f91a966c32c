"""The priming algorithms, top to bottom: Algorithm 1 (fast_adapt + meta_gradients) first, then its variants
(AdamW and second-order inner loops, Reptile, fine-tuning priming). prime.py is the script around them.

Algorithm 1 (Gheini, Ma & May), per meta-step, for each task (support, query) of the meta-batch:
    copies of the PE parameters + head take S SGD steps (lr alpha) on the support batch; the body is not updated
    the query loss at the adapted copies is backpropagated (first-order): the body gets d(query loss)/d(body)
    with the adapted top in place, each PE parameter d(query loss)/d(its adapted copy), summed over tasks
then AdamW updates body + PE parameters once (prime.py), and the head is set to the FIRST task's adapted head.

Each function takes the model and computes gradients into `.grad`; none changes a weight. With the adapter (after
the body) the body runs once per support batch (`features`), so the inner loop costs S small adapter+head steps;
LoRA and BitFit live inside the body, and a MAML loop adapts the body itself: their inner loop runs through it.
Imports nothing of ours but the bottom floor (data, model).
"""
import contextlib
import math

import torch
from torch.func import functional_call

from data import collate
from model import body_output, group_of, in_groups, tagging_loss

INNER_GROUPS = {"pe": ("pe", "head"), "all": ("body", "pe", "head")}  # what the inner loop adapts ("pe": the PE method)
SUPPORT_PASSES = ("cached", "cached-eval", "plain")


# ----------------------------------------------------------------------------- Algorithm 1
def fast_adapt(model, support, names, steps, lr, features=None, amp=contextlib.nullcontext, start=None):
    """The paper's inner loop: S plain SGD steps on functional copies of the parameters `names`, first-order (the
    copies are detached between steps). support: a batch, or a list of K batches taken in turn. features: the body's
    cached output on each support batch (valid when the body is not adapted): each step then runs only adapter+head.
    amp() wraps forward passes; start: starting values for some copies (a fresh head). Returns the adapted copies and
    the support loss before each step. The model is never modified."""
    fast, losses = copies(model, names, start), []
    for inputs, labels in inner_batches(support, features, steps):
        loss = support_loss(model, fast, inputs, labels, amp)
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {n: (w - lr * g).detach().requires_grad_() for (n, w), g in zip(fast.items(), grads)}
        losses.append(loss.detach())
    return fast, torch.stack(losses).tolist()


def meta_gradients(model, tasks, pad_id, inner_names, steps, lr, device=None, support_pass=None, amp=contextlib.nullcontext,
                   adapt=fast_adapt, inner_head="carry", support_batches=1):
    """Meta-gradient of one meta-batch, summed over its tasks into the .grad of body and PE parameters. Returns
    (per-task stats, the first task's adapted head). First-order (fast_adapt, fast_adapt_adamw): the query loss at
    the adapted copies is backpropagated; parameters outside the inner loop get their gradient directly, the
    adapted copies' gradients are applied to the originals. Second order (fast_adapt_second_order): the query loss
    backpropagates through the inner loop into the originals.
    support_pass: "cached" runs the body once per support batch in the model's mode (one dropout mask serves the S
    steps), "cached-eval" the same without dropout, "plain" re-runs the body at every step (fresh dropout). When the
    inner loop runs through the body (MAML loop, LoRA, BitFit) nothing can be cached: "plain", or "cached-eval" =
    every inner step in eval mode (no dropout in the inner loop); "cached" is refused. None: "cached" where it
    applies, else "plain" (prime.py's default). inner_head "fresh": each task's inner loop starts from a newly drawn
    head instead of the carried one."""
    params = dict(model.named_parameters())
    second_order = adapt is fast_adapt_second_order
    features_of, inner_amp = inner_pass(model, inner_names, support_pass, amp, second_order)
    first_head, stats = None, []
    for support, query in tasks:
        supports, query = task_batches(support, query, pad_id, device, support_batches)
        fast, support_losses = adapt(model, supports, inner_names, steps, lr, features_of(supports), inner_amp,
                                     fresh_head(model) if inner_head == "fresh" else None)
        with amp():
            logits = functional_call(model, fast, (query["input_ids"], query["attention_mask"], query.get("pool")))
        query_loss = tagging_loss(logits, query["labels"])
        query_loss.backward()  # body (if not in fast) gets its gradient directly; the fast copies get theirs
        for n, w in fast.items():
            if group_of(n) != "head" and not second_order:  # first-order: d loss / d adapted copy, applied to the original
                params[n].grad = w.grad if params[n].grad is None else params[n].grad + w.grad
        if first_head is None:
            first_head = {n: w.detach() for n, w in fast.items() if group_of(n) == "head"}
        stats.append({"support_loss": support_losses, "query_loss": query_loss.item()})
    if second_order:
        model.head.weight.grad = model.head.bias.grad = None  # the head gets no meta-gradient (it is reset after the step)
    return stats, first_head


# ----------------------------------------------------------------------------- helpers of the inner loop
def copies(model, names, start=None):
    """Detached leaf copies of the parameters in `names` (from `start` where given) for a first-order inner loop."""
    params, start = dict(model.named_parameters()), start or {}
    return {n: start.get(n, params[n]).detach().clone().requires_grad_() for n in names}


def inner_batches(support, features, steps):
    """The S (inputs, labels) of the inner loop: the support batches (a batch or a list of them) in turn; the
    inputs are the cached body outputs when given, else the token ids."""
    support = support if isinstance(support, list) else [support]
    features = features if isinstance(features, list) or features is None else [features]
    for k in range(steps):
        i = k % len(support)
        inputs = ((), {"features": features[i]}) if features is not None else \
            ((support[i]["input_ids"], support[i]["attention_mask"], support[i].get("pool")), {})
        yield inputs, support[i]["labels"]


def support_loss(model, fast, inputs, labels, amp):
    with amp():
        logits = functional_call(model, fast, *inputs)
    return tagging_loss(logits, labels)


def fresh_head(model):
    """A newly drawn head, as fine-tuning starts from (Tagger.reset_head's distribution), for --inner-head fresh."""
    w = model.head.weight
    return {"head.weight": torch.randn_like(w) * model.body.config.initializer_range, "head.bias": torch.zeros_like(model.head.bias)}


def task_batches(support, query, pad_id, device, support_batches=1):
    """A task's K support batches (its support sentences cut in K) and its query batch."""
    size = -(-len(support) // support_batches)
    return [collate(support[i:i + size], pad_id, device) for i in range(0, len(support), size)], collate(query, pad_id, device)


def runs_through_body(model, names):
    """Does an inner loop over `names` run through the body (it adapts body weights, LoRA branches or BitFit's
    biases)? Then the body's output cannot be cached for it."""
    return any(n.startswith("body.") for n in names)


def adapts_body(model, names):
    """Does an inner loop over `names` adapt body weights that are not the PE method's (the MAML loop, plain Reptile)?"""
    return any(group_of(n) == "body" and not in_groups(model, n, ("pe",)) for n in names)


@contextlib.contextmanager
def eval_mode(module):
    training = module.training
    module.train(False)
    try:
        yield
    finally:
        module.train(training)


@contextlib.contextmanager
def stacked(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def inner_pass(model, inner_names, support_pass, amp, second_order=False):
    """How the inner loop sees the body: (features_of(supports): cached body outputs or None, the inner loop's
    forward context). Cached outputs feed adapter+head in fp32 (no autocast: these products are small).
    support_pass None: "cached" where the body stays outside the inner loop, else "plain"."""
    through_body = runs_through_body(model, inner_names)
    support_pass = support_pass or ("plain" if through_body else "cached")
    if support_pass not in SUPPORT_PASSES:
        raise ValueError(f"support_pass is one of {SUPPORT_PASSES}, not {support_pass!r}")
    if not through_body:
        features_of = lambda supports: support_features(model, supports, support_pass, amp, second_order)
        return features_of, amp if support_pass == "plain" else contextlib.nullcontext
    if support_pass == "cached":
        raise ValueError("support_pass 'cached' runs the body once per task, outside the inner loop, but this inner loop "
                         "runs through the body (MAML loop, LoRA, BitFit): use 'plain' or 'cached-eval'")
    contexts = [amp]
    if support_pass == "cached-eval":
        contexts.append(lambda: eval_mode(model.body))  # honoured as: no dropout in the inner loop's forward passes
    if second_order:  # double backward through attention: only the math SDPA kernel has it (CPU and GPU)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        contexts.append(lambda: sdpa_kernel(SDPBackend.MATH))
    return (lambda supports: None), lambda: stacked(*(c() for c in contexts))


def support_features(model, supports, support_pass, amp, with_graph=False):
    """The body's output on each support batch for the inner loop, or None (support_pass "plain": the body runs at
    every step), in fp32. with_graph (second order): the outputs keep their graph to the body."""
    if support_pass == "plain":
        return None
    dropout = support_pass == "cached"
    if with_graph:  # second order: the inner loop's result depends on the body through these
        with amp(), (contextlib.nullcontext() if dropout else eval_mode(model.body)):
            return [model.features(s["input_ids"], s["attention_mask"], s.get("pool")).float() for s in supports]
    with amp():
        return [body_output(model, s, dropout=dropout).float() for s in supports]


# ----------------------------------------------------------------------------- variants of the inner loop
def fast_adapt_adamw(model, support, names, steps, lr, features=None, amp=contextlib.nullcontext, start=None,
                     betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    """S steps of AdamW from a zero state, as adapter tuning starts (torch.optim.AdamW's update, functional;
    weight decay 0.01 and betas as finetune.py uses them), first-order."""
    fast, losses = copies(model, names, start), []
    m = {n: torch.zeros_like(w) for n, w in fast.items()}
    v = {n: torch.zeros_like(w) for n, w in fast.items()}
    for t, (inputs, labels) in enumerate(inner_batches(support, features, steps), 1):
        loss = support_loss(model, fast, inputs, labels, amp)
        grads = dict(zip(fast, torch.autograd.grad(loss, list(fast.values()))))
        new = {}
        for n, w in fast.items():
            m[n] = torch.lerp(m[n], grads[n], 1 - betas[0])
            v[n] = v[n] * betas[1] + (1 - betas[1]) * grads[n] * grads[n]
            denom = (v[n].sqrt() / math.sqrt(1 - betas[1] ** t)) + eps
            new[n] = (w.detach() * (1 - lr * weight_decay) - (lr / (1 - betas[0] ** t)) * m[n] / denom).requires_grad_()
        fast = new
        losses.append(loss.detach())
    return fast, torch.stack(losses).tolist()


def fast_adapt_second_order(model, support, names, steps, lr, features=None, amp=contextlib.nullcontext, start=None):
    """S SGD steps that keep their graph (autograd.grad with create_graph), so that the query loss differentiates
    THROUGH the inner loop: exact MAML. The copies start as the model's own tensors (not detached), and `features`,
    if given, must carry their graph to the body (support_features with_graph). (torch.func.grad fails here under
    bf16 autocast with the math attention kernel; autograd.grad does not.)"""
    params = dict(model.named_parameters())
    fast = {n: (start or {}).get(n, params[n]) for n in names}
    fast = {n: w if w.requires_grad else w.detach().requires_grad_() for n, w in fast.items()}  # a fresh head's draw
    losses = []
    for inputs, labels in inner_batches(support, features, steps):
        loss = support_loss(model, fast, inputs, labels, amp)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True, materialize_grads=True)
        fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads)}
        losses.append(loss.detach())
    return fast, torch.stack(losses).tolist()


INNER_LOOPS = {"sgd": fast_adapt, "adamw": fast_adapt_adamw}


# ----------------------------------------------------------------------------- other outer gradients
def reptile_gradients(model, tasks, pad_id, inner_names, steps, lr, device=None, support_pass=None,
                      amp=contextlib.nullcontext, adapt=fast_adapt, inner_head="carry", support_batches=1):
    """Reptile (Nichol et al., 2018) as an outer "gradient": every adapted parameter outside the head moves towards
    its task-adapted value, grad += theta - phi, summed over tasks (AdamW then takes the step). When the inner loop
    adapts body weights that are not the PE method's (--inner-scope all) that is plain Reptile, and the inner loop
    trains on the support batches and then the query batch in turn (all of a task's data). Our PE analogue
    (--inner-scope pe): the PE parameters move towards their adapted values; the body weights, which the inner loop
    never changes, take the first-order gradient of the query loss at the adapted weights, as in Algorithm 1 (with
    BitFit, whose biases are the body's own, the biases take theta - phi and every other body weight the query
    gradient). Returns like meta_gradients."""
    params = dict(model.named_parameters())
    plain = adapts_body(model, inner_names)
    features_of, inner_amp = inner_pass(model, inner_names, support_pass, amp)
    first_head, stats = None, []
    for support, query in tasks:
        supports, query = task_batches(support, query, pad_id, device, support_batches)
        batches = supports + [query] if plain else supports
        fast, losses = adapt(model, batches, inner_names, steps, lr, features_of(batches), inner_amp,
                             fresh_head(model) if inner_head == "fresh" else None)
        stat = {"support_loss": losses}
        if not plain:  # the body's first-order query gradient (adapted copies held fixed)
            with amp():
                logits = functional_call(model, {n: w.detach() for n, w in fast.items()},
                                         (query["input_ids"], query["attention_mask"], query.get("pool")))
            query_loss = tagging_loss(logits, query["labels"])
            query_loss.backward()
            stat["query_loss"] = query_loss.item()
        else:
            stat["loss"] = losses[-1]
        for n, w in fast.items():
            if group_of(n) != "head":
                delta = params[n].detach() - w.detach()
                params[n].grad = delta if params[n].grad is None else params[n].grad + delta
        if first_head is None:
            first_head = {n: w.detach() for n, w in fast.items() if group_of(n) == "head"}
        stats.append(stat)
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
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("pool"))
    loss = tagging_loss(logits, batch["labels"], count)
    loss.backward()
    return [{"loss": loss.item()}]
