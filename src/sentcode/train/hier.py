"""Training a hierarchical byte autoencoder: level 1 is the end-to-end core on the run's segments
(``train.steplm``); a second level takes level 1's codes of every split as a symbol stream, cut into level-2
segments of ``data.upper_stride`` codes, and trains the same core on them in the shared loop
(``run_dir/upper``). The test split is then scored through both levels (``run_dir/eval.json``)."""

from __future__ import annotations

from pathlib import Path

from sentcode.data.segments import SegmentSplit
from sentcode.models.hier import UPPER_DIR, HierConfig, code_split, level1_codes
from sentcode.models.sentence.steplm import WEIGHTS, StepLM
from sentcode.train.steplm import SPLITS, build_steplm_task, load_steplm_config, train_steplm


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

    upper_dir = run_dir / UPPER_DIR
    ucfg = cfg.upper_config()
    resume_path = ckpt_io.resolve_resume(upper_dir, resume) if resume else None
    if resume_path is None or not (upper_dir / "data" / "test.npz").is_file():
        prepare_upper(run_dir, cfg, model)

    def build(info, dev):
        return build_steplm_task(ucfg, upper_dir / "data", info, dev, autoencoder=True)

    return train_and_export(upper_dir, ucfg, build, WEIGHTS, resume=resume_path, device=device, progress=progress,
                            stop_at=stop_at)


def train_hier(corpus: str, run_dir: str | Path, preset: str = "hier-tiny", overrides: list[str] | None = None,
               resume: str | None = None, device: str = "auto", progress: bool | str = True,
               stop_at: int | None = None, evaluate_test: bool = True) -> dict:
    """Train (or resume) a hierarchical byte autoencoder into ``run_dir``, level by level, and score its test
    split. Returns the loop's summary of level 1, with "upper" (the second level's) and "eval"."""
    from sentcode.eval.hier import evaluate_levels
    from sentcode.io import write_json
    from sentcode.runs.weights import load_weights

    run_dir = Path(run_dir)
    summary = train_steplm(corpus, run_dir, preset, overrides, resume=resume, device=device, progress=progress,
                           stop_at=stop_at, evaluate_test=False, cls=HierConfig)
    if summary["status"] != "completed":
        return summary
    cfg = load_steplm_config(preset, list(overrides or []) + [f"data.corpus={corpus}"], HierConfig)
    model = load_weights(StepLM(cfg.model), run_dir, WEIGHTS)  # what `sentcode.load` will read
    upper = None
    if cfg.data.upper_stride:
        up = train_upper(run_dir, cfg, model, resume, device, progress, stop_at)
        summary["upper"] = {"status": up["status"], "step": up["step"]}
        if up["status"] != "completed":
            summary["status"] = up["status"]
            return summary
        upper = load_weights(StepLM(cfg.upper_model()), run_dir / UPPER_DIR, WEIGHTS)
    if evaluate_test:
        test = SegmentSplit.load(run_dir / "data" / "test.npz")
        result = {"family": cfg.family, "source": f"test split of {corpus}",
                  **evaluate_levels(model, upper, test, "cpu")}
        write_json(run_dir / "eval.json", result)
        summary["eval"] = result
    return summary
