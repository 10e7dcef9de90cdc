"""The `sentcode` lm-eval model end to end on the bundled offline tasks, checked against sentcode.infer.scoring."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest

import sentcode
from sentcode.infer import scoring
from sentcode.lmeval import TASKS_DIR

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'sentcode[lmeval]')")


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / name).read_text().splitlines() if line.strip()]


def check_against_scoring(gen, results: dict, samples: dict) -> None:
    """Metric values are real numbers in range, and equal what the scoring API gives."""
    from sentcode.lmeval.model import generate_text

    res = results["sentcode_sotu_mc"]
    mc = read_jsonl("sotu_mc.jsonl")
    for key in ("acc,none", "acc_norm,none"):
        assert 0.0 <= res[key] <= 1.0
        assert res[key] * len(mc) == pytest.approx(round(res[key] * len(mc)))  # a share of the 13 items
    # One item: every choice's log-likelihood, and acc as the argmax.
    first = next(s for s in samples["sentcode_sotu_mc"] if s["doc_id"] == 0)
    expected = scoring.loglikelihood_batch(gen, [(mc[0]["context"], " " + c) for c in mc[0]["choices"]])
    got = [float(r[0][0]) for r in first["resps"]]
    assert got == pytest.approx([ll for ll, _ in expected], abs=1e-4)
    assert first["acc"] == float(max(range(len(got)), key=got.__getitem__) == mc[0]["answer"])
    # Rolling log-likelihood: lm-eval's bits per byte over the three passages is sentcode's.
    texts = [d["text"] for d in read_jsonl("sotu_ppl.jsonl")]
    ppl = results["sentcode_sotu_ppl"]
    nats = -sum(scoring.loglikelihood_rolling_batch(gen, texts))
    n_bytes = sum(len(t.encode()) for t in texts)
    assert ppl["bits_per_byte,none"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
    assert ppl["byte_perplexity,none"] == pytest.approx(2 ** ppl["bits_per_byte,none"], rel=1e-6)
    assert 0 < ppl["bits_per_byte,none"] < 16
    # Generation: the reply lm-eval got is the greedy one, cut at the first stop string.
    gen_res = results["sentcode_sotu_gen"]
    assert gen_res["exact_match,first_word"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    items = read_jsonl("sotu_gen.jsonl")
    sample = next(s for s in samples["sentcode_sotu_gen"] if s["doc_id"] == 0)
    reply = generate_text(gen, items[0]["context"], ["\n", ".", ","], 24)
    assert sample["resps"][0][0] == reply
    assert not any(stop in reply for stop in ("\n", ".", ","))


def test_flat_run_through_the_command(trained_run, tmp_path, capsys):
    """`sentcode lm-eval ...` runs lm-eval's own command line with the model registered and the tasks included."""
    from sentcode.cli import main

    run = trained_run[0]
    # The README's command, on the test run, with the samples written out for the checks below.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (command,) = [line for line in readme.splitlines() if line.startswith("sentcode lm-eval --model sentcode")]
    argv = shlex.split(command.replace("run=runs/tiny", f"run={run}"))[1:]
    rc = main(argv + ["--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "out")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sentcode_sotu_mc" in printed and "bits_per_byte" in printed
    results_file = next((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]
    samples = {}
    for task in ("sentcode_sotu_mc", "sentcode_sotu_gen", "sentcode_sotu_ppl"):
        path = next((tmp_path / "out").rglob(f"samples_{task}_*.jsonl"))
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    check_against_scoring(sentcode.load(run), results, samples)
    # Flat LM: the rolling log-likelihood is the same pass as `sentcode eval`'s bits per byte.
    text = read_jsonl("sotu_ppl.jsonl")[0]["text"]
    ll = scoring.loglikelihood_rolling(sentcode.load(run), text)
    assert -ll / math.log(2) / len(text.encode()) == pytest.approx(sentcode.load(run).score(text), rel=1e-6)


def test_sentence_run_through_simple_evaluate(sentence_run):
    """In Python: import sentcode.lmeval.model (registers "sentcode"), then lm-eval's simple_evaluate."""
    import sentcode.lmeval.model  # noqa: F401
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="sentcode", model_args=f"run={sentence_run}", tasks=["sentcode_sotu"],
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                          device="cpu", log_samples=True)
    assert out["config"]["sentcode_family"] == "sentence"
    check_against_scoring(sentcode.load(sentence_run), out["results"], out["samples"])
    mc = next(s for s in out["samples"]["sentcode_sotu_mc"] if s["doc_id"] == 0)
    assert all(r[0][1] is False for r in mc["resps"])  # the two-part approximation is never greedy
    reply = next(s for s in out["samples"]["sentcode_sotu_gen"] if s["doc_id"] == 0)["resps"][0][0]
    assert reply == "" or reply.startswith(" ")  # whole sentences after the pipeline's separator


def test_help_and_bad_model_args(trained_run, capsys):
    from sentcode.cli import main
    from sentcode.errors import SentcodeError
    from sentcode.lmeval.model import SentcodeLM

    assert main(["lm-eval", "--help"]) == 0
    assert "--model sentcode --model_args run=" in capsys.readouterr().out
    # Raised while lm-eval builds the model; `sentcode lm-eval` prints it as one "error: ..." line.
    missing = str(Path(trained_run[0]).with_name("missing"))
    with pytest.raises(SentcodeError, match="no run directory at"):
        SentcodeLM(run=missing)
    with pytest.raises(SentcodeError, match="unknown --model_args pretrained"):
        SentcodeLM(run=str(trained_run[0]), pretrained="gpt2")
    with pytest.raises(SentcodeError, match="needs --model_args run=RUN_DIR"):
        SentcodeLM()


def test_entry_point_is_declared():
    """lm-eval releases with plugin discovery resolve --model sentcode through this entry point."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "sentcode"]
    from sentcode.lmeval.model import SentcodeLM

    assert ep.load() is SentcodeLM
