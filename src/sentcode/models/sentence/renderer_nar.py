"""The non-autoregressive renderer of the sentence-step LM: all of a sentence's bytes in one parallel step.

Given a code tuple (and optionally its residual and the preceding text), the model defines

    P(s | c) = P(len(s) = n | c) * prod_{i < n} P(s_i | c, n)

The length comes first, from a small head on the condition vector alone; then one pass of a bidirectional
transformer over the condition token and n learned position queries (all told the length) gives every byte
position its own softmax over the 256 bytes, sampled independently. Both factors are normalised, so this is
a proper distribution over byte strings of at most ``max_bytes`` bytes and ``log_prob`` can serve as the
render part of a two-part code length. A string longer than ``max_bytes`` cannot be produced: its
``log_prob`` is ``-inf`` (an infinite code length), never that of a truncated copy.

Conditioning is the sum of one embedding per code level, plus ``Linear(residual)`` when ``use_residual``,
plus (``context_bytes > 0``) a mean-pooled embedding of the last ``context_bytes`` bytes before the
sentence. The model has no token-level training signal of its own here: see ``sentcode.train.renderer_nar``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from sentcode.config import RunConfig, TrainConfig
from sentcode.errors import ConfigError, SentcodeError
from sentcode.nn.sampling import make_generator
from sentcode.nn import CausalSelfAttention, RMSNorm, SwiGLU, rope_cos_sin

FAMILY = "sentence-renderer-nar"
N_BYTES = 256
CTX_PAD = 256  # input-only id that pads context windows


@dataclass
class NARRendererConfig:
    levels: int = 4  # K: code levels per sentence
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256, 256])  # V_l, one per level
    use_residual: bool = False  # add Linear(r) of the continuous residual to the condition
    d_emb: int = 128  # size of the residual
    context_bytes: int = 0  # > 0: add a pooled vector of the last this many bytes of preceding text
    max_bytes: int = 128  # longest sentence the model can write
    d_model: int = 256
    n_layer: int = 3
    n_head: int = 4
    ffn_mult: float = 2.75
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def ffn_hidden(self) -> int:
        return max(32, int(round(self.ffn_mult * self.d_model / 32)) * 32)  # as the LM's ModelConfig

    def validate(self) -> None:
        if not isinstance(self.levels, int) or isinstance(self.levels, bool) or self.levels < 1:
            raise ConfigError(f"renderer.levels must be a positive integer, got {self.levels!r}")
        sizes = self.codebook_sizes
        if (not isinstance(sizes, (list, tuple)) or len(sizes) != self.levels
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes)):
            raise ConfigError(
                f"renderer.codebook_sizes must list {self.levels} positive integers (one per level), got {sizes!r}"
            )
        self.codebook_sizes = [int(v) for v in sizes]  # a tuple would not survive yaml.safe_dump
        if min(self.d_model, self.n_layer, self.n_head, self.d_emb) <= 0:
            raise ConfigError("renderer.d_model, n_layer, n_head and d_emb must be positive")
        if self.d_model % self.n_head:
            raise ConfigError(f"renderer.n_head={self.n_head} does not divide renderer.d_model={self.d_model}")
        if (self.d_model // self.n_head) % 2:
            raise ConfigError("renderer.d_model / renderer.n_head (the head size) must be even for rotary positions")
        if self.max_bytes < 1:
            raise ConfigError("renderer.max_bytes must be at least 1")
        if self.context_bytes < 0:
            raise ConfigError("renderer.context_bytes must be >= 0")
        if self.ffn_mult <= 0:
            raise ConfigError("renderer.ffn_mult must be positive")


BASELINES = ("loo", "greedy")


@dataclass
class NARTrainConfig(TrainConfig):
    """``TrainConfig`` with NAR renderer defaults and the REINFORCE settings.

    ``seq_len`` must equal ``renderer.max_bytes`` and ``micro_batch`` counts target sentences (each gets
    ``n_samples`` rollouts), so ``batch_tokens / (micro_batch * seq_len)`` is the gradient accumulation.
    ``eval_max_tokens`` caps periodic evaluations in target sentence bytes. A subclass rather than a
    ``default_factory``: ``sentcode.config._from_dict`` rebuilds a section from its class defaults.
    """

    seq_len: int = 128
    micro_batch: int = 16
    batch_tokens: int = 2048
    max_steps: int = 2000
    lr: float = 1e-3
    warmup_steps: int = 20
    eval_max_tokens: int | None = 20_000
    n_samples: int = 8  # rollouts per target sentence
    baseline: str = "loo"  # loo: mean reward of the target's other rollouts; greedy: the greedy decode's reward
    adv_clip: float = 2.0
    entropy_coef: float = 1e-3
    sample_temperature: float = 1.0  # rollouts are drawn at this temperature (log-probs stay at 1)
    # Reward = cosine + length_weight * length term - repetition_weight * repetition - invalid_penalty * invalid
    length_weight: float = 1.0
    repetition_weight: float = 1.0
    invalid_penalty: float = 0.5
    # Straight-through credit assignment: the rollout's one-hot bytes carry softmax gradients through the
    # frozen reward encoder, so each position learns how the same sentence-level cosine moves with it.
    straight_through: bool = True
    st_weight: float = 10.0  # on a toy task 10 beat 1 and 30; its scale is relative to the summed log-probs
    eval_examples: int = 2
    # Start the byte and length heads from the training targets' marginals (NARRenderer.init_priors).
    prior_init: bool = True

    def validate(self) -> None:
        super().validate()
        if self.n_samples < 1:
            raise ConfigError("train.n_samples must be at least 1")
        if self.baseline not in BASELINES:
            raise ConfigError(f"train.baseline must be one of {', '.join(BASELINES)}, not {self.baseline!r}")
        if self.baseline == "loo" and self.n_samples < 2:
            raise ConfigError("train.baseline=loo needs train.n_samples >= 2 (a rollout's baseline is the others' mean)")
        if self.adv_clip <= 0:
            raise ConfigError("train.adv_clip must be positive")
        if self.sample_temperature <= 0:
            raise ConfigError("train.sample_temperature must be positive")
        for name in ("entropy_coef", "length_weight", "repetition_weight", "invalid_penalty", "st_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0")


@dataclass
class NARRunConfig(RunConfig):
    """A NAR renderer and how to train it; ``train.seq_len`` must equal ``renderer.max_bytes``."""

    renderer: NARRendererConfig = field(default_factory=NARRendererConfig)
    train: NARTrainConfig = field(default_factory=NARTrainConfig)
    family: str = FAMILY

    kind = "NAR renderer"

    def check(self) -> None:
        if self.train.seq_len != self.renderer.max_bytes:
            raise ConfigError(f"train.seq_len={self.train.seq_len} must equal renderer.max_bytes="
                              f"{self.renderer.max_bytes} for a NAR renderer (set both)")



def load_nar_config(preset: str | None = None, overrides: list[str] | None = None) -> NARRunConfig:
    """A validated ``NARRunConfig`` from an optional YAML file plus ``key.sub=value`` overrides."""
    from sentcode.config import load_config

    return load_config(preset, overrides, cls=NARRunConfig)


def collate_context(contexts: Sequence[bytes], n: int) -> torch.Tensor:
    """[B, max(1, n)] long: the last ``n`` bytes of each context, left-padded with ``CTX_PAD``."""
    out = np.full((len(contexts), max(1, n)), CTX_PAD, dtype=np.int64)
    for i, c in enumerate(contexts):
        c = bytes(c)[-n:] if n > 0 else b""
        if c:
            out[i, out.shape[1] - len(c):] = np.frombuffer(c, dtype=np.uint8)
    return torch.from_numpy(out)


@dataclass
class Rollout:
    """Sampled (or given) sentences and their scores under the model, gradients attached.

    lengths [N] long; ids [N, T] long (bytes, 0 past each length); mask [N, T] bool (i < length);
    logits [N, T, 256] float32 (temperature 1); logp_len [N]; logp_bytes [N, T] (0 where masked).
    """

    lengths: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    logp_len: torch.Tensor
    logp_bytes: torch.Tensor
    len_logits: torch.Tensor

    @property
    def logprob(self) -> torch.Tensor:
        """[N]: log P(length) + sum of the byte log-probs, in nats."""
        return self.logp_len + self.logp_bytes.sum(-1)

    def sentences(self) -> list[bytes]:
        ids = self.ids.cpu().numpy().astype(np.uint8)
        return [ids[i, :n].tobytes() for i, n in enumerate(self.lengths.tolist())]


class _Block(nn.Module):
    def __init__(self, cfg: NARRendererConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head, cfg.n_head, "rope", causal=False)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, positions, rope, key_mask):
        x = x + self.attn(self.norm1(x), positions, rope, key_mask=key_mask)
        return x + self.ffn(self.norm2(x))


class NARRenderer(nn.Module):
    def __init__(self, cfg: NARRendererConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, L = cfg.d_model, cfg.max_bytes
        self.code_emb = nn.ModuleList(nn.Embedding(v, d) for v in cfg.codebook_sizes)
        self.res_in = nn.Linear(cfg.d_emb, d, bias=False) if cfg.use_residual else None
        if cfg.context_bytes:
            self.ctx_emb = nn.Embedding(N_BYTES + 1, d)
            self.ctx_pos = nn.Parameter(torch.zeros(cfg.context_bytes, d))
            self.ctx_proj = nn.Linear(d, d, bias=False)
        # The length is read off the condition alone, before any byte is placed.
        self.len_norm = RMSNorm(d, cfg.norm_eps)
        self.len_ffn = SwiGLU(d, cfg.ffn_hidden)
        self.len_out = nn.Linear(d, L + 1)  # biases: where ``init_priors`` puts the marginals
        self.len_emb = nn.Embedding(L + 1, d)  # tells every position how long the sentence is
        self.queries = nn.Parameter(torch.zeros(L, d))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.byte_head = nn.Linear(d, N_BYTES)
        self.apply(self._init)
        nn.init.normal_(self.queries, std=0.02)
        if cfg.context_bytes:
            nn.init.normal_(self.ctx_pos, std=0.02)
        # GPT-2 style: shrink the residual-branch outputs with depth
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_priors(self, sentences: Sequence[bytes]) -> None:
        """Start from the marginals of ``sentences``: byte-head bias = log unigram byte frequencies, length-head
        bias = log length frequencies (add-one smoothed; lengths capped at ``max_bytes``).

        A uniform start writes invalid UTF-8 almost surely past a few bytes, so a sentence-level reward would
        first teach the renderer to write nothing; these 256 + max_bytes + 1 numbers start it from text-like
        bytes instead. They carry no sentence and no code-to-sentence mapping.
        """
        counts = np.ones(N_BYTES)
        lens = np.ones(self.cfg.max_bytes + 1)
        for s in sentences:
            counts += np.bincount(np.frombuffer(bytes(s), dtype=np.uint8), minlength=N_BYTES)
            lens[min(len(s), self.cfg.max_bytes)] += 1
        self.byte_head.bias.copy_(torch.from_numpy(np.log(counts / counts.sum())))
        self.len_out.bias.copy_(torch.from_numpy(np.log(lens / lens.sum())))

    @property
    def device(self) -> torch.device:
        return self.byte_head.weight.device

    # ---- conditioning --------------------------------------------------------------------------------------

    def condition(self, codes: torch.Tensor, residual: torch.Tensor | None = None,
                  context: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, K] (+ residual [B, d_emb], context ids [B, C] from ``collate_context``) -> [B, d]."""
        cfg = self.cfg
        if codes.dim() != 2 or codes.shape[1] != cfg.levels:
            raise SentcodeError(f"renderer codes must have shape [B, {cfg.levels}], got {tuple(codes.shape)}")
        cond = 0
        for l, emb in enumerate(self.code_emb):
            c = codes[:, l].long()
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= cfg.codebook_sizes[l]):
                raise SentcodeError(f"renderer codes of level {l} must lie in [0, {cfg.codebook_sizes[l]})")
            cond = cond + emb(c)
        if self.res_in is not None:
            if residual is None:
                raise SentcodeError("this renderer reads residuals (use_residual): pass residual [B, d_emb]")
            cond = cond + self.res_in(residual.to(self.res_in.weight.dtype))
        if cfg.context_bytes:
            if context is None:
                context = torch.full((codes.shape[0], cfg.context_bytes), CTX_PAD, dtype=torch.long, device=codes.device)
            C = context.shape[1]
            x = self.ctx_emb(context) + self.ctx_pos[-C:]  # [B, C, d]; positions count back from the sentence
            real = (context != CTX_PAD).to(x.dtype).unsqueeze(-1)  # [B, C, 1]
            pooled = (x * real).sum(1) / real.sum(1).clamp(min=1)
            cond = cond + self.ctx_proj(pooled)
        return cond

    def length_logits(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, d] -> [B, max_bytes + 1] float32 logits over lengths 0..max_bytes."""
        h = cond + self.len_ffn(self.len_norm(cond))
        return self.len_out(h).float()

    def byte_logits(self, cond: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """cond [B, d], lengths [B] -> [B, T, 256] float32, T = max(lengths); row i is meaningful below lengths[i]."""
        B = cond.shape[0]
        T = max(1, int(lengths.max())) if B else 1
        pre = cond + self.len_emb(lengths)  # [B, d]
        x = torch.cat([pre[:, None], pre[:, None] + self.queries[:T]], dim=1)  # [B, 1+T, d]
        positions = torch.arange(T + 1, device=cond.device)
        # Padding queries are hidden from the real ones, so a row's output is independent of its batch.
        key_mask = positions[None, :] <= lengths[:, None]  # [B, 1+T]; the condition token is always real
        rope = rope_cos_sin(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta)
        for block in self.blocks:
            x = block(x, positions, rope, key_mask)
        return self.byte_head(self.norm(x[:, 1:])).float()

    # ---- scoring and sampling -----------------------------------------------------------------------------

    def _score(self, cond, len_logits, lengths, ids) -> Rollout:
        logits = self.byte_logits(cond, lengths)  # [N, T, 256]
        T = logits.shape[1]
        ids = ids[:, :T]
        mask = torch.arange(T, device=ids.device)[None, :] < lengths[:, None]  # [N, T]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
        logp_len = torch.log_softmax(len_logits, -1).gather(-1, lengths[:, None])[:, 0]
        return Rollout(lengths, ids, mask, logits, logp_len, torch.where(mask, lp, torch.zeros_like(lp)), len_logits)

    def rollout(self, codes, residual=None, context=None, n: int = 1, temperature: float = 1.0,
                generator: torch.Generator | None = None, greedy: bool = False) -> Rollout:
        """``n`` sentences per row of codes [B, K] (rows repeat: row b's samples are b*n..b*n+n-1), with gradients.

        Length first (at ``temperature``, or argmax when ``greedy``), then every byte position at once.
        The returned log-probs are under the model itself (temperature 1), for REINFORCE and reranking.
        """
        cond = self.condition(codes, residual, context).repeat_interleave(n, dim=0)  # [N, d]
        len_logits = self.length_logits(cond)
        with torch.no_grad():
            lengths = _draw(len_logits, temperature, generator, greedy)  # [N]
            logits = self.byte_logits(cond, lengths)
            ids = _draw(logits, temperature, generator, greedy)  # [N, T]
        return self._score(cond, len_logits, lengths, ids)

    def forward(self, codes, residual=None, context=None, n: int = 1, temperature: float = 1.0,
                generator: torch.Generator | None = None, greedy: bool = False) -> Rollout:
        """``rollout``, through ``__call__`` so that DDP and ``torch.compile`` wrappers see the forward."""
        return self.rollout(codes, residual, context, n, temperature, generator, greedy)

    def log_prob(self, codes, residual, sentences: Sequence[bytes], contexts: Sequence[bytes] | None = None) -> torch.Tensor:
        """[B]: log P(sentence | codes, residual, context) in nats; ``-inf`` for a sentence over ``max_bytes``.

        codes [B, K], residual [B, d_emb] or None, contexts (with ``context_bytes``) the preceding text.
        Gradients flow.
        """
        cfg, dev = self.cfg, self.device
        sentences = [bytes(s) for s in sentences]
        codes = torch.as_tensor(codes, dtype=torch.long, device=dev).reshape(len(sentences), cfg.levels)
        if residual is not None:
            residual = torch.as_tensor(residual, dtype=torch.float32, device=dev).reshape(len(sentences), cfg.d_emb)
        too_long = torch.tensor([len(s) > cfg.max_bytes for s in sentences], dtype=torch.bool, device=dev)
        kept = [s[: cfg.max_bytes] for s in sentences]  # scored, then overwritten with -inf below
        lengths = torch.tensor([len(s) for s in kept], dtype=torch.long, device=dev)
        T = max(1, int(lengths.max()) if len(kept) else 1)
        ids = np.zeros((len(kept), T), dtype=np.int64)
        for i, s in enumerate(kept):
            ids[i, : len(s)] = np.frombuffer(s, dtype=np.uint8)
        ctx = self._context_tensor(contexts, len(kept))
        cond = self.condition(codes, residual, ctx)
        r = self._score(cond, self.length_logits(cond), lengths, torch.from_numpy(ids).to(dev))
        return r.logprob.masked_fill(too_long, float("-inf"))

    def _context_tensor(self, contexts, n):
        if not self.cfg.context_bytes:
            return None
        contexts = contexts if contexts is not None else [b""] * n
        return collate_context(contexts, self.cfg.context_bytes).to(self.device)

    def _one(self, codes, residual, context):
        cfg, dev = self.cfg, self.device
        c = torch.as_tensor(codes, dtype=torch.long, device=dev).reshape(-1)
        if c.numel() != cfg.levels:
            raise SentcodeError(f"codes must hold {cfg.levels} levels, got {c.numel()} values")
        r = None
        if residual is not None:
            r = torch.as_tensor(residual, dtype=torch.float32, device=dev).reshape(1, cfg.d_emb)
        return c[None], r, self._context_tensor([context], 1)

    @torch.no_grad()
    def sample(self, codes, residual=None, n: int = 1, temperature: float = 1.0,
               generator: torch.Generator | None = None, context: bytes = b"") -> list[tuple[bytes, float]]:
        """``n`` candidates for one tuple (codes [K], residual [d_emb] or None) in one parallel step.

        Each comes with its log-prob under the model itself (temperature 1), the same number ``log_prob``
        gives it. Temperature 0 is greedy.
        """
        if n < 1:
            raise SentcodeError(f"n must be at least 1, got {n}")
        if temperature is None or temperature < 0:
            raise SentcodeError(f"temperature must be >= 0, got {temperature}")
        c, r, ctx = self._one(codes, residual, context)
        if generator is None:
            generator = make_generator(None, self.device)
        was_training = self.training
        self.eval()
        try:
            out = self.rollout(c, r, ctx, n, temperature or 1.0, generator, greedy=temperature == 0)
        finally:
            self.train(was_training)
        return list(zip(out.sentences(), out.logprob.double().tolist()))

    @torch.no_grad()
    def greedy(self, codes, residual=None, context: bytes = b"") -> tuple[bytes, float]:
        """The most likely length, then the most likely byte at each position, with its log-prob."""
        return self.sample(codes, residual, 1, 0.0, context=context)[0]

    # ---- accounting ----------------------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per byte position: 6N for the weights (lookup tables excluded) plus attention."""
        c = self.cfg
        tables = sum(e.weight.numel() for e in self.code_emb) + self.len_emb.weight.numel()
        if c.context_bytes:
            tables += self.ctx_emb.weight.numel()
        return 6 * (self.num_params() - tables) + 6 * c.n_layer * c.d_model * seq_len


def _draw(logits: torch.Tensor, temperature: float, generator, greedy: bool) -> torch.Tensor:
    """[..., V] -> [...]: one draw per row, all rows at once."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
