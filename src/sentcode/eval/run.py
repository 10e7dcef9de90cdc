"""Evaluate a loaded run: a split of its data, or any text file, through its family's scoring."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from sentcode.data import DataDir
from sentcode.errors import DataError, SentcodeError
from sentcode.eval.bpb import evaluate_bpb
from sentcode.nn.device import model_device
from sentcode.registry import family, family_of


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
    """Bits per byte of a loaded generator over a data split or a file, as a JSON-ready dict, by its family's
    own scoring (a sentence-step run reports its two-part bits per byte under the same ``bpb`` key, plus its
    parts)."""
    fam = family_of(gen)
    if max_tokens is not None:
        return fam.resolve("evaluate")(gen, text_file, split, max_tokens=max_tokens)
    return fam.resolve("evaluate")(gen, text_file, split)


def format_result(result: dict) -> str:
    return family(result.get("family")).resolve("format")(result)


def evaluate_flat(gen, text_file: str | Path | None = None, split: str = "test", max_tokens: int | None = None) -> dict:
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
    result = evaluate_bpb(gen.model, tokens, tok, gen.context, device=model_device(gen.model),
                          max_tokens=max_tokens)
    return {"family": gen.family, "source": source, "tokenizer": tok.kind, **result}


def format_flat(result: dict) -> str:
    return (f"{result['source']}: {result['bpb']:.4f} bits per byte "
            f"({result['bytes']:,} bytes, {result['tokens']:,} tokens)")


def dumps(result: dict) -> str:
    return json.dumps(result, sort_keys=True)
