"""The renderer's training task: sentences with their code tuples and preceding text, through the shared loop.

Input is a list of documents, each a ``RenderDoc`` (or a mapping with its field names): the sentences, their
true code tuples and optionally residuals, and optionally the planner's predicted tuples for the same
sentences. A sentence's context is the preceding sentences of its document joined by single spaces, cut to
the last ``context_bytes`` bytes (the first sentence has none).

Training batches corrupt the codes the renderer reads, so that it learns to tolerate what inference will feed
it: with probability ``predicted_mix`` a sentence reads the predicted tuple (and residual) instead of the
true one, then each level is replaced by a uniformly random code with probability ``code_noise``. Evaluation
always reads the true codes, uncorrupted.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sentcode.data.embeddings import sentences_sha256
from sentcode.errors import ConfigError, DataError
from sentcode.models.sentence.renderer import (
    ARRenderer, RenderBatch, RendererConfig, RendererRunConfig, collate_render, load_renderer_config, tail,
)
from sentcode.train.loop import TrainTask
from sentcode.runs.info import write_run_files
from sentcode.runs.parts import RENDERER_WEIGHTS
from sentcode.train.runs import check_resume, train_and_export

__all__ = [
    "RenderDoc", "RenderBatches", "ValRender", "RendererRunConfig", "build_renderer_task", "train_renderer",
]

WEIGHTS = RENDERER_WEIGHTS
_FIELDS = ("sentences", "codes", "residual", "predicted_codes", "predicted_residual")


@dataclass
class RenderDoc:
    """One document: sentences [n], codes [n, K] (None for a no-code renderer), residual [n, d_emb],
    predicted_codes [n, K] and predicted_residual [n, d_emb] (the planner's, for ``predicted_mix``)."""

    sentences: Sequence[str]
    codes: np.ndarray | None = None
    residual: np.ndarray | None = None
    predicted_codes: np.ndarray | None = None
    predicted_residual: np.ndarray | None = None


def _as_doc(doc, d: int, what: str) -> RenderDoc:
    if isinstance(doc, RenderDoc):
        return doc
    if isinstance(doc, Mapping):
        unknown = sorted(set(doc) - set(_FIELDS))
        if unknown or "sentences" not in doc:
            raise DataError(f"{what} document {d} must have 'sentences' and optionally {', '.join(_FIELDS[1:])}"
                            + (f" (unknown key {unknown[0]!r})" if unknown else ""))
        return RenderDoc(**doc)
    raise DataError(f"{what} document {d} is a {type(doc).__name__}, expected a RenderDoc or a mapping")


def contexts_of(sentences: Sequence[bytes], n: int) -> list[bytes]:
    """Each sentence's preceding text (earlier sentences joined by a space), its last ``n`` bytes."""
    out, ctx = [], b""
    for i, s in enumerate(sentences):
        out.append(ctx)
        ctx = tail(ctx + b" " + s if i else s, n)  # the tail of a tail plus more text is the tail of the whole
    return out


def check_array(x, shape, dtype, what, required=False):
    """A per-document array of a training corpus as ``dtype``: None when absent (an error when ``required``),
    a one-line DataError for a wrong shape or non-integer codes. Shared by the AR and NAR renderers' corpora."""
    if x is None:
        if required:
            raise DataError(f"{what} are missing")
        return None
    a = np.asarray(x)
    if a.shape != shape:
        raise DataError(f"{what} must have shape {shape}, got {a.shape}")
    if dtype is np.int64 and a.size and not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{what} must be integers, got {a.dtype}")
    return a.astype(dtype)


class _Examples:
    """Documents flattened to per-sentence arrays, checked against the renderer's configuration."""

    def __init__(self, docs, cfg: RendererConfig, what: str):
        if not isinstance(docs, (list, tuple)):
            raise DataError(f"{what} documents must be a list of RenderDoc")
        K, E = cfg.levels, cfg.d_emb
        self.sentences: list[bytes] = []
        self.contexts: list[bytes] = []
        codes, res, pcodes, pres, has_pred, doc_of = [], [], [], [], [], []
        self.truncated = 0
        for d, raw in enumerate(docs):
            doc = _as_doc(raw, d, what)
            if isinstance(doc.sentences, str) or any(not isinstance(s, str) for s in doc.sentences):
                raise DataError(f"{what} document {d}: sentences must be a list of strings")
            full = [s.encode("utf-8", "surrogateescape") for s in doc.sentences]
            n = len(full)
            self.contexts += contexts_of(full, cfg.context_bytes)
            self.truncated += sum(len(b) > cfg.max_sentence_bytes for b in full)
            self.sentences += [b[: cfg.max_sentence_bytes] for b in full]
            doc_of += [d] * n
            c = check_array(doc.codes, (n, K), np.int64, f"{what} document {d} codes", required=cfg.use_codes)
            codes.append(c if c is not None else np.zeros((n, K), np.int64))
            r = check_array(doc.residual, (n, E), np.float32, f"{what} document {d} residual", required=cfg.use_residual)
            res.append(r if r is not None else np.zeros((n, E), np.float32))
            p = check_array(doc.predicted_codes, (n, K), np.int64, f"{what} document {d} predicted_codes")
            pcodes.append(p if p is not None else codes[-1])
            has_pred.append(np.full(n, p is not None))
            pr = check_array(doc.predicted_residual, (n, E), np.float32, f"{what} document {d} predicted_residual")
            pres.append(pr if pr is not None else res[-1])
        cat = lambda xs, shape, dt: np.concatenate(xs) if xs else np.zeros(shape, dt)
        self.codes = cat(codes, (0, K), np.int64)  # [N, K]
        self.residual = cat(res, (0, E), np.float32)  # [N, d_emb]
        self.pred_codes = cat(pcodes, (0, K), np.int64)  # [N, K]
        self.pred_residual = cat(pres, (0, E), np.float32)  # [N, d_emb]
        self.has_pred = cat(has_pred, (0,), bool)  # [N]
        self.doc_of = np.asarray(doc_of, dtype=np.int64)
        if cfg.use_codes:
            for name, arr in (("codes", self.codes), ("predicted_codes", self.pred_codes)):
                for l, v in enumerate(cfg.codebook_sizes):
                    if len(arr) and (arr[:, l].min() < 0 or arr[:, l].max() >= v):
                        raise DataError(f"{what} {name} of level {l} must lie in [0, {v}) (renderer.codebook_sizes)")
        self.cfg = cfg
        # Mean input length (prefix, SEP, context, BOS, sentence, EOS): the "tokens" of a batch row.
        self.mean_len = (float(np.mean([len(c) + len(s) for c, s in zip(self.contexts, self.sentences)]))
                         + cfg.prefix_len + 3) if self.sentences else 1.0

    def __len__(self) -> int:
        return len(self.sentences)

    def residuals(self, idx, predicted=None):
        if not self.cfg.use_residual:
            return None
        r = self.residual[idx].copy()
        if predicted is not None:
            r[predicted] = self.pred_residual[idx][predicted]
        return r


class RenderBatches:
    """Training batches from a counter-based RNG: local batch ``i`` of rank ``r`` draws its sentences and its
    code corruption from ``default_rng([seed, i * world_size + r])``, so the whole state is the step."""

    def __init__(self, docs, cfg: RendererConfig, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.data = docs if isinstance(docs, _Examples) else _Examples(docs, cfg, "training")
        if len(self.data) == 0:
            raise DataError("the training documents hold no sentences")
        self.cfg = cfg
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.step = 0

    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step * self.world_size + self.rank])

    def examples(self, step: int):
        """Batch ``step``'s (codes [B, K], residual [B, d_emb] or None, contexts, sentences), corrupted."""
        rng = self._rng(step)
        cfg, data = self.cfg, self.data
        idx = rng.integers(0, len(data), size=self.batch_size)  # [B]
        codes = data.codes[idx].copy()  # [B, K]
        predicted = None
        if cfg.use_codes and cfg.predicted_mix > 0:
            predicted = data.has_pred[idx] & (rng.random(len(idx)) < cfg.predicted_mix)  # [B]
            codes[predicted] = data.pred_codes[idx][predicted]
        if cfg.use_codes and cfg.code_noise > 0:
            for l, v in enumerate(cfg.codebook_sizes):
                flip = rng.random(len(idx)) < cfg.code_noise  # [B]
                codes[flip, l] = rng.integers(0, v, size=int(flip.sum()))
        return (codes, data.residuals(idx, predicted), [data.contexts[i] for i in idx],
                [data.sentences[i] for i in idx])

    def next_batch(self) -> RenderBatch:
        batch = collate_render(self.cfg, *self.examples(self.step))
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step; rank stays this source's own, as in ``WindowLoader``."""
        self.seed = int(state["seed"])
        self.step = int(state["step"])


class ValRender:
    """Every held-out sentence, scored with its true codes: render bits per sentence byte.

    Bits include each sentence's EOS, which adds no bytes: the sum is the sentence stream's render code
    length given the codes. ``max_tokens`` (periodic evaluations) keeps the first sentences, in document
    order, up to that many bytes; ``None`` scores them all. Predicted tuples, where documents have them,
    are scored as well (``predicted_render_bits_per_byte``): the quality inference will actually see.
    """

    def __init__(self, docs, cfg: RendererConfig, batch_size: int):
        self.data = docs if isinstance(docs, _Examples) else _Examples(docs, cfg, "validation")
        if len(self.data) == 0:
            raise DataError("the validation documents hold no sentences")
        self.cfg, self.batch_size = cfg, batch_size
        self.bytes = np.asarray([len(s) for s in self.data.sentences], dtype=np.int64)

    def _nats(self, model: ARRenderer, idx: np.ndarray, predicted: bool) -> float:
        data = self.data
        # Similar lengths together waste less padding; padding does not change any score.
        order = idx[np.argsort([len(data.contexts[i]) + len(data.sentences[i]) for i in idx], kind="stable")]
        total = 0.0
        for s in range(0, len(order), self.batch_size):
            part = order[s : s + self.batch_size]
            codes = (data.pred_codes if predicted else data.codes)[part]
            res = data.residuals(part, np.ones(len(part), bool) if predicted else None)
            lp = model.log_prob(codes, res, [data.contexts[i] for i in part], [data.sentences[i] for i in part])
            total -= float(lp.double().sum())
        return total

    @torch.no_grad()
    def evaluate(self, model: ARRenderer, max_tokens: int | None = None) -> dict:
        n = len(self.data)
        if max_tokens is not None:
            n = max(1, int(np.searchsorted(np.cumsum(self.bytes), max_tokens, side="right")))
        idx = np.arange(n)
        was_training = model.training
        model.eval()
        try:
            nats = self._nats(model, idx, predicted=False)
            n_bytes = int(self.bytes[:n].sum())
            out = {
                "render_bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
                "render_bits_per_sentence": nats / math.log(2) / n,
                "sentences": n, "bytes": n_bytes, "truncated": int(self.data.truncated),
            }
            pred = idx[self.data.has_pred[:n]]
            if self.cfg.use_codes and len(pred):
                p_nats = self._nats(model, pred, predicted=True)
                out["predicted_render_bits_per_byte"] = p_nats / math.log(2) / max(int(self.bytes[pred].sum()), 1)
        finally:
            model.train(was_training)
        return out


def build_renderer_task(cfg: RendererRunConfig, train_docs, val, dist_info, device, codebooks=None) -> TrainTask:
    """``train_docs``: RenderDocs (or their flattened ``_Examples``); ``val``: held-out RenderDocs or a ``ValRender``;
    ``codebooks``: the RVQ centroids per level, for ``renderer.code_init: centroids``."""
    rcfg, t = cfg.renderer, cfg.train
    model = ARRenderer(rcfg)
    if rcfg.use_codes and rcfg.code_init == "centroids":
        model.init_code_embeddings(codebooks, seed=t.seed)
    source = RenderBatches(train_docs, rcfg, t.micro_batch, seed=t.seed, rank=dist_info.rank,
                           world_size=dist_info.world_size)
    if not isinstance(val, ValRender):
        val = ValRender(val, rcfg, t.micro_batch)

    class _Batches:
        def next_batch(self):
            return source.next_batch().to(device)

        state_dict = source.state_dict
        load_state_dict = source.load_state_dict

    mean_len = source.data.mean_len
    return TrainTask(
        model=model, batches=_Batches(), loss=lambda m, b: m(b), evaluate=val.evaluate,
        # "tokens" are input positions, estimated from the corpus mean: batches vary in length
        tokens_per_batch=max(1, int(round(t.micro_batch * mean_len))),
        flops_per_token=model.flops_per_token(int(mean_len)), headline="render_bits_per_byte",
    )


def _docs_sha256(docs) -> str:
    h = hashlib.sha256()
    for d, raw in enumerate(docs):
        doc = _as_doc(raw, d, "training")
        h.update(sentences_sha256(doc.sentences).encode())
        for name in _FIELDS[1:]:
            a = getattr(doc, name)
            h.update(b"-" if a is None else np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()


def _corpus_info(docs) -> dict:
    n = sum(len(_as_doc(doc, d, "training").sentences) for d, doc in enumerate(docs))
    return {"documents": len(docs), "sentences": n, "sha256": _docs_sha256(docs)}


def train_renderer(
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
    codebooks=None,
) -> dict:
    """Train a renderer on ``RenderDoc`` documents into ``run_dir``; returns the loop's summary.

    ``codebooks`` (the RVQ centroids, [V_l, dim] per level) are required with ``renderer.code_init: centroids``.

    ``overrides`` are ``key.sub=value`` strings such as ``renderer.use_codes=false``; ``preset`` an optional
    YAML config file (defaults: ``RendererRunConfig``'s).
    """
    run_dir = Path(run_dir)
    overrides = list(overrides or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    cfg = load_renderer_config(preset, overrides)
    if cfg.renderer.use_codes and cfg.renderer.code_init == "centroids":
        if codebooks is None:
            raise ConfigError("renderer.code_init=centroids needs the RVQ codebooks (train it through the sentence "
                              "pipeline) or renderer.code_init=random")
        codebooks = [torch.as_tensor(c, dtype=torch.float32) for c in codebooks]
        if len(codebooks) != cfg.renderer.levels or any(
                c.dim() != 2 or c.shape[0] != v for c, v in zip(codebooks, cfg.renderer.codebook_sizes)):
            raise ConfigError("the RVQ codebooks do not match renderer.levels / renderer.codebook_sizes")
    # Built (and so checked) before anything is written: a bad input leaves no half-made run directory.
    train = _Examples(train_docs, cfg.renderer, "training")
    RenderBatches(train, cfg.renderer, cfg.train.micro_batch)
    val = ValRender(val_docs, cfg.renderer, cfg.train.micro_batch)
    resume_path = check_resume(run_dir, resume, cfg.to_dict(),
                               {"train_corpus.sha256": (_docs_sha256(train_docs), "other documents")})
    write_run_files(run_dir, cfg, train_corpus=_corpus_info(train_docs), val_corpus=_corpus_info(val_docs))
    return train_and_export(run_dir, cfg, lambda info, dev: build_renderer_task(cfg, train, val, info, dev, codebooks), WEIGHTS,
                            resume=resume_path, device=device, progress=progress, stop_at=stop_at)
