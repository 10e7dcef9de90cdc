"""The facade behind ``sentcode.load``: text in, text out, for a trained run directory."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml

from sentcode.config import config_from_dict
from sentcode.errors import CheckpointError, SentcodeError
from sentcode.eval.bpb import evaluate_bpb
from sentcode.infer.engine import generate_ids
from sentcode.infer.sampling import check_sampling
from sentcode.models.lm import LM
from sentcode.tokenizer import load_tokenizer
from sentcode.train import checkpoint as ckpt_io


def _read_run(run_dir: Path) -> tuple[dict, dict]:
    if not run_dir.is_dir():
        raise SentcodeError(f"no run directory at {run_dir}")
    cfg_path, run_path = run_dir / "config.yaml", run_dir / "run.json"
    if not cfg_path.is_file() or not run_path.is_file():
        raise SentcodeError(f"{run_dir} is not a sentcode run directory (config.yaml or run.json is missing)")
    try:
        return yaml.safe_load(cfg_path.read_text()), json.loads(run_path.read_text())
    except (yaml.YAMLError, ValueError) as e:
        raise SentcodeError(f"{run_dir} has a corrupt config.yaml or run.json ({type(e).__name__})") from None


def load_lm_weights(model: torch.nn.Module, run_dir: Path) -> str:
    """Final safetensors weights if present, else the newest training checkpoint."""
    st = run_dir / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(str(st))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"cannot read {st}: file is corrupt ({type(e).__name__})") from None
        if "head.weight" not in state and getattr(model.cfg, "tie_embeddings", False):
            state["head.weight"] = state["embed.weight"]
        ckpt_io.load_model_state(model, state, str(st))
        return str(st)
    latest = ckpt_io.latest_checkpoint(run_dir)
    if latest is None:
        raise CheckpointError(f"{run_dir} has no trained weights yet (no model.safetensors and no checkpoint)")
    ckpt_io.load_model_state(model, ckpt_io.load_checkpoint(latest)["model"], str(latest))
    return str(latest)


class FlatGenerator:
    """Generation and scoring for a flat LM run."""

    family = "lm"

    def __init__(self, model: LM, tokenizer, run_dir: Path | None = None, run_info: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.run_info = run_info or {}

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    def _prompt_ids(self, prompt: str | bytes) -> list[int]:
        ids = [self.tokenizer.eos_id] + self.tokenizer.encode(prompt)  # EOS marks a document start
        if len(ids) > self.context:
            raise SentcodeError(
                f"prompt is {len(ids) - 1} tokens but the model's context is {self.context - 1}; shorten it"
            )
        return ids

    def stream(
        self,
        prompt: str | bytes,
        max_bytes: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | None = None,
        use_cache: bool = True,
    ) -> Iterator[str]:
        """Yield the continuation as text pieces, each a complete UTF-8 sequence."""
        check_sampling(temperature, top_k, top_p)
        if max_bytes < 0:
            raise SentcodeError(f"max_bytes must be >= 0, got {max_bytes}")
        ids = self._prompt_ids(prompt)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced, text = 0, ""
        stop_ids = (self.tokenizer.eos_id,)
        for tok in generate_ids(self.model, ids, max_new_tokens=max_bytes, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, stop_ids=stop_ids, use_cache=use_cache):
            if tok in stop_ids:
                break
            piece = self.tokenizer.decode([tok])[: max_bytes - produced]
            produced += len(piece)
            out = decoder.decode(piece)
            if stop is not None:
                text += out
                cut = text.find(stop)
                if cut >= 0:
                    yield text[:cut]
                    return
                safe = len(text) - len(stop) + 1  # hold back what could be the start of the stop string
                if safe > 0:
                    yield text[:safe]
                    text = text[safe:]
            elif out:
                yield out
            if produced >= max_bytes:
                break
        tail = text + decoder.decode(b"", final=True)
        if tail:
            yield tail

    def generate(self, prompt: str | bytes, max_bytes: int = 200, **kw) -> str:
        return "".join(self.stream(prompt, max_bytes=max_bytes, **kw))

    @torch.no_grad()
    def score(self, text: str | bytes) -> float:
        """Bits per UTF-8 byte of ``text`` as one document (end-of-text included)."""
        return self.score_details(text)["bpb"]

    def score_details(self, text: str | bytes) -> dict:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise SentcodeError("cannot score empty text")
        tokens = np.array(ids + [self.tokenizer.eos_id], dtype=np.int64)
        return evaluate_bpb(self.model, tokens, self.tokenizer, self.context,
                            device=next(self.model.parameters()).device)


def load(run_dir: str | Path, device: str = "cpu"):
    """Load any trained run directory and return its generator."""
    run_dir = Path(run_dir)
    cfg_dict, run_info = _read_run(run_dir)
    family = cfg_dict.get("family", "lm")
    if family != "lm":
        raise SentcodeError(f"{run_dir} holds a {family!r} model, which this version cannot load")
    cfg = config_from_dict(cfg_dict)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(f"{run_dir}: tokenizer has {tokenizer.vocab_size} tokens, model expects {cfg.model.vocab_size}")
    model = LM(cfg.model)
    load_lm_weights(model, run_dir)
    return FlatGenerator(model.to(device), tokenizer, run_dir, run_info)
