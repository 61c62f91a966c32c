"""What the paper preset (`bash run_table1.sh --preset paper`) should cost on a GPU: an ESTIMATE from counted FLOPs
and stated throughputs, not a measurement (no GPU run has timed it). Plain Python; needs `tokenizers` only.

    OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 python tools/gpu_estimate.py [--fertility 1.0] [--full-epochs 4]

Sub-words are counted on ../shared/wikiann with multilingual-e5-small's tokenizer (~/.cache/kwyg) standing in for
mBERT's (not available offline), times --fertility; [CLS]/[SEP] included, max 128. Batches are rebuilt as the scripts
build them (random 32-sentence priming tasks; length-sorted pools for training; sorted 128-sentence eval batches), so
padding is counted, not assumed. Body cost per sentence of padded width W: 2*N*W + 4*layers*W^2*hidden FLOPs forward
(N: non-embedding parameters), forward+backward = 3x. CPU rates come from bench.py part 6 (e5, fp32, 2 cores)."""
import argparse, itertools, math, os, random, statistics
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ["hi", "af", "az", "lt", "et", "nl"]


def body(layers, h, ffn):  # non-embedding parameters of a BERT layer stack (attention, FFN, 2 LayerNorms)
    return layers * (4 * h * h + 4 * h + 2 * h * ffn + ffn + h + 4 * h), layers, h


MBERT, E5 = body(12, 768, 3072), body(12, 384, 1536)  # 85.05M, 21.29M

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "wikiann"))
p.add_argument("--tokenizer", default=os.path.expanduser("~/.cache/kwyg/multilingual-e5-small/tokenizer.json"))
p.add_argument("--fertility", type=float, default=1.0, help="mBERT sub-words per e5 sub-word (a guess: 1.0 +- 0.2)")
p.add_argument("--full-epochs", type=int, default=4, help="setting 1's chosen epochs (assumed)")
p.add_argument("--head-epochs", type=int, default=10, help="setting 2's chosen epochs (assumed; full preset's)")
p.add_argument("--adapter-epochs", type=int, default=40, help="settings 3-7's chosen epochs (assumed; full preset's)")
p.add_argument("--eff-fp32", type=float, default=0.5, help="achieved fraction of the fp32 peak (no TF32)")
p.add_argument("--eff-bf16", type=float, default=0.3, help="achieved fraction of the bf16 dense peak")
a = p.parse_args()
GPUS = {"H100 fp32": 50e12 * a.eff_fp32, "H100 bf16": 990e12 * a.eff_bf16}  # effective FLOP/s
# s per batch or step on a GPU (launch-bound floors); "score": per dev/test sentence decoded and scored on the host
FLOOR = {"f": 0.004, "fb": 0.010, "opt": 0.003, "small": 0.001, "score": 50e-6}
# s on 2 CPU cores: AdamW over ~90M parameters (part 6: 0.84 s for e5's 117.5M); adapter+head step (part 6: 4.8 ms);
# scoring: seqeval measured 25 us per sentence here, as much again assumed for decoding
CPU = {"opt": 0.6, "small": 0.005, "score": 50e-6}

tok = Tokenizer.from_file(a.tokenizer)


def lengths(lang, split, limit=None, fert=a.fertility):
    with open(os.path.join(a.data_dir, lang, f"{split}.tsv"), encoding="utf-8") as f:
        sents = [[l.split("\t")[0] for l in b.splitlines()] for b in f.read().strip().split("\n\n")][:limit]
    return [min(128, 2 + round((len(e.ids) - 2) * fert)) for e in tok.encode_batch(sents, is_pretokenized=True)]


class Cost:
    """One stage: padded sub-words, FLOPs and counts of each kind of work, and its time on each GPU assumption."""
    def __init__(s, model=MBERT):
        s.m, s.tokens, s.flops = model, 0, {"f": 0.0, "fb": 0.0}
        s.n, s.gpu = dict.fromkeys(FLOOR, 0), dict.fromkeys(GPUS, 0.0)

    def batch(s, lens, kind="f"):  # one padded batch of these sentence lengths through the body
        N, L, H = s.m
        w = max(lens)
        fl = len(lens) * (2 * N * w + 4 * L * w * w * H) * (3 if kind == "fb" else 1)
        s.tokens, s.n[kind] = s.tokens + len(lens) * w, s.n[kind] + 1
        s.flops[kind] += fl
        for g, rate in GPUS.items():
            s.gpu[g] += max(fl / rate, FLOOR[kind])

    def steps(s, kind, k):  # "opt": the body's AdamW or SGD update; "small": adapter+head on cached outputs; "score"
        s.n[kind] += k
        for g in GPUS:
            s.gpu[g] += k * FLOOR[kind]

    def add(s, o):
        s.tokens += o.tokens
        for d, e in ((s.flops, o.flops), (s.n, o.n), (s.gpu, o.gpu)):
            for k in d:
                d[k] += e[k]

    def cpu_h(s, R):
        return (s.flops["f"] / R["f"] + s.flops["fb"] / R["fb"] + sum(s.n[k] * CPU[k] for k in CPU)) / 3600


def tasks(src, epochs, seed):  # data.meta_batches: each language shuffled per epoch, cut into support+query chunks
    for e in range(epochs):
        rng, sh = random.Random(seed * 1000 + e), {}
        for lang, ls in src.items():
            o = list(range(len(ls)))
            rng.shuffle(o)
            sh[lang] = [ls[i] for i in o]
        for k in range(min(map(len, sh.values())) // 64):
            t = [(x[k * 64:k * 64 + 32], x[k * 64 + 32:(k + 1) * 64]) for x in sh.values()]
            rng.shuffle(t)
            yield t


def prime(src, mode, S=5, old=False):  # 3 epochs of 312 meta-steps of 2 tasks (32 support + 32 query sentences)
    c = Cost()
    for meta in tasks(src, 3, 1):
        c.steps("opt", 1)  # the outer AdamW step
        if mode == "ft":  # one forward+backward of the 128 sentences together (meta.ft_gradients)
            c.batch([l for sup, q in meta for l in sup + q], "fb")
            continue
        for sup, q in meta:  # adapter: one no-grad support pass (7a3cd54: one per inner step); MAML loop: S fwd+bwd
            for _ in range(S if mode == "maml" or old else 1):
                c.batch(sup, "fb" if mode == "maml" else "f")
            c.steps("opt" if mode == "maml" else "small", S)
            c.batch(q, "fb")
    return c


def train_batches(ls, seed=1):  # data.batch_indices(shuffle=True): pools of 50 batches sorted by length
    o = list(range(len(ls)))
    random.Random(seed).shuffle(o)
    o = [i for k in range(0, len(o), 1600) for i in sorted(o[k:k + 1600], key=ls.__getitem__)]
    return [[ls[i] for i in o[k:k + 32]] for k in range(0, len(o), 32)]


def body_pass(c, ls, times=1):  # no-grad forward in length-sorted 128-sentence batches (finetune.word_features)
    s = sorted(ls)
    for _ in range(times):
        for k in range(0, len(s), 128):
            c.batch(s[k:k + 128])


def full_ft(c, d, epochs, test=True):  # one run: epochs x (train fwd+bwd + AdamW, dev forward + scoring), test once
    tb = train_batches(d["train"])
    for _ in range(epochs):
        for b in tb:
            c.batch(b, "fb")
        c.steps("opt", len(tb))
        body_pass(c, d["validation"])
        c.steps("score", len(d["validation"]))
    if test:
        body_pass(c, d["test"])
        c.steps("score", len(d["test"]))


def small(c, d, epochs, runs, test=True):  # runs on cached body outputs: adapter+head steps, dev scored each epoch
    per_epoch = math.ceil(len(d["train"]) / 32)
    epochs = max(epochs, math.ceil(1000 / per_epoch))  # --min-steps 1000 (no effect at these sizes)
    c.steps("small", runs * epochs * per_epoch)
    c.steps("score", runs * (epochs * len(d["validation"]) + (len(d["test"]) if test else 0)))


def pipeline(src, D, old=False):
    st = {f"priming: {name}": prime(src, mode, S, old) for name, mode, S in
          (("meta (4)", "meta", 5), ("FT (5)", "ft", 5), ("MAML loop (6)", "maml", 5), ("one step (7)", "meta", 1))}
    grid = TARGETS[:3]
    if not old:  # recipe.py on hi af az, seed 1, no test: full 3 lr x {2,4,8}; head, adapter 4 lr x {10,20,40} each
        st["grid: full FT, 9 cells"] = c = Cost()
        for t in grid:
            for E in (2, 4, 8):
                for _ in range(3):
                    full_ft(c, D[t], E, test=False)
        st["grid: head + adapter, 24 cells"] = c = Cost()
        for t in grid:  # the pretrained body once over train and dev (settings 2-3 reuse it: same cache key)
            body_pass(c, D[t]["train"])
            body_pass(c, D[t]["validation"])
            for E in (10, 20, 40):
                small(c, D[t], E, 2 * 4, test=False)
    st["setting 1: full FT, 18 runs"] = c = Cost()
    for t in TARGETS:
        for _ in range(3):
            full_ft(c, D[t], 5 if old else a.full_epochs)
    st["settings 2-3: 36 runs"] = c = Cost()
    st["settings 4-7: 72 runs"] = c4 = Cost()
    for t in TARGETS:
        if old:  # commit 7a3cd54: no caches, 10 epochs per run, each re-running the body over train and dev
            for cc, runs in ((c, 2 * 3), (c4, 4 * 3)):
                body_pass(cc, D[t]["train"], 10 * runs)
                body_pass(cc, D[t]["validation"], 10 * runs)
                body_pass(cc, D[t]["test"], runs)
                small(cc, D[t], 10, runs)
            continue
        for split in D[t]:  # one body pass per split: the pretrained body (2-3), the 4 primed ones (4-7)
            if t not in grid or split == "test":
                body_pass(c, D[t][split])
            body_pass(c4, D[t][split], 4)
        small(c, D[t], a.head_epochs, 3)
        small(c, D[t], a.adapter_epochs, 3)
        small(c4, D[t], a.adapter_epochs, 4 * 3)
    return st


# ---- CPU calibration: bench.py part 6's batches (first 1000 en/es sentences, data.meta_batches(seed=0), meta-batches
# 1-5 after the warm-up one): e5, fp32, 2 threads, medians fwd+bwd of 32 sentences 1575.0 ms, forward of 128 2836.2 ms
metas = list(itertools.islice(tasks({l: lengths(l, "train", 1000, 1.0) for l in ("en", "es")}, 1, 0), 6))


def flops(lens, model, kind):
    c = Cost(model)
    c.batch(lens, kind)
    return c.flops[kind]


R = {"fb": statistics.median(flops(t[0][0], E5, "fb") for t in metas[1:]) / 1.5750,
     "f": statistics.median(flops([l for s, q in t for l in s + q], E5, "f") for t in metas[1:]) / 2.8362}
src = {l: lengths(l, "train") for l in ("en", "es")}
D = {t: {s: lengths(t, s) for s in ("train", "validation", "test")} for t in TARGETS}
mb = statistics.mean(flops(sup, MBERT, "fb") for meta in tasks(src, 1, 1) for sup, q in meta)
with open(os.path.join(a.data_dir, "en", "train.tsv"), encoding="utf-8") as f:
    words = len([line for line in f if line.strip()])
print(f"CPU, 2 cores (bench.py part 6, e5 fp32): fwd+bwd {R['fb'] / 1e9:.0f}, forward {R['f'] / 1e9:.0f} GFLOP/s;"
      f" mBERT fwd+bwd of a 32-sentence priming batch {mb / 1e12:.2f} TFLOP = {mb / R['fb']:.1f} s (quoted: ~6 s)")
print(f"sub-words per word, en train, with [CLS]/[SEP]: {sum(src['en']) / words:.2f} (e5 x fertility {a.fertility:g})")
for old in (True, False):
    st, tot = pipeline(src, D, old), Cost()
    for c in st.values():
        tot.add(c)
    if old:
        print(f"CPU: the pipeline of commit 7a3cd54 (where ~250 core-hours was written): {2 * tot.cpu_h(R):.0f} core-h")
        continue
    print(f"CPU: today's paper preset: {2 * tot.cpu_h(R):.0f} core-h ({tot.cpu_h(R) / 24:.1f} days on 2 cores)\n")
    print("| stage | sub-words (M, padded) | PFLOP | batches fwd / fwd+bwd | adapter+head steps | CPU h (2 cores) | "
          + " | ".join(f"{g} min" for g in GPUS) + " |\n|---|---|---|---|---|---|" + "---|" * len(GPUS))
    for name, c in list(st.items()) + [("**total**", tot)]:
        print(f"| {name} | {c.tokens / 1e6:.1f} | {sum(c.flops.values()) / 1e15:.2f} | {c.n['f']} / {c.n['fb']} | "
              f"{c.n['small']} | {c.cpu_h(R):.1f} | " + " | ".join(f"{c.gpu[g] / 60:.1f}" for g in GPUS) + " |")
    side = {k: tot.n[k] * FLOOR[k] / 60 for k in ("opt", "small", "score")}
    print(f"\nof the GPU total, min: body AdamW/SGD updates {side['opt']:.1f}, adapter+head steps {side['small']:.1f}, "
          f"host scoring {side['score']:.1f}; body batches the rest ("
          + ", ".join(f"{g} {tot.gpu[g] / 60 - sum(side.values()):.1f}" for g in GPUS) + ")")
    ext = Cost()  # at most: full FT round 1 (lr step at 8 epochs, 16 epochs) + round 2 (32); head, adapter 40+80, 160
    for t in TARGETS[:3]:
        full_ft(ext, D[t], 8 + 16 + 32, test=False)
        small(ext, D[t], 40 + 80 + 160, 2, test=False)
    print("extension rounds (not in the total), at most: "
          + ", ".join(f"{g} +{ext.gpu[g] / 60:.0f} min" for g in GPUS)
          + f", CPU +{ext.cpu_h(R):.1f} h (full FT: round 1 <= 8 + 16 epochs, round 2 <= 32; first grid 42)")
