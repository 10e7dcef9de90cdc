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
from sentcode.nn.sampling import check_sampling, make_generator

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


def _plan(step: Step, separator: str) -> dict:
    """A step as the playground's plan view shows it."""
    cands = [{"text": c.text, "codes": c.codes.tolist(), "agreement": c.agreement, "logprob": c.logprob_per_byte}
             for c in step.candidates]
    best = cands[step.chosen]
    return {"text": separator + best["text"], "planned": step.planned.tolist(), "written": best["codes"],
            "agreement": best["agreement"], "candidates": cands if len(cands) > 1 else [], "chosen": step.chosen}


def level_weights(levels: int) -> np.ndarray:
    return 0.5 ** np.arange(levels)


class SentenceGenerator:
    """Generation and two-part scoring for a sentence pipeline run."""

    family = "sentence"
    separator = " "  # sentences are written without their whitespace; the pipeline joins them with one space
    default_rerank = 4

    @property
    def history(self) -> int:
        """How many earlier sentences the planner reads."""
        return self.planner.cfg.max_steps - 1

    def __init__(self, run_dir: Path, cfg: dict, encoder, rvq, planner, renderer, nocode=None, nar=None,
                 renderer_kind: str = "ar"):
        if renderer_kind not in ("ar", "nar"):
            raise SentcodeError(f"renderer must be 'ar' or 'nar', got {renderer_kind!r}")
        if renderer_kind == "nar" and nar is None:
            raise SentcodeError("renderer 'nar' needs a trained NAR renderer (the renderer-nar stage)")
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.encoder, self.rvq, self.planner, self.renderer, self.nocode = encoder, rvq, planner, renderer, nocode
        # Generation writes with ``renderer_kind``; the two-part score always uses the AR renderer (the NAR one
        # is trained by a reward, not for likelihood; its own bits are reported apart by the evaluation).
        self.nar, self.renderer_kind = nar, renderer_kind
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

    def _render(self, planned: np.ndarray, contexts: list[bytes], n: int, temperature: float,
                generator: torch.Generator, top_k, top_p) -> list[list[tuple[bytes, float]]]:
        """``n`` candidates (bytes, log-prob) for each row of planned [B, K] and its context."""
        if self.renderer_kind == "ar":
            return self.renderer.generate_batch(planned, None, contexts, self.max_bytes, temperature, top_k,
                                                top_p, generator, n)
        if top_k or top_p is not None:
            raise SentcodeError("top-k and top-p apply to the AR renderer; the NAR renderer samples with temperature only")
        nar = self.nar
        ctx = nar._context_tensor(contexts, len(contexts))
        was_training = nar.training
        nar.eval()
        try:
            out = nar.rollout(torch.as_tensor(planned, dtype=torch.long, device=nar.device), None, ctx, n,
                              temperature or 1.0, generator, greedy=temperature == 0)
        finally:
            nar.train(was_training)
        flat = list(zip(out.sentences(), out.logprob.double().tolist()))
        return [flat[b * n : (b + 1) * n] for b in range(len(contexts))]

    @torch.no_grad()
    def step_batch(self, histories: np.ndarray, contexts: list[bytes], n: int, temperature: float,
                   generator: torch.Generator, top_k: int | None = None, top_p: float | None = None) -> list[Step]:
        """One closed-loop step for B documents at once: plan a tuple after each history (histories
        [B, S, K], equal S), render ``n`` candidates for each, rerank each document's candidates."""
        hist = torch.from_numpy(np.asarray(histories, dtype=np.int64).reshape(len(contexts), -1, self.levels))
        planned, _, plan_lp = self.planner.sample_next_batch(hist, temperature=temperature, top_k=top_k,
                                                             top_p=top_p, generator=generator)
        planned = planned.cpu().numpy()
        cands = self._render(planned, contexts, n, temperature, generator, top_k, top_p)
        codes = self.codes_of([c for row in cands for c, _ in row])
        steps = []
        for b, row in enumerate(cands):
            rc = codes[b * n : (b + 1) * n]
            agree = self._agreement(rc, planned[b])
            out = [Candidate(c, lp, rc[i], float(agree[i])) for i, (c, lp) in enumerate(row)]
            # An empty candidate is never preferred: it would end the text rather than continue it.
            chosen = max(range(len(out)), key=lambda i: (bool(out[i].data.strip()), out[i].agreement,
                                                         out[i].logprob_per_byte))
            steps.append(Step(planned[b], float(plan_lp[b]), out, chosen))
        return steps

    def step(self, history: np.ndarray, context: bytes, n: int, temperature: float,
             generator: torch.Generator, top_k: int | None = None, top_p: float | None = None) -> Step:
        """One closed-loop step: plan a tuple after ``history`` [S, K], render ``n`` candidates, rerank."""
        return self.step_batch(np.asarray(history)[None], [context], n, temperature, generator, top_k, top_p)[0]

    # ---- the public API ------------------------------------------------------------------------------------

    def _check(self, prompt, max_sentences: int, rerank: int | None, temperature: float, top_k, top_p) -> list[bytes]:
        check_sampling(temperature, top_k, top_p)
        rerank = self.default_rerank if rerank is None else rerank
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

    def stream(self, prompt: str | bytes, max_sentences: int = 3, rerank: int | None = None, temperature: float = 0.8,
               seed: int | None = None, top_k: int | None = None, top_p: float | None = None) -> Iterator[str]:
        """Yield up to ``max_sentences`` generated sentences, one at a time (fewer if the renderer produces
        only empty text). Arguments are checked here, before the first sentence is asked for."""
        sentences = self._check(prompt, max_sentences, rerank, temperature, top_k, top_p)
        n = self.default_rerank if rerank is None else max(1, rerank)
        return self._stream(sentences, max_sentences, n, temperature, seed, top_k, top_p)

    def _stream(self, sentences, max_sentences, n, temperature, seed, top_k, top_p, plan: bool = False):
        from sentcode.models.sentence.renderer import tail

        gen = make_generator(seed, self.renderer.device)
        history = self.codes_of(sentences)
        width = self.renderer.cfg.context_bytes if self.renderer_kind == "ar" else self.nar.cfg.context_bytes
        context = tail(b" ".join(sentences), width)
        for _ in range(max_sentences):
            step = self.step(history, context, n, temperature, gen, top_k, top_p)
            best = step.best
            if not best.data.strip():
                return
            history = np.concatenate([history, best.codes[None]])
            context = tail(context + b" " + best.data if context else best.data, width)
            yield _plan(step, self.separator) if plan else best.text

    def stream_plan(self, prompt: str | bytes, max_sentences: int = 3, rerank: int | None = None,
                    temperature: float = 0.8, seed: int | None = None, top_k: int | None = None,
                    top_p: float | None = None) -> Iterator[dict]:
        """``stream`` with what each step decided, in ``StepLMGenerator.stream_plan``'s shape (each sentence's
        text carries the separator before it)."""
        sentences = self._check(prompt, max_sentences, rerank, temperature, top_k, top_p)
        n = self.default_rerank if rerank is None else max(1, rerank)
        return self._stream(sentences, max_sentences, n, temperature, seed, top_k, top_p, plan=True)

    def generate(self, prompt: str | bytes, max_sentences: int = 3, rerank: int | None = None, temperature: float = 0.8,
                 seed: int | None = None, top_k: int | None = None, top_p: float | None = None) -> str:
        """The generated sentences joined by single spaces (the continuation only, not the prompt)."""
        return " ".join(self.stream(prompt, max_sentences, rerank, temperature, seed, top_k, top_p))

    def generate_batch(self, prompts: list[str | bytes], max_sentences: int = 3, rerank: int | None = None,
                       temperature: float = 0.8, seed: int | None = None, top_k: int | None = None,
                       top_p: float | None = None) -> list[str]:
        """``generate`` for several prompts at once, stepping them together.

        Documents whose histories have the same number of sentences and whose renderer contexts have the
        same length share one planner and one renderer batch per step (the models have no padding mask);
        a document stops when its renderer writes only whitespace. Same output format as ``generate``.
        """
        from sentcode.models.sentence.renderer import tail

        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise SentcodeError("prompts must be a non-empty list")
        docs = [self._check(p, max_sentences, rerank, temperature, top_k, top_p) for p in prompts]
        n = self.default_rerank if rerank is None else max(1, rerank)
        gen = make_generator(seed, self.renderer.device)
        width = self.renderer.cfg.context_bytes if self.renderer_kind == "ar" else self.nar.cfg.context_bytes
        hist = [self.codes_of(d) for d in docs]
        ctx = [tail(b" ".join(d), width) for d in docs]
        out: list[list[str]] = [[] for _ in docs]
        live = list(range(len(docs)))
        for _ in range(max_sentences):
            groups: dict[tuple[int, int], list[int]] = {}
            for i in live:
                groups.setdefault((len(hist[i]), len(ctx[i])), []).append(i)
            ended = set()
            for rows in groups.values():
                steps = self.step_batch(np.stack([hist[i] for i in rows]), [ctx[i] for i in rows], n,
                                        temperature, gen, top_k, top_p)
                for i, st in zip(rows, steps):
                    best = st.best
                    if not best.data.strip():
                        ended.add(i)
                        continue
                    hist[i] = np.concatenate([hist[i], best.codes[None]])
                    ctx[i] = tail(ctx[i] + b" " + best.data if ctx[i] else best.data, width)
                    out[i].append(best.text)
            live = [i for i in live if i not in ended]
            if not live:
                break
        return [" ".join(o) for o in out]

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


def load_sentence(run_dir: str | Path, device: str = "cpu", renderer: str | None = "ar") -> SentenceGenerator:
    """The generator of a sentence pipeline run; names the first missing stage when it is incomplete.

    ``renderer``: "ar" (default) or "nar", the renderer that writes generated sentences; "nar" needs the
    optional renderer-nar stage.
    """
    from sentcode.runs.parts import load_encoder, load_planner, load_renderer
    from sentcode.runs.staged_config import read_run_config
    from sentcode.runs.staged_store import load_rvq, read_stage, require_stage, stage_dir

    run_dir, renderer = Path(run_dir), renderer or "ar"
    cfg = read_run_config(run_dir)
    for stage in ("encoder", "rvq", "planner", "renderer"):
        require_stage(run_dir, stage)
    nocode = None
    if read_stage(run_dir, "renderer-nocode") is not None:
        nocode = load_renderer(stage_dir(run_dir, "renderer-nocode"), device)
    if renderer not in ("ar", "nar"):
        raise SentcodeError(f"renderer must be 'ar' or 'nar', got {renderer!r}")
    nar = None
    if renderer == "nar":
        if read_stage(run_dir, "renderer-nar") is None:
            raise SentcodeError(f"{run_dir} has no NAR renderer: enable it (--set renderer_nar.enabled=true) and "
                                "rerun `sentcode pipeline sentence`, or use the AR renderer")
        from sentcode.runs.parts import load_nar_renderer

        nar = load_nar_renderer(stage_dir(run_dir, "renderer-nar"), device)
    gen = SentenceGenerator(run_dir, cfg, load_encoder(stage_dir(run_dir, "encoder"), device),
                            load_rvq(run_dir, cfg).to(device), load_planner(stage_dir(run_dir, "planner"), device),
                            load_renderer(stage_dir(run_dir, "renderer"), device), nocode, nar, renderer)
    if nar is not None and nar.cfg.levels != gen.levels:
        raise SentcodeError(f"{run_dir}: the NAR renderer reads {nar.cfg.levels} code levels but the rvq has "
                            f"{gen.levels}; rerun from the rvq stage (--from rvq)")
    if gen.planner.cfg.levels != gen.levels or gen.renderer.cfg.levels != gen.levels:
        raise SentcodeError(f"{run_dir}: the planner/renderer read {gen.planner.cfg.levels}/{gen.renderer.cfg.levels} "
                            f"code levels but the rvq has {gen.levels}; rerun from the rvq stage (--from rvq)")
    return gen

