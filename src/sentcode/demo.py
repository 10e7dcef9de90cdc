"""The main job: prepare the default corpus, train the tiny flat byte LM, evaluate it, sample from it."""

from __future__ import annotations

import json
from pathlib import Path

from sentcode.data import DataDir, prepare_data
from sentcode.errors import DataError

PROMPTS = ["The state of the Union is", "We must", "Our economy"]


def _data_dir(out: Path, corpus: str) -> Path:
    d = out / "data-bytes"
    try:
        if DataDir(d).meta.get("corpus") == corpus:
            return d  # prepared earlier from the same corpus
    except DataError:
        pass
    prepare_data(corpus, d, tokenizer="bytes")
    return d


def run_demo(out: str | Path = "runs/demo", corpus: str = "sotu", minutes: float = 3.0) -> dict:
    import sentcode
    from sentcode.eval.run import evaluate_run
    from sentcode.train.lm import train_lm

    out = Path(out)
    data = _data_dir(out, corpus)
    run = out / "lm-tiny-bytes"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    print(f"training the tiny flat byte LM for {minutes:g} minutes on {corpus}")
    train_lm(data, run, preset="tiny", overrides=[f"train.time_budget_s={minutes * 60}", "train.max_steps=100000",
                                                  "train.eval_every=0", "train.final_eval=false"])
    g = sentcode.load(run)
    result = evaluate_run(g, split="test")
    print(f"\nheld-out test bits per byte: {result['bpb']:.4f} over {result['bytes']:,} bytes "
          f"(gzip -9 on this corpus: 2.66, bz2 -9: 1.81)")
    for i, prompt in enumerate(PROMPTS):
        text = g.generate(prompt, max_bytes=160, temperature=0.7, seed=i)
        print(f"\n> {prompt}{text}")
    (run / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nrun directory: {run}")
    return result


def run_sentence_demo(out: str | Path = "runs/demo", corpus: str = "sotu") -> dict:
    """The sentence-step counterpart: build the tiny sentence pipeline (cached: a second run only evaluates
    and samples), print its two-part evaluation and closed-loop continuations."""
    import sentcode
    from sentcode.eval.sentence import format_sentence_result
    from sentcode.pipeline import run_pipeline

    run = Path(out) / "sentence-tiny"
    print(f"building the tiny sentence-step LM on {corpus} (about 12 minutes on 2 CPU cores; stages are cached)")
    result = run_pipeline(corpus, run, preset="sentence-tiny")
    print("\n" + format_sentence_result(result["eval"]))
    g = sentcode.load(run)
    for prompt in ("The state of the Union is strong.", "We must act now.", "Our economy is growing."):
        print(f"\n> {prompt} {g.generate(prompt, max_sentences=3, temperature=0.7, seed=0)}")
    print(f"\nrun directory: {run}")
    return result
