"""The autoencoder's own figures for a hierarchical byte autoencoder run (family ``hier``), beside its bits
per byte (``eval.steplm``: the two-part code length, code LM bits + expander bits given the codes).

* compression: bytes per segment (one code tuple), bytes per code, and the tuple's raw size in bits;
* reconstruction, with the true codes and the true earlier bytes: byte accuracy (the expander's most likely
  byte is the true one) and the share of segments and of documents whose every byte and end-of-segment symbol
  is the most likely one. Greedy decoding from the codes (``sentcode hier decode``) reproduces exactly those
  documents: each step sees the same past as here;
* codebook usage (share of codes used) and perplexity (2 ** entropy of the code histogram) per level.

Padding is never segmented or counted: segments are cut from each document's bytes, and only scored positions
enter the counts.
"""

from __future__ import annotations

import math

import torch

from sentcode.data.segments import EOS, SegmentSplit, build_row, eval_windows, stack_rows


@torch.no_grad()
def autoencoder_figures(model, split: SegmentSplit, device, batch_rows: int = 4, max_bytes: int | None = None) -> dict:
    was_training = model.training
    model.eval()
    c = model.cfg
    hits = bytes_seen = 0
    exact: list[bool] = []  # per scored segment, in order
    histograms = torch.zeros(c.levels, c.codebook_size, dtype=torch.long)
    batch = []

    def flush():
        nonlocal hits
        x, y, seg, n_seg = stack_rows([r for r, _ in batch], device)
        out = model(x, y, seg, n_seg, details=True)
        scored = y >= 0
        hits += int((out["hit"] & (y != EOS)).sum())
        idx = torch.where(scored, seg, n_seg)
        miss = torch.zeros(x.shape[0], n_seg + 1, dtype=torch.long, device=x.device)
        miss.scatter_add_(1, idx, (~out["hit"] & scored).long())
        has = torch.zeros_like(miss).scatter_add_(1, idx, scored.long())
        for i, (_, first) in enumerate(batch):
            n = int(seg[i].max()) + 1
            exact.extend(bool(m == 0) for m in miss[i, first:n].tolist())
            for level in range(c.levels):
                histograms[level] += torch.bincount(out["codes"][i, first:n, level].cpu()[has[i, first:n].cpu() > 0],
                                                    minlength=c.codebook_size)
        batch.clear()

    for segments, first in eval_windows(split, c.max_segments):
        x, y, seg = build_row(segments)
        y[seg < first] = -1
        batch.append(((x, y, seg), first))
        bytes_seen += sum(len(s) for s in segments[first:])
        if len(batch) == batch_rows:
            flush()
        if max_bytes is not None and bytes_seen >= max_bytes:
            break
    if batch:
        flush()
    model.train(was_training)
    n_seg = len(exact)
    doc_exact, docs = 0, 0
    for d in range(split.n_docs):
        a, b = int(split.doc_seg[d]), int(split.doc_seg[d + 1])
        if b > n_seg:
            break
        docs += 1
        doc_exact += all(exact[a:b])
    levels = []
    for h in histograms:
        p = h.double() / max(int(h.sum()), 1)
        ent = float(-(p[p > 0] * p[p > 0].log2()).sum())
        levels.append({"usage": float((h > 0).double().mean()), "perplexity": 2 ** ent})
    return {
        "bytes_per_segment": bytes_seen / max(n_seg, 1),
        "bytes_per_code": bytes_seen / max(n_seg * c.levels, 1),
        "code_bits_per_segment": c.levels * math.log2(c.codebook_size),
        "byte_accuracy": hits / max(bytes_seen, 1),
        "segments_exact": sum(exact) / max(n_seg, 1),
        "documents_exact": doc_exact / max(docs, 1),
        "documents": docs,
        "codebooks": levels,
    }


def format_hier_result(r: dict) -> str:
    from sentcode.eval.steplm import format_steplm_result

    lines = [format_steplm_result(r)]
    if "byte_accuracy" in r:
        lines.append(f"  compression: {r['bytes_per_segment']:.2f} bytes per segment, {r['bytes_per_code']:.2f} bytes "
                     f"per code ({r['code_bits_per_segment']:.0f} raw code bits per segment)")
        lines.append(f"  reconstruction from true codes: {r['byte_accuracy']:.2%} of bytes, {r['segments_exact']:.2%} "
                     f"of segments, {r['documents_exact']:.2%} of {r['documents']} documents exact")
        lines.append("  codebooks: " + ", ".join(f"level {i + 1} usage {b['usage']:.0%}, perplexity {b['perplexity']:.1f}"
                                                 for i, b in enumerate(r["codebooks"])))
    return "\n".join(lines)


def evaluate_hier_run(gen, text_file=None, split: str = "test") -> dict:
    """``sentcode eval`` of a loaded autoencoder run: bits per byte and the autoencoder's figures."""
    import json

    from sentcode.eval.run import read_text_file
    from sentcode.eval.steplm import evaluate_segments
    from sentcode.models.sentence.steplm import WEIGHTS

    if text_file is not None:
        data = gen.split_arrays(read_text_file(text_file))
        source = str(text_file)
    else:
        cached, weights = gen.run_dir / "eval.json", gen.run_dir / WEIGHTS
        if split == "test" and cached.is_file() and weights.is_file() \
                and cached.stat().st_mtime >= weights.stat().st_mtime:
            return json.loads(cached.read_text())
        data = SegmentSplit.load(gen.run_dir / "data" / f"{split}.npz")
        source = f"{split} split"
    return {"family": "hier", "source": source, **evaluate_segments(gen.model, data, gen.device),
            **autoencoder_figures(gen.model, data, gen.device)}
