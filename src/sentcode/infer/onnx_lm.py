"""An exported decoding stack run by ONNX Runtime, behind the same call as ``LM``: ``model(idx, cache, start_pos,
pad_mask) -> logits``, ``new_cache()``, ``cfg`` (and ``render``, ``StepLM.render``'s call, for a renderer).

So every token loop written for ``LM`` (``engine.generate_ids``, the server's ``BatchDecoder``, bits-per-byte
scoring) runs on it unchanged, and chooses the same tokens from the same logits (the sampler is shared). The
cache stays a list of ``LayerCache`` holding torch tensors that share memory with ONNX Runtime's outputs; the
rotary tables and the attention mask are built here, per call, by the rules the PyTorch model uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sentcode.infer.onnx_loop import DecodeLoop
from sentcode.infer.ort import ort_session
from sentcode.models.decode_step import attention_mask
from sentcode.nn.attention import LayerCache
from sentcode.nn.layers import alibi_slopes, rope_cos_sin


class OnnxLM:
    """A graph from a ``DecodeStep`` (the flat LM, or the renderer, planner or encoder stack of the sentence-step
    core) in an ONNX Runtime session (CPU); ``cfg``: its stack's ``ModelConfig``."""

    device = torch.device("cpu")
    training = False

    def __init__(self, path: Path, cfg, threads: int | None = None, spin: bool = False, loop_spin: bool = True):
        # spin: the per-call session (prefill, batched decoding, scoring), whose calls alternate with PyTorch work
        # (sampling a batch's rows); loop_spin: the token loop's session (``token_loop``), which runs alone.
        self.cfg, self.path, self.threads, self.loop_spin = cfg, Path(path), threads, loop_spin
        self.session = ort_session(path, threads, spin)
        self.inputs = {i.name for i in self.session.get_inputs()}
        self._loop = None
        self.head_dim = cfg.d_model // cfg.n_head
        self.slopes = alibi_slopes(cfg.n_head) if cfg.pos == "alibi" else None
        # Rotary tables for the positions a token loop uses most (0 .. 2 contexts, at most 8,192), computed once by
        # the model's rule; other positions are computed per call (a renderer's positions grow with the document).
        cos, sin = rope_cos_sin(torch.arange(min(2 * cfg.max_seq_len, 8192)), self.head_dim, cfg.rope_theta)
        self.tables = cos.numpy(), sin.numpy()

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in range(self.cfg.n_layer)]

    def rope_rows(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rotary rows [n, head_dim / 2] for positions start .. start + n - 1, by the model's rule."""
        if 0 <= start and start + n <= len(self.tables[0]):
            return tuple(np.ascontiguousarray(t[start:start + n]) for t in self.tables)
        cos, sin = rope_cos_sin(torch.arange(start, start + n), self.head_dim, self.cfg.rope_theta)
        return cos.numpy(), sin.numpy()

    def token_loop(self, top_p: float | None):
        """The decode loop in one graph (``onnx_loop``), for an export that writes tokens (a flat LM or a
        renderer) when it serves the request; built on first use."""
        writes = "idx" in self.inputs and self.session.get_outputs()[0].name == "logits"
        if not writes or not DecodeLoop.serves(self.cfg, top_p):
            return None
        if self._loop is None:
            self._loop = DecodeLoop(self, self.path)
        return self._loop

    def render(self, x: torch.Tensor, cond_pos: torch.Tensor, start_pos: int = 0,
               cache: list[LayerCache] | None = None, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``StepLM.render``'s call, for a renderer graph (``RendererStep``)."""
        return self(x, cache, start_pos, pad_mask, cond=cond_pos)

    def stack(self, x: torch.Tensor, start_pos: int = 0, cache: list[LayerCache] | None = None,
              pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A ``_Stack``'s call (``StepLM.planner``, ``StepLM.encoder`` after its embedding), for a graph from
        ``PlannerStep`` (vectors in) or ``EncoderStep`` (ids in); returns the final normed states."""
        return self(x, cache, start_pos, pad_mask)

    def __call__(self, idx: torch.Tensor, cache: list[LayerCache] | None = None, start_pos: int = 0,
                 pad_mask: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape[:2]
        P = cache[0].length if cache else 0
        if "idx" in self.inputs:
            feeds = {"idx": idx.numpy()}
        else:  # a stack fed vectors (the planner)
            feeds = {"x": np.ascontiguousarray(idx.detach().float().numpy())}
        if "cos" in self.inputs:
            cos, sin = self.rope_rows(start_pos, T)
            feeds["cos"] = np.ascontiguousarray(np.broadcast_to(cos, (B, T, cos.shape[-1])))
            feeds["sin"] = np.ascontiguousarray(np.broadcast_to(sin, (B, T, sin.shape[-1])))
        if T == 1 and pad_mask is None and self.slopes is None:  # one query: every cached key inside its window
            mask = np.ones((B, 1, 1, P + 1), dtype=bool)
            if self.cfg.attn_window is not None and P + 1 > self.cfg.attn_window:
                mask[..., : P + 1 - self.cfg.attn_window] = False
            feeds["mask"] = mask
        else:
            feeds["mask"] = np.ascontiguousarray(attention_mask(self.cfg, B, torch.arange(start_pos, start_pos + T),
                                                                P + T, pad_mask, self.slopes).numpy())
        empty = np.zeros((B, self.cfg.n_kv_head, 0, self.head_dim), np.float32)
        for i in range(self.cfg.n_layer):
            c = cache[i] if cache else None
            has = c is not None and c.k is not None
            feeds[f"past_key_{i}"] = np.ascontiguousarray(c.k.numpy()) if has else empty
            feeds[f"past_value_{i}"] = np.ascontiguousarray(c.v.numpy()) if has else empty
        if "cond" in self.inputs:
            feeds["cond"] = np.ascontiguousarray(cond.detach().float().numpy())
        out = self.session.run(None, feeds)
        if cache is not None:
            for i, c in enumerate(cache):
                c.k, c.v = torch.from_numpy(out[1 + 2 * i]), torch.from_numpy(out[2 + 2 * i])
        return torch.from_numpy(out[0])
