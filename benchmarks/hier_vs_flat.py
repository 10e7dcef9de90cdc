"""The hierarchical byte autoencoder (each segmenter) against the flat byte LM and the sentence-step LM: about
equal parameters, equal training wall-clock (two runs at a time, one thread each, every pair side by side),
then test bits per byte on the same bytes (2 threads), the autoencoder's figures, and batch-1 generation speed (KV caches
on, 2 threads, one model after the other, median of 3 after a warm-up).

    python benchmarks/hier_vs_flat.py --minutes 5 [--models flat,hier-space,...] [--name NAME]

Writes benchmarks/results/NAME.json and prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402
from steplm_vs_flat import PROMPT, speed, train_flat  # noqa: E402

# name -> (preset, overrides). Each autoencoder names its segmenter and quantizer, so that a change of the
# preset's defaults does not change what an earlier result's name stood for.
VQ = ["model.quantizer=vq", "model.levels=1", "model.codebook_size=1024", "model.vq_norm=running"]
ENTROPY = ["data.segmenter=entropy", "data.entropy_mode=global", "data.segment_bytes=6"]
AE = ["model.context_dropout=1", "model.code_dropout=0"]  # every segment from the state, its code, its own bytes


def _fsq(levels: int, size: int) -> list[str]:
    return ["model.quantizer=fsq", f"model.levels={levels}", f"model.codebook_size={size}"]


MODELS = {  # trained two at a time in this order: the flat LM beside the default autoencoder
    "flat": ("tiny", []),
    "hier-tiny": ("hier-tiny", []),  # the preset as it is
    "hier-space": ("hier-tiny", ["data.segmenter=space", *VQ]),
    "steplm": ("sentence-tiny", []),
    "hier-entropy": ("hier-tiny", [*ENTROPY, *VQ]),
    "hier-relative": ("hier-tiny", ["data.segmenter=entropy", "data.entropy_mode=relative", "data.segment_bytes=6",
                                    *VQ]),
    "hier-stride": ("hier-tiny", ["data.segmenter=stride", "data.segment_bytes=6", *VQ]),
    "hier-ae": ("hier-tiny", [*ENTROPY, *VQ, *AE]),
    "steplm-codes": ("sentence-tiny", ["model.levels=2"]),  # sentence codes learned in the same run
    # finite scalar quantization instead of the EMA codebook: 5 coordinates of 4 values (10 bits, as 1,024 codes),
    # 8 of 4 (16 bits), 8 of 8 (24 bits)
    "hier-fsq": ("hier-tiny", [*ENTROPY, *_fsq(5, 4), "model.vq_norm=running"]),
    "hier-fsq16": ("hier-tiny", [*ENTROPY, *_fsq(8, 4), "model.vq_norm=running"]),
    "hier-ae-fsq16": ("hier-tiny", [*ENTROPY, *_fsq(8, 4), "model.vq_norm=running", *AE]),
    "hier-ae-fsq24": ("hier-tiny", [*ENTROPY, *_fsq(8, 8), "model.vq_norm=running", *AE]),
}
# the same, standardising each training batch by its own statistics and calibrating them once trained
for _name in ("hier-ae", "hier-ae-fsq16", "hier-ae-fsq24", "hier-fsq16", "hier-entropy"):
    MODELS[_name + "-b"] = (MODELS[_name][0], MODELS[_name][1] + ["model.vq_norm=batch"])


def train_one(work: Path, name: str, corpus: str, minutes: float, precision: str, extra: list[str]) -> None:
    preset, sets = MODELS[name]
    if name == "flat":
        return train_flat(work, corpus, minutes, precision, [])
    from sentcode.train.hier import train_hier
    from sentcode.train.steplm import train_steplm

    train = train_steplm if name.startswith("steplm") else train_hier
    train(corpus, work / name, preset=preset, progress="plain", evaluate_test=False,
          overrides=[f"train.time_budget_s={minutes * 60}", "train.max_steps=1000000", "train.eval_every=0",
                     "train.final_eval=false", "train.save_every=0", f"train.precision={precision}", *sets,
                     *(extra if name.startswith("hier") else [])])


def evaluate(g, name: str, run: Path) -> dict:
    """Test-split figures: the flat LM's full pass; the others' full pass over their segments (the autoencoder
    with the true-code and no-code passes only: the predicted- and shuffled-code passes are diagnostics)."""
    from sentcode.data.segments import SegmentSplit
    from sentcode.eval.hier import evaluate_hier
    from sentcode.eval.run import evaluate_run
    from sentcode.eval.steplm import evaluate_segments

    if name == "flat":
        return evaluate_run(g, split="test")
    test = SegmentSplit.load(run / "data" / "test.npz")
    if name.startswith("steplm"):
        return evaluate_segments(g.model, test, g.device)
    return evaluate_hier(g.model, test, g.device, quick=True)


def row(work: Path, name: str) -> dict:
    import sentcode

    run = work / name
    g = sentcode.load(run)
    summary = json.loads((run / "train_summary.json").read_text())
    t = time.time()
    ev = evaluate(g, name, run)
    ev["eval_s"] = time.time() - t
    if isinstance(ev.get("source"), str):  # results name paths relative to the project, not this machine's
        ev["source"] = ev["source"].replace(f"{Path.cwd()}/", "")
    if name == "flat":
        gen = lambda s: g.generate(PROMPT, max_bytes=300, temperature=0.8, seed=s)  # noqa: E731
    else:
        n = 3 if name.startswith("steplm") else 50  # about 300 bytes either way
        gen = lambda s: g.generate(PROMPT, max_sentences=n, temperature=0.8, seed=s)  # noqa: E731
    return {"params": sum(p.numel() for p in g.model.parameters()), "bpb": ev["bpb"], "eval": ev,
            "steps": summary["step"], "bytes_s": speed(gen), "sample": gen(0)[:300]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--corpus", default="sotu")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="override for every hier model")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--work", default="benchmarks/work/hier_vs_flat")
    ap.add_argument("--name", default="hier_vs_flat")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    names = args.models.split(",")
    if unknown := set(names) - set(MODELS):
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    if args.role:
        return train_one(work, args.role, args.corpus, args.minutes, args.precision, args.overrides)

    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, __file__, "--minutes", str(args.minutes), "--corpus", args.corpus, "--precision",
            args.precision, "--work", str(work)] + [x for o in args.overrides for x in ("--set", o)]
    if "flat" in names and not (work / "data-bytes" / "meta.json").exists():  # prepare before the clocks start
        subprocess.run(base + ["--role", "flat", "--minutes", "0.001"], env=env, check=True)
    t0 = time.time()
    for i in range(0, len(names), 2):  # two at a time, one thread each
        pair = names[i:i + 2]
        for n in pair:
            shutil.rmtree(work / n, ignore_errors=True)
        procs = [subprocess.Popen(base + ["--role", n], env=env, stdout=open(work / f"{n}.log", "w"),
                                  stderr=subprocess.STDOUT) for n in pair]
        if any(p.wait() for p in procs):
            raise SystemExit(f"training failed; see the logs in {work}")
    wall = time.time() - t0

    import torch

    torch.set_num_threads(2)
    rows = {n: row(work, n) for n in names}
    flat = rows.get("flat")
    out = {"command": " ".join(sys.argv), "work": str(work), "minutes": args.minutes, "precision": args.precision,
           "wall_s": wall, "overrides": args.overrides, "rows": rows}
    path = save(args.name, out)
    print(f"\n{machine()}")
    print(f"{'model':14s} {'params':>10s} {'test bpb':>9s} {'x flat':>7s} {'bytes/s':>8s} {'x flat':>7s} "
          f"{'B/seg':>6s} {'bits':>5s} {'byte acc':>8s} {'seg exact':>9s} {'plan':>6s} {'oracle':>7s} {'none':>6s}")
    for n, r in rows.items():
        ev = r["eval"]
        rel = f"{r['bpb'] / flat['bpb']:7.3f}" if flat else "      -"
        fast = f"{r['bytes_s'] / flat['bytes_s']:7.2f}" if flat else "      -"
        extra = ""
        if "byte_accuracy" in ev:
            extra = (f" {ev['bytes_per_segment']:6.2f} {ev['code_bits_per_segment']:5.1f} {ev['byte_accuracy']:8.2%} {ev['segments_exact']:9.2%} "
                     f"{ev['plan_bpb']:6.3f} {ev['render_bpb_oracle']:7.3f} {ev.get('render_bpb_none', 0):6.3f}")
        print(f"{n:14s} {r['params']:>10,} {r['bpb']:9.4f} {rel} {r['bytes_s']:8.1f} {fast}{extra}")
    for n, r in rows.items():
        print(f"{n}: {PROMPT}{r['sample']!r}")
    print(f"results in {path}")


if __name__ == "__main__":
    main()
