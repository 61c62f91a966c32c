"""Parameter-efficient (PE) methods the tagger can carry, and which of its parameters each one trains.

    adapter  ONE bottleneck adapter after the body's last layer (the paper's choice): x + up(relu(down(x)))
    lora     LoRA (Hu et al., 2022) on chosen linear layers of the body: W x + (alpha / r) B A x, B = 0 at the start
    bitfit   BitFit (Ben Zaken et al., 2021): the body's own biases (LayerNorm biases included)

A method is described by a small dict (`config`), recorded in checkpoints, e.g. {"method": "lora", "rank": 8,
"alpha": 16, "targets": ["query", "value"]}. A new adapter and a new LoRA are exactly the identity, so PE tuning
starts from the plain encoder. LoRA is hand-written (a forward hook adds the low-rank branch, so the body's own
parameter names stay those of a standard Hugging Face model); `export_peft` writes it in the `peft` library's
format, which `peft.PeftModel.from_pretrained` loads on top of the body. This file imports nothing of ours.
"""
import math
import os

import torch
from torch import nn

METHODS = ("adapter", "lora", "bitfit")
LORA_TARGETS = ("query", "value")  # the usual choice: attention query and value projections of every layer


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby et al., 2019): x + up(relu(down(x))). `up` starts at zero, so a
    new adapter is exactly the identity and adapter tuning starts from the plain encoder output."""

    def __init__(self, hidden, bottleneck=64, init_range=0.02):
        super().__init__()
        self.down, self.up, self.init_range = nn.Linear(hidden, bottleneck), nn.Linear(bottleneck, hidden), init_range
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.down.weight, std=self.init_range)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(torch.relu(self.down(x)))


def config(method="adapter", adapter_dim=64, lora_rank=8, lora_alpha=16, lora_targets=LORA_TARGETS):
    """The config dict of a method from command-line values (only the method's own values are kept)."""
    if method == "adapter":
        return {"method": "adapter", "dim": adapter_dim}
    if method == "lora":
        return {"method": "lora", "rank": lora_rank, "alpha": lora_alpha, "targets": list(lora_targets)}
    if method == "bitfit":
        return {"method": "bitfit"}
    raise ValueError(f"unknown PE method {method!r}; use one of {', '.join(METHODS)}")


def add_args(parser):
    g = parser.add_argument_group("parameter-efficient method (settings 3-7 and priming)")
    g.add_argument("--pe", choices=METHODS, default="adapter", help="PE method primed for and tuned (paper: adapter)")
    g.add_argument("--adapter-dim", type=int, default=64, help="adapter bottleneck (paper: 64)")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (the branch is scaled by alpha / r)")
    g.add_argument("--lora-targets", nargs="+", default=list(LORA_TARGETS),
                   help="names of the body's linear layers that get LoRA (e.g. query key value dense)")


def from_args(args):
    return config(args.pe, args.adapter_dim, args.lora_rank, args.lora_alpha, args.lora_targets)


OWN_FLAGS = {"adapter": {"adapter_dim": "dim"}, "lora": {"lora_rank": "rank", "lora_alpha": "alpha", "lora_targets": "targets"},
             "bitfit": {}}  # each method's flags and the config keys they set


def check_args(parser, args, has_pe=True, primed=None):
    """Refuse in one line (parser.error) the PE flags that would be ignored: given with a non-default value for
    another method, for a setting without a PE method (has_pe False), or against the config a primed checkpoint
    was made with (`primed`: its config dict; the method itself is checked where the checkpoint is loaded)."""
    flag = lambda dest: "--" + dest.replace("_", "-")
    if small := [f"{flag(d)} {getattr(args, d)}" for d in ("adapter_dim", "lora_rank") if getattr(args, d) < 1]:
        parser.error(f"{', '.join(small)}: must be >= 1")
    given = {d: getattr(args, d) for flags in OWN_FLAGS.values() for d in flags if getattr(args, d) != parser.get_default(d)}
    if not has_pe and (args.pe != parser.get_default("pe") or given):
        parser.error(f"{' '.join([flag('pe')] * (args.pe != parser.get_default('pe')) + [flag(d) for d in given])}: "
                     "this setting has no PE method (settings 3-7 have one)")
    if other := [flag(d) for d in given if d not in OWN_FLAGS[args.pe]]:
        parser.error(f"{' '.join(other)} do(es) not apply to --pe {args.pe}")
    if primed and primed.get("method") == args.pe:
        key = OWN_FLAGS[args.pe]
        if wrong := [f"{flag(d)} {v} (primed with {primed.get(key[d])})" for d, v in given.items() if primed.get(key[d]) != v]:
            parser.error(f"{', '.join(wrong)}: settings 4-7 tune the PE method as it was primed; drop the flag(s)")


# ----------------------------------------------------------------------------- LoRA
def lora_branch(module, inputs, output):
    """Forward hook of a linear layer with LoRA: adds (alpha / r) B A x to its output."""
    return output + module.lora_B(module.lora_A(inputs[0])) * module.lora_scale


def add_lora(body, rank, alpha, targets):
    """Give every nn.Linear of `body` whose own name is in `targets` a LoRA branch (lora_A: d_in -> r, Kaiming
    uniform as nn.Linear and peft initialise it; lora_B: r -> d_out, zero). Returns the names of the layers."""
    linear = {name: m for name, m in body.named_modules() if isinstance(m, nn.Linear)}
    layers = [(name, m) for name, m in linear.items() if name.split(".")[-1] in targets]
    if missing := [t for t in targets if t not in {name.split(".")[-1] for name, _ in layers}]:
        raise ValueError(f"--lora-targets {' '.join(missing)}: no linear layer of the body has that name (its linear "
                         f"layers: {' '.join(sorted({name.split('.')[-1] for name in linear}))})")
    for _, m in layers:
        m.lora_A = nn.Linear(m.in_features, rank, bias=False).to(m.weight.device)
        m.lora_B = nn.Linear(rank, m.out_features, bias=False).to(m.weight.device)
        m.lora_scale = alpha / rank
        reset_lora(m)
        m.register_forward_hook(lora_branch)
    return [name for name, _ in layers]


def reset_lora(module):
    nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(module.lora_B.weight)


def reset(model):
    """Draw a new PE method (setting 3: PE tuning from the pretrained body). BitFit's biases are the body's own:
    they start from the pretrained values."""
    if model.adapter is not None:
        model.adapter.reset_parameters()
    for m in model.body.modules():
        if hasattr(m, "lora_A"):
            reset_lora(m)


# ----------------------------------------------------------------------------- which parameters
def is_pe(name, method):
    """Does the tagger parameter `name` belong to the PE method? (BitFit's belong to the body as well.)"""
    if method == "adapter":
        return name.startswith("adapter.")
    if method == "lora":
        return ".lora_A." in name or ".lora_B." in name
    if method == "bitfit":
        return name.startswith("body.") and name.endswith(".bias")
    return False


# ----------------------------------------------------------------------------- peft interoperability
def export_peft(body, config, path, base_model_name_or_path=None):
    """Write the LoRA of `body` as a peft adapter directory (adapter_config.json + adapter_model.safetensors):
    `peft.PeftModel.from_pretrained(AutoModel.from_pretrained(BODY_DIR), path)` then computes what our
    tagger's body computes. Only the configuration class of peft is used, for its file format."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    LoraConfig(r=config["rank"], lora_alpha=config["alpha"], target_modules=list(config["targets"]), lora_dropout=0.0,
               bias="none", base_model_name_or_path=base_model_name_or_path).save_pretrained(path)
    tensors = {f"base_model.model.{n}": t.detach().contiguous().cpu() for n, t in body.state_dict().items() if ".lora_" in n}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))


def save_plain_body(body, tokenizer, path):
    """The body without LoRA branches as a standard Hugging Face model directory (config, weights, tokenizer)."""
    body.save_pretrained(path, state_dict={n: t for n, t in body.state_dict().items() if ".lora_" not in n})
    tokenizer.save_pretrained(path)
