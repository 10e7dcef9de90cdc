"""Training-side run plumbing shared by every family: rank check, train then export, resume checks."""

from __future__ import annotations

from pathlib import Path

from sentcode.errors import SentcodeError
from sentcode.runs import checkpoint as ckpt_io
from sentcode.runs.weights import export_weights


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


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
