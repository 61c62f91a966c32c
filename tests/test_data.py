"""Reading, sub-word label alignment, batching, priming tasks, synthetic data."""
import os
import subprocess
import sys

import pytest

import data
from data import LABEL2ID


def write(path, text, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(text)
    return path


def test_read_conll_formats(tmp_path):
    # CRLF, trailing spaces, several blank lines, space-separated line, no final newline, lang: prefix
    text = "en:Paris\tB-LOC\r\nis\tO  \r\n\r\n\r\nJohn Smith\tB-PER\nSmith I-PER"
    p = write(str(tmp_path / "en" / "train.tsv"), text)
    # a line with a tab splits on the tab only (a token may hold a space); other lines on whitespace
    assert data.read_conll(p, "en") == [(["Paris", "is"], ["B-LOC", "O"]), (["John Smith", "Smith"], ["B-PER", "I-PER"])]
    assert data.read_conll(p)[0][0][0] == "en:Paris"  # no language given: token kept as is


@pytest.mark.parametrize("text, message", [
    ("Paris\tB-LOC\tx\n", "expected 2 columns"),
    ("Paris\n", "expected 2 columns"),
    ("Paris\tB-MISC\n", "unknown tag 'B-MISC'"),
    ("", "empty file"),
])
def test_read_conll_errors_name_file_and_line(tmp_path, text, message):
    p = write(str(tmp_path / "f.tsv"), "ok\tO\n\n" + text if text else text)
    with pytest.raises(data.DataError, match=message) as e:
        data.read_conll(p)
    assert str(e.value).startswith(p)
    if text:
        assert f"{p}:3:" in str(e.value)


def test_load_split_local_and_missing(tmp_path):
    write(str(tmp_path / "hi" / "test.tsv"), "a\tO\n")
    assert data.load_split("hi", "test", str(tmp_path)) == [(["a"], ["O"])]
    with pytest.raises(data.DataError, match="found: hi"):
        data.load_split("nl", "test", str(tmp_path))
    with pytest.raises(data.DataError, match="found: test.tsv"):
        data.load_split("hi", "train", str(tmp_path))


def test_label_alignment_first_subword(tiny):
    _, tokenizer = tiny
    sentences = [(["kavo", "ri", "dumeta"], ["B-PER", "O", "B-LOC"])]
    ex = data.encode(sentences, tokenizer, max_len=32)[0]
    pieces = tokenizer.convert_ids_to_tokens(ex["input_ids"])
    assert pieces == ["[CLS]", "ka", "##vo", "ri", "du", "##me", "##ta", "[SEP]"]
    assert ex["labels"] == [-100, LABEL2ID["B-PER"], -100, LABEL2ID["O"], LABEL2ID["B-LOC"], -100, -100, -100]
    assert ex["first"] == [(1, 0), (3, 1), (4, 2)]


def test_truncated_words_are_kept_for_scoring(tiny):
    _, tokenizer = tiny
    sentences = [(["ka"] * 10 + ["kavo"], ["O"] * 10 + ["B-PER"])]
    ex = data.encode(sentences, tokenizer, max_len=8)[0]  # [CLS] + 6 words + [SEP]
    assert len(ex["input_ids"]) == 8 and len(ex["first"]) == 6
    assert ex["tokens"][-1] == "kavo" and ex["tags"][-1] == "B-PER"
    assert data.unscored_words([ex]) == 5


def test_synthetic_words_tokenize_without_unk(tiny):
    _, tokenizer = tiny
    examples = data.encode(data.load_split("hi", "train", synthetic=True, limit=50), tokenizer, 64)
    assert all(tokenizer.unk_token_id not in ex["input_ids"] for ex in examples)


def test_synthetic_is_deterministic_and_languages_differ():
    a, b = data.synthetic_split("hi", "train"), data.synthetic_split("hi", "train")
    assert a == b and len(a) == data.SYNTHETIC_SIZES["train"]
    other = data.synthetic_split("nl", "train")
    vocab = lambda s: {t for tokens, _ in s for t in tokens}
    shared = vocab(a) & vocab(other)
    assert 0 < len(shared) < len(vocab(a)) / 2  # a few shared names, mostly its own words
    assert all(t in data.LABELS for _, tags in a for t in tags)
    assert data.synthetic_split("hi", "test") != a[: len(data.synthetic_split("hi", "test"))]


def test_batches_cover_every_example_once(tiny):
    _, tokenizer = tiny
    examples = data.encode(data.load_split("af", "train", synthetic=True, limit=103), tokenizer, 64)
    for shuffle in (False, True):
        seen = [i for idx, batch in data.batches(examples, 10, 0, shuffle=shuffle, seed=3) for i in idx]
        assert sorted(seen) == list(range(103))
    first = [idx for idx, _ in data.batches(examples, 10, 0, shuffle=True, seed=3)]
    assert first == [idx for idx, _ in data.batches(examples, 10, 0, shuffle=True, seed=3)]
    idx, batch = next(data.batches(examples, 10, tokenizer.pad_token_id))
    for row, i in enumerate(idx):  # padding: labels -100 and mask 0 beyond each sentence
        n = len(examples[i]["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == examples[i]["input_ids"]
        assert batch["attention_mask"][row].sum() == n and (batch["labels"][row, n:] == -100).all()


def test_meta_batches_one_task_per_language_disjoint():
    by_lang = {lang: [{"id": (lang, i)} for i in range(n)] for lang, n in [("en", 50), ("es", 35)]}
    steps = list(data.meta_batches(by_lang, 4, 6, seed=0))
    assert len(steps) == data.steps_per_epoch(by_lang, 4, 6) == 3
    used = []
    for tasks in steps:
        assert sorted(t[0][0]["id"][0] for t in tasks) == ["en", "es"]  # one task per language
        for support, query in tasks:
            assert len(support) == 4 and len(query) == 6
            assert len({ex["id"][0] for ex in support + query}) == 1  # one language per task
            used += [ex["id"] for ex in support + query]
    assert len(used) == len(set(used))  # support and query disjoint, no sentence twice in an epoch
    assert [t[0][0] for t in steps[0]] == [t[0][0] for t in next(data.meta_batches(by_lang, 4, 6, seed=0))]


def test_task_order_is_drawn_per_meta_batch_from_the_seed():
    """Regression: the head reset takes the first task's head, and the first task was always the first
    --sources language. Now the order is drawn per meta-batch (same seed, same order; the tasks themselves
    are the ones the fixed order had)."""
    by_lang = {lang: [{"id": (lang, i)} for i in range(400)] for lang in ("en", "es", "de")}
    firsts = [tasks[0][0][0]["id"][0] for tasks in data.meta_batches(by_lang, 4, 6, seed=1)]
    assert len(firsts) == 40 and set(firsts) == {"en", "es", "de"} and min(map(firsts.count, "en es de".split())) >= 6
    assert firsts == [tasks[0][0][0]["id"][0] for tasks in data.meta_batches(by_lang, 4, 6, seed=1)]
    assert firsts != [tasks[0][0][0]["id"][0] for tasks in data.meta_batches(by_lang, 4, 6, seed=2)]
    by_task = lambda seed: [sorted((s[0]["id"], q[-1]["id"]) for s, q in tasks) for tasks in data.meta_batches(by_lang, 4, 6, seed)]
    assert by_task(1) == by_task(1) and by_task(1) != by_task(2)


def test_cli_reports_tokenizer_coverage(tmp_path, tiny_dir):
    # tiny vocabulary: letters and letter pairs, ASCII only. ab -> ab; abcd -> ab ##cd; abc -> ab ##c; ж -> [UNK]
    for split in ("train", "validation", "test"):
        (tmp_path / "xx").mkdir(exist_ok=True)
        (tmp_path / "xx" / f"{split}.tsv").write_text("ab\tB-PER\nabcd\tI-PER\n\nж\tO\nabc\tB-LOC\n")
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(data.__file__), "data.py"), "--data-dir", str(tmp_path), "--langs", "xx",
                          "--tokenizer", tiny_dir], capture_output=True, text=True, check=True).stdout
    assert "xx train=2 validation=2 test=2  test words with [UNK]: 25.0%  sub-words per word: 1.50" in out
