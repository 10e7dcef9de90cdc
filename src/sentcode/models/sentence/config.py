"""Configuration of the byte sentence encoder and of its contrastive training run.

``EncoderRunConfig`` goes through the same machinery as the LM configs
(``sentcode.config.config_from_dict(data, cls=EncoderRunConfig)``): every field has a default, so unknown
keys and wrongly typed values are reported the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sentcode.config import RunConfig, TrainConfig
from sentcode.errors import ConfigError

OBJECTIVES = ("next", "same")
FAMILY = "sentence-encoder"


@dataclass
class EncoderConfig:
    vocab_size: int = 259  # the byte tokenizer's: 256 bytes + BOS, EOS, PAD
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: as many as n_head
    ffn_mult: float = 2.75
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_bytes: int = 256  # longer sentences are truncated
    d_emb: int = 128
    objective: str = "next"  # next: a sentence and the one after it; same: two noised views of one sentence
    tau: float = 0.07  # InfoNCE temperature
    # Noise for objective "same" (applied independently to both views).
    byte_drop: float = 0.05  # probability of dropping each byte
    span_delete: float = 0.3  # probability of deleting one contiguous span
    span_max: int = 8  # longest deleted span, in bytes
    case_flip: float = 0.05  # probability of flipping the case of each ASCII letter

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_hidden(self) -> int:
        return max(32, int(round(self.ffn_mult * self.d_model / 32)) * 32)  # as the LM's ModelConfig

    def validate(self) -> None:
        if min(self.d_model, self.n_layer, self.n_head, self.kv_heads, self.d_emb) <= 0:
            raise ConfigError("encoder.d_model, n_layer, n_head, n_kv_head and d_emb must be positive")
        if self.vocab_size != 259:
            raise ConfigError(f"encoder.vocab_size must be 259 (bytes plus three specials), not {self.vocab_size}")
        if self.d_model % self.n_head:
            raise ConfigError(f"encoder.n_head={self.n_head} does not divide encoder.d_model={self.d_model}")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"encoder.n_kv_head={self.kv_heads} does not divide encoder.n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ConfigError("encoder.d_model / encoder.n_head (the head size) must be even for rotary positions")
        if self.max_bytes < 1:
            raise ConfigError("encoder.max_bytes must be at least 1")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"encoder.objective must be 'next' or 'same', not {self.objective!r}")
        if self.tau <= 0:
            raise ConfigError("encoder.tau must be positive")
        for name in ("byte_drop", "span_delete", "case_flip"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"encoder.{name} must lie in [0, 1)")
        if self.span_max < 1:
            raise ConfigError("encoder.span_max must be at least 1")


@dataclass
class EncoderRunConfig(RunConfig):
    """A sentence encoder and how to train it.

    ``train`` is the shared ``TrainConfig``, read for contrastive batches: ``micro_batch`` is the number of
    (anchor, positive) pairs per micro-batch, which are also each other's negatives; ``seq_len`` must equal
    ``encoder.max_bytes``, so that ``batch_tokens / (micro_batch * seq_len)`` is the gradient accumulation.
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    # Plain TrainConfig defaults: sentcode.config._from_dict rebuilds a given section from its class
    # defaults, so encoder-specific defaults here would vanish as soon as any train.* key was set.
    train: TrainConfig = field(default_factory=TrainConfig)
    family: str = FAMILY

    kind = "sentence-encoder"

    def check(self) -> None:
        if self.train.seq_len != self.encoder.max_bytes:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} must equal encoder.max_bytes={self.encoder.max_bytes} "
                "for a sentence encoder (set both)"
            )
        if self.train.micro_batch < 2:
            raise ConfigError("train.micro_batch must be at least 2: a contrastive batch needs negatives")



# The sentence-LM plan calls the run config by this name.
EncoderTrainConfig = EncoderRunConfig


def load_encoder_config(preset: str | None = None, overrides: list[str] | None = None) -> EncoderRunConfig:
    """A validated ``EncoderRunConfig`` from an optional YAML file (or preset name) plus ``key.sub=value`` overrides."""
    from sentcode.config import load_config

    return load_config(preset, overrides, cls=EncoderRunConfig)
