"""Where a model runs: a PyTorch module's parameters, or the ``device`` a runtime-backed model declares."""

from __future__ import annotations

import torch


def model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device
