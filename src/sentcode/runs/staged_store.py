"""The staged sentence-step recipe's artefact store: one sub-directory per stage, its ``stage.json`` commit
marker and input hash, and the readers of what each stage wrote (sentences, codes, predictions, the fitted
quantizer, the trained parts). Inference and evaluation read a staged run through this module only.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import torch

import sentcode
from sentcode.errors import DataError, SentcodeError
from sentcode.io import atomic_path, write_text
from sentcode.runs.staged_config import DEPS, STAGE_FILE, _levels, nar_enabled, stage_config

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
    from sentcode.runs.info import git_commit

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
