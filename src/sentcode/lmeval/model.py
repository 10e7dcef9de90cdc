"""The ``sentcode`` model for lm-evaluation-harness, on top of ``sentcode.infer.scoring``.

``--model sentcode --model_args run=RUN_DIR[,device=cpu][,rerank=4]`` evaluates any run directory:

- ``loglikelihood``: ``scoring.loglikelihood_batch`` (flat LM: exact, context and continuation tokenized
  separately; sentence run: the two-part approximation, never greedy).
- ``loglikelihood_rolling``: ``scoring.loglikelihood_rolling_batch``: the text as one document, including its
  end-of-text term, as sentcode's bits per byte does; so lm-eval's ``bits_per_byte`` on a document equals
  ``sentcode eval --text-file`` on it (flat LM), and a sentence run is scored by its two-part code length.
- ``generate_until``: greedy unless ``do_sample`` is true (then ``temperature``, default 1), stopped at the
  first ``until`` string (cut before it) or after ``max_gen_toks`` (default 256): tokens for a flat LM; bytes
  of output for a sentence run, which writes whole sentences, each prefixed by the single space the sentence
  pipeline joins sentences with, and reranks ``rerank`` candidates only when sampling.

Importing this module registers the model under the name ``sentcode``. lm-eval 0.4.x finds models only
in its own registry, so ``sentcode lm-eval ...`` / ``python -m sentcode.lmeval ...`` import this module and
then run lm-eval's command line; newer lm-eval releases that read the ``lm_eval.models`` entry point declared
by this package find it by themselves.
"""

from __future__ import annotations

from sentcode.errors import SentcodeError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - depends on the environment
    raise SentcodeError("lm-eval is not installed: pip install 'sentcode[lmeval]'") from None

CHUNK = 256  # requests per scoring call: progress moves, memory stays bounded


def _progress(items, disable: bool, desc: str):
    from tqdm import tqdm

    return tqdm(items, disable=disable, desc=desc)


def generate_text(gen, context: str, until: list[str], max_len: int, temperature: float = 0.0,
                  seed: int = 0, rerank: int | None = None) -> str:
    """A continuation of ``context``, cut before the first stop string in ``until``; see the module docstring
    for what ``max_len`` counts."""
    from sentcode.infer.scoring import is_sentence

    if is_sentence(gen):
        if not context.strip():
            return ""  # a sentence run needs a sentence to continue
        text = ""
        pieces = gen.stream(context, max_sentences=64, rerank=rerank if temperature > 0 else 1,
                            temperature=temperature, seed=seed)
        for sentence in pieces:
            text += getattr(gen, "separator", " ") + sentence
            text, stopped = _cut(text, until)
            if stopped or len(text.encode("utf-8")) >= max_len:
                break
        return text.encode("utf-8")[:max_len].decode("utf-8", "ignore")
    from sentcode.infer.engine import generate_ids

    tok = gen.tokenizer
    # A prompt longer than the context keeps its newest tokens (the engine would slide the window anyway).
    ids = ([tok.eos_id] + tok.encode(context))[-gen.context :]
    out: list[int] = []
    text = ""
    for t in generate_ids(gen.model, ids, max_new_tokens=max_len, temperature=temperature, seed=seed,
                          stop_ids=(tok.eos_id,)):
        if t == tok.eos_id:
            break
        out.append(t)
        text, stopped = _cut(tok.decode(out).decode("utf-8", "replace"), until)
        if stopped:
            return text
    return tok.decode(out).decode("utf-8", "replace")


def _cut(text: str, until: list[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _pick_device(device: str | None) -> str:
    import torch

    if not device:
        return "cpu"
    # lm-eval's configuration asks for "cuda" when nothing was given; without a GPU that means the CPU.
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        import warnings

        warnings.warn(f"device {device!r} requested but CUDA is not available; using the CPU")
        return "cpu"
    return str(device)


@register_model("sentcode")
class SentcodeLM(LM):
    """lm-eval's view of a sentcode run directory (flat LM or sentence-step LM)."""

    def __init__(self, run: str | None = None, device: str | None = None, rerank: int | str | None = None,
                 batch_size=None, max_batch_size=None, **unknown):
        super().__init__()
        import sentcode

        if unknown:
            raise SentcodeError(f"unknown --model_args {', '.join(sorted(unknown))}: the sentcode model takes "
                                "run=RUN_DIR and optionally device=cpu|cuda and rerank=N")
        if not run:
            raise SentcodeError("the sentcode model needs --model_args run=RUN_DIR")
        self.run = str(run)
        self.rerank = None if rerank is None else int(rerank)
        self._device = _pick_device(device)
        # lm-eval's batch_size is accepted for compatibility; scoring batches requests by length itself.
        self.gen = sentcode.load(self.run, device=self._device)

    def get_model_info(self) -> dict:
        return {"sentcode_run": self.run, "sentcode_family": getattr(self.gen, "family", "lm")}

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from sentcode.infer.scoring import loglikelihood_batch

        out: list[tuple[float, bool]] = []
        for s in _progress(range(0, len(requests), CHUNK), disable_tqdm, "sentcode loglikelihood"):
            part = requests[s : s + CHUNK]
            for req, res in zip(part, loglikelihood_batch(self.gen, [r.args for r in part])):
                self.cache_hook.add_partial("loglikelihood", req.args, res)
                out.append(res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from sentcode.infer.scoring import loglikelihood_rolling_batch

        out: list[float] = []
        for s in _progress(range(0, len(requests), CHUNK), disable_tqdm, "sentcode loglikelihood_rolling"):
            part = requests[s : s + CHUNK]
            for req, res in zip(part, loglikelihood_rolling_batch(self.gen, [r.args[0] for r in part])):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
                out.append(res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in _progress(requests, disable_tqdm, "sentcode generate_until"):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_len = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 1.0)) if kwargs.pop("do_sample", False) else 0.0
            text = generate_text(self.gen, context, until, max_len, temperature=temperature, rerank=self.rerank)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out
