import pytest

from sentcode.corpus.sentences import SplitStats, sentences_of_documents, split_sentences, utf8_len
from sentcode.errors import ConfigError, SentcodeError


def _valid_utf8(piece: str) -> bool:
    try:
        piece.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
    except UnicodeError:
        return False
    return True


def test_abbreviations_decimals_initials():
    text = "Dr. Smith paid $3.50 to J. R. R. Tolkien. He left."
    assert split_sentences(text) == ["Dr. Smith paid $3.50 to J. R. R. Tolkien.", "He left."]


def test_paragraph_break_separates_heading():
    text = "Introduction\n\nThe body starts here. It goes on.\n \t\nFinal words"
    assert split_sentences(text) == ["Introduction", "The body starts here.", "It goes on.", "Final words"]


def test_empty_and_whitespace_input():
    assert split_sentences("") == []
    assert split_sentences(" \n\n\t \n") == []


def test_long_sentence_is_cut_at_whitespace_not_dropped():
    words = [f"w{i % 97}" + "x" * (i % 5) for i in range(400)]
    text = "Before. " + " ".join(words) + ". After."
    pieces = split_sentences(text, max_bytes=64)
    assert pieces[0] == "Before." and pieces[-1] == "After."
    assert all(0 < utf8_len(p) <= 64 for p in pieces)
    assert all(p == p.strip() for p in pieces)
    assert " ".join(pieces).split() == text.split()


@pytest.mark.parametrize("char", ["é", "€", "😀", "\udcff"])
def test_cut_without_spaces_keeps_characters_whole(char):
    text = char * 500
    pieces = split_sentences(text, max_bytes=15)
    assert "".join(pieces) == text
    for piece in pieces:
        assert utf8_len(piece) <= 15
        assert _valid_utf8(piece)
    # Cuts take as much as fits: every piece but the last is within one character of the limit.
    width = utf8_len(char)
    assert all(utf8_len(p) > 15 - width for p in pieces[:-1])


def test_surrogate_escaped_text_round_trips_to_bytes():
    raw = b"Valid start. Then \xff\xfe broken bytes \x80 here. End."
    text = raw.decode("utf-8", "surrogateescape")
    pieces = split_sentences(text, max_bytes=12)
    assert all(utf8_len(p) <= 12 for p in pieces)
    joined = " ".join(pieces).encode("utf-8", "surrogateescape")
    assert joined.split() == raw.split()
    # Lone surrogates outside the escape range are not crashes either.
    assert split_sentences("odd \ud800 char. Next.") == ["odd \ud800 char.", "Next."]


def test_documents_keep_order_and_count_stats():
    docs = [
        "First doc. Second sentence.",
        "",
        "Third doc only has " + "many words " * 20 + "here.",
        "Heading\n\nLast one.",
    ]
    sents, stats = sentences_of_documents(iter(docs), max_bytes=50)
    assert len(sents) == 4
    assert sents[0] == ["First doc.", "Second sentence."]
    assert sents[1] == []
    assert sents[3] == ["Heading", "Last one."]
    assert " ".join(sents[2]).split() == docs[2].split()
    assert isinstance(stats, SplitStats)
    assert stats.documents == 4
    assert stats.sentences == sum(map(len, sents))
    assert stats.split_long == 1
    assert stats.pieces_from_long == len(sents[2]) >= 5


def test_bad_max_bytes_is_a_user_error():
    with pytest.raises(ConfigError, match="max_bytes"):
        split_sentences("x", max_bytes=2)
    assert issubclass(ConfigError, SentcodeError)
