import pytest

from sentcode.corpus import (
    Document,
    clean_text,
    documents_from_records,
    load_corpus,
    load_documents,
    load_documents_dedup,
    sample_corpus_path,
    split_documents,
)
from sentcode.errors import DataError


def test_clean_text():
    raw = "a\r\nb\rc  \t\n\x00d\x07\n\n\n\n\n\ne\u0301\t\n"
    assert clean_text(raw) == "a\nb\nc\nd\n\n\n\u00e9"
    escaped = b"ok \xff\xfe".decode("utf-8", "surrogateescape")
    assert clean_text(escaped) == escaped


def test_invalid_utf8_file_keeps_bytes_and_warns(tmp_path):
    raw = b"caf\xc3\xa9 \xff\xfe bad \x80 bytes"
    (tmp_path / "bad.txt").write_bytes(raw)
    with pytest.warns(UserWarning, match=r"bad\.txt.*3 invalid byte"):
        docs = load_documents(tmp_path / "bad.txt")
    assert docs[0].text.encode("utf-8", "surrogateescape") == raw


def test_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="corpus not found: .*nope"):
        load_documents(tmp_path / "nope")
    (tmp_path / "empty.txt").write_text("  \n\n \x00 \n")
    with pytest.raises(DataError, match="corpus is empty"):
        load_documents(tmp_path / "empty.txt")


def test_jsonl_and_bad_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "other": 1}\n')
    assert [d.text for d in load_documents(path)] == ["one", "two"]
    path.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl, line 2: no 'text'"):
        load_documents(path)


def test_directory_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zed")
    (tmp_path / "a.txt").write_text("aye")
    (tmp_path / "c.jsonl").write_text('{"text": "see"}\n')
    (tmp_path / "ignored.csv").write_text("no")
    docs = load_documents(tmp_path)
    assert [d.text for d in docs] == ["aye", "zed", "see"]
    assert [d.doc_id for d in docs] == ["a.txt", "b/z.md", "c.jsonl:1"]


def test_yaml_weighted_list(tmp_path):
    (tmp_path / "one.txt").write_text("only text")
    lst = tmp_path / "corpus.yaml"
    lst.write_text("sources:\n  - {path: one.txt, weight: 2.0}\n  - {path: sample, weight: 0.5}\n")
    docs = load_documents(lst)
    weights = {d.source: d.weight for d in docs}
    assert weights == {str(tmp_path / "one.txt"): 2.0, "sample": 0.5}
    lst.write_text("sources:\n  - {path: one.txt, wieght: 2}\n")
    with pytest.raises(DataError, match="unknown key"):
        load_documents(lst)


def test_weights_apply_to_train_only():
    docs = [Document(f"doc {i}", "s", f"d{i}", weight=2.5) for i in range(40)]
    splits = split_documents(docs)
    held = {d.doc_id for d in splits.val + splits.test}
    unique_train = {d.doc_id for d in splits.train}
    assert not held & unique_train and len(held) + len(unique_train) == 40
    assert 2 * len(unique_train) < len(splits.train) < 3 * len(unique_train)
    assert len(splits.val) == len({d.doc_id for d in splits.val})


def test_dedup_keeps_first(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "same"}\n{"text": "other"}\n{"text": "same  "}\n')
    docs, removed = load_documents_dedup(tmp_path / "c.jsonl")
    assert [d.doc_id for d in docs] == ["c.jsonl:1", "c.jsonl:2"] and removed == 1


def test_sample_split_holds_out_newest_years():
    assert sample_corpus_path().stat().st_size < 1_000_000
    splits = load_corpus("sample")
    assert len(splits.test) == 2 and len(splits.val) == 2 and len(splits.train) == 26
    years = lambda ds: [d.meta["year"] for d in ds]  # noqa: E731
    assert (
        max(years(splits.train))
        <= min(years(splits.val))
        <= max(years(splits.val))
        <= min(years(splits.test))
    )
    assert splits.train[0].doc_id == "1790-washington-0"
    assert load_corpus("sample").test[0].doc_id == splits.test[0].doc_id


def test_hash_split_is_deterministic_and_nonempty():
    docs = [Document(f"text {i}", "s", f"id{i}") for i in range(25)]
    a, b = split_documents(docs), split_documents(list(reversed(docs)))
    assert len(a.val) == len(a.test) == 2
    assert {d.doc_id for d in a.test} == {d.doc_id for d in b.test}


def test_small_corpus_paragraph_split(tmp_path):
    paragraphs = [f"Paragraph {i}" + " word" * 20 for i in range(40)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs))
    splits = load_corpus(tmp_path / "book.txt", val_frac=0.1, test_frac=0.1)
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [1, 1, 1]
    assert splits.test[0].doc_id == "book.txt#test" and splits.test[0].text.endswith(paragraphs[-1])
    sizes = [len(s[0].text) for s in (splits.train, splits.val, splits.test)]
    assert sizes[1] == pytest.approx(0.1 * sum(sizes), rel=0.3)
    joined = "\n\n".join(s[0].text for s in (splits.train, splits.val, splits.test))
    assert joined == "\n\n".join(paragraphs)


def test_long_paragraphs_fall_back_to_lines_then_bytes(tmp_path):
    """One 30 kB paragraph and a few short ones: cutting at paragraphs would give test the whole long one, so
    the split moves to lines (and, with no lines either, to bytes) and says so."""
    lines = [f"Line {i} of a long paragraph" + " word" * 8 for i in range(600)]
    (tmp_path / "a.txt").write_text("Intro.\n\nMore.\n\n" + "\n".join(lines))
    with pytest.warns(UserWarning, match="split at line boundaries"):
        splits = load_corpus(tmp_path / "a.txt")
    sizes = [len(s[0].text) for s in (splits.train, splits.val, splits.test)]
    assert all(0.5 * 0.05 * sum(sizes) <= n <= 2 * 0.05 * sum(sizes) for n in sizes[1:])
    (tmp_path / "b.txt").write_text("Intro.\n\nMore.\n\n" + "x" * 30000)
    with pytest.warns(UserWarning, match="split at byte boundaries"):
        splits = load_corpus(tmp_path / "b.txt")
    assert len(splits.test[0].text) == pytest.approx(0.05 * 30014, rel=0.1)


def test_tiny_corpus_falls_back_then_fails(tmp_path):
    (tmp_path / "lines.txt").write_text("one\ntwo\nthree")
    splits = load_corpus(tmp_path / "lines.txt")
    assert [s[0].text for s in (splits.train, splits.val, splits.test)] == ["one", "two", "three"]
    (tmp_path / "x.txt").write_text("ab")
    with pytest.raises(DataError, match="corpus too small to split"):
        load_corpus(tmp_path / "x.txt")


def test_documents_from_records():
    records = [{"text": "a"}, {"text": "  "}, {"text": "b", "id": 3}, {"text": "c"}]
    docs = documents_from_records(records, source="hf:x", limit=2)
    assert [(d.text, d.doc_id) for d in docs] == [("a", "hf:x:0"), ("b", "hf:x:2")]
    with pytest.raises(DataError, match="record 1 of hf:x has no 'body'"):
        documents_from_records([{"body": "a"}, {"text": "b"}], text_field="body", source="hf:x")


def test_hf_spec_without_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match=r"install the 'hf' extra"):
        load_documents("hf:some/dataset")
