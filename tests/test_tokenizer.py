import json

import pytest

from sentcode.corpus import load_documents
from sentcode.errors import ConfigError, DataError
from sentcode.tokenizer import BPETokenizer, ByteTokenizer, UnigramTokenizer, load_tokenizer, train_bpe, train_unigram

CASES = [
    b"",
    b"Hello, world!\n\tIndented.",
    "é".encode(),
    "".join(chr(c) for c in range(0x80, 0x100)).encode(),  # the range a-lm's BPE mis-decoded
    "déjà vu, ¡olé!, «quote», ÿ".encode(),
    "emoji 😀👍🏽 and 🇺🇸".encode(),
    "中文字符 日本語 한국어".encode(),
    b"\xff\xfe\x80abc\xc3",
    b"ok \xc3\xa9 \xed\xa0\x80 \xf0\x9f\x98 tail\xe2\x82",
    bytes(range(256)),
    b"literal <|bos|><|eos|><|pad|> stays text",
]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def bpe(request):
    """Each byte-level subword tokenizer: BPE, and a-lm's optional Unigram."""
    texts = [d.text for d in load_documents("sample")]
    return (train_bpe if request.param == "bpe" else train_unigram)(texts, 1024)


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    for case in CASES:
        assert tok.decode(tok.encode(case)) == case
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([104, 256, 105, 257, 258]) == b"hi"
    assert tok.token_bytes(65) == b"A" and tok.token_bytes(257) == b""
    with pytest.raises(ValueError):
        tok.decode([259])


@pytest.mark.parametrize("case", CASES)
def test_bpe_roundtrip(bpe, case):
    ids = bpe.encode(case)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == case
    assert b"".join(bpe.token_bytes(i) for i in ids) == case
    assert bpe.encode(case.decode("utf-8", "surrogateescape")) == ids


def test_bpe_batch_matches_single(bpe):
    assert bpe.encode_batch(CASES) == [bpe.encode(c) for c in CASES]


def test_bpe_specials_and_compression(bpe):
    assert bpe.vocab_size == 1024
    assert len({bpe.bos_id, bpe.eos_id, bpe.pad_id}) == 3
    assert bpe.decode([bpe.bos_id, bpe.eos_id, bpe.pad_id]) == b""
    text = "\n\n".join(d.text for d in load_documents("sample")).encode()
    assert len(text) / len(bpe.encode(text)) > 2


def test_save_load_identity(tmp_path, bpe):
    for tok in (ByteTokenizer(), bpe):
        tok.save(tmp_path / tok.kind)
        loaded = load_tokenizer(tmp_path / tok.kind)
        assert type(loaded) is type(tok) and loaded.meta() == tok.meta()
        for case in CASES:
            assert loaded.encode(case) == tok.encode(case)
    assert isinstance(load_tokenizer(tmp_path / bpe.kind), {"bpe": BPETokenizer, "unigram": UnigramTokenizer}[bpe.kind])


def test_load_missing_or_corrupt(tmp_path, bpe):
    with pytest.raises(DataError, match="no tokenizer at"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt tokenizer"):
        load_tokenizer(tmp_path)
    bpe.save(tmp_path / "b")
    (tmp_path / "b" / "tokenizer.json").write_text("garbage")
    with pytest.raises(DataError, match=f"corrupt {bpe.label} tokenizer"):
        load_tokenizer(tmp_path / "b")
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps({"kind": "wordpiece"}))
    with pytest.raises(DataError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("train", [train_bpe, train_unigram])
def test_bpe_vocab_too_small(train):
    with pytest.raises(ConfigError, match="at least 259"):
        train(["abc"], 100)


@pytest.mark.parametrize("train", [train_bpe, train_unigram])
def test_bpe_trains_on_invalid_utf8(train):
    tok = train([b"abc \xff abc \xfe abc", "abc abc"], 300)
    assert tok.decode(tok.encode(b"\xffabc abc\xfe")) == b"\xffabc abc\xfe"


def test_unigram_segments_by_likelihood_not_merges(bpe):
    """A Unigram vocabulary is not a BPE one: trained on the same text to the same size, they differ."""
    texts = [d.text for d in load_documents("sample")]
    other = (train_unigram if bpe.kind == "bpe" else train_bpe)(texts, 1024)
    assert bpe.meta()["kind"] != other.meta()["kind"]
    assert {bpe.token_bytes(i) for i in range(bpe.vocab_size)} != {other.token_bytes(i) for i in range(other.vocab_size)}
