"""Held-out bits per byte after a fixed wall-clock of training, and the curve of bpb against time.

    python benchmarks/quality.py --minutes 10 --tokenizer bytes --preset tiny [--set key=value ...]

Prepares the default corpus (cached under benchmarks/work/), trains with a wall-clock budget (evaluation time
excluded), evaluates periodically on a capped slice of the validation split, then scores the full test split.
Writes results/quality_<name>.json and results/quality_<name>.png. For reference it also compresses the same
test text with gzip -9, bz2 -9 and xz -9e.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, save  # noqa: E402

import sentcode  # noqa: E402
from sentcode.data import DataDir, prepare_data  # noqa: E402
from sentcode.errors import DataError  # noqa: E402
from sentcode.eval.run import evaluate_run  # noqa: E402
from sentcode.train.lm import train_lm  # noqa: E402

WORK = Path(__file__).parent / "work"


def data_dir(corpus: str, tokenizer: str, vocab: int) -> Path:
    d = WORK / f"{corpus}-{tokenizer}{vocab if tokenizer == 'bpe' else ''}"
    try:
        DataDir(d)
        return d
    except DataError:
        prepare_data(corpus, d, tokenizer=tokenizer, vocab_size=vocab)
        return d


def compressor_bpb(text: bytes) -> dict:
    sizes = {"gzip-9": len(gzip.compress(text, 9)), "bz2-9": len(bz2.compress(text, 9)),
             "xz-9e": len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME))}
    return {k: v * 8 / len(text) for k, v in sizes.items()}


def plot(curves: dict, refs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    for (name, v), style in zip(refs.items(), ["--", ":", "-."]):
        ax.axhline(v, color="gray", ls=style, lw=1, label=f"{name} ({v:.3f})")
    ax.set_xlabel("training wall-clock (minutes)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(title)
    ax.set_ylim(1.0, 4.0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--corpus", default="sotu")
    ap.add_argument("--tokenizer", choices=["bytes", "bpe"], default="bytes")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--eval-interval", type=float, default=30.0, help="training seconds between evaluations")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    name = args.name or f"{args.preset}_{args.tokenizer}_{args.minutes:g}min"
    data = data_dir(args.corpus, args.tokenizer, args.vocab_size)
    run = WORK / f"run-{name}"
    if run.exists():
        shutil.rmtree(run)
    overrides = [f"train.time_budget_s={args.minutes * 60}", "train.max_steps=1000000", "train.eval_every=0",
                 f"train.eval_interval_s={args.eval_interval}", "train.eval_max_tokens=100000", "train.save_every=0",
                 "train.log_every=50", *args.overrides]
    summary = train_lm(data, run, preset=args.preset, overrides=overrides, progress="plain")
    curve = [(r["train_elapsed"] / 60, r["val_bpb"]) for r in map(json.loads, (run / "metrics.jsonl").open())
             if "val_bpb" in r]
    result = evaluate_run(sentcode.load(run), split="test")
    test_text = b"\n".join(t.encode("utf-8", "surrogateescape") for t in DataDir(data).documents("test"))
    refs = compressor_bpb(test_text)
    payload = {"name": name, "args": vars(args), "steps": summary["step"], "train_seconds": summary["train_elapsed"],
               "tokens_seen": summary["tokens_seen"], "precision": summary["precision"],
               "test_bpb": result["bpb"], "test_bytes": result["bytes"], "curve_val_bpb": curve,
               "compressors_on_test_text": refs, "compressors_on_whole_corpus": {"gzip-9": 2.660, "bz2-9": 1.811, "xz-9e": 1.834}}
    out = save(f"quality_{name}", payload)
    plot({f"{name} (val slice)": tuple(zip(*curve))} if curve else {}, {"bz2 -9, whole corpus": 1.811, "gzip -9, whole corpus": 2.660},
         RESULTS / f"quality_{name}.png", f"{args.preset} {args.tokenizer} on {args.corpus}: held-out bpb vs training time")
    print(f"{name}: {summary['step']} steps in {summary['train_elapsed']:.0f}s, test bpb {result['bpb']:.4f} "
          f"(compressors on the same test text: {', '.join(f'{k} {v:.3f}' for k, v in refs.items())})")
    print(f"machine: {machine()}\nwrote {out}")


if __name__ == "__main__":
    main()
