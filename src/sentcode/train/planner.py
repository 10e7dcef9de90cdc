"""The planner's training task: windows of code tuples drawn from documents, and the run directory it writes.

A document is its sentences' code tuples ``codes [n, K]`` (ints), optionally with their residuals
``residual [n, d_emb]`` (e - decode(codes)); pass it as an array, a ``(codes, residual)`` tuple or a dict
with those keys. A training window is up to ``train.seq_len`` consecutive tuples of one document, starting
at a uniformly drawn sentence. A window that starts the document reads BOS first; one that starts inside
it reads the preceding tuple in BOS's place (see ``sentcode.models.sentence.planner``), so BOS always means
"first sentence of a document". Shorter windows are padded on the right and masked.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sentcode.errors import DataError
from sentcode.models.sentence.planner import (
    Planner, PlannerConfig, PlannerRunConfig, PlannerTrainConfig, load_planner_config,
)
from sentcode.train.loop import TrainTask
from sentcode.runs.info import write_run_files
from sentcode.runs.parts import PLANNER_WEIGHTS
from sentcode.train.runs import check_resume, train_and_export

__all__ = [
    "PlanBatch", "PlanBatches", "PlanDocs", "PlanEval", "PlannerRunConfig", "PlannerTrainConfig",
    "build_planner_task", "train_planner",
]

WEIGHTS = PLANNER_WEIGHTS
EVAL_BATCH = 16


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class PlanDocs:
    """Documents' code tuples (and residuals when the planner reads them), checked once."""

    def __init__(self, docs, cfg: PlannerConfig, what: str):
        if not isinstance(docs, (list, tuple)):
            raise DataError(f"{what} documents must be a list (one entry per document), got {type(docs).__name__}")
        K, E = cfg.levels, cfg.d_emb
        self.use_residual = cfg.use_residual
        self.codes: list[np.ndarray] = []
        self.residual: list[np.ndarray] | None = [] if cfg.use_residual else None
        for d, doc in enumerate(docs):
            if isinstance(doc, dict):
                codes, res = doc.get("codes"), doc.get("residual")
            elif isinstance(doc, tuple) and len(doc) == 2:
                codes, res = doc
            else:
                codes, res = doc, None
            codes = _np(codes)
            if codes.size == 0:
                codes = codes.reshape(0, K)
            if codes.ndim != 2 or codes.shape[1] != K:
                raise DataError(f"{what} document {d}: codes must have shape [sentences, {K}], got {codes.shape}")
            if not np.issubdtype(codes.dtype, np.integer):
                raise DataError(f"{what} document {d}: codes must be integers, got {codes.dtype}")
            for l, v in enumerate(cfg.codebook_sizes):
                if len(codes) and (codes[:, l].min() < 0 or codes[:, l].max() >= v):
                    raise DataError(f"{what} document {d}: level {l} codes must lie in [0, {v}), "
                                    f"got [{codes[:, l].min()}, {codes[:, l].max()}]")
            self.codes.append(codes.astype(np.int64))
            if cfg.use_residual:
                if res is None:
                    raise DataError(f"{what} document {d} has no residual, but planner.use_residual is set")
                res = _np(res).astype(np.float32)
                if res.shape != (len(codes), E):
                    raise DataError(f"{what} document {d}: residual must have shape {(len(codes), E)}, got {res.shape}")
                if not np.isfinite(res).all():
                    raise DataError(f"{what} document {d}: residual holds NaN or infinite values")
                self.residual.append(res)
        self.levels, self.d_emb, self.sizes = K, E, list(cfg.codebook_sizes)
        self.lengths = np.array([len(c) for c in self.codes], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])  # flat index of each document's first tuple
        self.total = int(self.starts[-1])
        if self.total == 0:
            raise DataError(f"the {what} documents hold no sentences")

    def sha256(self) -> str:
        h = hashlib.sha256()
        for i, c in enumerate(self.codes):
            h.update(np.int64(len(c)).tobytes() + c.tobytes())
            if self.residual is not None:
                h.update(self.residual[i].tobytes())
        return h.hexdigest()

    def info(self) -> dict:
        return {"documents": len(self.codes), "sentences": self.total, "sha256": self.sha256()}


@dataclass
class PlanBatch:
    """codes [B, S, K] (0 at padding), residual [B, S, E] | None, mask [B, S] (steps that count),
    prev_codes [B, K] (the tuple before the window; -1 where the window starts its document),
    prev_residual [B, E] | None."""

    codes: torch.Tensor
    residual: torch.Tensor | None
    mask: torch.Tensor
    prev_codes: torch.Tensor
    prev_residual: torch.Tensor | None

    def to(self, device) -> PlanBatch:
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)
        return PlanBatch(mv(self.codes), mv(self.residual), mv(self.mask), mv(self.prev_codes), mv(self.prev_residual))


def _collate(docs: PlanDocs, windows, S: int) -> PlanBatch:
    """Windows (doc, start, score_from, end) -> one batch: tuples start..end-1 are read, and those from
    score_from on count."""
    B, K, E = len(windows), docs.levels, docs.d_emb
    codes = np.zeros((B, S, K), dtype=np.int64)
    mask = np.zeros((B, S), dtype=bool)
    prev = np.full((B, K), -1, dtype=np.int64)
    res = np.zeros((B, S, E), dtype=np.float32) if docs.residual is not None else None
    prev_res = np.zeros((B, E), dtype=np.float32) if docs.residual is not None else None
    for i, (d, o, score_from, end) in enumerate(windows):
        codes[i, : end - o] = docs.codes[d][o:end]
        mask[i, score_from - o : end - o] = True
        if o > 0:
            prev[i] = docs.codes[d][o - 1]
        if res is not None:
            res[i, : end - o] = docs.residual[d][o:end]
            if o > 0:
                prev_res[i] = docs.residual[d][o - 1]
    t = lambda a: None if a is None else torch.from_numpy(a)
    return PlanBatch(t(codes), t(res), t(mask), t(prev), t(prev_res))


class PlanBatches:
    """Training windows from a counter-based RNG: local batch ``i`` of rank ``r`` draws with
    ``default_rng([seed, i * world_size + r])``, so the whole state is the step counter."""

    def __init__(self, docs: PlanDocs, seq: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if seq < 1 or batch_size < 1:
            raise ValueError(f"seq and batch_size must be positive, got {seq} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.docs, self.seq, self.batch_size = docs, seq, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0

    def windows(self, step: int) -> list[tuple[int, int, int, int]]:
        rng = np.random.default_rng([self.seed, step * self.world_size + self.rank])
        flat = rng.integers(0, self.docs.total, size=self.batch_size)  # every sentence equally likely to start
        doc = np.searchsorted(self.docs.starts, flat, side="right") - 1
        out = []
        for d, f in zip(doc.tolist(), flat.tolist()):
            o = f - int(self.docs.starts[d])
            out.append((d, o, o, min(o + self.seq, int(self.docs.lengths[d]))))
        return out

    def batch(self, step: int) -> PlanBatch:
        return _collate(self.docs, self.windows(step), self.seq)

    def next_batch(self) -> PlanBatch:
        b = self.batch(self.step)
        self.step += 1
        return b

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.step = int(state["step"])


def unigram_logp(docs: PlanDocs) -> list[np.ndarray]:
    """Per-level code log-frequencies (nats, add-one smoothed): the baseline a planner must beat."""
    out = []
    for l, v in enumerate(docs.sizes):
        counts = np.bincount(np.concatenate([c[:, l] for c in docs.codes]), minlength=v).astype(np.float64) + 1.0
        out.append(np.log(counts / counts.sum()))
    return out


def eval_windows(lengths, window: int) -> list[tuple[int, int, int, int]]:
    """Windows covering every tuple of every document exactly once as a scored target.

    Documents that fit are one window. Longer ones slide by half a window, scoring only what the previous
    window did not, so every target past the first window still has at least half a window of context.
    """
    stride = max(1, window // 2)
    out = []
    for d, n in enumerate(int(x) for x in lengths):
        o, done = 0, 0
        while done < n:
            end = min(o + window, n)
            out.append((d, o, done, end))
            done, o = end, o + stride
    return out


class PlanEval:
    """Held-out documents, scored deterministically in document order with the planner's full context."""

    def __init__(self, docs: PlanDocs, window: int, unigram: list[np.ndarray] | None = None,
                 batch_size: int = EVAL_BATCH):
        self.docs, self.window, self.batch_size = docs, window, batch_size
        self.windows = eval_windows(docs.lengths, window)
        self.unigram = unigram

    @torch.no_grad()
    def evaluate(self, model: Planner, max_tokens: int | None = None) -> dict:
        """Metrics over all documents, or the first windows holding about ``max_tokens`` sentences.

        ``exact_match`` is the share of tuples the greedy planner gets entirely right: with teacher forcing,
        every level's argmax being right is the same event as greedy sequential decoding being right.
        """
        windows = self.windows
        if max_tokens is not None:
            scored = np.cumsum([end - s for _, _, s, end in windows])
            windows = windows[: max(1, int(np.searchsorted(scored, max_tokens)) + 1)]
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        K = self.docs.levels
        nll, correct = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
        exact = se = uni = 0.0
        n = 0
        tables = None if self.unigram is None else [torch.from_numpy(t) for t in self.unigram]
        try:
            for i in range(0, len(windows), self.batch_size):
                part = windows[i : i + self.batch_size]
                b = _collate(self.docs, part, max(end - o for _, o, _, end in part))
                s = model.score(**vars(b.to(dev)))
                m = b.mask.to(dev)
                w = m.double()[..., None]  # [B, S, 1]
                nll += (s["nll"].double() * w).sum((0, 1)).cpu()
                correct += (s["correct"].double() * w).sum((0, 1)).cpu()
                exact += float((s["correct"].all(-1) & m).sum())
                n += int(m.sum())
                if "residual_se" in s:
                    se += float((s["residual_se"].double() * m).sum())
                if tables is not None:
                    codes = b.codes[b.mask]  # [n_b, K]
                    uni -= sum(float(tables[l][codes[:, l]].sum()) for l in range(K))
        finally:
            model.train(was_training)
        ln2 = math.log(2)
        out = {"plan_bits_per_sentence": float(nll.sum()) / n / ln2}
        out.update({f"level_bits_{l}": float(nll[l]) / n / ln2 for l in range(K)})
        out.update({f"level_acc_{l}": float(correct[l]) / n for l in range(K)})
        out["exact_match"] = exact / n
        if tables is not None:
            out["unigram_bits_per_sentence"] = uni / n / ln2
        if self.docs.residual is not None:
            out["residual_mse"] = se / (n * self.docs.d_emb)
        out["sentences"] = n
        return out


def build_planner_task(cfg: PlannerRunConfig, train_docs, val_docs, dist_info, device) -> TrainTask:
    """``train_docs``/``val_docs``: lists of documents (or an already checked ``PlanDocs``; ``val_docs``
    may also be a ``PlanEval``)."""
    p, t = cfg.planner, cfg.train
    train = train_docs if isinstance(train_docs, PlanDocs) else PlanDocs(train_docs, p, "training")
    if isinstance(val_docs, PlanEval):
        val = val_docs
    else:
        val_set = val_docs if isinstance(val_docs, PlanDocs) else PlanDocs(val_docs, p, "validation")
        val = PlanEval(val_set, p.max_steps, unigram_logp(train))
    model = Planner(p)
    source = PlanBatches(train, t.seq_len, t.micro_batch, seed=t.seed, rank=dist_info.rank,
                         world_size=dist_info.world_size)

    class _Batches:
        def next_batch(self):
            return source.next_batch().to(device)

        state_dict = source.state_dict
        load_state_dict = source.load_state_dict

    return TrainTask(
        model=model, batches=_Batches(),
        loss=lambda m, b: m(b.codes, b.residual, b.mask, b.prev_codes, b.prev_residual)["loss"],
        evaluate=val.evaluate,
        # "tokens" are sentence slots of the windows, padding included
        tokens_per_batch=t.micro_batch * t.seq_len,
        flops_per_token=model.flops_per_step(t.seq_len), headline="plan_bits_per_sentence",
    )


def train_planner(
    train_docs,
    val_docs,
    run_dir: str | Path,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    resume: str | None = None,
    device: str = "auto",
    progress: bool | str = True,
    stop_at: int | None = None,
    preset: str | None = None,
) -> dict:
    """Train a planner on documents' code tuples into ``run_dir``; returns the loop's summary.

    ``overrides`` are ``key.sub=value`` strings such as ``planner.codebook_sizes=[512,256,256,256]``;
    ``preset`` an optional YAML config file (defaults: ``PlannerRunConfig``'s).
    """
    run_dir = Path(run_dir)
    overrides = list(overrides or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    cfg = load_planner_config(preset, overrides)
    # Checked before anything is written: a bad input leaves no half-made run directory.
    train = PlanDocs(train_docs, cfg.planner, "training")
    val_set = PlanDocs(val_docs, cfg.planner, "validation")
    val = PlanEval(val_set, cfg.planner.max_steps, unigram_logp(train))
    resume_path = check_resume(run_dir, resume, cfg.to_dict(),
                               {"train_corpus.sha256": (train.sha256(), "other code sequences")})
    write_run_files(run_dir, cfg, train_corpus=train.info(), val_corpus=val_set.info())
    return train_and_export(run_dir, cfg, lambda info, dev: build_planner_task(cfg, train, val, info, dev), WEIGHTS,
                            resume=resume_path, device=device, progress=progress, stop_at=stop_at)
