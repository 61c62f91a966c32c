"""Issue L: a rerun never reuses what other settings made (primings, runs, stale divergence markers, duplicate grids,
cache entries), concurrent writers do not collide, and damaged files are rebuilt or named in one line. Tiny BERT."""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import data
import evaluate
import finetune
import model
import prime
from conftest import ROOT

PRIME = ["--synthetic", "--train-size", "32", "--support-size", "8", "--query-size", "8", "--device", "cpu"]
TUNE = ["--lang", "hi", "--synthetic", "--train-size", "30", "--dev-size", "10", "--test-size", "10", "--epochs", "1",
        "--batch-size", "8", "--device", "cpu"]


def primed(tiny_dir, out, *flags):
    prime.main(prime.parse_args(["--model", tiny_dir, *PRIME, "--max-steps", "2", "--out", str(out), *flags]))
    return str(out)


def tune(out, *flags):
    finetune.main(finetune.parse_args([*TUNE, "--out", str(out), *flags]))
    return os.path.join(str(out), "hi", "seed1")


def run(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_a_priming_is_reused_only_with_the_same_settings(tiny_dir, tmp_path, capsys):
    out = primed(tiny_dir, tmp_path / "meta")
    stamp = os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns
    primed(tiny_dir, out)  # the same settings: left as it is
    assert "primed: " in capsys.readouterr().out and os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns == stamp
    with pytest.raises(model.ModelError, match=r"holds a priming made with other settings \(--seed: 1 -> 2\)"):
        primed(tiny_dir, out, "--seed", "2")
    with pytest.raises(model.ModelError, match=r"--pe: adapter -> bitfit.*--support-pass: cached -> plain|--pe: adapter -> bitfit"):
        primed(tiny_dir, out, "--pe", "bitfit")
    r = run("prime.py", "--model", tiny_dir, *PRIME, "--max-steps", "2", "--out", out, "--inner-steps", "3")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr  # one line, no traceback
    assert "--inner-steps: 5 -> 3" in r.stderr and os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns == stamp


def test_a_run_is_reused_only_with_the_same_settings_and_priming(tiny_dir, tmp_path, capsys):
    run3 = tune(tmp_path / "s3", "--setting", "3", "--model", tiny_dir)
    first = json.load(open(os.path.join(run3, "result.json")))
    assert first["identity"]["lr"] == 1e-3 and "out" not in first["identity"]
    tune(tmp_path / "s3", "--setting", "3", "--model", tiny_dir)  # same settings: skipped
    assert "all runs done" in capsys.readouterr().out
    with pytest.raises(model.ModelError, match=r"s3/hi/seed1 holds a run made with other settings \(--lr: 0.001 -> 0.01\)"):
        tune(tmp_path / "s3", "--setting", "3", "--model", tiny_dir, "--lr", "1e-2")
    init = primed(tiny_dir, tmp_path / "meta")
    run4 = tune(tmp_path / "s4", "--setting", "4", "--init", init)
    assert json.load(open(os.path.join(run4, "result.json")))["identity"]["priming.seed"] == 1
    for name in os.listdir(init):  # the same directory primed again, with another seed
        if os.path.isfile(os.path.join(init, name)):
            os.remove(os.path.join(init, name))
    primed(tiny_dir, init, "--seed", "2")
    with pytest.raises(model.ModelError, match=r"--priming\.seed: 1 -> 2"):
        tune(tmp_path / "s4", "--setting", "4", "--init", init)


def test_cells_of_a_diverged_priming_are_redone_once_it_succeeds(tiny_dir, tmp_path):
    init = str(tmp_path / "maml")
    with pytest.raises(model.Diverged):
        primed(tiny_dir, init, "--inner-scope", "all", "--inner-lr", "1e4")
    with pytest.raises(model.Diverged, match="priming diverged"):
        tune(tmp_path / "s6", "--setting", "6", "--init", init)
    cell = tmp_path / "s6" / "hi" / "seed1"
    assert json.load(open(cell / "diverged.json"))["from_priming"]
    with pytest.raises(model.Diverged, match="diverged earlier"):  # the same priming again: it stays diverged
        primed(tiny_dir, init, "--inner-scope", "all", "--inner-lr", "1e4")
    os.remove(os.path.join(init, "diverged.json"))
    primed(tiny_dir, init, "--inner-scope", "all")  # retried, with a sane inner lr: it succeeds
    tune(tmp_path / "s6", "--setting", "6", "--init", init)
    assert (cell / "result.json").exists() and not (cell / "diverged.json").exists()


def write_result(path, setting, lang, seed, f1):
    os.makedirs(path, exist_ok=True)
    json.dump({"setting": setting, "lang": lang, "seed": seed, "test_f1": f1}, open(os.path.join(path, "result.json"), "w"))


def test_evaluate_refuses_a_directory_holding_two_grids(tmp_path):
    for grid, f1 in (("mini", 60.0), ("mini-prime2", 61.0)):
        write_result(tmp_path / grid / "finetune" / "s4" / "hi" / "seed1", 4, "hi", 1, f1)
    r = run("evaluate.py", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "two runs of setting 4 hi seed 1" in r.stderr and "mini/finetune/s4/hi/seed1" in r.stderr and "mini-prime2" in r.stderr
    assert run("evaluate.py", str(tmp_path / "mini")).returncode == 0  # each grid on its own is fine


def test_two_writers_of_one_feature_cache_entry(tiny_dir, tmp_path, monkeypatch):
    """Two units computing the same entry at once (settings 2 and 3 under --jobs) both finish with a complete file."""
    args = finetune.parse_args(["--setting", "3", "--model", tiny_dir, *TUNE, "--out", str(tmp_path / "o"),
                                "--feature-cache", str(tmp_path / "cache")])
    tagger, tokenizer, _ = finetune.build_model(args)
    examples = data.encode(data.load_split("hi", "test", synthetic=True, limit=20), tokenizer, 64)
    both = threading.Barrier(2)
    real = finetune.word_features

    def together(*a, **k):
        features = real(*a, **k)
        both.wait(timeout=30)  # both have computed the entry; now both write it
        return features
    monkeypatch.setattr(finetune, "word_features", together)
    results, errors = [], []

    def unit():
        try:
            results.append(finetune.stored_word_features(tagger, examples, args, tokenizer.pad_token_id, "body"))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)
    threads = [threading.Thread(target=unit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2
    entries = os.listdir(tmp_path / "cache")
    assert len(entries) == 1 and entries[0].endswith(".pt")  # no temporary file left behind
    stored = torch.load(tmp_path / "cache" / entries[0], weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(stored["features"], results[0]["features"]))


def test_feature_cache_entries_differ_by_precision(tiny_dir, tmp_path):
    """Issue L8: a --bf16 run never reads the fp32 run's features, nor the reverse."""
    cache = tmp_path / "cache"
    for bf16 in ([], ["--bf16"]):
        tune(tmp_path / ("b" if bf16 else "f"), "--setting", "3", "--model", tiny_dir, "--feature-cache", str(cache), *bf16)
    entries = [torch.load(cache / name, weights_only=True) for name in sorted(os.listdir(cache))]
    assert len(entries) == 4  # validation and test, in fp32 and in bf16
    for a in entries:  # each split's fp32 and bf16 entries: the same sentences, other numbers
        twin = [b for b in entries if b is not a and all(torch.equal(x, y) for x, y in zip(a["labels"], b["labels"]))]
        assert len(twin) == 1 and not all(torch.equal(x, y) for x, y in zip(a["features"], twin[0]["features"]))


# ----------------------------------------------------------------------------- damaged files (L10)
def truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def test_a_damaged_feature_cache_entry_is_recomputed(tiny_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    a = tune(tmp_path / "a", "--setting", "2", "--model", tiny_dir, "--feature-cache", str(cache))
    for name in os.listdir(cache):
        truncate(cache / name)
    b = tune(tmp_path / "b", "--setting", "2", "--model", tiny_dir, "--feature-cache", str(cache))
    assert "is damaged; recomputing it" in capsys.readouterr().err
    ra, rb = (json.load(open(os.path.join(r, "result.json"))) for r in (a, b))
    assert (ra["test_f1"], ra["dev_f1"]) == (rb["test_f1"], rb["dev_f1"])
    assert all(isinstance(torch.load(cache / name, weights_only=True), dict) for name in os.listdir(cache))


def test_a_damaged_primed_checkpoint_is_named_and_primed_again(tiny_dir, tmp_path, capsys):
    init = primed(tiny_dir, tmp_path / "meta")
    truncate(os.path.join(init, "model.safetensors"))
    r = run("finetune.py", "--setting", "4", "--init", init, *TUNE, "--out", str(tmp_path / "s4"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "model.safetensors is damaged" in r.stderr and f"delete {init}" in r.stderr
    primed(tiny_dir, init)  # prime.py: the same settings, a damaged checkpoint: primed again
    assert "damaged; priming again" in capsys.readouterr().err
    assert model.safetensors_complete(os.path.join(init, "model.safetensors"))
    tune(tmp_path / "s4", "--setting", "4", "--init", init)


def test_a_damaged_resume_state_starts_the_priming_over(tiny_dir, tmp_path, capsys):
    straight = primed(tiny_dir, tmp_path / "a", "--max-steps", "4", "--save-every", "2")
    out = tmp_path / "b"
    out.mkdir()
    (out / "resume.pt").write_bytes(b"PK\x03\x04 cut short")
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0, "tasks": []}\n{"step": 2, "lo')  # a line cut short
    primed(tiny_dir, out, "--max-steps", "4", "--save-every", "2", "--resume")
    assert "resume.pt is damaged" in capsys.readouterr().err
    a, b = (model.load_tagger(d, data.LABELS)[0].state_dict() for d in (straight, str(out)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert open(os.path.join(straight, "log.jsonl")).read() == open(out / "log.jsonl").read()


def test_a_damaged_result_is_redone_and_named_by_evaluate(tiny_dir, tmp_path, capsys):
    cell = tune(tmp_path / "s3", "--setting", "3", "--model", tiny_dir)
    good = json.load(open(os.path.join(cell, "result.json")))
    truncate(os.path.join(cell, "result.json"))
    r = run("evaluate.py", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "result.json: damaged" in r.stderr, r.stderr
    tune(tmp_path / "s3", "--setting", "3", "--model", tiny_dir)
    assert "is damaged; redoing that run" in capsys.readouterr().err
    assert json.load(open(os.path.join(cell, "result.json")))["test_f1"] == good["test_f1"]
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0, "tasks": []}\n{"step": 2, "loss": 1.')  # cut short by a crash
    assert [r["step"] for r in evaluate.read_jsonl(str(log))] == [1]
