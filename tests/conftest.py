"""Shared fixtures: a tiny random BERT saved like a hub model (no download), and its model/tokenizer."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest.ini runs 2 workers: one thread each, for them and their subprocesses
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)

import data  # noqa: E402
import model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return model.make_tiny_bert(str(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture
def tiny(tiny_dir):
    """(tagger with adapter, tokenizer), dropout off so that runs are comparable."""
    tagger, tokenizer, _ = model.load_tagger(tiny_dir, data.LABELS, adapter_dim=8)
    tagger.eval()
    return tagger, tokenizer


@pytest.fixture(scope="session")
def tiny_nodrop_dir(tmp_path_factory):
    """The tiny BERT without dropout: script runs (train mode) can be compared with references."""
    return model.make_tiny_bert(str(tmp_path_factory.mktemp("tiny-nodrop")), dropout=0.0)


CJK = 0x4E00  # first of the 256 one-character words of make_tiny_unigram_bert's vocabulary


def make_tiny_unigram_bert(path, seed=0, dropout=0.0):
    """A random 2-layer BERT with a hand-made SentencePiece-style (unigram, metaspace) tokenizer, as XLM-R's
    family tokenizes: "\u2581" marks a word start, a few pieces carry it ("\u2581ka", "\u2581ri", "\u2581du"), single
    letters and the 256 "characters" from U+4E00 on do not, so a one-letter or one-character word becomes a bare
    "\u2581" + its letter. No download."""
    import string

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces = [(t, 0.0) for t in specials] + [("\u2581", -1.0)] + [(c, -3.0) for c in string.ascii_lowercase]
    pieces += [("\u2581" + w, -1.5) for w in ("ka", "ri", "du")] + [(w, -2.0) for w in ("vo", "me", "ta")]
    pieces += [(chr(CJK + k), -3.0) for k in range(256)]  # "characters" that are words: never with a "\u2581" of their own
    tok = Tokenizer(models.Unigram(pieces, unk_id=3))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                            cls_token="<s>", sep_token="</s>").save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(pieces), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=256, pad_token_id=1,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def unigram_dir(tmp_path_factory):
    return make_tiny_unigram_bert(str(tmp_path_factory.mktemp("tiny-unigram")))
