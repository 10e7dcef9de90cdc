"""Weight initialisation shared by every model: GPT-2 style."""

from __future__ import annotations

import torch.nn as nn


def init_weights(model: nn.Module, depth: int, std: float = 0.02) -> None:
    """Normal(0, std) for every linear and embedding weight; the residual-branch outputs (attention ``wo``,
    SwiGLU ``w_down``) shrink with depth, std / sqrt(2 * depth), so the residual stream does not grow."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
    for name, p in model.named_parameters():
        if name.endswith("wo.weight") or name.endswith("w_down.weight"):
            nn.init.normal_(p, std=std / (2 * depth) ** 0.5)
