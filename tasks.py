"""Tagging tasks, declared once: a task is its tag set, where its data comes from, and its metric.

    ner   WikiAnn NER (the paper's task): 7 IOB2 tags; hub unimelb-nlp/wikiann or local files; entity micro F1 (seqeval)
    pos   Universal Dependencies part-of-speech (XTREME's udpos): 17 UPOS tags; local files; token accuracy
    FILE  your own tagging data: FILE lists its tags, one per line (beside the data, e.g. DIR/tags.txt); entity F1
          when every tag is O or B-X/I-X (IOB2), token accuracy otherwise

Every word counts in either metric, scored on one sub-word per word (data.py's --word-position). The scripts take
`--task NAME|FILE` (default ner) and record the task in checkpoints and result.json; a priming for one task is
refused for another (its head has other tags).
"""
import os
from typing import NamedTuple


class Task(NamedTuple):
    name: str      # ner, pos, or the tag file's path
    labels: list   # tag strings; the head's output i is labels[i]
    metric: str    # "f1" (entity micro F1, with precision and recall) or "accuracy" (token accuracy)
    hub: str       # the Hugging Face dataset of `load_split` without --data-dir, or "" (local files only)
    local: str     # the folder name of its files beside the repo (../shared/<local>), or ""


NER_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]  # hub wikiann label ids 0..6
UPOS_TAGS = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
             "SCONJ", "SYM", "VERB", "X"]
TASKS = {"ner": Task("ner", NER_TAGS, "f1", "unimelb-nlp/wikiann", "wikiann"),
         "pos": Task("pos", UPOS_TAGS, "accuracy", "", "udpos")}
METRIC_NAMES = {"f1": "entity F1", "accuracy": "token accuracy"}


class TaskError(ValueError):
    """An unknown task or a bad tag file (one line for the user)."""


def is_iob2(tags):
    return all(t == "O" or (t[:2] in ("B-", "I-") and len(t) > 2) for t in tags) and "O" in tags


def get(name):
    """The task `name` (a key of TASKS) or of a tag file: one tag per line, blank lines and #-comments skipped."""
    if name in TASKS:
        return TASKS[name]
    if not os.path.isfile(name):
        raise TaskError(f"--task {name}: neither {' nor '.join(TASKS)} nor a tag file (one tag per line)")
    with open(name, encoding="utf-8") as f:
        tags = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if len(tags) < 2 or len(set(tags)) != len(tags) or any(len(t.split()) != 1 for t in tags):
        raise TaskError(f"--task {name}: a tag file lists 2 or more distinct tags, one per line, without spaces")
    return Task(os.path.abspath(name), tags, "f1" if is_iob2(tags) else "accuracy", "", "")


def unscored_tag(labels):
    """The prediction for a word with no sub-word position (beyond --max-len, or dropped by the tokenizer): O where the
    tags have it (no entity), else "-" (no tag: an error in token accuracy)."""
    return "O" if "O" in labels else "-"


def scores(task, gold, pred):
    """The task's metric in % for gold and predicted tag lists per sentence: {"f1", "precision", "recall"}
    (entity micro F1) or {"accuracy"} (every word)."""
    assert len(gold) == len(pred) and all(len(g) == len(p) for g, p in zip(gold, pred)), "length mismatch"
    if task.metric == "f1":
        return entity_scores(gold, pred)
    words = [(g, p) for gs, ps in zip(gold, pred) for g, p in zip(gs, ps)]
    return {"accuracy": 100 * sum(g == p for g, p in words) / max(len(words), 1)}


def entity_scores(gold, pred):
    """Micro precision/recall/F1 (in %) over entities; gold and pred are lists of IOB2 tag lists."""
    from seqeval.metrics.sequence_labeling import precision_recall_fscore_support  # ~1.5 s of imports (scikit-learn)
    assert len(gold) == len(pred) and all(len(g) == len(p) for g, p in zip(gold, pred)), "length mismatch"
    # one pass over the entities (seqeval's precision_score, recall_score and f1_score each make the same pass; one
    # call halved the scoring time of 2000 sentences here); no entity predicted or in gold: 0, silently
    p, r, f, _ = precision_recall_fscore_support(gold, pred, average="micro", zero_division=0)
    return {"precision": 100 * p, "recall": 100 * r, "f1": 100 * f}

