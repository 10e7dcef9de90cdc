"""What every run directory records about itself: resolved config, seed, versions, git commit."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import torch
import yaml

import sentcode
from sentcode.io import write_json, write_text


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_files(run_dir: Path, cfg, **extra) -> None:
    """config.yaml (the resolved config) and run.json (family, seed, versions, commit, plus ``extra``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_json(run_dir / "run.json", {
        "family": cfg.family,
        **extra,
        "seed": cfg.train.seed,
        "sentcode": sentcode.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
