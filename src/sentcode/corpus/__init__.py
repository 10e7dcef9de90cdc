"""Corpora: reading sources into clean documents and splitting them into train/val/test."""

from sentcode.corpus.sources import (
    Document,
    clean_text,
    documents_from_records,
    load_documents,
    load_documents_dedup,
    sample_corpus_path,
)
from sentcode.corpus.splits import Splits, load_corpus, split_documents, stable_hash

__all__ = [
    "Document",
    "Splits",
    "clean_text",
    "documents_from_records",
    "load_corpus",
    "load_documents",
    "load_documents_dedup",
    "sample_corpus_path",
    "split_documents",
    "stable_hash",
]
