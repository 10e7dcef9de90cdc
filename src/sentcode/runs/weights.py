"""A trained model's weights and config in its run directory: export, read back, load for inference."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from sentcode.config import config_from_dict
from sentcode.errors import CheckpointError
from sentcode.io import atomic_path
from sentcode.runs import checkpoint as ckpt_io


WEIGHTS_FILE = "model.safetensors"  # a run's final weights


def newer_than_weights(path: Path, run_dir: Path) -> bool:
    """``path`` is a file written no earlier than the run's final weights (when it has them): figures it holds
    were computed from these weights, not from an earlier state of a resumed run."""
    weights = Path(run_dir) / WEIGHTS_FILE
    return path.is_file() and (not weights.is_file() or path.stat().st_mtime >= weights.stat().st_mtime)


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
        ckpt_io.forget_loaded()
    return model
