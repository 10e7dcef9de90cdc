"""``--backend onnx`` for the end-to-end sentence-step core (families steplm and hier): its renderer, planner and
encoder stacks exported into ``RUN/onnx``, checked against the PyTorch model, and swapped into the generator.
Pooling, the quantizer and sampling stay in PyTorch."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from sentcode.errors import SentcodeError
from sentcode.infer.onnx_graph import (GREEDY_PROMPTS, LOGIT_TOL, RUN_EXPORT_DIR, is_current, require_exporter,
                                       weights_stamp, write_graph)
from sentcode.infer.onnx_lm import OnnxLM
from sentcode.io import atomic_dir, write_json
from sentcode.models.decode_step import EncoderStep, PlannerStep, RendererStep

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
    gen.render_loop = parts["renderer"].token_loop if parts else None
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
        pairs = {"renderer": (m.render(ids, cond, 0, None),
                              parts["renderer"].render(ids, cond, 0, m.renderer.new_cache())),
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
    require_exporter()
    run_dir = Path(run_dir)
    out = run_dir / RUN_EXPORT_DIR
    m = gen.model
    steps = {"renderer": RendererStep(m), "planner": PlannerStep(m), "encoder": EncoderStep(m)}

    def open_parts(where: Path) -> dict:
        # not spinning: each graph is called between PyTorch calls, whose cores spinning threads would take
        return {k: OnnxLM(where / f"{k}.onnx", steps[k].cfg, spin=False, loop_spin=False) for k in CORE_PARTS}

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
