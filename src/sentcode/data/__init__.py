"""Prepared data: token shards, the data directory, and loaders for training and evaluation."""

from sentcode.data.loader import WindowLoader, eval_batches
from sentcode.data.prepare import DataDir, prepare_data
from sentcode.data.shards import read_tokens, write_tokens

__all__ = ["DataDir", "WindowLoader", "eval_batches", "prepare_data", "read_tokens", "write_tokens"]
