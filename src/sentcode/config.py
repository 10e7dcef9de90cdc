"""Configuration: one dataclass per concern, named presets in YAML, dotted overrides, validation.

A preset is a small YAML file in ``sentcode/presets``; a user file may name a ``base`` preset and change a
few keys. Unknown keys and inconsistent shapes are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sentcode.errors import ConfigError
from sentcode.registry import check_preset_family


@dataclass
class ModelConfig:
    vocab_size: int = 259  # set from the tokenizer at train time
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    ffn_mult: float = 2.75  # SwiGLU hidden = ffn_mult * d_model, rounded to a multiple of 32
    max_seq_len: int = 256
    pos: str = "rope"  # rope | alibi
    rope_theta: float = 10000.0
    attn_window: int | None = None  # sliding-window attention span; None = full causal
    tie_embeddings: bool = True
    ffn: str = "swiglu"  # swiglu | dual
    dual_small_mult: float = 1.0
    capacity_factor: float = 1.25
    balance_coef: float = 0.01
    norm_eps: float = 1e-6

    @property
    def ffn_hidden(self) -> int:
        return _round32(self.ffn_mult * self.d_model)

    def validate(self) -> None:
        if self.d_model <= 0 or self.n_layer <= 0 or self.n_head <= 0 or self.n_kv_head <= 0:
            raise ConfigError("model.d_model, n_layer, n_head and n_kv_head must be positive")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} does not divide model.n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ConfigError("model.d_model / model.n_head (the head size) must be even for rotary positions")
        if self.pos not in ("rope", "alibi"):
            raise ConfigError(f"model.pos must be 'rope' or 'alibi', not {self.pos!r}")
        if self.ffn not in ("swiglu", "dual"):
            raise ConfigError(f"model.ffn must be 'swiglu' or 'dual', not {self.ffn!r}")
        if self.max_seq_len < 2:
            raise ConfigError("model.max_seq_len must be at least 2")
        if self.attn_window is not None and self.attn_window < 1:
            raise ConfigError("model.attn_window must be positive or null")


@dataclass
class TrainConfig:
    seq_len: int = 256
    micro_batch: int = 16
    batch_tokens: int = 4096  # global batch; gradient accumulation is derived from it
    max_steps: int = 1000
    time_budget_s: float | None = None  # stop after this much training wall-clock (evaluation excluded)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    warmup_max_frac: float = 0.1  # warmup also ends once this share of the run (steps or time budget) has passed
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp32 | fp16 (fp16: GPU only, with a gradient scaler)
    compile: bool = False
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 200  # steps between periodic evaluations (0: none)
    eval_interval_s: float | None = None  # or: training seconds between evaluations (for bpb-vs-time curves)
    eval_max_tokens: int | None = 200_000  # cap for periodic evals; the final eval is a full pass
    final_eval: bool = True  # a full pass over the validation split when training ends
    save_every: int = 200
    keep_checkpoints: int = 2
    tensorboard: bool = False
    mlflow: bool = False

    def validate(self) -> None:
        if self.seq_len < 2 or self.micro_batch < 1 or self.max_steps < 1:
            raise ConfigError("train.seq_len >= 2, train.micro_batch >= 1 and train.max_steps >= 1 are required")
        if self.batch_tokens % (self.micro_batch * self.seq_len):
            raise ConfigError(
                f"train.batch_tokens={self.batch_tokens} is not a multiple of "
                f"train.micro_batch * train.seq_len = {self.micro_batch * self.seq_len}"
            )
        if self.precision not in ("auto", "bf16", "fp32", "fp16"):
            raise ConfigError(f"train.precision must be auto, bf16, fp32 or fp16, not {self.precision!r}")
        if not 0 < self.warmup_max_frac <= 1:
            raise ConfigError("train.warmup_max_frac must lie in (0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.min_lr_ratio must lie in [0, 1]")
        if self.lr <= 0:
            raise ConfigError("train.lr must be positive")


class RunConfig:
    """What every run config shares (a dataclass of sections plus ``family``): ``validate`` checks the family,
    validates each section that can validate itself, then the cross-section rules of ``check``."""

    kind = "training"  # what the run is called in messages

    def validate(self):
        expected = type(self).__dataclass_fields__["family"].default
        if self.family != expected:
            raise ConfigError(f"family must be {expected!r} for a {self.kind} run, not {self.family!r}")
        for f in fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        self.check()
        return self

    def check(self) -> None:
        """Rules between sections (none by default)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LMConfig(RunConfig):
    """A flat language model and how to train it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    family: str = "lm"
    kind = "flat LM"

    def check(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )


def _round32(x: float) -> int:
    return max(32, int(round(x / 32)) * 32)


def _from_dict(cls, data: dict, where: str, base=None):
    """``cls`` from ``data``; keys left out keep ``base``'s values (a section's own default, which may differ
    from its class's: the second level of ``hier`` is a ``StepLMModelConfig`` with other sizes), else the
    class defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {where + '.' if where else ''}{unknown[0]} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        if base is not None:
            default = getattr(base, name)
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, key, default)
        else:
            kwargs[name] = _coerce(value, default, key)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _coerce(value, default, key):
    """Check a scalar against the type of its default (None defaults accept numbers or null)."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("sentcode.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path_or_name: str) -> dict:
    if path_or_name in preset_names():
        text = resources.files("sentcode.presets").joinpath(f"{path_or_name}.yaml").read_text()
        where = f"preset {path_or_name}"
    else:
        p = Path(path_or_name)
        if not p.is_file():
            raise ConfigError(f"no preset or config file named {path_or_name!r} (presets: {', '.join(preset_names())})")
        text, where = p.read_text(), str(p)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a YAML mapping")
    base = data.pop("base", None)
    if base:
        merged = _read_yaml(base)
        _deep_update(merged, data)
        return merged
    return data


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(preset: str | None = "tiny", overrides: list[str] | None = None, cls=LMConfig):
    """Resolve a preset name or YAML path (None: the dataclass defaults) plus ``key.sub=value`` overrides
    into a validated config of class ``cls``."""
    data = _read_yaml(preset) if preset is not None else {}
    if preset is not None:
        check_preset_family(data, cls.family, preset)
    apply_overrides(data, overrides or [])
    return config_from_dict(data, cls)


def apply_overrides(data: dict, overrides: list[str]) -> None:
    """Set each ``key.sub=value`` of ``overrides`` in the nested dict ``data``, in order."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value


def config_from_dict(data: dict, cls=LMConfig):
    cfg = _from_dict(cls, data, "")
    return cfg.validate()
