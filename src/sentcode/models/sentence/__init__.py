"""Sentence-level models: the byte sentence encoder (and, optionally, a frozen MiniLM encoder), the planner,
the renderers (autoregressive and non-autoregressive)."""

from sentcode.models.sentence.config import EncoderConfig, EncoderRunConfig, EncoderTrainConfig, load_encoder_config
from sentcode.models.sentence.encoder import ByteSentenceEncoder, collate_bytes
from sentcode.models.sentence.planner import (
    Planner, PlannerConfig, PlannerRunConfig, PlannerTrainConfig, join_embeddings, load_planner_config, split_embeddings,
)
from sentcode.models.sentence.renderer import (
    ARRenderer, RenderBatch, RendererConfig, RendererRunConfig, collate_render, load_renderer_config,
)
from sentcode.models.sentence.renderer_nar import (
    NARRenderer, NARRendererConfig, NARRunConfig, NARTrainConfig, load_nar_config,
)

__all__ = [
    "ByteSentenceEncoder", "EncoderConfig", "EncoderRunConfig", "EncoderTrainConfig", "collate_bytes", "load_encoder_config",
    "Planner", "PlannerConfig", "PlannerRunConfig", "PlannerTrainConfig", "join_embeddings", "load_planner_config",
    "split_embeddings",
    "ARRenderer", "RenderBatch", "RendererConfig", "RendererRunConfig", "collate_render", "load_renderer_config",
    "NARRenderer", "NARRendererConfig", "NARRunConfig", "NARTrainConfig", "load_nar_config",
]
