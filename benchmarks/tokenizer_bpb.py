"""Unigram against BPE at the same vocabulary size: bytes per token, and the bits per byte of the same flat LM
trained on each for the same number of steps.

    python benchmarks/tokenizer_bpb.py [--vocab-size 2048] [--steps 400] [--corpus sotu ../shared/data/tinyshakespeare]

For each corpus, both tokenizers are trained on its train split (``sentcode data prepare --tokenizer bpe|unigram``),
then the ``tiny`` preset trains the same number of steps on each (the same model shape and the same tokens per
step: equal compute, whatever else the machine is doing; Unigram's tokens are shorter, so it sees fewer bytes).
Reported: bytes per token on the test split, the held-out test bits per byte, training seconds. Writes
results/tokenizer_bpb.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

import sentcode  # noqa: E402
from sentcode.data import DataDir, prepare_data  # noqa: E402
from sentcode.eval.run import evaluate_run  # noqa: E402
from sentcode.train.lm import train_lm  # noqa: E402

WORK = Path(__file__).parent / "work" / "tokenizer_bpb"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", default=["sotu", str(Path(__file__).parents[2] / "shared/data/tinyshakespeare")])
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    rows = []
    for corpus in args.corpus:
        label = Path(corpus).name
        for kind in ("bpe", "unigram"):
            data = WORK / f"{label}-{kind}"
            t = time.perf_counter()
            prepare_data(corpus, data, tokenizer=kind, vocab_size=args.vocab_size, progress=False)
            prep_s = time.perf_counter() - t
            split = DataDir(data).meta["splits"]["test"]
            run = WORK / f"run-{label}-{kind}"
            summary = train_lm(data, run, preset=args.preset, progress="plain",
                               overrides=[f"train.max_steps={args.steps}", "train.time_budget_s=0",
                                          "train.eval_every=0", "train.save_every=0", "train.log_every=100"])
            result = evaluate_run(sentcode.load(run), split="test")
            rows.append({"corpus": label, "tokenizer": kind, "vocab_size": args.vocab_size,
                         "test_bytes_per_token": split["bytes"] / (split["tokens"] - split["documents"]),
                         "test_bpb": result["bpb"], "steps": summary["step"],
                         "train_seconds": summary["train_elapsed"], "prepare_seconds": prep_s})
            print(f"{label} {kind}: {rows[-1]['test_bytes_per_token']:.2f} bytes/token, test bpb "
                  f"{result['bpb']:.4f} after {summary['step']} steps ({summary['train_elapsed']:.0f} s)")
    out = save("tokenizer_bpb", {"args": vars(args), "rows": rows})
    print(f"machine: {machine()}\nwrote {out}")


if __name__ == "__main__":
    main()
