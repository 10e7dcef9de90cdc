"""Training the end-to-end sentence-step LM: segment data, the training task for the shared loop, the run
directory, and the pipeline command that trains and evaluates it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sentcode.config import load_config
from sentcode.data.segments import RowSource, SegmentSplit
from sentcode.io import write_json
from sentcode.models.sentence.steplm import FAMILY, WEIGHTS, StepLM, StepLMConfig
from sentcode.runs import checkpoint as ckpt_io
from sentcode.train.loop import TrainTask
from sentcode.runs.info import write_run_files
from sentcode.train.runs import check_resume, train_and_export

SPLITS = ("train", "val", "test")


def load_steplm_config(preset: str = "sentence-tiny", overrides: list[str] | None = None,
                       cls=StepLMConfig) -> StepLMConfig:
    """A validated end-to-end config from a preset (or YAML file) and overrides; another family is refused."""
    return load_config(preset, overrides, cls=cls)


def prepare_segments(corpus: str, data_dir: Path, cfg: StepLMConfig) -> dict:
    """Split the corpus and cut it into segments, once: ``data_dir/{split}.npz`` plus ``meta.json``, and the
    segmenter (fitted on the training split) in ``data_dir/..`` (the run directory). A second call with the same
    corpus, fractions and segmenter reuses them."""
    from sentcode.corpus.segments import segment_arrays
    from sentcode.corpus.splits import load_corpus

    d = cfg.data
    key = {"corpus": corpus, "val_frac": d.val_frac, "test_frac": d.test_frac,
           "max_segment_bytes": cfg.model.max_segment_bytes, "version": 1}
    if d.segmenter != "sentence":  # runs of the sentence segmenter keep the key they were trained with
        key.update(segmenter=d.segmenter, segment_bytes=d.segment_bytes, entropy_mode=d.entropy_mode)
    meta_path = data_dir / "meta.json"
    run_dir = data_dir.parent
    if meta_path.is_file() and all((data_dir / f"{s}.npz").is_file() for s in SPLITS):
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and (d.segmenter == "sentence" or (run_dir / "segmenter.json").is_file()):
            return meta
    splits = load_corpus(corpus, val_frac=d.val_frac, test_frac=d.test_frac)
    segmenter = cfg.segmenter().fit([doc.text for doc in splits["train"]])
    meta = {"key": key, "splits": {}, "segmenter": segmenter.to_dict()}
    for name in SPLITS:
        arrays = segment_arrays([doc.text for doc in splits[name]], cfg.model.max_segment_bytes, segmenter.cut)
        split = SegmentSplit(**arrays)
        split.save(data_dir / f"{name}.npz")
        meta["splits"][name] = {"documents": split.n_docs, "segments": split.n_segments, "bytes": int(split.bytes.size),
                                "sha256": hashlib.sha256(split.bytes.tobytes()).hexdigest()}
    segmenter.save(run_dir)
    write_json(meta_path, meta)
    return meta


CALIBRATION_BATCHES = 8  # training micro-batches read to set batch-standardised codes' inference statistics


def steplm_loss(model, batch, parts: dict | None = None) -> torch.Tensor:
    """The two-part code length per predicted symbol (nats), plus the quantizer's commitment term; ``parts``
    receives each term of this micro-batch apart (nats per symbol), for the training log."""
    x, y, seg, n_seg = batch
    raw = ckpt_io.unwrap(model)
    drop = cut = None
    if raw.cfg.levels and raw.cfg.code_dropout > 0:
        drop = torch.rand(x.shape[0], n_seg, device=x.device) < raw.cfg.code_dropout
    if raw.cfg.context_dropout > 0:
        cut = torch.rand(x.shape[0], n_seg, device=x.device) < raw.cfg.context_dropout
    out = model(x, y, seg, n_seg, drop=drop, cut=cut)
    symbols = out["symbols"].clamp(min=1)
    if parts is not None:
        parts.update(loss_render=out["render_nats"].detach() / symbols, loss_plan=out["plan_nats"].detach() / symbols,
                     loss_commit=out["commit"].detach(), loss_predict=out["predict"].detach())
    return ((out["render_nats"] + out["plan_nats"]) / symbols + out["commit"]
            + raw.cfg.predict_weight * out["predict"])


def build_steplm_task(cfg: StepLMConfig, data_dir: Path, dist_info, device, autoencoder: bool = False) -> TrainTask:
    """The core's training task on the segment data in ``data_dir`` (``autoencoder``: validation reports the
    autoencoder's figures too)."""
    from sentcode.eval.steplm import evaluate_segments

    model = StepLM(cfg.model)
    t = cfg.train
    rows = RowSource(SegmentSplit.load(data_dir / "train.npz"), t.seq_len, t.micro_batch, cfg.model.max_segments,
                     t.seed, device, rank=dist_info.rank, symbols=cfg.model.symbols)
    val = SegmentSplit.load(data_dir / "val.npz")

    calibrate = None
    if cfg.model.levels and cfg.model.vq_norm == "batch":
        def calibrate(m):  # the quantizer's inference statistics from the current weights (StepLM.calibrate_codes)
            cal = RowSource(rows.split, t.seq_len, t.micro_batch, cfg.model.max_segments, t.seed + 1, device,
                            rank=dist_info.rank, symbols=cfg.model.symbols)
            m.calibrate_codes(cal.next_batch() for _ in range(CALIBRATION_BATCHES))

    def evaluate(m, max_tokens):
        if calibrate is not None:  # batch-standardised codes are scored with statistics of the weights scored
            calibrate(m)
        if not autoencoder:
            return evaluate_segments(m, val, device, max_bytes=max_tokens)
        from sentcode.eval.hier import evaluate_hier

        return evaluate_hier(m, val, device, max_bytes=max_tokens, quick=True)

    parts: dict = {}

    def metrics(m) -> dict:  # the loss's terms apart (last micro-batch) and the codebooks' health
        return {**{k: float(v) for k, v in parts.items()}, **(m.quant.ema_report() if m.cfg.levels else {})}

    return TrainTask(model=model, batches=rows, loss=lambda m, b: steplm_loss(m, b, parts), evaluate=evaluate,
                     tokens_per_batch=t.micro_batch * t.seq_len, flops_per_token=model.flops_per_token(),
                     extra_metrics=metrics, finish=calibrate)


def train_steplm(corpus: str, run_dir: str | Path, preset: str = "sentence-tiny", overrides: list[str] | None = None,
                 resume: str | None = None, device: str = "auto", progress: bool | str = True,
                 stop_at: int | None = None, evaluate_test: bool = True, cls=StepLMConfig) -> dict:
    """Train (or resume) an end-to-end sentence-step LM (or another family of the same core: ``cls``) into
    ``run_dir`` and evaluate it on the test split (``run_dir/eval.json``). Returns the loop's summary plus
    ``eval``."""
    run_dir = Path(run_dir)
    cfg = load_steplm_config(preset, list(overrides or []) + [f"data.corpus={corpus}"], cls)
    resume_path = check_resume(run_dir, resume, cfg.to_dict())
    meta = prepare_segments(corpus, run_dir / "data", cfg)
    write_run_files(run_dir, cfg, corpus=corpus, segments=meta["splits"])
    summary = train_and_export(run_dir, cfg, lambda info, dev: build_steplm_task(cfg, run_dir / "data", info, dev,
                                                                       autoencoder=cfg.family != FAMILY),
                               WEIGHTS, resume=resume_path, device=device, progress=progress,
                               stop_at=stop_at)
    if summary["status"] == "completed" and evaluate_test:
        from sentcode.eval.steplm import evaluate_segments
        from sentcode.runs.weights import load_weights

        model = load_weights(StepLM(cfg.model), run_dir, WEIGHTS)  # what `sentcode.load` will read
        test = SegmentSplit.load(run_dir / "data" / "test.npz")
        result = {"family": cfg.family, "source": f"test split of {corpus}", **evaluate_segments(model, test, "cpu")}
        write_json(run_dir / "eval.json", result)
        summary["eval"] = result
    return summary
