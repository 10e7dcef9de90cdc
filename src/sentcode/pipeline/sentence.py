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

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

import sentcode
from sentcode.config import _read_yaml, parse_override
from sentcode.errors import ConfigError, DataError, SentcodeError
from sentcode.io import atomic_path, write_json, write_text

FAMILY = "sentence"
# Pipeline order; "renderer-nar" runs only when enabled in the config (and its module exists).
STAGES = ("corpus", "sentences", "encoder", "embed", "rvq", "planner", "renderer", "renderer-nocode",
          "renderer-nar", "eval")
DEPS = {
    "corpus": (),
    "sentences": ("corpus",),
    "encoder": ("sentences",),
    "embed": ("sentences", "encoder"),
    "rvq": ("embed",),
    "planner": ("sentences", "rvq"),
    "renderer": ("sentences", "rvq", "planner"),
    "renderer-nocode": ("sentences",),
    "renderer-nar": ("sentences", "rvq", "planner"),
    "eval": ("sentences", "encoder", "embed", "rvq", "planner", "renderer", "renderer-nocode"),
}
SPLITS = ("train", "val", "test")
SECTIONS = ("family", "seed", "corpus", "sentences", "encoder", "embed", "rvq", "planner", "renderer",
            "renderer_nar", "eval", "budgets")
STAGE_FILE = "stage.json"


# ---- configuration -----------------------------------------------------------------------------------------


def _apply_overrides(data: dict, overrides: list[str]) -> None:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value


def _section(cfg: dict, *keys: str) -> dict:
    node = cfg
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            return {}
    if not isinstance(node, dict):
        raise ConfigError(f"pipeline config section {'.'.join(keys)} must be a mapping")
    return node


def _flat(prefix: str, section: dict) -> list[str]:
    # JSON is valid YAML, so parse_override reads each value back exactly (strings stay strings, None is null).
    return [f"{prefix}.{k}={json.dumps(v)}" for k, v in section.items()]


def _budget(cfg: dict, name: str) -> list[str]:
    b = _section(cfg, "budgets", name)
    unknown = sorted(set(b) - {"max_steps", "time_budget_s"})
    if unknown:
        raise ConfigError(f"unknown key budgets.{name}.{unknown[0]} (known: max_steps, time_budget_s)")
    return _flat("train", b)


def _levels(cfg: dict) -> tuple[int, list[int]]:
    r = _section(cfg, "rvq")
    K = r.get("levels", 4)
    V = r.get("codebook_sizes", [256] * (K if isinstance(K, int) else 0))
    if isinstance(V, int):
        V = [V] * K
    if (not isinstance(K, int) or K < 1 or not isinstance(V, list) or len(V) != K
            or any(not isinstance(v, int) or isinstance(v, bool) or v < 2 for v in V)):
        raise ConfigError(f"rvq.levels must be a positive integer and rvq.codebook_sizes {K!r} integers >= 2, got {V!r}")
    return K, V


def encoder_overrides(cfg: dict) -> list[str]:
    m = _section(cfg, "encoder", "model")
    max_bytes = m.get("max_bytes", 256)
    return (_flat("encoder", m) + _flat("train", _section(cfg, "encoder", "train"))
            + [f"train.seq_len={max_bytes}", f"train.seed={cfg['seed']}"] + _budget(cfg, "encoder"))


def _no_residual(section: dict, where: str) -> None:
    if section.get("use_residual"):
        raise ConfigError(f"{where}.use_residual is not supported by the sentence pipeline: the two-part code "
                          "length does not charge continuous residuals")


def planner_overrides(cfg: dict) -> list[str]:
    K, V = _levels(cfg)
    m = dict(_section(cfg, "planner", "model"))
    _no_residual(m, "planner.model")
    for k in ("levels", "codebook_sizes", "d_emb"):
        if k in m:
            raise ConfigError(f"planner.model.{k} is derived from the rvq and encoder sections; set it there")
    d_emb = _section(cfg, "encoder", "model").get("d_emb", 128)
    return (_flat("planner", m) + [f"planner.levels={K}", f"planner.codebook_sizes={json.dumps(V)}",
                                    f"planner.d_emb={d_emb}", "planner.use_residual=false"]
            + _flat("train", _section(cfg, "planner", "train")) + [f"train.seed={cfg['seed']}"]
            + _budget(cfg, "planner"))


def renderer_overrides(cfg: dict, use_codes: bool = True) -> list[str]:
    K, V = _levels(cfg)
    m = dict(_section(cfg, "renderer", "model"))
    _no_residual(m, "renderer.model")
    for k in ("levels", "codebook_sizes", "d_emb", "use_codes"):
        if k in m:
            raise ConfigError(f"renderer.model.{k} is set by the pipeline; it cannot be overridden here")
    d_emb = _section(cfg, "encoder", "model").get("d_emb", 128)
    max_sb = m.get("max_sentence_bytes", 256)
    out = (_flat("renderer", m) + [f"renderer.levels={K}", f"renderer.codebook_sizes={json.dumps(V)}",
                                    f"renderer.d_emb={d_emb}", "renderer.use_residual=false"]
           + _flat("train", _section(cfg, "renderer", "train"))
           + [f"train.seq_len={max_sb}", f"train.seed={cfg['seed']}"])
    if use_codes:
        return out + _budget(cfg, "renderer")
    # The ablation reads no codes, so code corruption means nothing to it.
    return out + ["renderer.use_codes=false", "renderer.code_noise=0.0", "renderer.predicted_mix=0.0",
                  "renderer.code_init=random"] \
        + _budget(cfg, "renderer_nocode")


def nar_enabled(cfg: dict) -> bool:
    return bool(_section(cfg, "renderer_nar").get("enabled", False))


def validate_pipeline_config(cfg: dict) -> dict:
    """Check every section by building each stage's own config (errors name the offending key)."""
    from sentcode.models.sentence.config import load_encoder_config
    from sentcode.models.sentence.planner import load_planner_config
    from sentcode.models.sentence.renderer import load_renderer_config

    if cfg.get("family") != FAMILY:
        raise ConfigError(f"a sentence pipeline config needs family: {FAMILY}, got {cfg.get('family')!r}")
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown pipeline config section {unknown[0]!r} (known: {', '.join(SECTIONS[1:])})")
    if not isinstance(cfg.get("seed", 0), int):
        raise ConfigError(f"seed must be an integer, got {cfg.get('seed')!r}")
    cfg.setdefault("seed", 1337)
    c = _section(cfg, "corpus")
    for k in ("val_frac", "test_frac"):
        if not isinstance(c.get(k, 0.05), (int, float)) or not 0 < c.get(k, 0.05) < 0.5:
            raise ConfigError(f"corpus.{k} must be a number in (0, 0.5), got {c.get(k)!r}")
    max_bytes = _section(cfg, "sentences").get("max_bytes", 256)
    if not isinstance(max_bytes, int) or max_bytes < 4:
        raise ConfigError(f"sentences.max_bytes must be an integer >= 4, got {max_bytes!r}")
    load_encoder_config(None, encoder_overrides(cfg))
    K, V = _levels(cfg)
    r = _section(cfg, "rvq")
    unknown = sorted(set(r) - {"levels", "codebook_sizes", "iters", "normalize", "fit_rows"})
    if unknown:
        raise ConfigError(f"unknown key rvq.{unknown[0]} (known: levels, codebook_sizes, iters, normalize, fit_rows)")
    if r.get("normalize", "standard") not in (None, "standard"):
        raise ConfigError(f"rvq.normalize must be standard or null, got {r.get('normalize')!r}")
    load_planner_config(None, planner_overrides(cfg))
    rcfg = load_renderer_config(None, renderer_overrides(cfg))
    load_renderer_config(None, renderer_overrides(cfg, use_codes=False))
    if rcfg.renderer.max_sentence_bytes < max_bytes:
        raise ConfigError(f"renderer.model.max_sentence_bytes={rcfg.renderer.max_sentence_bytes} is below "
                          f"sentences.max_bytes={max_bytes}: the renderer could not score every sentence")
    if nar_enabled(cfg):
        if nar_module() is None:
            raise ConfigError("renderer_nar.enabled needs sentcode.train.renderer_nar, which this version lacks")
        from sentcode.models.sentence.config import load_encoder_config as _enc
        from sentcode.models.sentence.renderer_nar import load_nar_config

        load_nar_config(None, nar_overrides(cfg))
        _enc(None, reward_encoder_overrides(cfg))
    e = _section(cfg, "eval")
    for k in ("agreement_contexts", "rerank"):
        if not isinstance(e.get(k, 0), int) or e.get(k, 0) < 0:
            raise ConfigError(f"eval.{k} must be an integer >= 0, got {e.get(k)!r}")
    return cfg


def load_pipeline_config(preset: str = "staged-tiny", overrides: list[str] | None = None) -> dict:
    """The resolved, validated pipeline config (a plain dict) of a preset name or YAML file plus overrides."""
    data = _read_yaml(preset)
    _apply_overrides(data, list(overrides or []))
    return validate_pipeline_config(data)


def read_run_config(run_dir: str | Path) -> dict:
    """The pipeline config stored in a pipeline run directory."""
    run_dir = Path(run_dir)
    p = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise SentcodeError(f"no run directory at {run_dir}")
    if not p.is_file():
        raise SentcodeError(f"{run_dir} is not a sentence pipeline run (no config.yaml); "
                            "create one with `sentcode pipeline sentence --out RUN_DIR`")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError:
        raise SentcodeError(f"{p} is not valid YAML") from None
    if not isinstance(data, dict) or data.get("family") != FAMILY:
        raise SentcodeError(f"{run_dir} is not a sentence pipeline run (family {data.get('family')!r})")
    return validate_pipeline_config(data)


def stage_config(cfg: dict, stage: str) -> dict:
    """What a stage depends on in the config: its input hash covers exactly this."""
    if stage == "corpus":
        return {"spec": cfg["corpus"].get("spec"), **{k: v for k, v in cfg["corpus"].items() if k != "spec"}}
    if stage == "sentences":
        return {"max_bytes": _section(cfg, "sentences").get("max_bytes", 256)}
    if stage == "encoder":
        return {"overrides": encoder_overrides(cfg)}
    if stage == "embed":
        return dict(_section(cfg, "embed"))
    if stage == "rvq":
        return dict(_section(cfg, "rvq"), seed=cfg["seed"])
    if stage == "planner":
        return {"overrides": planner_overrides(cfg)}
    if stage == "renderer":
        return {"overrides": renderer_overrides(cfg)}
    if stage == "renderer-nocode":
        return {"overrides": renderer_overrides(cfg, use_codes=False)}
    if stage == "renderer-nar":
        return {"overrides": nar_overrides(cfg), "reward_encoder": reward_encoder_overrides(cfg)}
    if stage == "eval":
        return dict(_section(cfg, "eval"), seed=cfg["seed"])
    raise KeyError(stage)


# ---- stage records and hashes -------------------------------------------------------------------------------


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# Files whose bytes define each stage's result (logs, timings and checkpoints are left out).
OUTPUT_GLOBS = {
    "corpus": ["*.jsonl"],
    "sentences": ["*.jsonl"],
    "encoder": ["encoder.safetensors"],
    "embed": ["*.npy"],
    "rvq": ["rvq.safetensors", "rvq.json", "*_codes.npy"],
    "planner": ["planner.safetensors", "predicted_*.npy"],
    "renderer": ["renderer.safetensors"],
    "renderer-nocode": ["renderer.safetensors"],
    "renderer-nar": ["*.safetensors"],
    "eval": ["eval.json"],
}


def _output_files(stage_dir: Path, stage: str) -> list[Path]:
    return sorted({p for g in OUTPUT_GLOBS[stage] for p in stage_dir.glob(g) if p.is_file()})


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage


def read_stage(run_dir: Path, stage: str) -> dict | None:
    p = stage_dir(run_dir, stage) / STAGE_FILE
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and rec.get("stage") == stage else None


def require_stage(run_dir: str | Path, stage: str) -> dict:
    """The stage's record, or a one-line error naming the missing stage and how to make it."""
    rec = read_stage(Path(run_dir), stage)
    if rec is None:
        raise SentcodeError(f"{run_dir}: stage {stage!r} has not been run (no {stage}/{STAGE_FILE}); run "
                            f"`sentcode pipeline sentence --out {run_dir}` (or `--from {stage}`) first")
    return rec


def _versions() -> dict:
    from sentcode.train.runinfo import git_commit

    return {"sentcode": sentcode.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "git_commit": git_commit()}


def stage_deps(cfg: dict, stage: str) -> tuple[str, ...]:
    """The stages whose outputs ``stage`` reads: eval also reads the NAR renderer when it is enabled."""
    if stage == "eval" and nar_enabled(cfg):
        return DEPS[stage] + ("renderer-nar",)
    return DEPS[stage]


def input_hash(run_dir: Path, cfg: dict, stage: str) -> str:
    upstream = {}
    for dep in stage_deps(cfg, stage):
        rec = require_stage(run_dir, dep)
        upstream[dep] = [rec.get("input_hash"), rec.get("output_hash")]
    return _sha256_json({"stage": stage, "config": stage_config(cfg, stage), "upstream": upstream})


# ---- data passed between stages -----------------------------------------------------------------------------


def _write_jsonl(path: Path, rows) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"missing {path}; rerun its stage")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def read_sentences(run_dir: str | Path, split: str) -> list[list[str]]:
    """Each document's sentences, in document order."""
    return [r["sentences"] for r in _read_jsonl(stage_dir(Path(run_dir), "sentences") / f"{split}.jsonl")]


def flatten(docs: list[list[str]]) -> list[str]:
    return [s for d in docs for s in d]


def per_doc(flat: np.ndarray, docs: list[list]) -> list[np.ndarray]:
    """Cut a per-sentence array back into documents."""
    ends = np.cumsum([len(d) for d in docs])
    if len(flat) != (int(ends[-1]) if len(ends) else 0):
        raise DataError(f"{len(flat)} rows for {int(ends[-1]) if len(ends) else 0} sentences: the stages disagree; "
                        "rerun with --from embed")
    return np.split(flat, ends[:-1])


def read_codes(run_dir: str | Path, split: str) -> np.ndarray:
    p = stage_dir(Path(run_dir), "rvq") / f"{split}_codes.npy"
    if not p.is_file():
        raise DataError(f"missing {p}; rerun the rvq stage (`sentcode rvq fit {run_dir}`)")
    return np.load(p)


def read_predicted(run_dir: str | Path, split: str) -> np.ndarray:
    p = stage_dir(Path(run_dir), "planner") / f"predicted_{split}.npy"
    if not p.is_file():
        raise DataError(f"missing {p}; rerun the planner stage (`sentcode train planner {run_dir}`)")
    return np.load(p)


def build_rvq(meta: dict):
    from sentcode.nn.rvq import ResidualVQ

    return ResidualVQ(int(meta["dim"]), int(meta["levels"]), list(meta["codebook_sizes"]),
                      normalize=meta.get("normalize"))


def load_rvq(run_dir: str | Path, cfg: dict | None = None):
    """The fitted quantizer of a pipeline run; its levels and codebook sizes must match ``cfg`` when given."""
    from safetensors.torch import load_file

    d = stage_dir(Path(run_dir), "rvq")
    meta_p, st = d / "rvq.json", d / "rvq.safetensors"
    if not meta_p.is_file() or not st.is_file():
        raise SentcodeError(f"{run_dir}: stage 'rvq' has no fitted quantizer (rvq.json/rvq.safetensors); run "
                            f"`sentcode rvq fit {run_dir}`")
    meta = json.loads(meta_p.read_text())
    if cfg is not None:
        K, V = _levels(cfg)
        if meta["levels"] != K or list(meta["codebook_sizes"]) != V:
            raise SentcodeError(
                f"{run_dir}: the rvq stage has K={meta['levels']} levels of sizes {meta['codebook_sizes']} but the "
                f"config asks for K={K} of sizes {V}; rerun from the rvq stage (--from rvq)")
    rvq = build_rvq(meta)
    try:
        state = load_file(str(st))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise SentcodeError(f"cannot read {st}: {type(e).__name__}") from None
    try:
        rvq.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise SentcodeError(f"{st} does not match {meta_p}: {str(e).splitlines()[0]}") from None
    return rvq.eval()


@torch.no_grad()
def encode_codes(rvq, emb: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Codes [N, K] (int64) and residuals e - decode(codes) [N, d] (float32) of embeddings [N, d]."""
    from sentcode.models.sentence.planner import split_embeddings

    codes, res = [], []
    for s in range(0, len(emb), chunk):
        c, r = split_embeddings(rvq, torch.from_numpy(np.array(emb[s : s + chunk], dtype=np.float32)))
        codes.append(c.numpy())
        res.append(r.numpy())
    K, d = rvq.levels, rvq.dim
    return (np.concatenate(codes) if codes else np.zeros((0, K), np.int64),
            np.concatenate(res).astype(np.float32) if res else np.zeros((0, d), np.float32))


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
    from sentcode.train.encoder import load_encoder

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
    from sentcode.train.planner import load_planner, train_planner

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


def nar_module():
    """``sentcode.train.renderer_nar`` if it is importable and has ``train_nar_renderer``, else None."""
    try:
        from sentcode.train import renderer_nar
    except ImportError:
        return None
    return renderer_nar if hasattr(renderer_nar, "train_nar_renderer") else None


def nar_overrides(cfg: dict) -> list[str]:
    K, V = _levels(cfg)
    m = dict(_section(cfg, "renderer_nar", "model"))
    _no_residual(m, "renderer_nar.model")
    for k in ("levels", "codebook_sizes", "d_emb"):
        if k in m:
            raise ConfigError(f"renderer_nar.model.{k} is set by the pipeline; it cannot be overridden here")
    d_emb = _section(cfg, "encoder", "model").get("d_emb", 128)
    return (_flat("renderer", m) + [f"renderer.levels={K}", f"renderer.codebook_sizes={json.dumps(V)}",
                                     f"renderer.d_emb={d_emb}", "renderer.use_residual=false"]
            + _flat("train", _section(cfg, "renderer_nar", "train"))
            + [f"train.seq_len={m.get('max_bytes', 128)}", f"train.seed={cfg['seed']}"] + _budget(cfg, "renderer_nar"))


def reward_encoder_overrides(cfg: dict) -> list[str]:
    # The NAR renderer's reward should measure surface similarity ("same" objective), and it must not be the
    # encoder the codes came from: that one is the judge of its evaluations.
    steps = _section(cfg, "renderer_nar").get("reward_encoder_steps", 200)
    return [o for o in encoder_overrides(cfg) if not o.startswith(("train.max_steps=", "train.time_budget_s="))] + [
        'encoder.objective="same"', f"train.max_steps={steps}", f"train.seed={cfg['seed'] + 1}"]


def stage_renderer_nar(ctx: _Ctx) -> dict:
    """The optional NAR renderer: a reward encoder ("same" objective) is trained first, in
    ``renderer-nar/reward-encoder``; the pipeline's encoder is the judge of the NAR run's evaluations. The
    NAR renderer is trained and stored, but not yet part of the evaluation or of generation."""
    from sentcode.train.encoder import load_encoder, train_encoder

    mod = nar_module()
    if mod is None:
        raise SentcodeError("stage 'renderer-nar' needs sentcode.train.renderer_nar.train_nar_renderer, which is "
                            "not available in this version; set renderer_nar.enabled=false")
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

    result = evaluate_sentence_run(ctx.run_dir, split="test", cfg=ctx.cfg, progress=bool(ctx.progress))
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
    _apply_overrides(data, list(overrides or []))
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
