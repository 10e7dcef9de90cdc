"""Pipelines that build a model family end to end from a corpus, stage by stage, with cached stages."""

from sentcode.pipeline.sentence import run_pipeline, run_stage
from sentcode.runs.staged_config import STAGES, load_pipeline_config

__all__ = ["STAGES", "load_pipeline_config", "run_pipeline", "run_stage"]
