"""Generation speed of the flat byte LM at batch 1: bytes/s with and without the KV cache.

    python benchmarks/generation_speed.py [--run RUN_DIR] [--lengths 256 1024 4096] [--repeats 3]

Speed does not depend on what the weights are, so without --run a freshly initialised tiny byte model is used.
Generation runs the full length (no stop token); median of --repeats runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

import sentcode  # noqa: E402
from sentcode.config import load_config  # noqa: E402
from sentcode.infer.engine import generate_ids  # noqa: E402
from sentcode.models.lm import LM  # noqa: E402


def time_generation(model, n: int, use_cache: bool, repeats: int) -> float:
    prompt = [257] + list(b"The state of the Union")
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        count = sum(1 for _ in generate_ids(model, prompt, n, temperature=0.8, seed=i, use_cache=use_cache))
        assert count == n
        if i:
            times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a trained byte-level run directory (default: untrained tiny)")
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-uncached", type=int, default=4096, help="skip uncached runs longer than this")
    args = ap.parse_args()
    if args.run:
        model = sentcode.load(args.run).model
    else:
        torch.manual_seed(0)
        model = LM(load_config("tiny").model).eval()
    rows = []
    for n in args.lengths:
        row = {"bytes": n, "context": model.cfg.max_seq_len}
        row["cached_bytes_s"] = time_generation(model, n, True, args.repeats)
        if n <= args.max_uncached:
            row["uncached_bytes_s"] = time_generation(model, n, False, args.repeats)
        rows.append(row)
        print(f"{n:5d} bytes: KV cache {row['cached_bytes_s']:8.1f} B/s   no cache "
              f"{row.get('uncached_bytes_s', float('nan')):8.1f} B/s", flush=True)
    out = save("generation_speed", {"rows": rows, "params": sum(p.numel() for p in model.parameters()),
                                    "run": args.run})
    print(f"machine: {machine()}\nwrote {out}")


if __name__ == "__main__":
    main()
