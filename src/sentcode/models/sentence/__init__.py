"""Sentence-level models: the byte sentence encoder (and, optionally, a frozen MiniLM encoder)."""

from sentcode.models.sentence.config import EncoderConfig, EncoderRunConfig, EncoderTrainConfig, load_encoder_config
from sentcode.models.sentence.encoder import ByteSentenceEncoder, collate_bytes

__all__ = [
    "ByteSentenceEncoder", "EncoderConfig", "EncoderRunConfig", "EncoderTrainConfig", "collate_bytes", "load_encoder_config",
]
