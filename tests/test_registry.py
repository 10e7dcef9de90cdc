"""The family registry and the direction of imports between layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sentcode.errors import SentcodeError
from sentcode.registry import FAMILIES, family

SRC = Path(__file__).resolve().parents[1] / "src" / "sentcode"

# The layers of the README, lowest first: a module may import its own layer and those below it.
LAYERS = [
    {"errors", "io", "registry", "presets"},
    {"corpus", "tokenizer", "config"},
    {"data", "nn"},
    {"models"},
    {"runs"},
    {"train"},
    {"eval"},
    {"infer"},
    {"pipeline", "demo"},
    {"serve", "lmeval"},
    {"cli", "cli_hier", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# Known imports that still run upward, each with its reason; the test fails on any other (and on a stale entry).
ALLOWED_UP = {
    ("train/lm.py", "eval"): "periodic validation during training uses the bits-per-byte pass",
    ("train/steplm.py", "eval"): "periodic validation and the final test pass use the segment scoring pass",
    ("train/hier.py", "eval"): "the final test pass scores the autoencoder through both levels",
}


def _top(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sentcode."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sentcode.")}
    return out


def test_every_family_resolves_its_parts():
    for fam in FAMILIES.values():
        for role in ("load", "train", "evaluate", "format"):
            assert callable(fam.resolve(role)), (fam.name, role)
        assert fam.unit in ("tokens", "sentences", "segments")


def test_unknown_family_is_a_clear_error():
    with pytest.raises(SentcodeError, match="'hier2' model, which this version cannot load"):
        family("hier2", where="runs/x")


def test_a_preset_of_another_family_names_its_command(tmp_path, capsys):
    from sentcode.cli import main
    from sentcode.config import load_config
    from sentcode.errors import ConfigError
    from sentcode.train.steplm import load_steplm_config

    with pytest.raises(ConfigError, match="sentence-step LM config; train it with `sentcode pipeline sentence"):
        load_config("sentence-tiny")
    with pytest.raises(ConfigError, match="flat LM config; train it with `sentcode data .*sentcode train lm"):
        load_steplm_config("tiny")
    rc = main(["train", "lm", "--data", str(tmp_path / "none"), "--preset", "staged-tiny", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "sentcode pipeline sentence --corpus CORPUS --preset staged-tiny" in err
    assert not (tmp_path / "r").exists()


def test_no_module_imports_a_higher_layer():
    seen, bad = set(), []
    for path in sorted(SRC.rglob("*.py")):
        own = _top(path)
        assert own in RANK, f"{path.relative_to(SRC)}: a top-level name missing from the layer table"
        for target in _imports(path):
            assert target in RANK, f"{path.relative_to(SRC)} imports sentcode.{target}, missing from the table"
            if RANK[target] > RANK[own]:
                key = (str(path.relative_to(SRC)), target)
                seen.add(key)
                if key not in ALLOWED_UP:
                    bad.append(f"{key[0]} imports sentcode.{target}")
    assert not bad, "imports that run upward: " + "; ".join(bad)
    assert seen == set(ALLOWED_UP), f"stale allowances: {set(ALLOWED_UP) - seen}"
