"""Metrics for models that predict the next sentence's embedding.

All comparisons are cosines (rows are normalised here, whatever the caller passes), so the numbers are the
same for any encoder scale.

* ``cosine``: mean cosine between each prediction and its target.
* ``contrastive_acc``: how often a prediction is closer to its own target than to every other target of
  its batch (top-1 retrieval; chance is 1 / batch size).
* ``copy_score``: mean over rows of the highest cosine between the prediction and the context sentences
  it was given. A model that predicts "more of the same" scores high here even with a poor ``cosine``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sentcode.errors import DataError

_ROWS = 1024  # similarity rows at a time, so N x N never has to fit in memory


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _retrieval_hits(pred: np.ndarray, target: np.ndarray, batch_size: int | None) -> int:
    n = len(pred)
    size = n if batch_size is None else batch_size
    hits = 0
    for g0 in range(0, n, size):
        g1 = min(g0 + size, n)
        for r0 in range(g0, g1, _ROWS):
            r1 = min(r0 + _ROWS, g1)
            sims = pred[r0:r1] @ target[g0:g1].T
            hits += int((sims.argmax(axis=1) == np.arange(r0 - g0, r1 - g0)).sum())
    return hits


def next_sentence_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    context_embs: np.ndarray | Sequence[np.ndarray],
    context_mask: np.ndarray | None = None,
    batch_size: int | None = None,
) -> dict:
    """``{"cosine", "contrastive_acc", "copy_score"}`` of predictions ``pred`` [N, d] against ``target`` [N, d].

    ``context_embs``: each row's context sentences, either [N, K, d] (with ``context_mask`` [N, K], True =
    present) or a sequence of N arrays [k_i, d]. Rows without context are left out of ``copy_score`` (NaN
    when no row has any). ``batch_size``: retrieve among consecutive groups of that many targets; None =
    among all N.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.ndim != 2 or pred.shape != target.shape:
        raise DataError(f"pred and target must both be [N, d], got {tuple(pred.shape)} and {tuple(target.shape)}")
    n, d = pred.shape
    if n == 0:
        raise DataError("next_sentence_metrics needs at least one prediction")
    if batch_size is not None and batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    p, t = _unit(pred), _unit(target)

    if isinstance(context_embs, np.ndarray):
        if context_embs.ndim != 3 or context_embs.shape[0] != n or context_embs.shape[2] != d:
            raise DataError(f"context_embs must be [N={n}, K, d={d}], got {tuple(context_embs.shape)}")
        mask = np.ones(context_embs.shape[:2], bool) if context_mask is None else np.asarray(context_mask, bool)
        if mask.shape != context_embs.shape[:2]:
            raise DataError(f"context_mask must be {tuple(context_embs.shape[:2])}, got {tuple(mask.shape)}")
        sims = np.einsum("nd,nkd->nk", p, _unit(context_embs))
        sims = np.where(mask, sims, -np.inf)
        has = mask.any(axis=1)
        best = sims.max(axis=1)[has] if context_embs.shape[1] else np.empty(0)
    else:
        if len(context_embs) != n:
            raise DataError(f"context_embs has {len(context_embs)} rows for {n} predictions")
        best_list = []
        for i, c in enumerate(context_embs):
            c = np.asarray(c).reshape(-1, d) if np.asarray(c).size else np.empty((0, d))
            if len(c):
                best_list.append(float((_unit(c) @ p[i]).max()))
        best = np.asarray(best_list)

    return {
        "cosine": float((p * t).sum(axis=1).mean()),
        "contrastive_acc": _retrieval_hits(p, t, batch_size) / n,
        "copy_score": float(best.mean()) if len(best) else float("nan"),
    }
