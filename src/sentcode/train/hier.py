"""The second level of a hierarchical byte autoencoder: level 1's codes of every split as a symbol stream,
cut into level-2 segments of ``data.upper_stride`` codes, and the same core trained on them in the shared
loop (``run_dir/upper``)."""

from __future__ import annotations

from pathlib import Path

from sentcode.data.segments import SegmentSplit
from sentcode.models.hier import UPPER_DIR, HierConfig, code_split, level1_codes
from sentcode.models.sentence.steplm import WEIGHTS, StepLM

SPLITS = ("train", "val", "test")


def prepare_upper(run_dir: Path, cfg: HierConfig, model: StepLM) -> None:
    """``run_dir/upper/data/{split}.npz``: every split's level-1 codes, cut into level-2 segments."""
    data = run_dir / UPPER_DIR / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        split = SegmentSplit.load(run_dir / "data" / f"{name}.npz")
        code_split(split, level1_codes(model, split, "cpu"), cfg.data.upper_stride).save(data / f"{name}.npz")


def train_upper(run_dir: Path, cfg: HierConfig, model: StepLM, resume: str | None, device, progress,
                stop_at: int | None = None) -> dict:
    """Train the second level on level 1's codes (``model``: the trained level 1)."""
    from sentcode.runs import checkpoint as ckpt_io
    from sentcode.train.runs import train_and_export
    from sentcode.train.steplm import build_steplm_task

    upper_dir = run_dir / UPPER_DIR
    ucfg = cfg.upper_config()
    resume_path = ckpt_io.resolve_resume(upper_dir, resume) if resume else None
    if resume_path is None or not (upper_dir / "data" / "test.npz").is_file():
        prepare_upper(run_dir, cfg, model)

    def build(info, dev):
        return build_steplm_task(ucfg, upper_dir / "data", info, dev, autoencoder=True)

    return train_and_export(upper_dir, ucfg, build, WEIGHTS, resume=resume_path, device=device, progress=progress,
                            stop_at=stop_at)
