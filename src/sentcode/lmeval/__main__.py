"""``python -m sentcode.lmeval ARGS``: lm-eval's command line with the ``sentcode`` model registered."""

import sys

from sentcode.errors import SentcodeError
from sentcode.lmeval.cli import run_lm_eval

if __name__ == "__main__":
    try:
        sys.exit(run_lm_eval(sys.argv[1:]))
    except SentcodeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
