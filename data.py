"""Tagging data (WikiAnn NER by default; tasks.py: UD part-of-speech, your own tags): reading (hub or local
CoNLL/TSV files), sub-word label alignment, length-bucketed batches, priming tasks, and a synthetic generator for
tests and the smoke preset.

    python data.py --data-dir ../shared/wikiann --langs en es hi   # check local files, print sizes
    python data.py --task pos --data-dir ../shared/udpos --langs en fi af
    python data.py --synthetic --langs hi --show 2                 # peek at synthetic sentences

Sources: `load_split(lang, split)` reads the hub's `unimelb-nlp/wikiann` (parquet; needs network),
`load_split(lang, split, data_dir=D)` reads D/<lang>/<split>.tsv (one `TOKEN<TAB>TAG` per line, blank
line between sentences; a space-separated .conll file works too), `synthetic=True` generates data. A tag the
task does not know is refused in one line naming the file, line and tag.
"""
import argparse
import os
import random
import socket
import sys
import zlib

import torch

import tasks
from tasks import TaskError

LABELS = tasks.NER_TAGS  # the paper's task (tasks.TASKS["ner"]); other tasks pass their own tags
NER = tasks.TASKS["ner"]
SPLITS = ("train", "validation", "test")


class DataError(Exception):
    """Bad or missing input. The message is one line meant for the user; scripts exit 2 on it."""


# ----------------------------------------------------------------------------- reading
def read_conll(path, lang=None, labels=LABELS):
    """Sentences of a CoNLL-style file as [(tokens, tags)]: `TOKEN<TAB>TAG` (or space-separated)
    per line, sentences separated by blank lines; every tag one of `labels` (the task's). A `<lang>:` prefix on
    tokens (raw PAN-X files, e.g. `en:Paris`) is stripped when `lang` is given. An I- tag after O is accepted as is:
    IOB2 data has such tags and seqeval scores them as entity starts."""
    known = set(labels)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is fine
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); convert it, e.g. iconv -t utf-8")
    sentences, tokens, tags = [], [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        if not line:
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) != 2:
            raise DataError(f"{path}:{lineno}: expected 2 columns (TOKEN<TAB>TAG), found {len(cols)}: {line[:60]!r}")
        token, tag = cols[0].strip(), cols[1].strip()
        if lang and token.startswith(lang + ":") and len(token) > len(lang) + 1:
            token = token[len(lang) + 1:]
        if not token:
            raise DataError(f"{path}:{lineno}: empty token")
        if tag not in known:
            raise DataError(f"{path}:{lineno}: unknown tag {tag!r}; allowed: {' '.join(labels)} (data of another task? --task)")
        tokens.append(token)
        tags.append(tag)
    if tokens:
        sentences.append((tokens, tags))
    if not sentences:
        raise DataError(f"{path}: no sentences (empty file)")
    return sentences


def hub_reachable(timeout=3.0):
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_split(lang, split, data_dir=None, synthetic=False, limit=None, task=NER):
    """The first `limit` sentences (all if None) of one split of the task's data as [(tokens, tags)]."""
    if synthetic:
        sentences = synthetic_split(lang, split, task)
    elif data_dir:
        lang_dir = os.path.join(data_dir, lang)
        if not os.path.isdir(lang_dir):
            found = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d))) if os.path.isdir(data_dir) else None
            raise DataError(f"{lang_dir}: no such language directory" + (f"; found: {' '.join(found) or 'none'}" if found is not None else f" ({data_dir} does not exist)"))
        candidates = [os.path.join(lang_dir, split + ext) for ext in (".tsv", ".conll", ".txt")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise DataError(f"{lang_dir}: no {split}.tsv/.conll/.txt; found: {' '.join(sorted(os.listdir(lang_dir))) or 'nothing'}")
        sentences = read_conll(path, lang, task.labels)
    elif not task.hub:
        raise DataError(f"--task {task.name} has no hub dataset: give its files with --data-dir DIR "
                        f"(DIR/<lang>/{{train,validation,test}}.tsv{', e.g. ../shared/' + task.local if task.local else ''})")
    else:
        if not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable():
            raise DataError(f"the Hugging Face hub is unreachable (offline?), so {task.hub}/{lang} cannot be downloaded; "
                            "use local files: --data-dir DIR with DIR/<lang>/{train,validation,test}.tsv (e.g. ../shared/wikiann), "
                            "or --preset mini / --synthetic")
        import datasets  # imported lazily: slow, and unused with local files

        try:
            ds = datasets.load_dataset(task.hub, lang, split=split)
        except Exception as e:  # unknown language, split, or a hub error: one line for the user
            raise DataError(f"cannot load {task.hub} {lang}/{split}: {str(e).strip().splitlines()[0]}") from None
        names = ds.features["ner_tags"].feature.names
        assert names == task.labels, f"hub label set {names} differs from {task.labels}"
        sentences = [(list(t), [task.labels[i] for i in g]) for t, g in zip(ds["tokens"], ds["ner_tags"])]
    return sentences[:limit] if limit else sentences


# ----------------------------------------------------------------------------- tokenization
WORD_POSITIONS = ("mean", "first-content", "first")


def bare_marker_ids(tokenizer, ids):
    """The ids among `ids` whose piece is a bare word-boundary marker: it decodes to whitespace only (e.g. the
    "▁" of SentencePiece vocabularies) and is no special token. Read from the tokenizer, not hard-coded;
    WordPiece vocabularies have none."""
    ids = sorted(set(ids) - set(tokenizer.all_special_ids))
    return {i for i, text in zip(ids, tokenizer.batch_decode([[i] for i in ids])) if not text.strip()}


def encode(sentences, tokenizer, max_len, word_position="mean", labels=LABELS):
    """Tokenize word lists; ONE sub-word of each word carries its label (its scored position), all else -100.
    word_position "first": the word's first sub-word. "first-content": its first sub-word that is not
    a bare word-boundary marker; a SentencePiece tokenizer splits a word given alone into "▁" + its
    characters when no piece starts with them, and the bare "▁" knows nothing of the word. A word that is
    only a marker (inside max_len) keeps it. With WordPiece both rules give the same positions. "mean" (default): the word is
    scored on the mean of ALL its sub-words' body outputs, held at its first-content position (ex["pieces"]: each
    scored word's positions, in the order of ex["first"]; collate turns them into a pooling matrix).
    Words with no sub-word inside `max_len` (long sentences, or words the tokenizer drops) are
    kept in `words`/`tags`: prediction fills them with O (NER) or no tag (other tasks: an error) so they still count.
    `labels`: the task's tags; a tag's id is its index."""
    label2id = {tag: i for i, tag in enumerate(labels)}
    if word_position not in WORD_POSITIONS:
        raise ValueError(f"word_position is one of {WORD_POSITIONS}, not {word_position!r}")
    enc = tokenizer([tokens for tokens, _ in sentences], is_split_into_words=True,
                    truncation=True, max_length=max_len)
    bare = bare_marker_ids(tokenizer, {i for ids in enc["input_ids"] for i in ids}) if word_position != "first" else set()
    examples = []
    for i, (tokens, tags) in enumerate(sentences):
        ids, pieces = enc["input_ids"][i], {}  # word -> its sub-word positions
        for pos, w in enumerate(enc.word_ids(i)):
            if w is not None:
                pieces.setdefault(w, []).append(pos)
        labels, first = [-100] * len(ids), []
        for w, positions in pieces.items():
            pos = next((p for p in positions if ids[p] not in bare), positions[0])
            labels[pos] = label2id[tags[w]]
            first.append((pos, w))
        examples.append({"input_ids": ids, "labels": labels, "first": first, "tokens": tokens, "tags": tags})
        if word_position == "mean":
            examples[-1]["pieces"] = [pieces[w] for _, w in first]
    return examples


def position_report(sentences, tokenizer, max_len, labels=LABELS):
    """The share (in %) of words, and of entity words (tag not O), whose scored position under "first-content"
    differs from their first sub-word (their first piece is a bare marker): what issue N's rule changes."""
    old, new = (encode(sentences, tokenizer, max_len, rule, labels) for rule in ("first", "first-content"))
    moved = [(a_pos != b_pos, ex["tags"][w] != "O") for a, b, ex in zip(old, new, old)
             for (a_pos, w), (b_pos, _) in zip(a["first"], b["first"])]
    share = lambda xs: 100 * sum(xs) / max(len(xs), 1)
    return {"words": share([m for m, _ in moved]), "entity_words": share([m for m, entity in moved if entity])}


def unscored_words(examples):
    """Words that got no sub-word position (beyond max_len or tokenized to nothing)."""
    return sum(len(ex["tokens"]) - len(ex["first"]) for ex in examples)


def collate(examples, pad_id, device=None):
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    if "pieces" in examples[0]:  # --word-position mean: row p of pool averages the sub-words of the word scored at p
        pool = torch.eye(width).repeat(len(examples), 1, 1)
        for i, ex in enumerate(examples):
            for (pos, _), positions in zip(ex["first"], ex["pieces"]):
                pool[i, pos] = 0.0
                pool[i, pos, positions] = 1.0 / len(positions)
        batch["pool"] = pool.to(device)
    return batch


def batch_indices(examples, batch_size, shuffle=False, seed=0):
    """Index lists of batches of similar lengths (less padding). shuffle=False: sorted by length,
    for evaluation. shuffle=True: random pools of 50 batches are sorted by length, cut into batches,
    and the batches are shuffled."""
    order = list(range(len(examples)))
    length = lambda i: len(examples[i]["input_ids"])
    if not shuffle:
        order.sort(key=length)
        return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    pool = 50 * batch_size
    order = [i for k in range(0, len(order), pool) for i in sorted(order[k:k + pool], key=length)]
    chunks = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    return chunks


def batches(examples, batch_size, pad_id, shuffle=False, seed=0, device=None):
    """Yield (indices, padded batch) over `batch_indices`."""
    for idx in batch_indices(examples, batch_size, shuffle, seed):
        yield idx, collate([examples[i] for i in idx], pad_id, device)


# ----------------------------------------------------------------------------- priming tasks
def meta_batches(examples_by_lang, support_size, query_size, seed):
    """One epoch of priming meta-batches. A task is a (support, query) pair of disjoint example lists
    drawn from ONE source language; a meta-batch holds one task per source language, in an order drawn
    per meta-batch from `seed` (the paper's head reset takes the FIRST task of the sampled batch, so no
    language may always come first). Each language is shuffled once per epoch and cut into consecutive
    support+query chunks; the epoch ends when the smallest language runs out. (The paper does not say
    how tasks are built; this is our choice.)"""
    rng = random.Random(seed)
    shuffled = {}
    for lang, examples in examples_by_lang.items():
        order = list(range(len(examples)))
        rng.shuffle(order)
        shuffled[lang] = [examples[i] for i in order]
    size = support_size + query_size
    steps = min(len(ex) for ex in shuffled.values()) // size
    for k in range(steps):
        tasks = [(ex[k * size: k * size + support_size], ex[k * size + support_size: (k + 1) * size])
                 for ex in shuffled.values()]
        rng.shuffle(tasks)
        yield tasks


def steps_per_epoch(examples_by_lang, support_size, query_size):
    return min(len(ex) for ex in examples_by_lang.values()) // (support_size + query_size)


# ----------------------------------------------------------------------------- synthetic data
SYNTHETIC_SIZES = {"train": 1000, "validation": 200, "test": 200}
_COMMON, _NAME, _VOWELS = "bdfgkh", "lmnprstvz", "aeiou"  # consonants of common words / of names


def _word(rng, consonants, syllables):
    return "".join(rng.choice(consonants) + rng.choice(_VOWELS) for _ in range(rng.randint(*syllables)))


def synthetic_split(lang, split, task=NER):
    """A deterministic fake language `lang`: lowercase words of consonant-vowel syllables (names use
    other consonants than common words, a stand-in for capitalisation), a lexicon of its own (some
    names shared by every language, as real names are), and context cues: a title word before persons
    (B-PER [I-PER]), a preposition before locations (B-LOC [I-LOC]), a suffix word closing
    organisations (B-ORG I-ORG). For --task pos the same sentences get part-of-speech tags: names PROPN, the
    preposition ADP, title and suffix NOUN, a common word NOUN, VERB or ADJ by its first letter (the lexicon's
    own). Other tasks have no synthetic data."""
    if task.name not in ("ner", "pos"):
        raise DataError(f"--synthetic generates NER and POS data, not --task {task.name}: give --data-dir")
    pos_of = lambda word: {"b": "VERB", "d": "VERB", "f": "ADJ"}.get(word[0], "NOUN")
    lex = random.Random(f"lexicon:{zlib.crc32(lang.encode())}")
    shared = random.Random("lexicon:shared")
    words = [_word(lex, _COMMON, (1, 2)) for _ in range(60)]
    names = [_word(shared, _NAME, (2, 3)) for _ in range(20)] + [_word(lex, _NAME, (2, 3)) for _ in range(40)]
    title, prep, suffix = (_word(lex, _COMMON, (n, n)) for n in (2, 1, 2))
    rng = random.Random(f"{lang}/{split}")
    sentences = []
    for _ in range(SYNTHETIC_SIZES[split]):
        tokens, tags = [], []
        for _ in range(rng.randint(1, 3)):
            for _ in range(rng.randint(1, 4)):
                tokens.append(rng.choice(words))
                tags.append("O")
            kind = rng.choice(["PER", "LOC", "ORG"])
            entity = [rng.choice(names) for _ in range(rng.randint(1, 2))]
            if kind == "PER":
                tokens.append(title)
                tags.append("O")
            elif kind == "LOC":
                tokens.append(prep)
                tags.append("O")
            else:
                entity.append(suffix)
            tokens += entity
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        if task.name == "pos":
            tags = ["ADP" if t == prep else "NOUN" if t in (title, suffix) else "PROPN" if tag != "O" else pos_of(t)
                    for t, tag in zip(tokens, tags)]
        sentences.append((tokens, tags))
    return sentences


def positive_int(text):
    """argparse type of a count (sentences, epochs, batch size, sub-words): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def task_name(text):
    """argparse type of --task: a known task or a tag file (tasks.get checks it), kept as given."""
    try:
        tasks.get(text)
    except TaskError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--task {text}: ")) from None
    return text


def add_data_args(parser):
    g = parser.add_argument_group("data source (default: the Hugging Face hub)")
    source = g.add_mutually_exclusive_group()  # one data source: --synthetic with --data-dir is refused
    source.add_argument("--data-dir", default=os.environ.get("WIKIANN_DIR"),
                        help="local WikiAnn: DIR/<lang>/{train,validation,test}.tsv (env WIKIANN_DIR)")
    source.add_argument("--synthetic", action="store_true", help="deterministic synthetic NER or POS data (smoke tests)")
    g.add_argument("--task", type=task_name, default="ner",
                   help="ner (WikiAnn, entity F1), pos (UD part-of-speech, token accuracy), or a file listing your "
                        "tags, one per line (entity F1 if they are IOB2, else accuracy); tasks.py")
    g.add_argument("--word-position", choices=WORD_POSITIONS, default="mean",
                   help="how a word is scored: on the mean of all its sub-words' body outputs (mean: the default since "
                        "issue P, the best dev F1 of the three on the mini preset), on its first sub-word that is not a bare "
                        "word-boundary marker (first-content; SentencePiece's lone \u2581), or on its first sub-word (first; "
                        "first and first-content are identical for WordPiece vocabularies such as mBERT's)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--langs", nargs="+", default=["en", "es", "hi", "af", "az", "lt", "et", "nl"])
    p.add_argument("--show", type=int, default=0, help="print the first N training sentences")
    p.add_argument("--tokenizer", help="a tokenizer name or path: also report, on each test split, the share of "
                                       "words with an [UNK] sub-word and the sub-words per word")
    args = p.parse_args()
    try:
        if args.tokenizer:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        for lang in args.langs:
            counts = {s: load_split(lang, s, args.data_dir, args.synthetic, task=tasks.get(args.task)) for s in SPLITS}
            coverage = ""
            if args.tokenizer:
                words = [w for tokens, _ in counts["test"] for w in tokens]
                pieces = tokenizer(words, add_special_tokens=False)["input_ids"]
                unk = sum(tokenizer.unk_token_id in ids for ids in pieces)
                coverage = (f"  test words with [UNK]: {100 * unk / len(words):.1f}%"
                            f"  sub-words per word: {sum(map(len, pieces)) / len(words):.2f}")
                moved = position_report(counts["test"], tokenizer, 128, tasks.get(args.task).labels)
                coverage += (f"  scored on a later sub-word than the first (--word-position first-content): "
                             f"{moved['words']:.1f}% of words, {moved['entity_words']:.1f}% of entity words")
            print(lang, " ".join(f"{s}={len(v)}" for s, v in counts.items()) + coverage)
            for tokens, tags in counts["train"][:args.show]:
                print("  " + " ".join(f"{t}/{g}" for t, g in zip(tokens, tags)))
    except DataError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        sys.exit(2)
