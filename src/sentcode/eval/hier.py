"""The autoencoder's own figures for a hierarchical byte autoencoder run (family ``hier``), beside its bits
per byte (``eval.steplm``: the two-part code length, code LM bits + expander bits given the codes, and the
exact one-part figure of the expander without codes).

* compression: bytes per segment (one code tuple), bytes per code (a residual level is a code; an FSQ tuple is
  one code), and the tuple's raw size in bits;
* reconstruction, with the true codes and the true earlier bytes: byte accuracy (the expander's most likely
  byte is the true one) and the share of segments and of documents whose every byte and end-of-segment symbol
  is the most likely one. Greedy decoding from the codes (``sentcode hier decode``) reproduces exactly those
  documents: each step sees the same past as here;
* codebook usage (share of codes used) and perplexity (2 ** entropy of the code histogram) per level.

The figures are gathered from the oracle pass of the bits-per-byte evaluation (no second pass). Padding is
never segmented or counted: segments are cut from each document's bytes, and only scored positions count.
"""

from __future__ import annotations

import math

import torch

from sentcode.data.segments import SegmentSplit, specials


class AutoencoderFigures:
    """An observer of ``evaluate_segments``' oracle pass that counts hits, exact segments and codes."""

    def __init__(self, model):
        self.levels, self.size = model.cfg.levels, model.cfg.codebook_size
        self.codes_per_segment = model.cfg.codes_per_segment
        self.eos = specials(model.cfg.symbols)[1]
        self.hits = self.bytes = 0
        self.exact: list[bool] = []  # per scored segment, in order
        self.histograms = torch.zeros(self.levels, self.size, dtype=torch.long)

    def add(self, firsts: list[int], y, seg, n_seg: int, out: dict) -> None:
        scored = y >= 0
        self.hits += int((out["hit"] & (y != self.eos)).sum())
        self.bytes += int((scored & (y != self.eos)).sum())
        idx = torch.where(scored, seg, n_seg)
        miss = torch.zeros(y.shape[0], n_seg + 1, dtype=torch.long, device=y.device)
        miss.scatter_add_(1, idx, (~out["hit"] & scored).long())
        for i, first in enumerate(firsts):
            n = int(seg[i].max()) + 1
            self.exact.extend(m == 0 for m in miss[i, first:n].tolist())
            codes = out["codes"][i, first:n].cpu()
            for level in range(self.levels):
                self.histograms[level] += torch.bincount(codes[:, level], minlength=self.size)

    def result(self, split: SegmentSplit) -> dict:
        n_seg = len(self.exact)
        doc_exact = docs = 0
        for d in range(split.n_docs):
            a, b = int(split.doc_seg[d]), int(split.doc_seg[d + 1])
            if b > n_seg:  # a pass cut short by max_bytes
                break
            docs += 1
            doc_exact += all(self.exact[a:b])
        books = []
        for h in self.histograms:
            p = h.double() / max(int(h.sum()), 1)
            ent = float(-(p[p > 0] * p[p > 0].log2()).sum())
            books.append({"usage": float((h > 0).double().mean()), "perplexity": 2 ** ent})
        return {
            "bytes_per_code": self.bytes / max(n_seg * self.codes_per_segment, 1),
            "code_bits_per_segment": self.levels * math.log2(self.size),
            "byte_accuracy": self.hits / max(self.bytes, 1),
            "segments_exact": sum(self.exact) / max(n_seg, 1),
            "documents_exact": doc_exact / max(docs, 1),
            "documents": docs,
            "codebooks": books,
        }


def evaluate_hier(model, split: SegmentSplit, device, max_bytes: int | None = None, quick: bool = False) -> dict:
    """Bits per byte (two-part, with its parts) and the autoencoder's figures, in one pass per code mode
    (``quick``: the oracle and no-code passes only, for validation during training)."""
    from sentcode.eval.steplm import evaluate_segments

    figures = AutoencoderFigures(model)
    modes = ("oracle", "none") if quick else None
    result = evaluate_segments(model, split, device, max_bytes=max_bytes, observer=figures, modes=modes)
    result["twopart_bpb"] = result["bpb"]
    if model.cfg.code_dropout > 0 and "render_bpb_none" in result:
        # trained with code dropout, the expander without codes is a model of its own: an exact one-part code
        # length (bytes and segment ends given the code LM's state of completed segments). Either code is
        # lossless; the better one is the model's bits per byte (choosing costs one bit per text).
        result["onepart_bpb"] = result["render_bpb_none"]
        if result["onepart_bpb"] < result["bpb"]:
            result.update(bpb=result["onepart_bpb"], bits=result["onepart_bpb"] * result["bytes"])
    return {**result, **figures.result(split)}


def evaluate_levels(model, upper, split: SegmentSplit, device) -> dict:
    """Level 1's figures and, with a second level (``upper``), the two-level code
    length: the top code LM's bits for the level-2 codes + level 2's expander bits for the level-1 codes + level
    1's expander bits for the bytes given them (each part charged, segment ends included). The model's bits per
    byte is the better of the one- and two-level codes."""
    from sentcode.models.hier import code_split, level1_codes

    r = evaluate_hier(model, split, device)
    if upper is None:
        return r
    stride = upper.cfg.max_segment_bytes
    codes = code_split(split, level1_codes(model, split, device), stride)
    l2 = evaluate_hier(upper, codes, device)
    bits = r["render_bpb_oracle"] * r["bytes"] + l2["bits"]
    r["level2"] = {"bits_per_level1_code": l2["bpb"], "level1_codes_per_segment": l2["bytes_per_segment"],
                   "bytes_per_code": r["bytes"] / max(l2["segments"] * upper.cfg.codes_per_segment, 1),
                   "code_accuracy": l2["byte_accuracy"], "segments_exact": l2["segments_exact"],
                   "codebooks": l2["codebooks"], "plan_bits_per_level1_code": l2["plan_bpb"]}
    r["two_level_bpb"] = bits / max(r["bytes"], 1)
    r["one_level_bpb"] = r["bpb"]
    if r["two_level_bpb"] < r["bpb"]:
        r.update(bpb=r["two_level_bpb"], bits=bits)
    return r


def format_hier_result(r: dict) -> str:
    from sentcode.eval.steplm import format_steplm_result

    lines = [format_steplm_result({**r, "bpb": r.get("twopart_bpb", r["bpb"])})]
    if "onepart_bpb" in r:
        lines.append(f"  exact one-part (expander without codes): {r['onepart_bpb']:.4f} bits per byte; the model's bits "
                     f"per byte: {r['bpb']:.4f} ({'one' if r['bpb'] == r['onepart_bpb'] else 'two'}-part)")
    if "byte_accuracy" in r:
        lines.append(f"  compression: {r['bytes_per_segment']:.2f} bytes per segment, {r['bytes_per_code']:.2f} bytes "
                     f"per code ({r['code_bits_per_segment']:.0f} raw code bits per segment)")
        lines.append(f"  reconstruction from true codes: {r['byte_accuracy']:.2%} of bytes, {r['segments_exact']:.2%} "
                     f"of segments, {r['documents_exact']:.2%} of {r['documents']} documents exact")
        lines.append("  codebooks: " + ", ".join(f"level {i + 1} usage {b['usage']:.0%}, perplexity {b['perplexity']:.1f}"
                                                 for i, b in enumerate(r["codebooks"])))
    if "level2" in r:
        u = r["level2"]
        lines.append(f"  second level: {u['level1_codes_per_segment']:.2f} level-1 codes per segment, {u['bytes_per_code']:.2f} "
                     f"bytes per code; level-1 codes from true level-2 codes: {u['code_accuracy']:.2%} exact, "
                     f"{u['segments_exact']:.2%} of segments; codebook perplexity {u['codebooks'][0]['perplexity']:.1f}")
        lines.append(f"  two levels: {r['two_level_bpb']:.4f} bits per byte (one level {r['one_level_bpb']:.4f}); "
                     f"the model's: {r['bpb']:.4f}")
    return "\n".join(lines)


def evaluate_hier_run(gen, text_file=None, split: str = "test") -> dict:
    """``sentcode eval`` of a loaded autoencoder run: bits per byte and the autoencoder's figures."""
    from sentcode.eval.run import read_text_file
    from sentcode.eval.steplm import cached_test_result

    if text_file is not None:
        data, source = gen.split_arrays(read_text_file(text_file)), str(text_file)
    else:
        if (cached := cached_test_result(gen, split)) is not None:
            return cached
        data, source = SegmentSplit.load(gen.run_dir / "data" / f"{split}.npz"), f"{split} split"
    return {"family": "hier", "source": source, **evaluate_levels(gen.model, gen.upper_model, data, gen.device)}
