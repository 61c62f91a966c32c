"""What runs write and read back, and which run made what: files written atomically, JSON read back, a checkpoint's
completeness, paths and library versions as recorded, the body's fingerprint, a priming's identity, recipes chosen
under recorded flags. At the bottom of the stack (imports nothing of ours, nor torch): model.py imports it and
re-exports its names, which the scripts import from model.
"""
import contextlib
import hashlib
import json
import os
import sys
import tempfile


class ModelError(Exception):
    """A model, checkpoint or record that cannot be used. The message is one line meant for the user."""


# ----------------------------------------------------------------------------- files
def atomic_write(path, write):
    """Call write(tmp) on a temporary file of a unique name in path's directory, then rename it to path: a reader
    never sees half a file, and two processes writing the same path at once (grid units computing the same cache
    entry) each write their own temporary file; the last rename wins, with a complete file either way."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path, obj):
    """Write JSON atomically (atomic_write)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
    atomic_write(path, write)


def read_json(path):
    """A JSON file we wrote, or None when it is missing or damaged (truncated by a crash, a full disk, a bad copy)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def safetensors_complete(path):
    """Does the safetensors file hold every byte its header promises? (A truncated copy does not.)"""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"], default=0)
        return os.path.getsize(path) == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False


def is_checkpoint(path):
    """Is `path` a checkpoint directory? (Its checkpoint.json, written last, marks it complete.)"""
    return os.path.isfile(os.path.join(str(path), "checkpoint.json"))


# ----------------------------------------------------------------------------- what a run records
REPO = os.path.dirname(os.path.abspath(__file__))


def portable(path):
    """A path as recorded in results: relative to the repo when it lies inside the repo or beside it (e.g.
    ../shared/wikiann), so committed results do not depend on where the repo was cloned; others as given."""
    if not path or not os.path.isabs(str(path)):
        return path
    rel = os.path.relpath(path, REPO)
    return rel if not rel.startswith(os.path.join("..", "..")) else path


def versions():
    """The library versions a run records beside its results."""
    import platform

    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------- which run made what
def body_fingerprint(body, skip=(), whole=False):
    """Short hash of the body's weights (names, shapes, first 4096 values of each tensor, or all with `whole`),
    leaving out the names in `skip` (what a tuned checkpoint stores itself: BitFit's biases, LoRA branches)."""
    h = hashlib.sha1()
    for name, t in sorted(body.state_dict().items()):
        if name not in skip:
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(t.detach().flatten()[:None if whole else 4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def same_model(a, b):
    """Do two --model values name the same encoder? (Equal names, or two paths to one directory: ./m/ and m.)"""
    return a == b or (os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b))


PRIMING_IGNORES = ("out", "resume", "save_every", "device", "recipe")  # prime.py flags that do not change what it computes


def priming_identity(info):
    """What made a primed checkpoint (its checkpoint.json `info`): the variant and prime.py's flags, less those that
    do not change the result. A run tuned from it records this, so that a re-priming with other settings (seed,
    variant, PE method, sizes, model) into the same directory is never mistaken for the one it was tuned from.
    --task ner is left out: primings made before --task existed were NER."""
    priming = {k: v for k, v in (info.get("priming") or {}).items() if k not in PRIMING_IGNORES and (k, v) != ("task", "ner")}
    return json.loads(json.dumps({"variant": info.get("variant"), **priming}, default=str))  # as recorded in JSON


def check_same(where, what, recorded, identity, hint="use another --out, or delete it to redo it"):
    """Refuse (ModelError, one line naming the differing flags, '--flag: old -> new', then `hint`) when `where` holds
    a `what` made with other settings than `identity`."""
    missing = "(not recorded)"
    changed = [f"--{k.replace('_', '-')}: {recorded.get(k, missing)} -> {identity.get(k, missing)}"
               for k in sorted(set(recorded) | set(identity)) if recorded.get(k, missing) != identity.get(k, missing)]
    if changed:
        raise ModelError(f"{where} holds a {what} made with other settings ({'; '.join(changed[:4])}"
                         f"{'; ...' if len(changed) > 4 else ''}); {hint}")


RECIPE_IGNORES = {"prime": ("seed", "inner_lr", "out", "device", "recipe", "resume", "save_every"),
                  "finetune": ("setting", "lang", "seed", "lr", "epochs", "init", "out", "device", "no_test", "recipe",
                               "feature_cache", "save_model", "allow_any_priming", "eval_batch_size", "train_size",
                               "test_size", "cache_whole_split")}
# what a recipe may be used with beyond the grid it was chosen on: other priming seeds, settings, targets, fine-tuning
# seeds, the setting's own lr/epochs/inner lr, and (by design) the data-size curve's smaller training sets; every other
# flag of the script must match


def recipe_flags(config, script="finetune"):
    """The flags (a script's recorded config) that a recipe chosen under them must be used with (RECIPE_IGNORES)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in RECIPE_IGNORES[script]
                                  and (k, v) != ("task", "ner")}, default=str))  # ner: as before --task existed


def read_recipe(path, group, config, script="finetune"):
    """The chosen cell of `group` in a recipes.json written by recipe.py ({"lr", "epochs"[, "inner_lr"], ...}) for a
    run whose recorded flags are `config`. ModelError (one line) when the file, the group or its choice is missing,
    or when the group was chosen under other flags (`script`: its finetune.py or prime.py flags) than the run's."""
    recipes = read_json(path)
    if not isinstance(recipes, dict) or not isinstance(recipes.get("groups"), dict):
        raise ModelError(f"--recipe {path}: no recipes.json there, or it is damaged (recipe.py writes one)")
    found = recipes["groups"].get(group)
    if not isinstance(found, dict) or not isinstance(found.get("chosen"), dict):
        raise ModelError(f"--recipe {path} has no chosen recipe for {group!r} (it has: "
                         f"{', '.join(k for k, g in recipes['groups'].items() if 'chosen' in g) or 'none'}); run its grid first")
    check_same(f"--recipe {path}", f"{group} recipe", found.get("flags", {}).get(script, {}), recipe_flags(config, script),
               "choose it again under these flags (run_table1.sh --recipe auto, recipe.py), or give its flags")
    return found["chosen"]


# ----------------------------------------------------------------------------- fine-tuning runs (finetune.py)
RUN_IGNORES = ("out", "lang", "seed", "init", "device", "feature_cache", "save_model", "allow_any_priming", "eval_batch_size",
               "recipe", "no_test")
# flags that do not change a run's numbers (lang and seed are the run's own; init is identified by its priming; a
# --recipe by the lr and epochs it gave; --no-test by is_done)


def recorded_config(args):
    return {**vars(args), "data_dir": portable(args.data_dir)}


def init_priming(init):
    """The priming identity (model.priming_identity) of a primed checkpoint, or of its failed priming (prime.py's
    diverged.json records it), flattened to "priming.FLAG" keys; None when neither exists."""
    for name in ("checkpoint.json", "diverged.json"):
        info = read_json(os.path.join(init, name))
        if isinstance(info, dict) and (name == "checkpoint.json" or "identity" in info):
            identity = priming_identity(info) if name == "checkpoint.json" else info["identity"]
            return {f"priming.{k}": v for k, v in identity.items()}
    return None


def run_identity(args, config=None):
    """What makes a run's numbers: its flags (from `config`, a recorded one, or args) less RUN_IGNORES, and for
    settings 4-7 the priming of its init (not the path: a directory re-primed with another seed is another init).
    --task ner is left out (runs made before --task existed were NER)."""
    config = config or recorded_config(args)
    identity = {k: v for k, v in config.items() if k not in RUN_IGNORES and not (k == "model" and config["setting"] >= 4)
                and not (k == "task" and v == "ner")}
    if config["setting"] >= 4:
        identity.update(init_priming(config["init"]) or {})
    return json.loads(json.dumps(identity, default=str))  # as it reads back from result.json


def is_done(run, args, identity):
    """Does `run` (OUT/<lang>/seed<N>) hold a finished run of these settings? A result.json or the run's own
    diverged.json made with other settings is refused (ModelError naming the differences): never reused, never
    silently replaced. A damaged one is redone. A diverged.json written because the run's priming diverged is
    stale once that priming exists: it is removed and the run redone."""
    for name in ("result.json", "diverged.json"):
        path = os.path.join(run, name)
        if not os.path.isfile(path):
            continue
        record = read_json(path)
        if not isinstance(record, dict):
            print(f"finetune.py: {path} is damaged; redoing that run", file=sys.stderr)
            os.remove(path)
            return False
        if name == "diverged.json" and record.get("from_priming"):
            if is_checkpoint(args.init):  # the priming succeeded since: the marker no longer holds
                os.remove(path)
                return False
            return True
        check_same(run, "run", record.get("identity") or run_identity(args, {**record.get("config", {}), "init": args.init}),
                   identity)
        if name == "result.json" and args.save_model and not is_checkpoint(run):
            print(f"finetune.py: {run} has no saved model; redoing that run for --save-model", file=sys.stderr)
            return False
        if name == "result.json" and record.get(f"test_{record.get('metric', 'f1')}") is None and not args.no_test:
            print(f"finetune.py: {run} was run with --no-test; redoing it to score the test split", file=sys.stderr)
            return False
        return True
    return False


def mark_diverged(out, args, lang, seed, message, identity, from_priming=False):
    """A diverged run leaves diverged.json instead of result.json; reruns skip it (delete it to retry), except one
    marked `from_priming`, which is redone once its priming exists."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "diverged.json"), {"setting": args.setting, "lang": lang, "seed": seed, "message": message,
                                                   "identity": identity, "from_priming": from_priming})
    print(message, file=sys.stderr)
