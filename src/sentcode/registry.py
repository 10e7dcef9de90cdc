"""The one registry of model families.

Each family names, as ``"module:attribute"`` strings, how a run directory is loaded (its generator), how it
is trained, how a loaded run is scored and how that result is printed. The CLI, the server, the chat, lm-eval
and ``sentcode.load`` ask this table; none of them branches on a family's name.

The entries are strings, resolved on first use, so that this module imports nothing of the layers it names
(a family's loader lives in ``infer/``, its training in ``train/`` or ``pipeline/``): the layers keep pointing
one way, and a command that uses one family never imports the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from sentcode.errors import ConfigError, SentcodeError


@dataclass(frozen=True)
class Family:
    name: str
    label: str  # what a user is told the model is ("flat LM", ...)
    unit: str  # what a request's length counts: "tokens", "sentences" or "segments"
    load: str  # (run_dir, device, renderer) -> generator
    train: str  # (corpus or data, out, preset, overrides, ...) -> summary dict
    evaluate: str  # (generator, text_file, split) -> JSON-ready dict with "bpb"
    format: str  # (evaluation dict) -> one printable block
    command: str  # the command that trains a preset of this family (``{preset}`` filled in)
    staged: bool = False  # trained stage by stage by a cached pipeline (``--from`` / ``--until`` apply)

    @property
    def steps_by_sentence(self) -> bool:
        """Generation steps by whole segments (sentences or shorter), not by tokens."""
        return self.unit != "tokens"

    def resolve(self, role: str):
        module, _, attr = getattr(self, role).partition(":")
        return getattr(importlib.import_module(module), attr)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("lm", "flat LM", "tokens",
           load="sentcode.infer.generator:load_lm", train="sentcode.train.lm:train_lm",
           evaluate="sentcode.eval.run:evaluate_flat", format="sentcode.eval.run:format_flat",
           command="sentcode data --corpus CORPUS --out DATA, then sentcode train lm --data DATA --preset {preset} "
                   "--out RUN"),
    Family("steplm", "sentence-step LM", "sentences",
           load="sentcode.infer.steplm:load_steplm", train="sentcode.train.steplm:train_steplm",
           evaluate="sentcode.eval.steplm:evaluate_steplm_run", format="sentcode.eval.steplm:format_steplm_result",
           command="sentcode pipeline sentence --corpus CORPUS --preset {preset} --out RUN"),
    Family("hier", "hierarchical byte autoencoder", "segments",
           load="sentcode.infer.hier:load_hier", train="sentcode.train.hier:train_hier",
           evaluate="sentcode.eval.hier:evaluate_hier_run", format="sentcode.eval.hier:format_hier_result",
           command="sentcode pipeline hier --corpus CORPUS --preset {preset} --out RUN"),
    Family("sentence", "sentence-step LM (staged)", "sentences",
           load="sentcode.infer.sentence:load_sentence", train="sentcode.pipeline.sentence:run_pipeline",
           evaluate="sentcode.eval.sentence:evaluate_loaded", format="sentcode.eval.sentence:format_sentence_result",
           command="sentcode pipeline sentence --corpus CORPUS --preset {preset} --out RUN", staged=True),
)}


def family(name: str | None, where: object = None) -> Family:
    """The registered family ``name``; a clear error for anything else (``where``: the run it came from)."""
    if name in FAMILIES:
        return FAMILIES[name]
    src = f"{where} holds" if where is not None else "this is"
    raise SentcodeError(f"{src} a {name!r} model, which this version cannot load (known families: "
                        f"{', '.join(FAMILIES)})")


def check_preset_family(data: dict, expected: str, preset: str) -> None:
    """Refuse a preset or config file of another family with the command that takes it (a file that names no
    family is left to the config's own validation)."""
    found = data.get("family", expected)
    if found != expected:
        fam = family(found, where=f"preset {preset!r}")
        raise ConfigError(f"preset {preset!r} is a {fam.label} config; train it with `{fam.command.format(preset=preset)}`")


def family_of(gen) -> Family:
    """The family of a loaded generator."""
    return family(getattr(gen, "family", None))
