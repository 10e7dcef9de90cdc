"""The flat decoder LM over bytes or BPE tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sentcode.config import ModelConfig
from sentcode.nn import CausalSelfAttention, DualFFN, LayerCache, RMSNorm, SwiGLU, rope_cos_sin
from sentcode.nn.init import init_weights


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.pos, cfg.attn_window)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.ffn == "dual":
            small = max(32, int(round(cfg.dual_small_mult * cfg.d_model / 32)) * 32)
            self.ffn = DualFFN(cfg.d_model, small, cfg.ffn_hidden, cfg.capacity_factor)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, positions, rope, cache, pad_mask=None, key_floor=None):
        x = x + self.attn(self.norm1(x), positions, rope, cache, pad_mask=pad_mask, key_floor=key_floor)
        return x + self.ffn(self.norm2(x))


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        init_weights(self, cfg.n_layer)

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.blocks]

    def forward(self, idx: torch.Tensor, cache: list[LayerCache] | None = None, start_pos: int = 0,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx: [B, T] token ids at absolute positions start_pos..start_pos+T-1 -> logits [B, T, V].

        pad_mask: [B, cached + T] bool, False at left padding (batched generation; see ``infer.batch``).
        """
        B, T = idx.shape
        positions = torch.arange(start_pos, start_pos + T, device=idx.device)
        rope = rope_cos_sin(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta) if self.cfg.pos == "rope" else None
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, rope, cache[i] if cache is not None else None, pad_mask)
        return self.head(self.norm(x))

    def aux_loss(self) -> torch.Tensor:
        """Router balance loss summed over layers (zero without dual FFNs); valid after a forward."""
        losses = [b.ffn.aux_loss for b in self.blocks if isinstance(b.ffn, DualFFN)]
        return self.cfg.balance_coef * torch.stack(losses).sum() if losses else torch.zeros(())

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return next_token_loss(self(idx), targets, mask)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N for weights plus attention score work."""
        c = self.cfg
        n = self.num_params(non_embedding=True) + (0 if not c.tie_embeddings else self.embed.weight.numel())
        span = min(seq_len, c.attn_window or seq_len)
        return 6 * n + 6 * c.n_layer * c.d_model * span


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy in float32 over the targets that count (all of them without a mask)."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if mask is None:
        return ce.mean()
    m = mask.reshape(-1).float()
    return (ce * m).sum() / m.sum().clamp(min=1)
