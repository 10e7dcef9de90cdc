"""``sentcode export``: a flat LM run as an ONNX graph (optionally with int8 weights), checked before it is written.

The exported directory describes itself: ``model.onnx``, the run's ``config.yaml``, ``run.json`` and
``tokenizer/``, and ``export.json`` with the check's figures. ``sentcode.load(DIR)`` runs it with ONNX Runtime.

The check runs the graph beside the PyTorch model on held-out text (the run's test split when its data
directory is at hand, else the bundled sample text): the largest logit difference over one context window,
greedy continuations of a set of prompts, and bits per byte of both. fp32 must match (logits within a tolerance,
every greedy continuation identical); int8 must keep bits per byte within ``max_bpb_cost`` of fp32 (its greedy
continuations are reported, since rounding the weights may change a near tie). An export that fails its check
is not written.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from sentcode.data import DataDir
from sentcode.errors import SentcodeError
from sentcode.eval.bpb import evaluate_bpb
from sentcode.infer.engine import generate_ids
from sentcode.infer.generator import load_lm, read_run
from sentcode.infer.onnx_graph import (GREEDY_PROMPTS, LOGIT_TOL, quiet, require_exporter, weights_stamp,
                                       write_graph)
from sentcode.infer.onnx_lm import OnnxLM
from sentcode.io import atomic_dir, write_json
from sentcode.models.decode_step import LMStep, check_exportable

FORMATS = ("onnx",)
QUANTIZE = ("int8",)
CHECK_TOKENS = 4096  # held-out tokens scored by both models
GREEDY_TOKENS = 48


def _held_out_tokens(gen) -> tuple[np.ndarray, str]:
    data_dir = gen.run_info.get("data_dir")
    if data_dir and Path(data_dir).is_dir():
        try:
            return DataDir(data_dir).tokens("test")[:CHECK_TOKENS], f"test split of its data ({Path(data_dir).name})"
        except Exception:  # a data directory from another version: fall back to the sample text
            pass
    from sentcode.corpus.sources import load_documents

    text = "\n\n".join(d.text for d in load_documents("sample")[-3:])
    return np.array(gen.tokenizer.encode(text)[:CHECK_TOKENS], dtype=np.int64), "bundled sample text"


def quantize_int8(src: Path, dst: Path) -> None:
    """Weight-only int8 (blocks of 32, symmetric) for every matrix product, by ONNX Runtime's quantizer."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with quiet():
        q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True, bits=8, accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(dst))


def _decode_speed(model, prompt: list[int], n: int) -> float:
    t = time.perf_counter()
    got = sum(1 for _ in generate_ids(model, prompt, n, temperature=0.0))
    return got / (time.perf_counter() - t)


def check_export(torch_model, onnx_model, tokens: np.ndarray, tokenizer, quantized: bool,
                 max_bpb_cost: float = 0.01) -> dict:
    """The figures of the export's check and whether it passed (``ok``, ``failures``)."""
    ctx = torch_model.cfg.max_seq_len
    window = torch.from_numpy(np.concatenate([[tokenizer.eos_id], tokens[: ctx - 1]]))[None]
    with torch.no_grad():
        ref = torch_model(window)
    got = onnx_model(window)
    logit_diff = float((ref - got).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    bpb_torch = evaluate_bpb(torch_model, tokens, tokenizer, ctx)["bpb"]
    bpb_onnx = evaluate_bpb(onnx_model, tokens, tokenizer, ctx)["bpb"]
    starts = np.linspace(0, max(0, len(tokens) - 64), GREEDY_PROMPTS).astype(int)
    same = 0
    for s in starts:
        prompt = [tokenizer.eos_id] + tokens[s: s + 32].tolist()
        a = list(generate_ids(torch_model, prompt, GREEDY_TOKENS, temperature=0.0))
        b = list(generate_ids(onnx_model, prompt, GREEDY_TOKENS, temperature=0.0))
        same += a == b
    prompt = [tokenizer.eos_id] + tokens[:16].tolist()
    _decode_speed(onnx_model, prompt, 8)  # warm-up
    speed = {"torch": _decode_speed(torch_model, prompt, 128), "onnx": _decode_speed(onnx_model, prompt, 128)}
    cost = bpb_onnx / bpb_torch - 1
    failures = []
    if quantized:
        if cost > max_bpb_cost:
            failures.append(f"int8 costs {cost:.2%} bits per byte (limit {max_bpb_cost:.0%})")
    else:
        if logit_diff > LOGIT_TOL * scale:
            failures.append(f"logits differ by {logit_diff:.2e} (tolerance {LOGIT_TOL * scale:.2e})")
        if same < len(starts):
            failures.append(f"{len(starts) - same} of {len(starts)} greedy continuations differ")
    return {"ok": not failures, "failures": failures, "max_logit_diff": logit_diff, "bpb_torch": bpb_torch,
            "bpb_onnx": bpb_onnx, "bpb_cost": cost, "greedy_identical": f"{same}/{len(starts)}",
            "tokens_per_s_batch1": speed, "check_tokens": int(len(tokens))}


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "onnx", quantize: str | None = None,
               max_bpb_cost: float = 0.01, replace: bool = False) -> dict:
    """Export, check, and write ``out`` (which must not exist or be empty, unless ``replace``: a stale export
    the backend keeps inside the run); returns ``export.json``'s content."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise SentcodeError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise SentcodeError(f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZE)}")
    if not replace and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SentcodeError(f"{out} exists and is not an empty directory; choose another --out")
    cfg_dict, _ = read_run(run_dir)
    if (run_dir / "export.json").is_file():
        raise SentcodeError(f"{run_dir} is already an export; export its training run instead")
    name = cfg_dict.get("family", "lm") if isinstance(cfg_dict, dict) else "lm"
    if name != "lm":
        raise SentcodeError(f"export supports flat LM runs only yet; {run_dir} is a {name!r} run")
    require_exporter()
    gen = load_lm(run_dir)  # raises for a run with no trained weights
    model = gen.model.float().eval()
    check_exportable(model)
    tokens, source = _held_out_tokens(gen)
    if len(tokens) < 64:
        raise SentcodeError("the held-out text for the export's check is shorter than 64 tokens")
    with atomic_dir(out) as tmp:
        graph = tmp / "model.onnx"
        write_graph(LMStep(model), graph)
        if quantize == "int8":
            fp32 = tmp / "fp32.onnx"
            graph.rename(fp32)
            quantize_int8(fp32, graph)
            fp32.unlink()
        report = check_export(model, OnnxLM(graph, model.cfg), tokens, gen.tokenizer, quantize is not None,
                              max_bpb_cost)
        if not report["ok"]:
            raise SentcodeError(f"the export failed its check ({'; '.join(report['failures'])}); nothing was written")
        for f in ("config.yaml", "run.json"):
            shutil.copy2(run_dir / f, tmp / f)
        shutil.copytree(run_dir / "tokenizer", tmp / "tokenizer")
        info = {"format": fmt, "quantize": quantize, "source_run": str(run_dir), "check_source": source,
                "opset": 23, "weights_stamp": weights_stamp(run_dir), **report}
        write_json(tmp / "export.json", info)
    return info
