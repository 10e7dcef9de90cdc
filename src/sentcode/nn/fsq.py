"""Finite scalar quantization (Mentzer et al. 2023, arXiv 2309.15505): ``quantized, codes, loss = fsq(x)``.

Each of the ``dim`` input coordinates is bounded by a tanh to ``size`` values and rounded to the nearest one;
the code of a vector is the tuple of its rounded coordinates, an implicit codebook of ``size ** dim`` entries.
There is nothing to learn in the quantizer, so it has none of a learned codebook's failure modes: no codebook
to collapse onto one code, no dead codes to restart, no EMA statistics, no commitment loss (``loss`` is 0). The
gradient reaches the input straight through the rounding. Measured on this project's autoencoder: the EMA
vector quantizer's codebooks collapsed to one code whenever its input's spread shrank (benchmarks/RESULTS.md);
an FSQ code cannot, as every coordinate is read on its own fixed grid.

``normalize`` standardises each coordinate before the bound, as the residual VQ does for its inputs:
``"running"`` by statistics that follow the data (an EMA updated by every training batch), ``"batch"`` by each
training batch's own (the running ones at inference), ``None`` not at all. Measured without it: the trained
compressor's projected outputs spread 0.003-0.006 around their means, every segment rounded to the same grid
point and the expander learned to ignore the codes (every coordinate's perplexity 1.0 at evaluation).

The interface is the residual VQ's (``nn.rvq``), so a model swaps one for the other: ``levels`` is the number of
coordinates (each one code "level" with ``size`` values, predicted one after the other by a code LM) and
``codebook_sizes`` lists ``size`` per coordinate. Written here because the rounding is a few lines of tensor
arithmetic and the model needs the residual VQ's interface around it.

This module imports torch and ``nn.device`` (float32 statistics).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from sentcode.nn.device import keep_float32


class FSQ(nn.Module):
    NORMALIZE_MODES = (None, "running", "batch")

    def __init__(self, dim: int, size: int, eps: float = 1e-3, normalize: str | None = None, decay: float = 0.99):
        super().__init__()
        if dim < 1 or size < 3:  # with 2 values the half-step shift of even grids leaves tanh's range
            raise ValueError(f"FSQ needs dim >= 1 and size >= 3, got dim={dim}, size={size}")
        if normalize not in self.NORMALIZE_MODES:
            raise ValueError(f"FSQ normalize must be one of {self.NORMALIZE_MODES}, got {normalize!r}")
        self.normalize = normalize
        self.decay = decay
        self.dim = self.levels = dim
        self.size = size
        self.codebook_sizes = [size] * dim
        # Even sizes have no value at 0: the grid is shifted by half a step, so the bound's centre moves too.
        self.half = (size - 1) * (1 - eps) / 2
        self.offset = 0.5 if size % 2 == 0 else 0.0
        self.shift = math.atanh(self.offset / self.half)
        self.register_buffer("counts", torch.zeros(dim, size))  # code use per coordinate, for training logs
        if normalize is not None:
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("var", torch.ones(dim))
            self.register_buffer("norm_ready", torch.tensor(False))

    def _apply(self, fn, recurse=True):  # the statistics stay float32 whatever the module's dtype
        super()._apply(fn, recurse)
        keep_float32(self)
        return self

    @torch.no_grad()
    def set_statistics(self, x: torch.Tensor) -> None:
        """Set the inference statistics from inputs ``x [..., dim]`` (a calibration pass with final weights)."""
        if self.normalize is None:
            raise ValueError("this quantizer does not standardise its inputs: there are no statistics to set")
        flat = x.detach().float().reshape(-1, self.dim)
        self._follow(flat.mean(0), flat.var(0, unbiased=False), share=1.0)

    def _follow(self, mean: torch.Tensor, var: torch.Tensor, share: float) -> None:
        """Move the statistics ``share`` of the way to (mean, var); the first time, all the way."""
        share = share if bool(self.norm_ready) else 1.0
        self.mean.lerp_(mean, share)
        self.var.lerp_(var, share)
        self.norm_ready.fill_(True)

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] float32 -> per-coordinate standardised; in training also follows the statistics."""
        if self.normalize is None:
            return x
        flat = x.detach().reshape(-1, self.dim)
        if self.training and flat.shape[0] > 1:
            with torch.no_grad():
                m, v = flat.mean(0), flat.var(0, unbiased=False)
                self._follow(m, v, share=1 - self.decay)
            if self.normalize == "batch":
                return (x - m) / (v + 1e-10).sqrt()
        return (x - self.mean) / (self.var + 1e-10).sqrt()

    def _bound(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x + self.shift) * self.half - self.offset

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"FSQ expects inputs with last dimension {self.dim}, got shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            b = self._bound(self._standardise(x.float()))
            r = b + (torch.round(b) - b).detach()  # straight through the rounding
            codes = (r.detach() + self.size // 2).round().long().clamp_(0, self.size - 1)
            if self.training and codes.numel():
                with torch.no_grad():
                    flat = codes.reshape(-1, self.dim)
                    use = torch.zeros_like(self.counts).scatter_add_(1, flat.t(), torch.ones_like(flat.t(), dtype=torch.float))
                    self.counts.mul_(0.99).add_(use, alpha=0.01)
            q = r / (self.size // 2)
        return q.to(x.dtype), codes, x.new_zeros((), dtype=torch.float32)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            return self(x)[1]
        finally:
            self.train(was)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectors ``[..., dim]`` (float32) for codes ``[..., dim]``, each in ``[0, size)``."""
        if codes.dim() < 1 or codes.shape[-1] != self.dim:
            raise ValueError(f"FSQ.decode expects codes [..., {self.dim}], got shape {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"FSQ.decode expects integer codes, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.size):
            raise ValueError(f"FSQ.decode: codes must be in [0, {self.size}), got [{int(codes.min())}, {int(codes.max())}]")
        return (codes.float() - self.size // 2) / (self.size // 2)

    @torch.no_grad()
    def ema_report(self) -> dict:
        """Per coordinate, from the running use counts: ``used`` (share of values ever taken lately) and
        ``perplexity`` (exp of the entropy of the value distribution), as the residual VQ reports per level."""
        out = {}
        for level, c in enumerate(self.counts):
            p = c / c.sum().clamp_min(1e-12)
            ent = -(p[p > 0] * p[p > 0].log()).sum().item()
            out[f"code_used_l{level + 1}"] = (c > 0.01 * c.sum() / self.size).float().mean().item()
            out[f"code_perplexity_l{level + 1}"] = math.exp(ent)
        return out
