"""Training tokens/s of the tiny flat LM against nanoGPT's model at the same shape, side by side in one process.

    python benchmarks/train_vs_nanogpt.py --nanogpt DIR [--rounds 5] [--steps 4] [--threads 1]

DIR is a clone of github.com/karpathy/nanoGPT: its ``model.py`` is imported from there as shipped (sentcode does
not include it). Shape: 4 layers, 4 heads, width 256, context 256, vocabulary 259 (bytes), micro-batch 16, no
dropout; nanoGPT with its defaults otherwise (bias, GELU MLP, full attention heads), in fp32 as its train.py runs on
a CPU. sentcode's `tiny` preset in fp32, in bf16, and in the precision `train.precision: auto` picks on this machine
(``choose_cpu_precision``: the faster of the two, measured). Real AdamW steps on random tokens; the models take
turns, --steps steps per turn, for --rounds rounds; the median step of each is reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from sentcode.config import load_config  # noqa: E402
from sentcode.models.lm import LM  # noqa: E402
from sentcode.train.loop import build_optimizer  # noqa: E402
from sentcode.train.precision import autocast, choose_cpu_precision, cpu_model  # noqa: E402

B, T, V = 16, 256, 259


def nanogpt(path: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.GPT(mod.GPTConfig(block_size=T, vocab_size=V, n_layer=4, n_head=4, n_embd=256, dropout=0.0))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")

    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def sentcode_tiny(precision: str):
    cfg = load_config("tiny")
    model = LM(cfg.model)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    dev = torch.device("cpu")

    def step(x, y):
        with autocast(dev, precision):
            loss = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", required=True, metavar="DIR", help="a clone of karpathy/nanoGPT")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="train_vs_nanogpt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))
    runners = {"nanoGPT (fp32, as shipped)": nanogpt(Path(args.nanogpt))[1],
               "sentcode tiny fp32": sentcode_tiny("fp32")[1], "sentcode tiny bf16": sentcode_tiny("bf16")[1]}

    def timed(step):
        def seconds(_precision=None):
            t = time.perf_counter()
            step(x, y)
            return time.perf_counter() - t
        return seconds

    auto = {"fp32": timed(runners["sentcode tiny fp32"]), "bf16": timed(runners["sentcode tiny bf16"])}
    choice, note = choose_cpu_precision(lambda p: auto[p](), f"benchmark tiny micro_batch {B} seq_len {T}")
    print(note, flush=True)
    times = {k: [] for k in runners}
    for step in runners.values():  # warm-up
        step(x, y)
    for _ in range(args.rounds):
        for name, step in runners.items():
            for _ in range(args.steps):
                times[name].append(timed(step)())
    rows = {name: B * T / statistics.median(t) for name, t in times.items()}
    rows[f"sentcode tiny auto (= {choice})"] = rows[f"sentcode tiny {choice}"]
    base = rows["nanoGPT (fp32, as shipped)"]
    for name, tok_s in rows.items():
        print(f"{name:<32} {tok_s:8.0f} tokens/s  {tok_s / base:5.2f} x nanoGPT")
    flags = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")
             if f in Path("/proc/cpuinfo").read_text()]
    out = save(args.name, {"cpu": cpu_model(), "flags": flags, "threads": args.threads, "tokens_per_s": rows,
                           "auto": {"choice": choice, "note": note}, "rounds": args.rounds, "steps": args.steps})
    print(f"machine: {machine()}\nwrote {out}")


if __name__ == "__main__":
    main()
