"""Bits per UTF-8 byte: the one metric that compares byte, BPE and sentence-step models.

bpb = total negative log2-likelihood of the held-out stream / its UTF-8 bytes, over a full deterministic pass.
Special tokens count zero bytes but their nats count (end-of-text is part of the text's code length). The
stream is preceded by one end-of-text token so that its first real token is predicted too.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from sentcode.data.loader import eval_batches
from sentcode.train.precision import autocast


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes that each token id stands for (0 for special tokens)."""
    return np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int64)


@torch.no_grad()
def evaluate_bpb(
    model,
    tokens: np.ndarray,
    tokenizer,
    seq_len: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    max_tokens: int | None = None,
    stride: int | None = None,
) -> dict:
    """Full pass (or the first ``max_tokens`` tokens) over ``tokens``; returns bpb, nats, tokens, bytes."""
    device = torch.device(device)
    stream = np.asarray(tokens[:max_tokens] if max_tokens else tokens, dtype=np.int64)
    stream = np.concatenate([[tokenizer.eos_id], stream])
    n_bytes = int(token_byte_lengths(tokenizer)[stream].sum())
    was_training = model.training
    model.eval()
    total_nats, counted = 0.0, 0
    for x, y, mask in eval_batches(stream, seq_len, batch_size, stride=stride, pad_value=tokenizer.pad_id):
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with autocast(device, precision):
            logits = model(x)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        total_nats += float((nll * mask.reshape(-1)).sum())
        counted += int(mask.sum())
    model.train(was_training)
    return {
        "bpb": total_nats / math.log(2) / max(n_bytes, 1),
        "nats": total_nats,
        "tokens": counted,
        "bytes": n_bytes,
        "bytes_per_token": n_bytes / max(counted, 1),
    }
