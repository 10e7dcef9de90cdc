"""``sentcode lm-eval ARGS``: run lm-eval's own command line with the ``sentcode`` model registered.

lm-eval 0.4.x resolves ``--model NAME`` against its internal registry only (no plugin discovery), so a third
party model has to be registered in the same process before lm-eval parses its arguments. This wrapper does
exactly that and nothing else: it imports ``sentcode.lmeval.model`` (which registers ``sentcode``), adds
``--include_path`` for the bundled tasks unless one is given, and hands the arguments to lm-eval unchanged.
"""

from __future__ import annotations

import sys

from sentcode.errors import SentcodeError
from sentcode.lmeval import TASKS_DIR


def run_lm_eval(args: list[str]) -> int:
    """Run lm-eval's CLI with ``args``; returns its exit status."""
    try:
        import lm_eval.__main__ as lm_eval_main
    except ImportError:
        raise SentcodeError("lm-eval is not installed: pip install 'sentcode[lmeval]'") from None
    import sentcode.lmeval.model  # noqa: F401  registers the model under the name "sentcode"

    args = list(args)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]  # lm-eval's CLI reads sys.argv itself
    try:
        lm_eval_main.cli_evaluate()
    except SystemExit as e:  # argparse errors and --help inside lm-eval
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
