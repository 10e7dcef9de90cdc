"""Shared fixtures: prepared sample data (bytes and BPE), tiny model overrides, one small trained run (flat LM), one micro sentence-step run.

Everything here runs on the CPU with one intra-op thread: the machine has 2 cores that may be shared with
another job, and oversubscribed threads make PyTorch many times slower. Subprocesses get the same setting.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
# per-machine measurements (the CPU's peak FLOP/s) go to a fresh folder, not the user's cache
os.environ["SENTCODE_CACHE"] = tempfile.mkdtemp(prefix="sentcode-test-cache-")
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

# Micro sentence-step pipeline (tens of steps per stage) on the in-package sample corpus.
MICRO = [
    "sentences.max_bytes=64",
    "encoder.model.d_model=32", "encoder.model.n_layer=1", "encoder.model.n_head=2", "encoder.model.d_emb=16",
    "encoder.model.max_bytes=64", "encoder.train.micro_batch=16", "encoder.train.batch_tokens=1024",
    "encoder.train.warmup_steps=2",
    "rvq.levels=2", "rvq.codebook_sizes=[16,16]", "rvq.iters=3",
    "planner.model.d_model=32", "planner.model.n_layer=1", "planner.model.n_head=2", "planner.model.n_kv_head=1",
    "planner.model.max_steps=16", "planner.train.seq_len=16", "planner.train.micro_batch=4",
    "planner.train.batch_tokens=64", "planner.train.warmup_steps=2",
    "renderer.model.d_model=32", "renderer.model.n_layer=1", "renderer.model.n_head=2", "renderer.model.n_kv_head=1",
    "renderer.model.context_bytes=16", "renderer.model.max_sentence_bytes=64", "renderer.train.micro_batch=4",
    "renderer.train.batch_tokens=256", "renderer.train.warmup_steps=2",
    "eval.agreement_contexts=4", "eval.rerank=2",
    "budgets.encoder.max_steps=10", "budgets.planner.max_steps=10", "budgets.renderer.max_steps=10",
    "budgets.renderer_nocode.max_steps=10", "renderer_nar.enabled=false",
]


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


@pytest.fixture(scope="session")
def sentence_run(tmp_path_factory) -> Path:
    """A micro sentence-step pipeline run directory (every stage but the optional NAR renderer). Read-only:
    tests that change it copy it first."""
    from sentcode.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("sentence") / "run"
    run_pipeline("sample", out, preset="staged-tiny", overrides=MICRO, progress=False)
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]
