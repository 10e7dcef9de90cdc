"""ONNX Runtime, imported when first needed (the extra ``onnx``), and its CPU sessions as every exported graph uses
them."""

from __future__ import annotations

from pathlib import Path

import torch

from sentcode.errors import SentcodeError

ONNX_EXTRA = "onnx"


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise SentcodeError(
            f"the onnx backend needs ONNX Runtime: pip install 'sentcode[{ONNX_EXTRA}]'") from None
    return onnxruntime


def ort_session(path: Path | bytes, threads: int | None = None, spin: bool = True):
    """A CPU session over a graph file (or a serialised graph). ``spin``: ONNX Runtime's threads wait busily between runs (fastest when nothing else runs between them; a
    graph called between PyTorch calls, as a renderer is, should not spin: its waiting threads take the cores that
    PyTorch's next call needs)."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are not the user's concern
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unreadable or invalid graphs
        where = "the decode loop" if isinstance(path, bytes) else path
        raise SentcodeError(f"cannot load {where}: {str(e).splitlines()[0][:200]}") from None
