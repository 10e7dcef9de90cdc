"""Bits per byte of an end-to-end sentence-step LM over a full deterministic pass.

Codes off: the exact one-part code length, -log2 P(bytes and end-of-segment symbols), divided by the bytes of
the text (the same denominator as a flat LM's; the flat LM charges one end-of-text per document, this model
one end-of-segment per segment). Codes on: the two-part code length (plan bits for the codes + render bits
for the bytes given them), reported with its parts: render bits with oracle, planner-predicted, shuffled and
no codes, and the refund ratio (no-code render bits - oracle render bits) / plan bits. Asked for, the "blind"
mode scores the renderer with planner states shuffled across segments (and no codes): what the planner's state
tells the renderer is the gap.
"""

from __future__ import annotations

import math

import torch

from sentcode.data.segments import SegmentSplit, build_row, eval_windows, specials, stack_rows

LN2 = math.log(2)


@torch.no_grad()
def evaluate_segments(model, split: SegmentSplit, device, batch_rows: int = 4, max_bytes: int | None = None,
                      modes: tuple[str, ...] | None = None, observer=None) -> dict:
    """Full pass (or the first documents up to ``max_bytes`` bytes, for periodic checks during training).
    ``observer.add(firsts, y, seg, n_seg, out)`` sees every batch of the oracle pass, with its details."""
    was_training = model.training
    model.eval()
    codes_on = bool(model.cfg.levels)
    symbols = model.cfg.symbols
    if modes is None:
        modes = ("oracle", "predicted", "shuffled", "none") if codes_on else ("oracle",)
    sums = {m: 0.0 for m in modes}
    plan_nats, n_bytes, n_segments = 0.0, 0, 0
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the shuffled mode draws a permutation: the same one every time
    batch = []

    def flush():
        nonlocal plan_nats
        x, y, seg, n_seg = stack_rows([r for r, _ in batch], device, specials(symbols)[2])
        for m in modes:
            out = model(x, y, seg, n_seg, code_mode=m, details=observer is not None and m == "oracle")
            if observer is not None and m == "oracle":
                observer.add([f for _, f in batch], y, seg, n_seg, out)
            sums[m] += float(out["render_nats"])
            if m == "oracle":
                plan_nats += float(out["plan_nats"])
        batch.clear()

    for segments, first in eval_windows(split, model.cfg.max_segments):
        x, y, seg = build_row(segments, symbols=symbols)
        y[seg < first] = -1  # context only: scored in an earlier window
        batch.append(((x, y, seg), first))
        n_bytes += sum(len(s) for s in segments[first:])
        n_segments += len(segments) - first
        if len(batch) == batch_rows:
            flush()
        if max_bytes is not None and n_bytes >= max_bytes:
            break
    if batch:
        flush()
    torch.random.set_rng_state(gen_state)
    model.train(was_training)
    bits = {m: v / LN2 for m, v in sums.items()}
    plan_bits = plan_nats / LN2
    result = {"bpb": (bits["oracle"] + plan_bits) / max(n_bytes, 1) if "oracle" in bits else None,
              "bits": bits["oracle"] + plan_bits if "oracle" in bits else None,
              "bytes": n_bytes, "segments": n_segments, "codes": codes_on,
              "bytes_per_segment": n_bytes / max(n_segments, 1)}
    if codes_on and "oracle" in bits:
        per_byte = {m: b / max(n_bytes, 1) for m, b in bits.items()}
        result.update({
            "plan_bpb": plan_bits / max(n_bytes, 1),
            "plan_bits_per_segment": plan_bits / max(n_segments, 1),
            **{f"render_bpb_{m}": v for m, v in per_byte.items()},
        })
        if "none" in bits:
            result["refund_ratio"] = (bits["none"] - bits["oracle"]) / plan_bits if plan_bits > 0 else None
            result["nocode_bpb"] = per_byte["none"]
    if "blind" in bits:
        result["render_bpb_blind"] = bits["blind"] / max(n_bytes, 1)
    return result


def format_steplm_result(r: dict) -> str:
    lines = [f"{r.get('source', 'held-out text')}: {r['bpb']:.4f} bits per byte "
             f"({'two-part: plan + render' if r['codes'] else 'exact one-part'}; {r['bytes']:,} bytes, "
             f"{r['segments']:,} segments of {r['bytes_per_segment']:.1f} bytes)"]
    if "render_bpb_blind" in r:
        lines.append(f"  renderer with shuffled planner states, no codes: {r['render_bpb_blind']:.4f} bits per byte")
    if r["codes"]:
        lines.append(f"  plan {r['plan_bpb']:.4f} bpb ({r['plan_bits_per_segment']:.1f} bits per segment); render "
                     + ", ".join(f"{m} {r[f'render_bpb_{m}']:.4f}" for m in ("oracle", "predicted", "shuffled", "none")
                                 if f"render_bpb_{m}" in r))
        if r.get("refund_ratio") is not None:
            lines.append(f"  refund ratio (no-code - oracle render bits) / plan bits: {r['refund_ratio']:.3f}")
    return "\n".join(lines)



def cached_test_result(gen, split: str) -> dict | None:
    """The test split's figures written at the end of training, while they are newer than the weights."""
    import json

    from sentcode.models.sentence.steplm import WEIGHTS
    from sentcode.runs.weights import newer_than_weights

    cached = gen.run_dir / "eval.json"
    if split == "test" and (gen.run_dir / WEIGHTS).is_file() and newer_than_weights(cached, gen.run_dir):
        return json.loads(cached.read_text())
    return None


def evaluate_steplm_run(gen, text_file=None, split: str = "test") -> dict:
    """``sentcode eval`` of a loaded end-to-end run: a text file, or a split of the run's own segments (the test
    split's figures written at the end of training are reused while they are newer than the weights)."""
    from sentcode.eval.run import read_text_file

    if text_file is not None:
        return {"family": "steplm", "source": str(text_file), **gen.score_details(read_text_file(text_file))}
    if (cached := cached_test_result(gen, split)) is not None:
        return cached
    data = SegmentSplit.load(gen.run_dir / "data" / f"{split}.npz")
    return {"family": "steplm", "source": f"{split} split", **evaluate_segments(gen.model, data, gen.device)}
