"""Batches of training windows and full evaluation passes over a token stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from sentcode.errors import DataError


class WindowLoader:
    """Random windows of ``seq_len + 1`` tokens starting at any offset of the stream.

    Local batch ``i`` of rank ``r`` is global draw ``g = i * world_size + r``, drawn from
    ``default_rng([seed, g])``: the whole state is the step counter (resuming needs no saved RNG state), each
    rank draws its own windows, and N ranks together draw exactly the windows one process would draw in N
    consecutive micro-batches, so a DDP run and a single-process run with gradient accumulation see the
    same data.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"token stream of {len(tokens)} tokens is shorter than one window of {seq_len + 1} tokens"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.step = 0
        self._offsets = np.arange(seq_len + 1)

    @property
    def max_start(self) -> int:
        return len(self.tokens) - self.seq_len - 1

    def starts(self, step: int) -> np.ndarray:
        """The window start offsets of batch ``step`` (uniform over ``[0, max_start]``)."""
        rng = np.random.default_rng([self.seed, step * self.world_size + self.rank])
        return rng.integers(0, self.max_start, size=self.batch_size, endpoint=True)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, int64 tensors of shape [batch_size, seq_len], ``y`` being ``x`` shifted by one."""
        idx = self.starts(self.step)[:, None] + self._offsets
        self.step += 1
        windows = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved step. Rank stays this loader's own: every rank may load rank 0's state."""
        self.seed = int(state["seed"])
        self.step = int(state["step"])


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, stride: int | None = None, pad_value: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One deterministic pass that predicts every token but the first exactly once.

    Windows start every ``stride`` tokens. The first window scores all its targets; each later one scores only
    its last ``stride`` targets, which therefore see at least ``seq_len - stride`` tokens of context. The last
    window is padded with ``pad_value``. Yields ``(x, y, mask)``: int64 [b, seq_len] tensors and a bool mask
    of the targets that count; ``mask.sum()`` over the pass is ``len(tokens) - 1``.
    """
    stride = seq_len // 2 if stride is None else stride
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len], got {stride}")
    n = len(tokens)
    if n < 2:
        raise DataError(f"token stream of {n} tokens is too short to evaluate (need at least 2)")

    # Window k starts at k * stride and predicts positions start+1 .. start+seq_len; it scores those beyond
    # what window k-1 reached, and the pass ends once position n-1 is scored.
    num_windows = 1 + max(0, -(-(n - 1 - seq_len) // stride))
    starts = np.arange(num_windows, dtype=np.int64) * stride
    offsets = np.arange(seq_len + 1)
    positions = np.arange(1, seq_len + 1)
    for b in range(0, num_windows, batch_size):
        s = starts[b : b + batch_size, None]
        idx = s + offsets
        valid = idx < n
        windows = np.where(valid, np.asarray(tokens[np.minimum(idx, n - 1)], dtype=np.int64), pad_value)
        first_new = np.where(s == 0, 1, s - stride + seq_len + 1)  # first position not scored before
        target_pos = s + positions
        mask = (target_pos >= first_new) & valid[:, 1:]
        windows = torch.from_numpy(windows)
        yield windows[:, :-1], windows[:, 1:], torch.from_numpy(mask)
