"""Decoding stacks written for export: one graph per call, caches in and out, few large operators.

``LMStep`` computes what ``LM.forward`` computes with a cache, and ``RendererStep`` what ``StepLM.render`` does
(the sentence-step and autoencoder families' per-byte writer), from the same weights, in the form that ONNX
Runtime runs fastest at batch 1: the query/key/value projections and the SwiGLU gate/up projections fused into
one matrix each, RMSNorm, rotary embedding and grouped-query attention as single ONNX operators (through
``torch.onnx.ops``, which also run in PyTorch, so the module is tested against ``LM`` directly), and every layer's
cache a separate input and output (a stacked cache would be copied at every step).

What the graph does not compute, the caller passes in: the rotary tables for the call's positions (so positions
may be any integers, as in ``LM``) and the attention mask (causal, sliding window, left padding, or ALiBi's
bias), built by ``attention_mask`` below from the same rules as ``CausalSelfAttention``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.onnx import ops

from sentcode.errors import SentcodeError
from sentcode.nn.attention import causal_mask


def check_exportable(model) -> None:
    """One clear line for a model this graph does not cover yet."""
    if getattr(model.cfg, "ffn", "swiglu") == "dual":
        raise SentcodeError("export does not support the dual-FFN router yet (model.ffn: dual); train with ffn: swiglu")


class DecodeStep(nn.Module):
    """A stack of ``Block``s between an embedding and a head, as one export graph:

    idx [B, T] (or, with no embedding, vectors [B, T, d_model]), cos/sin [B, T, head_dim/2], mask [B, 1 or H, T,
    P+T], past keys/values (one pair per layer, [B, H_kv, P, head_dim]) and, for a conditioned stack, cond
    [B, T, d_model] added to the scaled embeddings -> logits [B, T, V] (or, with no head, the final normed states
    [B, T, d_model]) and the present keys/values [B, H_kv, P+T, head_dim]."""

    conditioned = False

    def __init__(self, cfg, embed: nn.Embedding | None, blocks: nn.ModuleList, norm,
                 head_weight: torch.Tensor | None, embed_scale: float = 1.0):
        super().__init__()
        self.cfg, self.embed, self.blocks, self.norm = cfg, embed, blocks, norm
        self.head_weight, self.embed_scale = head_weight, embed_scale
        attn = blocks[0].attn
        self.n_head, self.n_kv_head, self.head_dim = attn.n_head, attn.n_kv_head, attn.head_dim
        self.qkv = nn.ParameterList(
            nn.Parameter(torch.cat([b.attn.wq.weight, b.attn.wkv.weight]).T.contiguous(), requires_grad=False)
            for b in blocks)
        self.gate_up = nn.ParameterList(
            nn.Parameter(torch.cat([b.ffn.w_gate.weight, b.ffn.w_up.weight]).T.contiguous(), requires_grad=False)
            for b in blocks)

    def forward(self, idx, cos, sin, mask, past: list[torch.Tensor], cond: torch.Tensor | None = None):
        d = self.cfg.d_model
        nq, nk = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        x = self.embed(idx) if self.embed is not None else idx
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if cond is not None:
            x = x + cond
        present = []
        for i, block in enumerate(self.blocks):
            h = F.rms_norm(x, (d,), block.norm1.weight, block.norm1.eps)
            q, k, v = (h @ self.qkv[i]).split([nq, nk, nk], dim=-1)
            if self.cfg.pos == "rope":
                q = ops.rotary_embedding(q, cos, sin, num_heads=self.n_head)
                k = ops.rotary_embedding(k, cos, sin, num_heads=self.n_kv_head)
            y, k_all, v_all, _ = ops.attention(q, k, v, mask, past[2 * i], past[2 * i + 1],
                                               q_num_heads=self.n_head, kv_num_heads=self.n_kv_head)
            present += [k_all, v_all]
            x = x + block.attn.wo(y)
            h = F.rms_norm(x, (d,), block.norm2.weight, block.norm2.eps)
            gate, up = (h @ self.gate_up[i]).chunk(2, dim=-1)
            x = x + block.ffn.w_down(F.silu(gate) * up)
        h = F.rms_norm(x, (d,), self.norm.weight, self.norm.eps)
        return (h if self.head_weight is None else F.linear(h, self.head_weight), *present)


class LMStep(DecodeStep):
    """The flat LM (``LM``) as a decode graph."""

    def __init__(self, model):
        check_exportable(model)
        super().__init__(model.cfg, model.embed, model.blocks, model.norm, model.head.weight)


class RendererStep(DecodeStep):
    """The renderer of the end-to-end sentence-step core (``StepLM.render``) as a decode graph: byte embeddings
    at sqrt(d_model) scale plus the segment's condition, the renderer stack, the tied head."""

    conditioned = True

    def __init__(self, model):
        r = model.renderer
        super().__init__(r.cfg, model.embed, r.blocks, r.norm, model.embed.weight, model.cfg.d_model ** 0.5)


class PlannerStep(DecodeStep):
    """The planner of the end-to-end core (``StepLM.planner``): segment vectors in, its states out, cached."""

    def __init__(self, model):
        p = model.planner
        super().__init__(p.cfg, None, p.blocks, p.norm, None)


class EncoderStep(DecodeStep):
    """The byte encoder's stack of the end-to-end core (``StepLM.encoder`` over ``enc_embed``): ids in, states
    out (called without a cache: the pooling into segment vectors stays in PyTorch)."""

    def __init__(self, model):
        e = model.encoder
        super().__init__(e.cfg, model.enc_embed, e.blocks, e.norm, None)


def attention_mask(cfg, batch: int, positions: torch.Tensor, n_keys: int, pad_mask: torch.Tensor | None,
                   slopes: torch.Tensor | None) -> torch.Tensor:
    """The mask ``CausalSelfAttention`` applies, for queries at ``positions`` over ``n_keys`` keys ending at the
    last query: bool [B, 1, T, Tk] (True where a query may attend), or for ALiBi the float bias [B, H, T, Tk].

    pad_mask: [B, Tk] bool, False at left padding; a query always keeps its own key (see ``attention.py``)."""
    k_pos = positions[-1] - n_keys + 1 + torch.arange(n_keys)
    allowed = causal_mask(positions, k_pos, cfg.attn_window)[None]  # [1, T, Tk]
    if pad_mask is not None:
        allowed = allowed & (pad_mask[:, None, :] | (positions[:, None] == k_pos[None, :])[None])
    allowed = allowed.expand(batch, -1, -1)[:, None]  # [B, 1, T, Tk]
    if slopes is None:
        return allowed
    rel = (positions[:, None] - k_pos[None, :]).to(torch.float32)
    bias = -slopes[:, None, None] * rel  # [H, T, Tk]
    return bias[None].masked_fill(~allowed, float("-inf"))
