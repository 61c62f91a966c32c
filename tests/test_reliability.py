"""Bad input gives one clear line and exit code 2; long sentences keep every gold word; priming
resumes exactly; same seed, same result; NaN losses are caught and recorded."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import data
import finetune
import model
import prime
from conftest import ROOT
from evaluate import entity_scores


def write(path, text, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(text)
    return str(path)


GOOD = "bo\tO\nkavo\tB-PER\n"


@pytest.mark.parametrize("content, message", [
    ("bo\tO\nkavo\n", ":2: expected 2 columns (TOKEN<TAB>TAG), found 1"),
    ("bo\tO\tx\n", ":1: expected 2 columns (TOKEN<TAB>TAG), found 3"),
    ("bo\tO\n\tB-PER\n", ":2: empty token"),
    ("bo\tO\nkavo\tB-MISC\n", ":2: unknown tag 'B-MISC'; allowed: O B-PER I-PER B-ORG I-ORG B-LOC I-LOC"),
    ("", ": no sentences (empty file)"),
    ("\n\n", ": no sentences (empty file)"),
    (b"bo\tO\n\nk\xe9vo\tB-PER\n", ":3: not UTF-8 (byte 0xe9 at offset 7)"),
])
def test_bad_files_name_file_line_and_expectation(tmp_path, content, message):
    path = write(tmp_path / "hi" / "train.tsv", content, "wb" if isinstance(content, bytes) else "w")
    with pytest.raises(data.DataError) as e:
        data.load_split("hi", "train", str(tmp_path))
    assert str(e.value).startswith(path + message)


def test_accepted_variants(tmp_path):
    """CRLF, trailing whitespace, several blank lines, no final newline, a BOM, `hi:` prefixes, and an
    I- tag after O (kept: IOB2 data has these, seqeval scores them as entity starts)."""
    text = "\ufeffhi:bo\tO  \r\nhi:kavo\tI-PER\r\n\r\n\r\n\r\nri  B-LOC\t\nhi:\tO"
    write(tmp_path / "hi" / "test.tsv", text)
    assert data.load_split("hi", "test", str(tmp_path)) == [(["bo", "kavo"], ["O", "I-PER"]), (["ri", "hi:"], ["B-LOC", "O"])]


def test_missing_paths_list_what_was_found(tmp_path):
    write(tmp_path / "hi" / "train.tsv", GOOD)
    write(tmp_path / "af" / "validation.tsv", GOOD)
    with pytest.raises(data.DataError, match=r"/nl: no such language directory; found: af hi$"):
        data.load_split("nl", "train", str(tmp_path))
    with pytest.raises(data.DataError, match=r"/af: no test.tsv/.conll/.txt; found: validation.tsv$"):
        data.load_split("af", "test", str(tmp_path))
    with pytest.raises(data.DataError, match=r"/nope/hi: no such language directory \(.*/nope does not exist\)"):
        data.load_split("hi", "train", str(tmp_path / "nope"))


def test_offline_hub_says_so_and_shows_the_alternatives(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    monkeypatch.setattr(model, "hub_reachable", lambda: False)
    with pytest.raises(data.DataError, match="hub is unreachable.*--data-dir DIR.*--preset mini"):
        data.load_split("hi", "train")
    with pytest.raises(model.ModelError, match="hub is unreachable.*--model /path/to/model_dir.*--preset mini"):
        model.load_pretrained("bert-base-multilingual-cased")


def run_script(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_scripts_exit_2_with_one_line_and_no_traceback(tiny_dir, tmp_path):
    bad = write(tmp_path / "data" / "hi" / "train.tsv", "bo\tO\nkavo\tB-MISC\n")
    write(tmp_path / "data" / "hi" / "validation.tsv", GOOD)
    write(tmp_path / "data" / "hi" / "test.tsv", GOOD)
    primed = str(tmp_path / "primed")
    tagger, tokenizer, _ = model.load_tagger(tiny_dir, data.LABELS)
    model.save_checkpoint(primed, tagger, tokenizer, ("body", "adapter", "head"), "some-other-bert", data.LABELS)
    cases = [
        (["finetune.py", "--setting", "3", "--model", tiny_dir, "--lang", "hi", "--data-dir", str(tmp_path / "data"),
          "--out", str(tmp_path / "o1")], f"finetune.py: error: {bad}:2: unknown tag 'B-MISC'; allowed: O B-PER"),
        (["prime.py", "--model", tiny_dir, "--sources", "xx", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o2")],
         "prime.py: error: " + str(tmp_path / "data" / "xx") + ": no such language directory; found: hi"),
        (["finetune.py", "--setting", "4", "--init", primed, "--model", tiny_dir, "--lang", "hi", "--synthetic",
          "--out", str(tmp_path / "o3")], f"finetune.py: error: --init {primed} was primed from 'some-other-bert', not from --model '{tiny_dir}'"),
        (["data.py", "--data-dir", str(tmp_path / "data"), "--langs", "hi"], f"data.py: error: {bad}:2: unknown tag"),
    ]
    for argv, expected in cases:
        r = run_script(*argv)
        assert r.returncode == 2, (argv, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(expected), r.stderr[-1000:]


class FirstPieceTagger(nn.Module):
    """Stub model: tags a word B-PER when its first sub-word is `name_id`, else O."""

    def __init__(self, name_id):
        super().__init__()
        self.name_id, self.dummy = name_id, nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, features=None):
        logits = torch.zeros(*input_ids.shape, len(data.LABELS))
        logits[..., data.LABELS.index("B-PER")] = 10.0 * (input_ids == self.name_id)
        return logits


def test_600_word_sentence_keeps_its_final_entity_in_the_f1(tiny):
    """A name inside max_len is found; the same name as word 600 lies beyond max_len, is predicted O
    and counts as a miss: recall 1/2. Dropping the long sentence's tail would give recall 2/2."""
    _, tokenizer = tiny
    long = (["bo"] * 599 + ["kavo"], ["O"] * 599 + ["B-PER"])
    short = (["kavo", "bo"], ["B-PER", "O"])
    examples = data.encode([long, short], tokenizer, max_len=128)
    assert data.unscored_words(examples) == 600 - 126
    stub = FirstPieceTagger(tokenizer.convert_tokens_to_ids("ka"))
    preds = finetune.predict(stub, examples, tokenizer.pad_token_id)
    assert len(preds[0]) == 600 and preds[0][-1] == "O" and preds[1] == ["B-PER", "O"]
    scores = entity_scores([long[1], short[1]], preds)
    assert (scores["precision"], scores["recall"]) == (100.0, 50.0)


def prime_argv(tiny_dir, out, *extra):
    return ["--model", tiny_dir, "--synthetic", "--train-size", "96", "--support-size", "8", "--query-size", "8",
            "--epochs", "2", "--save-every", "3", "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.parametrize("flags", [[], ["--mode", "ft"]])
def test_prime_resume_ends_with_the_same_parameters(tiny_dir, tmp_path, monkeypatch, flags):
    prime.main(prime.parse_args(prime_argv(tiny_dir, tmp_path / "straight", *flags)))  # 12 steps, dropout on
    real_step, calls = prime.prime_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 8:  # during step 8: steps 1-7 done, the last save was after step 6
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(prime, "prime_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prime.main(prime.parse_args(prime_argv(tiny_dir, tmp_path / "resumed", *flags)))
    assert os.path.exists(tmp_path / "resumed" / "resume.pt") and not os.path.exists(tmp_path / "resumed" / "checkpoint.json")
    monkeypatch.setattr(prime, "prime_step", real_step)
    prime.main(prime.parse_args(prime_argv(tiny_dir, tmp_path / "resumed", "--resume", *flags)))
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(tmp_path / "straight" / "log.jsonl").read() == open(tmp_path / "resumed" / "log.jsonl").read()
    assert not os.path.exists(tmp_path / "resumed" / "resume.pt")  # removed once the checkpoint is complete


def test_resume_refuses_other_flags(tiny_dir, tmp_path):
    args = prime.parse_args(prime_argv(tiny_dir, tmp_path, "--max-steps", "3"))
    tagger, _, _ = model.load_tagger(tiny_dir, data.LABELS)
    optimizer, schedule = prime.make_optimizer(tagger, args, 3)
    prime.save_state(str(tmp_path / "resume.pt"), tagger, optimizer, schedule, step=2, args=args)
    with pytest.raises(model.ModelError, match=r"resume.pt was written with other flags \(--inner_lr: 0.03 -> 0.1\)"):
        prime.main(prime.parse_args(prime_argv(tiny_dir, tmp_path, "--max-steps", "3", "--resume", "--inner-lr", "0.1")))


def test_same_seed_same_result(tiny_dir, tmp_path):
    argv = ["--setting", "3", "--lang", "hi", "--model", tiny_dir, "--synthetic", "--train-size", "60", "--dev-size", "20",
            "--test-size", "30", "--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--device", "cpu"]
    for name in ("a", "b"):
        finetune.main(finetune.parse_args(argv + ["--out", str(tmp_path / name)]))
    a, b = (json.load(open(tmp_path / n / "hi" / "seed1" / "result.json")) for n in ("a", "b"))
    assert (a["test_f1"], a["dev_f1"], a["best_epoch"]) == (b["test_f1"], b["dev_f1"], b["best_epoch"])
    assert open(tmp_path / "a/hi/seed1/log.jsonl").read().split('"elapsed_s"')[0] == \
        open(tmp_path / "b/hi/seed1/log.jsonl").read().split('"elapsed_s"')[0]


def test_diverged_priming_stops_with_exit_3_and_a_record(tiny_dir, tmp_path):
    r = run_script("prime.py", *prime_argv(tiny_dir, tmp_path, "--inner-scope", "all", "--inner-lr", "1e4"))
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "prime.py: priming (meta all S=5, inner lr 10000.0) diverged at meta-step 1 of 12: loss nan" in r.stderr
    assert json.load(open(tmp_path / "diverged.json"))["step"] == 1
    assert not os.path.exists(tmp_path / "checkpoint.json")


def test_diverged_finetuning_run_is_recorded_and_the_others_go_on(tiny_dir, tmp_path, monkeypatch):
    real_epoch = finetune.train_epoch

    def poisoned(model_, optimizer, schedule, examples, args, pad_id, seed, cache=None, desc=None):
        if seed // 1000 == 1:  # seed 1's runs: the learning rate explodes
            for g in optimizer.param_groups:
                g["lr"] = 1e30
        return real_epoch(model_, optimizer, schedule, examples, args, pad_id, seed, cache, desc)

    monkeypatch.setattr(finetune, "train_epoch", poisoned)
    args = finetune.parse_args(["--setting", "3", "--lang", "hi", "--seed", "1", "2", "--model", tiny_dir, "--synthetic",
                                "--train-size", "40", "--dev-size", "10", "--test-size", "10", "--epochs", "2",
                                "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(model.Diverged, match="setting 3: 1 run.s. diverged: hi/seed1"):
        finetune.main(args)
    marker = json.load(open(tmp_path / "hi" / "seed1" / "diverged.json"))
    assert marker["message"].startswith("finetune.py: setting 3 hi seed 1 diverged in epoch 1: loss nan at step")
    assert not os.path.exists(tmp_path / "hi" / "seed1" / "result.json")
    assert os.path.exists(tmp_path / "hi" / "seed2" / "result.json")
    finetune.main(args)  # a rerun skips the diverged run instead of repeating it


def test_diverged_cells_in_the_table(tmp_path):
    for seed, f1 in [(1, 50.0), (2, None)]:
        d = tmp_path / "s4" / "hi" / f"seed{seed}"
        write(d / ("result.json" if f1 else "diverged.json"), json.dumps({"setting": 4, "lang": "hi", "seed": seed, "test_f1": f1}))
    for lang in ("hi", "af"):
        write(tmp_path / "s6" / lang / "seed1" / "diverged.json", json.dumps({"setting": 6, "lang": lang, "seed": 1}))
    write(tmp_path / "s4" / "af" / "seed1" / "result.json", json.dumps({"setting": 4, "lang": "af", "seed": 1, "test_f1": 70.0}))
    r = run_script("evaluate.py", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "| 6 | MP [MAML Loop] -> AT | diverged | diverged | diverged | 0 |" in r.stdout
    assert "| 4 | Meta Priming -> AT | 50.00 (81.25, -31.25) [1 diverged] | 70.00 (88.23, -18.23) | 60.00" in r.stdout
