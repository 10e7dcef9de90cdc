"""Decode speed of one trained flat LM on every backend, side by side in one process, and what each costs in bpb.

    python benchmarks/decode_backends.py --run RUN_DIR [--steplm RUN_DIR] [--bytes 256] [--repeats 3]
        [--threads 2] [--name NAME]

Backends: ``torch`` (today's engine: ``LM`` with its KV cache), ``onnx`` (the checked fp32 export; at batch 1
its token loop runs inside one graph, ``infer/onnx_loop.py``), ``onnx-per-token`` (the same export called once per
token, the batch-1 path before the loop) and ``onnx-int8`` (weight-only int8, with the loop). The exports are written under benchmarks/work/ by ``export_run`` (so each
passed its check). Batch 1: ``generate_ids`` writing --bytes tokens at temperature 0.8 from a short prompt;
batch 8: ``generate_batch`` with 8 such requests (the server's continuous-batching loop). Backends take turns
within each repetition (A B C A B C ...) so that a noisy machine slows them alike; the median is reported.
Bits per byte: the first --bpb-tokens tokens of the run's test split, scored by each backend. --steplm: a
sentence-step (or autoencoder) run generating --segments segments per request with its renderer, planner and
encoder stacks on each backend (pooling, quantizer and sampling stay in PyTorch), bytes/s of whole requests at
batch 1.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

import sentcode  # noqa: E402
from sentcode.data import DataDir  # noqa: E402
from sentcode.eval.bpb import evaluate_bpb  # noqa: E402
from sentcode.infer.batch import BatchRequest, generate_batch  # noqa: E402
from sentcode.infer.engine import generate_ids  # noqa: E402
from sentcode.infer.export import export_run  # noqa: E402

WORK = Path(__file__).parent / "work" / "decode_backends"


def _batch1(model, prompt, n, seed):
    t = time.perf_counter()
    got = sum(1 for _ in generate_ids(model, prompt, n, temperature=0.8, seed=seed))
    assert got == n
    return n / (time.perf_counter() - t)


def _batch8(model, prompt, n, seed):
    reqs = [BatchRequest(prompt, n, temperature=0.8, seed=seed + i) for i in range(8)]
    t = time.perf_counter()
    out = generate_batch(model, reqs, max_batch=8)
    return sum(len(o) for o in out) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained flat LM run directory")
    ap.add_argument("--bytes", type=int, default=256, help="tokens generated per request (default 256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bpb-tokens", type=int, default=65536)
    ap.add_argument("--steplm", nargs="*", default=[], metavar="RUN_DIR",
                    help="also a sentence-step (or autoencoder) run, its renderer, planner and encoder on both backends")
    ap.add_argument("--segments", type=int, default=4,
                    help="segments written per request by a sentence-step run (default 4; an autoencoder run writes "
                         "its default 40 short segments)")
    ap.add_argument("--name", default="decode_backends")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shutil.rmtree(WORK, ignore_errors=True)
    models = {"torch": sentcode.load(args.run)}
    reports = {}
    for name, q in (("onnx", None), ("onnx-int8", "int8")):
        reports[name] = export_run(args.run, WORK / name, quantize=q)
        models[name] = sentcode.load(WORK / name)
        if name == "onnx":
            models["onnx-per-token"] = sentcode.load(WORK / name)
            models["onnx-per-token"].model.token_loop = lambda top_p: None  # one ONNX Runtime call per token
    tok = models["torch"].tokenizer
    prompt = [tok.eos_id] + tok.encode("The state of the Union is strong. We have")
    speed = {name: {"batch1": [], "batch8": []} for name in models}
    for name, g in models.items():  # warm-up
        _batch1(g.model, prompt, 16, 0)
    for r in range(args.repeats):
        for name, g in models.items():
            speed[name]["batch1"].append(_batch1(g.model, prompt, args.bytes, r))
        for name, g in models.items():
            speed[name]["batch8"].append(_batch8(g.model, prompt, args.bytes, r))
    step_rows = []
    for run in args.steplm:  # the core on both backends, in turn; bytes/s of whole requests
        from sentcode.infer.export_core import use_onnx_core

        step = {"torch": sentcode.load(run)}
        step["onnx"] = use_onnx_core(sentcode.load(run), run)
        n = args.segments if step["torch"].family == "steplm" else step["torch"].default_steps
        prompt_text = "The state of the Union is strong. We have"
        runs = {k: [] for k in step}
        for k, g in step.items():  # warm-up
            g.generate(prompt_text, max_sentences=1, temperature=0.8, seed=0)
        for r in range(args.repeats):
            for k, g in step.items():
                t = time.perf_counter()
                text = g.generate(prompt_text, max_sentences=n, temperature=0.8, seed=r)
                runs[k].append(len(text.encode()) / (time.perf_counter() - t))
        for k in step:
            step_rows.append({"run": run, "family": step[k].family, "segments": n, "backend": k,
                              "bytes_s_batch1": statistics.median(runs[k]), "runs": runs[k]})
            print(f"{run} ({step[k].family}) on {k}: {step_rows[-1]['bytes_s_batch1']:.0f} bytes/s at batch 1")
    data_dir = models["torch"].run_info.get("data_dir")
    tokens = DataDir(data_dir).tokens("test")[: args.bpb_tokens]
    rows = []
    for name, g in models.items():
        bpb = evaluate_bpb(g.model, np.asarray(tokens), tok, g.context)["bpb"]
        row = {"backend": name, "bpb": bpb, "bytes_s_batch1": statistics.median(speed[name]["batch1"]),
               "bytes_s_batch8": statistics.median(speed[name]["batch8"]), "runs": speed[name]}
        rows.append(row)
    base = rows[0]
    print(f"{'backend':<10} {'bpb':>7} {'B/s b1':>8} {'x':>5} {'B/s b8':>8} {'x':>5}")
    for row in rows:
        row["x_batch1"] = row["bytes_s_batch1"] / base["bytes_s_batch1"]
        row["x_batch8"] = row["bytes_s_batch8"] / base["bytes_s_batch8"]
        print(f"{row['backend']:<10} {row['bpb']:7.4f} {row['bytes_s_batch1']:8.0f} {row['x_batch1']:5.2f} "
              f"{row['bytes_s_batch8']:8.0f} {row['x_batch8']:5.2f}")
    out = save(args.name, {"run": args.run, "threads": args.threads, "bytes": args.bytes, "repeats": args.repeats,
                           "bpb_tokens": int(len(tokens)), "rows": rows, "exports": reports,
                           "steplm": args.steplm, "steplm_rows": step_rows})
    print(f"machine: {machine()}\nwrote {out}")


if __name__ == "__main__":
    main()
