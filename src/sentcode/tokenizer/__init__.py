"""Tokenizers: bytes and byte-level BPE, both exact for any byte string, with one small interface."""

from sentcode.tokenizer.base import Tokenizer
from sentcode.tokenizer.bpe import BPETokenizer, UnigramTokenizer, train_bpe, train_unigram
from sentcode.tokenizer.bytes import ByteTokenizer
from sentcode.tokenizer.load import load_tokenizer

__all__ = ["BPETokenizer", "ByteTokenizer", "Tokenizer", "UnigramTokenizer", "load_tokenizer", "train_bpe",
           "train_unigram"]
