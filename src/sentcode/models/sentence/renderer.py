"""The renderer of the sentence-step LM: writes a sentence's bytes given its code tuple and the text before it.

One causal byte decoder reads, per sentence,

    [CodeEmb_0(c_0), ..., CodeEmb_{K-1}(c_{K-1}) (+ Linear(r))]  SEP  context bytes  BOS  sentence bytes  EOS

and only the sentence bytes and the EOS are predicted (and counted by the loss). The output distribution
gives BOS and PAD probability zero, so the per-step softmax is over the 256 bytes and EOS: the probabilities
of all finite byte strings (each closed by EOS) sum to one, which is what makes ``log_prob`` usable as the
render part of a two-part code length.

Sequences of a batch are laid out without internal padding and right-padded: with causal attention the
padding then never reaches a real position, so a sentence's score does not depend on its batch.

``use_codes=False`` is the no-code ablation: the prefix is absent and the model is a plain
context-conditioned sentence LM with the same trunk, so the two are directly comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from sentcode.config import ModelConfig, RunConfig, TrainConfig
from sentcode.errors import ConfigError, SentcodeError
from sentcode.nn.sampling import check_sampling, make_generator, sample_next
from sentcode.models.lm import Block
from sentcode.nn import LayerCache, RMSNorm, rope_cos_sin

FAMILY = "sentence-renderer-ar"
VOCAB = 259  # the byte tokenizer's output ids
BOS, EOS, PAD = 256, 257, 258
SEP = 259  # input-only id between the prefix and the context


@dataclass
class RendererConfig:
    levels: int = 4  # K: code levels per sentence
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256, 256])  # V_l, one per level
    use_codes: bool = True  # False: the no-code ablation (no prefix at all)
    use_residual: bool = False  # add Linear(r) of the continuous residual to the last prefix vector
    d_emb: int = 128  # size of the residual
    context_bytes: int = 64  # window of preceding text the renderer reads
    max_sentence_bytes: int = 256  # longer training sentences are truncated; scoring them is an error
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    ffn_mult: float = 2.75
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # Training-time corruption, so the renderer does not trust its codes more than inference can:
    code_noise: float = 0.1  # per level, probability of replacing a code by a uniformly random one
    predicted_mix: float = 0.0  # per sentence, probability of reading the planner's predicted tuple instead
    # How the code tables start: "random", or "centroids" (each code's RVQ centroid through a fixed random
    # projection, so codes that are close in embedding space start close; needs the codebooks at training).
    code_init: str = "random"
    # Where the codes enter: "prefix" (one input position per level, read through attention) or "add" (the sum
    # of the levels' vectors added to every byte position's input, so every layer's FFN sees them directly).
    code_input: str = "prefix"

    @property
    def prefix_len(self) -> int:
        return self.levels if (self.use_codes and self.code_input == "prefix") else 0

    @property
    def max_len(self) -> int:
        """Longest input: prefix, SEP, context, BOS, sentence, EOS."""
        return self.prefix_len + self.context_bytes + self.max_sentence_bytes + 3

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
        if self.code_input not in ("prefix", "add"):
            raise ConfigError(f"renderer.code_input must be 'prefix' or 'add', got {self.code_input!r}")
        if self.code_init not in ("random", "centroids"):
            raise ConfigError(f"renderer.code_init must be 'random' or 'centroids', got {self.code_init!r}")
        if self.use_residual and not self.use_codes:
            raise ConfigError("renderer.use_residual needs renderer.use_codes: the residual is added to the code prefix")
        if min(self.d_model, self.n_layer, self.n_head, self.n_kv_head, self.d_emb) <= 0:
            raise ConfigError("renderer.d_model, n_layer, n_head, n_kv_head and d_emb must be positive")
        if self.d_model % self.n_head:
            raise ConfigError(f"renderer.n_head={self.n_head} does not divide renderer.d_model={self.d_model}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"renderer.n_kv_head={self.n_kv_head} does not divide renderer.n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ConfigError("renderer.d_model / renderer.n_head (the head size) must be even for rotary positions")
        if self.context_bytes < 0:
            raise ConfigError("renderer.context_bytes must be >= 0")
        if self.max_sentence_bytes < 1:
            raise ConfigError("renderer.max_sentence_bytes must be at least 1")
        if self.ffn_mult <= 0:
            raise ConfigError("renderer.ffn_mult must be positive")
        for name in ("code_noise", "predicted_mix"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"renderer.{name} must lie in [0, 1]")

    def model_config(self) -> ModelConfig:
        """The LM block settings the renderer's trunk is built from."""
        return ModelConfig(vocab_size=VOCAB, d_model=self.d_model, n_layer=self.n_layer, n_head=self.n_head,
                           n_kv_head=self.n_kv_head, ffn_mult=self.ffn_mult, max_seq_len=self.max_len, pos="rope",
                           rope_theta=self.rope_theta, norm_eps=self.norm_eps)


@dataclass
class RendererRunConfig(RunConfig):
    """A renderer and how to train it.

    ``train`` is the shared ``TrainConfig``, read for sentence batches: ``micro_batch`` is the number of
    sentences per micro-batch and ``seq_len`` must equal ``renderer.max_sentence_bytes``, so that
    ``batch_tokens / (micro_batch * seq_len)`` is the gradient accumulation (as for the encoder).
    ``eval_max_tokens`` caps periodic evaluations in sentence bytes.
    """

    renderer: RendererConfig = field(default_factory=RendererConfig)
    # Plain TrainConfig defaults: sentcode.config._from_dict rebuilds a given section from its class
    # defaults, so renderer-specific defaults here would vanish as soon as any train.* key was set.
    train: TrainConfig = field(default_factory=TrainConfig)
    family: str = FAMILY

    kind = "renderer"

    def check(self) -> None:
        if self.train.seq_len != self.renderer.max_sentence_bytes:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} must equal renderer.max_sentence_bytes="
                f"{self.renderer.max_sentence_bytes} for a renderer (set both)"
            )



def load_renderer_config(preset: str | None = None, overrides: list[str] | None = None) -> RendererRunConfig:
    """A validated ``RendererRunConfig`` from an optional YAML file plus ``key.sub=value`` overrides."""
    from sentcode.config import load_config

    return load_config(preset, overrides, cls=RendererRunConfig)


# ---- batches -----------------------------------------------------------------------------------------------


@dataclass
class RenderBatch:
    """codes [B, K] (long), residual [B, d_emb] or None, tokens [B, T] (SEP ctx BOS sentence EOS PAD...),
    counted [B, T] bool: True at the sentence bytes and the EOS, the only tokens that are scored."""

    codes: torch.Tensor
    residual: torch.Tensor | None
    tokens: torch.Tensor
    counted: torch.Tensor

    def to(self, device) -> "RenderBatch":
        return RenderBatch(self.codes.to(device), None if self.residual is None else self.residual.to(device),
                           self.tokens.to(device), self.counted.to(device))


def tail(context: bytes, n: int) -> bytes:
    """The last ``n`` bytes (``b[-0:]`` would be all of them)."""
    return context[-n:] if n > 0 else b""


def collate_render(cfg: RendererConfig, codes, residual, contexts: Sequence[bytes],
                   sentences: Sequence[bytes]) -> RenderBatch:
    """Right-padded token rows; contexts keep their last ``context_bytes`` bytes, sentences must fit."""
    B = len(sentences)
    if len(contexts) != B:
        raise SentcodeError(f"got {len(contexts)} contexts for {B} sentences")
    rows = []
    for ctx, s in zip(contexts, sentences):
        if len(s) > cfg.max_sentence_bytes:
            raise SentcodeError(f"a sentence of {len(s)} bytes exceeds renderer.max_sentence_bytes={cfg.max_sentence_bytes}")
        ctx = tail(bytes(ctx), cfg.context_bytes)
        rows.append(([SEP, *ctx, BOS], [*s, EOS]))
    T = max(len(a) + len(b) for a, b in rows)
    tokens = torch.full((B, T), PAD, dtype=torch.long)
    counted = torch.zeros(B, T, dtype=torch.bool)
    for i, (a, b) in enumerate(rows):
        tokens[i, : len(a) + len(b)] = torch.tensor(a + b)
        counted[i, len(a) : len(a) + len(b)] = True
    codes_t = torch.as_tensor(np.asarray(codes), dtype=torch.long).reshape(B, cfg.levels) if cfg.use_codes \
        else torch.zeros(B, cfg.levels, dtype=torch.long)
    res_t = None
    if cfg.use_residual:
        if residual is None:
            raise SentcodeError("this renderer reads residuals (use_residual): pass residual [B, d_emb]")
        res_t = torch.as_tensor(np.asarray(residual), dtype=torch.float32).reshape(B, cfg.d_emb)
    return RenderBatch(codes_t, res_t, tokens, counted)


# ---- the model ---------------------------------------------------------------------------------------------


class ARRenderer(nn.Module):
    def __init__(self, cfg: RendererConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mcfg = cfg.model_config()
        d = cfg.d_model
        self.embed = nn.Embedding(VOCAB + 1, d)  # bytes, BOS, EOS, PAD and SEP
        self.code_emb = nn.ModuleList(nn.Embedding(v, d) for v in cfg.codebook_sizes) if cfg.use_codes else None
        self.res_in = nn.Linear(cfg.d_emb, d, bias=False) if cfg.use_residual else None
        self.blocks = nn.ModuleList(Block(mcfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.head = nn.Linear(d, VOCAB, bias=False)
        # Tokens that never follow in a sentence get no probability, so the softmax normalises over byte strings.
        never = torch.zeros(VOCAB)
        never[[BOS, PAD]] = float("-inf")
        self.register_buffer("never", never, persistent=False)
        self.apply(self._init)
        # GPT-2 style: shrink the residual-branch outputs with depth, as in the LM
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w_down.weight"):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    @torch.no_grad()
    def init_code_embeddings(self, codebooks: Sequence[torch.Tensor], seed: int = 0) -> None:
        """Start level l's code table from its RVQ centroids [V_l, dim] through a fixed random projection
        (``code_init: centroids``).

        Why: a table entry learns only from the sentences that carry its code, a few dozen each in a short
        run, so randomly initialised tables stay noise and the renderer learns to ignore them (measured: oracle
        codes were worth nothing over shuffled ones). Started from the centroids, codes that are close in
        embedding space start close, and what the trunk learns to read from one code carries over to its
        neighbours. Each table keeps the scale of the default initialisation.
        """
        if self.code_emb is None:
            raise SentcodeError("this renderer reads no codes (use_codes is false)")
        if len(codebooks) != len(self.code_emb):
            raise SentcodeError(f"expected {len(self.code_emb)} codebooks, got {len(codebooks)}")
        g = torch.Generator().manual_seed(seed)
        for l, (emb, cb) in enumerate(zip(self.code_emb, codebooks)):
            cb = torch.as_tensor(cb, dtype=torch.float32).cpu()
            if cb.dim() != 2 or cb.shape[0] != emb.num_embeddings:
                raise SentcodeError(f"codebook {l} must have {emb.num_embeddings} rows, got shape {tuple(cb.shape)}")
            w = (cb - cb.mean(0)) @ torch.randn(cb.shape[1], emb.embedding_dim, generator=g)
            emb.weight.copy_((w * (0.02 / w.std().clamp(min=1e-12))).to(emb.weight))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.blocks]

    # ---- the trunk ---------------------------------------------------------------------------------------

    def inputs(self, codes: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prefix [B, P, d], add [B, 1, d] or None): how the codes enter, per ``code_input``."""
        cols = self.prefix(codes, residual)
        if self.cfg.code_input == "add" and self.code_emb is not None:
            return cols[:, :0], cols.sum(dim=1, keepdim=True)
        return cols, None

    def prefix(self, codes: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """[B, K, d]: one vector per code level (the residual added to the last); K = 0 without codes."""
        B = codes.shape[0]
        if self.code_emb is None:
            return self.embed.weight.new_zeros(B, 0, self.cfg.d_model)
        cols = []
        for l, emb in enumerate(self.code_emb):
            c = codes[:, l].long()
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.cfg.codebook_sizes[l]):
                raise SentcodeError(f"renderer codes of level {l} must lie in [0, {self.cfg.codebook_sizes[l]})")
            cols.append(emb(c))
        if self.res_in is not None:
            if residual is None:
                raise SentcodeError("this renderer reads residuals (use_residual): pass the residual [B, d_emb]")
            cols[-1] = cols[-1] + self.res_in(residual.to(self.res_in.weight.dtype))
        return torch.stack(cols, dim=1)

    def trunk(self, x: torch.Tensor, cache: list[LayerCache] | None = None, start_pos: int = 0) -> torch.Tensor:
        """x [B, T, d] at absolute positions start_pos.. -> logits [B, T, VOCAB] (BOS and PAD at -inf)."""
        T = x.shape[1]
        if start_pos + T > self.cfg.max_len:
            raise SentcodeError(f"a renderer input of {start_pos + T} positions exceeds its {self.cfg.max_len}")
        positions = torch.arange(start_pos, start_pos + T, device=x.device)
        rope = rope_cos_sin(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, rope, cache[i] if cache is not None else None)
        return self.head(self.norm(x)).float() + self.never

    def token_logprobs(self, batch: RenderBatch) -> torch.Tensor:
        """[B, T]: log P(tokens[:, t] | everything before it) in nats, 0 where the token is not counted."""
        pre, add = self.inputs(batch.codes, batch.residual)  # [B, P, d], [B, 1, d] or None
        P = pre.shape[1]
        tok = self.embed(batch.tokens).to(pre.dtype)
        x = torch.cat([pre, tok if add is None else tok + add], dim=1)  # [B, P+T, d]
        logits = self.trunk(x)[:, P : P + batch.tokens.shape[1] - 1]  # [B, T-1, V], predicting tokens[:, 1:]
        target = batch.tokens[:, 1:]
        lp = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]  # [B, T-1]
        # The first token (SEP) is never counted, so dropping it loses nothing.
        lp = torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)
        return torch.where(batch.counted, lp, torch.zeros_like(lp))

    def forward(self, batch: RenderBatch) -> torch.Tensor:
        """Mean NLL in nats per counted token (sentence bytes and EOS) of a ``RenderBatch``."""
        lp = self.token_logprobs(batch)
        return -lp.sum() / batch.counted.sum().clamp(min=1)

    def log_prob(self, codes, residual, context_bytes_list: Sequence[bytes],
                 sentence_bytes_list: Sequence[bytes]) -> torch.Tensor:
        """[B]: log P(sentence bytes, EOS | codes, residual, context) in nats, EOS included.

        codes [B, K] (ignored without use_codes), residual [B, d_emb] or None; each context keeps its last
        ``context_bytes`` bytes. Gradients flow, so this is also a training loss for callers who want one.
        """
        if codes is None:
            if self.cfg.use_codes:
                raise SentcodeError(f"this renderer reads codes: pass codes [B, {self.cfg.levels}]")
            codes = [[0] * self.cfg.levels] * len(sentence_bytes_list)
        batch = collate_render(self.cfg, codes, residual, context_bytes_list, sentence_bytes_list).to(self.device)
        return self.token_logprobs(batch).sum(dim=1)

    # ---- inference -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, codes=None, residual=None, context: bytes = b"", max_bytes: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, n: int = 1) -> list[tuple[bytes, float]]:
        """``n`` candidate sentences for one tuple, sampled in one batch with a KV cache.

        codes [K] (or [1, K]; ignored without use_codes), residual [d_emb] or None. Each candidate stops at
        EOS or after ``max_bytes`` bytes (default and limit: ``max_sentence_bytes``). Sampling goes through
        ``sentcode.nn.sampling.sample_next`` (temperature 0 is greedy); each candidate's log-prob is under
        the model itself (temperature 1, no filtering), its EOS included when it reached one, for reranking.
        """
        cfg = self.cfg
        if cfg.use_codes and codes is not None:
            c = torch.as_tensor(codes, dtype=torch.long).reshape(-1)
            if c.numel() != cfg.levels:
                raise SentcodeError(f"codes must hold {cfg.levels} levels, got shape {tuple(torch.as_tensor(codes).shape)}")
            codes = c[None]
        if residual is not None:
            residual = torch.as_tensor(residual, dtype=torch.float32).reshape(1, -1)
        return self.generate_batch(codes, residual, [context], max_bytes, temperature, top_k, top_p, generator, n)[0]

    @torch.no_grad()
    def generate_batch(self, codes=None, residual=None, contexts: Sequence[bytes] = (b"",),
                       max_bytes: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None,
                       n: int = 1) -> list[list[tuple[bytes, float]]]:
        """``n`` candidates for each of B (tuple, context) rows: B lists of (sentence bytes, log-prob).

        codes [B, K] (ignored without use_codes), residual [B, d_emb] or None, contexts B byte strings.
        Rows whose contexts (after keeping the last ``context_bytes``) have equal length run as one batch:
        the renderer has no padding mask, and once a text is longer than the window every context is full.
        """
        cfg = self.cfg
        check_sampling(temperature, top_k, top_p)
        if n < 1:
            raise SentcodeError(f"n must be at least 1, got {n}")
        max_bytes = cfg.max_sentence_bytes if max_bytes is None else max_bytes
        if not 0 <= max_bytes <= cfg.max_sentence_bytes:
            raise SentcodeError(f"max_bytes must lie in [0, {cfg.max_sentence_bytes}] (renderer.max_sentence_bytes), got {max_bytes}")
        dev = self.device
        B = len(contexts)
        if cfg.use_codes:
            if codes is None:
                raise SentcodeError(f"this renderer reads codes: pass codes [B, {cfg.levels}]")
            c = torch.as_tensor(codes, dtype=torch.long, device=dev)
            if tuple(c.shape) != (B, cfg.levels):
                raise SentcodeError(f"codes must have shape [{B}, {cfg.levels}], got {tuple(c.shape)}")
        else:
            c = torch.zeros(B, cfg.levels, dtype=torch.long, device=dev)
        r = None
        if cfg.use_residual:
            if residual is None:
                raise SentcodeError("this renderer reads residuals (use_residual): pass residual [B, d_emb]")
            r = torch.as_tensor(residual, dtype=torch.float32, device=dev).reshape(B, cfg.d_emb)
        if generator is None:
            generator = make_generator(None, dev)
        heads = [tail(bytes(ctx), cfg.context_bytes) for ctx in contexts]
        out: list[list[tuple[bytes, float]]] = [[] for _ in range(B)]
        was_training = self.training
        self.eval()
        try:
            for length in sorted({len(h) for h in heads}):
                rows = [i for i in range(B) if len(heads[i]) == length]
                idx = torch.tensor(rows, device=dev).repeat_interleave(n)  # row of each candidate
                head = torch.tensor([[SEP, *heads[i], BOS] for i in rows], device=dev).repeat_interleave(n, 0)
                got = self._sample(c[idx], None if r is None else r[idx], head, max_bytes, temperature, top_k,
                                   top_p, generator)
                for k, i in enumerate(rows):
                    out[i] = got[k * n : (k + 1) * n]
        finally:
            self.train(was_training)
        return out

    def _sample(self, codes, residual, head, max_bytes, temperature, top_k, top_p, generator):
        """Candidates for rows of codes [N, K] and equal-length head tokens [N, H], in one batch."""
        N, dev = head.shape[0], head.device
        pre, add = self.inputs(codes, residual)
        x = torch.cat([pre, self.embed(head) if add is None else self.embed(head) + add], dim=1)
        cache = self.new_cache()
        logits = self.trunk(x, cache)[:, -1]  # [N, V]
        pos = x.shape[1]
        out = [bytearray() for _ in range(N)]
        logprob = torch.zeros(N, dtype=torch.float64, device=dev)
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        # Up to max_bytes bytes, then one more draw: a full candidate is closed only if that draw is EOS.
        for _ in range(max_bytes + 1):
            tok = sample_next(logits, temperature, top_k, top_p, generator=generator)  # [N]
            lp = torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None])[:, 0]  # [N]
            live = ~done
            full = torch.tensor([len(o) >= max_bytes for o in out], device=dev)
            # A byte past max_bytes is not taken: the candidate ends unclosed and that draw is not scored.
            take = live & ((tok == EOS) | ~full)
            logprob += torch.where(take, lp.double(), torch.zeros_like(logprob))
            for i in torch.nonzero(take & (tok != EOS)).flatten().tolist():
                out[i].append(int(tok[i]))
            done |= live & ((tok == EOS) | full)
            if bool(done.all()):
                break
            nxt = self.embed(tok)[:, None]
            logits = self.trunk(nxt if add is None else nxt + add, cache, start_pos=pos)[:, -1]
            pos += 1
        return [(bytes(o), float(v)) for o, v in zip(out, logprob.tolist())]

    # ---- accounting ----------------------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per input position: 6N for the weights (lookup tables excluded) plus attention."""
        c = self.cfg
        tables = self.embed.weight.numel() + sum(e.weight.numel() for e in (self.code_emb or []))
        return 6 * (self.num_params() - tables) + 6 * c.n_layer * c.d_model * seq_len
