"""The hierarchical byte autoencoder (family ``hier``): the end-to-end core of the sentence-step family
(``models.sentence.steplm``) with short causal segments and codes always on.

DESIGN.md's one machine with another way of cutting text: a causal segmenter (space-like bytes, an entropy
threshold or a fixed stride; ``corpus.cutters``) cuts bytes into segments of a few bytes; the **compressor**
(windowed byte layer + learned-query attention pooling) turns each segment into one vector; the **quantizer**
(EMA vector quantizer, fp32 statistics, dead-code restart; ``nn.rvq``) gives its codes; the **code LM**
(a causal transformer over segments; the sentence family's planner) reads the completed segments and predicts
the next segment's codes; the **expander** (the renderer) writes the segment's bytes from its codes and the
code LM's state. One loss: the expander's byte cross-entropy (reconstruction) + the code LM's code
cross-entropy + the commitment term, so bits per byte are a two-part lossless code length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sentcode.config import TrainConfig
from sentcode.models.sentence.steplm import StepLMConfig, StepLMData, StepLMModelConfig

FAMILY = "hier"


def _hier_model() -> StepLMModelConfig:
    return StepLMModelConfig(levels=2, code_dropout=0.0, max_segment_bytes=32, max_segments=256, pool="attention")


@dataclass
class HierConfig(StepLMConfig):
    """A hierarchical byte autoencoder and how to train it (``train.seq_len``: stream positions per row)."""

    model: StepLMModelConfig = field(default_factory=_hier_model)
    data: StepLMData = field(default_factory=lambda: StepLMData(segmenter="space"))
    train: TrainConfig = field(default_factory=TrainConfig)
    family: str = FAMILY

    kind = "hierarchical byte autoencoder"

    def check(self) -> None:
        super().check()
        from sentcode.errors import ConfigError

        if self.model.levels < 1:
            raise ConfigError("an autoencoder needs codes: model.levels must be at least 1")
