"""The staged sentence-step recipe's configuration: its stages, what each reads, and the one YAML config
(a preset plus ``--set section.key=value`` overrides) from which every stage's own config is derived, so
that settings two stages must agree on cannot disagree. See ``sentcode.pipeline.sentence`` for the stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sentcode.config import _read_yaml, apply_overrides
from sentcode.errors import ConfigError, SentcodeError
from sentcode.registry import check_preset_family

FAMILY = "sentence"
# Pipeline order; "renderer-nar" runs only when enabled in the config (and its module exists).
STAGES = ("corpus", "sentences", "encoder", "embed", "rvq", "planner", "renderer", "renderer-nocode",
          "renderer-nar", "eval")
DEPS = {
    "corpus": (),
    "sentences": ("corpus",),
    "encoder": ("sentences",),
    "embed": ("sentences", "encoder"),
    "rvq": ("embed",),
    "planner": ("sentences", "rvq"),
    "renderer": ("sentences", "rvq", "planner"),
    "renderer-nocode": ("sentences",),
    "renderer-nar": ("sentences", "rvq", "planner"),
    "eval": ("sentences", "encoder", "embed", "rvq", "planner", "renderer", "renderer-nocode"),
}
SPLITS = ("train", "val", "test")
SECTIONS = ("family", "seed", "corpus", "sentences", "encoder", "embed", "rvq", "planner", "renderer",
            "renderer_nar", "eval", "budgets")
STAGE_FILE = "stage.json"


# ---- configuration -----------------------------------------------------------------------------------------


def _section(cfg: dict, *keys: str) -> dict:
    node = cfg
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            return {}
    if not isinstance(node, dict):
        raise ConfigError(f"pipeline config section {'.'.join(keys)} must be a mapping")
    return node


def _flat(prefix: str, section: dict) -> list[str]:
    # JSON is valid YAML, so parse_override reads each value back exactly (strings stay strings, None is null).
    return [f"{prefix}.{k}={json.dumps(v)}" for k, v in section.items()]


def _budget(cfg: dict, name: str) -> list[str]:
    b = _section(cfg, "budgets", name)
    unknown = sorted(set(b) - {"max_steps", "time_budget_s"})
    if unknown:
        raise ConfigError(f"unknown key budgets.{name}.{unknown[0]} (known: max_steps, time_budget_s)")
    return _flat("train", b)


def _levels(cfg: dict) -> tuple[int, list[int]]:
    r = _section(cfg, "rvq")
    K = r.get("levels", 4)
    V = r.get("codebook_sizes", [256] * (K if isinstance(K, int) else 0))
    if isinstance(V, int):
        V = [V] * K
    if (not isinstance(K, int) or K < 1 or not isinstance(V, list) or len(V) != K
            or any(not isinstance(v, int) or isinstance(v, bool) or v < 2 for v in V)):
        raise ConfigError(f"rvq.levels must be a positive integer and rvq.codebook_sizes {K!r} integers >= 2, got {V!r}")
    return K, V


def encoder_overrides(cfg: dict) -> list[str]:
    m = _section(cfg, "encoder", "model")
    max_bytes = m.get("max_bytes", 256)
    return (_flat("encoder", m) + _flat("train", _section(cfg, "encoder", "train"))
            + [f"train.seq_len={max_bytes}", f"train.seed={cfg['seed']}"] + _budget(cfg, "encoder"))


def _no_residual(section: dict, where: str) -> None:
    if section.get("use_residual"):
        raise ConfigError(f"{where}.use_residual is not supported by the sentence pipeline: the two-part code "
                          "length does not charge continuous residuals")


def _derived(cfg: dict, section: str, prefix: str, fixed: tuple[str, ...], why: str) -> tuple[dict, list[str]]:
    """A part's model section, and its overrides plus the settings the pipeline derives for it from the rvq
    and encoder sections (levels, codebook sizes, embedding size; never continuous residuals)."""
    K, V = _levels(cfg)
    m = dict(_section(cfg, section, "model"))
    _no_residual(m, f"{section}.model")
    for k in fixed:
        if k in m:
            raise ConfigError(f"{section}.model.{k} {why}")
    d_emb = _section(cfg, "encoder", "model").get("d_emb", 128)
    return m, _flat(prefix, m) + [f"{prefix}.levels={K}", f"{prefix}.codebook_sizes={json.dumps(V)}",
                                  f"{prefix}.d_emb={d_emb}", f"{prefix}.use_residual=false"]


def planner_overrides(cfg: dict) -> list[str]:
    _, out = _derived(cfg, "planner", "planner", ("levels", "codebook_sizes", "d_emb"),
                      "is derived from the rvq and encoder sections; set it there")
    return (out + _flat("train", _section(cfg, "planner", "train")) + [f"train.seed={cfg['seed']}"]
            + _budget(cfg, "planner"))


def renderer_overrides(cfg: dict, use_codes: bool = True) -> list[str]:
    m, out = _derived(cfg, "renderer", "renderer", ("levels", "codebook_sizes", "d_emb", "use_codes"),
                      "is set by the pipeline; it cannot be overridden here")
    out += _flat("train", _section(cfg, "renderer", "train")) + [
        f"train.seq_len={m.get('max_sentence_bytes', 256)}", f"train.seed={cfg['seed']}"]
    if use_codes:
        return out + _budget(cfg, "renderer")
    # The ablation reads no codes, so code corruption means nothing to it.
    return out + ["renderer.use_codes=false", "renderer.code_noise=0.0", "renderer.predicted_mix=0.0",
                  "renderer.code_init=random"] \
        + _budget(cfg, "renderer_nocode")


def nar_enabled(cfg: dict) -> bool:
    return bool(_section(cfg, "renderer_nar").get("enabled", False))


def validate_pipeline_config(cfg: dict) -> dict:
    """Check every section by building each stage's own config (errors name the offending key)."""
    from sentcode.models.sentence.config import load_encoder_config
    from sentcode.models.sentence.planner import load_planner_config
    from sentcode.models.sentence.renderer import load_renderer_config

    if cfg.get("family") != FAMILY:
        raise ConfigError(f"a sentence pipeline config needs family: {FAMILY}, got {cfg.get('family')!r}")
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown pipeline config section {unknown[0]!r} (known: {', '.join(SECTIONS[1:])})")
    if not isinstance(cfg.get("seed", 0), int):
        raise ConfigError(f"seed must be an integer, got {cfg.get('seed')!r}")
    cfg.setdefault("seed", 1337)
    c = _section(cfg, "corpus")
    for k in ("val_frac", "test_frac"):
        if not isinstance(c.get(k, 0.05), (int, float)) or not 0 < c.get(k, 0.05) < 0.5:
            raise ConfigError(f"corpus.{k} must be a number in (0, 0.5), got {c.get(k)!r}")
    max_bytes = _section(cfg, "sentences").get("max_bytes", 256)
    if not isinstance(max_bytes, int) or max_bytes < 4:
        raise ConfigError(f"sentences.max_bytes must be an integer >= 4, got {max_bytes!r}")
    load_encoder_config(None, encoder_overrides(cfg))
    K, V = _levels(cfg)
    r = _section(cfg, "rvq")
    unknown = sorted(set(r) - {"levels", "codebook_sizes", "iters", "normalize", "fit_rows"})
    if unknown:
        raise ConfigError(f"unknown key rvq.{unknown[0]} (known: levels, codebook_sizes, iters, normalize, fit_rows)")
    if r.get("normalize", "standard") not in (None, "standard"):
        raise ConfigError(f"rvq.normalize must be standard or null, got {r.get('normalize')!r}")
    load_planner_config(None, planner_overrides(cfg))
    rcfg = load_renderer_config(None, renderer_overrides(cfg))
    load_renderer_config(None, renderer_overrides(cfg, use_codes=False))
    if rcfg.renderer.max_sentence_bytes < max_bytes:
        raise ConfigError(f"renderer.model.max_sentence_bytes={rcfg.renderer.max_sentence_bytes} is below "
                          f"sentences.max_bytes={max_bytes}: the renderer could not score every sentence")
    if nar_enabled(cfg):
        from sentcode.models.sentence.config import load_encoder_config as _enc
        from sentcode.models.sentence.renderer_nar import load_nar_config

        load_nar_config(None, nar_overrides(cfg))
        _enc(None, reward_encoder_overrides(cfg))
    e = _section(cfg, "eval")
    for k in ("agreement_contexts", "rerank"):
        if not isinstance(e.get(k, 0), int) or e.get(k, 0) < 0:
            raise ConfigError(f"eval.{k} must be an integer >= 0, got {e.get(k)!r}")
    return cfg


def load_pipeline_config(preset: str = "staged-tiny", overrides: list[str] | None = None) -> dict:
    """The resolved, validated pipeline config (a plain dict) of a preset name or YAML file plus overrides."""
    data = _read_yaml(preset)
    check_preset_family(data, FAMILY, preset)
    apply_overrides(data, list(overrides or []))
    return validate_pipeline_config(data)


def read_run_config(run_dir: str | Path) -> dict:
    """The pipeline config stored in a pipeline run directory."""
    run_dir = Path(run_dir)
    p = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise SentcodeError(f"no run directory at {run_dir}")
    if not p.is_file():
        raise SentcodeError(f"{run_dir} is not a sentence pipeline run (no config.yaml); "
                            "create one with `sentcode pipeline sentence --out RUN_DIR`")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError:
        raise SentcodeError(f"{p} is not valid YAML") from None
    if not isinstance(data, dict) or data.get("family") != FAMILY:
        raise SentcodeError(f"{run_dir} is not a sentence pipeline run (family {data.get('family')!r})")
    return validate_pipeline_config(data)


def stage_config(cfg: dict, stage: str) -> dict:
    """What a stage depends on in the config: its input hash covers exactly this."""
    if stage == "corpus":
        return {"spec": cfg["corpus"].get("spec"), **{k: v for k, v in cfg["corpus"].items() if k != "spec"}}
    if stage == "sentences":
        return {"max_bytes": _section(cfg, "sentences").get("max_bytes", 256)}
    if stage == "encoder":
        return {"overrides": encoder_overrides(cfg)}
    if stage == "embed":
        return dict(_section(cfg, "embed"))
    if stage == "rvq":
        return dict(_section(cfg, "rvq"), seed=cfg["seed"])
    if stage == "planner":
        return {"overrides": planner_overrides(cfg)}
    if stage == "renderer":
        return {"overrides": renderer_overrides(cfg)}
    if stage == "renderer-nocode":
        return {"overrides": renderer_overrides(cfg, use_codes=False)}
    if stage == "renderer-nar":
        return {"overrides": nar_overrides(cfg), "reward_encoder": reward_encoder_overrides(cfg)}
    if stage == "eval":
        return dict(_section(cfg, "eval"), seed=cfg["seed"])
    raise KeyError(stage)


def nar_overrides(cfg: dict) -> list[str]:
    m, out = _derived(cfg, "renderer_nar", "renderer", ("levels", "codebook_sizes", "d_emb"),
                      "is set by the pipeline; it cannot be overridden here")
    return (out + _flat("train", _section(cfg, "renderer_nar", "train"))
            + [f"train.seq_len={m.get('max_bytes', 128)}", f"train.seed={cfg['seed']}"] + _budget(cfg, "renderer_nar"))


def reward_encoder_overrides(cfg: dict) -> list[str]:
    # The NAR renderer's reward should measure surface similarity ("same" objective), and it must not be the
    # encoder the codes came from: that one is the judge of its evaluations.
    steps = _section(cfg, "renderer_nar").get("reward_encoder_steps", 200)
    return [o for o in encoder_overrides(cfg) if not o.startswith(("train.max_steps=", "train.time_budget_s="))] + [
        'encoder.objective="same"', f"train.max_steps={steps}", f"train.seed={cfg['seed'] + 1}"]
