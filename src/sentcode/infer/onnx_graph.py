"""What every ONNX export shares: tracing a ``DecodeStep`` into a graph, quieting the exporter, the check's
tolerances, and the stamp that tells a run's export from one of other weights."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch

from sentcode.errors import SentcodeError
from sentcode.infer.ort import ONNX_EXTRA, import_onnxruntime

RUN_EXPORT_DIR = "onnx"  # where ``backend="onnx"`` keeps a run's checked export, inside the run directory
LOGIT_TOL = 1e-3  # fp32: largest output difference allowed, relative to the largest output magnitude (at least 1)
GREEDY_PROMPTS = 6  # greedy continuations compared by a check


def require_exporter():
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxscript  # noqa: F401
    except ImportError:
        raise SentcodeError(f"export needs the ONNX exporter: pip install 'sentcode[{ONNX_EXTRA}]'") from None
    import_onnxruntime()


def write_graph(step, path: Path) -> None:
    """Trace a ``DecodeStep`` into ``path`` (batch, query length and cache length left dynamic)."""
    step = step.eval()
    cfg, cond = step.cfg, step.conditioned
    hd = cfg.d_model // cfg.n_head
    B, T, P = 2, 3, 4  # sizes above 1, so that the exporter does not specialise them
    past = [torch.zeros(B, cfg.n_kv_head, P, hd) for _ in range(2 * cfg.n_layer)]
    first = torch.zeros(B, T, dtype=torch.long) if step.embed is not None else torch.zeros(B, T, cfg.d_model)
    args = (first, torch.ones(B, T, hd // 2), torch.zeros(B, T, hd // 2),
            torch.ones(B, 1 if cfg.pos == "rope" else cfg.n_head, T, P + T,
                       dtype=torch.bool if cfg.pos == "rope" else torch.float32), past)
    Bd, Td, Pd, Kd = (torch.export.Dim(n) for n in ("batch", "query", "past", "keys"))
    shapes = {"idx": {0: Bd, 1: Td}, "cos": {0: Bd, 1: Td}, "sin": {0: Bd, 1: Td}, "mask": {0: Bd, 2: Td, 3: Kd},
              "past": [{0: Bd, 2: Pd}] * (2 * cfg.n_layer)}
    names = [f"past_{kind}_{i}" for i in range(cfg.n_layer) for kind in ("key", "value")]
    if cond:
        args = (*args, torch.zeros(B, T, cfg.d_model))
        shapes["cond"] = {0: Bd, 1: Td}
        names.append("cond")
    outs = [f"present_{kind}_{i}" for i in range(cfg.n_layer) for kind in ("key", "value")]
    with torch.no_grad(), quiet():
        program = torch.onnx.export(step, args, dynamic_shapes=shapes, dynamo=True, opset_version=23,
                                    input_names=["idx" if step.embed is not None else "x", "cos", "sin", "mask",
                                                 *names],
                                    output_names=["logits" if step.head_weight is not None else "hidden", *outs],
                                    optimize=True, verbose=False)
        program.save(str(path))


@contextlib.contextmanager
def quiet():
    """The exporter prints its progress and warnings; the command prints its own."""
    names = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir", "onnxruntime.quantization.matmul_nbits_quantizer")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def weights_stamp(run_dir: Path) -> str:
    """Names, sizes and times of a run's weight files: an export made from other weights is stale."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("*.safetensors")) + sorted((run_dir / "checkpoints").glob("*"))
    return ";".join(f"{p.relative_to(run_dir)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def is_current(export_dir: Path, run_dir: Path) -> bool:
    """``export_dir`` holds a checked export of ``run_dir``'s present weights."""
    try:
        return json.loads((export_dir / "export.json").read_text()).get("weights_stamp") == weights_stamp(run_dir)
    except (OSError, ValueError):
        return False
