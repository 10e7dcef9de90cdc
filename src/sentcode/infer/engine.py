"""Token-id generation with a KV cache. The engine knows nothing about text.

Context policy, shared by the cached and uncached paths so that both produce the same tokens: the model sees
at most ``max_seq_len`` tokens. When the next forward would exceed that, the window jumps forward to keep
the newest half, and the cache is rebuilt from those tokens at positions 0.. (positions stay inside the
range the model was trained on, instead of freezing or running past it).
"""

from __future__ import annotations

from typing import Iterator

import torch

from sentcode.nn.device import model_device
from sentcode.nn.sampling import make_generator, sample_next


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids (a stop id is yielded, then generation ends)."""
    device = model_device(model)
    ctx = model.cfg.max_seq_len
    ids = list(prompt_ids)
    gen = make_generator(seed, device)
    loop = model.token_loop(top_p) if use_cache and hasattr(model, "token_loop") else None
    if loop is not None:  # an ONNX export runs the whole loop in its graph: the same tokens, fewer calls
        yield from loop.generate(ids, max_new_tokens, temperature, top_k, gen, stop_ids)
        return
    start = 0  # first token id inside the model's window
    cache, cached = None, 0  # cached: how many tokens of ids[start:] the cache holds
    model.eval()
    for _ in range(max_new_tokens):
        if len(ids) - start > ctx:
            start = len(ids) - ctx // 2
            cache, cached = None, 0
        if use_cache:
            if cache is None:
                cache, cached = model.new_cache(), 0
            new = torch.tensor([ids[start + cached:]], device=device)
            logits = model(new, cache=cache, start_pos=cached)[:, -1]
            cached = len(ids) - start
        else:
            logits = model(torch.tensor([ids[start:]], device=device))[:, -1]
        nxt = int(sample_next(logits, temperature, top_k, top_p, generator=gen)[0])
        ids.append(nxt)
        yield nxt
        if nxt in stop_ids:
            return
