"""The sentence-step LM pipeline: corpus -> sentences -> encoder -> embeddings -> RVQ codes -> planner and
renderers -> evaluation, in one run directory with one sub-directory per stage.

Every stage writes ``RUN/<stage>/`` and, last of all, ``RUN/<stage>/stage.json`` (stage, config, seed,
versions, input_hash, output_hash, output summary, seconds). ``stage.json`` is the commit marker: a stage
directory without it is unfinished and is rebuilt from scratch.

A stage is skipped when its ``input_hash`` matches: a hash of the stage's own config and of the
``input_hash``/``output_hash`` of the stages it reads. Training under a wall-clock budget is not
bit-reproducible, so downstream stages key on what an upstream stage actually produced (its output hash),
not only on how it was configured. ``from_stage`` redoes that stage and every later one.

The pipeline config is a YAML preset (``staged-tiny``, ``staged-small`` or a file) with sections
``corpus``, ``sentences``, ``encoder``, ``embed``, ``rvq``, ``planner``, ``renderer``, ``renderer_nar``,
``eval`` and ``budgets``; ``--set section.key=value`` overrides it (``encoder.model.d_model=64``,
``budgets.renderer.max_steps=100``). Settings that must agree between stages (the planner's and the
renderers' levels and codebook sizes, the embedding size, the sentence length limits) are derived from one
place, so they cannot disagree.

Not supported (a clear error): continuous residuals (``use_residual``). The two-part code length counts
codes and bytes only, and a residual read by the planner or renderer would be information the code length
does not pay for.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

from sentcode.errors import ConfigError, SentcodeError
from sentcode.config import _read_yaml, apply_overrides
from sentcode.io import atomic_path, write_json, write_text
from sentcode.runs.parts import load_encoder, load_planner
from sentcode.runs.staged_config import (
    FAMILY, SPLITS, STAGE_FILE, STAGES, _levels, _section, encoder_overrides,
    nar_enabled, nar_overrides, planner_overrides, read_run_config, renderer_overrides, reward_encoder_overrides,
    stage_config, validate_pipeline_config,
)
from sentcode.runs.staged_store import (
    _output_files, _read_jsonl, _save_npy, _sha256_files, _versions, _write_jsonl, build_rvq, encode_codes, flatten,
    input_hash, load_rvq, per_doc, read_codes, read_predicted, read_sentences, read_stage, require_stage, stage_dir,
)


@torch.no_grad()
def greedy_tuples(planner, codes: np.ndarray) -> np.ndarray:
    """For one document's true tuples [n, K]: the planner's greedy next tuple at every position, each from
    the true (teacher-forced) history before it, levels chosen one after another. Long documents are read
    in the planner's evaluation windows, so every prediction has at least half a context of history."""
    from sentcode.train.planner import eval_windows

    n, K = codes.shape
    out = np.zeros((n, K), dtype=np.int64)
    dev = planner.bos.device
    for _, o, s, end in eval_windows([n], planner.cfg.max_steps):
        c = torch.from_numpy(codes[o:end]).long().to(dev)[None]
        prev = torch.from_numpy(codes[o - 1]).long().to(dev)[None] if o > 0 else torch.full((1, K), -1, device=dev)
        cond = planner.hidden(c, None, prev_codes=prev)[0]  # [S, d]
        chosen = []
        for l, head in enumerate(planner.heads):
            ids = head(cond).argmax(-1)
            chosen.append(ids)
            if l < len(planner.cond_emb):
                cond = cond + planner.cond_emb[l](ids)
        out[s:end] = torch.stack(chosen, -1)[s - o :].cpu().numpy()
    return out


# ---- the stages ---------------------------------------------------------------------------------------------


class _Ctx:
    def __init__(self, run_dir: Path, cfg: dict, device: str, progress):
        self.run_dir, self.cfg, self.device, self.progress = run_dir, cfg, device, progress

    def dir(self, stage: str) -> Path:
        return stage_dir(self.run_dir, stage)

    def train_progress(self):
        return self.progress if self.progress in (True, False, "plain") else bool(self.progress)


def _summary(s: dict) -> dict:
    keep = ("status", "step", "train_elapsed", "final_eval")
    return {k: s.get(k) for k in keep if k in s}


def stage_corpus(ctx: _Ctx) -> dict:
    from sentcode.corpus.splits import load_corpus

    c = ctx.cfg["corpus"]
    splits = load_corpus(c["spec"], val_frac=c.get("val_frac", 0.05), test_frac=c.get("test_frac", 0.05))
    out = {"duplicates_removed": splits.duplicates_removed}
    for name in SPLITS:
        docs = splits[name]
        _write_jsonl(ctx.dir("corpus") / f"{name}.jsonl", ({"doc_id": d.doc_id, "text": d.text} for d in docs))
        out[name] = {"documents": len(docs), "bytes": sum(len(d.text.encode("utf-8", "surrogateescape")) for d in docs)}
    return out


def stage_sentences(ctx: _Ctx) -> dict:
    from sentcode.corpus.sentences import sentences_of_documents

    max_bytes = _section(ctx.cfg, "sentences").get("max_bytes", 256)
    out = {}
    for name in SPLITS:
        rows = _read_jsonl(ctx.dir("corpus") / f"{name}.jsonl")
        docs, stats = sentences_of_documents([r["text"] for r in rows], max_bytes)
        _write_jsonl(ctx.dir("sentences") / f"{name}.jsonl",
                     ({"doc_id": r["doc_id"], "sentences": d} for r, d in zip(rows, docs)))
        n_bytes = sum(len(s.encode("utf-8", "surrogateescape")) for d in docs for s in d)
        out[name] = {**asdict(stats), "bytes": n_bytes, "mean_bytes": n_bytes / max(stats.sentences, 1)}
    write_json(ctx.dir("sentences") / "stats.json", out)
    return out


def stage_encoder(ctx: _Ctx) -> dict:
    from sentcode.train.encoder import train_encoder

    s = train_encoder(read_sentences(ctx.run_dir, "train"), read_sentences(ctx.run_dir, "val"), ctx.dir("encoder"),
                      overrides=encoder_overrides(ctx.cfg), device=ctx.device, progress=ctx.train_progress())
    if s["status"] != "completed":
        raise KeyboardInterrupt
    return _summary(s)


def stage_embed(ctx: _Ctx) -> dict:
    from sentcode.data.embeddings import write_embeddings

    enc = load_encoder(ctx.dir("encoder"), device=_infer_device(ctx.device))
    bs = int(_section(ctx.cfg, "embed").get("batch_size", 128))
    out = {}
    for name in SPLITS:
        sents = flatten(read_sentences(ctx.run_dir, name))
        t0 = time.perf_counter()
        emb = enc.encode(sents, batch_size=bs)
        write_embeddings(ctx.dir("embed") / name, emb, meta={"encoder": "byte-sentence-encoder",
                                                              "encoder_run": str(ctx.dir("encoder"))}, sentences=sents)
        out[name] = {"n": len(sents), "dim": int(emb.shape[1]), "seconds": time.perf_counter() - t0}
    return out


def stage_rvq(ctx: _Ctx) -> dict:
    from safetensors.torch import save_file

    from sentcode.data.embeddings import read_embeddings

    r = _section(ctx.cfg, "rvq")
    K, V = _levels(ctx.cfg)
    train, _ = read_embeddings(ctx.dir("embed") / "train")
    fit_rows = int(r.get("fit_rows", 80000))
    rows = np.arange(len(train))
    if len(rows) > fit_rows:  # a deterministic sample, in corpus order
        rows = np.sort(np.random.default_rng(ctx.cfg["seed"]).choice(len(rows), fit_rows, replace=False))
    data = torch.from_numpy(np.array(train[rows], dtype=np.float32))
    meta = {"dim": int(train.shape[1]), "levels": K, "codebook_sizes": V, "normalize": r.get("normalize", "standard")}
    rvq = build_rvq(meta)
    fit_stats = rvq.fit(data, iters=int(r.get("iters", 10)), batch=8192, seed=ctx.cfg["seed"])
    d = ctx.dir("rvq")
    with atomic_path(d / "rvq.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in rvq.state_dict().items()}, str(tmp))
    write_json(d / "rvq.json", meta)
    write_json(d / "fit.json", fit_stats)
    out = {"fit_rows": int(len(rows)), "fit": fit_stats}
    out.update(encode_all(ctx.run_dir, rvq))
    return out


def encode_all(run_dir: Path, rvq) -> dict:
    """Codes and residuals of every split's embeddings, and the quantizer's health report on val."""
    from sentcode.data.embeddings import read_embeddings

    d = stage_dir(run_dir, "rvq")
    out = {}
    for name in SPLITS:
        emb, _ = read_embeddings(stage_dir(run_dir, "embed") / name)
        codes, res = encode_codes(rvq, emb)
        _save_npy(d / f"{name}_codes.npy", codes)
        _save_npy(d / f"{name}_residual.npy", res)
        out[f"{name}_sentences"] = int(len(codes))
        if name == "val":
            report = rvq.report(torch.from_numpy(np.array(emb, dtype=np.float32))) if len(emb) else []
            write_json(d / "report.json", report)
            out["val_report"] = report
    return out


def _docs_codes(run_dir: Path, split: str):
    docs = read_sentences(run_dir, split)
    return docs, per_doc(read_codes(run_dir, split), docs)


def stage_planner(ctx: _Ctx) -> dict:
    from sentcode.train.planner import train_planner

    load_rvq(ctx.run_dir, ctx.cfg)  # fails early, with a clear message, if the codes are from another K/V
    _, train_codes = _docs_codes(ctx.run_dir, "train")
    _, val_codes = _docs_codes(ctx.run_dir, "val")
    s = train_planner(train_codes, val_codes, ctx.dir("planner"), overrides=planner_overrides(ctx.cfg),
                      device=ctx.device, progress=ctx.train_progress())
    if s["status"] != "completed":
        raise KeyboardInterrupt
    planner = load_planner(ctx.dir("planner"), device=_infer_device(ctx.device))
    t0 = time.perf_counter()
    for name in SPLITS:
        _, codes = _docs_codes(ctx.run_dir, name)
        pred = [greedy_tuples(planner, c) for c in codes]
        _save_npy(ctx.dir("planner") / f"predicted_{name}.npy",
                  np.concatenate(pred) if pred else np.zeros((0, planner.cfg.levels), np.int64))
    return {**_summary(s), "predict_seconds": time.perf_counter() - t0}


def _render_docs(run_dir: Path, split: str, use_codes: bool):
    from sentcode.train.renderer import RenderDoc

    docs = read_sentences(run_dir, split)
    if not use_codes:
        return [RenderDoc(sentences=d) for d in docs]
    codes = per_doc(read_codes(run_dir, split), docs)
    pred = per_doc(read_predicted(run_dir, split), docs)
    return [RenderDoc(sentences=d, codes=c, predicted_codes=p) for d, c, p in zip(docs, codes, pred)]


def _train_render(ctx: _Ctx, stage: str, use_codes: bool) -> dict:
    from sentcode.train.renderer import train_renderer

    codebooks = None
    if use_codes:
        codebooks = [b.embed.detach().clone() for b in load_rvq(ctx.run_dir, ctx.cfg).books]
    s = train_renderer(_render_docs(ctx.run_dir, "train", use_codes), _render_docs(ctx.run_dir, "val", use_codes),
                       ctx.dir(stage), overrides=renderer_overrides(ctx.cfg, use_codes), device=ctx.device,
                       progress=ctx.train_progress(), codebooks=codebooks)
    if s["status"] != "completed":
        raise KeyboardInterrupt
    return _summary(s)


def stage_renderer(ctx: _Ctx) -> dict:
    return _train_render(ctx, "renderer", True)


def stage_renderer_nocode(ctx: _Ctx) -> dict:
    return _train_render(ctx, "renderer-nocode", False)


def stage_renderer_nar(ctx: _Ctx) -> dict:
    """The optional NAR renderer: a reward encoder ("same" objective) is trained first, in
    ``renderer-nar/reward-encoder``; the pipeline's encoder is the judge of the NAR run's evaluations. The
    NAR renderer is trained and stored, but not yet part of the evaluation or of generation."""
    from sentcode.train.encoder import train_encoder

    from sentcode.train import renderer_nar as mod

    d = ctx.dir("renderer-nar")
    dev = _infer_device(ctx.device)
    rs = train_encoder(read_sentences(ctx.run_dir, "train"), read_sentences(ctx.run_dir, "val"), d / "reward-encoder",
                       overrides=reward_encoder_overrides(ctx.cfg), device=ctx.device, progress=ctx.train_progress())
    if rs["status"] != "completed":
        raise KeyboardInterrupt
    reward = load_encoder(d / "reward-encoder", device=dev)
    judge = load_encoder(ctx.dir("encoder"), device=dev)
    s = mod.train_nar_renderer(_render_docs(ctx.run_dir, "train", True), _render_docs(ctx.run_dir, "val", True),
                               reward, judge, d, overrides=nar_overrides(ctx.cfg), device=ctx.device,
                               progress=ctx.train_progress())
    if s["status"] != "completed":
        raise KeyboardInterrupt
    return {**_summary(s), "reward_encoder": _summary(rs)}


def stage_eval(ctx: _Ctx) -> dict:
    from sentcode.eval.sentence import evaluate_sentence_run
    from sentcode.infer.sentence import load_sentence

    result = evaluate_sentence_run(load_sentence(ctx.run_dir), split="test", progress=bool(ctx.progress))
    write_json(ctx.dir("eval") / "eval.json", result)
    keep = ("bpb", "plan_bits", "render_bits", "render_bpb", "bytes", "sentences", "judge")
    return {k: result[k] for k in keep if k in result}


STAGE_FNS: dict[str, Callable[[_Ctx], dict]] = {
    "corpus": stage_corpus, "sentences": stage_sentences, "encoder": stage_encoder, "embed": stage_embed,
    "rvq": stage_rvq, "planner": stage_planner, "renderer": stage_renderer,
    "renderer-nocode": stage_renderer_nocode, "renderer-nar": stage_renderer_nar, "eval": stage_eval,
}


def _infer_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def active_stages(cfg: dict) -> list[str]:
    return [s for s in STAGES if s != "renderer-nar" or nar_enabled(cfg)]


# ---- running -----------------------------------------------------------------------------------------------


def _say(progress, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def _execute(ctx: _Ctx, stage: str, want: str) -> dict:
    d = ctx.dir(stage)
    # A redone stage starts from an empty directory: training refuses to overwrite a run, and leftovers of
    # an older configuration must not be mistaken for outputs of this one.
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    output = STAGE_FNS[stage](ctx)
    seconds = time.perf_counter() - t0
    rec = {
        "stage": stage, "config": stage_config(ctx.cfg, stage), "seed": ctx.cfg["seed"], "versions": _versions(),
        "input_hash": want, "output_hash": _sha256_files(_output_files(d, stage)), "output": output,
        "started": started, "seconds": round(seconds, 3),
    }
    write_json(d / STAGE_FILE, rec)  # last: its presence means the stage finished
    return rec


def _write_run_header(run_dir: Path, cfg: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    write_json(run_dir / "run.json", {"family": FAMILY, "corpus": cfg["corpus"].get("spec"), "seed": cfg["seed"],
                                      **_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def run_pipeline(corpus="sotu", out="runs/sentence", preset: str = "staged-tiny", overrides: list[str] | None = None,
                 from_stage: str | None = None, progress: bool | str = True, until: str | None = None,
                 device: str = "auto") -> dict:
    """Build (or bring up to date) a sentence-step LM run directory; returns what ran, what was skipped,
    each stage's seconds and the evaluation (when the eval stage is reached).

    ``preset``: ``staged-tiny``, ``staged-small`` or a YAML file; ``overrides``: ``section.key=value``;
    ``from_stage``: redo that stage and every later one; ``until``: stop after that stage.
    """
    run_dir = Path(out)
    for name, value in (("--from", from_stage), ("--until", until)):
        if value is not None and value not in STAGES:
            raise SentcodeError(f"{name} must be one of {', '.join(STAGES)}, got {value!r}")
    data = _read_yaml(preset)
    if data.get("family") != FAMILY:
        raise ConfigError(f"preset {preset!r} is not a sentence pipeline preset (family {data.get('family')!r}); "
                          "use staged-tiny, staged-small or a file with family: sentence")
    data.setdefault("corpus", {})["spec"] = corpus
    apply_overrides(data, list(overrides or []))
    cfg = validate_pipeline_config(data)
    stages = active_stages(cfg)
    if from_stage is not None and from_stage not in stages:
        raise SentcodeError(f"stage {from_stage!r} is not enabled in this config")
    _write_run_header(run_dir, cfg)
    ctx = _Ctx(run_dir, cfg, device, progress)
    ran, skipped, times = [], [], {}
    force_from = stages.index(from_stage) if from_stage is not None else len(stages)
    t_all = time.perf_counter()
    for i, stage in enumerate(stages):
        want = input_hash(run_dir, cfg, stage)
        rec = read_stage(run_dir, stage)
        if i < force_from and rec is not None and rec.get("input_hash") == want:
            skipped.append(stage)
            times[stage] = rec.get("seconds")
            _say(progress, f"[{stage}] up to date, skipped")
        else:
            _say(progress, f"[{stage}] running")
            rec = _execute(ctx, stage, want)
            ran.append(stage)
            times[stage] = rec["seconds"]
            _say(progress, f"[{stage}] done in {rec['seconds']:.1f}s")
        if stage == until:
            break
    result = {"run_dir": str(run_dir), "ran": ran, "skipped": skipped, "seconds": times,
              "total_seconds": time.perf_counter() - t_all}
    ev = stage_dir(run_dir, "eval") / "eval.json"
    if "eval" in ran + skipped and ev.is_file():
        result["eval"] = json.loads(ev.read_text())
    return result


def run_stage(run_dir: str | Path, stage: str, progress: bool | str = True, device: str = "auto") -> dict:
    """Run one stage of an existing pipeline run directory (always redone), from its stored config.

    Its upstream stages must be complete; later stages become stale and are redone by the next pipeline run.
    """
    run_dir = Path(run_dir)
    if stage not in STAGES:
        raise SentcodeError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    cfg = read_run_config(run_dir)
    want = input_hash(run_dir, cfg, stage)  # names any missing upstream stage
    return _execute(_Ctx(run_dir, cfg, device, progress), stage, want)


def rvq_encode(run_dir: str | Path) -> dict:
    """Re-encode every split with the stored quantizer. If the codes change (the embeddings were redone), the
    rvq stage's output hash is updated, so the stages that read the codes become stale."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    rec = require_stage(run_dir, "rvq")
    rvq = load_rvq(run_dir, cfg)
    out = encode_all(run_dir, rvq)
    new_hash = _sha256_files(_output_files(stage_dir(run_dir, "rvq"), "rvq"))
    changed = new_hash != rec.get("output_hash")
    if changed:
        rec["output_hash"] = new_hash
        rec["output"].update({k: v for k, v in out.items()})
        write_json(stage_dir(run_dir, "rvq") / STAGE_FILE, rec)
    return {"changed": changed, "sentences": {s: out[f"{s}_sentences"] for s in SPLITS}}


def rvq_report(run_dir: str | Path, split: str = "val") -> list[dict]:
    """Per-level health of the stored quantizer on a split's embeddings."""
    from sentcode.data.embeddings import read_embeddings

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    require_stage(run_dir, "embed")
    rvq = load_rvq(run_dir, cfg)
    emb, _ = read_embeddings(stage_dir(run_dir, "embed") / split)
    if len(emb) == 0:
        raise SentcodeError(f"the {split} split of {run_dir} holds no sentences")
    return rvq.report(torch.from_numpy(np.array(emb, dtype=np.float32)))
