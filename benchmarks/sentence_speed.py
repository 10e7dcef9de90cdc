"""Generation speed of a sentence-step LM (AR and NAR renderers) against a flat byte LM with its KV cache.

    python benchmarks/sentence_speed.py --sentence RUN_DIR --flat RUN_DIR [--batch 1 8] [--repeats 5]
        [--max-sentences 6] [--rerank 1 4]

For each model and batch size B, B documents are continued at once (warm: one untimed run first; then the
median of --repeats timed runs): bytes/s (generated UTF-8 bytes of all B documents per second of wall-clock),
sentences/s and time to first sentence.

- Sentence-step model: ``generate_batch`` (planner step, renderer candidates, re-encoding and reranking, all
  counted), --max-sentences sentences per document, temperature 0.8, each --rerank value.
- Flat byte LM: B rows decoded together with one KV cache (the engine's window policy), as many bytes per
  document as the sentence model produced on average, no stop token. Its "time to first sentence" is the
  time to the mean sentence length of the sentence model's output.

Prompts are real held-out sentences of equal byte length (the models batch equal-shape rows only), long
enough to fill the renderer's context window. The parameter counts of both sides are recorded; compare
models of about the same total size. Held-out test bits per byte of each model is recorded next to its
speed (the sentence run's eval stage: two-part bpb with the AR renderer, with the NAR renderer, and the
no-code renderer alone; the flat LM: a full pass over its test split), so that
``plot_speed_quality.py`` can draw bpb against bytes/s. Writes results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

import sentcode  # noqa: E402
from sentcode.errors import SentcodeError  # noqa: E402
from sentcode.eval.run import evaluate_run  # noqa: E402
from sentcode.nn.sampling import make_generator, sample_next  # noqa: E402

PROMPT = ("In the year that has passed, our country has faced great trials, and it has met them. Our economy "
          "is growing again, and our people are working. We must now finish the work that we have begun.")


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def sentence_params(g) -> dict:
    out = {"encoder": params(g.encoder), "planner": params(g.planner), "renderer_ar": params(g.renderer)}
    if g.nar is not None:
        out["renderer_nar"] = params(g.nar)
    return out


def prompts(b: int) -> list[str]:
    # The same text cut at different sentence-preserving offsets would change the planner's history length;
    # equal copies keep every row the same shape, and sampling makes the continuations differ.
    return [PROMPT] * b


@torch.no_grad()
def flat_batch(model, prompt: bytes, b: int, n: int, seed: int) -> list[float]:
    """Decode ``n`` bytes for ``b`` copies of ``prompt`` together; returns the time at which each byte
    position was reached (seconds from the start), so callers can read a time to first sentence."""
    ctx = model.cfg.max_seq_len
    ids = torch.tensor([[257] + list(prompt)] * b)
    gen = make_generator(seed)
    t0 = time.perf_counter()
    cache, start, cached = None, 0, 0
    stamps = []
    for _ in range(n):
        if ids.shape[1] - start > ctx:  # the engine's policy: jump to keep the newest half
            start, cache, cached = ids.shape[1] - ctx // 2, None, 0
        if cache is None:
            cache, cached = model.new_cache(), 0
        logits = model(ids[:, start + cached :], cache=cache, start_pos=cached)[:, -1]
        cached = ids.shape[1] - start
        nxt = sample_next(logits, 0.8, None, None, generator=gen)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        stamps.append(time.perf_counter() - t0)
    return stamps


def time_sentence(g, b: int, max_sentences: int, rerank: int, repeats: int) -> dict:
    runs = []
    for i in range(repeats + 1):
        ps = prompts(b)
        t = time.perf_counter()
        # time to first sentence: one step of the loop for all rows
        first = g.generate_batch(ps, max_sentences=1, rerank=rerank, seed=1000 + i)
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        outs = g.generate_batch(ps, max_sentences=max_sentences, rerank=rerank, seed=i)
        dt = time.perf_counter() - t
        n_bytes = sum(len(o.encode()) for o in outs)
        n_sent = sum(len(g.split(o)) if o else 0 for o in outs)
        if i:
            runs.append({"seconds": dt, "bytes": n_bytes, "sentences": n_sent, "first_s": t_first,
                         "first_bytes": sum(len(o.encode()) for o in first)})
    med = statistics.median(r["seconds"] for r in runs)
    total_b = sum(r["bytes"] for r in runs)
    total_s = sum(r["seconds"] for r in runs)
    total_n = sum(r["sentences"] for r in runs)
    return {
        "bytes_s": total_b / total_s, "sentences_s": total_n / total_s,
        "median_seconds": med, "mean_bytes_per_doc": total_b / (len(runs) * b),
        "mean_sentence_bytes": total_b / max(1, total_n),
        "time_to_first_sentence_s": statistics.median(r["first_s"] for r in runs), "runs": runs,
    }


def time_flat(model, b: int, n_bytes: int, sentence_bytes: float, repeats: int) -> dict:
    runs = []
    for i in range(repeats + 1):
        stamps = flat_batch(model, PROMPT.encode(), b, n_bytes, seed=i)
        if i:
            runs.append({"seconds": stamps[-1], "first_s": stamps[min(len(stamps), max(1, round(sentence_bytes))) - 1]})
    med = statistics.median(r["seconds"] for r in runs)
    return {"bytes_s": b * n_bytes / med, "sentences_s": b * n_bytes / sentence_bytes / med, "median_seconds": med,
            "bytes_per_doc": n_bytes, "time_to_first_sentence_s": statistics.median(r["first_s"] for r in runs),
            "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentence", required=True, help="a sentence pipeline run directory")
    ap.add_argument("--flat", required=True, help="a flat byte LM run directory")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-sentences", type=int, default=6)
    ap.add_argument("--rerank", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--name", default="sentence_speed")
    args = ap.parse_args()

    flat = sentcode.load(args.flat)
    if flat.tokenizer.vocab_size != 259:
        sys.exit("error: --flat must be a byte-level LM run (bytes per step is what is compared)")
    kinds = ["ar"]
    try:
        g = sentcode.load(args.sentence, renderer="nar")
        kinds.append("nar")
    except SentcodeError:
        g = sentcode.load(args.sentence)
    sizes = sentence_params(g)
    rows = []
    for b in args.batch:
        ref_bytes = None
        for kind in kinds:
            g.renderer_kind = kind
            for rerank in args.rerank:
                r = time_sentence(g, b, args.max_sentences, rerank, args.repeats)
                r.update(model=f"sentence-{kind}", batch=b, rerank=rerank)
                rows.append(r)
                ref_bytes = ref_bytes or r
                print(f"B={b} sentence-{kind} rerank {rerank}: {r['bytes_s']:8.1f} B/s  {r['sentences_s']:6.2f} sent/s  "
                      f"first sentence {r['time_to_first_sentence_s'] * 1000:7.1f} ms", flush=True)
        n = max(16, round(ref_bytes["mean_bytes_per_doc"]))
        r = time_flat(flat.model, b, n, ref_bytes["mean_sentence_bytes"], args.repeats)
        r.update(model="flat-bytes", batch=b)
        rows.append(r)
        print(f"B={b} flat byte LM     : {r['bytes_s']:8.1f} B/s  {r['sentences_s']:6.2f} sent/s  "
              f"first sentence {r['time_to_first_sentence_s'] * 1000:7.1f} ms", flush=True)
        for row in rows:
            if row["batch"] == b and row["model"] != "flat-bytes":
                row["speedup_vs_flat"] = row["bytes_s"] / r["bytes_s"]
    sp = {"sentence": sizes, "sentence_total_ar": sizes["encoder"] + sizes["planner"] + sizes["renderer_ar"],
          "flat": params(flat.model)}
    if "renderer_nar" in sizes:
        sp["sentence_total_nar"] = sizes["encoder"] + sizes["planner"] + sizes["renderer_nar"]
    ev = json.loads((Path(args.sentence) / "eval" / "eval.json").read_text())
    bpb = {"sentence-ar": ev["bpb"], "sentence-nar": ev.get("nar_bpb"), "nocode-renderer": ev.get("nocode_bpb"),
           "flat-bytes": evaluate_run(flat, split="test")["bpb"], "sentence_split": ev.get("split")}
    print(f"test bpb: {bpb}")
    out = save(args.name, {"rows": rows, "params": sp, "threads": torch.get_num_threads(), "bpb": bpb,
                           "sentence_run": Path(args.sentence).name, "flat_run": Path(args.flat).name})
    print(f"params: {sp}\nmachine: {machine()}\nwrote {out}")


if __name__ == "__main__":
    main()
