"""Residual vector quantizer: ``quantized, codes, loss = rvq(x)``.

Each level quantizes what the previous levels left over, greedily: ``r_0 = x``,
``c_l = argmin_j ||r_l - C_l[j]||``, ``r_{l+1} = r_l - C_l[c_l]``. The arithmetic is exact residual
subtraction with nothing rescaled between levels, so decoding is just the sum of the chosen centroids and
``decode(encode(x))`` is bit-identical to the forward's quantized output.

Design choices that avoid defects seen elsewhere:

* codebooks are buffers moved only by EMA (k-means style) updates, never by gradients, so two update rules
  never fight over them;
* all quantizer math and EMA statistics are float32, whatever autocast or ``.to(dtype)`` says, because
  ``(1 - decay) * count`` underflows in bfloat16;
* training and inference assign codes with the same function and no extra balancing term, so the codes a
  planner is trained on are the codes it will see;
* dead codes are restarted from current residuals of their level, and codebooks are data-initialised
  (``fit``, or the first training batch) rather than left at random.

EMA statistics are not all-reduced across processes; in data-parallel training each rank drifts on its own
and should be synchronised by the caller if that matters.

This module imports torch and ``nn.device`` (float32 statistics).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from sentcode.nn.device import keep_float32

NORMALIZE_MODES = (None, "standard", "running", "batch")
INIT_MODES = ("kmeans++", "random")


class _Codebook(nn.Module):
    """One level: centroids plus the EMA statistics they are derived from."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("embed", torch.randn(size, dim))
        # EMA of assignment counts per batch and of the sums of assigned residuals.
        self.register_buffer("cluster_size", torch.zeros(size))
        self.register_buffer("embed_sum", torch.zeros(size, dim))
        self.register_buffer("initialized", torch.tensor(False))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        keep_float32(self)
        return self

    @property
    def size(self) -> int:
        return self.embed.shape[0]


def _assign(r: torch.Tensor, embed: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of ``r`` and the squared distance to it."""
    # ||r||^2 is the same for every candidate, so the argmin only needs ||C||^2 - 2 r.C; adding it back
    # afterwards gives the distance without materialising r - C.
    c2 = (embed * embed).sum(-1)
    n = r.shape[0]
    step = n if not chunk else chunk
    codes, dists = [], []
    for s in range(0, max(n, 1), max(step, 1)):
        part = r[s : s + step]
        scores = torch.addmm(c2, part, embed.t(), alpha=-2.0)
        best, idx = scores.min(dim=-1)
        codes.append(idx)
        dists.append((best + (part * part).sum(-1)).clamp_min_(0.0))
    return torch.cat(codes), torch.cat(dists)


def _kmeanspp(r: torch.Tensor, size: int, gen: torch.Generator | None) -> torch.Tensor:
    n = r.shape[0]
    first = int(torch.randint(n, (1,), generator=gen, device=r.device))
    centers = [r[first]]
    d2 = ((r - r[first]) ** 2).sum(-1)
    while len(centers) < size:
        # float64 so the cumulative weights stay exact enough over millions of rows.
        cum = torch.cumsum(d2.double(), 0)
        total = cum[-1]
        if total <= 0:
            break  # every row is already a centroid (few distinct rows): pad below
        u = torch.rand(1, generator=gen, device=r.device, dtype=torch.float64) * total
        idx = int(torch.searchsorted(cum, u).clamp_max_(n - 1))
        centers.append(r[idx])
        d2 = torch.minimum(d2, ((r - r[idx]) ** 2).sum(-1))
    embed = torch.stack(centers)
    if embed.shape[0] < size:
        embed = torch.cat([embed, _jittered_rows(r, size - embed.shape[0], gen)])
    return embed


def _jittered_rows(r: torch.Tensor, count: int, gen: torch.Generator | None) -> torch.Tensor:
    # Exact copies of data rows would tie with existing centroids forever; a little noise lets them split.
    idx = torch.randint(r.shape[0], (count,), generator=gen, device=r.device)
    scale = r.pow(2).mean().sqrt().item() * 1e-3 or 1e-6
    noise = torch.randn(count, r.shape[1], generator=gen, device=r.device) * scale
    return r[idx] + noise


class ResidualVQ(nn.Module):
    """Greedy residual VQ with EMA codebooks, dead-code restarts and k-means++ fitting.

    ``dead_threshold`` is relative to uniform usage: a code is dead when its EMA assignment count falls
    below ``dead_threshold * (total EMA count) / codebook_size``, which makes it independent of batch size
    and codebook size. ``eps`` is the Laplace smoothing added to each EMA count. ``commitment`` weighs the
    loss ``mean((z - sum)^2)`` per element, taken in the quantizer's (normalised) space so its scale does
    not depend on the embeddings' magnitude.

    ``normalize="standard"`` subtracts the data mean and divides by a global RMS before quantizing; both
    are computed in ``fit`` (or from the first training batch) and stored as buffers, and ``decode``
    returns vectors in the original space. ``normalize="running"`` does the same with statistics that follow
    the data (an EMA with the codebooks' decay, updated by every training batch): for inputs produced by a
    network trained in the same run, whose shared part can dwarf what tells them apart (measured: the spread
    of the projected, pooled segment encodings around their mean was 0.7% of the mean's norm, and every
    input took one code).
    ``normalize="batch"`` standardises each training batch by its own statistics (as batch normalisation does)
    and keeps the running ones for inference: a mean that drifts faster than the EMA follows cannot push every
    training input onto one code.
    """

    def __init__(
        self,
        dim: int,
        levels: int,
        codebook_size: int | list[int],
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_threshold: float = 0.01,
        commitment: float = 0.25,
        normalize: str | None = None,
        commit_space: str = "z",
    ):
        super().__init__()
        if dim < 1 or levels < 1:
            raise ValueError(f"ResidualVQ needs dim >= 1 and levels >= 1, got dim={dim}, levels={levels}")
        sizes = [codebook_size] * levels if isinstance(codebook_size, int) else list(codebook_size)
        if len(sizes) != levels or any(int(k) < 1 for k in sizes):
            raise ValueError(f"codebook_size must be a positive int or {levels} positive ints, got {codebook_size!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        if commit_space not in ("z", "input"):
            raise ValueError(f"commit_space must be z or input, got {commit_space!r}")
        self.dim = dim
        self.levels = levels
        self.codebook_sizes = [int(k) for k in sizes]
        self.decay = decay
        self.eps = eps
        self.dead_threshold = dead_threshold
        self.commitment = commitment
        self.normalize = normalize
        # Where the commitment loss pulls the input toward its centroid: in the standardised space ("z"), whose
        # gradient to the input grows as 1 / scale, or in the input's own space ("input", the VQ-VAE form).
        self.commit_space = commit_space
        self.books = nn.ModuleList(_Codebook(k, dim) for k in self.codebook_sizes)
        if normalize is not None:
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("scale", torch.ones(()))
            self.register_buffer("norm_ready", torch.tensor(False))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        keep_float32(self)
        return self

    # ---- normalisation -------------------------------------------------------------------------------

    @torch.no_grad()
    def set_statistics(self, x: torch.Tensor) -> None:
        """Set the inference statistics from inputs ``x [..., dim]`` (a calibration pass with final weights)."""
        if self.normalize is None:
            raise ValueError("this quantizer does not standardise its inputs: there are no statistics to set")
        self._set_norm_stats(self._flat(x.detach()))

    def _set_norm_stats(self, x: torch.Tensor) -> None:
        mean = x.mean(0)
        rms = (x - mean).pow(2).mean().sqrt()
        # Constant data has no scale; 1 keeps the map invertible.
        self.scale.copy_(torch.where(rms > 0, rms, torch.ones_like(rms)))
        self.mean.copy_(mean)
        self.norm_ready.fill_(True)

    def _follow_norm_stats(self, x: torch.Tensor) -> None:
        mean = x.mean(0)
        rms = (x - mean).pow(2).mean().sqrt()
        self.mean.lerp_(mean, 1 - self.decay)
        if rms > 0:
            self.scale.lerp_(rms, 1 - self.decay)

    def _to_z(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize is None:
            return x
        return (x - self.mean) / self.scale

    def _from_z(self, z: torch.Tensor) -> torch.Tensor:
        if self.normalize is None:
            return z
        return z * self.scale + self.mean

    # ---- core -----------------------------------------------------------------------------------------

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"ResidualVQ expects inputs with last dimension {self.dim}, got shape {tuple(x.shape)}")
        return x.reshape(-1, self.dim).float()

    def _quantize(self, z: torch.Tensor, init_from_batch: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Codes [N, levels] and the residual each level saw. The one assignment path, training or not."""
        r = z
        codes, residuals = [], []
        for book in self.books:
            if init_from_batch and not bool(book.initialized):
                self._init_book(book, r.detach(), None)
            c, _ = _assign(r, book.embed)
            residuals.append(r)
            codes.append(c)
            r = r - book.embed[c]
        return torch.stack(codes, -1), residuals

    def _sum_z(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of chosen centroids for a prefix of levels, in the quantizer's space."""
        total = None
        for level in range(codes.shape[-1]):
            q = self.books[level].embed[codes[..., level]]
            total = q if total is None else total + q
        return total

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lead = x.shape[:-1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = self._flat(x)
            if self.training and self.normalize is not None and flat.shape[0]:
                if not bool(self.norm_ready):
                    self._set_norm_stats(flat.detach())
                elif self.normalize in ("running", "batch"):
                    self._follow_norm_stats(flat.detach())
            if self.training and self.normalize == "batch" and flat.shape[0] > 1:
                mean = flat.detach().mean(0)
                z = (flat - mean) / (flat.detach() - mean).pow(2).mean().sqrt().clamp_min(1e-12)
            else:
                z = self._to_z(flat)
            with torch.no_grad():
                codes, residuals = self._quantize(z.detach(), init_from_batch=self.training and flat.shape[0] > 0)
                s = self._sum_z(codes)
                out = self._from_z(s)
            if not flat.shape[0]:
                loss = z.sum() * 0.0
            elif self.commit_space == "z":
                loss = self.commitment * F.mse_loss(z, s)
            else:
                loss = self.commitment * F.mse_loss(flat, out)
            if self.training and flat.shape[0]:
                with torch.no_grad():
                    for book, r, c in zip(self.books, residuals, codes.unbind(-1)):
                        self._ema_update(book, r, c)
        # Straight-through: the value is exactly the decoded vector (x - x.detach() is exactly 0), the
        # gradient to x is the identity.
        quantized = out.to(x.dtype).reshape(x.shape) + (x - x.detach())
        return quantized, codes.reshape(*lead, self.levels), loss

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., levels]`` (int64) for ``x [..., dim]``; never updates the codebooks."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            codes, _ = self._quantize(self._to_z(self._flat(x)))
        return codes.reshape(*x.shape[:-1], self.levels)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectors ``[..., dim]`` (float32, original space) for codes ``[..., L]`` with ``1 <= L <= levels``.

        Fewer than ``levels`` code columns decode the coarser approximation from those first levels.
        """
        if codes.dim() < 1 or not 1 <= codes.shape[-1] <= self.levels:
            raise ValueError(
                f"ResidualVQ.decode expects codes [..., L] with 1 <= L <= {self.levels}, "
                f"got shape {tuple(codes.shape)}"
            )
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"ResidualVQ.decode expects integer codes, got {codes.dtype}")
        codes = codes.long()
        if codes.numel():
            for level in range(codes.shape[-1]):
                col = codes[..., level]
                size = self.codebook_sizes[level]
                if int(col.min()) < 0 or int(col.max()) >= size:
                    raise ValueError(
                        f"ResidualVQ.decode: level {level} codes must be in [0, {size}), "
                        f"got [{int(col.min())}, {int(col.max())}]"
                    )
        with torch.autocast(device_type=codes.device.type, enabled=False):
            if codes.numel() == 0:
                return torch.zeros(*codes.shape[:-1], self.dim, device=codes.device)
            return self._from_z(self._sum_z(codes))

    # ---- EMA updates and restarts ----------------------------------------------------------------------

    def _set_stats(self, book: _Codebook, embed: torch.Tensor, counts: torch.Tensor) -> None:
        book.embed.copy_(embed)
        book.cluster_size.copy_(counts)
        book.embed_sum.copy_(embed * counts[:, None])
        book.initialized.fill_(True)

    def _init_book(self, book: _Codebook, r: torch.Tensor, gen: torch.Generator | None) -> None:
        embed = _kmeanspp(r, book.size, gen)
        codes, _ = _assign(r, embed)
        self._set_stats(book, embed, torch.bincount(codes, minlength=book.size).float())

    def _ema_update(self, book: _Codebook, r: torch.Tensor, codes: torch.Tensor) -> None:
        k = book.size
        counts = torch.bincount(codes, minlength=k).float()
        sums = torch.zeros_like(book.embed_sum).index_add_(0, codes, r)
        book.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        book.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = book.cluster_size.sum()
        smoothed = (book.cluster_size + self.eps) / (total + k * self.eps) * total
        book.embed.copy_(book.embed_sum / smoothed.clamp_min(1e-30)[:, None])
        dead = book.cluster_size < self.dead_threshold * total / k
        n_dead = int(dead.sum())
        if n_dead:
            picks = r[torch.randint(r.shape[0], (n_dead,), device=r.device)]
            # A restarted code gets an average code's weight, so it has as long to attract data as the
            # EMA takes to forget an average code, rather than dying again on the next step.
            fresh = total / k
            book.embed[dead] = picks
            book.cluster_size[dead] = fresh
            book.embed_sum[dead] = picks * fresh

    # ---- offline fitting and diagnostics ---------------------------------------------------------------

    @torch.no_grad()
    def fit(
        self,
        data: torch.Tensor,
        iters: int = 20,
        batch: int | None = None,
        seed: int = 0,
        init: str = "kmeans++",
    ) -> list[dict]:
        """Fit every level on ``data [N, dim]``: seed by ``init`` on that level's residuals, then ``iters``
        Lloyd iterations. ``batch`` bounds memory: distances are computed ``batch`` rows at a time (the
        result is the same as ``None``). Deterministic given ``seed``. Returns per-level stats.

        The EMA statistics are set from the final assignment, so training can continue with ``forward``.
        """
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        flat = self._flat(data.to(self.books[0].embed.device))
        if flat.shape[0] == 0:
            raise ValueError("ResidualVQ.fit needs at least one row of data")
        gen = torch.Generator(device=flat.device)
        gen.manual_seed(seed)
        if self.normalize is not None:
            self._set_norm_stats(flat)
        r = self._to_z(flat)
        energy = r.pow(2).sum(-1).mean().item()
        stats = []
        for level, book in enumerate(self.books):
            k = book.size
            if init == "kmeans++":
                embed = _kmeanspp(r, k, gen)
            else:
                pick = torch.randperm(r.shape[0], generator=gen, device=r.device)[:k]
                embed = r[pick]
                if embed.shape[0] < k:
                    embed = torch.cat([embed, _jittered_rows(r, k - embed.shape[0], gen)])
            codes, d2 = _assign(r, embed, batch)
            for _ in range(iters):
                counts = torch.bincount(codes, minlength=k)
                sums = torch.zeros_like(embed).index_add_(0, codes, r)
                empty = counts == 0
                embed = torch.where(empty[:, None], embed, sums / counts.clamp_min(1)[:, None].float())
                n_empty = int(empty.sum())
                if n_empty:
                    # Reseed empty clusters on the worst-served rows, where they cut the error most.
                    worst = torch.topk(d2, min(n_empty, d2.shape[0])).indices
                    slots = empty.nonzero().squeeze(1)[: worst.shape[0]]
                    embed[slots] = r[worst]
                codes, d2 = _assign(r, embed, batch)
            counts = torch.bincount(codes, minlength=k).float()
            self._set_stats(book, embed, counts)
            r = r - embed[codes]
            mse = d2.mean().item() / self.dim
            stats.append({
                "level": level,
                "codebook_size": k,
                "mse": mse,
                "residual_energy": d2.mean().item() / energy if energy > 0 else 0.0,
                "used": int((counts > 0).sum()) / k,
            })
        return stats

    @torch.no_grad()
    def report(self, data: torch.Tensor) -> list[dict]:
        """Quality after each level (cumulative over levels ``0..l``) on ``data [N, dim]``.

        ``cosine`` and ``mse`` (per element) are measured in the original space; ``residual_energy`` is
        ``mean ||r_{l+1}||^2 / mean ||x||^2`` in the quantizer's space (after normalisation, if any);
        ``used``, ``perplexity`` and ``dead`` describe level ``l``'s own code usage on ``data``.
        """
        was_training = self.training
        self.eval()
        try:
            x = self._flat(data.to(self.books[0].embed.device))
            codes = self.encode(x)
            z = self._to_z(x)
            energy = z.pow(2).sum(-1).mean().item()
            out = []
            for level in range(self.levels):
                k = self.codebook_sizes[level]
                s = self._sum_z(codes[:, : level + 1])
                recon = self._from_z(s)
                counts = torch.bincount(codes[:, level], minlength=k).float()
                p = counts / counts.sum().clamp_min(1)
                entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
                resid = (z - s).pow(2).sum(-1).mean().item()
                out.append({
                    "level": level,
                    "cosine": F.cosine_similarity(x, recon, dim=-1).mean().item(),
                    "mse": F.mse_loss(recon, x).item(),
                    "residual_energy": resid / energy if energy > 0 else 0.0,
                    "used": int((counts > 0).sum()) / k,
                    "perplexity": math.exp(entropy),
                    "dead": int((counts == 0).sum()),
                })
            return out
        finally:
            self.train(was_training)

    @torch.no_grad()
    def ema_report(self) -> dict:
        """Per level, from the EMA assignment counts (no data needed; for training logs): ``used`` (share of
        codes above the dead threshold) and ``perplexity`` (exp of the entropy of the count distribution)."""
        out = {}
        for level, book in enumerate(self.books):
            counts = book.cluster_size.float()
            total = counts.sum().clamp_min(1e-12)
            p = counts / total
            entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
            dead = counts < self.dead_threshold * total / book.size
            out[f"code_used_l{level + 1}"] = 1.0 - dead.float().mean().item()
            out[f"code_perplexity_l{level + 1}"] = math.exp(entropy)
        return out

    # ---- checkpoints ------------------------------------------------------------------------------------

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Checked here rather than in load_state_dict so it also fires when this module is nested in a model.
        pattern = re.compile(re.escape(prefix) + r"books\.(\d+)\.embed$")
        found = {}
        for key, value in state_dict.items():
            m = pattern.match(key)
            if m:
                found[int(m.group(1))] = tuple(value.shape)
        if found:
            expected = [(k, self.dim) for k in self.codebook_sizes]
            got = [found.get(level) for level in range(max(found) + 1)]
            if got != expected:
                raise ValueError(
                    f"ResidualVQ state does not match this model: expected {self.levels} codebooks of shapes "
                    f"(codebook_size, dim) {expected}, found {len(found)} of shapes {got}"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
