"""The facade behind ``sentcode.load`` for a hierarchical byte autoencoder (family ``hier``).

Generation is the end-to-end core's (``infer.steplm``), one short segment per step: the prompt is cut by the
run's causal segmenter, its completed segments are compressed and read by the code LM, which samples the next
segment's codes; the expander writes the segment from them (the seed's ``generate_bytes``). With a second
level, generation still steps through level 1 (its code LM predicts each level-1 code from the text so far);
the second level compresses, scores and decodes.

``encode`` gives the codes of a text, segment by segment (each compressed with the symbols before it, as in
training), and with a second level the level-2 codes of the level-1 code stream; ``decode`` turns codes back:
each segment written greedily from its codes and the code LM's state of the segments decoded so far, then
compressed for the next state. Two-level codes are decoded to level-1 codes first, then to text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sentcode.errors import SentcodeError
from sentcode.infer.steplm import StepLMGenerator, load_core
from sentcode.models.hier import FAMILY, UPPER_DIR, HierConfig

MAX_SEGMENTS = 4096  # the most segments one request may ask for, or one code list may hold


class HierGenerator(StepLMGenerator):
    family = FAMILY
    max_steps = MAX_SEGMENTS
    default_steps = 40  # segments `sentcode generate` writes when not told (about 240 bytes of words)

    def __init__(self, *args, upper: "HierGenerator | None" = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_rerank = 1  # a segment is a word or so: nothing to gain from writing it several times
        self.upper = upper  # the second level (a generator over level-1 codes), or None

    @property
    def upper_model(self):
        return None if self.upper is None else self.upper.model

    # ---- one level: segments of symbols <-> code tuples ------------------------------------------------------

    @torch.no_grad()
    def encode_segments(self, segments: list) -> list[list[int]]:
        state = self.new_state()
        codes = []
        for s in segments:
            _, pooled = self._encode(state, s, written=False)
            codes.append([int(v) for v in self._codes_of(pooled)[1][0]])
            state.stream.extend([self.bos] + list(s))  # the next segment's compressor reads these before it
        return codes

    @torch.no_grad()
    def decode_segments(self, table: torch.Tensor) -> list:
        state = self.new_state()
        self._plan(state, None)
        out = []
        for tuple_ in table:
            self._set_cond(state, self.model.quant.decode(tuple_[None]))
            seg, _ = self._write(state, b"" if self.symbols == 256 else [], 0.0, None, None, None, score=False)
            e, _ = self._encode(state, seg, written=True)
            self._plan(state, e)
            out.append(seg)
        return out

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

    # ---- text <-> codes ------------------------------------------------------------------------------------------

    def _upper_chunks(self, stream: list[int]) -> list[list[int]]:
        k = self.upper.model.cfg.max_segment_bytes
        return [stream[a:a + k] for a in range(0, len(stream), k)]

    def encode(self, text: str | bytes) -> dict:
        """{"segments": byte length of each segment, "codes": [[level 1 .. level L] per segment]}, and with a
        second level "level2": {"segments": level-1 codes per level-2 segment, "codes": [[...] per segment]}."""
        segments = self.segments(text)
        if not segments:
            raise SentcodeError("cannot encode empty text")
        if len(segments) > self.max_steps:
            raise SentcodeError(f"the text has {len(segments)} segments; encode at most {self.max_steps} at a time")
        codes = self.encode_segments(segments)
        n = sum(len(s) for s in segments)
        out = {"family": FAMILY, "levels": self.model.cfg.levels, "codebook_size": self.model.cfg.codebook_size,
               "bytes": n, "segments": [len(s) for s in segments], "codes": codes,
               "bytes_per_code": n / (len(codes) * self.model.cfg.codes_per_segment)}
        if self.upper is not None:
            chunks = self._upper_chunks([c[0] for c in codes])
            top = self.upper.encode_segments(chunks)
            out["level2"] = {"levels": self.upper.model.cfg.levels, "codebook_size": self.upper.model.cfg.codebook_size,
                             "segments": [len(c) for c in chunks], "codes": top,
                             "bytes_per_code": n / (len(top) * self.upper.model.cfg.codes_per_segment)}
        return out

    def decode(self, codes, level: int = 1) -> str:
        """The text that level-``level`` codes stand for (level 2: through the level-1 codes they expand to)."""
        if level == 2:
            if self.upper is None:
                raise SentcodeError("this run has one level: there are no level-2 codes to decode")
            stream = [int(c) for seg in self.upper.decode_segments(self.upper.check_codes(codes)) for c in seg]
            if not stream:  # the level-2 expander ended every segment at once: no text
                return ""
            codes = [[c] for c in stream[:self.max_steps]]
        elif level != 1:
            raise SentcodeError(f"level must be 1 or 2, got {level!r}")
        segments = self.decode_segments(self.check_codes(codes))
        return b"".join(segments).decode("utf-8", "surrogateescape")


def load_hier(run_dir: str | Path, device: str = "cpu", renderer: str | None = None) -> HierGenerator:
    gen = load_core(run_dir, device, renderer, FAMILY, HierConfig, HierGenerator)
    if gen.cfg.data.upper_stride:
        from sentcode.models.sentence.steplm import WEIGHTS, StepLM
        from sentcode.runs.weights import load_weights

        upper_dir = Path(run_dir) / UPPER_DIR
        if not (upper_dir / WEIGHTS).is_file():
            raise SentcodeError(f"{run_dir} has no trained second level ({upper_dir / WEIGHTS}); finish training "
                                "it with `sentcode pipeline hier ... --resume auto`")
        model = load_weights(StepLM(gen.cfg.upper_model()).to(device), upper_dir, WEIGHTS)
        gen.upper = HierGenerator(model, gen.cfg, upper_dir, gen.segmenter)
    return gen
