"""Pipelines that build a model family end to end from a corpus, stage by stage, with cached stages."""

from sentcode.pipeline.sentence import STAGES, load_pipeline_config, run_pipeline, run_stage

__all__ = ["STAGES", "load_pipeline_config", "run_pipeline", "run_stage"]
