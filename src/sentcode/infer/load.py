"""``sentcode.load``: a run directory (or an export) in, its family's generator out, on the backend asked for."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from sentcode.errors import SentcodeError
from sentcode.infer.generator import load_export, read_run
from sentcode.registry import family

BACKENDS = ("torch", "onnx")


@contextlib.contextmanager
def _writable(run_dir: Path):
    """The backend keeps its checked export inside the run: say so in one line when it cannot write there."""
    from sentcode.infer.onnx_graph import RUN_EXPORT_DIR

    try:
        yield
    except OSError as e:
        raise SentcodeError(f"cannot write the ONNX export into {run_dir / RUN_EXPORT_DIR} ({e.strerror or e}); for a "
                            f"flat LM, `sentcode export {run_dir} --out DIR` writes it elsewhere and DIR loads "
                            "directly") from None


def load(run_dir: str | Path, device: str = "cpu", renderer: str | None = None, backend: str = "torch"):
    """Load any trained run directory and return its generator (the family's loader, from the registry).

    ``renderer`` ("ar" or "nar") picks the renderer that writes a sentence-step run's text (default "ar").
    ``backend="onnx"`` runs a flat LM with ONNX Runtime: from an export directory (``sentcode export``), or
    from the run's own checked export in ``RUN/onnx``, written on first use; for a sentence-step or autoencoder
    run, its renderer, planner and encoder stacks (``RUN/onnx``).
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
        return _load_onnx(run_dir, fam, device, renderer)
    return fam.resolve("load")(run_dir, device=device, renderer=renderer)


def _load_onnx(run_dir: Path, fam, device: str, renderer: str | None):
    """A training run on ONNX Runtime: its checked export in ``RUN/onnx``, written (or made again) first."""
    # imported here: loading a run for PyTorch does not pay for the exporter's modules
    from sentcode.infer.export import export_run
    from sentcode.infer.export_core import CORE_FAMILIES, use_onnx_core
    from sentcode.infer.onnx_graph import RUN_EXPORT_DIR, is_current

    if str(device) not in ("cpu", "auto"):
        raise SentcodeError(f"the onnx backend runs on the CPU; drop --device {device}")
    if fam.name in CORE_FAMILIES:
        with _writable(run_dir):
            return use_onnx_core(fam.resolve("load")(run_dir, device="cpu", renderer=renderer), run_dir)
    if fam.name != "lm":
        raise SentcodeError(f"the onnx backend runs flat LM, sentence-step and autoencoder runs; {run_dir} is a "
                            f"{fam.label} run")
    if renderer is not None:
        raise SentcodeError("a renderer choice applies to sentence-step runs; this is a flat LM run")
    onnx_dir = run_dir / RUN_EXPORT_DIR
    if not is_current(onnx_dir, run_dir):
        again = (onnx_dir / "export.json").is_file()
        print(f"exporting {run_dir} to ONNX {'again (its weights changed)' if again else 'once'}, checked against "
              f"the PyTorch model, into {onnx_dir} ...", file=sys.stderr, flush=True)
        with _writable(run_dir):
            export_run(run_dir, onnx_dir, replace=True)
    return load_export(onnx_dir)
