"""The sentence encoder's contrastive training task, and the run directory it writes.

A batch is B (anchor, positive) pairs; every other pair's positive is a negative (symmetric InfoNCE).
Positives are the next sentence of the same document (objective "next") or a second noised view of the
anchor (objective "same").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sentcode.data.embeddings import sentences_sha256
from sentcode.errors import DataError
from sentcode.models.sentence.config import EncoderConfig, EncoderRunConfig, load_encoder_config
from sentcode.models.sentence.encoder import ByteSentenceEncoder, collate_bytes
from sentcode.runs.info import write_run_files
from sentcode.runs.parts import ENCODER_WEIGHTS
from sentcode.train.runs import check_resume, train_and_export
from sentcode.train.loop import TrainTask

WEIGHTS = ENCODER_WEIGHTS
EVAL_MAX_PAIRS = 4096
_VAL_STREAM = 2**31 - 1  # an RNG stream id no training step uses (steps count from 0 upwards)


def noise_bytes(data: bytes, rng: np.random.Generator, cfg: EncoderConfig) -> bytes:
    """A corrupted view for objective "same": ASCII case flips, one deleted span, dropped bytes.

    At least one byte survives a non-empty input, so no view collapses to the empty sentence.
    """
    a = np.frombuffer(data, dtype=np.uint8).copy()
    if a.size == 0:
        return data
    if cfg.case_flip:
        letter = ((a >= 65) & (a <= 90)) | ((a >= 97) & (a <= 122))
        a[letter & (rng.random(a.size) < cfg.case_flip)] ^= 0x20
    if cfg.span_delete and a.size > 1 and rng.random() < cfg.span_delete:
        length = int(rng.integers(1, min(cfg.span_max, a.size - 1), endpoint=True))
        start = int(rng.integers(0, a.size - length, endpoint=True))
        a = np.delete(a, np.s_[start : start + length])
    if cfg.byte_drop and a.size > 1:
        keep = rng.random(a.size) >= cfg.byte_drop
        if keep.any():
            a = a[keep]
    return a.tobytes()


class _Sentences:
    """Documents flattened to one list of truncated byte strings, with document ids and duplicate keys."""

    def __init__(self, docs: Sequence[Sequence[str]], max_bytes: int, what: str):
        if not isinstance(docs, (list, tuple)) or any(not isinstance(d, (list, tuple)) for d in docs):
            raise DataError(f"{what} sentences must be a list of documents, each a list of sentence strings")
        self.data: list[bytes] = []
        doc_of: list[int] = []
        for d, doc in enumerate(docs):
            for s in doc:
                if not isinstance(s, str):
                    raise DataError(f"{what} document {d} holds a {type(s).__name__}, expected sentence strings")
                self.data.append(s.encode("utf-8", "surrogateescape")[:max_bytes])
                doc_of.append(d)
        self.doc_of = np.asarray(doc_of, dtype=np.int64)
        # Equal keys = equal encoder input, so such pairs must not count as each other's negatives.
        ids: dict[bytes, int] = {}
        self.key = np.asarray([ids.setdefault(b, len(ids)) for b in self.data], dtype=np.int64)
        self.mean_len = float(np.mean([1 + len(b) for b in self.data])) if self.data else 1.0

    def anchors(self, objective: str) -> np.ndarray:
        """Indices that can start a pair: those followed by a sentence of the same document, or all."""
        if objective == "next":
            return np.flatnonzero(self.doc_of[:-1] == self.doc_of[1:])
        return np.arange(len(self.data))


def _views(corpus: _Sentences, idx: np.ndarray, cfg: EncoderConfig, rng: np.random.Generator):
    """(anchor bytes, positive bytes, anchor keys, positive keys) of the pairs starting at ``idx``."""
    if cfg.objective == "next":
        return ([corpus.data[i] for i in idx], [corpus.data[i + 1] for i in idx],
                corpus.key[idx], corpus.key[idx + 1])
    anchors = [noise_bytes(corpus.data[i], rng, cfg) for i in idx]
    positives = [noise_bytes(corpus.data[i], rng, cfg) for i in idx]
    return anchors, positives, corpus.key[idx], corpus.key[idx]


def _pair_tensors(anchors, positives, a_key, p_key, max_bytes):
    """One forward's input for both sides, ``(ids [2B, T], mask [2B, T], same [B, B])``.

    ``same[i, j]`` (i != j) marks pairs whose anchors or positives are identical: pair j's positive is then
    a correct answer for anchor i too, not a negative.
    """
    ids, mask = collate_bytes(list(anchors) + list(positives), max_bytes)
    a_key, p_key = torch.as_tensor(a_key), torch.as_tensor(p_key)
    same = (a_key[:, None] == a_key[None, :]) | (p_key[:, None] == p_key[None, :])
    same.fill_diagonal_(False)
    return ids, mask, same


class PairBatches:
    """Contrastive batches drawn from a counter-based RNG, like ``sentcode.data.WindowLoader``.

    Local batch ``i`` of rank ``r`` uses ``default_rng([seed, i * world_size + r])`` for both the anchor
    draw and the noise, so the whole state is the step counter.
    """

    def __init__(self, docs: Sequence[Sequence[str]], cfg: EncoderConfig, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.corpus = docs if isinstance(docs, _Sentences) else _Sentences(docs, cfg.max_bytes, "training")
        self.cfg = cfg
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.step = 0
        self._anchors = self.corpus.anchors(cfg.objective)
        if len(self._anchors) == 0:
            need = "a document of at least two sentences" if cfg.objective == "next" else "at least one sentence"
            raise DataError(f"the training sentences hold no pairs for objective {cfg.objective!r}: need {need}")

    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step * self.world_size + self.rank])

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return self._anchors[rng.integers(0, len(self._anchors), size=self.batch_size)]

    def pair_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat sentence indices of batch ``step``'s anchors and positives."""
        idx = self._draw(self._rng(step))
        return idx, (idx + 1 if self.cfg.objective == "next" else idx)

    def pairs(self, step: int):
        """(anchor bytes, positive bytes, anchor keys, positive keys) of batch ``step``."""
        rng = self._rng(step)
        return _views(self.corpus, self._draw(rng), self.cfg, rng)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = _pair_tensors(*self.pairs(self.step), self.cfg.max_bytes)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step; rank stays this source's own, as in ``WindowLoader``."""
        self.seed = int(state["seed"])
        self.step = int(state["step"])


def info_nce(za: torch.Tensor, zp: torch.Tensor, tau: float, same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of unit vectors [B, d]; pairs marked in ``same`` are left out as negatives."""
    logits = za.float() @ zp.float().T / tau
    if same is not None:
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(za), device=za.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def encoder_loss(model, batch, tau: float) -> torch.Tensor:
    ids, mask, same = batch
    z = model(ids, mask)  # anchors and positives in one forward: DDP expects one forward per backward
    b = len(same)
    return info_nce(z[:b], z[b:], tau, same)


class ValPairs:
    """A fixed set of held-out pairs, shuffled once and cut into groups of ``group`` pairs.

    Accuracy is top-1 retrieval of each anchor's positive among its group's positives (chance 1/group),
    which matches what the training loss asks of a batch.
    """

    def __init__(self, docs: Sequence[Sequence[str]], cfg: EncoderConfig, group: int, seed: int,
                 max_pairs: int = EVAL_MAX_PAIRS):
        corpus = _Sentences(docs, cfg.max_bytes, "validation")
        rng = np.random.default_rng([seed, _VAL_STREAM])
        idx = corpus.anchors(cfg.objective)
        if len(idx) < 2:
            raise DataError(f"the validation sentences hold {len(idx)} pair(s) for objective {cfg.objective!r}; "
                            "at least 2 are needed to measure retrieval")
        idx = rng.permutation(idx)[:max_pairs]
        self.anchors, self.positives, self.a_key, self.p_key = _views(corpus, idx, cfg, rng)
        self.group = min(group, len(idx))
        self.n_groups = len(idx) // self.group
        self.bytes_per_group = 2 * self.group * corpus.mean_len
        self.tau = cfg.tau

    @torch.no_grad()
    def evaluate(self, model: ByteSentenceEncoder, max_tokens: int | None = None) -> dict:
        groups = self.n_groups
        if max_tokens is not None:
            groups = max(1, min(groups, int(max_tokens // self.bytes_per_group)))
        n = groups * self.group
        za = torch.from_numpy(model.encode_bytes(self.anchors[:n], batch_size=2 * self.group))
        zp = torch.from_numpy(model.encode_bytes(self.positives[:n], batch_size=2 * self.group))
        loss, correct = 0.0, 0
        for g in range(groups):
            s = slice(g * self.group, (g + 1) * self.group)
            a_key, p_key = torch.as_tensor(self.a_key[s]), torch.as_tensor(self.p_key[s])
            same = (a_key[:, None] == a_key[None, :]) | (p_key[:, None] == p_key[None, :])
            same.fill_diagonal_(False)
            loss += float(info_nce(za[s], zp[s], self.tau, same))
            sims = (za[s] @ zp[s].T).masked_fill(same, float("-inf"))
            correct += int((sims.argmax(dim=1) == torch.arange(self.group)).sum())
        return {"loss": loss / groups, "acc": correct / n, "chance": 1.0 / self.group, "pairs": n}


def build_encoder_task(cfg: EncoderRunConfig, train_docs, val: ValPairs | Sequence[Sequence[str]],
                       dist_info, device) -> TrainTask:
    """``train_docs``: documents' sentences (or an already flattened ``_Sentences``); ``val``: the held-out
    documents or their ``ValPairs``."""
    enc, t = cfg.encoder, cfg.train
    model = ByteSentenceEncoder(enc)
    source = PairBatches(train_docs, enc, t.micro_batch, seed=t.seed, rank=dist_info.rank,
                         world_size=dist_info.world_size)
    if not isinstance(val, ValPairs):
        val = ValPairs(val, enc, t.micro_batch, seed=t.seed)

    class _Batches:
        def next_batch(self):
            return tuple(x.to(device) for x in source.next_batch())

        state_dict = source.state_dict
        load_state_dict = source.load_state_dict

    mean_len = source.corpus.mean_len
    return TrainTask(
        model=model, batches=_Batches(), loss=lambda m, b: encoder_loss(m, b, enc.tau),
        evaluate=val.evaluate,
        # "tokens" are input bytes (BOS included), estimated from the corpus mean: batches vary in length
        tokens_per_batch=max(1, int(round(2 * t.micro_batch * mean_len))),
        flops_per_token=model.flops_per_byte(mean_len), headline="acc",
    )


def _docs_sha256(docs) -> str:
    h = hashlib.sha256()
    for doc in docs:
        h.update(sentences_sha256(doc).encode())
    return h.hexdigest()


def _corpus_info(docs) -> dict:
    return {"documents": len(docs), "sentences": sum(len(d) for d in docs), "sha256": _docs_sha256(docs)}


def write_encoder_run_header(run_dir: Path, cfg: EncoderRunConfig, train_docs, val_docs) -> None:
    write_run_files(run_dir, cfg, train_corpus=_corpus_info(train_docs), val_corpus=_corpus_info(val_docs))


def train_encoder(
    sentences_train: Sequence[Sequence[str]],
    sentences_val: Sequence[Sequence[str]],
    run_dir: str | Path,
    preset: str | None = None,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    resume: str | None = None,
    device: str = "auto",
    progress: bool | str = True,
    stop_at: int | None = None,
) -> dict:
    """Train a byte sentence encoder on documents' sentences into ``run_dir``; returns the loop's summary.

    ``preset`` is an optional YAML config file (defaults: ``EncoderRunConfig``'s); ``overrides`` are
    ``key.sub=value`` strings such as ``encoder.objective=same``.
    """
    run_dir = Path(run_dir)
    overrides = list(overrides or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    cfg = load_encoder_config(preset, overrides)
    # Built (and so checked) before anything is written: a bad input leaves no half-made run directory.
    train_corpus = _Sentences(sentences_train, cfg.encoder.max_bytes, "training")
    PairBatches(train_corpus, cfg.encoder, cfg.train.micro_batch)
    val = ValPairs(sentences_val, cfg.encoder, cfg.train.micro_batch, seed=cfg.train.seed)
    resume_path = check_resume(run_dir, resume, cfg.to_dict(),
                               {"train_corpus.sha256": (_docs_sha256(sentences_train), "other sentences")})
    write_encoder_run_header(run_dir, cfg, sentences_train, sentences_val)
    return train_and_export(run_dir, cfg, lambda info, dev: build_encoder_task(cfg, train_corpus, val, info, dev), WEIGHTS,
                            resume=resume_path, device=device, progress=progress, stop_at=stop_at)
