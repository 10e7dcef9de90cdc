"""Atomic, self-describing checkpoints that load whether or not the model was compiled or wrapped in DDP."""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sentcode.errors import CheckpointError, SentcodeError
from sentcode.io import atomic_path, write_json

FORMAT = "sentcode-checkpoint"
VERSION = 1
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the key prefixes that torch.compile and DDP add, so any checkpoint loads into a bare model."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),  # stored as text: loads with weights_only
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(json.loads(state["numpy"]), dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(json.loads(state["python"])), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


# The last checkpoint read, keyed by (path, mtime, size): resuming reads the same file when ``--resume auto``
# picks it, when the run's config is checked against it and when the loop restores it; it is read once.
_last: dict[tuple, dict[str, Any]] = {}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key in _last:
        return _last[key]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: file is corrupt or not a checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sentcode checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}, this sentcode reads {VERSION}")
    _last.clear()
    _last[key] = ckpt
    return ckpt


def forget_loaded() -> None:
    """Drop the kept checkpoint (once it has been restored, so its tensors are not held for the whole run)."""
    _last.clear()


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, with one clear error when the checkpoint is of another model shape."""
    state = clean_state_dict(state)
    own = unwrap(model).state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(f"{source} belongs to another model ({what}; {len(missing)} missing, {len(extra)} unexpected keys)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{source} belongs to another model: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    unwrap(model).load_state_dict(state)


def model_sections(config: dict) -> dict:
    """Every config section that defines the model (all but ``train``, which a resumed run may change)."""
    return {k: v for k, v in (config or {}).items() if k != "train"}


_STEP_RE = re.compile(r"step-(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_files(d: Path) -> list[Path]:
    """The step checkpoints in ``d``, oldest first."""
    found = sorted((int(m.group(1)), p) for p in d.glob("step-*.pt") if (m := _STEP_RE.search(p.name)))
    return [p for _, p in found]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    d = checkpoint_dir(run_dir)
    pointer = d / "latest.json"
    if pointer.is_file():
        try:
            p = d / json.loads(pointer.read_text())["file"]
            if p.is_file():
                return p
        except (ValueError, KeyError):
            pass
    found = _step_files(d)
    return found[-1] if found else None


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """``--resume``: None, a checkpoint path, or "auto": the newest checkpoint of the run that loads. A newer
    one that does not load (cut short by a crash, damaged) is named in a warning with its reason and kept on
    disk; none is ever deleted here."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    d = checkpoint_dir(run_dir)
    newest = latest_checkpoint(run_dir)
    order = ([newest] if newest is not None else []) + [p for p in reversed(_step_files(d)) if p != newest]
    if not order:
        raise SentcodeError(f"--resume auto: no checkpoint to resume in {run_dir}")
    skipped = []
    for p in order:
        try:
            load_checkpoint(p)
        except CheckpointError as e:
            skipped.append(f"{p.name} ({e})")
            continue
        if skipped:
            warnings.warn(f"--resume auto: resuming from {p.name}; skipped newer checkpoint(s) that do not load, "
                          f"left on disk: {'; '.join(skipped)}")
        return p
    raise SentcodeError(f"--resume auto: no checkpoint in {d} loads: {'; '.join(skipped)}")


def save_step(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    d = checkpoint_dir(run_dir)
    path = d / f"step-{step:07d}.pt"
    save_checkpoint(path, payload)
    write_json(d / "latest.json", {"file": path.name, "step": step})
    for old in _step_files(d)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path
