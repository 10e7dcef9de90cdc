"""``sentcode.load``: a run directory (or an export) in, its family's generator out, on the backend asked for."""

from __future__ import annotations

import sys
from pathlib import Path

from sentcode.errors import SentcodeError
from sentcode.infer.export import export_run
from sentcode.infer.generator import load_export, read_run
from sentcode.registry import family

BACKENDS = ("torch", "onnx")
ONNX_DIR = "onnx"  # where ``backend="onnx"`` keeps a run's checked export


def load(run_dir: str | Path, device: str = "cpu", renderer: str | None = None, backend: str = "torch"):
    """Load any trained run directory and return its generator (the family's loader, from the registry).

    ``renderer`` ("ar" or "nar") picks the renderer that writes a sentence-step run's text (default "ar").
    ``backend="onnx"`` runs a flat LM with ONNX Runtime: from an export directory (``sentcode export``), or
    from the run's own checked export in ``RUN/onnx``, written on first use.
    """
    run_dir = Path(run_dir)
    if backend not in BACKENDS:
        raise SentcodeError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    cfg_dict, _ = read_run(run_dir)
    if (run_dir / "export.json").is_file():
        return load_export(run_dir)
    name = cfg_dict.get("family", "lm") if isinstance(cfg_dict, dict) else "lm"
    fam = family(name, where=run_dir)
    if backend == "onnx":
        if name != "lm":
            raise SentcodeError(f"the onnx backend runs flat LM runs only yet; {run_dir} is a {fam.label} run")
        if renderer is not None:
            raise SentcodeError("a renderer choice applies to sentence-step runs; this is a flat LM run")
        if str(device) not in ("cpu", "auto"):
            raise SentcodeError(f"the onnx backend runs on the CPU; drop --device {device}")
        onnx_dir = run_dir / ONNX_DIR
        if not (onnx_dir / "export.json").is_file():
            print(f"exporting {run_dir} to ONNX once, checked against the PyTorch model, into {onnx_dir} ...",
                  file=sys.stderr, flush=True)
            if onnx_dir.is_dir() and not any(onnx_dir.iterdir()):
                onnx_dir.rmdir()
            export_run(run_dir, onnx_dir)
        return load_export(onnx_dir)
    return fam.resolve("load")(run_dir, device=device, renderer=renderer)
