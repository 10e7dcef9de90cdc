"""Where a model runs (a PyTorch module's parameters, or the ``device`` a runtime-backed model declares), and the
float32 its running statistics keep whatever dtype the module is moved to."""

from __future__ import annotations

import torch
import torch.nn as nn


def model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def keep_float32(module: nn.Module) -> None:
    """Turn the module's own floating-point buffers back to float32 (call it after ``nn.Module._apply``): EMA
    statistics underflow in bf16."""
    for name, buf in module._buffers.items():
        if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
            module._buffers[name] = buf.float()
