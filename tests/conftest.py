"""Shared fixtures: prepared sample data (bytes and BPE), tiny model overrides, one small trained run.

Everything here runs on the CPU with one intra-op thread: the machine has 2 cores that may be shared with
another job, and oversubscribed threads make PyTorch many times slower. Subprocesses get the same setting.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
torch.set_num_threads(1)

TINY = [
    "model.d_model=64",
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.max_seq_len=64",
    "train.seq_len=64",
    "train.micro_batch=4",
    "train.batch_tokens=512",
    "train.eval_every=0",
    "train.save_every=0",
    "train.log_every=1",
    "train.warmup_steps=2",
]

TRAINED_STEPS = 40


def subprocess_env() -> dict:
    """Environment for `sentcode` subprocesses: one thread, no terminal progress bar."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def bytes_data(tmp_path_factory) -> Path:
    from sentcode.data import prepare_data

    out = tmp_path_factory.mktemp("data") / "bytes"
    prepare_data("sample", out, tokenizer="bytes", progress=False)
    return out


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory) -> Path:
    from sentcode.data import prepare_data

    out = tmp_path_factory.mktemp("data") / "bpe"
    prepare_data("sample", out, tokenizer="bpe", vocab_size=512, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(bytes_data, tmp_path_factory):
    """A tiny byte LM trained for TRAINED_STEPS steps: (run_dir, summary)."""
    from sentcode.train.lm import train_lm

    run = tmp_path_factory.mktemp("runs") / "trained"
    summary = train_lm(bytes_data, run, preset="tiny", overrides=TINY, max_steps=TRAINED_STEPS, progress=False)
    return run, summary


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]
