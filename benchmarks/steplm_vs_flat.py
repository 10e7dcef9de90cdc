"""The end-to-end sentence-step LM against the flat byte LM: equal parameters, equal training wall-clock, both
trained at once (one thread each, side by side), then test bits per byte on the same bytes and batch-1
generation speed (both with their KV caches, 2 threads, one after the other, median of 3 after a warm-up).

    python benchmarks/steplm_vs_flat.py --minutes 5 [--set model.levels=4 ...] [--backend torch onnx] [--name NAME]
    python benchmarks/steplm_vs_flat.py --batch-speed NAME [--work DIR]  # add batch-1 and batch-8 speeds
    python benchmarks/steplm_vs_flat.py --blind NAME [--work DIR]   # add the renderer-alone figure to an earlier result

Writes benchmarks/results/NAME.json and prints a table. The renderer-alone figure (planner states shuffled
across segments, no codes) says what the planner's state tells the renderer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

PROMPT = "The state of the Union is strong. We have"


def train_flat(work: Path, corpus: str, minutes: float, precision: str, extra: list[str]) -> None:
    from sentcode.data import prepare_data
    from sentcode.train.lm import train_lm

    data = work / "data-bytes"
    if not (data / "meta.json").exists():
        prepare_data(corpus, data, tokenizer="bytes")
    train_lm(data, work / "flat", preset="tiny", progress="plain",
             overrides=[f"train.time_budget_s={minutes * 60}", "train.max_steps=1000000", "train.eval_every=0",
                        "train.final_eval=false", "train.save_every=0", f"train.precision={precision}", *extra])


def train_step(work: Path, corpus: str, minutes: float, precision: str, preset: str, extra: list[str]) -> None:
    from sentcode.train.steplm import train_steplm

    train_steplm(corpus, work / "steplm", preset=preset, progress="plain",
                 overrides=[f"train.time_budget_s={minutes * 60}", "train.max_steps=1000000", "train.eval_every=0",
                            "train.final_eval=false", "train.save_every=0", f"train.precision={precision}", *extra])


def speed(fn, runs: int = 3) -> float:
    fn(100)  # warm-up
    rates = []
    for seed in range(runs):
        t = time.perf_counter()
        n = len(fn(seed).encode())
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def blind_bpb(run_dir: Path) -> float:
    """Test bpb of the run's renderer with planner states shuffled across segments and no codes."""
    import torch

    import sentcode
    from sentcode.data.segments import SegmentSplit
    from sentcode.eval.steplm import evaluate_segments

    torch.set_num_threads(2)
    g = sentcode.load(run_dir)
    return evaluate_segments(g.model, SegmentSplit.load(run_dir / "data" / "test.npz"), g.device,
                             modes=("blind",))["render_bpb_blind"]


def add_blind(name: str, work: str) -> None:
    from common import RESULTS

    path = RESULTS / f"{name}.json"
    out = json.loads(path.read_text())
    work = Path(out.get("work", work))  # older results did not record their work directory
    out["rows"]["steplm"]["bpb_renderer_alone"] = b = blind_bpb(work / "steplm")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{name}: renderer alone {b:.4f} bpb against {out['rows']['steplm']['bpb']:.4f} with the planner")


def add_batch_speed(name: str, work: str, batches=(1, 8)) -> None:
    """Bytes/s of B documents written together (2 threads, median of 3 after a warm-up): the end-to-end model's
    ``generate_batch`` (3 segments each, temperature 0.8) and the flat LM decoding B rows over one KV cache for
    as many bytes per document as the sentence-step model wrote."""
    import torch

    import sentcode
    from common import RESULTS
    from sentence_speed import flat_batch

    torch.set_num_threads(2)
    path = RESULTS / f"{name}.json"
    out = json.loads(path.read_text())
    work = Path(out.get("work", work))
    flat, step = sentcode.load(work / "flat"), sentcode.load(work / "steplm")
    for b in batches:
        rates, sizes = [], []
        for seed in range(4):  # the first is the warm-up
            t = time.perf_counter()
            texts = step.generate_batch([PROMPT] * b, max_sentences=3, temperature=0.8, seed=seed)
            n = sum(len(x.encode()) for x in texts)
            if seed:
                rates.append(n / (time.perf_counter() - t))
                sizes.append(n / b)
        per_doc = max(16, round(statistics.mean(sizes)))
        flat_rates = [b * per_doc / flat_batch(flat.model, PROMPT.encode(), b, per_doc, seed=s)[-1] for s in range(4)][1:]
        out["rows"]["steplm"][f"bytes_s_b{b}"] = statistics.median(rates)
        out["rows"]["flat"][f"bytes_s_b{b}"] = statistics.median(flat_rates)
        print(f"batch {b}: steplm {statistics.median(rates):8.1f} B/s, flat {statistics.median(flat_rates):8.1f} B/s "
              f"({statistics.median(rates) / statistics.median(flat_rates):.2f}x; {per_doc} bytes per document)")
    path.write_text(json.dumps(out, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--corpus", default="sotu")
    ap.add_argument("--preset", default="sentence-tiny")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="steplm config override")
    ap.add_argument("--flat-set", action="append", default=[], help="flat LM config override")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--work", default="benchmarks/work/steplm_vs_flat")
    ap.add_argument("--name", default="steplm_vs_flat")
    ap.add_argument("--role", choices=["flat", "steplm"], help=argparse.SUPPRESS)
    ap.add_argument("--blind", metavar="NAME", help="add the renderer-alone test bpb to results/NAME.json")
    ap.add_argument("--batch-speed", metavar="NAME", help="add batch 1 and 8 generation speeds to results/NAME.json")
    ap.add_argument("--backend", nargs="+", default=["torch"], choices=["torch", "onnx"],
                    help="generation backends whose batch-1 speed is measured (default torch; onnx: the checked "
                         "exports, extra 'onnx')")
    args = ap.parse_args()
    if args.blind:
        return add_blind(args.blind, args.work)
    if args.batch_speed:
        return add_batch_speed(args.batch_speed, args.work)
    work = Path(args.work)
    if args.role == "flat":
        return train_flat(work, args.corpus, args.minutes, args.precision, args.flat_set)
    if args.role == "steplm":
        return train_step(work, args.corpus, args.minutes, args.precision, args.preset, args.overrides)

    import shutil

    for d in ("flat", "steplm"):
        shutil.rmtree(work / d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, __file__, "--minutes", str(args.minutes), "--corpus", args.corpus, "--preset", args.preset,
            "--precision", args.precision, "--work", str(work)]
    base += [x for o in args.overrides for x in ("--set", o)] + [x for o in args.flat_set for x in ("--flat-set", o)]
    if not (work / "data-bytes" / "meta.json").exists():  # prepare once, before the clocks start
        subprocess.run(base + ["--role", "flat", "--minutes", "0.001"], env=env, check=True)
        shutil.rmtree(work / "flat", ignore_errors=True)
    t0 = time.time()
    procs = [subprocess.Popen(base + ["--role", r], env=env,
                              stdout=open(work / f"{r}.log", "w"), stderr=subprocess.STDOUT) for r in ("flat", "steplm")]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"training failed ({codes}); see {work}/flat.log and {work}/steplm.log")
    wall = time.time() - t0

    import torch

    import sentcode
    from sentcode.eval.run import evaluate_run

    torch.set_num_threads(2)
    flat = sentcode.load(work / "flat")
    flat_eval = evaluate_run(flat, split="test")
    step = sentcode.load(work / "steplm")
    step_eval = json.loads((work / "steplm" / "eval.json").read_text())
    flat_summary = json.loads((work / "flat" / "train_summary.json").read_text())
    step_summary = json.loads((work / "steplm" / "train_summary.json").read_text())
    rows = {
        "flat": {"params": sum(p.numel() for p in flat.model.parameters()), "bpb": flat_eval["bpb"],
                 "steps": flat_summary["step"], "bytes_seen": flat_summary["tokens_seen"],
                 "sample": flat.generate(PROMPT, max_bytes=300, temperature=0.7, seed=0)},
        "steplm": {"params": step.model.num_params(), "bpb": step_eval["bpb"], "eval": step_eval,
                   "steps": step_summary["step"], "positions_seen": step_summary["tokens_seen"],
                   "sample": step.generate(PROMPT, max_sentences=2, temperature=0.7, seed=0)},
    }
    for backend in args.backend:  # the two models one after the other on each backend
        f, g = (flat, step) if backend == "torch" else (sentcode.load(work / "flat", backend=backend),
                                                        sentcode.load(work / "steplm", backend=backend))
        key = "bytes_s" if backend == "torch" else f"bytes_s_{backend}"
        rows["flat"][key] = speed(lambda s: f.generate(PROMPT, max_bytes=400, temperature=0.8, seed=s))
        rows["steplm"][key] = speed(lambda s: g.generate(PROMPT, max_sentences=3, temperature=0.8, seed=s))
    rows["steplm"]["bpb_renderer_alone"] = blind_bpb(work / "steplm")
    if step.codes:
        rows["steplm"]["bytes_s_rerank4"] = speed(
            lambda s: step.generate(PROMPT, max_sentences=3, temperature=0.8, seed=s, rerank=4))
    ratio = rows["steplm"]["bpb"] / rows["flat"]["bpb"]
    speedups = {b: rows["steplm"][k] / rows["flat"][k] for b in args.backend
                for k in ["bytes_s" if b == "torch" else f"bytes_s_{b}"]}
    out = {"command": " ".join(sys.argv), "work": str(work), "minutes": args.minutes, "precision": args.precision,
           "train_wall_s": wall, "overrides": args.overrides, "rows": rows, "bpb_ratio": ratio,
           "speedup_b1": speedups.get("torch"), "speedup_b1_by_backend": speedups}
    path = save(args.name, out)
    print(f"\n{machine()}")
    for name, r in rows.items():
        speeds = "  ".join(f"{k} {v:8.1f}" for k, v in r.items() if k.startswith("bytes_s") and k != "bytes_seen")
        print(f"{name:8s} params {r['params']:>10,}  test bpb {r['bpb']:.4f}  steps {r['steps']:>6}  {speeds}")
        print(f"         sample: {PROMPT}{r['sample']!r}")
    if "refund_ratio" in step_eval:
        print(f"steplm: plan {step_eval['plan_bpb']:.4f}, render oracle {step_eval['render_bpb_oracle']:.4f}, "
              f"shuffled {step_eval['render_bpb_shuffled']:.4f}, none {step_eval['render_bpb_none']:.4f}, "
              f"refund {step_eval['refund_ratio']:.3f}")
    print(f"bpb ratio steplm/flat {ratio:.3f}; batch-1 speed ratio "
          f"{', '.join(f'{v:.2f}x ({b})' for b, v in speedups.items())}; results in {path}")


if __name__ == "__main__":
    main()
