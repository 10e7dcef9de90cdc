"""Settings of ``sentcode serve``: where it listens and the limits that keep one client from taking it down."""

from __future__ import annotations

from dataclasses import dataclass

# A sentence-step run can never write more sentences than its generator allows in one call.
SENTENCE_CAP = 64


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback: exposing a model to a network is a decision the user makes explicitly
    port: int = 8000
    model_name: str | None = None  # the id in /v1/models and responses; default: the run directory's name
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are parsed
    max_prompt_bytes: int = 1 << 16  # UTF-8 bytes of one prompt (or of all chat messages together)
    max_tokens: int = 1024  # cap on max_tokens: flat LM tokens; sentences (at most SENTENCE_CAP) for a sentence run
    max_batch: int = 8  # flat LM rows decoded together; a sentence run serves one request at a time
    max_queue: int = 32  # requests admitted beyond those being served; more get 429
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    backend: str = "torch"  # "onnx": a flat LM run by ONNX Runtime (see ``sentcode.load``)

    def check(self) -> None:
        from sentcode.errors import SentcodeError

        for name in ("max_body_bytes", "max_prompt_bytes", "max_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise SentcodeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise SentcodeError(f"--max-queue must be >= 0, got {self.max_queue}")
        if not 0 <= self.port <= 65535:
            raise SentcodeError(f"--port must lie in 0..65535, got {self.port}")
        if self.threads is not None and self.threads < 1:
            raise SentcodeError(f"--threads must be >= 1, got {self.threads}")
