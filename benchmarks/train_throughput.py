"""Training throughput (tokens/s, MFU) of the flat LM presets, bf16 autocast against fp32.

    python benchmarks/train_throughput.py [--presets tiny small] [--steps 8] [--device cpu]

Runs real optimizer steps (forward, backward, clip, AdamW) on random tokens at each preset's micro-batch and
sequence length; reports the median step after warm-up. MFU is against the datasheet bf16 peak on GPUs and
against the measured matrix-multiply peak of the CPU's fastest precision (fp32, or bf16 where the CPU has native
bf16 units).
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

from sentcode.config import load_config  # noqa: E402
from sentcode.models.lm import LM  # noqa: E402
from sentcode.train.lm import lm_loss  # noqa: E402
from sentcode.train.loop import build_optimizer  # noqa: E402
from sentcode.train.precision import autocast, cpu_has_fast_bf16, peak_flops  # noqa: E402


def measure(preset: str, precision: str, steps: int, device: torch.device, overrides: list[str] | None = None,
            compile_model: bool = False) -> dict:
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = LM(cfg.model).to(device)
    run = torch.compile(model) if compile_model else model
    opt = build_optimizer(model, cfg.train, device)
    B, T = cfg.train.micro_batch, cfg.train.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.model.vocab_size, (B, T), device=device)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        with autocast(device, precision):
            loss = lm_loss(run, (x, y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    tok_s = B * T / dt
    peak = peak_flops(device.type, precision)
    return {"preset": preset, "precision": precision, "params": model.num_params(non_embedding=False),
            "micro_batch": B, "seq_len": T, "step_s": dt, "tok_s": tok_s,
            "tflops": model.flops_per_token(T) * tok_s / 1e12, "peak_tflops": peak / 1e12,
            "mfu": model.flops_per_token(T) * tok_s / peak, "compiled": compile_model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for preset in args.presets:
        for precision in args.precisions:
            # bf16 on a CPU without native bf16 units is ~100x slower than fp32: 2 timed steps are plenty
            steps = 2 if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16() else args.steps
            r = measure(preset, precision, steps, device)
            rows.append(r)
            print(f"{preset:6s} {precision:5s} {r['params'] / 1e6:6.2f}M params  {r['tok_s']:10,.0f} tok/s  "
                  f"{r['tflops']:.3f} TFLOP/s  MFU {r['mfu'] * 100:5.1f}% (peak {r['peak_tflops']:.3f})", flush=True)
    out = save(f"train_throughput_{device.type}", {"rows": rows, "cpu_native_bf16": cpu_has_fast_bf16()})
    print(f"machine: {machine()}\nwrote {out}")


if __name__ == "__main__":
    main()
