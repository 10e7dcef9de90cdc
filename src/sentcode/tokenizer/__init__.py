"""Tokenizers: bytes and byte-level BPE, both exact for any byte string, with one small interface."""

from sentcode.tokenizer.base import Tokenizer, load_tokenizer
from sentcode.tokenizer.bpe import BPETokenizer, train_bpe
from sentcode.tokenizer.bytes import ByteTokenizer

__all__ = ["BPETokenizer", "ByteTokenizer", "Tokenizer", "load_tokenizer", "train_bpe"]
