"""Training the NAR renderer by a sentence-level reward only, through the shared loop.

There is no token-level loss and no sentence bank: each target sentence's code tuple is rendered
``n_samples`` times and every rollout is scored as a whole,

    reward = cos(R(sample), R(target))                      R: a frozen ByteSentenceEncoder, the reward encoder
           - length_weight * |len - target_len| / max_bytes  a fair term: zero at the right length
           - repetition_weight * repetition(sample)           zero on natural text, up to 1 on degenerate loops
           - invalid_penalty * [sample is not valid UTF-8]

and the renderer follows the REINFORCE gradient of the clipped advantage (reward minus the mean of the
target's other rollouts, or minus its greedy decode's reward) plus a small entropy bonus.

Credit assignment: REINFORCE over up to 256^128 strings tells the model only that a whole string was better
or worse. With ``straight_through`` (on by default) the rollout's one-hot bytes also carry the softmax's
gradient through the frozen reward encoder (the straight-through estimator), so each byte position learns
how the same sentence-level cosine moves with it. The reward's value is unchanged (the encoder still reads
the sampled bytes); only the cosine term gets this path, the others stay REINFORCE-only.

Both paths optimise against the reward encoder, which invites adversarial strings it likes. So evaluation
scores greedy renders with a DIFFERENT judge (the planner's embedding encoder, or MiniLM), and reports the
reward encoder's cosine beside the judge's: a growing gap between them is reward hacking. The reward
encoder is best one trained for surface similarity (``encoder.objective=same``), the judge the encoder the
codes came from.

Input documents are ``RenderDoc``-like: objects or mappings with ``sentences``, ``codes`` [n, K] and, for
``use_residual``, ``residual`` [n, d_emb] (``predicted_*`` fields are accepted and ignored). A sentence's
context is the preceding sentences of its document joined by spaces.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sentcode.data.embeddings import sentences_sha256
from sentcode.errors import ConfigError, DataError
from sentcode.nn.sampling import make_generator
from sentcode.models.sentence.encoder import BOS_ID, PAD_ID, ByteSentenceEncoder
from sentcode.models.sentence.renderer_nar import (
    NARRenderer, NARRendererConfig, NARRunConfig, NARTrainConfig, collate_context, load_nar_config,
)
from sentcode.nn import rope_cos_sin
from sentcode.train.loop import TrainTask
from sentcode.train.renderer import check_array
from sentcode.runs.info import write_run_files
from sentcode.runs.parts import NAR_WEIGHTS
from sentcode.train.runs import check_resume, train_and_export

__all__ = [
    "NARRunConfig", "NARBatches", "SentenceReward", "ValNAR", "repetition_score", "build_nar_task",
    "train_nar_renderer",
]

WEIGHTS = NAR_WEIGHTS
_FIELDS = ("sentences", "codes", "residual")
_IGNORED = ("predicted_codes", "predicted_residual")  # the AR renderer's; harmless here

# Natural sentences (State of the Union, up to 128 bytes) repeat at most ~31% of their 4-grams, 18% at the
# 99th percentile; only the share above this allowance counts as degenerate.
GRAM = 4
GRAM_ALLOWANCE = 0.3
MAX_RUN = 3  # a byte repeated more often than this in a row is a loop, not a word


def repetition_score(s: bytes) -> float:
    """0 for natural text, up to 1 for degenerate loops ("aaaa...", "the the the the").

    The share of repeated 4-grams above ``GRAM_ALLOWANCE`` (rescaled to [0, 1]) plus the share of bytes
    that extend a run of one byte past ``MAX_RUN``, capped at 1.
    """
    n = len(s) - GRAM + 1
    gram = 0.0
    if n > 0:
        repeated = 1 - len({s[i : i + GRAM] for i in range(n)}) / n
        gram = max(0.0, repeated - GRAM_ALLOWANCE) / (1 - GRAM_ALLOWANCE)
    extra, run, prev = 0, 0, None
    for b in s:
        run = run + 1 if b == prev else 1
        prev = b
        extra += run > MAX_RUN
    return min(1.0, gram + extra / max(len(s), 1))


def is_utf8(s: bytes) -> bool:
    try:
        s.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---- the reward ----------------------------------------------------------------------------------------------


def _encoder_input(enc: ByteSentenceEncoder, ids: torch.Tensor, lengths: torch.Tensor):
    """BOS + bytes, cut to the encoder's max_bytes: (ids [N, 1+T] with PAD past each length, mask, lengths)."""
    T = min(ids.shape[1], enc.cfg.max_bytes)
    lengths = lengths.clamp(max=T)
    mask = torch.arange(1 + T, device=ids.device)[None, :] <= lengths[:, None]  # [N, 1+T]
    full = torch.cat([torch.full_like(ids[:, :1], BOS_ID), ids[:, :T]], dim=1)
    return torch.where(mask, full, torch.full_like(full, PAD_ID)), mask, T


def encode_onehot(enc: ByteSentenceEncoder, ids: torch.Tensor, lengths: torch.Tensor,
                  onehot: torch.Tensor | None = None) -> torch.Tensor:
    """The reward encoder's unit embeddings [N, d_emb] of byte rows ids [N, T] with ``lengths`` [N].

    With ``onehot`` [N, T, 256] (equal in value to the one-hot of ``ids``, e.g. straight-through), byte
    embeddings are ``onehot @ table`` so gradients reach whatever ``onehot`` was made from. This is
    ``ByteSentenceEncoder.forward`` with that one change to its input lookup.
    """
    full, mask, T = _encoder_input(enc, ids, lengths)
    x = enc.embed(full)  # [N, 1+T, d]
    if onehot is not None:
        soft = onehot[:, :T].to(enc.embed.weight.dtype) @ enc.embed.weight[:256]  # [N, T, d]
        x = torch.cat([x[:, :1], torch.where(mask[:, 1:, None], soft, x[:, 1:])], dim=1)
    positions = torch.arange(1 + T, device=ids.device)
    rope = rope_cos_sin(positions, enc.cfg.d_model // enc.cfg.n_head, enc.cfg.rope_theta)
    for block in enc.blocks:
        x = block(x, positions, rope, mask)
    x = enc.norm(x)
    w = mask.to(x.dtype).unsqueeze(-1)
    pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)
    return F.normalize(enc.proj(pooled).float(), dim=-1)


def _bytes_to_ids(sentences: Sequence[bytes], device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max([1, *(len(s) for s in sentences)])
    ids = np.zeros((len(sentences), T), dtype=np.int64)
    for i, s in enumerate(sentences):
        ids[i, : len(s)] = np.frombuffer(s, dtype=np.uint8)
    return torch.from_numpy(ids).to(device), torch.tensor([len(s) for s in sentences], dtype=torch.long, device=device)


class SentenceReward:
    """The sentence-level reward of rendered byte strings against their targets (see the module docstring).

    ``encoder`` is deep-copied and frozen: training never changes the caller's encoder.
    """

    def __init__(self, encoder: ByteSentenceEncoder, max_bytes: int, length_weight: float = 1.0,
                 repetition_weight: float = 1.0, invalid_penalty: float = 0.5, device=None):
        if not isinstance(encoder, ByteSentenceEncoder):
            raise ConfigError(f"the reward encoder must be a ByteSentenceEncoder, got {type(encoder).__name__}")
        self.encoder = copy.deepcopy(encoder).to(device or encoder.device).eval().requires_grad_(False)
        self.max_bytes = max_bytes
        self.length_weight, self.repetition_weight, self.invalid_penalty = length_weight, repetition_weight, invalid_penalty

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @torch.no_grad()
    def embed(self, sentences: Sequence[bytes]) -> torch.Tensor:
        ids, lengths = _bytes_to_ids(sentences, self.device)
        return encode_onehot(self.encoder, ids, lengths)

    def score(self, samples: Sequence[bytes], targets: Sequence[bytes], target_emb: torch.Tensor | None = None,
              cosine: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample float32 tensors [N]: reward and its parts (cosine, length, repetition, invalid).

        ``target_emb`` [N, d] saves re-embedding targets; ``cosine`` [N] (already computed, e.g. with a
        straight-through graph) is used as is, detached.
        """
        dev = self.device
        if cosine is None:
            if target_emb is None:
                target_emb = self.embed(targets)
            cosine = (self.embed(samples) * target_emb).sum(-1)
        cosine = cosine.detach().float().to(dev)
        target_len = torch.tensor([min(len(t), self.max_bytes) for t in targets], dtype=torch.float32, device=dev)
        length = -(torch.tensor([len(s) for s in samples], dtype=torch.float32, device=dev) - target_len).abs() / self.max_bytes
        rep = torch.tensor([repetition_score(s) for s in samples], dtype=torch.float32, device=dev)
        invalid = torch.tensor([not is_utf8(s) for s in samples], dtype=torch.float32, device=dev)
        reward = cosine + self.length_weight * length - self.repetition_weight * rep - self.invalid_penalty * invalid
        return {"reward": reward, "cosine": cosine, "length": length, "repetition": rep, "invalid": invalid}


def check_encoders(reward_encoder, judge) -> None:
    """The judge must be another model than the reward encoder: one that is the same object, or a
    ByteSentenceEncoder with the same weights, would grade the renderer by what it was optimised against."""
    if judge is None:
        raise ConfigError("a judge encoder is needed for evaluation (the planner's embedding encoder or MiniLM)")
    if judge is reward_encoder:
        raise ConfigError("the judge encoder must differ from the reward encoder: a renderer is not evaluated by its own reward")
    if isinstance(judge, ByteSentenceEncoder) and isinstance(reward_encoder, ByteSentenceEncoder):
        a, b = judge.state_dict(), reward_encoder.state_dict()
        if a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].cpu()) for k in a):
            raise ConfigError("the judge encoder has the same weights as the reward encoder: pass a different judge")
    if not callable(getattr(judge, "encode", None)) and not callable(getattr(judge, "encode_bytes", None)):
        raise ConfigError(f"the judge ({type(judge).__name__}) has neither encode(texts) nor encode_bytes(bytes)")


def judge_embed(judge, sentences: Sequence[bytes]) -> np.ndarray:
    """Unit embeddings [N, d] float32 by the judge: bytes when it reads bytes, else text (bad UTF-8 replaced)."""
    if callable(getattr(judge, "encode_bytes", None)):
        out = judge.encode_bytes(list(sentences))
    else:
        out = judge.encode([s.decode("utf-8", "replace") for s in sentences])
    out = np.asarray(out, dtype=np.float32)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


# ---- data ----------------------------------------------------------------------------------------------------


def _field(doc, name):
    return doc.get(name) if isinstance(doc, Mapping) else getattr(doc, name, None)


class _Examples:
    """Documents flattened to per-sentence arrays: sentences (full), codes [N, K], residual, contexts."""

    def __init__(self, docs, cfg: NARRendererConfig, what: str):
        if not isinstance(docs, (list, tuple)):
            raise DataError(f"{what} documents must be a list of RenderDoc-like documents")
        K, E = cfg.levels, cfg.d_emb
        self.sentences: list[bytes] = []
        self.contexts: list[bytes] = []
        codes, res = [], []
        for d, doc in enumerate(docs):
            if isinstance(doc, Mapping):
                unknown = sorted(set(doc) - set(_FIELDS) - set(_IGNORED))
                if unknown or "sentences" not in doc:
                    raise DataError(f"{what} document {d} must have 'sentences' and 'codes' (optionally 'residual')"
                                    + (f" (unknown key {unknown[0]!r})" if unknown else ""))
            sents = _field(doc, "sentences")
            if sents is None or isinstance(sents, str) or any(not isinstance(s, str) for s in sents):
                raise DataError(f"{what} document {d}: sentences must be a list of strings")
            full = [s.encode("utf-8", "surrogateescape") for s in sents]
            n = len(full)
            ctx = b""
            for i, s in enumerate(full):
                self.contexts.append(ctx[-cfg.context_bytes:] if cfg.context_bytes else b"")
                ctx = (ctx + b" " + s if i else s)[-max(cfg.context_bytes, 1):]
            self.sentences += full
            codes.append(check_array(_field(doc, "codes"), (n, K), np.int64, f"{what} document {d} codes", True))
            r = check_array(_field(doc, "residual"), (n, E), np.float32, f"{what} document {d} residual", cfg.use_residual)
            res.append(r if r is not None else np.zeros((n, E), np.float32))
        self.codes = np.concatenate(codes) if codes else np.zeros((0, K), np.int64)  # [N, K]
        self.residual = np.concatenate(res) if res else np.zeros((0, E), np.float32)  # [N, d_emb]
        for l, v in enumerate(cfg.codebook_sizes):
            if len(self.codes) and (self.codes[:, l].min() < 0 or self.codes[:, l].max() >= v):
                raise DataError(f"{what} codes of level {l} must lie in [0, {v}) (renderer.codebook_sizes)")
        self.cfg = cfg
        self.too_long = sum(len(s) > cfg.max_bytes for s in self.sentences)
        self.mean_len = float(np.mean([min(len(s), cfg.max_bytes) + 1 for s in self.sentences])) if self.sentences else 1.0

    def __len__(self) -> int:
        return len(self.sentences)

    def batch(self, idx: np.ndarray, device) -> dict:
        """Model inputs and targets of sentences ``idx``: codes [B, K], residual [B, d_emb] | None, context
        ids [B, C] | None, targets (bytes, full length)."""
        cfg = self.cfg
        return {
            "codes": torch.from_numpy(self.codes[idx]).to(device),
            "residual": torch.from_numpy(self.residual[idx]).to(device) if cfg.use_residual else None,
            "context": collate_context([self.contexts[i] for i in idx], cfg.context_bytes).to(device)
            if cfg.context_bytes else None,
            "targets": [self.sentences[i] for i in idx],
        }


class NARBatches:
    """Target sentences drawn from a counter-based RNG: local batch ``i`` of rank ``r`` uses
    ``default_rng([seed, i * world_size + r])``, so the whole state is the step counter."""

    def __init__(self, docs, cfg: NARRendererConfig, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device="cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.data = docs if isinstance(docs, _Examples) else _Examples(docs, cfg, "training")
        if len(self.data) == 0:
            raise DataError("the training documents hold no sentences")
        self.batch_size, self.seed, self.rank, self.world_size, self.device = batch_size, seed, rank, world_size, device
        self.step = 0

    def next_batch(self) -> dict:
        rng = np.random.default_rng([self.seed, self.step * self.world_size + self.rank])
        self.step += 1
        return self.data.batch(rng.integers(0, len(self.data), size=self.batch_size), self.device)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step; rank stays this source's own, as in ``WindowLoader``."""
        self.seed = int(state["seed"])
        self.step = int(state["step"])


# ---- the loss ------------------------------------------------------------------------------------------------


def nar_loss(model, batch: dict, reward: SentenceReward, t: NARTrainConfig, stats: dict | None = None) -> torch.Tensor:
    """The REINFORCE surrogate (plus the straight-through cosine term and the entropy bonus) of one batch.

    Its gradient is an estimate of minus the gradient of the expected reward; its value is not a loss to
    watch (``stats`` receives the mean reward and its parts for that).
    """
    n = t.n_samples
    targets = [s for s in batch["targets"] for _ in range(n)]  # [B*n], rollouts of a target are adjacent
    target_emb = reward.embed(batch["targets"]).repeat_interleave(n, dim=0)  # [B*n, d]
    out = model(batch["codes"], batch["residual"], batch["context"], n=n, temperature=t.sample_temperature)
    samples = out.sentences()
    if t.straight_through:
        soft = torch.softmax(out.logits, -1)  # [N, T, 256]
        hard = F.one_hot(out.ids, 256).to(soft.dtype)
        st = hard + soft - soft.detach()  # the value of the one-hot, the gradient of the softmax
        cos = (encode_onehot(reward.encoder, out.ids, out.lengths, st) * target_emb).sum(-1)  # [N]
    else:
        with torch.no_grad():
            cos = (encode_onehot(reward.encoder, out.ids, out.lengths) * target_emb).sum(-1)
    parts = reward.score(samples, targets, cosine=cos)
    r = parts["reward"].view(-1, n)  # [B, n]
    if t.baseline == "loo":
        base = (r.sum(1, keepdim=True) - r) / (n - 1)
    else:
        with torch.no_grad():
            g = model(batch["codes"], batch["residual"], batch["context"], greedy=True)
            base = reward.score(g.sentences(), batch["targets"], target_emb[::n])["reward"].view(-1, 1)
    adv = (r - base).clamp(-t.adv_clip, t.adv_clip).view(-1).to(out.logprob.device)  # [N]
    loss = -(adv * out.logprob).mean()
    if t.straight_through and t.st_weight:
        loss = loss - t.st_weight * cos.mean()
    if t.entropy_coef:
        logp = torch.log_softmax(out.logits, -1)
        h_bytes = -(logp.exp() * logp).sum(-1)  # [N, T]
        h_bytes = (h_bytes * out.mask).sum() / out.mask.sum().clamp(min=1)
        lp_len = torch.log_softmax(out.len_logits, -1)
        h_len = -(lp_len.exp() * lp_len).sum(-1).mean()
        loss = loss - t.entropy_coef * (h_bytes + h_len)
    if stats is not None:
        stats.update({f"train_{k}": float(v.mean()) for k, v in parts.items()})
        stats["train_len"] = float(out.lengths.float().mean())
    return loss


# ---- evaluation ----------------------------------------------------------------------------------------------


class ValNAR:
    """Greedy renders of a fixed held-out set (the first sentences in document order), scored by the
    reward and, separately, by the judge. Headline: ``judge_cosine``.

    Reported: reward (and reward_cosine, its encoder's cosine), judge_cosine, length_error (mean absolute
    bytes), invalid_utf8 and exact_match (shares), repetition, and ``examples`` (target, render) pairs.
    ``max_tokens`` caps the set in target bytes; ``None`` renders all of it.
    """

    def __init__(self, docs, cfg: NARRunConfig, reward: SentenceReward, judge):
        self.data = docs if isinstance(docs, _Examples) else _Examples(docs, cfg.renderer, "validation")
        if len(self.data) == 0:
            raise DataError("the validation documents hold no sentences")
        self.reward, self.judge, self.t = reward, judge, cfg.train
        self.bytes = np.asarray([len(s) for s in self.data.sentences], dtype=np.int64)
        self._judge_targets = judge_embed(judge, self.data.sentences)  # [N, d], fixed

    @torch.no_grad()
    def render(self, model: NARRenderer, idx: np.ndarray, greedy: bool = True) -> list[bytes]:
        """Greedy renders, or one temperature-1 sample each from a fixed seed (the same draws every time)."""
        out = []
        bs = max(1, self.t.micro_batch * self.t.n_samples)
        gen = None if greedy else make_generator(self.t.seed, model.device)
        for s in range(0, len(idx), bs):
            b = self.data.batch(idx[s : s + bs], model.device)
            out += model.rollout(b["codes"], b["residual"], b["context"], generator=gen, greedy=greedy).sentences()
        return out

    def _judge_cosine(self, renders: list[bytes]) -> float:
        return float((judge_embed(self.judge, renders) * self._judge_targets[: len(renders)]).sum(-1).mean())

    @torch.no_grad()
    def evaluate(self, model: NARRenderer, max_tokens: int | None = None) -> dict:
        n = len(self.data)
        if max_tokens is not None:
            n = max(1, int(np.searchsorted(np.cumsum(self.bytes), max_tokens, side="right")))
        idx = np.arange(n)
        was_training = model.training
        model.eval()
        try:
            renders = self.render(model, idx)
            samples = self.render(model, idx, greedy=False)
        finally:
            model.train(was_training)
        targets = self.data.sentences[:n]
        parts = self.reward.score(renders, targets)
        target_len = np.minimum(self.bytes[:n], model.cfg.max_bytes)
        out = {
            "judge_cosine": self._judge_cosine(renders),
            "reward": float(parts["reward"].mean()),
            "reward_cosine": float(parts["cosine"].mean()),
            "length_error": float(np.abs(np.asarray([len(r) for r in renders]) - target_len).mean()),
            "invalid_utf8": float(parts["invalid"].mean()),
            "exact_match": float(np.mean([r == t for r, t in zip(renders, targets)])),
            "repetition": float(parts["repetition"].mean()),
            "sentences": n,
            "too_long": int(sum(len(t) > model.cfg.max_bytes for t in targets)),
            # Per-position argmax can be much worse than a sample when positions are uncertain: report both.
            "sample_judge_cosine": self._judge_cosine(samples),
            "sample_reward": float(self.reward.score(samples, targets)["reward"].mean()),
        }
        out["examples"] = [{"target": t.decode("utf-8", "replace"), "render": r.decode("utf-8", "replace")}
                           for t, r in list(zip(targets, renders))[: self.t.eval_examples]]
        return out


# ---- the task and the run --------------------------------------------------------------------------------------


def build_nar_task(cfg: NARRunConfig, train_docs, val, reward_encoder, judge, dist_info, device) -> TrainTask:
    """``train_docs``: RenderDoc-like documents (or their ``_Examples``); ``val``: held-out ones or a ``ValNAR``."""
    check_encoders(reward_encoder, judge)
    rcfg, t = cfg.renderer, cfg.train
    model = NARRenderer(rcfg)
    reward = SentenceReward(reward_encoder, rcfg.max_bytes, t.length_weight, t.repetition_weight,
                            t.invalid_penalty, device=device)
    source = NARBatches(train_docs, rcfg, t.micro_batch, seed=t.seed, rank=dist_info.rank,
                        world_size=dist_info.world_size, device=device)
    if t.prior_init:
        model.init_priors(source.data.sentences)
    if not isinstance(val, ValNAR):
        val = ValNAR(val, cfg, reward, judge)
    else:
        val.reward = reward
    stats: dict = {}
    mean_len = source.data.mean_len
    return TrainTask(
        model=model, batches=source, loss=lambda m, b: nar_loss(m, b, reward, t, stats), evaluate=val.evaluate,
        # "tokens" are rendered byte positions (length slot included), estimated from the corpus mean
        tokens_per_batch=max(1, int(round(t.micro_batch * t.n_samples * mean_len))),
        flops_per_token=model.flops_per_token(int(mean_len)), extra_metrics=lambda m: dict(stats),
        headline="judge_cosine",
    )


def _state_sha256(module) -> str | None:
    if not isinstance(module, torch.nn.Module):
        return None
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _docs_sha256(docs) -> str:
    h = hashlib.sha256()
    for doc in docs:
        h.update(sentences_sha256(_field(doc, "sentences") or []).encode())
        for name in _FIELDS[1:]:
            a = _field(doc, name)
            h.update(b"-" if a is None else np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()


def _corpus_info(docs) -> dict:
    return {"documents": len(docs), "sentences": sum(len(_field(d, "sentences") or []) for d in docs),
            "sha256": _docs_sha256(docs)}


def train_nar_renderer(
    train_docs,
    val_docs,
    reward_encoder: ByteSentenceEncoder,
    judge_encoder,
    run_dir: str | Path,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    progress: bool | str = True,
    resume: str | None = None,
    device: str = "auto",
    stop_at: int | None = None,
    preset: str | None = None,
) -> dict:
    """Train a NAR renderer by sentence-level reward into ``run_dir``; returns the loop's summary.

    ``reward_encoder`` (a ``ByteSentenceEncoder``, frozen, copied) scores rollouts during training;
    ``judge_encoder`` (anything with ``encode(texts)`` or ``encode_bytes(bytes)`` returning unit vectors,
    e.g. the planner's encoder or ``MiniLMEncoder``) scores evaluations and must be a different model.
    ``overrides`` are ``key.sub=value`` strings such as ``train.baseline=greedy``.
    """
    check_encoders(reward_encoder, judge_encoder)
    run_dir = Path(run_dir)
    overrides = list(overrides or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    cfg = load_nar_config(preset, overrides)
    # Built (and so checked) before anything is written: a bad input leaves no half-made run directory.
    train = _Examples(train_docs, cfg.renderer, "training")
    NARBatches(train, cfg.renderer, cfg.train.micro_batch)
    val = _Examples(val_docs, cfg.renderer, "validation")
    if len(val) == 0:
        raise DataError("the validation documents hold no sentences")
    reward_sha = _state_sha256(reward_encoder)
    resume_path = check_resume(run_dir, resume, cfg.to_dict(), {
        "train_corpus.sha256": (_docs_sha256(train_docs), "other documents"),
        "reward_encoder_sha256": (reward_sha, "another reward encoder"),
    })
    write_run_files(run_dir, cfg, train_corpus=_corpus_info(train_docs), val_corpus=_corpus_info(val_docs),
                    reward_encoder_sha256=reward_sha, judge=type(judge_encoder).__name__,
                    judge_sha256=_state_sha256(judge_encoder))
    return train_and_export(run_dir, cfg, lambda info, dev: build_nar_task(cfg, train, val, reward_encoder, judge_encoder, info, dev), WEIGHTS,
                            resume=resume_path, device=device, progress=progress, stop_at=stop_at)
