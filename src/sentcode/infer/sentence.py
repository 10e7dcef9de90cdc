"""The facade behind ``sentcode.load`` for a sentence-step LM (a ``sentcode pipeline sentence`` run directory).

Generation is a closed loop, one sentence per step:

1. the prompt is split into sentences; each is embedded by the byte sentence encoder and quantized by the
   RVQ into a code tuple: that is the planner's history;
2. the planner samples the next tuple;
3. the renderer writes ``rerank`` candidate sentences for that tuple, given the text before it;
4. each candidate is re-embedded and re-quantized, and scored by level-weighted agreement with the planned
   tuple (weights 1, 1/2, 1/4, ...: a coarse level matters more than a fine one); ties go to the candidate
   with the higher renderer log-probability per byte (never to whichever came first);
5. the chosen sentence's own codes (not the planned ones) join the history, so the planner always reads
   codes of text that is really there, as in training.

Prompt handling: a prompt with no sentence boundary is one sentence. A prompt longer than the planner's
context keeps its most recent sentences (the planner reads at most ``max_steps - 1`` of them, the renderer
its last ``context_bytes`` bytes). Generated sentences are yielded without separators; ``generate`` joins
them with single spaces (the separator the corpus pipeline normalises sentence breaks to).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sentcode.errors import SentcodeError
from sentcode.infer.sampling import check_sampling, make_generator

MAX_SENTENCES = 64


@dataclass
class Candidate:
    data: bytes  # the sentence's bytes
    logprob: float  # renderer log-probability in nats (EOS included when reached)
    codes: np.ndarray  # [K] codes of the re-encoded sentence
    agreement: float  # level-weighted share of levels that match the planned tuple, in [0, 1]

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    @property
    def logprob_per_byte(self) -> float:
        return self.logprob / (len(self.data) + 1)


@dataclass
class Step:
    planned: np.ndarray  # [K]
    plan_logprob: float
    candidates: list[Candidate]
    chosen: int

    @property
    def best(self) -> Candidate:
        return self.candidates[self.chosen]


def level_weights(levels: int) -> np.ndarray:
    return 0.5 ** np.arange(levels)


class SentenceGenerator:
    """Generation and two-part scoring for a sentence pipeline run."""

    family = "sentence"

    def __init__(self, run_dir: Path, cfg: dict, encoder, rvq, planner, renderer, nocode=None):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.encoder, self.rvq, self.planner, self.renderer, self.nocode = encoder, rvq, planner, renderer, nocode
        self.max_bytes = int(cfg.get("sentences", {}).get("max_bytes", 256))
        self.levels = rvq.levels
        self.weights = level_weights(self.levels)

    # ---- pieces of the loop --------------------------------------------------------------------------------

    def split(self, text: str) -> list[str]:
        from sentcode.corpus.sentences import split_sentences

        return split_sentences(text, self.max_bytes)

    @torch.no_grad()
    def codes_of(self, sentences: list[bytes]) -> np.ndarray:
        """Code tuples [n, K] of sentences (bytes), through the encoder and the quantizer."""
        if not sentences:
            return np.zeros((0, self.levels), dtype=np.int64)
        emb = self.encoder.encode_bytes(sentences)
        return self.rvq.encode(torch.from_numpy(emb)).cpu().numpy()

    def _agreement(self, codes: np.ndarray, planned: np.ndarray) -> np.ndarray:
        return ((codes == planned[None]) * self.weights).sum(-1) / self.weights.sum()

    @torch.no_grad()
    def step(self, history: np.ndarray, context: bytes, n: int, temperature: float,
             generator: torch.Generator, top_k: int | None = None, top_p: float | None = None) -> Step:
        """One closed-loop step: plan a tuple after ``history`` [S, K], render ``n`` candidates, rerank."""
        hist = torch.from_numpy(np.asarray(history, dtype=np.int64).reshape(1, -1, self.levels))
        planned, _, plan_lp = self.planner.sample_next(hist, temperature=temperature, top_k=top_k, top_p=top_p,
                                                       generator=generator)
        planned = planned.cpu().numpy()
        cands = self.renderer.generate(planned, context=context, max_bytes=self.max_bytes, temperature=temperature,
                                       top_k=top_k, top_p=top_p, generator=generator, n=n)
        codes = self.codes_of([c for c, _ in cands])
        agree = self._agreement(codes, planned)
        out = [Candidate(c, lp, codes[i], float(agree[i])) for i, (c, lp) in enumerate(cands)]
        # An empty candidate is never preferred: it would end the text rather than continue it.
        chosen = max(range(len(out)), key=lambda i: (bool(out[i].data.strip()), out[i].agreement,
                                                     out[i].logprob_per_byte))
        return Step(planned, plan_lp, out, chosen)

    # ---- the public API ------------------------------------------------------------------------------------

    def _check(self, prompt, max_sentences: int, rerank: int, temperature: float, top_k, top_p) -> list[bytes]:
        check_sampling(temperature, top_k, top_p)
        if isinstance(max_sentences, bool) or not isinstance(max_sentences, int) or max_sentences < 1:
            raise SentcodeError(f"max_sentences must be >= 1, got {max_sentences!r}")
        if max_sentences > MAX_SENTENCES:
            raise SentcodeError(f"max_sentences must be <= {MAX_SENTENCES}, got {max_sentences}")
        if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 0:
            raise SentcodeError(f"rerank must be an integer >= 0 (0 or 1: no reranking), got {rerank!r}")
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8", "surrogateescape")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SentcodeError("the prompt is empty: give at least one word to continue")
        # The planner reads at most max_steps - 1 earlier sentences: older ones would be dropped anyway.
        sentences = self.split(prompt)[-(self.planner.cfg.max_steps - 1) :]
        return [s.encode("utf-8", "surrogateescape") for s in sentences]

    def stream(self, prompt: str | bytes, max_sentences: int = 3, rerank: int = 4, temperature: float = 0.8,
               seed: int | None = None, top_k: int | None = None, top_p: float | None = None) -> Iterator[str]:
        """Yield up to ``max_sentences`` generated sentences, one at a time (fewer if the renderer produces
        only empty text). Arguments are checked here, before the first sentence is asked for."""
        sentences = self._check(prompt, max_sentences, rerank, temperature, top_k, top_p)
        return self._stream(sentences, max_sentences, max(1, rerank), temperature, seed, top_k, top_p)

    def _stream(self, sentences, max_sentences, n, temperature, seed, top_k, top_p) -> Iterator[str]:
        from sentcode.models.sentence.renderer import tail

        gen = make_generator(seed, self.renderer.device)
        history = self.codes_of(sentences)
        context = tail(b" ".join(sentences), self.renderer.cfg.context_bytes)
        for _ in range(max_sentences):
            best = self.step(history, context, n, temperature, gen, top_k, top_p).best
            if not best.data.strip():
                return
            history = np.concatenate([history, best.codes[None]])
            context = tail(context + b" " + best.data if context else best.data, self.renderer.cfg.context_bytes)
            yield best.text

    def generate(self, prompt: str | bytes, max_sentences: int = 3, rerank: int = 4, temperature: float = 0.8,
                 seed: int | None = None, top_k: int | None = None, top_p: float | None = None) -> str:
        """The generated sentences joined by single spaces (the continuation only, not the prompt)."""
        return " ".join(self.stream(prompt, max_sentences, rerank, temperature, seed, top_k, top_p))

    def score(self, text: str | bytes) -> float:
        """Two-part bits per byte of ``text`` as one document (see ``sentcode.eval.sentence``)."""
        return self.score_details(text)["bpb"]

    def score_details(self, text: str | bytes) -> dict:
        from sentcode.eval.sentence import two_part_bits

        if isinstance(text, bytes):
            text = text.decode("utf-8", "surrogateescape")
        sentences = self.split(text) if isinstance(text, str) else []
        if not sentences:
            raise SentcodeError("cannot score empty text")
        codes = self.codes_of([s.encode("utf-8", "surrogateescape") for s in sentences])
        return two_part_bits(self.planner, self.renderer, [sentences], [codes])


def load_sentence(run_dir: str | Path, device: str = "cpu") -> SentenceGenerator:
    """The generator of a sentence pipeline run; names the first missing stage when it is incomplete."""
    from sentcode.pipeline.sentence import load_rvq, read_run_config, read_stage, require_stage, stage_dir
    from sentcode.train.encoder import load_encoder
    from sentcode.train.planner import load_planner
    from sentcode.train.renderer import load_renderer

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    for stage in ("encoder", "rvq", "planner", "renderer"):
        require_stage(run_dir, stage)
    nocode = None
    if read_stage(run_dir, "renderer-nocode") is not None:
        nocode = load_renderer(stage_dir(run_dir, "renderer-nocode"), device)
    gen = SentenceGenerator(run_dir, cfg, load_encoder(stage_dir(run_dir, "encoder"), device),
                            load_rvq(run_dir, cfg).to(device), load_planner(stage_dir(run_dir, "planner"), device),
                            load_renderer(stage_dir(run_dir, "renderer"), device), nocode)
    if gen.planner.cfg.levels != gen.levels or gen.renderer.cfg.levels != gen.levels:
        raise SentcodeError(f"{run_dir}: the planner/renderer read {gen.planner.cfg.levels}/{gen.renderer.cfg.levels} "
                            f"code levels but the rvq has {gen.levels}; rerun from the rvq stage (--from rvq)")
    return gen

