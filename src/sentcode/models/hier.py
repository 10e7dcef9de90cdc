"""The hierarchical byte autoencoder (family ``hier``): the end-to-end core of the sentence-step family
(``models.sentence.steplm``) with short causal segments and codes always on.

DESIGN.md's one machine with another way of cutting text: a causal segmenter (space-like bytes, an entropy
threshold or a fixed stride; ``corpus.cutters``) cuts bytes into segments of a few bytes; the **compressor**
(windowed byte layer + learned-query attention pooling) turns each segment into one vector; the **quantizer**
(finite scalar quantization, ``nn.fsq``, in the preset; or the EMA vector quantizer, ``nn.rvq``) gives its
codes; the **code LM**
(a causal transformer over segments; the sentence family's planner) reads the completed segments and predicts
the next segment's codes; the **expander** (the renderer) writes the segment's bytes from its codes and the
code LM's state. One loss: the expander's byte cross-entropy (reconstruction) + the code LM's code
cross-entropy + the commitment term, so bits per byte are a two-part lossless code length.

**A second level** (``data.upper_stride`` > 0) is the same core once more, over the stream of level-1 codes
(``upper.symbols`` = the level-1 codebook size): every ``upper_stride`` level-1 codes form a level-2 segment
(a fixed stride is causal), compressed into level-2 codes; its code LM is the top model, and its expander writes
level-1 codes, which the level-1 expander writes as bytes. It is trained after level 1, on level 1's codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from sentcode.config import TrainConfig
from sentcode.data.segments import SegmentSplit, build_row, eval_windows, stack_rows
from sentcode.models.sentence.steplm import StepLM, StepLMConfig, StepLMData, StepLMModelConfig

FAMILY = "hier"
UPPER_DIR = "upper"  # the second level's run sub-directory (checkpoints, weights, summary)


def _hier_model() -> StepLMModelConfig:
    return StepLMModelConfig(levels=1, code_dropout=0.0, max_segment_bytes=32, max_segments=256, pool="attention")


def _upper_model() -> StepLMModelConfig:
    return StepLMModelConfig(d_model=192, n_layer=2, n_head=4, n_kv_head=2, window=32, enc_d_model=128, enc_layers=1,
                             enc_heads=2, d_plan=192, plan_layers=2, plan_heads=4, plan_kv_heads=2, max_segments=128,
                             levels=1, codebook_size=1024, d_code=64, code_dropout=0.0, context_dropout=1.0,
                             pool="attention", cond_init="normal")


@dataclass
class HierData(StepLMData):
    upper_stride: int = 0  # level-1 codes per level-2 segment (0: one level)
    upper_budget: float = 0.5  # the second level's training steps and time, as a share of the first level's


@dataclass
class HierConfig(StepLMConfig):
    """A hierarchical byte autoencoder and how to train it (``train.seq_len``: stream positions per row)."""

    model: StepLMModelConfig = field(default_factory=_hier_model)
    data: HierData = field(default_factory=lambda: HierData(segmenter="space"))
    upper: StepLMModelConfig = field(default_factory=_upper_model)
    train: TrainConfig = field(default_factory=TrainConfig)
    family: str = FAMILY

    kind = "hierarchical byte autoencoder"

    def check(self) -> None:
        super().check()
        from sentcode.errors import ConfigError

        if self.model.levels < 1:
            raise ConfigError("an autoencoder needs codes: model.levels must be at least 1")
        if self.data.upper_stride < 0 or not 0 < self.data.upper_budget <= 1:
            raise ConfigError("data.upper_stride must be >= 0 (0: one level) and data.upper_budget in (0, 1]")
        if self.data.upper_stride:
            if self.model.levels != 1 or self.model.quantizer != "vq":
                raise ConfigError("a second level reads one code per level-1 segment: set model.quantizer=vq and "
                                  "model.levels=1")
            if self.upper.levels < 1:
                raise ConfigError("the second level needs codes: upper.levels must be at least 1")
            if self.train.seq_len < self.data.upper_stride + 1:
                raise ConfigError("train.seq_len must hold one level-2 segment (data.upper_stride + 1)")

    def upper_model(self) -> StepLMModelConfig:
        """The second level's model: the upper section over the level-1 codes, segments of ``upper_stride``."""
        return replace(self.upper, symbols=self.model.codebook_size, max_segment_bytes=max(4, self.data.upper_stride))

    def upper_config(self) -> StepLMConfig:
        """The second level as a run config of the core (its own checkpoints in ``UPPER_DIR``)."""
        t, share = self.train, self.data.upper_budget
        train = replace(t, max_steps=max(1, round(t.max_steps * share)),
                        time_budget_s=None if t.time_budget_s is None else t.time_budget_s * share)
        return StepLMConfig(model=self.upper_model(), data=self.data, train=train)


@torch.no_grad()
def level1_codes(model: StepLM, split: SegmentSplit, device, batch_rows: int = 8) -> np.ndarray:
    """The level-1 code of every segment of the split, in order (each compressed with the bytes before it, in
    windows that start at least half a window of segments earlier, as in scoring)."""
    was = model.training
    model.eval()
    out, batch = [], []

    def flush():
        x, _, seg, n = stack_rows([r for r, _ in batch], device)
        _, pooled = model.encode_stream(x, seg, n)
        _, codes, _ = model.quantize(pooled)
        for i, (row, first) in enumerate(batch):
            out.append(codes[i, first:int(row[2].max()) + 1, 0].cpu().numpy())
        batch.clear()

    for segments, first in eval_windows(split, model.cfg.max_segments):
        batch.append((build_row(segments), first))
        if len(batch) == batch_rows:
            flush()
    if batch:
        flush()
    model.train(was)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def code_split(split: SegmentSplit, codes: np.ndarray, stride: int) -> SegmentSplit:
    """The level-1 codes as a segment split of their own: per document, level-2 segments of ``stride`` codes."""
    starts, doc_seg, pos = [0], [0], 0
    for d in range(split.n_docs):
        n = int(split.doc_seg[d + 1] - split.doc_seg[d])
        for a in range(0, n, stride):
            pos += min(stride, n - a)
            starts.append(pos)
        doc_seg.append(len(starts) - 1)
    return SegmentSplit(codes.astype(np.int16), np.asarray(starts, dtype=np.int64), np.asarray(doc_seg, dtype=np.int64))
