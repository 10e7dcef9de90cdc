"""Grouped-query attention with RoPE or ALiBi, an optional sliding window and a KV cache.

Causal by default; ``causal=False`` gives the bidirectional attention of an encoder, with a key-padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sentcode.nn.layers import alibi_slopes, apply_rope


@dataclass
class LayerCache:
    """Keys and values of one layer for the tokens seen so far: [B, n_kv_head, T_cached, head_dim]."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk] mask, True where query may attend: keys at or before the query's absolute position.

    Positions are absolute, so the mask is right for a cache of any length (the top-left-aligned
    ``is_causal=True`` mask is wrong as soon as queries and keys differ in number).
    """
    rel = q_pos[:, None] - k_pos[None, :]
    allowed = rel >= 0
    if window is not None:
        allowed &= rel < window
    return allowed


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                    key_floor: torch.Tensor | None = None) -> torch.Tensor:
    """Causal sliding-window attention in blocks: each query sees itself and the ``window - 1`` keys before it.

    q, k, v: [B, H, T, D] (kv heads already expanded). Queries are cut into blocks of ``window``; a block
    attends to itself and the block before it, so the work is O(T * 2 * window) instead of O(T^2) and no
    [T, T] mask is ever built (a 4,096-byte row would need 16M mask entries per layer). ``key_floor`` [B, T]:
    the first key index each query may see besides (its own key is always kept).
    """
    B, H, T, D = q.shape
    W = window
    pad = (-T) % W
    if pad:  # padded keys sit after every real query, so the causal mask never lets a real query see them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = (T + pad) // W
    qb, kb, vb = (t.reshape(B, H, n, W, D) for t in (q, k, v))
    kk = torch.cat([F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :n], kb], dim=3)  # [B, H, n, 2W, D]: previous block, this one
    vv = torch.cat([F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :n], vb], dim=3)
    rel = torch.arange(W, device=q.device)[:, None] + W - torch.arange(2 * W, device=q.device)[None, :]
    allowed = (rel >= 0) & (rel < W)  # [W, 2W]
    mask = allowed.expand(n, W, 2 * W).clone()
    mask[0, :, :W] = False  # block 0 has no previous block
    if key_floor is not None:
        floor = F.pad(key_floor, (0, pad)).reshape(B, n, W, 1)
        kidx = (torch.arange(n, device=q.device)[:, None] - 1) * W + torch.arange(2 * W, device=q.device)[None, :]
        mask = (mask[None] & (kidx[None, :, None, :] >= floor))[:, None]  # [B, 1, n, W, 2W]
    y = F.scaled_dot_product_attention(qb, kk, vv, attn_mask=mask)
    return y.reshape(B, H, n * W, D)[:, :, :T]


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, n_kv_head: int, pos: str = "rope", window: int | None = None,
                 causal: bool = True):
        super().__init__()
        if not causal and window is not None:
            raise ValueError("a sliding window is only defined for causal attention")
        self.causal = causal
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = d_model // n_head
        self.pos, self.window = pos, window
        self.wq = nn.Linear(d_model, n_head * self.head_dim, bias=False)
        self.wkv = nn.Linear(d_model, 2 * n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, d_model, bias=False)
        if pos == "alibi":
            self.register_buffer("slopes", alibi_slopes(n_head), persistent=False)

    def forward(self, x, positions, rope=None, cache: LayerCache | None = None, key_mask: torch.Tensor | None = None,
                pad_mask: torch.Tensor | None = None, key_floor: torch.Tensor | None = None):
        """x: [B, T, D]; positions: [T] absolute positions of these tokens; rope: (cos, sin) for them.

        key_mask: [B, Tk] bool, True for real tokens; bidirectional attention only (padding never needs
        masking in causal attention when sequences are right-padded).

        pad_mask: [B, Tk] bool over every key of this call (cached ones first), False at left padding; causal
        attention only. Left padding lets rows of different lengths share a batch and a cache: positions
        enter only as differences, so a left-padded row gets the results it would get alone. A query always
        keeps its own key, so a padding query is never left with no key at all (a softmax over nothing is
        NaN, and NaN would reach the cache).

        key_floor: [B, T] long, the first key index (in this call, no cache) each query may see besides its
        own key; causal attention only (a sentence-step renderer cut off from earlier segments in training).
        """
        if key_floor is not None and (cache is not None or not self.causal or self.pos != "rope"):
            raise ValueError("key_floor is only supported for causal rope attention without a cache")
        if key_mask is not None and self.causal:
            raise ValueError("key_mask is only supported with causal=False")
        if pad_mask is not None and not self.causal:
            raise ValueError("pad_mask is only supported with causal=True (use key_mask)")
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k, v = self.wkv(x).view(B, T, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, Hkv, T, hd]
        if self.pos == "rope":
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if (cache is None and pad_mask is None and self.causal and self.pos == "rope" and self.window is not None
                and T > 2 * self.window):
            rep = self.n_head // self.n_kv_head
            kx, vx = (k, v) if rep == 1 else (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
            y = local_attention(q, kx, vx, self.window, key_floor)
            return self.wo(y.transpose(1, 2).reshape(B, T, -1))
        if cache is not None:
            if cache.k is not None:
                k = torch.cat([cache.k, k], dim=2)
                v = torch.cat([cache.v, v], dim=2)
            cache.k, cache.v = k, v
        Tk = k.shape[2]
        k_pos = positions[-1] - Tk + 1 + torch.arange(Tk, device=x.device)
        mask = None
        is_causal = False
        pad_ok = None  # [B, 1, Tq, Tk]
        if pad_mask is not None:
            pad_ok = pad_mask[:, None, None, :] | (positions[:, None] == k_pos[None, :])
        if not self.causal:
            mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, Tk]
            if self.pos == "alibi":
                dist = (positions[:, None] - k_pos[None, :]).abs().to(torch.float32)
                bias = -self.slopes[:, None, None] * dist  # distance penalty in both directions
                mask = (bias if mask is None else bias.masked_fill(~mask, float("-inf"))).to(q.dtype)
        elif self.pos == "alibi":
            rel = (positions[:, None] - k_pos[None, :]).to(torch.float32)
            bias = -self.slopes[:, None, None] * rel  # [H, Tq, Tk]
            allowed = causal_mask(positions, k_pos, self.window)
            if pad_ok is not None:
                allowed = allowed & pad_ok
            mask = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)
        elif pad_ok is not None:
            mask = causal_mask(positions, k_pos, self.window) & pad_ok
        elif key_floor is not None:
            idx = torch.arange(T, device=x.device)  # no cache: key i is query i
            mask = (causal_mask(positions, k_pos, self.window)[None] & ((idx[None, None, :] >= key_floor[:, :, None])
                    | (idx[:, None] == idx[None, :])[None]))[:, None]  # [B, 1, T, Tk]
        elif self.window is not None or Tk != T:
            if T > 1 or self.window is not None:
                mask = causal_mask(positions, k_pos, self.window)
        else:
            is_causal = True
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))
