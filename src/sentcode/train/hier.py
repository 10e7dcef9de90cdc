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
    from sentcode.data.segments import RowSource
    from sentcode.eval.hier import evaluate_hier
    from sentcode.runs import checkpoint as ckpt_io
    from sentcode.train.loop import TrainTask
    from sentcode.train.runs import train_and_export
    from sentcode.train.steplm import steplm_loss

    upper_dir = run_dir / UPPER_DIR
    ucfg = cfg.upper_config()
    resume_path = ckpt_io.resolve_resume(upper_dir, resume) if resume else None
    if resume_path is None or not (upper_dir / "data" / "test.npz").is_file():
        prepare_upper(run_dir, cfg, model)

    def build(info, dev):
        m = StepLM(ucfg.model)
        t = ucfg.train
        rows = RowSource(SegmentSplit.load(upper_dir / "data" / "train.npz"), t.seq_len, t.micro_batch,
                         ucfg.model.max_segments, t.seed, dev, rank=info.rank, symbols=ucfg.model.symbols)
        val = SegmentSplit.load(upper_dir / "data" / "val.npz")
        return TrainTask(model=m, batches=rows, loss=steplm_loss, tokens_per_batch=t.micro_batch * t.seq_len,
                         evaluate=lambda mm, n: evaluate_hier(mm, val, dev, max_bytes=n, quick=True),
                         flops_per_token=m.flops_per_token())

    return train_and_export(upper_dir, ucfg, build, WEIGHTS, resume=resume_path, device=device, progress=progress,
                            stop_at=stop_at)
