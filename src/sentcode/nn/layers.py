"""Transformer building blocks: RMSNorm, SwiGLU, the dual-FFN router, rotary and ALiBi positions.

This module imports only torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class DualFFN(nn.Module):
    """Two SwiGLU experts of different widths and a learned top-1 router.

    Unlike a hard argmax switch, the chosen expert's output is scaled by the router probability, so the
    router receives gradient; a Switch-style balance loss keeps both experts in use; each expert takes at
    most ``capacity_factor * tokens / 2`` tokens and the overflow passes through the residual unchanged.
    """

    def __init__(self, dim: int, small_hidden: int, large_hidden: int, capacity_factor: float = 1.25):
        super().__init__()
        self.router = nn.Linear(dim, 2, bias=False)
        self.experts = nn.ModuleList([SwiGLU(dim, small_hidden), SwiGLU(dim, large_hidden)])
        self.capacity_factor = capacity_factor
        self.aux_loss = torch.zeros(())
        self.last_load = torch.zeros(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, D]
        n = flat.shape[0]
        probs = torch.softmax(self.router(flat).float(), dim=-1)  # [N, 2]
        gate, choice = probs.max(dim=-1)  # [N]
        capacity = max(1, int(math.ceil(self.capacity_factor * n / 2)))
        out = torch.zeros_like(flat)
        load = []
        for e, expert in enumerate(self.experts):
            idx = (choice == e).nonzero(as_tuple=True)[0][:capacity]  # first-come tokens fit in capacity
            load.append((choice == e).float().mean())
            if idx.numel():
                y = (expert(flat[idx]) * gate[idx, None]).to(out.dtype)
                out = out.index_copy(0, idx, y)
        frac = torch.stack(load)  # share of tokens routed to each expert (no gradient)
        self.aux_loss = 2.0 * (frac.detach() * probs.mean(dim=0)).sum()  # = 1 when balanced
        self.last_load = frac.detach()
        return out.reshape(shape)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos/sin tables for absolute ``positions`` (any length, any offset): [T, head_dim // 2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) by the position's angle: a true rotation, norms are kept.

    x: [B, H, T, D]; cos, sin: [T, D/2].
    """
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    y1 = x1 * cos - x2 * sin
    y2 = x1 * sin + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Geometric slopes from the ALiBi paper, extended for head counts that are not powers of two."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * (start**i) for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = pow2(n_head)
    else:
        closest = 2 ** math.floor(math.log2(n_head))
        slopes = pow2(closest) + pow2(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)
