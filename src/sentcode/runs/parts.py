"""Loading the trained parts of the staged sentence-step recipe (each part is a run directory of its own):
the sentence encoder, the planner, the AR and the NAR renderer. Each loads in eval mode from its exported
weights, or else from its latest checkpoint (a run that was interrupted)."""

from __future__ import annotations

from pathlib import Path

import torch

from sentcode.models.sentence import config as enc_cfg, planner as plan_mod, renderer as ar_mod, renderer_nar as nar_mod
from sentcode.models.sentence.encoder import ByteSentenceEncoder
from sentcode.runs.weights import load_weights, read_run_config

ENCODER_WEIGHTS = "encoder.safetensors"
PLANNER_WEIGHTS = "planner.safetensors"
RENDERER_WEIGHTS = "renderer.safetensors"
NAR_WEIGHTS = "renderer_nar.safetensors"


def load_encoder(run_dir: str | Path, device: str | torch.device = "cpu") -> ByteSentenceEncoder:
    cfg = read_run_config(run_dir, enc_cfg.FAMILY, enc_cfg.EncoderRunConfig)
    return load_weights(ByteSentenceEncoder(cfg.encoder), run_dir, ENCODER_WEIGHTS).to(device).eval()


def load_planner(run_dir: str | Path, device: str | torch.device = "cpu") -> plan_mod.Planner:
    cfg = read_run_config(run_dir, plan_mod.FAMILY, plan_mod.PlannerRunConfig)
    return load_weights(plan_mod.Planner(cfg.planner), run_dir, PLANNER_WEIGHTS).to(device).eval()


def load_renderer(run_dir: str | Path, device: str | torch.device = "cpu") -> ar_mod.ARRenderer:
    cfg = read_run_config(run_dir, ar_mod.FAMILY, ar_mod.RendererRunConfig)
    return load_weights(ar_mod.ARRenderer(cfg.renderer), run_dir, RENDERER_WEIGHTS).to(device).eval()


def load_nar_renderer(run_dir: str | Path, device: str | torch.device = "cpu") -> nar_mod.NARRenderer:
    cfg = read_run_config(run_dir, nar_mod.FAMILY, nar_mod.NARRunConfig)
    return load_weights(nar_mod.NARRenderer(cfg.renderer), run_dir, NAR_WEIGHTS).to(device).eval()
