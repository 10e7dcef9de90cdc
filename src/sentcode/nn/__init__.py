"""Neural-network blocks shared by every model family, and the one sampling function. Imports only torch."""

from sentcode.nn.attention import CausalSelfAttention, LayerCache, causal_mask
from sentcode.nn.layers import DualFFN, RMSNorm, SwiGLU, alibi_slopes, apply_rope, rope_cos_sin

__all__ = [
    "CausalSelfAttention", "LayerCache", "causal_mask", "DualFFN", "RMSNorm", "SwiGLU",
    "alibi_slopes", "apply_rope", "rope_cos_sin",
]
