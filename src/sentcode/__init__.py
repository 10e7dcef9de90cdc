"""sentcode: small language models that generate text in steps larger than a token."""

__version__ = "0.1.0"


def load(run_dir, device: str = "cpu", renderer: str | None = None, backend: str = "torch"):
    """Load a trained run directory and return a generator with ``generate``, ``stream`` and ``score``.

    ``renderer`` ("ar" or "nar") picks which renderer writes a sentence-step run's text (default "ar").
    ``backend="onnx"`` runs a flat LM with ONNX Runtime (``pip install 'sentcode[onnx]'``).
    """
    from sentcode.infer.load import load as _load

    return _load(run_dir, device=device, renderer=renderer, backend=backend)


__all__ = ["__version__", "load"]
