"""A small bidirectional byte transformer that maps a sentence to one unit vector.

Each sentence is ``BOS`` followed by its UTF-8 bytes (the BOS gives an empty sentence something to pool),
right-padded with ``PAD``. Padding is hidden from attention by a key mask and left out of the mean pool, and
rotary positions start at 0 for every sentence, so an embedding does not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sentcode.models.sentence.config import EncoderConfig
from sentcode.nn import CausalSelfAttention, RMSNorm, SwiGLU, rope_cos_sin

BOS_ID = 256
PAD_ID = 258


def collate_bytes(sentences: Sequence[bytes], max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, T] int64, mask [B, T] bool)``: BOS + the first ``max_bytes`` bytes of each, right-padded."""
    lengths = [1 + min(len(s), max_bytes) for s in sentences]
    T = max(lengths, default=1)
    ids = np.full((len(sentences), T), PAD_ID, dtype=np.int64)
    ids[:, 0] = BOS_ID
    for i, s in enumerate(sentences):
        n = lengths[i] - 1
        if n:
            ids[i, 1 : 1 + n] = np.frombuffer(s[:n], dtype=np.uint8)
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    return torch.from_numpy(ids), torch.from_numpy(mask)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head, cfg.kv_heads, "rope", causal=False)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, positions, rope, key_mask):
        x = x + self.attn(self.norm1(x), positions, rope, key_mask=key_mask)
        return x + self.ffn(self.norm2(x))


class ByteSentenceEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(cfg.d_model, cfg.d_emb, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w_down.weight"):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: [B, T] (as from ``collate_bytes``) -> L2-normalised embeddings [B, d_emb]."""
        T = ids.shape[1]
        positions = torch.arange(T, device=ids.device)
        rope = rope_cos_sin(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, positions, rope, mask)
        x = self.norm(x)
        w = mask.to(x.dtype).unsqueeze(-1)
        pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)
        # Normalise in float32: in bf16 the unit norm would be off by ~1e-2.
        return F.normalize(self.proj(pooled).float(), dim=-1)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @torch.no_grad()
    def encode_bytes(self, sentences: Sequence[bytes], batch_size: int = 64) -> np.ndarray:
        """Embeddings of ``sentences`` as float32 [N, d_emb], computed in eval mode.

        Batches hold sentences of similar length (sorted by length), so little compute goes to padding;
        the rows come back in the input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        sentences = [bytes(s) for s in sentences]
        out = np.empty((len(sentences), self.cfg.d_emb), dtype=np.float32)
        order = np.argsort([min(len(s), self.cfg.max_bytes) for s in sentences], kind="stable")
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ids, mask = collate_bytes([sentences[i] for i in idx], self.cfg.max_bytes)
                out[idx] = self(ids.to(self.device), mask.to(self.device)).cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``encode_bytes`` of the UTF-8 text (surrogate-escaped characters become their original bytes)."""
        return self.encode_bytes([s.encode("utf-8", "surrogateescape") for s in sentences], batch_size)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_byte(self, mean_len: float) -> float:
        """Training FLOPs per input byte (forward + backward): 6N for weights plus attention score work."""
        c = self.cfg
        weights = self.num_params() - self.embed.weight.numel()  # a lookup is not a matmul
        return 6 * weights + 6 * c.n_layer * c.d_model * mean_len
