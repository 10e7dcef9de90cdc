"""Run-directory plumbing shared by every family: rank check, weight export, loading a trained model."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from sentcode.config import config_from_dict
from sentcode.errors import CheckpointError, SentcodeError
from sentcode.io import atomic_path
from sentcode.train import checkpoint as ckpt_io


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def export_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Final weights as safetensors (shared tensors stored once), written atomically."""
    from safetensors.torch import save_model

    with atomic_path(Path(path)) as tmp:
        save_model(ckpt_io.unwrap(model), str(tmp))


def read_run_config(run_dir: str | Path, family: str, cls):
    """The validated config of a run directory, checking that it holds a run of ``family``."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a training run (no config.yaml)")
    try:
        data = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError:
        raise CheckpointError(f"{cfg_path} is not valid YAML") from None
    found = data.get("family") if isinstance(data, dict) else None
    if found != family:
        raise CheckpointError(f"{run_dir} is a {found!r} run, not a {family} run")
    return config_from_dict(data, cls=cls)


def load_weights(model: torch.nn.Module, run_dir: str | Path, weights_name: str) -> torch.nn.Module:
    """Fill ``model`` from the run's exported weights, or else its latest checkpoint (an interrupted run)."""
    run_dir = Path(run_dir)
    weights = run_dir / weights_name
    if weights.is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"cannot read {weights}: {type(e).__name__}") from None
        ckpt_io.load_model_state(model, state, str(weights))
    else:
        latest = ckpt_io.latest_checkpoint(run_dir)
        if latest is None:
            raise CheckpointError(f"{run_dir} has neither {weights_name} nor a checkpoint to load")
        ckpt_io.load_model_state(model, ckpt_io.load_checkpoint(latest)["model"], str(latest))
    return model


def train_and_export(run_dir: str | Path, cfg, build_task, weights_name: str, resume: Path | None = None,
                     device: str = "auto", progress: bool | str = True, stop_at: int | None = None) -> dict:
    """Run the shared training loop for ``cfg`` and, once it completes, export the weights and the summary."""
    from sentcode.io import write_json
    from sentcode.train.loop import run_training

    run_dir = Path(run_dir)
    summary = run_training(run_dir, cfg.train, build_task, cfg.to_dict(), resume=resume, device=device,
                           progress=progress, stop_at=stop_at)
    model = summary.pop("model")
    if summary["status"] == "completed" and is_rank0():
        export_weights(model, run_dir / weights_name)
        write_json(run_dir / "train_summary.json", summary)
    return summary


def check_resume(run_dir: str | Path, resume: str | None, config: dict,
                 recorded: dict[str, tuple[object, str]] | None = None) -> Path | None:
    """Resolve ``--resume`` and refuse, before anything is written, a run that cannot continue.

    A fresh run may not overwrite one that has checkpoints; a resumed one must have the same model config as
    its checkpoint and the same values for each ``recorded`` run.json key (``{"train_corpus.sha256": (value,
    "other documents")}``; the label names what differs).
    """
    import json

    run_dir = Path(run_dir)
    resume_path = ckpt_io.resolve_resume(run_dir, resume)
    if resume_path is None:
        if ckpt_io.latest_checkpoint(run_dir) is not None:
            raise SentcodeError(f"{run_dir} already holds a training run; pass --resume auto to continue it or choose another --out")
        return None
    saved = ckpt_io.load_checkpoint(resume_path).get("config", {})
    if ckpt_io.model_sections(saved) != ckpt_io.model_sections(config):
        raise SentcodeError(f"{resume_path} was saved by another model configuration; cannot resume it with this one")
    run_json = run_dir / "run.json"
    info = json.loads(run_json.read_text()) if run_json.exists() else {}
    for key, (value, label) in (recorded or {}).items():
        old = info
        for part in key.split("."):
            old = old.get(part) if isinstance(old, dict) else None
        if old is not None and old != value:
            raise SentcodeError(f"{run_dir} was trained with {label}; resume it with the same")
    return resume_path
