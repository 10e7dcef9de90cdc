"""Device and numeric precision: which autocast to use, and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

import torch

from sentcode.errors import ConfigError


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


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return precision


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
    threads = torch.get_num_threads()
    best = _measure_matmul(torch.float32, threads=threads)
    if cpu_has_fast_bf16():
        best = max(best, _measure_matmul(torch.bfloat16, threads=threads))
    return best


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
