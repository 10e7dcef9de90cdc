"""The planner of the sentence-step LM: a causal transformer over sentences, one step per sentence.

A document's sentences are embedded (e [N, d_emb]), quantized by a ``ResidualVQ`` into code tuples
c [N, K] and, optionally, the continuous residual r = e - decode(c) the codes leave over. The planner
models the tuple sequence: step t reads tuple t (and r_t), and the hidden state h_t predicts tuple t+1.

The next tuple is predicted level by level, each level conditioned on the levels already chosen:

    logits_l = Head_l(h_t + sum_{j<l} CondEmb_j(c_{t+1,j}))

so a sampled tuple is a coherent point of the quantizer's tree rather than K independent guesses. Training
uses teacher forcing (the true earlier levels); sampling picks the levels one after another.

The optional residual head predicts r_{t+1} from h_t and the whole next tuple. Its target is exactly the
residual the next step reads as input (e - decode(c)), so what inference feeds back is what training
taught: ``join_embeddings(rvq, codes, residual)`` turns a tuple and its residual back into an embedding.

Step 0 of a document reads a learned BOS vector, so the first sentence is predicted too. A window that
starts inside a document reads the preceding tuple instead of BOS (``prev_codes``); this is also what
``sample_next`` does once a history outgrows ``max_steps``, so truncated contexts look the same in
training and at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from sentcode.config import ModelConfig, RunConfig, TrainConfig
from sentcode.errors import ConfigError, SentcodeError
from sentcode.nn.sampling import check_sampling, sample_next as sample_logits
from sentcode.models.lm import Block
from sentcode.nn import RMSNorm, SwiGLU, rope_cos_sin

FAMILY = "sentence-planner"


@dataclass
class PlannerConfig:
    levels: int = 4  # K: code levels per sentence
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256, 256])  # V_l, one per level
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    ffn_mult: float = 2.75
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_steps: int = 128  # context, in sentences (BOS included)
    use_residual: bool = False  # read and predict the continuous residual e - decode(c)
    d_emb: int = 128  # size of the sentence embeddings (and of their residuals)
    residual_weight: float = 1.0  # weight of the residual MSE in the loss

    def validate(self) -> None:
        if not isinstance(self.levels, int) or self.levels < 1:
            raise ConfigError(f"planner.levels must be a positive integer, got {self.levels!r}")
        sizes = self.codebook_sizes
        if (not isinstance(sizes, (list, tuple)) or len(sizes) != self.levels
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes)):
            raise ConfigError(
                f"planner.codebook_sizes must list {self.levels} positive integers (one per level), got {sizes!r}"
            )
        self.codebook_sizes = [int(v) for v in sizes]  # a tuple would not survive yaml.safe_dump
        if min(self.d_model, self.n_layer, self.n_head, self.n_kv_head, self.d_emb) <= 0:
            raise ConfigError("planner.d_model, n_layer, n_head, n_kv_head and d_emb must be positive")
        if self.d_model % self.n_head:
            raise ConfigError(f"planner.n_head={self.n_head} does not divide planner.d_model={self.d_model}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"planner.n_kv_head={self.n_kv_head} does not divide planner.n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ConfigError("planner.d_model / planner.n_head (the head size) must be even for rotary positions")
        if self.max_steps < 2:
            raise ConfigError("planner.max_steps must be at least 2")
        if self.ffn_mult <= 0:
            raise ConfigError("planner.ffn_mult must be positive")
        if self.residual_weight < 0:
            raise ConfigError("planner.residual_weight must be >= 0")

    def model_config(self) -> ModelConfig:
        """The LM block settings the planner's trunk is built from."""
        return ModelConfig(d_model=self.d_model, n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_kv_head,
                           ffn_mult=self.ffn_mult, max_seq_len=self.max_steps, pos="rope",
                           rope_theta=self.rope_theta, norm_eps=self.norm_eps)


@dataclass
class PlannerTrainConfig(TrainConfig):
    """``TrainConfig`` with planner defaults: ``seq_len`` is a window in sentences, not tokens.

    A subclass rather than a ``default_factory``: ``sentcode.config._from_dict`` rebuilds a section from its
    class defaults, so factory-made defaults would vanish as soon as any ``train.*`` key was set.
    """

    seq_len: int = 128
    micro_batch: int = 16
    batch_tokens: int = 2048  # sentences per optimizer step
    eval_max_tokens: int | None = 50_000  # sentences scored by a periodic evaluation


@dataclass
class PlannerRunConfig(RunConfig):
    """A planner and how to train it; ``train.seq_len`` must not exceed ``planner.max_steps``."""

    planner: PlannerConfig = field(default_factory=PlannerConfig)
    train: PlannerTrainConfig = field(default_factory=PlannerTrainConfig)
    family: str = FAMILY

    kind = "planner"

    def check(self) -> None:
        if self.train.seq_len > self.planner.max_steps:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds planner.max_steps={self.planner.max_steps}"
            )



def load_planner_config(preset: str | None = None, overrides: list[str] | None = None) -> PlannerRunConfig:
    """A validated ``PlannerRunConfig`` from an optional YAML file plus ``key.sub=value`` overrides."""
    from sentcode.config import load_config

    return load_config(preset, overrides, cls=PlannerRunConfig)


# ---- the link between embeddings and what the planner reads ------------------------------------------------


@torch.no_grad()
def split_embeddings(rvq, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [..., K] and residual [..., d] of embeddings [..., d]: emb == decode(codes) + residual."""
    codes = rvq.encode(emb)
    return codes, emb.float() - rvq.decode(codes)


@torch.no_grad()
def join_embeddings(rvq, codes: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The embedding a tuple (and its residual, when there is one) stands for."""
    e = rvq.decode(codes)
    return e if residual is None else e + residual.float().to(e.device)


# ---- the model ---------------------------------------------------------------------------------------------


class _Head(nn.Module):
    """A residual SwiGLU on the conditioned state, then a projection: one per level (and one for r)."""

    def __init__(self, d: int, hidden: int, out: int, eps: float):
        super().__init__()
        self.norm1 = RMSNorm(d, eps)
        self.ffn = SwiGLU(d, hidden)
        self.norm2 = RMSNorm(d, eps)
        self.out = nn.Linear(d, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ffn(self.norm1(x))
        return self.out(self.norm2(x))


class Planner(nn.Module):
    def __init__(self, cfg: PlannerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mcfg = cfg.model_config()
        d, K = cfg.d_model, cfg.levels
        self.code_emb = nn.ModuleList(nn.Embedding(v, d) for v in cfg.codebook_sizes)
        self.res_in = nn.Linear(cfg.d_emb, d, bias=False) if cfg.use_residual else None
        self.bos = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(Block(mcfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(d, cfg.norm_eps)
        # The last level conditions only the residual head: without it that table would get no gradient
        # (and DDP would complain about unused parameters).
        n_cond = K if cfg.use_residual else K - 1
        self.cond_emb = nn.ModuleList(nn.Embedding(cfg.codebook_sizes[j], d) for j in range(n_cond))
        self.heads = nn.ModuleList(_Head(d, mcfg.ffn_hidden, v, cfg.norm_eps) for v in cfg.codebook_sizes)
        self.res_head = _Head(d, mcfg.ffn_hidden, cfg.d_emb, cfg.norm_eps) if cfg.use_residual else None
        self.apply(self._init)
        nn.init.normal_(self.bos, std=0.02)
        # GPT-2 style: shrink the residual-branch outputs with depth, as in the LM
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    # ---- inputs ----------------------------------------------------------------------------------------------

    def _check(self, codes, residual, mask):
        K = self.cfg.levels
        if codes.dim() != 3 or codes.shape[-1] != K:
            raise SentcodeError(f"planner codes must have shape [B, S, {K}], got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point:
            raise SentcodeError(f"planner codes must be integers, got {codes.dtype}")
        if self.cfg.use_residual:
            if residual is None:
                raise SentcodeError("this planner reads residuals (use_residual): pass residual [B, S, d_emb]")
            if residual.shape != (*codes.shape[:2], self.cfg.d_emb):
                raise SentcodeError(f"planner residual must have shape {(*codes.shape[:2], self.cfg.d_emb)}, "
                                    f"got {tuple(residual.shape)}")
        if mask is not None and mask.shape != codes.shape[:2]:
            raise SentcodeError(f"planner mask must have shape {tuple(codes.shape[:2])}, got {tuple(mask.shape)}")
        if codes.shape[1] > self.cfg.max_steps:
            raise SentcodeError(f"{codes.shape[1]} steps exceed planner.max_steps={self.cfg.max_steps}")

    def _safe(self, codes: torch.Tensor, level: int) -> torch.Tensor:
        # Padding may hold any value; clamping keeps the lookup legal without touching real codes.
        return codes[..., level].long().clamp(0, self.cfg.codebook_sizes[level] - 1)

    def step_embed(self, codes: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """What one step reads: codes [..., K] (+ residual [..., d_emb]) -> [..., d_model]."""
        x = sum(emb(self._safe(codes, l)) for l, emb in enumerate(self.code_emb))
        if self.res_in is not None:
            x = x + self.res_in(residual.to(self.res_in.weight.dtype))
        return x

    def hidden(self, codes, residual=None, prev_codes=None, prev_residual=None) -> torch.Tensor:
        """h [B, S, d]: h_t has read steps < t of the window, so it predicts tuple t.

        Inputs are shifted: (BOS or prev, tuple_0, ..., tuple_{S-2}). ``prev_codes`` [B, K] is the tuple
        before the window, with -1 in rows whose window starts the document (they read BOS).
        """
        B, S = codes.shape[:2]
        if self.res_in is not None and residual is None:
            raise SentcodeError("this planner reads residuals (use_residual): pass residual [B, S, d_emb]")
        bos = self.bos.expand(B, -1)  # [B, d]
        if prev_codes is None:
            first = bos
        else:
            is_bos = prev_codes[:, 0] < 0  # [B]
            if self.res_in is not None and prev_residual is None:
                prev_residual = torch.zeros(B, self.cfg.d_emb, device=codes.device)
            # torch.where keeps BOS in the graph when no row uses it, which DDP needs
            first = torch.where(is_bos[:, None], bos, self.step_embed(prev_codes, prev_residual))  # [B, d]
        rest = self.step_embed(codes[:, :-1], None if residual is None else residual[:, :-1])  # [B, S-1, d]
        x = torch.cat([first[:, None].to(rest.dtype), rest], dim=1)  # [B, S, d]
        positions = torch.arange(S, device=codes.device)
        rope = rope_cos_sin(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta)
        for block in self.blocks:
            x = block(x, positions, rope, None)
        return self.norm(x)

    def level_outputs(self, h: torch.Tensor, codes: torch.Tensor):
        """Teacher-forced per-level logits (list of [B, S, V_l]) and the residual prediction [B, S, d_emb].

        Level l sees h plus the embeddings of the target tuple's levels < l; the residual head sees all K.
        """
        cond = h
        logits = []
        for l, head in enumerate(self.heads):
            logits.append(head(cond))
            if l < len(self.cond_emb):
                cond = cond + self.cond_emb[l](self._safe(codes, l))
        res = self.res_head(cond) if self.res_head is not None else None
        return logits, res

    # ---- training and scoring ----------------------------------------------------------------------------------

    def score(self, codes, residual=None, mask=None, prev_codes=None, prev_residual=None) -> dict:
        """Per-step statistics: nll [B, S, K] (nats), correct [B, S, K] (argmax given the true earlier
        levels), residual_se [B, S] (summed squared error, when use_residual) and residual_pred."""
        self._check(codes, residual, mask)
        h = self.hidden(codes, residual, prev_codes, prev_residual)
        logits, res = self.level_outputs(h, codes)
        nll, correct = [], []
        for l, lg in enumerate(logits):
            target = self._safe(codes, l)  # [B, S]
            nll.append(F.cross_entropy(lg.float().transpose(1, 2), target, reduction="none"))
            correct.append(lg.argmax(-1) == target)
        out = {"nll": torch.stack(nll, -1), "correct": torch.stack(correct, -1)}
        if res is not None:
            out["residual_pred"] = res
            out["residual_se"] = (res.float() - residual.float()).pow(2).sum(-1)
        return out

    def forward(self, codes, residual=None, mask=None, prev_codes=None, prev_residual=None) -> dict:
        """codes [B, S, K], residual [B, S, d_emb] | None, mask [B, S] bool (True = a real step that counts).

        Position t predicts tuple t. Masked-out steps are still read as inputs by later steps, so padding
        belongs at the right end. Returns loss (summed level NLLs + weighted residual MSE), level_nll [K]
        and level_acc [K] (means over real steps), exact_match, and residual_mse / residual_pred when
        use_residual.
        """
        s = self.score(codes, residual, mask, prev_codes, prev_residual)
        m = torch.ones(codes.shape[:2], dtype=torch.bool, device=codes.device) if mask is None else mask.bool()
        w = m.float()  # [B, S]
        n = w.sum().clamp(min=1)
        level_nll = (s["nll"] * w[..., None]).sum((0, 1)) / n  # [K]
        correct = s["correct"].float()
        out = {
            "level_nll": level_nll,
            "level_acc": (correct * w[..., None]).sum((0, 1)) / n,
            "exact_match": (correct.prod(-1) * w).sum() / n,
        }
        loss = level_nll.sum()
        if "residual_se" in s:
            # where, not a product: padding residuals may be anything, NaN included
            mse = torch.where(m, s["residual_se"], 0.0).sum() / (n * self.cfg.d_emb)
            out["residual_mse"] = mse
            out["residual_pred"] = s["residual_pred"]
            loss = loss + self.cfg.residual_weight * mse
        out["loss"] = loss
        return out

    def log_prob(self, codes, residual=None, mask=None, prev_codes=None, prev_residual=None) -> torch.Tensor:
        """[B, S]: sum over levels of log P(c_{t,l} | history, c_{t,<l}) in nats; 0 at masked-out steps."""
        lp = -self.score(codes, residual, mask, prev_codes, prev_residual)["nll"].sum(-1)
        return lp if mask is None else lp * mask.float()

    # ---- inference -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_next(self, history_codes: torch.Tensor, history_residual: torch.Tensor | None = None,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None):
        """The next tuple after one document's history: (codes [K], residual [d_emb] or None, logprob).

        history_codes [1, S, K]; see ``sample_next_batch``, which this calls with a batch of one.
        """
        if history_codes.dim() != 3 or history_codes.shape[0] != 1:
            raise SentcodeError(f"history_codes must have shape [1, S, {self.cfg.levels}], got {tuple(history_codes.shape)}")
        codes, residual, logprob = self.sample_next_batch(history_codes, history_residual, temperature, top_k,
                                                          top_p, generator)
        return codes[0], None if residual is None else residual[0], float(logprob[0])

    @torch.no_grad()
    def sample_next_batch(self, history_codes: torch.Tensor, history_residual: torch.Tensor | None = None,
                          temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                          generator: torch.Generator | None = None):
        """The next tuple after each of B histories of equal length: (codes [B, K], residual [B, d_emb] or
        None, logprob [B]).

        history_codes [B, S, K] (S may be 0: the documents' first sentence). Levels are sampled in order,
        each with ``sentcode.nn.sampling.sample_next``; temperature 0 is greedy per level. ``logprob`` is
        each tuple's log-probability in nats under the model itself (temperature 1, no filtering), i.e. its
        plan code length. The residual is the head's prediction; append it with the codes to the history.

        A history longer than ``max_steps - 1`` keeps its most recent ``max_steps`` steps, the oldest of
        them read in BOS's place, as training windows that start inside a document do. There is no KV
        cache: the trunk is re-run over at most ``max_steps`` steps, which is cheap next to a sentence.
        """
        check_sampling(temperature, top_k, top_p)
        if history_codes.dim() != 3 or history_codes.shape[0] < 1 or history_codes.shape[-1] != self.cfg.levels:
            raise SentcodeError(f"history_codes must have shape [B, S, {self.cfg.levels}], got {tuple(history_codes.shape)}")
        if self.cfg.use_residual and history_residual is None:
            raise SentcodeError("this planner reads residuals (use_residual): pass history_residual [B, S, d_emb]")
        B, K, E = history_codes.shape[0], self.cfg.levels, self.cfg.d_emb
        dev = self.bos.device
        codes = history_codes.to(dev).long()
        res = history_residual.to(dev).float() if (self.cfg.use_residual and history_residual is not None) else None
        prev_codes = prev_res = None
        keep = self.cfg.max_steps - 1  # window = kept history + the slot being predicted
        if codes.shape[1] > keep:
            prev_codes = codes[:, -keep - 1]
            prev_res = None if res is None else res[:, -keep - 1]
            codes = codes[:, -keep:]
            res = None if res is None else res[:, -keep:]
        # A placeholder for the step being predicted: causal, so its value reaches nothing we read.
        codes = torch.cat([codes, codes.new_zeros(B, 1, K)], dim=1)  # [B, S+1, K]
        if res is not None:
            res = torch.cat([res, res.new_zeros(B, 1, E)], dim=1)
        was_training = self.training
        self.eval()
        try:
            cond = self.hidden(codes, res, prev_codes, prev_res)[:, -1]  # [B, d]
            chosen, logprob = [], torch.zeros(B, dtype=torch.float64, device=dev)
            for l, head in enumerate(self.heads):
                logits = head(cond).float()  # [B, V_l]
                c = sample_logits(logits, temperature, top_k, top_p, generator)  # [B]
                logprob += torch.log_softmax(logits, -1).gather(-1, c[:, None])[:, 0].double()
                chosen.append(c)
                if l < len(self.cond_emb):
                    cond = cond + self.cond_emb[l](c)
            residual = self.res_head(cond).float() if self.res_head is not None else None
        finally:
            self.train(was_training)
        return torch.stack(chosen, dim=1), residual, logprob

    # ---- accounting ----------------------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_step(self, seq_len: int) -> float:
        """Training FLOPs per sentence step: 6N for the weights (lookup tables excluded) plus attention."""
        c = self.cfg
        tables = sum(e.weight.numel() for e in [*self.code_emb, *self.cond_emb])
        return 6 * (self.num_params() - tables) + 6 * c.n_layer * c.d_model * seq_len
