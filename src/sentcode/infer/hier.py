"""The facade behind ``sentcode.load`` for a hierarchical byte autoencoder (family ``hier``).

Generation is the end-to-end core's (``infer.steplm``), one short segment per step: the prompt is cut by the
run's causal segmenter, its completed segments are compressed and read by the code LM, which samples the next
segment's codes; the expander writes the segment from them (the seed's ``generate_bytes``).

``encode`` gives the codes of a text, segment by segment (each compressed with the bytes before it, as in
training); ``decode`` turns codes back into text by writing each segment greedily from its codes and the code
LM's state of the segments already decoded, then compressing the decoded segment for the next state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sentcode.data.segments import BOS
from sentcode.errors import SentcodeError
from sentcode.infer.steplm import StepLMGenerator, load_core
from sentcode.models.hier import FAMILY, HierConfig

MAX_SEGMENTS = 4096  # the most segments one request may ask for, or one code list may hold


class HierGenerator(StepLMGenerator):
    family = FAMILY
    max_steps = MAX_SEGMENTS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_rerank = 1  # a segment is a word or so: nothing to gain from writing it several times

    @torch.no_grad()
    def encode(self, text: str | bytes) -> dict:
        """{"segments": byte length of each segment, "codes": [[level 1 .. level L] per segment]}."""
        segments = self.segments(text)
        if not segments:
            raise SentcodeError("cannot encode empty text")
        if len(segments) > self.max_steps:
            raise SentcodeError(f"the text has {len(segments)} segments; encode at most {self.max_steps} at a time")
        state = self.new_state()
        codes = []
        for s in segments:
            _, pooled = self._encode(state, s, written=False)
            _, c = self._codes_of(pooled)
            codes.append([int(v) for v in c[0]])
            state.stream.extend([BOS] + list(s))  # the next segment's compressor reads these bytes before it
        n = sum(len(s) for s in segments)
        return {"family": FAMILY, "levels": self.model.cfg.levels, "codebook_size": self.model.cfg.codebook_size,
                "bytes": n, "segments": [len(s) for s in segments], "codes": codes,
                "bytes_per_code": n / (len(codes) * self.model.cfg.levels)}

    def check_codes(self, codes) -> torch.Tensor:
        """Codes as a [segments, levels] tensor, or one clear error."""
        c = self.model.cfg
        if not isinstance(codes, (list, tuple)) or not codes:
            raise SentcodeError("codes must be a non-empty list of code tuples (one per segment)")
        if len(codes) > self.max_steps:
            raise SentcodeError(f"{len(codes)} code tuples: decode at most {self.max_steps} at a time")
        for i, t in enumerate(codes):
            if not isinstance(t, (list, tuple)) or len(t) != c.levels:
                raise SentcodeError(f"code tuple {i} is {t!r}: this run has {c.levels} code levels per segment")
            for v in t:
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < c.codebook_size:
                    raise SentcodeError(f"code tuple {i} holds {v!r}: codes are integers from 0 to "
                                        f"{c.codebook_size - 1}")
        return torch.tensor(codes, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def decode(self, codes) -> str:
        """The text the codes stand for: each segment written greedily from its codes (see the module doc)."""
        table = self.check_codes(codes)
        state = self.new_state()
        self._plan(state, None)
        out = bytearray()
        for tuple_ in table:
            self._set_cond(state, self.model.rvq.decode(tuple_[None]))
            text, _ = self._write(state, b"", 0.0, None, None, None, score=False)
            e, _ = self._encode(state, text, written=True)
            self._plan(state, e)
            out += text
        return out.decode("utf-8", "surrogateescape")


def load_hier(run_dir: str | Path, device: str = "cpu", renderer: str | None = None) -> HierGenerator:
    return load_core(run_dir, device, renderer, FAMILY, HierConfig, HierGenerator)
