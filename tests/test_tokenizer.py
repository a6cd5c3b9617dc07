import json

import pytest
from transformers import AutoTokenizer

from mlm_pretrain.corpus import TextStream
from mlm_pretrain.errors import InputError
from mlm_pretrain.tokenizer import load_tokenizer, train_tokenizer, word_start_table

TEXT = "Mr. Knightley, a sensible man about seven or eight-and-thirty, was not only a very old friend."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = {}
    for kind in ("wordpiece", "bpe", "unigram"):
        path = tmp_path_factory.mktemp(kind)
        report = train_tokenizer(
            TextStream(["@sample"]),
            path,
            kind=kind,
            vocab_size=3000,
            lowercase=kind == "wordpiece",
            max_chars=600_000,
            model_max_length=256,
            progress=False,
        )
        out[kind] = (path, report)
    return out


@pytest.mark.parametrize(
    ("kind", "specials", "cls_class"),
    [
        ("wordpiece", ["[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"], "BertTokenizer"),
        ("bpe", ["<s>", "</s>", "<mask>", "<pad>", "<unk>"], "RobertaTokenizer"),
        ("unigram", ["<s>", "</s>", "<mask>", "<pad>", "<unk>"], None),
    ],
)
def test_autotokenizer_loads_each_kind_with_its_special_tokens(trained, kind, specials, cls_class):
    path, report = trained[kind]
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == report.vocab_size == 3000
    assert set(specials) <= set(tok.all_special_tokens)
    assert tok.mask_token == specials[2] and tok.mask_token_id is not None
    assert tok.model_max_length == 256
    if cls_class:
        assert type(tok).__name__.startswith(cls_class)
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == (TEXT.lower().replace("-and-", " - and - ") if kind == "wordpiece" else TEXT)


def test_roberta_style_mask_swallows_the_space_before_it(trained):
    tok = AutoTokenizer.from_pretrained(trained["bpe"][0])
    tokens = tok.convert_ids_to_tokens(tok("a very <mask> friend")["input_ids"])
    assert tokens[tokens.index("<mask>") - 1] != "Ġ" and tokens[tokens.index("<mask>") + 1] == "Ġfriend"


def test_report_measures_held_out_text(trained):
    for kind, (path, _) in trained.items():
        saved = json.loads((path / "tokenizer_report.json").read_text())
        assert saved["vocab_size"] == 3000 and saved["kind"] == kind
        assert 1.0 < saved["fertility"] < 2.0  # a 3k vocabulary splits some words, not most
        assert saved["validation_documents"] > 10 and saved["validation_words"] > 500
        assert 550_000 < saved["characters_trained"] < 620_000  # max_chars bounded the read
        assert saved["peak_rss_mb"] > 0 and saved["train_seconds"] >= 0
    assert trained["bpe"][1].unk_rate == 0.0  # byte-level: nothing is unknown


def test_unknown_tokens_are_counted(tmp_path):
    docs = list(TextStream(["@sample"]))[:300]
    report = train_tokenizer(docs, tmp_path, vocab_size=500, validation=["the ☃ whale ☃"], progress=False)
    tokens = load_tokenizer(tmp_path).tokenize("the ☃ whale ☃")
    assert tokens.count("[UNK]") == 2
    assert report.unk_rate == pytest.approx(2 / len(tokens))


def test_word_starts_follow_each_vocabulary_convention(trained):
    for kind, (path, _) in trained.items():
        tok = load_tokenizer(path)
        table = word_start_table(tok)
        tokens = tok.convert_ids_to_tokens(
            tok("unbelievably heartless Knightley", add_special_tokens=False)["input_ids"]
        )
        starts = [bool(table[tok.convert_tokens_to_ids(t)]) for t in tokens]
        if kind == "wordpiece":
            assert starts == [not t.startswith("##") for t in tokens]
        else:  # the first word of a text has no Ġ in RoBERTa's byte-level BPE; packing marks it from [SEP]
            assert starts[1:] == [t.startswith(("Ġ", "▁")) for t in tokens][1:]
        assert sum(starts) >= 2 and len(tokens) > 3


def test_load_tokenizer_rejects_what_is_not_a_tokenizer(tmp_path):
    with pytest.raises(InputError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path)
    with pytest.raises(InputError, match="vocab_size 50 is too small"):
        train_tokenizer(["x"], tmp_path, vocab_size=50)
    with pytest.raises(InputError, match="unknown tokenizer type 'sentencepiece'"):
        train_tokenizer(["x"], tmp_path, kind="sentencepiece", vocab_size=200)
