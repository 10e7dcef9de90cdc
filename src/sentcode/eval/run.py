"""Evaluate a run directory: held-out split of its data, or any text file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from sentcode.data import DataDir
from sentcode.errors import DataError, SentcodeError
from sentcode.eval.bpb import evaluate_bpb


def read_text_file(path: str | Path) -> bytes:
    """Raw bytes of a text file; invalid UTF-8 is kept (and scored) with one warning."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file not found: {p}")
    data = p.read_bytes()
    if not data.strip():
        raise DataError(f"text file is empty: {p}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        warnings.warn(f"{p} is not valid UTF-8 (first bad byte at offset {e.start}); its bytes are scored as they are")
    return data


def evaluate_run(gen, text_file: str | Path | None = None, split: str = "test", max_tokens: int | None = None) -> dict:
    """Bits per byte of a loaded generator over a data split or a file, as a JSON-ready dict.

    A sentence-step run reports its two-part bits per byte under the same ``bpb`` key, plus its parts.
    """
    if getattr(gen, "family", "lm") == "sentence":
        return _evaluate_sentence(gen, text_file, split)
    if getattr(gen, "family", "lm") == "steplm":
        return _evaluate_steplm(gen, text_file, split)
    tok = gen.tokenizer
    if text_file is not None:
        ids = tok.encode(read_text_file(text_file))
        tokens = np.array(ids + [tok.eos_id], dtype=np.int64)
        source = str(text_file)
    else:
        data_dir = gen.run_info.get("data_dir")
        if not data_dir or not Path(data_dir).is_dir():
            raise SentcodeError(f"the run's data directory ({data_dir}) is not available; pass --text-file FILE")
        tokens = DataDir(data_dir).tokens(split)
        source = f"{split} split of {data_dir}"
    result = evaluate_bpb(gen.model, tokens, tok, gen.context, device=next(gen.model.parameters()).device,
                          max_tokens=max_tokens)
    return {"family": gen.family, "source": source, "tokenizer": tok.kind, **result}


def _evaluate_sentence(gen, text_file, split: str) -> dict:
    from sentcode.eval.sentence import evaluate_sentence_run
    from sentcode.pipeline.sentence import input_hash, read_stage, stage_dir

    if text_file is None and split == "test":
        # The pipeline's eval stage already scored the test split: reuse it while it is up to date.
        rec = read_stage(gen.run_dir, "eval")
        cached = stage_dir(gen.run_dir, "eval") / "eval.json"
        if rec is not None and cached.is_file() and rec.get("input_hash") == input_hash(gen.run_dir, gen.cfg, "eval"):
            return json.loads(cached.read_text())
    if text_file is not None:
        data = read_text_file(text_file)
        return {"family": "sentence", "source": str(text_file), **gen.score_details(data)}
    return evaluate_sentence_run(gen.run_dir, split=split, cfg=gen.cfg)


def _evaluate_steplm(gen, text_file, split: str) -> dict:
    from sentcode.data.segments import SegmentSplit
    from sentcode.eval.steplm import evaluate_segments

    if text_file is not None:
        return {"family": "steplm", "source": str(text_file), **gen.score_details(read_text_file(text_file))}
    cached, weights = gen.run_dir / "eval.json", gen.run_dir / "model.safetensors"
    if split == "test" and cached.is_file() and weights.is_file() and cached.stat().st_mtime >= weights.stat().st_mtime:
        return json.loads(cached.read_text())  # written by training from these weights
    data = SegmentSplit.load(gen.run_dir / "data" / f"{split}.npz")
    return {"family": "steplm", "source": f"{split} split", **evaluate_segments(gen.model, data, gen.device)}


def format_result(result: dict) -> str:
    if result.get("family") == "steplm":
        from sentcode.eval.steplm import format_steplm_result

        return format_steplm_result(result)
    if result.get("family") == "sentence":
        from sentcode.eval.sentence import format_sentence_result

        return format_sentence_result(result)
    return (f"{result['source']}: {result['bpb']:.4f} bits per byte "
            f"({result['bytes']:,} bytes, {result['tokens']:,} tokens)")


def dumps(result: dict) -> str:
    return json.dumps(result, sort_keys=True)
