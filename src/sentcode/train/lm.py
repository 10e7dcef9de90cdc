"""The flat LM family's training task, and the run directory it writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sentcode.config import LMConfig, _read_yaml, load_config
from sentcode.data import DataDir, WindowLoader
from sentcode.eval.bpb import evaluate_bpb
from sentcode.models.lm import LM, next_token_loss
from sentcode.registry import check_preset_family
from sentcode.runs import checkpoint as ckpt_io
from sentcode.train.loop import TrainTask
from sentcode.runs.info import write_run_files
from sentcode.train.runs import check_resume, train_and_export


def lm_loss(model, batch) -> torch.Tensor:
    """Next-token cross-entropy through the (possibly compiled or DDP-wrapped) model, plus router balance."""
    x, y = batch
    ce = next_token_loss(model(x), y)
    return ce + ckpt_io.unwrap(model).aux_loss().to(ce.device)


def _router_metrics(model) -> dict:
    loads = [b.ffn.last_load for b in model.blocks if hasattr(b.ffn, "last_load")]
    if not loads:
        return {}
    return {"router_large_share": float(torch.stack(loads)[:, 1].mean())}


def build_lm_task(cfg: LMConfig, data: DataDir, dist_info, device) -> TrainTask:
    model = LM(cfg.model)
    t = cfg.train
    loader = WindowLoader(data.tokens("train"), t.seq_len, t.micro_batch, seed=t.seed,
                          rank=dist_info.rank, world_size=dist_info.world_size)

    class _Batches:
        def next_batch(self):
            x, y = loader.next_batch()
            return x.to(device), y.to(device)

        state_dict = loader.state_dict
        load_state_dict = loader.load_state_dict

    def evaluate(m, max_tokens):
        return evaluate_bpb(m, data.tokens("val"), data.tokenizer, t.seq_len, batch_size=t.micro_batch,
                            device=device, precision="fp32" if device.type == "cpu" else "bf16", max_tokens=max_tokens)

    return TrainTask(model=model, batches=_Batches(), loss=lm_loss, evaluate=evaluate,
                     tokens_per_batch=t.micro_batch * t.seq_len, flops_per_token=model.flops_per_token(t.seq_len),
                     extra_metrics=_router_metrics, ddp_find_unused=cfg.model.ffn == "dual")


def write_run_header(run_dir: Path, cfg: LMConfig, data: DataDir) -> None:
    write_run_files(run_dir, cfg, data_dir=str(Path(data.path).resolve()), tokenizer=data.meta["tokenizer"])
    tok_dir = run_dir / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    data.tokenizer.save(tok_dir)


def train_lm(
    data_dir: str | Path,
    run_dir: str | Path,
    preset: str = "tiny",
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    resume: str | None = None,
    device: str = "auto",
    progress: bool | str = True,
    stop_at: int | None = None,
) -> dict:
    """Train a flat LM on a prepared data directory into ``run_dir``; returns the loop's summary."""
    run_dir = Path(run_dir)
    check_preset_family(_read_yaml(preset), "lm", preset)  # before the data: the error names the right command
    data = DataDir(data_dir)
    overrides = list(overrides or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    cfg = load_config(preset, overrides + [f"model.vocab_size={data.tokenizer.vocab_size}"])
    resume_path = check_resume(run_dir, resume, cfg.to_dict())
    write_run_header(run_dir, cfg, data)
    return train_and_export(run_dir, cfg, lambda info, dev: build_lm_task(cfg, data, info, dev), "model.safetensors",
                            resume=resume_path, device=device, progress=progress, stop_at=stop_at)
