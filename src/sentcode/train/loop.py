"""The one training loop every model family uses.

A family brings a ``TrainTask``: a model, a batch source with resumable state, a loss and an evaluation.
The loop owns everything else: seeds, precision, optimizer and schedule, gradient accumulation, DDP,
checkpoints and resume, signals, progress and metrics.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn as nn

from sentcode.config import TrainConfig
from sentcode.errors import CheckpointError, ConfigError
from sentcode.io import write_text
from sentcode.runs import checkpoint as ckpt_io
from sentcode.train.distributed import DistInfo, all_reduce_mean, barrier, init_distributed
from sentcode.train.precision import MEASURE, autocast, choose_cpu_precision, peak_flops, pick_device, resolve_precision
from sentcode.train.progress import Progress


class BatchSource(Protocol):
    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainTask:
    model: nn.Module
    batches: BatchSource
    loss: Callable[[nn.Module, Any], torch.Tensor]  # mean loss of one micro-batch
    evaluate: Callable[[nn.Module, int | None], dict]  # max_tokens (None = full pass) -> metrics incl. headline
    tokens_per_batch: int
    flops_per_token: float
    extra_metrics: Callable[[nn.Module], dict] = field(default=lambda m: {})
    ddp_find_unused: bool = False  # True when some parameters may get no gradient in a step (routed experts)
    headline: str = "bpb"  # the evaluate() key the progress line reports; families without bpb name theirs
    finish: Callable[[nn.Module], None] | None = None  # once a run completes, before its final evaluation


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_left(step_frac: float, step: int, cfg: TrainConfig) -> float:
    """How far warmup has come (1: done): ``warmup_steps`` steps, or ``warmup_max_frac`` of the run (of
    ``max_steps`` or of the time budget, whichever is the nearer end), whichever comes first."""
    by_steps = (step + 1) / cfg.warmup_steps if cfg.warmup_steps > 0 else 1.0
    return min(1.0, max(by_steps, step_frac / cfg.warmup_max_frac))


def lr_at(step_frac: float, step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio at the end of training (by the share of
    the run done: steps of ``max_steps`` or seconds of the time budget, whichever is further along)."""
    w = warmup_left(step_frac, step, cfg)
    if w < 1.0:
        return cfg.lr * w
    t = min(max(step_frac, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms, biases and other vectors do not."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )


class _StopFlag:
    """First SIGINT/SIGTERM: finish the step, save, exit. Second: stop at once."""

    def __init__(self, progress: Progress):
        self.requested = False
        self.signal_name = ""
        self._progress = progress
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self._progress.message(f"{self.signal_name}: finishing this step and saving (again to quit now)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint so the log reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text(path, "".join(line + "\n" for line in keep))


def _mfu(value: float, bar) -> float | None:
    """MFU, or None when it comes out over 100%: the peak it divides by was measured too low (said once)."""
    if value <= 1.0:
        return value
    if not getattr(bar, "_said_mfu", False):
        bar._said_mfu = True
        bar.message("MFU would read over 100%: the CPU's peak FLOP/s in the cache was measured while the machine was "
                    "busy; delete peak_flops.json in $SENTCODE_CACHE (default ~/.cache/sentcode) to measure it again")
    return None


def _set_aside(path: Path) -> None:
    """A fresh run into a directory whose earlier run died before its first checkpoint: that run's log is
    renamed (metrics.N.jsonl), never appended to, so the new log reads as one run."""
    n = 1
    while path.with_name(f"{path.stem}.{n}{path.suffix}").exists():
        n += 1
    aside = path.with_name(f"{path.stem}.{n}{path.suffix}")
    path.rename(aside)
    warnings.warn(f"{path.parent} held the log of an earlier run that saved no checkpoint; it is kept as {aside.name}")


def _shape_key(config_dict: dict, cfg: TrainConfig) -> str:
    """What a step's speed depends on: the family, the model section and the micro-batch shape."""
    model = json.dumps(config_dict.get("model", {}), sort_keys=True, default=str)
    digest = hashlib.sha1(model.encode()).hexdigest()[:12]
    return f"{config_dict.get('family', 'lm')} model {digest} micro_batch {cfg.micro_batch} seq_len {cfg.seq_len}"


def _step_timer(task: TrainTask, model: nn.Module, dev: torch.device):
    """A function timing one forward and backward pass of a copy of ``model`` on one batch, in a precision.

    Nothing of the run changes: the copy takes the steps (a quantizer's EMA statistics move in a forward), the
    batch is read and the loader put back, and the random state is restored afterwards."""
    rng = ckpt_io.rng_state()
    loader = task.batches.state_dict()
    batch = task.batches.next_batch()
    task.batches.load_state_dict(loader)
    probe = copy.deepcopy(model).train()

    def step_seconds(precision: str) -> float:
        t = time.perf_counter()
        with autocast(dev, precision):
            loss = task.loss(probe, batch)
        loss.backward()
        probe.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t
        ckpt_io.set_rng_state(rng)
        return elapsed

    return step_seconds


def run_training(
    run_dir: str | Path,
    cfg: TrainConfig,
    build_task: Callable[[DistInfo, torch.device], TrainTask],
    config_dict: dict,
    resume: Path | None = None,
    device: str = "auto",
    progress: bool | str = True,
    stop_at: int | None = None,
) -> dict:
    """Train to ``cfg.max_steps`` (or the time budget); returns a summary. ``stop_at`` simulates an interruption."""
    run_dir = Path(run_dir)
    dev = pick_device(device)
    dist_info = init_distributed(dev.type)
    if dev.type == "cuda" and dist_info.enabled:
        dev = torch.device("cuda", dist_info.local_rank)
    precision = resolve_precision(cfg.precision, dev)

    per_step = cfg.micro_batch * cfg.seq_len * dist_info.world_size
    if cfg.batch_tokens % per_step:
        raise ConfigError(
            f"train.batch_tokens={cfg.batch_tokens} is not a multiple of micro_batch*seq_len*world_size={per_step}"
        )
    accum = cfg.batch_tokens // per_step

    set_seed(cfg.seed)  # before the model is built, so initial weights depend only on the seed
    task = build_task(dist_info, dev)
    raw_model = task.model.to(dev)
    model: nn.Module = raw_model
    if cfg.compile:
        model = torch.compile(model)
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=task.ddp_find_unused
        )
    precision_note = None
    if precision == MEASURE:
        precision, precision_note = choose_cpu_precision(_step_timer(task, raw_model, dev), _shape_key(config_dict, cfg))
        if dist_info.enabled:  # every rank must train in the same precision: the majority of their measurements
            precision = "bf16" if all_reduce_mean(float(precision == "bf16"), dist_info) >= 0.5 else "fp32"
    optimizer = build_optimizer(raw_model, cfg, dev)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    step, train_elapsed, tokens_seen = 0, 0.0, 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume is not None:
        state = ckpt_io.load_checkpoint(resume)
        if ckpt_io.model_sections(state.get("config", {})) != ckpt_io.model_sections(config_dict):
            raise CheckpointError(f"{resume} belongs to another model configuration than this run's")
        ckpt_io.load_model_state(raw_model, state["model"], str(resume))
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        task.batches.load_state_dict(state["loader"])
        ckpt_io.set_rng_state(state["rng"])
        step, train_elapsed, tokens_seen = state["step"], state["train_elapsed"], state["tokens_seen"]
        del state
        ckpt_io.forget_loaded()
        if dist_info.is_main:
            _trim_metrics(metrics_path, step)
    elif dist_info.is_main and metrics_path.exists():
        _set_aside(metrics_path)

    def payload() -> dict:
        return {
            "model": ckpt_io.clean_state_dict(raw_model.state_dict()),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "loader": task.batches.state_dict(),
            "rng": ckpt_io.rng_state(),
            "step": step,
            "train_elapsed": train_elapsed,
            "tokens_seen": tokens_seen,
            "config": config_dict,
        }

    def save() -> None:
        if dist_info.is_main:
            ckpt_io.save_step(run_dir, step, payload(), cfg.keep_checkpoints)
        barrier(dist_info)

    logger = _MetricLogger(metrics_path, cfg, run_dir) if dist_info.is_main else None
    peak = peak_flops(dev.type, precision) * dist_info.world_size
    bar = Progress(cfg.max_steps, start=step, enabled=bool(progress) and dist_info.is_main,
                   live=False if progress == "plain" else None, log_every=cfg.log_every)
    bar.message(
        f"training {sum(p.numel() for p in raw_model.parameters()):,} parameters on {dev.type} ({precision}), "
        f"{dist_info.world_size} process(es), grad accumulation {accum}, from step {step}"
    )
    if precision_note and dist_info.is_main:
        bar.message(precision_note)

    def frac_done() -> float:
        f = step / cfg.max_steps
        if cfg.time_budget_s:
            f = max(f, train_elapsed / cfg.time_budget_s)
        return f

    status = "completed"
    last_eval = None
    next_eval_s = (train_elapsed // cfg.eval_interval_s + 1) * cfg.eval_interval_s if cfg.eval_interval_s else None
    fit = math.ceil(cfg.warmup_max_frac * cfg.max_steps)
    if step == 0 and cfg.warmup_steps > fit:
        warnings.warn(f"train.warmup_steps={cfg.warmup_steps} is more than {cfg.warmup_max_frac:.0%} of "
                      f"train.max_steps={cfg.max_steps}: warmup is shortened to {fit} steps")
    warming = step < cfg.warmup_steps
    with _StopFlag(bar) as stop:
        model.train()
        while frac_done() < 1.0:
            lr = lr_at(frac_done(), step, cfg)
            if warming and warmup_left(frac_done(), step, cfg) >= 1.0:
                warming = False
                if step + 1 < min(cfg.warmup_steps, fit) and dist_info.is_main:
                    bar.message(f"warmup shortened to {step + 1} steps: {cfg.warmup_max_frac:.0%} of the "
                                f"{cfg.time_budget_s:g} s time budget has passed (train.warmup_steps="
                                f"{cfg.warmup_steps})")
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            loss_sum = 0.0
            for micro in range(accum):
                batch = task.batches.next_batch()
                sync = not dist_info.enabled or micro == accum - 1
                ctx = model.no_sync() if not sync else _null()
                with ctx:
                    with autocast(dev, precision):
                        loss = task.loss(model, batch)
                    scaled = loss / accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += float(loss.detach())
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            train_elapsed += dt
            step += 1
            step_tokens = task.tokens_per_batch * accum * dist_info.world_size
            tokens_seen += step_tokens
            loss_val = all_reduce_mean(loss_sum / accum, dist_info)
            tok_s = step_tokens / dt
            info = {
                "loss": loss_val, "lr": lr, "tok_s": tok_s, "mfu": _mfu(task.flops_per_token * tok_s / peak, bar),
                "grad_norm": grad_norm,
            }
            if logger:
                logger.log({"step": step, **info, "tokens": tokens_seen, "train_elapsed": train_elapsed,
                            **task.extra_metrics(raw_model)})
            bar.update(step, info, min(frac_done(), 1.0))
            done = frac_done() >= 1.0
            due = bool(cfg.eval_every) and step % cfg.eval_every == 0
            if next_eval_s is not None and train_elapsed >= next_eval_s:
                due, next_eval_s = True, (train_elapsed // cfg.eval_interval_s + 1) * cfg.eval_interval_s
            if due and not done:
                last_eval = _evaluate(task, raw_model, cfg.eval_max_tokens, dist_info, logger, step, train_elapsed, bar)
            interrupted = stop.requested or (stop_at is not None and step >= stop_at)
            if (cfg.save_every and step % cfg.save_every == 0) or interrupted or done:
                save()
            if interrupted:
                status = "interrupted"
                bar.message(f"saved step {step} to {ckpt_io.checkpoint_dir(run_dir)}; resume with --resume auto")
                break
    bar.close()
    final = None
    if status == "completed" and task.finish is not None:
        task.finish(raw_model)
    if status == "completed" and cfg.final_eval:
        final = _evaluate(task, raw_model, None, dist_info, logger, step, train_elapsed, bar, final=True)
    if logger:
        logger.close()
    return {"status": status, "step": step, "train_elapsed": train_elapsed, "tokens_seen": tokens_seen,
            "final_eval": final, "last_eval": last_eval, "precision": precision, "precision_note": precision_note,
            "device": dev.type,
            "world_size": dist_info.world_size, "model": raw_model}


def _null():
    import contextlib

    return contextlib.nullcontext()


def _evaluate(task, model, max_tokens, dist_info, logger, step, train_elapsed, bar, final=False) -> dict | None:
    if not dist_info.is_main:
        barrier(dist_info)
        return None
    result = task.evaluate(model, max_tokens)
    if logger:
        logger.log({"step": step, "train_elapsed": train_elapsed, "final": final,
                    **{f"val_{k}": v for k, v in result.items()}})
    bar.message(f"step {step}: validation-split {task.headline} {result[task.headline]:.4f}"
                + (" (full pass)" if final else ""))
    barrier(dist_info)
    return result


class _MetricLogger:
    """metrics.jsonl always; TensorBoard and MLflow when asked for (optional extras)."""

    def __init__(self, path: Path, cfg: TrainConfig, run_dir: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a")
        self._tb = self._mlflow = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard needs the 'tensorboard' extra: pip install 'sentcode[tensorboard]'") from None
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.mlflow:
            try:
                import mlflow
            except ImportError:
                raise ConfigError("train.mlflow needs the 'mlflow' extra: pip install 'sentcode[mlflow]'") from None
            mlflow.set_tracking_uri(f"file:{(run_dir / 'mlruns').resolve()}")
            mlflow.start_run()
            self._mlflow = mlflow

    def log(self, record: dict) -> None:
        record = {"time": time.time(), **record}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        nums = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}
        if self._tb:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, record["step"])
        if self._mlflow:
            self._mlflow.log_metrics(nums, step=record["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb:
            self._tb.close()
        if self._mlflow:
            self._mlflow.end_run()
