import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from sentcode.cli import main
from sentcode.data import DataDir


def run_cli(capsys, argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, match=None):
    assert rc != 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    if match:
        assert match in lines[0], lines[0]


def snapshot(path: Path):
    """Every file under ``path`` (hidden temporaries included) with its bytes; None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def train_args(data, out, *extra):
    args = ["train", "lm", "--data", data, "--out", out, "--no-progress"]
    for o in TINY:
        args += ["--set", o]
    return args + list(extra)


@pytest.fixture
def run_copy(trained_run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(trained_run[0], dst)
    return dst


def test_printed_bpb_names_the_text_it_was_measured_on(capsys, bytes_data, tmp_path):
    out = tmp_path / "run"
    rc, stdout, _ = run_cli(capsys, train_args(bytes_data, out, "--max-steps", 2))
    assert rc == 0 and "validation-split bpb" in stdout and "held-out" not in stdout
    rc, stdout, _ = run_cli(capsys, ["eval", out])
    assert rc == 0 and stdout.startswith("test split of ")


# ---------------------------------------------------------------- data prepare


def test_missing_corpus_is_one_line_error(capsys, tmp_path):
    """Guards tracebacks and half-written output on a missing corpus path."""
    out = tmp_path / "data"
    rc, _, err = run_cli(capsys, ["data", "prepare", "--corpus", tmp_path / "nope.txt", "--out", out])
    assert_one_line_error(rc, err, "corpus not found")
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus_is_one_line_error(capsys, tmp_path):
    """Guards an empty corpus (whitespace only) being prepared into an empty data directory."""
    (tmp_path / "empty.txt").write_text("  \n\n\t \n")
    out = tmp_path / "data"
    rc, _, err = run_cli(capsys, ["data", "prepare", "--corpus", tmp_path / "empty.txt", "--out", out])
    assert_one_line_error(rc, err, "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_invalid_utf8_corpus_warns_once_and_keeps_bytes(capsys, tmp_path):
    """Guards invalid UTF-8 input: not an error, one warning line, the bytes kept exactly."""
    paras = [b"Paragraph %d says hello \xff\xfe to the \xc3 world, at some length." % i for i in range(12)]
    raw = b"\n\n".join(paras) + b"\n"
    (tmp_path / "bad.txt").write_bytes(raw)
    out = tmp_path / "data"
    rc, stdout, err = run_cli(capsys, ["data", "prepare", "--corpus", tmp_path / "bad.txt", "--out", out])
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not valid UTF-8" in warnings[0]
    assert "Traceback" not in err and "error" not in err
    assert "wrote" in stdout
    data = DataDir(out)
    text = b"\n\n".join(
        d.encode("utf-8", "surrogateescape") for s in ("train", "val", "test") for d in data.documents(s)
    )
    for p in paras:  # every paragraph, invalid bytes included, is kept exactly once
        assert text.count(p) == 1
    assert text.count(b"\xff\xfe") == 12 and text.count(b"\xc3 world") == 12


# ---------------------------------------------------------------- train lm


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.no_such_key=1", "unknown config key model.no_such_key"),
        ("train.bogus=2", "unknown config key train.bogus"),
        ("model.n_head=5", "does not divide model.d_model"),
        ("model.n_kv_head=3", "does not divide model.n_head"),
    ],
)
def test_bad_config_is_one_line_error(capsys, tmp_path, bytes_data, override, match):
    """Guards silently ignored or crashing configs: unknown keys and inconsistent shapes are one-line errors."""
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, train_args(bytes_data, out, "--set", override, "--max-steps", 1))
    assert_one_line_error(rc, err, match)
    assert not out.exists()


def test_bad_yaml_config_file(capsys, tmp_path, bytes_data):
    """Guards a YAML parse error surfacing as a traceback."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  d_model: [64\n  n_layer: 2\n")
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, train_args(bytes_data, out, "--preset", cfg))
    assert_one_line_error(rc, err, "not valid YAML")
    assert not out.exists()
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("base: tiny\nmodel:\n  d_modle: 64\n")
    rc, _, err = run_cli(capsys, train_args(bytes_data, out, "--preset", unknown))
    assert_one_line_error(rc, err, "unknown config key model.d_modle")
    assert not out.exists()


def test_resume_auto_with_nothing_to_resume(capsys, tmp_path, bytes_data):
    """Guards `--resume auto` on an empty run dir: an error, not a fresh run or a traceback."""
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, train_args(bytes_data, out, "--resume", "auto", "--max-steps", 2))
    assert_one_line_error(rc, err, "no checkpoint to resume")
    assert not out.exists()


def test_train_into_existing_run_without_resume(capsys, run_copy, bytes_data):
    """Guards silently overwriting a run: training into a run dir that holds checkpoints needs --resume."""
    before = snapshot(run_copy)
    rc, _, err = run_cli(capsys, train_args(bytes_data, run_copy, "--max-steps", 2))
    assert_one_line_error(rc, err, "already holds a training run")
    assert snapshot(run_copy) == before


def test_resume_from_corrupt_checkpoint(capsys, run_copy, bytes_data):
    """Guards a truncated checkpoint: one-line error and the run directory left as it was."""
    ckpt = next((run_copy / "checkpoints").glob("step-*.pt"))
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = snapshot(run_copy)
    rc, _, err = run_cli(capsys, train_args(bytes_data, run_copy, "--resume", "auto", "--max-steps", 60))
    assert_one_line_error(rc, err, "corrupt")
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------- generate / eval errors


def test_checkpoint_of_another_model(capsys, run_copy):
    """Guards loading weights into a model of another shape (d_model 64 weights, config says 96)."""
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert cfg["model"]["d_model"] == 64
    cfg["model"]["d_model"] = 96
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = snapshot(run_copy)
    rc, out, err = run_cli(capsys, ["generate", run_copy, "--prompt", "The"])
    assert_one_line_error(rc, err, "belongs to another model")
    assert out == ""
    rc, out, err = run_cli(capsys, ["eval", run_copy])
    assert_one_line_error(rc, err, "belongs to another model")
    # without the exported weights, the training checkpoint is checked the same way
    (run_copy / "model.safetensors").unlink()
    rc, out, err = run_cli(capsys, ["generate", run_copy, "--prompt", "The"])
    assert_one_line_error(rc, err, "belongs to another model")
    before.pop("model.safetensors")
    assert snapshot(run_copy) == before


def test_corrupt_safetensors(capsys, run_copy):
    """Guards a truncated weights file surfacing as a traceback."""
    st = run_copy / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    rc, out, err = run_cli(capsys, ["generate", run_copy, "--prompt", "The"])
    assert_one_line_error(rc, err, "corrupt")
    assert out == ""
    rc, out, err = run_cli(capsys, ["eval", run_copy, "--json"])
    assert_one_line_error(rc, err, "corrupt")
    assert out == ""


def test_prompt_longer_than_context(capsys, trained_run):
    """Guards an over-long prompt: a one-line error before anything is printed."""
    rc, out, err = run_cli(capsys, ["generate", trained_run[0], "--prompt", "x" * 5000, "--temperature", 0])
    assert_one_line_error(rc, err, "context")
    assert out == ""


def test_bad_sampling_arguments(capsys, trained_run):
    """Guards invalid sampling settings reaching the sampler."""
    for extra in (["--temperature", "-1"], ["--top-p", "1.5"], ["--top-k", "-2"], ["--max-bytes", "-1"]):
        rc, out, err = run_cli(capsys, ["generate", trained_run[0], "--prompt", "The", *extra])
        assert_one_line_error(rc, err)
        assert out == ""


def test_eval_missing_run_and_missing_text_file(capsys, tmp_path, trained_run):
    """Guards eval on a nonexistent run dir and a missing --text-file."""
    rc, out, err = run_cli(capsys, ["eval", tmp_path / "no-such-run"])
    assert_one_line_error(rc, err, "no run directory")
    assert not (tmp_path / "no-such-run").exists()
    rc, out, err = run_cli(capsys, ["eval", trained_run[0], "--text-file", tmp_path / "missing.txt"])
    assert_one_line_error(rc, err, "text file not found")
    assert out == ""


# ---------------------------------------------------------------- working commands


@pytest.mark.parametrize(
    "argv",
    [[], ["data"], ["data", "prepare"], ["train"], ["train", "lm"], ["eval"], ["generate"], ["demo"]],
)
def test_help_exits_zero(capsys, argv):
    """Guards broken argument parsers: every command's --help prints usage and exits 0."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sentcode")


def test_generate_greedy_is_deterministic(capsys, trained_run):
    """Guards nondeterministic greedy decoding in the CLI (and seeded sampling)."""
    args = ["generate", trained_run[0], "--prompt", "The people", "--max-bytes", 40]
    rc1, out1, err1 = run_cli(capsys, args + ["--temperature", 0])
    rc2, out2, err2 = run_cli(capsys, args + ["--temperature", 0])
    assert rc1 == rc2 == 0 and err1 == err2 == ""
    assert out1 == out2 and out1.startswith("The people") and len(out1.encode()) == len("The people") + 40 + 1
    no_cache = run_cli(capsys, args + ["--temperature", 0, "--no-cache"])[1]
    assert no_cache == out1
    s1 = run_cli(capsys, args + ["--seed", 4])[1]
    s2 = run_cli(capsys, args + ["--seed", 4])[1]
    s3 = run_cli(capsys, args + ["--seed", 5])[1]
    assert s1 == s2 and s1 != s3


def test_eval_json(capsys, trained_run, tmp_path):
    """Guards the machine-readable eval output: one JSON object with bpb, bytes and tokens."""
    rc, out, err = run_cli(capsys, ["eval", trained_run[0], "--json"])
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    assert {"bpb", "bytes", "tokens"} <= result.keys()
    meta = DataDir(json.loads((trained_run[0] / "run.json").read_text())["data_dir"]).meta
    assert result["bytes"] == meta["splits"]["test"]["bytes"] and result["tokens"] == meta["splits"]["test"]["tokens"]
    assert 0 < result["bpb"] < 8
    rc, out, err = run_cli(capsys, ["eval", trained_run[0], "--split", "val"])
    assert rc == 0 and "bits per byte" in out
    f = tmp_path / "t.txt"
    f.write_text("The President spoke to the Congress.")
    rc, out, err = run_cli(capsys, ["eval", trained_run[0], "--text-file", f, "--json"])
    r = json.loads(out)
    assert rc == 0 and r["bytes"] == len("The President spoke to the Congress.") and r["tokens"] == r["bytes"] + 1
