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

import contextlib
import io
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from sentcode.data import DataDir
from sentcode.errors import SentcodeError
from sentcode.eval.bpb import evaluate_bpb
from sentcode.infer.engine import generate_ids
from sentcode.infer.generator import load_lm, read_run
from sentcode.infer.onnx_lm import ONNX_EXTRA, OnnxLM, import_onnxruntime
from sentcode.io import atomic_dir, write_json
from sentcode.models.decode_step import EncoderStep, LMStep, PlannerStep, RendererStep, check_exportable

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
QUANTIZE = ("int8",)
LOGIT_TOL = 1e-3  # fp32: largest logit difference allowed, relative to the largest logit magnitude (at least 1)
CHECK_TOKENS = 4096  # held-out tokens scored by both models
GREEDY_PROMPTS = 6
GREEDY_TOKENS = 48


def _exporter():
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxscript  # noqa: F401
    except ImportError:
        raise SentcodeError(f"export needs the ONNX exporter: pip install 'sentcode[{ONNX_EXTRA}]'") from None
    import_onnxruntime()


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
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(step, args, dynamic_shapes=shapes, dynamo=True, opset_version=23,
                                    input_names=["idx" if step.embed is not None else "x", "cos", "sin", "mask",
                                                 *names],
                                    output_names=["logits" if step.head_weight is not None else "hidden", *outs],
                                    optimize=True, verbose=False)
        program.save(str(path))


@contextlib.contextmanager
def _quiet():
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


def quantize_int8(src: Path, dst: Path) -> None:
    """Weight-only int8 (blocks of 32, symmetric) for every matrix product, by ONNX Runtime's quantizer."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with _quiet():
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
    _exporter()
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


def read_export(path: Path) -> dict:
    try:
        return json.loads((path / "export.json").read_text())
    except (OSError, ValueError) as e:
        raise SentcodeError(f"{path} has a corrupt export.json ({type(e).__name__})") from None


# ---- the end-to-end sentence-step core (families steplm and hier): renderer, planner, encoder -------------------

CORE_DIR = "onnx"  # inside the run directory
CORE_FAMILIES = ("steplm", "hier")
CORE_PARTS = ("renderer", "planner", "encoder")


def _timed_text(gen, prompt: str, **kw) -> tuple[str, float]:
    t = time.perf_counter()
    text = gen.generate(prompt, **kw)
    return text, len(text.encode()) / max(time.perf_counter() - t, 1e-9)


def _swap(gen, parts: dict | None) -> None:
    """Point ``gen`` at the exported parts (``parts``), or back at its model's own (None)."""
    m = gen.model
    gen.render = parts["renderer"].render if parts else m.render
    gen.planner = parts["planner"].stack if parts else m.planner
    gen.encoder_states = parts["encoder"].stack if parts else None


def check_core(gen, parts: dict) -> dict:
    """The exported parts beside ``gen``'s model: each part's output on real inputs (the renderer under a real
    planner condition), greedy continuations of sample prompts with every part swapped, and the speed of both."""
    from sentcode.corpus.sources import load_documents

    m = gen.model
    text = load_documents("sample")[-1].text
    _swap(gen, None)
    state, _ = gen._prime(gen.segments(text[:400]))
    W = m.cfg.window
    ids = torch.tensor([[gen.bos] + list(text[400:400 + 3 * W].encode())[: 3 * W]])
    cond = m.condition(state.o, None)[:, None].expand(1, ids.shape[1], -1)
    vectors = torch.cat([m.plan_start[None]] + state.embeddings, 0)[None]
    with torch.no_grad():
        pairs = {"renderer": (m.render(ids, cond, 0, None), parts["renderer"].render(ids, cond, 0, m.renderer.new_cache())),
                 "planner": (m.planner(vectors), parts["planner"].stack(vectors)),
                 "encoder": (m.encoder(m.enc_embed(ids)), parts["encoder"].stack(ids))}
    diffs = {k: float((a - b).abs().max()) for k, (a, b) in pairs.items()}
    scales = {k: max(1.0, float(a.abs().max())) for k, (a, _) in pairs.items()}
    for p in (None, parts):  # warm-up: first calls allocate
        _swap(gen, p)
        gen.generate(text[:60], max_sentences=1, temperature=0.0)
    same, n, speed = 0, 0, {"torch": [], "onnx": []}
    for doc in load_documents("sample")[-GREEDY_PROMPTS:]:
        prompt = doc.text[:120]
        _swap(gen, None)
        a, sa = _timed_text(gen, prompt, max_sentences=2, temperature=0.0)
        _swap(gen, parts)
        b, sb = _timed_text(gen, prompt, max_sentences=2, temperature=0.0)
        same += a == b
        n += 1
        speed["torch"].append(sa)
        speed["onnx"].append(sb)
    _swap(gen, None)
    failures = [f"the {k}'s outputs differ by {d:.2e} (tolerance {LOGIT_TOL * scales[k]:.2e})"
                for k, d in diffs.items() if d > LOGIT_TOL * scales[k]]
    if same < n:
        failures.append(f"{n - same} of {n} greedy continuations differ")
    med = {k: sorted(v)[len(v) // 2] for k, v in speed.items()}
    return {"ok": not failures, "failures": failures, "max_diff": diffs, "greedy_identical": f"{same}/{n}",
            "bytes_per_s_greedy": med}


def use_onnx_core(gen, run_dir: str | Path):
    """Make ``gen`` (a sentence-step or autoencoder generator) run its renderer, planner and encoder stacks
    through their ONNX exports, written into ``RUN/onnx`` and checked on first use (and again when the run's
    weights change). Pooling, the quantizer and sampling stay in PyTorch."""
    import sys

    _exporter()
    run_dir = Path(run_dir)
    out = run_dir / CORE_DIR
    m = gen.model
    steps = {"renderer": RendererStep(m), "planner": PlannerStep(m), "encoder": EncoderStep(m)}

    def open_parts(where: Path) -> dict:
        # not spinning: each graph is called between PyTorch calls, whose cores spinning threads would take
        return {k: OnnxLM(where / f"{k}.onnx", steps[k].cfg, spin=False) for k in CORE_PARTS}

    if not is_current(out, run_dir):
        print(f"exporting the renderer, planner and encoder of {run_dir} to ONNX"
              f"{' again (its weights changed)' if out.exists() else ' once'}, checked against the PyTorch model, "
              f"into {out} ...", file=sys.stderr, flush=True)
        with atomic_dir(out) as tmp:
            for k, step in steps.items():
                write_graph(step, tmp / f"{k}.onnx")
            report = check_core(gen, open_parts(tmp))
            if not report["ok"]:
                raise SentcodeError(f"the export failed its check ({'; '.join(report['failures'])}); nothing was "
                                    "written")
            write_json(tmp / "export.json", {"format": "onnx", "parts": list(CORE_PARTS), "opset": 23,
                                             "weights_stamp": weights_stamp(run_dir), **report})
    _swap(gen, open_parts(out))
    return gen
