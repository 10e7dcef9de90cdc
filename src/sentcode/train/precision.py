"""Device and numeric precision: which autocast to use, and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

from sentcode.errors import ConfigError
from sentcode.io import write_json


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices natively (AMX or AVX512-BF16).

    Without them PyTorch falls back to a path that is far slower than fp32, so bf16 autocast would be a loss.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


MEASURE = "measure"  # what ``resolve_precision`` answers for "auto" on a CPU: the loop times both and picks


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to train in; on a CPU, "auto" is decided by measurement (``choose_cpu_precision``)."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return MEASURE
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return precision


def choose_cpu_precision(step_seconds, shape_key: str, repeats: int = 3) -> tuple[str, str]:
    """fp32 or bf16, whichever runs a training step of this model faster on this CPU, and a line saying why.

    ``step_seconds(precision)`` runs one forward and backward pass and returns its wall time. A CPU flag is not
    a measurement: bf16 was measured slower than fp32 on CPUs that have AVX512-BF16 and no AMX. Without any bf16
    units bf16 is emulated and many times slower, so it is not timed. The answer is kept per CPU model, thread
    count, torch version and model shape in ``cache_dir()/precision.json`` (delete it to measure again).
    """
    if not cpu_has_fast_bf16():
        return "fp32", "precision auto: fp32 (this CPU has no bf16 units: no avx512_bf16 or amx_bf16)"
    table = _read_table("precision.json")
    key = f"{cpu_model()} | {torch.get_num_threads()} thread(s) | torch {torch.__version__} | {shape_key}"
    entry = table.get(key)
    cached = isinstance(entry, dict) and entry.get("choice") in ("fp32", "bf16")
    if not cached:
        times = {"fp32": [], "bf16": []}
        for p in times:  # warm-up: first calls allocate and pick kernels
            step_seconds(p)
        for _ in range(repeats):
            for p in times:  # in turn, so that a noisy machine slows both alike
                times[p].append(step_seconds(p))
        med = {p: sorted(t)[len(t) // 2] for p, t in times.items()}
        entry = {"choice": "bf16" if med["bf16"] < med["fp32"] else "fp32", "fp32_s": med["fp32"],
                 "bf16_s": med["bf16"], "cpu": cpu_model(), "measured": time.strftime("%Y-%m-%d %H:%M")}
        table[key] = entry
        _write_table("precision.json", table)
    how = f"cached from {entry.get('measured')}" if cached else "measured now"
    line = (f"precision auto: {entry['choice']} (a training step of this model took {entry['fp32_s'] * 1e3:.0f} ms "
            f"in fp32 and {entry['bf16_s'] * 1e3:.0f} ms in bf16 on this CPU; {how})")
    return entry["choice"], line


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


@functools.lru_cache(maxsize=None)
def peak_flops(device_type: str, precision: str) -> float:
    """Peak matrix FLOP/s that MFU is measured against: what the hardware can do at its best precision.

    GPUs: the datasheet dense bf16 figure. CPUs: a quick fp32 matrix-multiply measurement, or the bf16 one
    when the CPU has native bf16 units. A precision the hardware runs slowly is judged against the fast one,
    so a slow choice shows up as a low MFU instead of looking efficient against its own slow peak.
    """
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        return next((v for k, v in _GPU_PEAK_BF16.items() if k in name), 100e12)
    return cpu_peak(torch.get_num_threads())


def cache_dir() -> Path:
    """Where per-machine measurements are kept: $SENTCODE_CACHE, or ~/.cache/sentcode."""
    return Path(os.environ.get("SENTCODE_CACHE") or Path.home() / ".cache" / "sentcode")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def cpu_peak(threads: int) -> float:
    """The CPU's peak matrix FLOP/s at ``threads`` threads, measured once per machine and kept in
    ``cache_dir()/peak_flops.json`` with the CPU model and the date. A peak measured while other work shares
    the cores comes out low and inflates every MFU after it: measure on a quiet machine (delete the file to
    measure again), and an MFU over 100% is never printed."""
    table = _read_table("peak_flops.json")
    key = f"{cpu_model()} | {threads} thread(s) | torch {torch.__version__}"
    if isinstance(table.get(key), dict) and table[key].get("flops", 0) > 0:
        return float(table[key]["flops"])
    best = _measure_matmul(torch.float32, threads=threads)
    if cpu_has_fast_bf16():
        best = max(best, _measure_matmul(torch.bfloat16, threads=threads))
    table[key] = {"flops": best, "cpu": cpu_model(), "threads": threads, "measured": time.strftime("%Y-%m-%d %H:%M")}
    _write_table("peak_flops.json", table)
    return best


def _read_table(name: str) -> dict:
    """A table of per-machine measurements in ``cache_dir()``; empty when missing or unreadable."""
    try:
        table = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _write_table(name: str, table: dict) -> None:
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        write_json(cache_dir() / name, table)
    except OSError:
        pass  # a read-only home: measured again next time


@functools.lru_cache(maxsize=None)
def _measure_matmul(dtype: torch.dtype, n: int = 1024, threads: int | None = None) -> float:
    # Best of several runs, once per process and thread count: a peak measured while another job shares the
    # cores comes out low and would inflate every later MFU (a pipeline runs several training stages).
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
